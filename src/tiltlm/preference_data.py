"""Preference pairs (x, y_w, y_l): a prompt x, the chosen completion y_w ≻ the rejected y_l (TRL's formats).

    data = load_preferences("prefs.jsonl")            # PreferenceData: PreferencePair(prompt, chosen, rejected, row)
    train, held_out = data.split(eval_size=50, seed=0)  # seeded, deterministic (as tiltlm.data.PromptData.split)
    batch = train.draw(8, seed=step_seed)              # this step's pairs (dataset order)

Sources: the same as tiltlm.data (JSON Lines, CSV, Parquet, a ``datasets.save_to_disk`` directory), read by its
readers. The three preference formats of TRL:

- explicit prompt: columns ``prompt``, ``chosen``, ``rejected`` (text); ``chosen``/``rejected`` are the completions.
- implicit prompt: no ``prompt`` column; the prompt is the longest common prefix of ``chosen`` and ``rejected``
  (character by character; a space just before the first difference goes to the completions, as TRL's
  ``extract_prompt``), the rest of each is its completion.
- conversational: ``chosen``/``rejected`` are ``[{role, content}, …]`` lists; the completion is the final assistant
  turn's content; the prompt (a ``prompt`` column of text or messages, else the messages before that turn) is the
  last user turn's content, as tiltlm.data does for prompts.

An empty prompt means the prior's BOS context (``sampling.contexts: [""]``). Bad data is one TiltlmError line:
missing column (the columns are listed), chosen == rejected (the row), a chosen/rejected that is not text or
messages (the row), an empty file, a malformed line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from tiltlm.data import format_of, prompt_text, read_rows, split_indices
from tiltlm.errors import TiltlmError


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: ``chosen`` ≻ ``rejected`` after ``prompt``; ``row`` is its 1-based row (or JSONL line)."""

    prompt: str
    chosen: str
    rejected: str
    row: int


class PreferenceData:
    """Preference pairs from one source, in the source's order."""

    def __init__(self, pairs: list[PreferencePair], source: str = "preferences", numbered_as: str = "row"):
        self.pairs = list(pairs)
        self.source = source
        self.numbered_as = numbered_as  # what PreferencePair.row counts: "row", or "line" of a JSONL file

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __getitem__(self, i: int) -> PreferencePair:
        return self.pairs[i]

    def __repr__(self) -> str:
        return f"PreferenceData({len(self)} pairs from {self.source})"

    @property
    def prompts(self) -> list[str]:
        """The distinct prompts, in order of first appearance."""
        return list(dict.fromkeys(p.prompt for p in self.pairs))

    def select(self, index: list[int]) -> "PreferenceData":
        """The pairs ``index``, in that order."""
        return PreferenceData([self.pairs[i] for i in index], self.source, self.numbered_as)

    def split(self, eval_size: int | None = None, seed: int = 0, *, eval_fraction: float | None = None
              ) -> tuple["PreferenceData", "PreferenceData | None"]:
        """(train, held out): ``eval_size`` pairs (or round(eval_fraction · N), at least 1) drawn by a permutation seeded
        ``seed`` — the same permutation as tiltlm.data.PromptData.split; both parts keep the source's order."""
        parts = split_indices(len(self), eval_size, eval_fraction, seed, f"{self.source} has {len(self)} pairs", "pairs", "pairs")
        return (self, None) if parts is None else (self.select(parts[0]), self.select(parts[1]))

    def draw(self, k: int | None, seed: int) -> "PreferenceData":
        """``k`` distinct pairs drawn by a generator seeded ``seed`` (a step's seed), in the source's order; k None or
        >= len: every pair."""
        if k is None or k >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(int(seed)))
        return self.select(sorted(perm[:k].tolist()))


# ---- reading ----------------------------------------------------------------------------------------


def load_preferences(path: str | Path, *, prompt_column: str = "prompt", chosen_column: str = "chosen",
                     rejected_column: str = "rejected", format: str = "auto", split: str | None = None) -> PreferenceData:
    """The preference pairs of a local file or ``save_to_disk`` directory (module docstring); one-line errors.
    With no ``prompt_column`` in the data the prompt is implicit (shared prefix, or the messages before the reply)."""
    path = Path(path).expanduser()
    rows, where = _read(path, format, split, (prompt_column, chosen_column, rejected_column))
    return preference_data(rows, where, prompt_column=prompt_column, chosen_column=chosen_column,
                           rejected_column=rejected_column, numbered_as=_numbered_as(path, format))


def _read(path: Path, format: str, split: str | None, columns: tuple[str, str, str]) -> tuple[list[dict], str]:
    """tiltlm.data's readers, with an empty file's message about pairs."""
    try:
        return read_rows(path, format=format, split=split)
    except TiltlmError as e:
        if "has no rows" in str(e):  # the prompt reader's wording names prompts; here the rows are pairs
            raise TiltlmError(f"preference data '{path}' has no rows; add pairs to it (one row per pair: "
                              f"{', '.join(columns)})") from None
        raise


def _numbered_as(path: Path, format: str) -> str:
    return "line" if format_of(path, format) == "jsonl" else "row"


def columns_of(rows: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(k for k in row if k != "\0line"))
    return list(names)


def preference_data(rows: list[dict], where: str, *, prompt_column: str = "prompt", chosen_column: str = "chosen",
                    rejected_column: str = "rejected", numbered_as: str = "row") -> PreferenceData:
    """Check the rows and turn each into a PreferencePair."""
    names = columns_of(rows)
    for column, option in ((chosen_column, "chosen_column"), (rejected_column, "rejected_column")):
        if column not in names:
            raise TiltlmError(f"{where} has no column '{column}'; its columns: {', '.join(names) or '(none)'}; preference data "
                              f"needs prompt/chosen/rejected columns (set data.{option} to the one holding them)")
    implicit = prompt_column not in names
    if implicit and prompt_column != "prompt":
        raise TiltlmError(f"{where} has no column '{prompt_column}'; its columns: {', '.join(names)}; set data.prompt_column "
                          "to the one holding the prompts (or drop it: no prompt column means the prompt is implicit)")
    pairs = []
    for i, row in enumerate(rows, 1):
        number = row.get("\0line", i)
        at = f"{where} {numbered_as} {number}"
        prompt, chosen, rejected = _pair(row, at, None if implicit else prompt_column, chosen_column, rejected_column)
        if chosen == rejected:
            raise TiltlmError(f"{at}: chosen and rejected are the same completion ({_short(chosen)}); a pair must "
                              "compare two different completions: fix or drop that row")
        pairs.append(PreferencePair(prompt, chosen, rejected, number))
    return PreferenceData(pairs, where, numbered_as)


def _pair(row: dict, at: str, prompt_column: str | None, chosen_column: str, rejected_column: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of one row."""
    chosen, rejected = row.get(chosen_column), row.get(rejected_column)
    kinds = {_kind(chosen, at, chosen_column), _kind(rejected, at, rejected_column)}
    if kinds == {"text", "messages"}:
        raise TiltlmError(f"{at}: one of '{chosen_column}'/'{rejected_column}' is text and the other messages; give both "
                          "the same format")
    if kinds == {"messages"}:
        y_w, y_l = _reply(chosen, at, chosen_column), _reply(rejected, at, rejected_column)
        if prompt_column is not None:
            return prompt_text(row.get(prompt_column), at, prompt_column), y_w, y_l
        x_w, x_l = _turns_prompt(chosen, at, chosen_column), _turns_prompt(rejected, at, rejected_column)
        if x_w != x_l:
            raise TiltlmError(f"{at}: the last user turns of '{chosen_column}' and '{rejected_column}' differ; both must "
                              "answer the same prompt (or give a prompt column)")
        return x_w, y_w, y_l
    if prompt_column is not None:
        return prompt_text(row.get(prompt_column), at, prompt_column), chosen, rejected
    return implicit_prompt(chosen, rejected)


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen rest, rejected rest) with prompt = the longest common prefix; a space just before the first
    difference stays with the completions (TRL's extract_prompt)."""
    idx = 0
    n = min(len(chosen), len(rejected))
    while idx < n and chosen[idx] == rejected[idx]:
        idx += 1
    if 0 < idx < n and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _kind(value: Any, at: str, column: str) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return "messages"
    what = "missing" if value is None else f"{type(value).__name__}, not text"
    raise TiltlmError(f"{at}: '{column}' is {what}; chosen and rejected must be strings or lists of {{role, content}} messages")


def _reply(messages: list[dict], at: str, column: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise TiltlmError(f"{at}: the messages in '{column}' end with a {messages[-1]['role']!r} turn; the completion is the "
                          "final assistant turn, so end them with one")
    content = messages[-1]["content"]
    if not isinstance(content, str):
        raise TiltlmError(f"{at}: the final assistant turn of '{column}' is {type(content).__name__}, not text; make it a string")
    return content


def _turns_prompt(messages: list[dict], at: str, column: str) -> str:
    users = [m for m in messages[:-1] if m["role"] == "user"]
    if not users:
        return ""  # a reply with no user turn before it: the prior's BOS context
    return prompt_text(users, at, column)


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


# ---- detection --------------------------------------------------------------------------------------


def is_preference_file(path: str | Path, *, chosen_column: str = "chosen", rejected_column: str = "rejected",
                       format: str = "auto", split: str | None = None) -> bool:
    """Whether the rows of ``path`` have both a chosen and a rejected column (a file that cannot be read: False, its
    error is the prompt reader's to give)."""
    try:
        rows, _ = read_rows(Path(path).expanduser(), format=format, split=split)
    except TiltlmError:
        return False
    names = columns_of(rows)
    return chosen_column in names and rejected_column in names


def require_preferences(path: str | Path, *, algorithm: str, prompt_column: str = "prompt", chosen_column: str = "chosen",
                        rejected_column: str = "rejected", format: str = "auto", split: str | None = None) -> PreferenceData:
    """The pairs of ``path`` for an offline preference algorithm; prompt-only data is one line naming what is missing."""
    path = Path(path).expanduser()
    rows, where = _read(path, format, split, (prompt_column, chosen_column, rejected_column))
    names = columns_of(rows)
    missing = [c for c in (chosen_column, rejected_column) if c not in names]
    if missing:
        raise TiltlmError(f"algorithm {algorithm} trains on preference pairs but {where} has no column "
                          f"{' or '.join(repr(c) for c in missing)} (its columns: {', '.join(names)}); give data with "
                          "prompt/chosen/rejected columns (set data.chosen_column / data.rejected_column), or use online-dpo "
                          "to draw pairs from the policy")
    return preference_data(rows, where, prompt_column=prompt_column, chosen_column=chosen_column, rejected_column=rejected_column,
                           numbered_as=_numbered_as(path, format))
