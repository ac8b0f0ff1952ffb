"""Every algorithm against theory on an exact (tabular, well-specified) testbed.

The space: tokens {a, b, <eos>}, at most 3 new tokens (15 sequences); target p* ∝ pi0·exp(count_a/beta).
Divergences are computed by exact enumeration, never estimated.
"""

import math

import pytest
import torch

from tiltlm.algorithms import available_algorithms, get_algorithm
from tiltlm.algorithms.base import Batch, leave_one_out
from tiltlm.algorithms.f_dpg import F_PRIME, f_dpg_loss
from tiltlm.algorithms.kl_pg import kl_pg_loss
from tiltlm.errors import TiltlmError
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

BETA = 1.0


def setup(seed: int = 0):
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=seed, scale=1.0)
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    return prior, policy, Prior(prior) * Tilt("count:a", BETA)


def run(algorithm: dict, steps: int, *, lr: float = 0.05, schedule: str = "constant", n: int = 64, seed: int = 0):
    prior, policy, target = setup()
    config = parse_config({
        "algorithm": algorithm, "target": {"reward": "count:a", "beta": BETA},
        "sampling": {"n_per_context": n, "max_new_tokens": 3}, "seed": seed,
        "optim": {"steps": steps, "lr": lr, "schedule": schedule},
        "metrics": {"exact_every": steps, "diversity": False},
    })
    rows = Trainer(config, policy=policy, target=target).run()
    return rows[-1], policy, prior


@pytest.mark.parametrize("algorithm,steps,schedule", [
    ({"name": "kl-pg"}, 200, "constant"),
    ({"name": "kl-pg", "kl_in": "loss", "estimator": "k2"}, 250, "linear"),
    ({"name": "ppo-kl", "epochs": 4}, 200, "linear"),
])
def test_reverse_kl_methods_reach_p_star(algorithm, steps, schedule):
    last, _, _ = run(algorithm, steps, schedule=schedule)
    assert last["kl/policy_target_exact"] < 0.01, last


@pytest.mark.parametrize("algorithm,steps", [
    ({"name": "dpg"}, 300),
    ({"name": "dpg", "off_policy": True}, 300),
    ({"name": "gdc++"}, 200),
    ({"name": "f-dpg", "divergence": "rkl"}, 250),
    ({"name": "f-dpg", "divergence": "fkl"}, 300),
    ({"name": "f-dpg", "divergence": "js"}, 300),
    ({"name": "f-dpg", "divergence": "tv"}, 300),
])
def test_distribution_matching_methods_reach_p_star(algorithm, steps):
    last, _, _ = run(algorithm, steps, schedule="linear")
    assert last["kl/target_exact"] < 0.01, last  # KL(p*||pi): DPG's objective
    assert last["tv/target_exact"] < 0.05, last
    if algorithm.get("divergence") == "tv":
        assert last["tv/target_exact"] < 0.01, last


def test_reinforce_collapses_onto_argmax():
    last, policy, _ = run({"name": "reinforce"}, 300)
    from tiltlm.exact import enumerate_space

    space = enumerate_space(policy)
    p_best = float(space.logp.exp()[space.samples.texts.index("aaa")])
    assert p_best >= 0.99, last
    assert last["entropy/exact"] < 0.1  # p* has entropy ~2.2 nats here: collapse


def test_kl_k1_in_the_loss_ignores_the_kl():
    """k1 in the loss has zero expected gradient: the result behaves like pure reward maximisation."""
    last, _, _ = run({"name": "kl-pg", "kl_in": "loss", "estimator": "k1"}, 200)
    assert last["reward/exact"] > 2.5 and last["kl/policy_target_exact"] > 0.5


def _batch(policy, target, n=32, seed=0):
    s = policy.sample([""], n, seed=seed)
    logq = s.logp.double()
    lp0, lt, r = target.score(s)
    return Batch(samples=s, logq=logq, token_logq=s.token_logp, logp_prior=lp0, log_target=lt, reward=r, beta=target.beta)


def _grad(policy, loss_fn):
    policy.logits.grad = None
    token_logp = policy.log_prob(loss_fn.samples, grad=True, per_token=True)
    loss, _ = loss_fn(token_logp.sum(-1), token_logp)
    loss.backward()
    return policy.logits.grad.clone()


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_ppo_one_epoch_unclipped_equals_kl_pg(kl_in):
    prior, policy, target = setup()
    with torch.no_grad():
        policy.logits.add_(torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(1)))
    batch = _batch(policy, target)
    grads = []
    for algo in (get_algorithm("kl-pg", kl_in=kl_in, estimator="k2"),
                 get_algorithm("ppo-kl", kl_in=kl_in, estimator="k2", epochs=1, clip=None)):
        fn = lambda lp, tlp, a=algo: a.loss(batch, lp, tlp)  # noqa: E731
        fn.samples = batch.samples
        grads.append(_grad(policy, fn))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("beta", [BETA, 0.25])
def test_f_dpg_reverse_kl_is_the_kl_rl_pseudo_reward(beta):
    """-f'(pi/p) for reverse KL = (r - beta log(pi/pi0))/beta - log Z - 1: KL-RL's reward up to constants.

    With a baseline the constants drop out, so on the same on-policy batch (one context of n samples)
    f-DPG(rkl)'s gradient, which *descends* KL(pi||p*), and kl-pg's (k1 in the reward, leave-one-out
    baseline), which descends -J = beta KL(pi||p*) - beta log Z, are proportional:
        grad kl-pg = beta · n/(n-1) · grad f-dpg
    beta from J's scale; n/(n-1) because R_i - mean_{j≠i} R_j = n/(n-1) (R_i - mean_j R_j), while
    f-DPG subtracts the (self-normalised, on-policy: plain) mean over all n (docs/math.md §3.4).
    """
    prior, policy, _ = setup()
    target = Prior(prior) * Tilt("count:a", beta)
    with torch.no_grad():  # move pi away from pi0 so the KL term is not zero
        policy.logits.add_(torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(1)))
    n = 32
    batch = _batch(policy, target, n=n)
    assert batch.group.unique().numel() == 1  # one context: leave-one-out over the other n - 1
    logp = policy.log_prob(batch.samples).double()
    log_z = 0.37
    _, pseudo = f_dpg_loss(logp, batch.logq, batch.log_target, log_z, divergence="rkl")
    kl_rl = (batch.reward - beta * (logp - batch.logp_prior)) / beta
    torch.testing.assert_close(pseudo, kl_rl - log_z - 1, atol=1e-9, rtol=0)

    # the two gradients agree up to beta · n/(n-1); f-DPG's running log Z (any value) cancels in its baseline
    f_dpg = get_algorithm("f-dpg", divergence="rkl", baseline=True)
    f_dpg.observe(batch)
    kl_pg = get_algorithm("kl-pg", kl_in="reward", estimator="k1")  # beta: the batch's (the target's)
    grads = []
    for algo in (f_dpg, kl_pg):
        fn = lambda lp, tlp, a=algo: a.loss(batch, lp, tlp)  # noqa: E731
        fn.samples = batch.samples
        grads.append(_grad(policy, fn))
    g_f, g_kl = grads
    assert g_f.abs().sum() > 1e-3  # a real gradient, not 0 = 0
    torch.testing.assert_close(g_kl, beta * n / (n - 1) * g_f, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(g_kl, beta * g_f, atol=1e-6, rtol=1e-3)  # the n/(n-1) is really there


def test_f_prime_by_hand():
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    lt = t.log()
    torch.testing.assert_close(F_PRIME["rkl"](lt), t.log() + 1)
    torch.testing.assert_close(F_PRIME["fkl"](lt), -1 / t)
    torch.testing.assert_close(F_PRIME["js"](lt), math.log(2) - torch.log(1 + 1 / t))
    torch.testing.assert_close(F_PRIME["tv"](lt), torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64))


def test_leave_one_out_by_hand():
    values = torch.tensor([1.0, 2.0, 6.0, 10.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 2])
    # group 0: (2+6)/2, (1+6)/2, (1+2)/2; group 1 and 2 alone: mean of the rest of the batch
    expected = torch.tensor([4.0, 3.5, 1.5, 9 / 4, 19 / 4], dtype=torch.float64)
    torch.testing.assert_close(leave_one_out(values, group), expected)


def test_kl_pg_k1_reward_gradient_is_exact_in_expectation():
    """The exact gradient of J = E[r] - beta KL(pi||pi0), by enumeration, vs the mean of many kl-pg estimates."""
    from tiltlm.exact import enumerate_space

    prior, policy, target = setup()
    with torch.no_grad():
        policy.logits.add_(0.5 * torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(2)))
    space = enumerate_space(prior)
    r = target.tilt.reward(space.samples.texts)
    policy.logits.grad = None
    logp = policy.log_prob(space.samples, grad=True).double()
    lp0 = space.logp
    j = (logp.exp() * (r - BETA * (logp - lp0))).sum()
    (-j).backward()
    exact = policy.logits.grad.clone()
    est = torch.zeros_like(exact)
    for seed in range(40):
        s = policy.sample([""], 256, seed=seed)
        logq = s.logp.double()
        lp0_s, _, r_s = target.score(s)
        policy.logits.grad = None
        loss, _ = kl_pg_loss(policy.log_prob(s, grad=True), logq, lp0_s, r_s, s.group, beta=BETA)
        loss.backward()
        est += policy.logits.grad / 40
    assert torch.nn.functional.cosine_similarity(est.flatten(), exact.flatten(), dim=0) > 0.97


def test_registry_errors():
    assert {"reinforce", "kl-pg", "ppo-kl", "dpg", "gdc++", "f-dpg"} <= set(available_algorithms())
    with pytest.raises(TiltlmError, match=r"unknown algorithm 'dpgg' \(did you mean 'dpg'\?\); available: (.*, )?dpg, dpo, f-dpg"):
        get_algorithm("dpgg")
    with pytest.raises(TiltlmError, match="did you mean 'estimator'"):
        get_algorithm("kl-pg", estimater="k3")
    with pytest.raises(TiltlmError, match="has no option 'beta'"):  # the KL coefficient is the target's beta
        get_algorithm("kl-pg", beta=0.5)


def test_kl_coefficient_is_the_targets_beta():
    from tiltlm.algorithms.kl_pg import kl_pg_loss

    prior, policy, target = setup()
    batch = _batch(policy, target)
    assert batch.beta == BETA
    logp = policy.log_prob(batch.samples, grad=True)
    for b in (BETA, 3 * BETA):
        batch.beta = b
        loss, _ = get_algorithm("kl-pg").loss(batch, logp, None)
        expected, _ = kl_pg_loss(logp, batch.logq, batch.logp_prior, batch.reward, batch.group, beta=b)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    batch.beta = None  # a target without a tilt has no beta to weigh the KL by
    with pytest.raises(TiltlmError, match="has no Tilt"):
        get_algorithm("kl-pg").loss(batch, logp, None)


def test_set_level_credit_by_hand():
    from tiltlm.algorithms.reinforce import set_credit

    texts = ["x", "y", "x", "z", "w", "v"]
    reward = torch.tensor([1.0, 0.7, 1.0, 0.2, 0.9, 0.9], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    # max: group 0 max 1.0 is tied (x twice) -> no one's marginal; group 1 tied at 0.9 -> 0
    assert set_credit(texts, reward, group, "max", 0.5).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    reward2 = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.9, 0.3], dtype=torch.float64)
    assert set_credit(texts, reward2, group, "max", 0.5).tolist() == pytest.approx([0.3, 0, 0, 0, 0.6, 0])
    # any (pass@k): only a sole correct sample matters; group 0 has three correct (>= 0.5), group 1 two
    assert set_credit(texts, reward, group, "any", 0.5).tolist() == [0, 0, 0, 0, 0, 0]
    assert set_credit(texts, reward2, group, "any", 0.5).tolist() == [0, 0, 0, 0, 1, 0]
    # distinct: correct and the only copy of its text in the set: 'x' twice -> 0, 'y' once -> 1
    assert set_credit(texts, reward, group, "distinct", 0.5).tolist() == [0, 1, 0, 0, 1, 1]


def test_distinct_set_reward_keeps_diversity_where_reinforce_collapses():
    """Correct = contains 'a' (11 of the 15 sequences): the distinct-set objective spreads almost uniformly over them."""
    prior, policy, _ = setup()
    target = Prior(prior) * Tilt("contains:a", BETA)
    rows = {}
    for name, algo in {"reinforce": {"name": "reinforce"},
                       "distinct": {"name": "reinforce", "set_reward": "distinct", "correct_threshold": 0.5}}.items():
        pol = prior.copy()
        pol.logits.requires_grad_(True)
        cfg = parse_config({"algorithm": algo, "target": {"reward": "contains:a", "beta": BETA},
                            "sampling": {"n_per_context": 16, "max_new_tokens": 3}, "optim": {"steps": 150, "lr": 0.05},
                            "metrics": {"exact_every": 150, "diversity": False}})
        rows[name] = Trainer(cfg, policy=pol, target=target).run()[-1]
    assert rows["distinct"]["entropy/exact"] > 0.9 * math.log(11)  # near-uniform over the correct sequences
    assert rows["distinct"]["entropy/exact"] > rows["reinforce"]["entropy/exact"] + 0.3
    assert rows["distinct"]["reward/exact"] > 0.95  # still correct almost always


def test_dpg_baseline_option_is_gdc_plus_plus():
    """``dpg`` uses GDC++'s baseline by default (the same gradient as ``gdc++``); ``baseline: false`` on either is plain DPG."""
    prior, policy, target = setup()
    batch = _batch(policy, target)

    def grad(name, **options):
        alg = get_algorithm(name, **options)
        alg.observe(batch)
        fn = lambda lp, tlp: alg.loss(batch, lp, tlp)  # noqa: E731
        fn.samples = batch.samples
        return _grad(policy, fn)

    torch.testing.assert_close(grad("dpg"), grad("gdc++"), rtol=0, atol=0)
    torch.testing.assert_close(grad("dpg", baseline=True), grad("gdc++"), rtol=0, atol=0)
    torch.testing.assert_close(grad("gdc++", baseline=False), grad("dpg", baseline=False), rtol=0, atol=0)
    assert not torch.allclose(grad("dpg", baseline=False), grad("gdc++"))
    assert get_algorithm("dpg").config.baseline is None  # the algorithm's own choice unless set


def test_off_policy_dpg_replaces_the_proposal_by_the_policy_after_the_update():
    """The KL-adaptive check compares q with pi as the step left it, scored on the step's batch: ``logp`` (pi at the
    step's start) is q itself right after a replacement, so a check on it would decide by rounding."""
    from tiltlm.metrics.divergences import kl_target_policy

    prior, policy, target = setup()
    batch = _batch(prior, target, n=64)
    for moved, replaced in ((+1.0, True), (-1.0, False)):  # toward p* (more mass on "a") or away from it
        alg = get_algorithm("dpg", off_policy=True, proposal_check_every=1)
        alg.proposal = prior
        alg.observe(batch)
        updated = prior.copy()
        with torch.no_grad():
            updated.logits[..., 0] += moved  # token "a"
        stats = alg.after_step(batch, updated, batch.logq)  # logp: pi at the step's start (= q here)
        after = kl_target_policy(batch.log_target, batch.logq, updated.log_prob(batch.samples).double()).value
        assert stats["dpg/kl_target_policy_is"] == pytest.approx(after, abs=1e-9)
        assert (stats["dpg/kl_target_policy_is"] < stats["dpg/kl_target_proposal_is"]) is replaced
        assert stats["dpg/proposal_updates"] == int(replaced) and (alg.proposal is not prior) is replaced
