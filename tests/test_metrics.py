"""Importance-sampling estimates converge to the exact values as samples grow."""

import math

import pytest
import torch

from tiltlm.exact import enumerate_space, exact_report
from tiltlm.metrics import effective_sample_size, kl_policy_prior, kl_policy_target, kl_target_policy, log_z, tv_target_policy
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt


def test_is_estimates_converge_to_exact_on_hf_testbed(testbed_policy):
    """Errors stay within 3 standard errors, and the standard errors shrink like 1/sqrt(n)."""
    prior = testbed_policy
    target = Prior(prior) * Tilt("count:a", 1.0)
    exact = exact_report(enumerate_space(prior), target)
    stderrs = []
    for i, n in enumerate([100, 1000, 30000]):
        s = prior.sample([""], n, seed=10 + i)
        lp = s.logp.double()
        lt = target.log_score(s, prior_logp=lp)
        for est, truth in ((log_z(lt, lp), exact["log_z"]), (kl_target_policy(lt, lp, lp), exact["kl_target_prior"])):
            assert abs(est.value - truth) < 3 * est.stderr, (n, est, truth)
        stderrs.append(log_z(lt, lp).stderr * n**0.5)
        if n == 30000:
            assert abs(log_z(lt, lp).value - exact["log_z"]) < 0.04
            assert abs(kl_target_policy(lt, lp, lp).value - exact["kl_target_prior"]) < 0.05
    assert max(stderrs) < 2 * min(stderrs)  # stderr * sqrt(n) is about constant: O(1/sqrt(n)) convergence


def test_is_with_another_policy_as_proposal_and_tv():
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0, scale=1.0)
    policy = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=5, scale=1.0)
    target = Prior(prior) * Tilt("count:b", 1.0)
    space = enumerate_space(prior)
    exact = exact_report(space, target, policy)
    s = policy.sample([""], 50000, seed=0)
    lq = s.logp.double()
    lt = target.log_score(s)
    assert log_z(lt, lq).value == pytest.approx(exact["log_z"], abs=0.02)
    assert kl_target_policy(lt, lq, lq).value == pytest.approx(exact["kl_target_policy"], abs=0.02)
    assert tv_target_policy(lt, lq, lq).value == pytest.approx(exact["tv_policy_target"], abs=0.02)
    assert kl_policy_target(lt, lq, exact["log_z"]).value == pytest.approx(exact["kl_policy_target"], abs=0.02)
    kl_prior = exact["kl_policy_prior"]
    lp0 = prior.log_prob(s).double()
    for estimator in ("k1", "k2", "k3"):
        est = kl_policy_prior(lq, lp0, estimator)
        if estimator != "k2":  # k2 is biased; k1 and k3 are unbiased
            assert est.value == pytest.approx(kl_prior, abs=4 * est.stderr + 1e-3)


def test_ess_by_hand():
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(10.0)
    w = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    assert effective_sample_size(w.log()) == pytest.approx(16 / 6)
    assert effective_sample_size(torch.full((3,), -math.inf)) == 0.0


def test_log_z_by_hand_and_extreme_weights():
    lt = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    assert log_z(lt, torch.zeros(2)).value == pytest.approx(math.log(2.0))
    huge = log_z(torch.tensor([1e4, 1e4 - 1.0]), torch.zeros(2))
    assert math.isfinite(huge.value) and math.isfinite(huge.stderr)
