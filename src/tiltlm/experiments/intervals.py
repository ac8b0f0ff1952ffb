"""Intervals on the differences a study states: a paired bootstrap over questions, hierarchical over seeds × questions.

A study evaluates pi0 and every trained policy on the same held-out questions (tiltlm.evaluate writes each question's
numbers to eval_per_prompt.jsonl). The quantity a sentence compares is a mean over questions of a per-question value v
(pass@k, distinct correct answers, mean reward, KL(pi‖pi0)), and a difference "method − baseline" is

    D = (1/Q) Σ_q ( v̄_method(q) − v̄_base(q) ),   v̄(q) = the mean of v(q) over that side's training seeds.

`difference` gives D with a 95% percentile interval from B bootstrap replicates (docs/math.md §13):

- each side's seeds are resampled with replacement (independently: different training runs), then one resample of
  the questions is shared by both sides (paired: a question's difficulty cancels in the difference);
- with S ≥ 2 seeds on a side, its seeds' deviations from their per-question mean are scaled by sqrt(S/(S−1)) before
  resampling, so that the bootstrap variance of a seed mean is the unbiased s²/S and not (S−1)/S of it;
- a side with one seed (pi0, or a single run) contributes its per-question values as they are: their spread over
  questions (and, for estimates, the sampling noise of n completions per question) is what the interval then covers.

What the interval covers: the uncertainty from which questions were held out (as a sample from the task's population of
questions), from each question's finite completions (an estimate's noise shows as spread over questions) and from the
training seeds. What it does not: other tasks, other budgets or hyperparameters, and — with few seeds — the full
seed-to-seed spread (3 seeds estimate it with 2 degrees of freedom; tests/test_intervals.py measures the coverage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tiltlm.errors import TiltlmError

LEVEL = 0.95
N_BOOT = 4000


@dataclass(frozen=True)
class Interval:
    """A difference and its interval (``lo`` ≤ ``diff`` ≤ ``hi`` up to bootstrap rounding)."""

    diff: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return {"diff": self.diff, "lo": self.lo, "hi": self.hi}

    @property
    def below_zero(self) -> bool:
        return self.hi < 0

    def text(self, digits: int = 3) -> str:
        """'+0.052 [+0.031, +0.074]'."""
        return f"{self.diff:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def _as_seeds(values, name: str) -> np.ndarray:
    """(S, Q) float array from one seed's (Q,) values or several seeds' (S, Q)."""
    a = np.asarray(values, dtype=np.float64)
    a = a[None, :] if a.ndim == 1 else a
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise TiltlmError(f"{name}: expected per-question values of shape (questions,) or (seeds, questions), got {a.shape}")
    if not np.isfinite(a).all():
        raise TiltlmError(f"{name}: per-question values must be finite (got NaN or inf); check the evaluation that wrote them")
    return a


def _replicates(methods: list, bases: list, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(point differences (K,), bootstrap replicates (n_boot, K)) of K paired quantities, all from the SAME resamples of
    seeds and questions (so that a band over them is simultaneous)."""
    ms = [_as_seeds(m, "method") for m in methods]
    bs = [_as_seeds(b, "baseline") for b in bases]
    q = ms[0].shape[1]
    if any(a.shape[1] != q for a in ms + bs) or len({a.shape[0] for a in ms}) != 1 or len({a.shape[0] for a in bs}) != 1:
        raise TiltlmError(f"the two sides have {ms[0].shape[1]} and {bs[0].shape[1]} questions (or differing seeds); a paired "
                          "difference needs the same held-out questions and seeds for every quantity")
    stacked_m, stacked_b = np.stack(ms, -1), np.stack(bs, -1)  # (S, Q, K)
    rng = np.random.default_rng(seed)

    def seed_means(a: np.ndarray) -> np.ndarray:  # (n_boot, Q, K)
        s = a.shape[0]
        if s == 1:
            return np.broadcast_to(a[0], (n_boot, *a.shape[1:]))
        centre = a.mean(0)
        inflated = centre + (a - centre) * math.sqrt(s / (s - 1))
        counts = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot)  # (n_boot, S)
        return np.einsum("bs,sqk->bqk", counts, inflated) / s

    per_question = seed_means(stacked_m) - seed_means(stacked_b)
    weights = rng.multinomial(q, np.full(q, 1.0 / q), size=n_boot)  # the shared resample of the questions
    replicates = np.einsum("bq,bqk->bk", weights, per_question) / q
    point = stacked_m.mean(0).mean(0) - stacked_b.mean(0).mean(0)
    return point, replicates


def difference(method, base, *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """D = mean over questions of (method − base), each side averaged over its seeds, with its ``level`` percentile
    bootstrap interval (module docstring). ``method`` and ``base``: (Q,) or (S, Q) per-question values, questions in the
    same order on both sides. Deterministic for a given ``seed``."""
    _check_level(level)
    point, replicates = _replicates([method], [base], n_boot, seed)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(replicates[:, 0], [alpha, 1 - alpha])
    return Interval(float(point[0]), float(lo), float(hi))


def band(methods: list, bases: list, *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> list[Interval]:
    """Simultaneous ``level`` intervals for several paired differences at once (pass@k at every k): all K intervals
    cover their differences together in ``level`` of repetitions, so a claim about "some k" or "every k" holds at that
    level. A max-type bootstrap band: each replicate's largest standardised deviation over the K quantities,
    max_k |D*_k − D_k| / sd_k, gives the multiplier c (its ``level`` quantile) and the band D_k ± c·sd_k; a quantity
    whose replicates do not vary (sd 0) gets a zero-width interval."""
    _check_level(level)
    point, replicates = _replicates(methods, bases, n_boot, seed)
    sd = replicates.std(0, ddof=1) if n_boot > 1 else np.zeros_like(point)
    live = sd > 1e-12 * np.maximum(1.0, np.abs(point))
    if not live.any():
        return [Interval(float(d), float(d), float(d)) for d in point]
    z = np.abs(replicates[:, live] - replicates[:, live].mean(0)) / sd[live]
    c = float(np.quantile(z.max(1), level))
    half = np.where(live, c * sd, 0.0)
    return [Interval(float(d), float(d - h), float(d + h)) for d, h in zip(point, half)]


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise TiltlmError(f"the interval level must be in (0, 1) (got {level})")
