"""Target algebra and the GDC moment fit against closed forms."""

import math

import pytest
import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, exact_report
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Constraint, Moments, Prior, Product, Target, Tilt, fit_lambdas


@pytest.fixture()
def prior():
    return TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0, scale=1.0)


def test_product_log_score_is_the_sum(prior):
    s = prior.sample([""], 64, seed=0)
    tilt, constraint = Tilt("count:a", 0.5), Constraint("contains:b")
    target = Prior(prior) * tilt * constraint
    assert isinstance(target, Target) and isinstance(target.factor, Product) and len(target.factors) == 2
    expected = prior.log_prob(s).double() + tilt.log_potential(s) + constraint.log_potential(s)
    torch.testing.assert_close(target.log_score(s), expected)
    # factors compose on either side and associate
    torch.testing.assert_close((tilt * constraint * Prior(prior)).log_score(s), expected)
    torch.testing.assert_close((Prior(prior) * (tilt * constraint)).log_score(s), expected)


def test_tilt_values_and_constraint_never_nan(prior):
    s = prior.sample([""], 64, seed=1)
    counts = torch.tensor([t.count("a") for t in s.texts], dtype=torch.float64)
    torch.testing.assert_close(Tilt("count:a", 0.25).log_potential(s), counts / 0.25)
    lp = Constraint("contains:b").log_potential(s)
    assert not torch.isnan(lp).any()
    assert ((lp == 0) == torch.tensor(["b" in t for t in s.texts])).all()
    assert torch.isneginf(lp[torch.tensor(["b" not in t for t in s.texts])]).all()


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(TiltlmError, match="beta must be > 0"):
        Tilt("count:a", beta)


def test_large_rewards_small_beta_stay_finite(prior):
    s = prior.sample([""], 32, seed=2)
    target = Prior(prior) * Tilt(lambda texts: [1000.0 * len(t) for t in texts], 1e-3)
    score = target.log_score(s)
    assert torch.isfinite(score).all()
    report = exact_report(enumerate_space(prior), target)
    assert math.isfinite(report["log_z"]) and report["reward_target"] == pytest.approx(3000.0)


def binary_closed_form(m0: float, mu: float) -> float:
    """lambda with E_{p_lambda}[phi] = mu for a binary phi with prior mean m0."""
    return math.log(mu * (1 - m0) / (m0 * (1 - mu)))


def test_moments_exact_fit_matches_closed_form(prior):
    space = enumerate_space(prior)
    moments = Moments(["contains:a"], [0.8])
    fit = moments.fit(space.samples, log_weights=space.logp)
    m0 = float((space.logp.exp() * torch.tensor(["a" in t for t in space.samples.texts], dtype=torch.float64)).sum())
    assert fit.lambdas[0] == pytest.approx(binary_closed_form(m0, 0.8), abs=1e-6)
    assert fit.error < 1e-6 and fit.achieved[0] == pytest.approx(0.8)


def test_moments_sample_fit_reaches_requested_moments(prior):
    """The GDC procedure on samples of pi0 (SNIS): the exact moments of the fitted p_lambda hit the targets within 0.01."""
    moments = Moments(["contains:a", "count:b"], [0.75, 1.2])
    fit = moments.fit(prior.sample([""], 100000, seed=3))  # SNIS error ~ 1/sqrt(ESS): ESS here ≈ 6e4
    assert fit.error < 1e-5  # on the samples themselves
    space = enumerate_space(prior)
    log_p = space.logp + moments.log_potential(space.samples)
    p = torch.softmax(log_p, 0)
    feats = moments.features_of(space.samples)
    exact_moments = p @ feats
    assert exact_moments.tolist() == pytest.approx([0.75, 1.2], abs=0.01)


def test_moments_single_feature_exact_target_algebra(prior):
    """A fitted Moments factor is an ordinary factor: multiply it with a tilt, score, enumerate.

    One binary feature phi = contains:a with prior mean m0 and requested mean 1/2:
    lambda = log((1 - m0)/m0), Z(lambda) = (1 - m0) + m0 e^lambda = 2(1 - m0),
    KL(p_lambda || pi0) = lambda·E_p[phi] - log Z = lambda/2 - log(2(1 - m0))   (docs/math.md §1.3).
    """
    space = enumerate_space(prior)
    phi = torch.tensor(["a" in t for t in space.samples.texts], dtype=torch.float64)
    m0 = float(space.logp.exp() @ phi)
    assert 0.05 < m0 < 0.95  # a non-trivial case (lambda != 0)
    moments = Moments(["contains:a"], [0.5])
    fit = moments.fit(space.samples, log_weights=space.logp)
    lam = math.log((1 - m0) / m0)
    assert abs(lam) > 0.1
    assert fit.lambdas[0] == pytest.approx(lam, abs=1e-6)
    target = Prior(prior) * moments
    report = exact_report(space, target)
    assert report["log_z"] == pytest.approx(math.log(2 * (1 - m0)), abs=1e-6)
    # log Z and the moment of p_lambda by enumeration, independently of the fit and of exact_report
    assert report["log_z"] == pytest.approx(float(torch.logsumexp(space.logp + fit.lambdas[0] * phi, 0)), abs=1e-12)
    p = torch.softmax(target.log_score(space.samples), 0)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(p @ phi) == pytest.approx(0.5, abs=1e-6)
    assert report["kl_target_prior"] == pytest.approx(lam / 2 - math.log(2 * (1 - m0)), abs=1e-6)

    # times a tilt: log Z and E[r] of pi0 · e^{lambda phi} · e^{count_b/0.5}, enumerated by hand
    tilted = Prior(prior) * moments * Tilt("count:b", 0.5)
    count_b = torch.tensor([t.count("b") for t in space.samples.texts], dtype=torch.float64)
    log_p = space.logp + lam * phi + count_b / 0.5
    report = exact_report(space, tilted)
    assert report["log_z"] == pytest.approx(float(torch.logsumexp(log_p, 0)), abs=1e-6)
    assert report["reward_target"] == pytest.approx(float(torch.softmax(log_p, 0) @ count_b), abs=1e-6)
    # (log_score re-scores pi0 in float32: agreement to ~1e-7)
    torch.testing.assert_close(tilted.log_score(space.samples), space.logp + fit.lambdas[0] * phi + count_b / 0.5, atol=1e-5, rtol=0)


def test_moments_exact_fit_two_features_hits_the_moments(prior):
    """Fitted on the enumerated space, p_lambda's exact moments are the requested ones (to the fit's 1e-6)."""
    space = enumerate_space(prior)
    moments = Moments(["contains:a", "count:b"], [0.75, 1.2])
    fit = moments.fit(space.samples, log_weights=space.logp)
    feats = torch.stack([
        torch.tensor([float("a" in t) for t in space.samples.texts], dtype=torch.float64),
        torch.tensor([float(t.count("b")) for t in space.samples.texts], dtype=torch.float64),
    ], dim=1)
    log_p = space.logp + feats @ torch.tensor(fit.lambdas, dtype=torch.float64)
    exact_moments = torch.softmax(log_p, 0) @ feats
    assert exact_moments.tolist() == pytest.approx([0.75, 1.2], abs=1e-6)
    assert fit.error < 1e-6 and list(fit.achieved) == pytest.approx([0.75, 1.2], abs=1e-6)
    report = exact_report(space, Prior(prior) * moments)
    assert report["log_z"] == pytest.approx(float(torch.logsumexp(log_p, 0)), abs=1e-12)
    # the dual optimum: KL(p_lambda || pi0) = lambda·mu_bar - log Z(lambda)
    lam_mu = float(torch.tensor(fit.lambdas, dtype=torch.float64) @ torch.tensor([0.75, 1.2], dtype=torch.float64))
    assert report["kl_target_prior"] == pytest.approx(lam_mu - report["log_z"], abs=1e-5)


def test_moments_errors(prior):
    s = prior.sample([""], 100, seed=0)
    with pytest.raises(TiltlmError, match="outside the range"):
        Moments(["contains:a"], [1.5]).fit(s)
    with pytest.raises(TiltlmError, match="one target per feature"):
        Moments(["contains:a"], [0.5, 0.2])
    with pytest.raises(TiltlmError, match="no fitted lambda"):
        Moments(["contains:a"], [0.5]).log_potential(s)


def test_fit_lambdas_newton_on_gaussian_like_case():
    """phi uniform on a grid: E_lambda[phi] is a known monotone function; the fit inverts it."""
    phi = torch.linspace(-1, 1, 201, dtype=torch.float64)[:, None]
    fit = fit_lambdas(phi, torch.tensor([0.3]))
    w = torch.softmax(phi[:, 0] * fit.lambdas[0], 0)
    assert float(w @ phi[:, 0]) == pytest.approx(0.3, abs=1e-6)
