"""Inference baselines sample from the distributions their exact formulas say, on enumerable spaces."""

import itertools
import math
from collections import Counter

import pytest
import torch

from tiltlm.algorithms.inference import (
    best_of_n,
    best_of_n_exact_distribution,
    importance_resample,
    qrs_acceptance_exact,
    qrs_exact_distribution,
    quasi_rejection_sample,
)
from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, normalise, tv
from tiltlm.policies import TabularPolicy
from tiltlm.rewards import get_reward
from tiltlm.targets import Constraint, Prior, Tilt

VOCAB = list("ab") + ["<eos>"]


@pytest.fixture(scope="module")
def setup():
    prior = TabularPolicy.random(VOCAB, max_new_tokens=3, seed=0, scale=1.0)
    proposal = TabularPolicy.random(VOCAB, max_new_tokens=3, seed=5, scale=0.5)  # IS weights with ESS ~ 0.3 n
    target = Prior(prior) * Tilt("count:a", 1.0)
    space = enumerate_space(prior)  # 15 sequences with distinct texts
    log_pi0 = space.logp
    log_p_unnorm = target.log_score(space.samples, prior_logp=log_pi0)
    log_q = space.log_prob(proposal)
    return prior, proposal, target, space, log_pi0, log_p_unnorm, log_q


def _empirical(texts: list[str], space_texts: list[str]) -> torch.Tensor:
    """log of the empirical frequency of each sequence of the space (-inf where never drawn)."""
    counts = Counter(texts)
    assert set(counts) <= set(space_texts)
    freq = torch.tensor([counts[t] for t in space_texts], dtype=torch.float64) / len(texts)
    return freq.log()


def test_sir_matches_target(setup):
    prior, proposal, target, space, log_pi0, log_p_unnorm, log_q = setup
    log_p, log_z = normalise(log_p_unnorm)
    for q, m in ((None, 30000), (proposal, 40000)):  # the prior as proposal, and another policy
        res = importance_resample(target, q, [""], n_proposals=m, n_out=20000, seed=1)
        assert len(res.samples) == 20000 and res.n_proposals == m
        assert res.acceptance_rate == pytest.approx(20000 / m)
        assert tv(_empirical(res.samples.texts, space.samples.texts), log_p) < 0.03
        assert res.log_z[0].value == pytest.approx(log_z, abs=4 * res.log_z[0].stderr)
        assert 0.2 * m < res.ess[0] <= m
        assert set(res.as_dict()) == {"n_proposals", "n_selected", "acceptance_rate", "ess", "log_z"}


def test_sir_resamples_per_context():
    prior = TabularPolicy.random(VOCAB, max_new_tokens=2, contexts=("x", "y"), seed=3, scale=2.0)
    target = Prior(prior) * Constraint("contains:b")
    res = importance_resample(target, None, ["x", "y"], n_proposals=10000, n_out=10000, seed=0)
    for g, context in enumerate(["x", "y"]):
        space = enumerate_space(prior, context=context)
        log_p, _ = normalise(target.log_score(space.samples, prior_logp=space.logp))
        texts = [t for t, gi in zip(res.samples.texts, res.samples.group.tolist()) if gi == g]
        assert len(texts) == 10000 and all("b" in t for t in texts)
        assert tv(_empirical(texts, space.samples.texts), log_p) < 0.03


def test_sir_with_no_mass_names_the_fix(setup):
    prior = setup[0]
    with pytest.raises(TiltlmError, match="draw more proposals"):
        importance_resample(Prior(prior) * Constraint("contains:zzz"), None, [""], 100, 10, seed=0)


def test_qrs_exact_distribution_is_target_when_beta_bounds_the_ratio(setup):
    *_, log_p_unnorm, log_q = setup
    log_p, _ = normalise(log_p_unnorm)
    log_bound = float((log_p_unnorm - log_q).max())
    for extra in (0.0, 0.7, 5.0):  # any beta >= max P/q is plain rejection sampling
        assert torch.allclose(qrs_exact_distribution(log_p_unnorm, log_q, log_bound + extra), log_p, atol=1e-9, rtol=0)
    below = qrs_exact_distribution(log_p_unnorm, log_q, log_bound - 2.0)
    assert tv(below, log_p) > 0.01  # below the bound it is only an approximation
    # the acceptance of exact rejection sampling is Z / beta
    assert qrs_acceptance_exact(log_p_unnorm, log_q, log_bound) == pytest.approx(math.exp(torch.logsumexp(log_p_unnorm, 0) - log_bound))


@pytest.mark.parametrize("use_prior", [True, False])
def test_qrs_samples_match_exact_distribution_and_acceptance(setup, use_prior):
    """beta below max P/q, where QRS is an approximation: samples follow qrs_exact_distribution, not p*."""
    prior, proposal, target, space, log_pi0, log_p_unnorm, log_q = setup
    q, log_q = (None, log_pi0) if use_prior else (proposal, log_q)
    log_beta = float((log_p_unnorm - log_q).max()) - 1.5
    n = 30000
    res = quasi_rejection_sample(target, q, [""], n, log_beta=log_beta, seed=2)
    exact_rate = qrs_acceptance_exact(log_p_unnorm, log_q, log_beta)
    assert res.n_proposals == n and len(res.samples) == round(res.acceptance_rate * n)
    assert res.acceptance_rate == pytest.approx(exact_rate, abs=4 * math.sqrt(exact_rate * (1 - exact_rate) / n))
    exact = qrs_exact_distribution(log_p_unnorm, log_q, log_beta)
    assert tv(exact, normalise(log_p_unnorm)[0]) > 0.1
    assert tv(_empirical(res.samples.texts, space.samples.texts), exact) < 0.03
    # the same draws from beta_qrs in linear space and the same seed
    a = quasi_rejection_sample(target, q, [""], 500, beta_qrs=math.exp(log_beta), seed=4)
    b = quasi_rejection_sample(target, q, [""], 500, log_beta=log_beta, seed=4)
    assert a.samples.texts == b.samples.texts


def test_qrs_needs_one_beta(setup):
    target = setup[2]
    with pytest.raises(TiltlmError, match="exactly one"):
        quasi_rejection_sample(target, None, [""], 10, seed=0)
    with pytest.raises(TiltlmError, match="beta_qrs must be"):
        quasi_rejection_sample(target, None, [""], 10, beta_qrs=0.0, seed=0)


def test_best_of_n_exact_by_hand():
    # q = (0.5, 0.3, 0.2), rewards (1, 2, 1), n = 2: the best is x2 unless both draws are in {x1, x3}
    # (prob 0.7^2 = 0.49); then the first draw is kept: x1 with prob 0.5/0.7, x3 with 0.2/0.7
    log_q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    rewards = torch.tensor([1.0, 2.0, 1.0])
    got = best_of_n_exact_distribution(log_q, rewards, 2).exp()
    assert torch.allclose(got, torch.tensor([0.35, 0.51, 0.14], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(best_of_n_exact_distribution(log_q, rewards, 1), log_q, atol=1e-12)


def test_best_of_n_exact_equals_brute_force_over_all_draws():
    q = torch.tensor([0.1, 0.25, 0.3, 0.05, 0.3], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.0])
    n = 3
    brute = torch.zeros(5, dtype=torch.float64)
    for draws in itertools.product(range(5), repeat=n):
        best = max(draws, key=lambda i: float(rewards[i]))  # max() keeps the first among equals
        brute[best] += math.prod(float(q[i]) for i in draws)
    assert torch.allclose(best_of_n_exact_distribution(q.log(), rewards, n).exp(), brute, atol=1e-12)


def test_best_of_n_samples_match_exact(setup):
    prior, proposal, target, space, log_pi0, *_ = setup
    rewards = get_reward("count:a")(space.samples.texts)  # many ties: levels 0..3
    for n, n_out in ((1, 15000), (4, 10000)):
        res = best_of_n("count:a", prior, [""], n=n, n_out=n_out, seed=n)
        assert res.n_proposals == n_out * n and res.acceptance_rate == pytest.approx(1 / n)
        exact = best_of_n_exact_distribution(log_pi0, rewards, n)
        assert tv(_empirical(res.samples.texts, space.samples.texts), exact) < 0.03
    assert torch.allclose(best_of_n_exact_distribution(log_pi0, rewards, 1), log_pi0 - torch.logsumexp(log_pi0, 0), atol=1e-12)


def test_inference_baselines_are_measured_like_policies():
    """Exact best-of-n and QRS distributions go through the same ExactMetrics keys as a trained policy."""
    import math

    from tiltlm.algorithms.inference import best_of_n_exact_distribution, qrs_exact_distribution
    from tiltlm.exact import enumerate_space
    from tiltlm.metrics.batch import ExactMetrics
    from tiltlm.policies import TabularPolicy
    from tiltlm.targets import Prior, Tilt

    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0, scale=1.0)
    target = Prior(prior) * Tilt("count:a", 1.0)
    space = enumerate_space(prior)
    rewards = target.tilt.reward(space.samples.texts)
    exact = ExactMetrics(space, target.log_potential(space.samples), rewards)
    as_prior = exact.of(space.logp)
    assert exact(prior) == as_prior
    bon = exact.of(best_of_n_exact_distribution(space.logp, rewards, 8))
    assert bon["reward/exact"] > as_prior["reward/exact"]
    assert exact.of(best_of_n_exact_distribution(space.logp, rewards, 1)) == pytest.approx(as_prior)
    log_target = space.logp + target.log_potential(space.samples)
    qrs = exact.of(qrs_exact_distribution(log_target, space.logp, float((log_target - space.logp).max()) + math.log(2)))
    assert qrs["kl/target_exact"] < 1e-9  # beta >= max P/q: QRS is exact rejection sampling
