"""The cells of a study, sweep or training run as the kit reads them back: one `Cell` per finished run (its final metrics
row, its training curve, its directory), grouped by `Config` (the seeds of one configuration).

Input (what `tiltlm sweep` writes; or the --out directory of `tiltlm train`, config.yaml + metrics.jsonl, read as
one cell named after the directory, its algorithm, beta and seed from config.yaml, its final row metrics.jsonl's last):
  DIR/results.jsonl               one object per finished cell: cell, algorithm, beta, seed, final {metric key: value}
  DIR/cells/<cell>/metrics.jsonl  the cell's training curve (keys of tiltlm/metrics/batch.py); none for inference baselines
A sweep still running (no results.jsonl yet) is read from its cells/<cell>/done.json. A half-written last line (a run
still writing) is ignored. The seeds of one configuration share algorithm, beta and the rest of the cell's name once
its "_"-separated algorithm, beta<b> and seed<s> parts are removed, so that "best-of-n_n4_seed0" and
"best-of-n_n16_seed0" stay apart and "kl-pg_beta1_seed0/1/2" are one configuration.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tiltlm.errors import TiltlmError

# (exact key, estimated key): the exact one is used wherever a cell has it.
REWARD, KL_PRIOR = ("reward/exact", "reward/mean"), ("kl/prior_exact", "kl/prior_seq")


KL_TARGET, KL_POLICY_TARGET = ("kl/target_exact", "kl/target_is"), ("kl/policy_target_exact", "kl/policy_target_is")


TV, ENTROPY = ("tv/target_exact", "tv/target_is"), ("entropy/exact", "entropy/seq")


class Config(NamedTuple):
    """What the seeds of one group share: algorithm, beta and the rest of the cell name ("n4" in "best-of-n_n4_seed0")."""

    algorithm: str
    beta: float | None
    variant: str = ""

    @property
    def label(self) -> str:
        """'β=1', 'n4', ... (without the algorithm)."""
        return " ".join(([] if self.beta is None else [f"β={self.beta:g}"]) + ([self.variant] if self.variant else []))

    @property
    def name(self) -> str:
        return self.algorithm + (f" ({self.variant})" if self.variant else "")


def config_of(row: dict) -> Config:
    """The configuration of a results entry; seeds of one configuration share it (see the module docstring)."""
    algorithm, beta, seed, name = str(row.get("algorithm", row["cell"])), num(row, "beta"), row.get("seed"), row["cell"]
    drop = {"", f"seed{seed}"} | (set() if beta is None else {f"beta{beta:g}", f"beta{beta}"})
    rest = name.removeprefix(algorithm)
    return Config(algorithm, beta, "_".join(t for t in rest.split("_") if t not in drop))


@dataclass
class Cell:
    name: str
    config: Config
    seed: int | None
    final: dict
    curve: list[dict] = field(default_factory=list)
    dir: Path | None = None  # the cell's run directory (its eval_per_prompt.jsonl), where it has one

    @property
    def algorithm(self) -> str:
        return self.config.algorithm

    @property
    def beta(self) -> float | None:
        return self.config.beta


def num(d: dict, key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def sortable(v) -> tuple:
    """Numbers before None-s and strings, numbers by value."""
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def natural(text: str) -> list:
    """Sort key putting 'n4' before 'n16'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def pick(d: dict, keys: tuple[str, ...]) -> tuple[str, float] | None:
    """The first of ``keys`` that ``d`` has (exact before estimated)."""
    return next(((k, num(d, k)) for k in keys if num(d, k) is not None), None)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    if not all(math.isfinite(v) for v in values):
        return (math.nan if any(math.isnan(v) for v in values) else sum(values)), None  # +-inf, or NaN when mixed
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def read_jsonl(path: Path, *, strict: bool) -> list[dict]:
    """Rows of a JSON-lines file; a half-written last line is dropped, other bad lines raise when ``strict``."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            if strict and i < len(lines):
                raise TiltlmError(f"'{path}' line {i} is not valid JSON; fix or delete that line and rerun tiltlm report") from None
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


ACCEPTED = ("a tiltlm sweep directory (results.jsonl, or cells/<cell>/done.json while it runs), "
            "lm/ or testbed/ of a tiltlm run, a tiltlm run directory (run.json), or the --out of tiltlm train "
            "(config.yaml and metrics.jsonl)")


def source_of(run_dir: Path) -> str:
    """The file the cells are read from, relative to ``run_dir``."""
    if (run_dir / "results.jsonl").is_file():
        return "results.jsonl"
    if (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file():
        return "metrics.jsonl"
    return "cells/*/done.json"


def is_run_index(run_dir: Path) -> bool:
    """A top-level `tiltlm run` directory: run.json and no cells of its own."""
    return (run_dir / "run.json").is_file() and not (run_dir / "results.jsonl").is_file() and not (run_dir / "cells").is_dir()


def _missing_message(run_dir: Path) -> str:
    """What ``run_dir`` lacks, what is accepted, and the nearest directories that would do."""
    has = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    parts = [p.name for p in sorted(run_dir.iterdir()) if p.is_dir() and ((p / "results.jsonl").is_file() or (p / "run.json").is_file()
                                                                        or (p / "metrics.jsonl").is_file())]
    hint = f"; its subdirectories {', '.join(parts)} are: pass one of those" if parts else ""
    if (run_dir / "cells").is_dir():
        hint += "; it has cells/ but no finished cell yet (no cells/<cell>/done.json): wait until one finishes"
    found = f" (it has {', '.join(has[:8])}{', …' if len(has) > 8 else ''})" if has else " (it is empty)"
    return (f"'{run_dir}' has no results.jsonl, no config.yaml + metrics.jsonl and no run.json{found}; tiltlm report "
            f"accepts {ACCEPTED}{hint}")


def load_cells(run_dir: Path) -> list[Cell]:
    """The finished cells of a sweep directory with their curves (a cell listed twice keeps its last entry); a
    `tiltlm train` directory is one cell; a sweep still running (no results.jsonl yet) is read from its done.json files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise TiltlmError(f"report directory '{run_dir}' {what}; pass {ACCEPTED}")
    path = run_dir / "results.jsonl"
    if not path.is_file():
        if (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file():
            return [_run_cell(run_dir)]
        done = sorted(run_dir.glob("cells/*/done.json"))
        if not done:
            raise TiltlmError(_missing_message(run_dir))
        rows = []
        for d in done:
            try:
                rows.append(json.loads(d.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TiltlmError(f"'{d}' is not valid JSON; delete it to rerun that cell with tiltlm sweep") from None
        return _cells_of(run_dir, rows, d.parent.parent)
    return _cells_of(run_dir, read_jsonl(path, strict=True), path)


def _cells_of(run_dir: Path, rows: list, path: Path) -> list[Cell]:
    cells: dict[str, Cell] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("cell"), str) or not isinstance(row.get("final", {}), dict):
            raise TiltlmError(f"'{path}' entry {i} lacks a 'cell' name or has a non-object 'final'; fix or delete that line")
        name = row["cell"]
        curve_path = run_dir / "cells" / name / "metrics.jsonl"
        curve = read_jsonl(curve_path, strict=False) if Path(name).name == name and curve_path.is_file() else []
        cells.pop(name, None)
        cell_dir = run_dir / "cells" / name if Path(name).name == name and (run_dir / "cells" / name).is_dir() else None
        cells[name] = Cell(name, config_of(row), row.get("seed"), row.get("final", {}), curve, cell_dir)
    if not cells:
        raise TiltlmError(f"'{path}' lists no finished cell; rerun tiltlm sweep (or wait until a cell finishes)")
    return list(cells.values())


def _run_cell(run_dir: Path) -> Cell:
    """A `tiltlm train` directory as one cell: its name, config.yaml's algorithm, beta and seed, metrics.jsonl's rows."""
    from tiltlm.io import load_yaml

    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise TiltlmError(f"'{run_dir}' has config.yaml but no metrics.jsonl: a training run before its first step; wait for it "
                          "(or pass a sweep directory)")
    if not config_path.is_file():
        raise TiltlmError(f"'{run_dir}' has metrics.jsonl but no config.yaml; pass the --out directory of tiltlm train as it was written")
    try:
        config = load_yaml(config_path, f"'{config_path}'")
    except TiltlmError as e:
        raise TiltlmError(f"{str(e).rsplit('; ', 1)[0]}; restore the config.yaml tiltlm train wrote") from None
    config = config if isinstance(config, dict) else {}
    rows = read_jsonl(metrics_path, strict=True)
    if not rows:
        raise TiltlmError(f"'{metrics_path}' has no rows yet; wait until the run logs its first step")
    algorithm = config.get("algorithm")
    algorithm = str(algorithm.get("name") if isinstance(algorithm, dict) else algorithm or run_dir.resolve().name)
    target = config.get("target") if isinstance(config.get("target"), dict) else {}
    beta = num(target, "beta") if target.get("reward") is not None else None
    return Cell(run_dir.resolve().name, Config(algorithm, beta), config.get("seed"), rows[-1], rows, run_dir)


def groups_of(cells: list[Cell]) -> dict[Config, list[Cell]]:
    """Cells by configuration: algorithms in order of first appearance, then by beta and the other fields."""
    order = {a: i for i, a in reversed(list(enumerate(c.algorithm for c in cells)))}
    out: dict = {}
    for c in sorted(cells, key=lambda c: (order[c.algorithm], sortable(c.beta), natural(c.config.variant), sortable(c.seed))):
        out.setdefault(c.config, []).append(c)
    return out


def load_optional(path: Path, notes: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path.name} could not be read ({e}); it was left out.")
        return None


def targets_of(exact) -> list[tuple[float | None, dict]]:
    """(beta, p*'s numbers) from exact.json: one object, {beta: object} or a list of objects with "beta"."""
    if isinstance(exact, dict) and any(isinstance(v, (int, float)) for v in exact.values()):
        return [(num(exact, "beta"), exact)]
    if isinstance(exact, dict):
        return [(_float(k) if num(v, "beta") is None else num(v, "beta"), v) for k, v in exact.items() if isinstance(v, dict)]
    return [(num(d, "beta"), d) for d in exact if isinstance(d, dict)] if isinstance(exact, list) else []
def add_samples(sweep_dir: Path, texts: dict) -> None:
    path = sweep_dir / "samples.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(texts)
    path.write_text(json.dumps(current, indent=1))
