"""Prompt datasets: the contexts x of p*(y|x) ∝ pi0(y|x)·exp(r(x,y)/beta), with the rows' other columns.

    data = load_prompts("math.jsonl", prompt_column="prompt")   # PromptData: prompts + columns
    train, held_out = data.split(eval_size=50, seed=0)          # seeded, deterministic
    batch = train.draw(8, seed=step_seed)                       # this step's prompts (dataset order)

Sources: a local JSON Lines (``.jsonl``, ``.ndjson``, ``.json``), CSV or Parquet file (Parquet needs pyarrow
or pandas), a directory written by Hugging Face ``datasets``' ``save_to_disk`` (needs datasets; never the
hub), or a reasoning-gym task generated offline (`reasoning_gym_prompts`, needs reasoning-gym).

A prompt is text, or a chat ``messages`` list ``[{role, content}, …]``; a policy continues one string, so a
messages prompt becomes the content of its last user turn (earlier turns and the system message are not
part of the context; a policy with a chat template wraps that string as one user turn).

Every other column of a row travels with the samples drawn after its prompt (``Samples.columns``) and
reaches the reward as a keyword list (tiltlm.rewards: ``f(prompts, completions, answer, **kwargs)``).
Bad data is one TiltlmError line: missing or empty file, missing column (the columns are listed), a
prompt that is not text (its row), a malformed JSON line (its line), an unknown format.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from tiltlm.errors import TiltlmError

FORMATS = ("auto", "jsonl", "csv", "parquet", "hf")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_RESERVED = ("prompts", "completions")  # the reward's own keywords (tiltlm.rewards.base)


class PromptData:
    """Prompts (each a context string) and the rows' other columns, name -> one value per prompt."""

    def __init__(self, prompts: list[str], columns: dict[str, list] | None = None, source: str = "prompts",
                 numbers: list[int] | None = None, numbered_as: str = "row"):
        self.prompts = list(prompts)
        self.columns = {k: list(v) for k, v in (columns or {}).items()}
        self.source = source
        self.numbers = list(numbers) if numbers is not None else list(range(1, len(self.prompts) + 1))  # rows in the source
        self.numbered_as = numbered_as  # what the numbers count in the source: "row", or "line" of a JSONL file
        for name, values in self.columns.items():
            if len(values) != len(self.prompts):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return f"PromptData({len(self)} prompts from {self.source}, columns {list(self.columns)})"

    def select(self, index: list[int]) -> "PromptData":
        """The rows ``index``, in that order."""
        return PromptData([self.prompts[i] for i in index], {k: [v[i] for i in index] for k, v in self.columns.items()}, self.source,
                          [self.numbers[i] for i in index], self.numbered_as)

    def row(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}

    def split(self, *, eval_size: int | None = None, eval_fraction: float | None = None, seed: int = 0) -> tuple["PromptData", "PromptData | None"]:
        """(train, held out): ``eval_size`` rows (or round(eval_fraction · N), at least 1) drawn by a permutation
        seeded ``seed``; both parts keep the dataset's order. No eval size: (self, None)."""
        parts = split_indices(len(self), eval_size, eval_fraction, seed, f"{self.source} has {len(self)} rows", "prompts", "rows")
        return (self, None) if parts is None else (self.select(parts[0]), self.select(parts[1]))


    def draw(self, k: int | None, seed: int) -> "PromptData":
        """``k`` distinct prompts drawn by a generator seeded ``seed`` (a training step's seed, so a resumed run
        draws the same ones), in the dataset's order; k None or >= len: every prompt."""
        if k is None or k >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(int(seed)))
        return self.select(sorted(perm[:k].tolist()))


# ---- reading files --------------------------------------------------------------------------------


def split_indices(n: int, eval_size: int | None, eval_fraction: float | None, seed: int, what: str, items: str,
                  more: str) -> tuple[list[int], list[int]] | None:
    """(train, held-out) indices of n items, each in order: ``eval_size`` (or round(eval_fraction · n), at least 1) held
    out by a permutation seeded ``seed`` (prompts and preference pairs split alike); None without an eval size."""
    if eval_size is None and eval_fraction is None:
        return None
    if eval_size is not None and eval_fraction is not None:
        raise TiltlmError("give data.eval_size or data.eval_fraction, not both")
    m = int(eval_size) if eval_size is not None else max(1, round(float(eval_fraction) * n))
    if not 1 <= m < n:
        raise TiltlmError(f"{what}: an eval split of {m} leaves no training {items} (or none held out); lower "
                          f"data.eval_size / data.eval_fraction or add {more}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[m:]), sorted(perm[:m])



def load_prompts(path: str | Path, *, prompt_column: str = "prompt", format: str = "auto", split: str | None = None) -> PromptData:
    """The prompts of a local file or ``save_to_disk`` directory (module docstring); one-line errors."""
    path = Path(path).expanduser()
    rows, where = read_rows(path, format=format, split=split)
    return prompt_data(rows, prompt_column, where, numbered_as=("line" if format_of(path, format) == "jsonl" else "row"))


def read_rows(path: Path, *, format: str = "auto", split: str | None = None) -> tuple[list[dict], str]:
    """(the rows as dicts, how to name the source in messages)."""
    where = f"data file '{path}'"
    if not path.exists():
        raise TiltlmError(f"{where} not found; give the path of a JSONL, CSV or Parquet file or a datasets.save_to_disk directory")
    kind = format_of(path, format)
    if kind == "hf":
        return _read_hf(path, split), f"dataset '{path}'"
    if path.is_dir():
        raise TiltlmError(f"'{path}' is a directory but not one written by datasets' save_to_disk (no dataset_info.json or "
                          "dataset_dict.json); give a JSONL, CSV or Parquet file")
    if kind == "jsonl":
        rows = _read_jsonl(path, where)
    elif kind == "csv":
        rows = _read_csv(path, where)
    else:
        rows = _read_parquet(path, where)
    if not rows:
        raise TiltlmError(f"{where} has no rows; add prompts to it (one row per prompt)")
    return rows, where


def format_of(path: Path, format: str) -> str:
    """The data format of ``path`` (jsonl, csv, parquet, hf, dir): ``format`` when given, else from its suffix or contents."""
    if format not in FORMATS:
        raise TiltlmError(f"unknown data format {format!r}; use one of: {', '.join(FORMATS)}")
    if format != "auto":
        return format
    if path.is_dir():
        return "hf" if any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")) else "dir"
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TiltlmError(f"unknown data format '{path.suffix or path.name}' of '{path}'; use a .jsonl, .csv or .parquet file, "
                          "a datasets.save_to_disk directory, or set data.format")
    return kind


def _read_jsonl(path: Path, where: str) -> list[dict]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise TiltlmError(f"{where} is not valid JSON (line {e.lineno}: {e.msg}); fix that line") from None
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise TiltlmError(f"{where} row {i} is a {type(row).__name__}, not a JSON object; write one object per row")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TiltlmError(f"{where} line {number} is not valid JSON ({e.msg}); fix that line (one JSON object per line)") from None
        if not isinstance(row, dict):
            raise TiltlmError(f"{where} line {number} is a {type(row).__name__}, not a JSON object; write one object per line")
        row["\0line"] = number
        rows.append(row)
    return rows


def _read_csv(path: Path, where: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [dict(row) for row in csv.DictReader(f)]


def _read_parquet(path: Path, where: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas
    except ImportError:
        raise TiltlmError(f"reading Parquet ({where}) needs the package pyarrow; pip install pyarrow (or convert it to JSONL)") from None
    try:
        return pandas.read_parquet(path).to_dict("records")
    except ImportError:
        raise TiltlmError(f"reading Parquet ({where}) needs the package pyarrow; pip install pyarrow (or convert it to JSONL)") from None


def _read_hf(path: Path, split: str | None) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise TiltlmError(f"'{path}' was written by Hugging Face datasets; reading it needs the package datasets: pip install datasets "
                          "(or export it to JSONL)") from None
    loaded = datasets.load_from_disk(str(path))  # local files only: never the hub
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        choice = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if choice not in names:
            raise TiltlmError(f"dataset '{path}' has the splits {', '.join(names)}; choose one with data.split")
        loaded = loaded[choice]
    rows = loaded.to_list()
    if not rows:
        raise TiltlmError(f"dataset '{path}' has no rows; add prompts to it (one row per prompt)")
    return rows


# ---- rows -> prompts ------------------------------------------------------------------------------


def prompt_data(rows: list[dict], prompt_column: str, where: str, *, numbered_as: str = "row") -> PromptData:
    """Check the rows and split them into prompts and the other columns (a messages prompt -> its last user turn)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(k for k in row if k != "\0line"))
    if prompt_column not in names:
        hint = " (a chat dataset: set data.prompt_column: messages)" if "messages" in names else ""
        raise TiltlmError(f"{where} has no column '{prompt_column}'; its columns: {', '.join(names) or '(none)'}; "
                          f"set data.prompt_column (--prompt-column) to the one holding the prompts{hint}")
    clash = [c for c in _RESERVED if c in names and c != prompt_column]
    if clash:
        raise TiltlmError(f"{where} has a column '{clash[0]}', a name the reward's own arguments use; rename that column")
    prompts, numbers = [], []
    for i, row in enumerate(rows, 1):
        number = row.get("\0line", i)
        prompts.append(prompt_text(row.get(prompt_column), f"{where} {numbered_as} {number}", prompt_column))
        numbers.append(number)
    others = [n for n in names if n != prompt_column]
    return PromptData(prompts, {n: [row.get(n) for row in rows] for n in others}, where, numbers, numbered_as)


def prompt_text(value: Any, where: str, column: str) -> str:
    """The prompt in a row's ``column``: the string itself, or the last user turn of a list of {role, content} messages;
    anything else is one line naming ``where`` (file and row) and the column."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        users = [m["content"] for m in value if m["role"] == "user"]
        if not users:
            raise TiltlmError(f"{where}: the messages in '{column}' have no user turn; a prompt needs one")
        if not isinstance(users[-1], str):
            raise TiltlmError(f"{where}: the last user turn's content is {type(users[-1]).__name__}, not text; make it a string")
        return users[-1]
    what = "missing" if value is None else f"{type(value).__name__}, not text"
    raise TiltlmError(f"{where}: the prompt in '{column}' is {what}; every prompt must be a string or a list of "
                      "{role, content} messages")


# ---- reasoning-gym -------------------------------------------------------------------------------


def reasoning_gym_prompts(task: str, *, size: int = 200, seed: int = 0, config: dict | None = None) -> PromptData:
    """``size`` procedurally generated problems of the reasoning-gym task ``task`` (offline): prompt = the
    question; columns ``answer`` and ``metadata`` (the ``reasoning_gym`` reward scores with the task's own
    ``score_answer``)."""
    try:
        import reasoning_gym
    except ImportError:
        raise TiltlmError("data.reasoning_gym needs the package reasoning-gym; pip install reasoning-gym") from None
    from tiltlm.registry import describe

    try:
        dataset = reasoning_gym.create_dataset(task, size=int(size), seed=int(seed), **(config or {}))
    except ValueError as e:
        if "not registered" in str(e):
            import difflib

            from reasoning_gym.factory import DATASETS

            close = difflib.get_close_matches(task, list(DATASETS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TiltlmError(f"unknown reasoning-gym task '{task}'{hint}; see reasoning_gym.factory.DATASETS for the "
                              f"{len(DATASETS)} tasks") from None
        raise TiltlmError(f"reasoning-gym task '{task}' rejected its config ({describe(e)}); fix data.reasoning_gym.config") from None
    except TypeError as e:
        raise TiltlmError(f"reasoning-gym task '{task}' rejected its config ({describe(e)}); fix data.reasoning_gym.config") from None
    entries = [dataset[i] for i in range(len(dataset))]
    return PromptData([e["question"] for e in entries], {"answer": [e["answer"] for e in entries],
                                                         "metadata": [e["metadata"] for e in entries]}, f"reasoning-gym task '{task}'")


# ---- the config's data: section -------------------------------------------------------------------


def load_data(data) -> tuple[PromptData, PromptData | None]:
    """(train prompts, held-out prompts or None) of a training config's ``data:`` section (DataConfig)."""
    if data.reasoning_gym is not None:
        g = data.reasoning_gym
        prompts = reasoning_gym_prompts(g.task, size=g.size, seed=g.seed, config=dict(g.config))
    else:
        prompts = load_prompts(data.path, prompt_column=data.prompt_column, format=data.format, split=data.split)
    if data.eval_path is not None:
        held = load_prompts(data.eval_path, prompt_column=data.prompt_column, format=data.format, split=data.split)
        if set(held.columns) != set(prompts.columns):
            raise TiltlmError(f"data.eval_path {held.source} has columns {sorted(held.columns)} but the training prompts have "
                              f"{sorted(prompts.columns)}; the verifier reads the same columns in both, so give both files the same columns")
        return prompts, held
    return prompts.split(eval_size=data.eval_size, eval_fraction=data.eval_fraction, seed=data.split_seed)
