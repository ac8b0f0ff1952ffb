"""Clip-Cov and KL-Cov (arXiv 2505.22617) against exact answers on the tabular testbed.

1. The entropy mechanism, exactly: for a small logit step the measured change of each state's entropy
   is -Cov_{a~pi(.|s)}(log pi, dz) to second order; for an exact policy-gradient step that is
   -eta·d(s)·Cov(log pi, pi·A) (vanilla PG) and -eta·Cov(log pi, A) (natural PG); the sequence
   entropy moves by -Cov_{x~pi}(log pi(x), d log pi(x)), which is NOT the visitation-weighted sum of the
   per-state changes alone (the visitation d(s) moves too).
2. The losses by hand on tiny batches.
3. Where training goes (docs/math.md §9.3): both collapse onto argmax r like reinforce; the brakes only
   keep more entropy at a fixed budget.
"""

import math

import pytest
import torch
from test_algorithms import BETA, setup  # the same exact tabular testbed

from tiltlm.algorithms import get_algorithm
from tiltlm.algorithms.base import Batch
from tiltlm.algorithms.cov import (
    batch_covariance,
    clip_cov_keep,
    kl_cov_select,
    token_covariance,
)
from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space
from tiltlm.policies import TabularPolicy
from tiltlm.policies.base import Samples
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer


def nodes(policy: TabularPolicy) -> list[str]:
    """The prefix (as text) of every node of the tabular tree, in node order."""
    free = [t for i, t in enumerate(policy.vocab) if i != policy.eos_id]
    out = []
    for d in range(policy.max_new_tokens):
        for code in range(policy.n_free**d):
            digits = [(code // policy.n_free ** (d - 1 - k)) % policy.n_free for k in range(d)]
            out.append("".join(free[j] for j in digits))
    return out


def state_entropy(z: torch.Tensor) -> torch.Tensor:
    """H(softmax(z_s)) per node, (S,)."""
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


def state_cov(z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Cov_{a~pi(.|s)}(log pi(a|s), values[s, a]) per node, (S,)."""
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return (p * logp * values).sum(-1) - (p * logp).sum(-1) * (p * values).sum(-1)


def values_by_enumeration(policy: TabularPolicy, reward):
    """d(s) (probability of reaching node s), Q(s, a) and A(s, a) = Q - V of the sequence reward, exactly."""
    space = enumerate_space(policy)
    texts, p = space.samples.texts, space.logp.exp()
    r = torch.tensor([reward(t) for t in texts], dtype=torch.float64)
    prefixes, eos = nodes(policy), policy.eos_id
    visit = torch.zeros(len(prefixes), dtype=torch.float64)
    q = torch.zeros(len(prefixes), policy.vocab_size, dtype=torch.float64)
    for s, prefix in enumerate(prefixes):
        visit[s] = sum(float(pi) for t, pi in zip(texts, p) if t.startswith(prefix))
        for a, token in enumerate(policy.vocab):
            if a == eos:
                q[s, a] = reward(prefix)
            else:
                through = [(float(pi), float(ri)) for t, pi, ri in zip(texts, p, r) if t.startswith(prefix + token)]
                q[s, a] = sum(pi * ri for pi, ri in through) / sum(pi for pi, _ in through)
    pi_s = torch.softmax(policy.logits[0].detach().double(), -1)
    advantage = q - (pi_s * q).sum(-1, keepdim=True)
    return space, visit, q, advantage


def count_a(text: str) -> float:
    return float(text.count("a"))


def test_entropy_change_of_a_state_is_minus_the_covariance_with_the_logit_step():
    """The paper's lemma for any small step dz: H(pi'(.|s)) - H(pi(.|s)) = -Cov(log pi, dz) + O(|dz|²), per state."""
    _, policy, _ = setup()
    z = policy.logits[0].detach().double()
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = []
    for eta in (1e-2, 5e-3, 2.5e-3):
        measured = state_entropy(z + eta * direction) - state_entropy(z)
        predicted = -eta * state_cov(z, direction)
        assert torch.sign(measured).eq(torch.sign(predicted)).all()
        errors.append(float((measured - predicted).abs().max()))
        assert errors[-1] < 0.02 * float(predicted.abs().max())
    # second order: halving the step quarters the error
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5


def test_policy_gradient_step_moves_state_entropy_by_minus_eta_cov_logp_pi_advantage():
    """Exact vanilla PG on the tabular logits: grad_{z_{s,a}} E[r] = d(s)·pi(a|s)·A(s,a), so
    dH(s) = -eta·d(s)·Cov(log pi, pi·A); natural PG (dz = eta·A) gives dH(s) = -eta·Cov(log pi, A)."""
    _, policy, _ = setup()
    space, visit, _, advantage = values_by_enumeration(policy, count_a)
    z = policy.logits[0].detach().double()
    pi_s = torch.softmax(z, -1)

    policy.logits.grad = None  # exact gradient of J = sum_x pi(x) r(x) by enumeration
    logp = policy.log_prob(space.samples, grad=True).double()
    r = torch.tensor([count_a(t) for t in space.samples.texts], dtype=torch.float64)
    (logp.exp() * r).sum().backward()
    grad = policy.logits.grad[0].double()
    torch.testing.assert_close(grad, visit[:, None] * pi_s * advantage, atol=1e-6, rtol=1e-5)

    eta = 1e-2
    for step, cov_values, weight in ((grad, pi_s * advantage, visit), (advantage, advantage, torch.ones_like(visit))):
        measured = state_entropy(z + eta * step) - state_entropy(z)
        predicted = -eta * weight * state_cov(z, cov_values)
        scale = float(predicted.abs().max())
        assert scale > 1e-4  # a real change, not 0 = 0
        assert float((measured - predicted).abs().max()) < 0.02 * scale, (measured, predicted)
    # the brief's form -eta·d(s)·Cov(log pi, A) is the natural-gradient one; for vanilla PG it is off
    measured = state_entropy(z + eta * grad) - state_entropy(z)
    unweighted = -eta * visit * state_cov(z, advantage)
    assert float((measured - unweighted).abs().max()) > 0.2 * float(measured.abs().max())


def test_sequence_entropy_change_is_minus_the_sequence_covariance_not_the_sum_over_states():
    """H(pi) over sequences moves by -Cov_{x~pi}(log pi(x), d log pi(x)) (first order, exact); the paper's
    per-state lemma summed with the visitation, sum_s d(s)·dH(s), misses sum_s dd(s)·H(s)."""
    _, policy, _ = setup()
    space = enumerate_space(policy)
    z = policy.logits[0].detach().double()
    r = torch.tensor([count_a(t) for t in space.samples.texts], dtype=torch.float64)

    def seq_logp(table: torch.Tensor) -> torch.Tensor:
        p2 = policy.copy()
        del p2.logits  # a plain tensor in its place, so the gradient flows back to ``table``
        p2.logits = table[None]
        return p2.log_prob(space.samples, grad=True).double()

    zp = z.clone().requires_grad_(True)
    logp = seq_logp(zp)
    (logp.exp() * r).sum().backward()
    eta = 1e-3
    step = eta * zp.grad  # one exact vanilla PG step
    jac = torch.stack([torch.autograd.grad(seq_logp(zp)[i], zp)[0] for i in range(len(space))])  # (N, S, V)
    d_logp = (jac * step).sum((1, 2))  # (N,) first-order change of log pi(x)
    with torch.no_grad():
        logp0, logp1 = seq_logp(z), seq_logp(z + step)
        p0 = logp0.exp()
        measured = float(-(logp1.exp() * logp1).sum() + (p0 * logp0).sum())
        predicted = -float((p0 * logp0 * d_logp).sum() - (p0 * logp0).sum() * (p0 * d_logp).sum())
        assert measured == pytest.approx(predicted, rel=2e-3)
        assert abs(measured) > 1e-4  # a real change (here the entropy rises: pi0 puts little mass on 'a')

        # chain rule H(pi) = sum_s d(s) H(s), exactly; the per-state term alone is not the sequence change
        prefixes, texts = nodes(policy), space.samples.texts
        visit0, visit1 = ([float(sum(p[i] for i, t in enumerate(texts) if t.startswith(s))) for s in prefixes]
                          for p in (p0, logp1.exp()))
        visit0, visit1 = torch.tensor(visit0, dtype=torch.float64), torch.tensor(visit1, dtype=torch.float64)
        assert float((visit0 * state_entropy(z)).sum()) == pytest.approx(-float((p0 * logp0).sum()), abs=1e-12)
        per_state = float((visit0 * (state_entropy(z + step) - state_entropy(z))).sum())
        visitation = float(((visit1 - visit0) * state_entropy(z + step)).sum())
        assert per_state + visitation == pytest.approx(measured, rel=1e-9)
        assert abs(visitation) > 0.05 * abs(measured)


# ---- 2. the losses by hand ----------------------------------------------------------------------------

def hand_batch(policy, texts: list[str], reward: list[float]) -> Batch:
    """A batch of the given texts (one context) scored with the given rewards."""
    vocab = policy.vocab
    width = max(len(t) + (len(t) < policy.max_new_tokens) for t in texts)
    ids = torch.full((len(texts), width), policy.eos_id)
    mask = torch.zeros((len(texts), width), dtype=torch.bool)
    for i, t in enumerate(texts):
        row = [vocab.index(c) for c in t] + ([policy.eos_id] if len(t) < policy.max_new_tokens else [])
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    b = len(texts)
    s = Samples(contexts=[""], group=torch.zeros(b, dtype=torch.long), context_ids=torch.zeros((b, 0), dtype=torch.long),
                context_attn=torch.zeros((b, 0), dtype=torch.bool), ids=ids, attn=mask.clone(), mask=mask,
                token_logp=torch.zeros((b, width)), texts=texts)
    s.token_logp = policy.log_prob(s, per_token=True).detach()
    zeros = torch.zeros(b, dtype=torch.float64)
    return Batch(samples=s, logq=s.logp.double(), token_logq=s.token_logp, logp_prior=zeros, log_target=zeros,
                 reward=torch.tensor(reward, dtype=torch.float64), beta=BETA)


def test_token_covariance_by_hand():
    token_logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -2.0])
    # tokens: (log pi, A) = (-1, 1), (-2, 1), (-3, -2); means -2 and 0
    expected = torch.tensor([[1.0 * 1.0, 0.0 * 1.0], [-1.0 * -2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(token_covariance(token_logp, adv, mask), expected)
    assert batch_covariance(token_logp, adv, mask) == pytest.approx(3.0 / 3)


def test_clip_cov_and_kl_cov_selection_by_hand():
    cov = torch.tensor([[0.5, 2.0, 3.0], [4.0, 6.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # 5 tokens; 9.0 is padding
    gen = torch.Generator().manual_seed(0)
    keep = clip_cov_keep(cov, mask, ratio=0.4, low=1.0, high=5.0, generator=gen)  # floor(0.4·5) = 2 of the band {2, 3, 4}
    dropped = mask & ~keep
    assert int(dropped.sum()) == 2 and bool((cov[dropped] > 1).all() and (cov[dropped] < 5).all())
    keep = clip_cov_keep(cov, mask, ratio=1e-4, low=1.0, high=5.0, generator=gen)  # at least one
    assert int((mask & ~keep).sum()) == 1
    keep = clip_cov_keep(cov, mask, ratio=1.0, low=10.0, high=20.0, generator=gen)  # nobody in the band
    assert torch.equal(keep, mask)
    selected = kl_cov_select(cov, mask, top_k=0.4)  # top 2 by Cov among the 5 tokens: 6.0 and 4.0 (9.0 is padding)
    assert torch.equal(selected, torch.tensor([[False, False, False], [True, True, False]]))
    assert torch.equal(kl_cov_select(cov, mask, top_k=1e-4), torch.tensor([[False, False, False], [False, True, False]]))


def _grad(policy, algo, batch):
    policy.logits.grad = None
    token_logp = policy.log_prob(batch.samples, grad=True, per_token=True)
    loss, stats = algo.loss(batch, token_logp.sum(-1), token_logp)
    loss.backward()
    return policy.logits.grad.clone(), stats


def test_clip_cov_gradient_by_hand():
    """-(1/B) sum_i A_i sum_{t kept} grad log pi_t: the dropped tokens' terms are exactly what is missing."""
    _, policy, _ = setup()
    batch = hand_batch(policy, ["aaa", "a", "b", "bb", "ab", ""], [3, 1, 0, 0, 1, 0])
    algo = get_algorithm("clip-cov", clip_ratio=0.2, cov_low=0.0, cov_high=100.0)  # floor(0.2·14) = 2 of the 14 tokens dropped
    g_clip, stats = _grad(policy, algo, batch)
    g_full, _ = _grad(policy, get_algorithm("reinforce"), batch)
    adv = batch.reward - (batch.reward.sum() - batch.reward) / (len(batch) - 1)  # leave-one-out by hand
    cov = token_covariance(batch.token_logq, adv, batch.samples.mask)
    keep = clip_cov_keep(cov, batch.samples.mask, 0.2, 0.0, 100.0, torch.Generator().manual_seed(0))  # the step-0 draw
    dropped = (batch.samples.mask & ~keep).nonzero().tolist()
    assert len(dropped) == 2 and stats["loss/cov_selected_fraction"] == pytest.approx(2 / 14)
    missing = torch.zeros_like(g_full)
    for i, t in dropped:
        policy.logits.grad = None
        policy.log_prob(batch.samples, grad=True, per_token=True)[i, t].backward()
        missing -= float(adv[i]) * policy.logits.grad / len(batch)  # that token's term of reinforce's gradient
    torch.testing.assert_close(g_clip, g_full - missing, atol=1e-6, rtol=1e-5)
    assert stats["entropy/cov_logp_adv"] == pytest.approx(float(cov.sum() / 14))


def test_kl_cov_first_pass_is_reinforce_and_later_passes_pull_the_selected_tokens_back():
    _, policy, _ = setup()
    batch = hand_batch(policy, ["aaa", "a", "b", "bb", "ab", ""], [3, 1, 0, 0, 1, 0])
    algo = get_algorithm("kl-cov", top_k=0.2, kl_coef=0.7)  # floor(0.2·14) = 2 tokens
    g_kl, _ = _grad(policy, algo, batch)
    g_pg, _ = _grad(policy, get_algorithm("reinforce"), batch)
    torch.testing.assert_close(g_kl, g_pg, atol=1e-6, rtol=1e-5)  # grad |log pi - log pi_old| = 0 at pi = pi_old

    with torch.no_grad():  # a later pass: pi has moved
        policy.logits.add_(0.1 * torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(1)))
    g_kl, stats = _grad(policy, algo, batch)
    g_free, _ = _grad(policy, get_algorithm("kl-cov", top_k=0.2, kl_coef=0.0), batch)
    token_logp = policy.log_prob(batch.samples, per_token=True)
    adv = batch.reward - (batch.reward.sum() - batch.reward) / (len(batch) - 1)
    selected = kl_cov_select(token_covariance(batch.token_logq, adv, batch.samples.mask), batch.samples.mask, 0.2)
    expected = torch.zeros_like(g_kl)
    for i, t in selected.nonzero().tolist():
        policy.logits.grad = None
        policy.log_prob(batch.samples, grad=True, per_token=True)[i, t].backward()
        expected += 0.7 * float(torch.sign(token_logp[i, t] - batch.token_logq[i, t])) * policy.logits.grad / len(batch)
    torch.testing.assert_close(g_kl - g_free, expected, atol=1e-6, rtol=1e-5)
    assert expected.abs().sum() > 0 and stats["loss/cov_kl"] > 0


def test_options_are_checked():
    with pytest.raises(TiltlmError, match="cov_low"):
        get_algorithm("clip-cov", cov_low=5.0, cov_high=1.0)
    with pytest.raises(TiltlmError, match="top_k"):
        get_algorithm("kl-cov", top_k=0.0)


# ---- 3. where training goes ---------------------------------------------------------------------------

def train(algorithm: dict, steps: int, n: int = 64):
    _, policy, target = setup()
    config = parse_config({
        "algorithm": algorithm, "target": {"reward": "count:a", "beta": BETA},
        "sampling": {"n_per_context": n, "max_new_tokens": 3}, "seed": 0,
        "optim": {"steps": steps, "lr": 0.05, "schedule": "constant", "minibatch_size": None},  # one update (x epochs) per batch, as measured
        "metrics": {"exact_every": steps, "diversity": False},
    })
    rows = Trainer(config, policy=policy, target=target).run()
    space = enumerate_space(policy)
    kl_to_collapse = -float(space.logp[space.samples.texts.index("aaa")])  # KL(delta_aaa || pi) = -log pi(aaa)
    return rows[-1], kl_to_collapse


def test_both_collapse_onto_argmax_r_like_reinforce():
    """The fixed point is the point mass on argmax r ('aaa'), not p*: KL(delta_aaa||pi) < 0.01 while
    KL(pi||p*) -> -log p*(aaa) = 2.79 nats (p* itself has entropy 2.2 nats here)."""
    for algorithm, steps in (({"name": "clip-cov"}, 300), ({"name": "kl-cov"}, 300),
                             ({"name": "clip-cov", "clip_ratio": 0.3}, 1000)):  # a brake 1500x the paper's still collapses
        last, kl_to_collapse = train(algorithm, steps)
        assert kl_to_collapse < 0.01, (algorithm, last)
        assert last["kl/policy_target_exact"] > 2.6 and last["entropy/exact"] < 0.05, (algorithm, last)
        assert math.isfinite(last["entropy/cov_logp_adv"])


def test_the_brakes_keep_more_entropy_at_a_fixed_budget():
    """300 steps x 64 samples: more entropy than the same update without the brake, and still collapsing."""
    reinforce, _ = train({"name": "reinforce"}, 300)
    clip_cov, _ = train({"name": "clip-cov", "clip_ratio": 0.1}, 300)
    assert clip_cov["entropy/exact"] > 3 * reinforce["entropy/exact"]  # 0.146 vs 0.040 nats
    no_brake, _ = train({"name": "kl-cov", "kl_coef": 0.0}, 300)  # 4 unpenalised passes per batch
    kl_cov, _ = train({"name": "kl-cov", "top_k": 0.3}, 300)
    assert kl_cov["entropy/exact"] > 3 * no_brake["entropy/exact"]  # 0.017 vs 0.005 nats
    for row in (clip_cov, kl_cov):
        assert row["entropy/exact"] < 0.2 and row["reward/exact"] > 2.95  # a brake, not a stop


def test_clip_cov_draws_resume_from_the_state_dict():
    algo = get_algorithm("clip-cov")
    algo.after_step(None, None, None)
    again = get_algorithm("clip-cov")
    again.load_state_dict(algo.state_dict())
    assert again.steps == algo.steps == 1
