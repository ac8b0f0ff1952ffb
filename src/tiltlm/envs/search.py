"""``search``: answer a question by querying a full-text search engine, then answering from the hits.

One episode, ``searches + 1`` policy actions (default 2):

    [env]    Question: What does Lily the cat have?\\nSearch:
    [policy]  Lily cat have                                   <- action 1: a free-text query
    [env]    \\nResults:\\n1. Lily the cat has a red kite. ...\\n2. ...\\n3. ...\\nAnswer: Lily the cat has a red
    [policy]  kite                                            <- action 2: the answer (after the question's cue)

The query is turned into a safe FTS5 expression (words only, each quoted, OR-ed: FTS syntax in the
policy's text is just text) and run against an in-memory SQLite FTS5 index ranked by BM25; the top
``top_k`` documents are the observation. A query with no words, or no match, gets "No results." —
never an exception. The answer earns reward 1.0 if it matches the gold answer, else 0.0, and the
last step's info carries ``success`` (and ``retrieved``: whether the gold document was ever shown).

Matching (``reward=``) works on normalised words (lower case, punctuation and a/an/the dropped):
``"contains"`` — the gold words occur contiguously in the answer ("a red kite." matches "kite");
``"exact"`` — the answer's words are exactly the gold words.

Collection format (JSONL, one object per line). documents: ``{"id", "text"[, "title"]}``;
questions: ``{"id", "question", "answer"[, "aliases": [...], "doc": gold document id, "cue"]}``.
A question's ``cue`` starts the answer sentence without giving the answer away ("Answer: Lily the
cat likes to eat"): a base LM then names a word of the right kind (``cues=False`` drops it). The
shipped collection (``assets/search/``, made by ``make_search_collection.py``) is built from the
story grammar's vocabulary, so the default prior knows every word of it.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path

from tiltlm.envs.base import Env, StepResult, register_env
from tiltlm.errors import TiltlmError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "search"
_WORD = re.compile(r"\w+", re.UNICODE)
_ARTICLES = {"a", "an", "the"}
REWARD_MODES = ("contains", "exact")


def fts_query(text: str, max_terms: int = 32) -> str:
    """Free text -> an FTS5 query that cannot be a syntax error: distinct words, quoted, OR-ed.

    Only ``\\w`` runs survive, so quotes, ``*``, ``^``, ``:``, parentheses and ``-`` are gone, and
    quoting turns AND/OR/NOT/NEAR into plain words. '' when the text has no words.
    """
    terms = list(dict.fromkeys(w.lower()[:64] for w in _WORD.findall(text or "")))[:max_terms]
    return " OR ".join(f'"{t}"' for t in terms)


def answer_words(text: str) -> list[str]:
    """Normalised words of an answer: lower case, no punctuation, no articles."""
    return [w for w in _WORD.findall((text or "").lower()) if w not in _ARTICLES]


def answer_matches(answer: str, gold: str, mode: str = "contains") -> bool:
    """Whether ``answer`` matches ``gold`` under ``mode`` ("contains" or "exact"), on normalised words."""
    got, want = answer_words(answer), answer_words(gold)
    if not want:
        return False
    if mode == "exact":
        return got == want
    return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))


def _read_jsonl(path: Path, what: str, required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file, each an object with string fields ``required``; TiltlmError naming the fix."""
    if not path.is_file():
        raise TiltlmError(f"search {what} file '{path}' not found; pass an existing JSONL file (one JSON object per line)")
    rows, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TiltlmError(f"search {what} file '{path}' is not UTF-8 ({e.reason}); save it as UTF-8 JSONL") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TiltlmError(f"line {n} of search {what} file '{path}' is not valid JSON ({e.msg}); write one JSON object per line") from e
        if not isinstance(row, dict):
            raise TiltlmError(f"line {n} of search {what} file '{path}' is a {type(row).__name__}, not an object; write one JSON object per line")
        for key in required:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise TiltlmError(f"line {n} of search {what} file '{path}' has no text field '{key}'; each line needs {', '.join(required)}")
        if row["id"] in seen:
            raise TiltlmError(f"line {n} of search {what} file '{path}' repeats id '{row['id']}'; give every line a distinct id")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise TiltlmError(f"search {what} file '{path}' is empty; add at least one JSON object line")
    return rows


@register_env
class SearchEnv(Env):
    """Question answering with a BM25 search engine (SQLite FTS5) the policy queries in free text.

    The index is built once per Env, in memory, and shared by all episodes (one connection behind a
    lock: env calls may run in worker threads); per-episode state lives in the episode.
    """

    name = "search"

    def __init__(
        self,
        *,
        top_k: int = 3,
        searches: int = 1,
        collection: str | None = None,
        questions: str | None = None,
        reward: str = "contains",
        max_doc_chars: int = 300,
        cues: bool = True,
    ):
        """top_k: documents per search. searches: query turns before the answer (max_turns = searches + 1).
        collection / questions: JSONL paths (None = the shipped ones; a user collection needs its own
        questions to play episodes). reward: "contains" or "exact". max_doc_chars: cap per shown document.
        cues: end the last observation with the question's ``cue`` (its answer sentence's start), if it has one."""
        if reward not in REWARD_MODES:
            raise TiltlmError(f"search reward '{reward}' is unknown; use one of {', '.join(REWARD_MODES)}")
        if int(top_k) < 1 or int(searches) < 1 or int(max_doc_chars) < 1:
            raise TiltlmError(f"search needs top_k, searches and max_doc_chars >= 1 (got {top_k}, {searches}, {max_doc_chars}); raise them")
        self.top_k, self.searches, self.reward, self.max_doc_chars = int(top_k), int(searches), reward, int(max_doc_chars)
        self.max_turns, self.cues = self.searches + 1, bool(cues)
        docs = _read_jsonl(Path(collection) if collection else ASSET_DIR / "documents.jsonl", "collection", ("id", "text"))
        if questions is None and collection is None:
            questions = str(ASSET_DIR / "questions.jsonl")
        self.questions = {q["id"]: q for q in _read_jsonl(Path(questions), "questions", ("id", "question", "answer"))} if questions else {}
        self.documents = {d["id"]: d for d in docs}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            self._db.execute("CREATE VIRTUAL TABLE docs USING fts5(doc_id UNINDEXED, title, text)")
        except sqlite3.OperationalError as e:
            raise TiltlmError(f"this Python's sqlite3 has no FTS5 ({e}); use a Python built with SQLite FTS5 (the official builds are)") from e
        self._db.executemany("INSERT INTO docs (doc_id, title, text) VALUES (?, ?, ?)",
                             [(d["id"], str(d.get("title") or ""), d["text"]) for d in docs])
        self._db.commit()

    def search(self, text: str, k: int | None = None) -> list[dict]:
        """The top ``k`` (default top_k) documents for free ``text``, best BM25 first; [] for no words or no match."""
        query = fts_query(text)
        if not query:
            return []
        with self._lock:
            if self._db is None:
                raise TiltlmError("the search environment is closed; search before calling close()")
            rows = self._db.execute("SELECT doc_id FROM docs WHERE docs MATCH ? ORDER BY bm25(docs), rowid LIMIT ?",
                                    (query, k or self.top_k)).fetchall()
        return [self.documents[doc_id] for (doc_id,) in rows]

    def tasks(self) -> list[str]:
        if not self.questions:
            raise TiltlmError("this search collection has no questions; pass questions= a JSONL file of {id, question, answer}")
        return list(self.questions)

    def episode(self, seed: int) -> SearchEpisode:
        return SearchEpisode(self)  # deterministic: the seed has no noise to draw

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class SearchEpisode:
    """One question: ``searches`` query turns, then the answer turn."""

    def __init__(self, env: SearchEnv):
        self.env = env
        self.question: dict | None = None
        self.turn = 0
        self.shown: set[str] = set()  # ids of every document shown so far

    def reset(self, task: str) -> str:
        if task not in self.env.questions:
            raise TiltlmError(f"unknown search question id '{task}'; use one of env.tasks()")
        self.question, self.turn, self.shown = self.env.questions[task], 0, set()
        return f"Question: {self.question['question']}\nSearch:"

    def step(self, action: str) -> StepResult:
        if self.question is None or self.turn > self.env.searches:
            raise RuntimeError("step on a search episode that is not running; call reset(task) first")
        self.turn += 1
        if self.turn <= self.env.searches:  # a query
            hits = self.env.search(action)
            self.shown.update(d["id"] for d in hits)
            cap = self.env.max_doc_chars
            listing = "\n".join(f"{i}. {d['text'][:cap]}" for i, d in enumerate(hits, 1)) if hits else "No results."
            cue = "Search:"
            if self.turn == self.env.searches:
                hint = self.question.get("cue") if self.env.cues else None
                cue = f"Answer: {hint}" if isinstance(hint, str) and hint.strip() else "Answer:"
            return StepResult(f"\nResults:\n{listing}\n{cue}", 0.0, False,
                              {"query": fts_query(action), "hits": [d["id"] for d in hits]})
        golds = [self.question["answer"], *[a for a in self.question.get("aliases", ()) if isinstance(a, str)]]
        success = any(answer_matches(action, g, self.env.reward) for g in golds)
        info = {"success": success, "gold": self.question["answer"]}
        if "doc" in self.question:
            info["retrieved"] = self.question["doc"] in self.shown
        return StepResult("", 1.0 if success else 0.0, True, info)
