"""The bootstrap intervals of tiltlm.experiments.intervals: coverage of a known difference over simulated studies
(pass@1 estimates from 64 completions per question), the hierarchical seeds × questions case, the simultaneous band,
and the hand-checkable cases."""

import numpy as np
import pytest

from tiltlm.errors import TiltlmError
from tiltlm.experiments.intervals import band, difference

N_SIM = 300
# 300 simulations: the binomial standard error of a 95% coverage is 0.0126; ±0.04 is more than 3 of them
COVERAGE_TOLERANCE = 0.04


def _study(rng, *, questions=88, seeds=1, seed_sd=0.0, delta=0.03, n=64):
    """pi0's and a method's per-question pass@1 estimates; the population difference is known (see _truth)."""
    p0 = rng.beta(1, 4, size=questions)
    shift = delta + rng.normal(0, 0.05, size=questions)
    base = rng.binomial(n, p0) / n
    method = np.array([rng.binomial(n, np.clip(p0 + shift + rng.normal(0, seed_sd), 0, 1)) / n for _ in range(seeds)])
    return method, base


def _truth(seed_sd=0.0, delta=0.03, draws=400_000):
    rng = np.random.default_rng(12345)
    p0 = rng.beta(1, 4, size=draws)
    return float(np.mean(np.clip(p0 + delta + rng.normal(0, 0.05, draws) + rng.normal(0, seed_sd, draws), 0, 1) - p0))


@pytest.mark.parametrize("seeds", [1, 3])
def test_the_interval_covers_a_known_difference_in_95_percent_of_studies(seeds):
    truth, rng = _truth(), np.random.default_rng(seeds)
    hits = [difference(*_study(rng, seeds=seeds), n_boot=1000, seed=i) for i in range(N_SIM)]
    coverage = np.mean([iv.lo <= truth <= iv.hi for iv in hits])
    assert abs(coverage - 0.95) <= COVERAGE_TOLERANCE, coverage
    assert all(iv.lo <= iv.diff <= iv.hi for iv in hits)


def test_few_seeds_undercover_when_seeds_dominate_as_the_docs_say():
    """docs/math.md §13: with 3 seeds whose spread dominates, the interval is too narrow (2 degrees of freedom)."""
    truth, rng = _truth(seed_sd=0.03), np.random.default_rng(7)
    hits = [difference(*_study(rng, seeds=3, seed_sd=0.03), n_boot=1000, seed=i) for i in range(N_SIM)]
    coverage = np.mean([iv.lo <= truth <= iv.hi for iv in hits])
    assert 0.75 <= coverage < 0.93, coverage


def test_the_band_is_simultaneous_over_k():
    """Seven correlated pass@k differences, all truly 0: the band covers all seven at once in ~95% of studies, where
    seven pointwise intervals together cover less."""
    rng = np.random.default_rng(3)
    ks, n = (1, 2, 4, 8, 16, 32, 64), 64
    joint_band = joint_pointwise = 0
    for i in range(N_SIM):
        p = rng.beta(1, 6, size=60)
        c0, c1 = rng.binomial(n, p), rng.binomial(n, p)  # the same policy twice: every difference is 0
        from math import comb
        est = lambda c, k: np.array([1 - comb(n - x, k) / comb(n, k) for x in c])  # noqa: E731
        m, b = [est(c1, k) for k in ks], [est(c0, k) for k in ks]
        bands = band(m, b, n_boot=1000, seed=i)
        joint_band += all(iv.lo <= 0 <= iv.hi for iv in bands)
        joint_pointwise += all((iv := difference(x, y, n_boot=1000, seed=i)).lo <= 0 <= iv.hi for x, y in zip(m, b))
    assert abs(joint_band / N_SIM - 0.95) <= COVERAGE_TOLERANCE, joint_band / N_SIM
    assert joint_pointwise < joint_band


def test_hand_checked_cases():
    same = difference([0.2, 0.4, 0.6], [0.2, 0.4, 0.6])
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)
    shifted = difference([0.3, 0.5, 0.7], [0.2, 0.4, 0.6])  # every question +0.1: no spread, the interval is the point
    assert shifted.diff == pytest.approx(0.1) and shifted.lo == pytest.approx(0.1) and shifted.hi == pytest.approx(0.1)
    two = difference([[0.3, 0.5], [0.5, 0.7]], [0.2, 0.4])  # seeds average: (0.4 + 0.6)/2 − 0.3
    assert two.diff == pytest.approx(0.2) and two.lo < 0.2 < two.hi
    assert difference([1, 0, 1, 0], [0, 0, 0, 0], seed=5) == difference([1, 0, 1, 0], [0, 0, 0, 0], seed=5)  # deterministic
    assert band([[0.1, 0.2], [0.5, 0.5]], [[0.1, 0.2], [0.4, 0.4]])[1].lo == pytest.approx(0.1)


def test_bad_inputs_are_one_line():
    with pytest.raises(TiltlmError, match="same held-out questions"):
        difference([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(TiltlmError, match="must be finite"):
        difference([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(TiltlmError, match="level must be in"):
        difference([0.1], [0.2], level=1.5)
