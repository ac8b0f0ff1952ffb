"""The per-question numbers of a study's held-out evaluations, and the differences a verdict states.

Every training run with an ``eval:`` section writes eval_per_prompt.jsonl (tiltlm.evaluate.Evaluator): one line per
evaluation, each held-out question's pass@k for every k, distinct correct answers, mean reward, KL(pi‖pi0) and, on an
enumerable space, their exact values (``…_exact``). `evaluations` reads pi0 (the step-0 evaluations) and each
configuration's final policies (the last evaluation of each seed) from a study's cells; `compare` turns a method and pi0
into the differences method − pi0 with their bootstrap intervals (tiltlm.experiments.intervals).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiltlm.experiments.intervals import Interval, band, difference

PASS = re.compile(r"^pass@(\d+)(_exact)?$")
COMPARED = ("distinct_correct", "reward", "kl_prior")  # besides pass@k, in this order


@dataclass
class Evaluations:
    """One policy's held-out numbers: ``values[key]`` is (S, Q), one row per seed (pi0: one row), questions in the order
    of ``prompts``."""

    name: str
    beta: float | None
    seeds: list
    prompts: list[str]
    values: dict[str, np.ndarray]

    def ks(self, exact: bool) -> list[int]:
        """The k of pass@k evaluated (of the exact values with ``exact``), increasing."""
        return sorted(int(m.group(1)) for key in self.values if (m := PASS.match(key)) and bool(m.group(2)) == exact)

    def mean(self, key: str) -> float:
        return float(self.values[key].mean())


def read_evaluations(path: Path) -> dict[int, list[dict]]:
    """step -> that evaluation's per-question rows, from one eval_per_prompt.jsonl (a repeated step: the last line; a
    half-written last line is ignored)."""
    out: dict[int, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("prompts"), list) and isinstance(row.get("step"), int):
            out[row["step"]] = row["prompts"]
    return out


def _stack(name: str, beta, seeds: list, evaluations: list[list[dict]]) -> Evaluations | None:
    """(S, Q) arrays of the keys every question of every evaluation has; None when the questions differ."""
    prompts = [p.get("prompt") for p in evaluations[0]]
    if any([p.get("prompt") for p in e] != prompts for e in evaluations):
        return None
    keys = [k for k, v in evaluations[0][0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(isinstance(p.get(k), (int, float)) for e in evaluations for p in e)]
    values = {k: np.array([[float(p[k]) for p in e] for e in evaluations]) for k in keys}
    return Evaluations(name, beta, seeds, prompts, values)


def evaluations(groups: dict) -> tuple[Evaluations | None, list[Evaluations]]:
    """(pi0, [one Evaluations per configuration]) from the report's seed groups (tiltlm.experiments.cells.groups_of):
    pi0 is the mean of the cells' step-0 evaluations (one policy; several evaluation seeds average), a configuration has
    one row per cell (seed) with an evaluation after step 0. Cells without eval_per_prompt.jsonl are left out; a
    configuration whose cells evaluated other questions than pi0 is left out."""
    starts, out = [], []
    for config, cells in groups.items():
        finals, seeds = [], []
        for cell in cells:
            path = None if cell.dir is None else cell.dir / "eval_per_prompt.jsonl"
            if path is None or not path.is_file():
                continue
            by_step = read_evaluations(path)
            if 0 in by_step:
                starts.append(by_step[0])
            after = [s for s in by_step if s != 0]
            if after:
                finals.append(by_step[max(after)])
                seeds.append(cell.seed)
        if finals:
            label = config.name + (f" β={config.beta:g}" if config.beta is not None else "")
            line = _stack(label, config.beta, seeds, finals)
            if line is not None:
                out.append(line)
    pi0 = _stack("π0", None, [None], starts) if starts else None
    if pi0 is not None:
        pi0.values = {k: v.mean(0, keepdims=True) for k, v in pi0.values.items()}
        out = [e for e in out if e.prompts == pi0.prompts]
    return pi0, out


def is_exact(pi0: Evaluations, others: list[Evaluations]) -> bool:
    """Whether every policy has exact per-question values (then the comparisons use them)."""
    return all("pass@1_exact" in e.values for e in [pi0, *others])


@dataclass
class Comparison:
    """method − base on the same questions: pass@k at every k both have (a band simultaneous over k,
    tiltlm.experiments.intervals.band), and the COMPARED quantities (each its own percentile interval)."""

    pass_at_k: dict[int, Interval]
    other: dict[str, Interval]

    def as_dict(self) -> dict:
        return {"pass_at_k": {str(k): iv.as_dict() for k, iv in self.pass_at_k.items()},
                **{key: iv.as_dict() for key, iv in self.other.items()}}


def compare(method: Evaluations, base: Evaluations, *, exact: bool, seed: int = 0) -> Comparison:
    """The differences method − base with their intervals (exact per-question values with ``exact``)."""
    sfx = "_exact" if exact else ""
    ks = [k for k in method.ks(exact) if k in base.ks(exact)]
    bands = band([method.values[f"pass@{k}{sfx}"] for k in ks], [base.values[f"pass@{k}{sfx}"] for k in ks], seed=seed) if ks else []
    passes = dict(zip(ks, bands))  # simultaneous over k: the calls look at every k at once
    other = {}
    for i, key in enumerate(COMPARED):
        k = key + sfx if key + sfx in method.values and key + sfx in base.values else key
        if k in method.values and k in base.values:
            other[key] = difference(method.values[k], base.values[k], seed=seed + 1000 + i)
    return Comparison(passes, other)
