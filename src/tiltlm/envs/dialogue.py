"""Twenty questions with a simulated human: the policy asks about, then guesses, a secret animal.

The secret is one of the animals of the default LM's story grammar (tiltlm.pretrain.corpus), so
the embedded story LM names candidate animals on its own and pi0 succeeds now and then — a base
rate a short training run can improve on. Each policy utterance is read as follows:

* it names an animal of the table (whole words; plurals and pet names count: "cats", "kitten" ->
  cat; "catch" does not) -> a guess, judged by its first such word: right -> reward 1, done,
  info success True; wrong -> "No, it is not a <x>." and the game goes on;
* otherwise a question: the simulated human finds the first attribute word of the table in it
  ("fur", "fly", "farm", "little", ...) and answers "Yes." or "No." from the knowledge table,
  "I don't know." when it finds none. With ``noise`` p it flips a yes/no with probability p.

The opening ends with the start of a story ("... Once upon a time, there was a") because pi0 is
the story LM: its first words then name a character, often an animal, instead of continuing some
other story. Measured on the embedded default LM (17 secrets, max_turns 4, 16 tokens per action,
408 episodes): pi0 wins about 10% of games, against about 4% with a plain "Ask me questions or guess."
Answers start with a space so they read as words of their own after the policy's text.

The answer is a pure function of (secret, question, episode seed): the flip is a hash of the three,
not a draw from a stream, so it does not depend on the order questions are asked in.

``human_answers`` points at chats recorded by ``tiltlm chat`` (one JSON object per line with
``secret`` and ``turns`` [{question, reply}]): a question a person already answered for that secret
(same words after ``normalise_question``) gets that person's reply instead of the table's, so
recorded human play refines the simulator. Recorded replies are real data: ``noise`` never flips them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from tiltlm.envs.base import Env, StepResult, register_env
from tiltlm.errors import TiltlmError

OPENING = "I am thinking of an animal. Guess it! Once upon a time, there was a"
YES, NO, UNKNOWN = "Yes.", "No.", "I don't know."
RETRY = " Guess again! Once upon a time, there was a"  # re-opens a story so the story LM names an animal again

# ---- the knowledge table ---------------------------------------------------------------------
# things: the story grammar's animals (its "puppy"/"kitten" are pet names of dog/cat; wolf and snake
# are its beasts). Each entry: the words that name it (singular and plural) -> the thing.
_NAMES: dict[str, tuple[str, ...]] = {
    "dog": ("dog", "dogs", "puppy", "puppies", "doggy", "doggie"),
    "cat": ("cat", "cats", "kitten", "kittens", "kitty", "kitties"),
    "rabbit": ("rabbit", "rabbits", "bunny", "bunnies"),
    "bear": ("bear", "bears"),
    "fox": ("fox", "foxes"),
    "mouse": ("mouse", "mice"),
    "bird": ("bird", "birds"),
    "duck": ("duck", "ducks", "duckling", "ducklings"),
    "frog": ("frog", "frogs"),
    "owl": ("owl", "owls"),
    "pig": ("pig", "pigs", "piglet", "piglets"),
    "horse": ("horse", "horses", "pony", "ponies"),
    "lion": ("lion", "lions"),
    "turtle": ("turtle", "turtles"),
    "squirrel": ("squirrel", "squirrels"),
    "wolf": ("wolf", "wolves"),
    "snake": ("snake", "snakes"),
}
THINGS: tuple[str, ...] = tuple(_NAMES)

_MAMMALS = ("dog", "cat", "rabbit", "bear", "fox", "mouse", "pig", "horse", "lion", "squirrel", "wolf")
_FURRY = ("dog", "cat", "rabbit", "bear", "fox", "mouse", "horse", "lion", "squirrel", "wolf")
_BIRDS = ("bird", "duck", "owl")
_WATER = ("duck", "frog", "turtle")

# attribute -> (the words that ask about it, the things that have it). Words are the story LM's
# own vocabulary, so its utterances hit them; an attribute no thing has (e.g. "purple") is a "No.".
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "animal": (("animal", "animals", "creature", "creatures", "alive"), THINGS),
    "fur": (("fur", "furry", "fluffy", "hair", "hairy", "soft"), _FURRY),
    "feathers": (("feather", "feathers", "feathered"), _BIRDS),
    "wings": (("wing", "wings"), _BIRDS),
    "beak": (("beak", "beaks", "bill"), _BIRDS),
    "fly": (("fly", "flies", "flying", "flew", "sky"), _BIRDS),
    "swim": (("swim", "swims", "swimming", "swam"), _WATER + ("snake",)),
    "water": (("water", "wet", "river", "lake", "pond", "sea", "beach"), _WATER),
    "big": (("big", "large", "huge", "giant", "tall"), ("bear", "horse", "lion", "wolf", "pig")),
    "small": (("small", "little", "tiny"), ("mouse", "bird", "frog", "rabbit", "squirrel", "duck", "owl", "turtle", "cat")),
    "tail": (("tail", "tails"), ("dog", "cat", "rabbit", "fox", "mouse", "pig", "horse", "lion", "squirrel", "wolf")),
    "ears": (("ear", "ears"), _MAMMALS),
    "whiskers": (("whisker", "whiskers"), ("cat", "mouse", "rabbit", "lion")),
    "paws": (("paw", "paws", "claws"), ("dog", "cat", "rabbit", "bear", "fox", "mouse", "lion", "squirrel", "wolf")),
    "legs": (("leg", "legs", "feet", "foot", "walk", "walks"), tuple(t for t in THINGS if t != "snake")),
    "four legs": (("four",), _MAMMALS + ("frog", "turtle")),
    "shell": (("shell", "shells"), ("turtle",)),
    "mane": (("mane", "manes"), ("horse", "lion")),
    "eggs": (("egg", "eggs"), _BIRDS + ("frog", "turtle", "snake")),
    "farm": (("farm", "farms", "barn", "farmer"), ("dog", "cat", "pig", "horse", "duck", "mouse")),
    "forest": (("forest", "forests", "woods", "wood", "cave", "wild"), ("bear", "fox", "owl", "wolf", "squirrel", "rabbit", "snake")),
    "tree": (("tree", "trees", "climb", "climbs", "nest"), ("squirrel", "owl", "bird", "cat")),
    "pet": (("pet", "pets", "house", "home", "bed"), ("dog", "cat", "rabbit", "mouse", "bird", "turtle")),
    "zoo": (("zoo",), ("lion", "bear", "snake", "wolf")),
    "hop": (("hop", "hops", "jump", "jumps", "jumping"), ("rabbit", "frog")),
    "fast": (("fast", "quick", "run", "runs", "race"), ("dog", "fox", "horse", "lion", "rabbit", "wolf", "squirrel")),
    "slow": (("slow", "slowly"), ("turtle",)),
    "night": (("night", "dark"), ("owl", "fox", "wolf", "mouse")),
    "loud": (("loud", "noise", "bark", "roar", "growl", "howl"), ("dog", "lion", "wolf", "bear")),
    "sing": (("sing", "sings", "song", "songs"), ("bird",)),
    "scary": (("scary", "scared", "afraid", "dangerous", "bite"), ("bear", "wolf", "lion", "snake")),
    "carrots": (("carrot", "carrots"), ("rabbit", "horse")),
    "cheese": (("cheese",), ("mouse",)),
    "honey": (("honey",), ("bear",)),
    "nuts": (("nut", "nuts"), ("squirrel",)),
    "brown": (("brown",), ("dog", "bear", "horse", "squirrel", "rabbit", "owl", "mouse")),
    "gray": (("gray", "grey"), ("mouse", "wolf", "owl")),
    "red": (("red",), ("fox",)),
    "orange": (("orange",), ("fox",)),
    "green": (("green",), ("frog", "turtle", "snake")),
    "pink": (("pink",), ("pig",)),
    "white": (("white",), ("duck",)),
    "yellow": (("yellow", "golden", "gold"), ("duck", "lion")),
    "blue": (("blue",), ("bird",)),
    "black": (("black",), ()),
    "purple": (("purple",), ()),
}

_NAME_OF: dict[str, str] = {word: thing for thing, words in _NAMES.items() for word in words}
_ATTRIBUTE_OF: dict[str, str] = {word: attr for attr, (words, _) in ATTRIBUTES.items() for word in words}
_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def find_guess(text: str) -> str | None:
    """The thing an utterance names (its first whole word that names one), else None: a question."""
    return next((_NAME_OF[w] for w in _words(text) if w in _NAME_OF), None)


def find_attribute(text: str) -> str | None:
    """The first attribute a question asks about (whole words), else None."""
    return next((_ATTRIBUTE_OF[w] for w in _words(text) if w in _ATTRIBUTE_OF), None)


def has(thing: str, attribute: str) -> bool:
    return thing in ATTRIBUTES[attribute][1]


def normalise_question(text: str) -> str:
    """The key a question is matched by: lower case words, punctuation and spacing dropped."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def canonical_reply(reply: str) -> str:
    """A person's reply as the simulator says it: yes/no variants -> "Yes."/"No.", else the text."""
    words = normalise_question(reply).split()
    if words and words[0] in ("yes", "y", "yeah", "yep", "yup", "correct", "right"):
        return YES
    if words and words[0] in ("no", "n", "nope", "nah", "wrong"):
        return NO
    return reply.strip()


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _unit(*parts) -> float:
    """A uniform number in [0, 1) that is a pure function of ``parts`` (seeded noise without a stream)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def table_answer(secret: str, question: str, *, seed: int = 0, noise: float = 0.0) -> str:
    """The simulated human's answer from the knowledge table; a yes/no flips with probability ``noise``."""
    attribute = find_attribute(question)
    if attribute is None:
        return UNKNOWN
    yes = has(secret, attribute)
    if noise > 0 and _unit("dialogue-noise", seed, secret, normalise_question(question)) < noise:
        yes = not yes
    return YES if yes else NO


# ---- recorded human play ---------------------------------------------------------------------
def load_human_answers(path: str | Path) -> dict[tuple[str, str], str]:
    """{(secret, normalised question): reply} from a ``tiltlm chat`` JSONL file (a later line wins)."""
    path = Path(path)
    if not path.is_file():
        raise TiltlmError(f"human_answers file '{path}' not found; record one with `tiltlm chat --out {path}` or pass an existing JSONL file")
    answers: dict[tuple[str, str], str] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                secret = canonical_thing(str(record["secret"]))
                turns = [(str(t["question"]), str(t["reply"])) for t in record["turns"]]
            except json.JSONDecodeError as e:
                raise TiltlmError(f"human_answers file '{path}' line {n} is not valid JSON ({e.msg}); fix or delete that line") from None
            except (KeyError, TypeError) as e:
                raise TiltlmError(f"human_answers file '{path}' line {n} lacks secret/turns[question, reply] ({type(e).__name__}: {e}); "
                                  "fix or delete that line (tiltlm chat writes the expected format)") from None
            for question, reply in turns:
                if reply.strip():
                    answers[(secret, normalise_question(question))] = canonical_reply(reply)
    return answers


def canonical_thing(name: str) -> str:
    """'Kitten ' -> 'cat'; a name the table does not know stays as written (lower case)."""
    name = name.strip().lower()
    return _NAME_OF.get(name, name)


# ---- the environment -------------------------------------------------------------------------
class DialogueEpisode:
    """One game: its secret and the seed of the simulated human's noise (answers need no other state)."""

    def __init__(self, env: DialogueEnv, seed: int):
        self.env, self.seed = env, int(seed)
        self.secret: str | None = None

    def reset(self, task: str) -> str:
        if task not in _NAMES:
            raise TiltlmError(f"unknown secret '{task}' for the dialogue environment; its things: {', '.join(THINGS)}")
        self.secret = task
        return OPENING

    def answer(self, question: str) -> str:
        """The simulated human's answer to a question (a pure function of secret, question, seed)."""
        recorded = self.env.human_answers.get((self.secret, normalise_question(question)))
        if recorded is not None:
            return recorded
        return table_answer(self.secret, question, seed=self.seed, noise=self.env.noise)

    def step(self, action: str) -> StepResult:
        guess = find_guess(action)
        retry = RETRY if self.env.retry_cue else ""
        if guess == self.secret:
            return StepResult(f" Yes, it is {_article(guess)}!", 1.0, True, {"kind": "guess", "guess": guess, "success": True})
        if guess is not None:
            return StepResult(f" No, it is not {_article(guess)}.{retry}", 0.0, False, {"kind": "guess", "guess": guess, "success": False})
        return StepResult(" " + self.answer(action) + retry, 0.0, False,
                          {"kind": "question", "attribute": find_attribute(action), "success": False})


@register_env
class DialogueEnv(Env):
    """Twenty questions: the policy asks yes/no questions about a secret animal, then guesses it.

    Reward 1 for naming the secret (done), 0 otherwise; tasks are the secrets.
    """

    name = "dialogue"

    def __init__(self, *, max_turns: int = 4, noise: float = 0.0, things: list[str] | None = None,
                 human_answers: str | None = None, retry_cue: bool = False):
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise TiltlmError(f"dialogue max_turns must be an integer >= 1 (got {max_turns!r})")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            raise TiltlmError(f"dialogue noise must be a probability in [0, 1] (got {noise!r}); 0 = the table's answers exactly")
        if things is not None:
            if isinstance(things, str) or not things:
                raise TiltlmError(f"dialogue things must be a non-empty list of animals (got {things!r}); choose from: {', '.join(THINGS)}")
            for t in things:
                if t not in _NAMES:
                    close = difflib.get_close_matches(str(t), THINGS, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise TiltlmError(f"dialogue has no thing '{t}'; {hint}choose from: {', '.join(THINGS)}")
        self.max_turns = max_turns
        self.retry_cue = bool(retry_cue)  # end every reply with RETRY: the story LM then guesses on every turn
        self.noise = float(noise)
        self.things = list(dict.fromkeys(things)) if things is not None else list(THINGS)
        self.human_answers = load_human_answers(human_answers) if human_answers is not None else {}

    def tasks(self) -> list[str]:
        return list(self.things)

    def episode(self, seed: int) -> DialogueEpisode:
        return DialogueEpisode(self, seed)


# ---- a real person plays the other side (`tiltlm chat`) --------------------------------------
def play_chat(policy, *, secret: str, ask: Callable[[str], str], tell: Callable[[str], None], max_turns: int = 4,
              seed: int = 0, max_action_tokens: int = 16) -> dict:
    """One game with a person: the policy speaks, the person replies (``ask`` returns their text).

    The token history is built as in ``rollout`` (prompt, opening, then action / reply alternately),
    so a recorded game is what the policy would see in training. Stops early when the policy names
    the secret. Returns {secret, turns: [{question, reply}], guessed} (rating/success are asked by the caller).
    """
    secret = canonical_thing(secret)
    tokens = list(policy.encode_context("")) + list(policy.encode_text(OPENING))
    tell(f"(the model is told) {OPENING}")
    turns, guessed = [], False
    for turn in range(1, max_turns + 1):
        ids, _, mask = policy.generate([tokens], max_new_tokens=max_action_tokens, seeds=[seed * 131 + turn])
        row = ids[0][mask[0]].tolist()
        tokens += row
        text_ids = row[:-1] if row and row[-1] == policy.eos_id else row
        question = policy.decode([text_ids])[0].strip()
        guess = find_guess(question)
        tell(f"model: {question}" + (f"   (a guess: {guess})" if guess else ""))
        reply = ask("your reply").strip()
        turns.append({"question": question, "reply": reply})
        if guess is not None and guess == secret:
            guessed = True
            break
        tokens += list(policy.encode_text(" " + canonical_reply(reply))) if reply else []  # as the simulator would say it
    return {"secret": secret, "turns": turns, "guessed": guessed}


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one line with a single write, then flush and fsync: never half a line.

    A file left without a final newline (a crash elsewhere) gets one first, in the same write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        while line:  # a regular file takes it in one write; loop in case it does not
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
