"""FlowRL / trajectory balance against its fixed points on exact tabular testbeds (docs/math.md §7).

The space: tokens {a, b, <eos>}, at most 3 new tokens (15 sequences of lengths 1, 2, 3);
p*(y|x) ∝ pi0(y|x)·exp(count_a(y)/beta). Every distribution is computed by enumeration.

- the residual, the loss, its gradient and the log Z table's step, by hand on a tiny batch;
- the exact on-policy expected gradient of TB is 2·grad KL(pi || p*) for any log Z;
- unnormalised TB reaches p* (one prompt, and three prompts each with its own learned log Z(x));
- length-normalised TB reaches the predicted length tilt pi0·exp(|y|(r/beta − c)), ~1 nat from p*;
- the table is bounded, JSON round-trips, and a resumed run equals the uninterrupted one.
"""

import json
import math

import pytest
import torch

from tiltlm.algorithms import get_algorithm
from tiltlm.algorithms.base import Batch
from tiltlm.algorithms.dpg import context_key
from tiltlm.algorithms.flowrl import length_normalized_fixed_point, tb_terms
from tiltlm.errors import TiltlmError
from tiltlm.exact import kl
from tiltlm.metrics.batch import exact_for_context
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

VOCAB = list("ab") + ["<eos>"]
BETA = 1.0


def make_testbed(contexts=("",), biases=(0.0,)):
    """pi0 random per context, with ``biases`` added to token a's logit (so log Z(x) differs per context)."""
    prior = TabularPolicy.random(VOCAB, max_new_tokens=3, seed=0, scale=1.0, contexts=contexts)
    with torch.no_grad():
        for c, bias in enumerate(biases):
            prior.logits[c, :, VOCAB.index("a")] += bias
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    return prior, policy, Prior(prior) * Tilt("count:a", BETA)


def train(algorithm: dict, steps: int, *, contexts=("",), biases=(0.0,), n: int = 64, lr: float = 0.05):
    _, policy, target = make_testbed(contexts, biases)
    config = parse_config({
        "algorithm": algorithm, "target": {"reward": "count:a", "beta": BETA},
        "sampling": {"contexts": list(contexts), "n_per_context": n, "max_new_tokens": 3}, "seed": 0,
        "optim": {"steps": steps, "lr": lr, "schedule": "linear", "minibatch_size": None},  # one update per batch, as measured
        "metrics": {"exact_every": steps, "diversity": False},
    })
    trainer = Trainer(config, policy=policy, target=target)
    rows = trainer.run()
    return rows[-1], trainer, policy, target


def exact(target, context=""):
    """(ExactMetrics of the context, log phi = r/beta per sequence, |y| per sequence)."""
    ex = exact_for_context(target, context, max_new_tokens=3)
    return ex, ex.log_target + ex.log_z - ex.log_prior, ex.space.samples.lengths


# -- by hand ---------------------------------------------------------------------------------------------------


def hand_batch(contexts=("x", "y"), n=2):
    """Rows grouped by context; log pi0, r, log q chosen by hand; beta = 0.5 so log phi = 2r."""
    prior = TabularPolicy(VOCAB, max_new_tokens=3, contexts=contexts)
    s = prior.sample(list(contexts), n, seed=2)  # lengths 3, 1, 3, 2
    b = len(s)
    lp0 = torch.tensor([-1.0, -2.0, -3.0, -0.5][:b], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 2.0, 0.5][:b], dtype=torch.float64)
    logq = torch.tensor([-1.5, -1.0, -2.0, -1.0][:b], dtype=torch.float64)
    return Batch(samples=s, logq=logq, token_logq=s.token_logp, logp_prior=lp0, log_target=lp0 + r / 0.5,
                 reward=r, beta=0.5)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_loss_gradient_and_log_z_step_by_hand(length_normalize):
    batch = hand_batch()
    lengths = batch.samples.lengths.double()
    assert batch.group.tolist() == [0, 0, 1, 1] and lengths.tolist() == [3, 1, 3, 2]
    logq, lp0, r = batch.logq, batch.logp_prior, batch.reward
    scale = lengths if length_normalize else torch.ones(4, dtype=torch.float64)
    terms = (logq - lp0) / scale - r / 0.5  # delta − log Z, by hand
    # learned: a new context starts at −mean(terms) of its rows
    alg = get_algorithm("flowrl", length_normalize=length_normalize, log_z_lr=0.25)
    alg.observe(batch)
    z0 = [-(terms[0] + terms[1]) / 2, -(terms[2] + terms[3]) / 2]
    assert [alg.table[context_key(c)] for c in ("x", "y")] == pytest.approx([float(z) for z in z0], abs=1e-12)
    logp = logq.clone().float().requires_grad_(True)  # on-policy: log pi = log q at sampling
    loss, _ = alg.loss(batch, logp, None)
    delta = torch.tensor([z0[0], z0[0], z0[1], z0[1]], dtype=torch.float64) + terms
    assert float(loss.detach()) == pytest.approx(float((delta**2).mean()), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad.double(), 2 * delta / 4 / scale, atol=1e-6, rtol=1e-5)  # d/dlog pi (δ²)/B
    # the table's step at the pre-step policy: log Z ← log Z − lr·mean(δ); here mean(δ) = 0 (just initialised)
    alg.after_step(batch, None, logq)
    assert [alg.table[context_key(c)] for c in ("x", "y")] == pytest.approx([float(z) for z in z0], abs=1e-12)
    # a second batch under a moved policy: mean(δ) = 0.3 per row, so log Z falls by 0.25·0.3
    alg.after_step(batch, None, logq + 0.3 * scale)
    assert [alg.table[context_key(c)] for c in ("x", "y")] == pytest.approx([float(z) - 0.25 * 0.3 for z in z0], abs=1e-9)
    # batch: each row's log Z is the leave-one-out closed form −terms of its context's other row
    alg = get_algorithm("flowrl", length_normalize=length_normalize, log_z="batch")
    loss, _ = alg.loss(batch, logq.float(), None)
    loo = -terms[[1, 0, 3, 2]]
    assert float(loss.detach()) == pytest.approx(float(((loo + terms) ** 2).mean()), rel=1e-6)


def test_table_is_bounded_and_round_trips():
    alg = get_algorithm("flowrl", log_z_max_contexts=2)
    for contexts in (("x", "y"), ("z",), ("x",)):
        batch = hand_batch(contexts)
        alg.observe(batch)
        alg.after_step(batch, None, batch.logq)
    state = json.loads(json.dumps(alg.state_dict()))
    assert [k for k, _ in state["log_z"]] == [context_key("z"), context_key("x")]  # y, the least recently seen, dropped
    again = get_algorithm("flowrl", log_z_max_contexts=2)
    again.load_state_dict(state)
    assert again.table == alg.table


def test_options_and_zero_mass_targets_fail_in_one_line():
    with pytest.raises(TiltlmError, match="log_z_lr"):
        get_algorithm("flowrl", log_z_lr=0.0)
    with pytest.raises(TiltlmError, match="did you mean 'length_normalize'"):
        get_algorithm("flowrl", length_normalise=True)
    batch = hand_batch()
    batch.log_target[1] = -math.inf
    with pytest.raises(TiltlmError, match="use dpg"):
        get_algorithm("flowrl").loss(batch, batch.logq.float(), None)


# -- exact expected gradients ----------------------------------------------------------------------------------


def expected_tb_gradient(policy, target, log_z: float, *, length_normalize: bool) -> torch.Tensor:
    """grad_theta of sum_y sg(pi(y)) δ(y)²: the exact on-policy expectation of the TB gradient."""
    ex, log_phi, lengths = exact(target)
    policy.logits.grad = None
    log_pi = policy.log_prob(ex.space.samples, grad=True).double()
    delta = log_z + tb_terms(log_pi, ex.log_prior, ex.log_prior + log_phi, lengths, length_normalize=length_normalize)
    (log_pi.detach().exp() * delta**2).sum().backward()
    return policy.logits.grad.clone()


def test_on_policy_tb_gradient_is_twice_the_reverse_kl_gradient_for_any_log_z():
    _, policy, target = make_testbed()
    with torch.no_grad():
        policy.logits.add_(torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(1)))
    ex, _, _ = exact(target)
    policy.logits.grad = None
    log_pi = policy.log_prob(ex.space.samples, grad=True).double()
    (log_pi.exp() * (log_pi - ex.log_target)).sum().backward()  # KL(pi || p*)
    kl_grad = policy.logits.grad.clone()
    for log_z in (-3.0, ex.log_z, 2.5):  # log Z is only a baseline
        torch.testing.assert_close(expected_tb_gradient(policy, target, log_z, length_normalize=False), 2 * kl_grad,
                                   atol=1e-5, rtol=1e-4)
    assert kl_grad.abs().max() > 0.01


def test_length_tilt_is_the_stationary_point_of_normalised_tb_and_p_star_is_not():
    """At pi_n (with log Z = c) every normalised residual is 0 and the exact expected gradient vanishes; at p*
    (with log Z at its own optimum, −E_pi[terms]) it does not."""
    _, policy, target = make_testbed()
    ex, log_phi, lengths = exact(target)
    log_pi_n, c = length_normalized_fixed_point(ex.log_prior, log_phi, lengths)
    torch.testing.assert_close(log_pi_n.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    residual = c + (log_pi_n - ex.log_prior) / lengths - log_phi
    assert residual.abs().max() < 1e-9
    for log_pi, log_z, stationary in ((log_pi_n, c, True), (ex.log_target, None, False)):
        sequence_logits = policy_with(policy, ex, log_pi)
        if log_z is None:
            terms = (log_pi - ex.log_prior) / lengths - log_phi
            log_z = float(-(log_pi.exp() * terms).sum())
        grad = expected_tb_gradient(sequence_logits, target, log_z, length_normalize=True)
        # float32 logits: the fit leaves a gradient of ~1e-5 at pi_n (1.7e-5 on an AVX-512 CPU); at p* it is 0.17
        assert (grad.abs().max() < 1e-4) == stationary, grad.abs().max()


def policy_with(policy, ex, log_pi: torch.Tensor):
    """A tabular policy whose sequence distribution is ``log_pi`` (fit by exact maximum likelihood; 15 sequences)."""
    fitted = policy.copy()
    opt = torch.optim.LBFGS([fitted.logits], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(log_pi.exp() * fitted.log_prob(ex.space.samples, grad=True).double()).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert kl(log_pi, ex.space.log_prob(fitted)) < 1e-10
    return fitted


# -- training with the real loop ---------------------------------------------------------------------------------


def test_tb_reaches_p_star_and_log_z():
    last, trainer, _, _ = train({"name": "flowrl"}, 200)
    assert last["kl/policy_target_exact"] < 0.01, last
    assert last["kl/target_exact"] < 0.01, last
    (log_z,) = trainer.algorithm.table.values()
    assert abs(log_z - last["log_z/exact"]) < 0.02  # log Z converges to log Z* − KL(pi || p*) ≈ log Z*


def test_tb_per_prompt_log_z_reaches_each_prompts_p_star():
    contexts, biases = ("c0", "c1", "c2"), (1.5, 0.0, -2.0)
    last, trainer, _, target = train({"name": "flowrl"}, 200, contexts=contexts, biases=biases, n=32)
    assert last["kl/policy_target_exact_max"] < 0.01, last
    for context in contexts:
        true = exact(target, context)[0].log_z
        assert abs(trainer.algorithm.table[context_key(context)] - true) < 0.03, (context, true)
    spread = [exact(target, c)[0].log_z for c in contexts]
    assert max(spread) - min(spread) > 1.0  # one log Z for all would be far from each


@pytest.mark.parametrize("log_z", ["learned", "batch"])
def test_length_normalised_tb_reaches_the_length_tilt_not_p_star(log_z):
    last, trainer, policy, target = train({"name": "flowrl", "length_normalize": True, "log_z": log_z}, 300)
    ex, log_phi, lengths = exact(target)
    log_pi_n, c = length_normalized_fixed_point(ex.log_prior, log_phi, lengths)
    log_pi = ex.space.log_prob(policy)
    assert kl(log_pi, log_pi_n) < 0.01 and kl(log_pi_n, log_pi) < 0.01
    predicted_gap = kl(log_pi_n, ex.log_target)  # ~0.99 nats on this testbed
    assert predicted_gap > 0.5
    assert abs(last["kl/policy_target_exact"] - predicted_gap) < 0.05, last
    if log_z == "learned":
        (learned,) = trainer.algorithm.table.values()
        assert abs(learned - c) < 0.05 and abs(c - ex.log_z) > 0.5  # log Z → c, not log Z*


def test_resume_equals_the_uninterrupted_run(tmp_path):
    contexts, biases = ("c0", "c1"), (1.0, -1.0)

    def config(steps):
        return parse_config({
            "algorithm": {"name": "flowrl", "length_normalize": True}, "target": {"reward": "count:a", "beta": BETA},
            "sampling": {"contexts": list(contexts), "n_per_context": 8, "max_new_tokens": 3}, "seed": 0,
            "optim": {"steps": steps, "lr": 0.05}, "metrics": {"exact_every": 0, "diversity": False},
            "checkpoint": {"every": 1},
        })

    _, policy, target = make_testbed(contexts, biases)
    full = Trainer(config(6), policy=policy, target=target, out_dir=tmp_path / "full")
    full.run()
    _, policy2, target2 = make_testbed(contexts, biases)
    cut = Trainer(config(6), policy=policy2, target=target2, out_dir=tmp_path / "cut")
    for _ in range(3):
        cut.train_step()
    _, policy3, target3 = make_testbed(contexts, biases)
    resumed = Trainer(config(6), policy=policy3, target=target3, out_dir=tmp_path / "cut", resume=True)
    assert resumed.algorithm.state_dict() == cut.algorithm.state_dict()
    resumed.run()
    assert resumed.algorithm.state_dict() == full.algorithm.state_dict()
    assert len(full.algorithm.table) == 2
    torch.testing.assert_close(policy3.logits, policy.logits, atol=0, rtol=0)


def test_unnormalised_tb_with_leave_one_out_log_z_is_kl_pg_times_two_over_beta():
    """log_z: batch gives delta_i = u_i − mean_{j≠i} u_j with u = log pi − log pi0 − r/beta, and kl-pg's advantage
    (k1 in the reward, leave-one-out baseline) is A_i = −beta·delta_i: the same gradient up to 2/beta, sample by sample."""
    beta = 0.5
    prior, policy, _ = make_testbed(("x", "y"), (0.5, -0.5))
    target = Prior(prior) * Tilt("count:a", beta)
    with torch.no_grad():
        policy.logits.add_(torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(1)))
    s = policy.sample(["x", "y"], 16, seed=0)
    scores = target.score(s)
    batch = Batch(samples=s, logq=s.logp.double(), token_logq=s.token_logp, logp_prior=scores.logp_prior,
                  log_target=scores.log_target, reward=scores.reward, beta=target.beta)
    grads = []
    for alg in (get_algorithm("flowrl", log_z="batch"), get_algorithm("kl-pg")):
        policy.logits.grad = None
        token_logp = policy.log_prob(s, grad=True, per_token=True)
        alg.loss(batch, token_logp.sum(-1), token_logp)[0].backward()
        grads.append(policy.logits.grad.clone())
    torch.testing.assert_close(grads[0], 2 / beta * grads[1], atol=1e-6, rtol=1e-5)
    assert grads[1].abs().max() > 1e-3
