"""Exact quantities against hand-computed answers on a 3-sequence tabular space."""

import json
import math

import pytest
import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, exact_report, kl
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Constraint, Prior, Tilt


def three_sequence_prior():
    # '' (EOS first) 0.4, 'a' 0.42, 'aa' 0.18 (length limit, no EOS factor)
    return TabularPolicy(["a", "<eos>"], max_new_tokens=2, logits=torch.log(torch.tensor([[[0.6, 0.4], [0.3, 0.7]]])))


def hand(beta: float, policy_probs=None) -> dict:
    prior = [0.4, 0.42, 0.18]
    r = [0.0, 1.0, 2.0]  # count:a
    unnorm = [p * math.exp(ri / beta) for p, ri in zip(prior, r)]
    z = sum(unnorm)
    target = [u / z for u in unnorm]

    def kl_(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)

    out = {
        "log_z": math.log(z),
        "reward_prior": sum(p * ri for p, ri in zip(prior, r)),
        "reward_target": sum(p * ri for p, ri in zip(target, r)),
        "kl_target_prior": kl_(target, prior),
        "kl_prior_target": kl_(prior, target),
        "entropy_prior": -sum(p * math.log(p) for p in prior),
        "entropy_target": -sum(p * math.log(p) for p in target),
    }
    if policy_probs:
        out.update(
            kl_target_policy=kl_(target, policy_probs),
            kl_policy_target=kl_(policy_probs, target),
            tv_policy_target=0.5 * sum(abs(a - b) for a, b in zip(policy_probs, target)),
            reward_policy=sum(p * ri for p, ri in zip(policy_probs, r)),
            entropy_policy=-sum(p * math.log(p) for p in policy_probs),
        )
    return out


@pytest.mark.parametrize("beta", [0.3, 1.0, 5.0])
def test_exact_report_equals_hand_computation(beta):
    prior = three_sequence_prior()
    policy = TabularPolicy(["a", "<eos>"], max_new_tokens=2, logits=torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])))
    report = exact_report(enumerate_space(prior), Prior(prior) * Tilt("count:a", beta), policy)
    expected = hand(beta, policy_probs=[0.5, 0.05, 0.45])
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert report["n_sequences"] == 3


def test_beta_to_infinity_gives_the_prior():
    prior = TabularPolicy.random(list("abc") + ["<eos>"], max_new_tokens=3, seed=1, scale=2.0)
    space = enumerate_space(prior)
    for beta in (1e9, math.inf):
        report = exact_report(space, Prior(prior) * Tilt("count:a", beta))
        assert report["log_z"] == pytest.approx(0.0, abs=1e-6)
        assert report["kl_target_prior"] == pytest.approx(0.0, abs=1e-6)
        assert report["reward_target"] == pytest.approx(report["reward_prior"], abs=1e-6)


def test_small_beta_is_the_hardmax_without_overflow():
    prior = three_sequence_prior()
    report = exact_report(enumerate_space(prior), Prior(prior) * Tilt("count:a", 1e-3))
    assert report["reward_target"] == pytest.approx(2.0)  # all mass on argmax r = 'aa'
    assert report["log_z"] == pytest.approx(math.log(0.18) + 2.0 / 1e-3)
    assert report["kl_target_prior"] == pytest.approx(-math.log(0.18))


def test_constraint_gives_infinite_reverse_kl_and_conditional():
    prior = three_sequence_prior()
    report = exact_report(enumerate_space(prior), Prior(prior) * Constraint("contains:a"))
    assert report["log_z"] == pytest.approx(math.log(0.6))  # P(contains a) = 0.42 + 0.18
    assert report["kl_target_prior"] == pytest.approx(-math.log(0.6))  # KL(p(.|b)||p) = -log P(b)
    assert report["kl_prior_target"] == math.inf


def test_kl_support_handling():
    p = torch.log(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    q = torch.log(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert kl(p, q) == pytest.approx(math.log(2))
    assert kl(q, p) == math.inf


def test_kl_support_rule_is_shared_with_the_trajectory_kl():
    """One KL for sequences and trajectories: p = 0 < q contributes 0, p > 0 = q gives +inf."""
    from tiltlm.exact import mdp

    assert mdp.kl is kl
    log = lambda *v: torch.log(torch.tensor(v, dtype=torch.float64))  # noqa: E731
    # p = 0 where q > 0: that x contributes 0, the rest is finite (hand computed)
    assert kl(log(0.8, 0.2, 0.0), log(0.5, 0.25, 0.25)) == pytest.approx(0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.25), abs=1e-15)
    # p > 0 where q = 0: +inf, however little mass p puts there
    assert kl(log(0.5, 0.5 - 1e-12, 1e-12), log(0.5, 0.5, 0.0)) == math.inf
    # both 0 at x: no contribution; identical distributions: exactly 0
    assert kl(log(0.3, 0.7, 0.0), log(0.3, 0.7, 0.0)) == 0.0
    assert kl(log(0.6, 0.4), log(0.4, 0.6)) == pytest.approx(0.2 * math.log(1.5), abs=1e-15)


def test_space_log_prob_of_another_policy_and_vocabulary_mismatch():
    a = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0)
    b = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=1)
    space = enumerate_space(a)
    torch.testing.assert_close(space.log_prob(b), b.log_prob(space.samples).double(), atol=1e-6, rtol=0)
    c = TabularPolicy.random(list("abc") + ["<eos>"], max_new_tokens=3, seed=1)
    with pytest.raises(TiltlmError, match="differs"):
        space.log_prob(c)


def test_too_large_space_is_refused(testbed_policy):
    with pytest.raises(TiltlmError, match="over the limit"):
        enumerate_space(testbed_policy, max_new_tokens=40)


def test_hf_testbed_report_is_consistent(testbed_policy):
    space = enumerate_space(testbed_policy)
    report = exact_report(space, Prior(testbed_policy) * Tilt("count:a", 0.5), testbed_policy)
    assert report["prior_mass"] == pytest.approx(1.0, abs=1e-5)
    assert report["kl_policy_target"] == pytest.approx(report["kl_prior_target"], abs=1e-9)
    # identity of KL-regularised RL: E_p*[r]/beta - KL(p*||pi0) = log Z  (docs/math.md §2 at the optimum)
    assert report["reward_target"] / 0.5 - report["kl_target_prior"] == pytest.approx(report["log_z"], abs=1e-5)
    json.dumps(report)
