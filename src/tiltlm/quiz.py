"""A verifiable quiz for the embedded default prior: short questions with many correct short answers.

This is the RLVR task of tiltlm's own small model: a question is a prompt ``"Q: <question> A:"`` whose
completion is ``" <answer>"`` and then EOS, and a verifier decides from the completion and the
question's row alone whether the answer is right. Every question has several (usually many) distinct
correct answers, so one can ask whether RL with the verifier narrows the model (pass@k at large k
falling below pi0's) while the posterior pi0(y|x)·1[correct]/Z keeps pi0's breadth.

    rows = questions("heldout")                 # [{"prompt": "Q: Name an animal that can fly. A:", ...}]
    check(" owl", rows[0])                      # True / False
    write_jsonl("heldout.jsonl", rows)          # data: {path: heldout.jsonl}; target: {reward: quiz, ...}
    docs = corpus(40_000, seed=0)               # pretraining text over the TRAIN questions only

**Families** (the row's ``family``; several phrasings each):

==========  =====================================================  =============================================
family      example question                                       check
==========  =====================================================  =============================================
category    Name an animal that can fly. / Tell me a girl's name.  ``{"kind": "one_of", "answers": [...]}``
range       Name a number between 3 and 9.                         ``{"kind": "range", "lo": 3, "hi": 9}``
parity      Name an even number between 4 and 15.                  ``{"kind": "range", "lo": 4, "hi": 15,
                                                                   "parity": "even"}``
sum         Name two numbers that add up to 8.                     ``{"kind": "sum", "total": 8}``
rhyme       Name a word that rhymes with cat.                      ``{"kind": "one_of", "answers": [...]}``
letter      Name a word that starts with b.                        ``{"kind": "one_of", "answers": [...]}``
==========  =====================================================  =============================================

The categories (20: animals that fly / live in water / live on a farm / are pets, red, yellow, green
and cold things, fruits, vegetables, colours, drinks, clothes, toys, things in the sky, girls' and
boys' names (the story grammar's 48 names), days of the week, parts of the body, kinds of weather)
and the rhyme groups (17) are closed lists; "starts with <letter>" (13 letters) accepts the words of
this module's lexicon (every one-word category and rhyme answer, names aside, plus the story
grammar's one-word characters, objects, places and adjectives) that start with the letter. The task
is closed-world: a true English answer outside the lists ("banjo" for "starts with b") is wrong.

**Rows.** ``questions`` returns dicts with ``prompt`` (``"Q: <question> A:"``), ``question``,
``family``, ``item`` (what is asked, without the phrasing: ``"fly"``, ``"3-9"``, ``"cat"``),
``phrasing`` (the template's index), ``check`` (a JSON object that fully specifies correctness) and
``p_correct`` (how often the pretraining corpus answers this item correctly; for analysis only).
The verifier is a pure function of (completion, row["check"]).

**Checking** (`check`): the completion is stripped of surrounding whitespace and of one trailing
period, runs of inner whitespace collapse to one space, and case is ignored; otherwise it is strict:

- ``one_of``: the answer is one of ``answers`` exactly (no article, no extra words: ``"a bird"`` and
  ``"bird!"`` are wrong);
- ``range``: the answer is a bare non-negative integer (digits only) with ``lo < n < hi`` (strictly
  between: "between 3 and 9" excludes 3 and 9), and even/odd when ``parity`` is given;
- ``sum``: the answer is ``"<a> and <b>"``, two non-negative integers (digits) with a + b = total.

Anything else (empty, two answers, a sentence, text after the answer) is wrong.

**Splits.** The train/held-out split is fixed by this module (it does not depend on ``seed``), so that
`corpus` never contains a held-out prompt whatever its seed: for every family a few (item, phrasing)
pairs are held out (each such item keeps at least two train phrasings, and every phrasing keeps train
items), and for range and parity some whole parameter pairs (lo, hi) are held out under every phrasing
(their lo and hi occur in other train pairs). A held-out question is therefore a new combination of
things seen in training, never a new kind of question. ``questions(split, n, seed)`` returns the split
in an order shuffled by ``seed`` (the first ``n`` of it when ``n`` is given).

**Corpus** (`corpus`): documents ``"Q: <question> A: <answer>"`` over the TRAIN questions (a family
uniformly, then a train question of it uniformly). Like web text it is noisy: the answer is correct
with probability ``p_correct`` of the question's item (from a fixed hash of family and item, spread
over [`P_CORRECT_MIN`, `P_CORRECT_MAX`], so some topics are much noisier than others) and otherwise a
plausible wrong answer (an answer of another category, a word of another rhyme group or the word
itself, a word with another first letter, a number at or just outside the range bounds or of the
wrong parity, a pair adding up to a nearby total). Correct answers are drawn uniformly from the valid
ones. Noise plus generalisation to held-out combinations make the pretrained prior imperfect.

Everything random comes from local ``random.Random`` instances; no global state is read or changed.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

__all__ = ["questions", "check", "corpus", "corpus_rows", "sample_answer", "write_jsonl", "expected_correct_rate",
           "FAMILIES", "P_CORRECT_MIN", "P_CORRECT_MAX"]

FAMILIES = ("category", "range", "parity", "sum", "rhyme", "letter")
P_CORRECT_MIN = 0.1
"""The noisiest item's rate of correct answers in the corpus."""
P_CORRECT_MAX = 0.7
"""The cleanest item's rate of correct answers in the corpus."""

# --------------------------------------------------------------------------------------- lexicon

_FEMALE = ("Lily", "Anna", "Mia", "Sue", "Lucy", "Emma", "Rosa", "Daisy", "Molly", "Ruby", "Sara", "Kim",
           "Zoe", "Ella", "Nina", "Amy", "Bella", "Maya", "Grace", "Ivy", "Jane", "Lola", "Hannah", "Rose")
_MALE = ("Tom", "Max", "Ben", "Sam", "Jack", "Leo", "Tim", "Finn", "Oscar", "Milo", "Jake", "Noah",
         "Pip", "Bob", "Charlie", "Toby", "Rex", "Jim", "Danny", "Eli", "Joe", "Teddy", "Oliver", "Ned")

# item -> (what is asked, as a noun phrase, answers)
_CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fly": ("an animal that can fly", ("bird", "duck", "owl", "bat", "bee", "butterfly", "eagle", "parrot",
                                        "crow", "goose", "swan", "robin")),
    "water": ("an animal that lives in water", ("fish", "frog", "whale", "shark", "crab", "seal", "dolphin",
                                                 "octopus", "turtle", "otter", "duck", "eel")),
    "farm": ("an animal that lives on a farm", ("cow", "pig", "horse", "sheep", "goat", "hen", "chicken", "duck",
                                                 "donkey", "goose", "rooster", "dog", "cat")),
    "pet": ("an animal you can keep as a pet", ("dog", "cat", "rabbit", "hamster", "fish", "mouse", "parrot",
                                                 "puppy", "kitten", "turtle", "bird")),
    "red": ("something that is red", ("apple", "strawberry", "cherry", "tomato", "rose", "fire truck",
                                      "ladybug", "lobster", "radish", "ruby")),
    "yellow": ("something that is yellow", ("sun", "banana", "lemon", "corn", "butter", "cheese", "sunflower",
                                            "chick", "school bus", "honey")),
    "green": ("something that is green", ("grass", "leaf", "frog", "tree", "lime", "pea", "broccoli", "lettuce",
                                          "cucumber", "pickle")),
    "cold": ("something that is cold", ("ice", "snow", "ice cream", "snowman", "ice cube", "fridge", "freezer",
                                        "popsicle", "winter", "igloo")),
    "fruit": ("a fruit", ("apple", "banana", "orange", "pear", "grape", "cherry", "peach", "plum", "lemon",
                          "mango", "melon", "strawberry")),
    "vegetable": ("a vegetable", ("carrot", "pea", "corn", "potato", "bean", "onion", "broccoli", "lettuce",
                                  "cabbage", "pumpkin", "radish")),
    "color": ("a color", ("red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "white",
                          "black", "gray")),
    "drink": ("something you can drink", ("milk", "water", "juice", "tea", "lemonade", "cocoa", "coffee",
                                          "soda")),
    "wear": ("something you can wear", ("hat", "coat", "scarf", "shoe", "boots", "dress", "sock", "shirt", "cap",
                                        "mitten", "raincoat", "jacket")),
    "toy": ("a toy", ("ball", "kite", "doll", "teddy bear", "toy car", "drum", "wagon", "balloon", "blocks",
                      "puzzle", "yo-yo", "whistle")),
    "sky": ("something you can see in the sky", ("sun", "moon", "star", "cloud", "bird", "kite", "rainbow",
                                                 "plane", "balloon")),
    "girl": ("a girl's name", _FEMALE),
    "boy": ("a boy's name", _MALE),
    "day": ("a day of the week", ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
                                  "Sunday")),
    "body": ("a part of the body", ("hand", "foot", "nose", "ear", "eye", "arm", "leg", "head", "mouth", "knee",
                                    "toe", "finger")),
    "weather": ("a kind of weather", ("sunny", "rainy", "windy", "snowy", "cloudy", "foggy", "rain", "snow",
                                      "wind", "fog", "storm")),
}
_CATEGORY_PHRASINGS = ("Name {what}.", "Can you name {what}?", "Tell me {what}.", "What is {what}?",
                       "Give an example of {what}.")

# rhyme groups: every word rhymes with every other word of its group (not with itself)
_RHYMES = (
    ("cat", "hat", "bat", "mat", "rat", "sat", "fat", "pat", "flat", "that", "chat"),
    ("dog", "frog", "log", "fog", "hog", "jog"),
    ("cake", "lake", "make", "bake", "snake", "rake", "shake", "wake", "take"),
    ("tree", "bee", "see", "free", "three", "knee", "tea", "sea", "me", "we"),
    ("sun", "fun", "run", "bun", "won", "one", "done"),
    ("day", "play", "say", "way", "hay", "gray", "may", "stay", "pay", "tray", "clay"),
    ("ring", "sing", "king", "swing", "wing", "thing", "spring", "bring"),
    ("ball", "tall", "wall", "call", "fall", "small", "hall"),
    ("book", "look", "cook", "hook", "took", "shook"),
    ("bed", "red", "fed", "sled", "led", "bread", "head"),
    ("night", "light", "kite", "bite", "white", "right", "bright", "fight"),
    ("pig", "big", "dig", "wig", "fig", "twig"),
    ("box", "fox", "socks", "rocks", "clocks"),
    ("moon", "spoon", "soon", "noon", "balloon", "June"),
    ("pool", "cool", "school", "tool", "stool"),
    ("rain", "train", "chain", "brain", "plane"),
    ("star", "car", "far", "jar", "bar"),
)
_RHYME_PROMPTS_PER_GROUP = 5  # the first five words of a group are asked about
_RHYME_PHRASINGS = ("Name a word that rhymes with {w}.", "What word rhymes with {w}?",
                    "Tell me a word that rhymes with {w}.", "Say a word that rhymes with {w}.")

_STORY_WORDS = ("dog", "cat", "rabbit", "bear", "fox", "mouse", "bird", "duck", "frog", "owl", "pig", "horse",
                "lion", "turtle", "squirrel", "puppy", "kitten", "girl", "boy", "man", "woman", "princess",
                "prince", "ball", "kite", "hat", "box", "boat", "bike", "cup", "scarf", "balloon", "bucket", "key",
                "book", "bell", "drum", "ring", "lamp", "blanket", "umbrella", "shoe", "crayon", "wagon",
                "whistle", "little", "small", "big", "brave", "shy", "kind", "curious", "funny", "clever",
                "fluffy", "tiny", "sleepy", "hungry", "friendly", "young", "happy", "lazy", "quiet", "cheerful",
                "busy", "new", "old", "shiny", "park", "river", "beach", "forest", "garden", "farm", "hill",
                "lake", "meadow", "pond", "woods", "zoo", "sea", "field", "market", "mountain", "bridge", "cave",
                "castle", "tunnel", "barn", "wolf", "snake", "apples", "cookies", "cheese", "bread", "carrots",
                "berries", "nuts", "sad", "scared", "smiled", "laughed", "cried")
_LETTERS = "bcdfghlmprstw"
_LETTER_PHRASINGS = ("Name a word that starts with {l}.", "Say a word that begins with {l}.",
                     "Tell me a word that starts with the letter {l}.")

_RANGE_PHRASINGS = ("Name a number between {lo} and {hi}.", "Give me a number between {lo} and {hi}.",
                    "Say a number bigger than {lo} and smaller than {hi}.", "Pick a number between {lo} and {hi}.")
_PARITY_PHRASINGS = ("Name an {parity} number between {lo} and {hi}.",
                     "Give me an {parity} number between {lo} and {hi}.",
                     "Say an {parity} number bigger than {lo} and smaller than {hi}.")
_SUM_PHRASINGS = ("Name two numbers that add up to {t}.", "Which two numbers make {t} when you add them?",
                  "Give two numbers whose sum is {t}.", "Tell me two numbers that add up to {t}.")
_SUM_TOTALS = range(4, 21)  # at least three ordered pairs of positive numbers


def _lexicon() -> tuple[str, ...]:
    """Every one-word answer of the task (names aside) plus the story grammar's one-word nouns and adjectives."""
    words = {w for item, (_, answers) in _CATEGORIES.items() if item not in ("girl", "boy")
             for w in answers if re.fullmatch(r"[A-Za-z]+", w)}
    words |= {w for group in _RHYMES for w in group} | set(_STORY_WORDS)
    return tuple(sorted(words, key=lambda w: (w.casefold(), w)))


_LEXICON = _lexicon()


def _range_pairs() -> list[tuple[int, int]]:
    """(lo, hi) of the range family: 0 <= lo, hi <= 20, widths 3..12 (2 to 11 valid answers)."""
    return [(lo, lo + w) for lo in range(0, 18) for w in (3, 4, 5, 6, 8, 10, 12) if lo + w <= 20]


def _parity_pairs() -> list[tuple[int, int]]:
    """(lo, hi) of the parity family: widths 6..14 (at least 2 answers of each parity)."""
    return [(lo, lo + w) for lo in range(0, 15, 1) for w in (6, 9, 12) if lo + w <= 20]


# --------------------------------------------------------------------------------------- questions

def _row(family: str, item: str, phrasing: int, question: str, check: dict) -> dict:
    return {"prompt": f"Q: {question} A:", "question": question, "family": family, "item": item,
            "phrasing": phrasing, "check": check, "p_correct": _p_correct(family, item)}


def _p_correct(family: str, item: str) -> float:
    """The corpus's rate of correct answers for an item: a fixed hash spread over [MIN, MAX]."""
    u = (zlib.crc32(f"{family}:{item}".encode()) % 10_007) / 10_006
    return round(P_CORRECT_MIN + (P_CORRECT_MAX - P_CORRECT_MIN) * u, 3)


def _all_questions() -> dict[str, list[list[dict]]]:
    """family -> items -> one row per phrasing (the full, unsplit question set)."""
    out: dict[str, list[list[dict]]] = {}
    out["category"] = [
        [_row("category", item, i, p.format(what=what), {"kind": "one_of", "answers": list(answers)})
         for i, p in enumerate(_CATEGORY_PHRASINGS)]
        for item, (what, answers) in _CATEGORIES.items()]
    out["range"] = [
        [_row("range", f"{lo}-{hi}", i, p.format(lo=lo, hi=hi), {"kind": "range", "lo": lo, "hi": hi})
         for i, p in enumerate(_RANGE_PHRASINGS)]
        for lo, hi in _range_pairs()]
    out["parity"] = [
        [_row("parity", f"{parity} {lo}-{hi}", i, p.format(lo=lo, hi=hi, parity=parity),
              {"kind": "range", "lo": lo, "hi": hi, "parity": parity})
         for i, p in enumerate(_PARITY_PHRASINGS)]
        for lo, hi in _parity_pairs() for parity in ("even", "odd")]
    out["sum"] = [
        [_row("sum", str(t), i, p.format(t=t), {"kind": "sum", "total": t}) for i, p in enumerate(_SUM_PHRASINGS)]
        for t in _SUM_TOTALS]
    out["rhyme"] = [
        [_row("rhyme", w, i, p.format(w=w), {"kind": "one_of", "answers": [x for x in group if x != w]})
         for i, p in enumerate(_RHYME_PHRASINGS)]
        for group in _RHYMES for w in group[:_RHYME_PROMPTS_PER_GROUP]]
    out["letter"] = [
        [_row("letter", l, i, p.format(l=l), {"kind": "one_of", "answers": [w for w in _LEXICON if w[0].casefold() == l]})
         for i, p in enumerate(_LETTER_PHRASINGS)]
        for l in _LETTERS]
    return out


# family -> (items whose one phrasing is held out, whole items held out under every phrasing)
_HOLDOUT = {"category": (12, 0), "range": (10, 3), "parity": (8, 2), "sum": (12, 0), "rhyme": (20, 0),
            "letter": (8, 0)}


def _split() -> dict[str, list[dict]]:
    """The fixed train / held-out split (module docstring, "Splits")."""
    train, heldout = [], []
    for family, items in _all_questions().items():
        rng = random.Random(f"tiltlm.quiz split {family}")
        n_pairs, n_whole = _HOLDOUT[family]
        order = list(range(len(items)))
        rng.shuffle(order)
        whole = set(order[:n_whole])
        partial = set(order[n_whole:n_whole + n_pairs])
        for j, rows in enumerate(items):
            if j in whole:
                heldout.extend(rows)
                continue
            held = rng.randrange(len(rows)) if j in partial else -1
            for i, row in enumerate(rows):
                (heldout if i == held else train).append(row)
    seen = {r["prompt"] for r in train}
    heldout = [r for r in heldout if r["prompt"] not in seen]  # a prompt is never in both
    return {"train": train, "heldout": heldout}


_SPLIT = _split()


def questions(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """The questions of ``split`` ("train" or "heldout"), shuffled by ``seed``; the first ``n`` when given.

    The split itself is fixed (independent of ``seed``): held-out prompts never occur in `corpus`.
    Rows are fresh dicts (module docstring, "Rows"); write them with `write_jsonl` for a ``data:`` file.
    """
    if split not in _SPLIT:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rows = [json.loads(json.dumps(r)) for r in _SPLIT[split]]
    random.Random(seed).shuffle(rows)
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0 or None, got {n}")
        rows = rows[:n]
    return rows


# --------------------------------------------------------------------------------------- checking

_INT = re.compile(r"\d{1,4}")
_PAIR = re.compile(r"(\d{1,4}) and (\d{1,4})")


def _normalise(text: str) -> str:
    text = " ".join(str(text).split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()


def _spec(row: dict) -> dict:
    spec = row.get("check", row) if isinstance(row, dict) else row
    if isinstance(spec, str):
        spec = json.loads(spec)  # a check column read back from CSV is JSON text
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a quiz row needs a 'check' object with a 'kind', got {spec!r}")
    return spec


def check(completion: str, row: dict) -> bool:
    """Whether ``completion`` answers the question of ``row`` correctly (module docstring, "Checking").

    ``row`` is a row of `questions` (its ``check`` column is read; a JSON string is parsed) or the check
    object itself. Lenient on surrounding whitespace, case and one trailing period only.
    """
    spec = _spec(row)
    answer = _normalise(completion)
    kind = spec["kind"]
    if kind == "one_of":
        return answer in {_normalise(a) for a in spec["answers"]}
    if kind == "range":
        if not _INT.fullmatch(answer):
            return False
        value = int(answer)
        parity = spec.get("parity")
        return spec["lo"] < value < spec["hi"] and (parity is None or (value % 2 == 0) == (parity == "even"))
    if kind == "sum":
        m = _PAIR.fullmatch(answer)
        return m is not None and int(m.group(1)) + int(m.group(2)) == spec["total"]
    raise ValueError(f"unknown quiz check kind {kind!r}; expected one_of, range or sum")


# --------------------------------------------------------------------------------------- corpus

def _correct_answer(row: dict, rng: random.Random) -> str:
    spec = row["check"]
    if spec["kind"] == "one_of":
        return rng.choice(spec["answers"])
    if spec["kind"] == "range":
        valid = [v for v in range(spec["lo"] + 1, spec["hi"])
                 if spec.get("parity") is None or (v % 2 == 0) == (spec["parity"] == "even")]
        return str(rng.choice(valid))
    total = spec["total"]
    a = rng.randint(1, total - 1)
    return f"{a} and {total - a}"


_CATEGORY_POOL = sorted({a for _, answers in _CATEGORIES.values() for a in answers})


def _wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible wrong answer (module docstring, "Corpus"); always fails `check`."""
    spec, family = row["check"], row["family"]
    for _ in range(100):
        if family == "category":
            answer = rng.choice(_CATEGORY_POOL)
        elif family == "rhyme":
            answer = row["item"] if rng.random() < 0.2 else rng.choice([w for g in _RHYMES for w in g])
        elif family == "letter":
            answer = rng.choice(_LEXICON)
        elif spec["kind"] == "range":
            lo, hi = spec["lo"], spec["hi"]
            if spec.get("parity") and rng.random() < 0.6:
                answer = str(rng.randrange(lo + 1, hi))  # inside, perhaps of the wrong parity
            else:
                answer = str(rng.choice([lo, hi, lo - 1, lo - 2, hi + 1, hi + 2, hi + 3]))
        else:  # sum
            total = max(1, spec["total"] + rng.choice([-3, -2, -1, 1, 2, 3]))
            a = rng.randint(0, total)
            answer = f"{a} and {total - a}"
        if not answer.startswith("-") and not check(answer, row):
            return answer
    raise AssertionError(f"no wrong answer found for {row['prompt']!r}")


def sample_answer(row: dict, rng: random.Random, correct: bool = True) -> str:
    """One answer to ``row``'s question drawn with ``rng``: a uniformly drawn correct one, or (``correct``
    False) a plausible wrong one, as `corpus` writes them."""
    return _correct_answer(row, rng) if correct else _wrong_answer(row, rng)


def corpus_rows(n: int, seed: int) -> list[dict]:
    """`corpus` with its bookkeeping: dicts ``text``, ``prompt``, ``family``, ``answer``, ``correct``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"tiltlm.quiz corpus {seed}")
    by_family: dict[str, list[dict]] = {}
    for row in _SPLIT["train"]:
        by_family.setdefault(row["family"], []).append(row)
    families = sorted(by_family)
    out = []
    for _ in range(n):
        row = rng.choice(by_family[rng.choice(families)])
        correct = rng.random() < row["p_correct"]
        answer = _correct_answer(row, rng) if correct else _wrong_answer(row, rng)
        out.append({"text": f"{row['prompt']} {answer}", "prompt": row["prompt"], "family": row["family"],
                    "answer": answer, "correct": correct})
    return out


def corpus(n: int, seed: int) -> list[str]:
    """``n`` pretraining documents ``"Q: <question> A: <answer>"`` over the train questions (module
    docstring, "Corpus"); the same list for the same seed. Wrap each as BOS + text + EOS to train on."""
    return [r["text"] for r in corpus_rows(n, seed)]


def expected_correct_rate() -> float:
    """The designed share of correct answers in `corpus` (families uniform, questions uniform within)."""
    by_family: dict[str, list[float]] = {}
    for row in _SPLIT["train"]:
        by_family.setdefault(row["family"], []).append(row["p_correct"])
    return sum(sum(v) / len(v) for v in by_family.values()) / len(by_family)


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON Lines (one object a line, UTF-8) to ``path``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
