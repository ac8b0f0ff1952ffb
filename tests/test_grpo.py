"""GRPO and its variants (tiltlm.algorithms.grpo) against the fixed points worked out in docs/math.md §11.

Exact tabular testbeds: tokens {a, b, <eos>}, at most 3 new tokens (15 sequences per context),
reward r = count of a, target p*(y|x) ∝ pi0(y|x)·exp(r/beta). Every predicted distribution below is
computed in closed form on the enumerated space (a 1-D root or a backward pass over the token tree),
and the trained policy is compared with it exactly. G is the group size (sampling.n_per_context);
beta' = beta·G/(G − 1) because GRPO's group mean includes the sample itself.
"""

import itertools

import pytest
import torch

from tiltlm.algorithms import get_algorithm
from tiltlm.algorithms.base import Batch
from tiltlm.algorithms.grpo import aggregate, group_advantages
from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, kl, normalise
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

VOCAB = list("ab") + ["<eos>"]


def make_testbed(contexts=("c0",), biases=(0.0,)):
    """A random tabular pi0 per context; ``biases`` added to token a's logit shift each prompt's reward spread."""
    prior = TabularPolicy.random(VOCAB, max_new_tokens=3, seed=0, scale=1.0, contexts=contexts)
    with torch.no_grad():
        for c, bias in enumerate(biases):
            prior.logits[c, :, VOCAB.index("a")] += bias
    prior.logits.requires_grad_(False)
    return prior


def train(algorithm: dict, steps: int, *, beta: float, n: int, contexts=("c0",), biases=(0.0,), lr=0.05):
    prior = make_testbed(contexts, biases)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    config = parse_config({
        "algorithm": algorithm, "target": {"reward": "count:a", "beta": beta},
        "sampling": {"contexts": list(contexts), "n_per_context": n, "max_new_tokens": 3}, "seed": 0,
        "optim": {"steps": steps, "lr": lr, "schedule": "linear", "minibatch_size": None},  # one update per batch, as measured
        "metrics": {"exact_every": steps, "diversity": False},
    })
    Trainer(config, policy=policy, target=Prior(prior) * Tilt("count:a", beta)).run()
    return policy, prior


def space_of(prior, context="c0"):
    """(space, log pi0, r, lengths) of one context, float64."""
    space = enumerate_space(prior, context=context)
    reward = torch.tensor([t.count("a") for t in space.samples.texts], dtype=torch.float64)
    return space, space.logp, reward, space.samples.mask.sum(-1).double()


def std_of(log_p, values):
    p = log_p.exp()
    return float((p * (values - (p * values).sum()) ** 2).sum().sqrt())


def forward_kl_projection(log_pi0: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """Stationary point of E_pi[q] − beta·KL(pi0 || pi) on the simplex: pi = beta·pi0/(lambda − q), lambda in
    (max q, max q + beta] normalising (bisection). Returns log pi."""
    lo, hi = float(q.max()), float(q.max()) + beta
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((beta * log_pi0.exp() / (mid - q)).sum()) > 1 else (lo, mid)
    pi = beta * log_pi0.exp() / (hi - q)
    return (pi / pi.sum()).log()


def per_token_forward_kl(prior, context: str, beta: float) -> torch.Tensor:
    """Per-token k3 in the loss with equal token weights: at every node h, pi(.|h) = forward_kl_projection(pi0(.|h),
    Q(h, .), beta), Q(h, a) = r of the finished sequence or V(child) = E_pi[r | child], backed up from depth L − 1.
    Returns log pi of every sequence of the context's space (its order)."""
    c, n, L, eos = prior.contexts.index(context), prior.n_free, prior.max_new_tokens, prior.eos_id
    free = [i for i in range(prior.vocab_size) if i != eos]
    table, value = torch.zeros(prior.logits.shape[1:], dtype=torch.float64), {}
    for d in reversed(range(L)):
        for code, prefix in enumerate(itertools.product(range(n), repeat=d)):
            text = "".join(prior.vocab[free[j]] for j in prefix)
            q = torch.tensor([float(text.count("a")) if a == eos else
                              float((text + prior.vocab[a]).count("a")) if d == L - 1 else value[d + 1, code * n + free.index(a)]
                              for a in range(prior.vocab_size)], dtype=torch.float64)
            node = prior.offsets[d] + code
            table[node] = forward_kl_projection(torch.log_softmax(prior.logits[c, node].double(), -1), q, beta)
            value[d, code] = float((table[node].exp() * q).sum())
    solution = prior.copy()
    with torch.no_grad():
        solution.logits[c] = table.float()
    return enumerate_space(prior, context=context).log_prob(solution)


# ---- by hand ---------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    reward = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0])
    group = torch.tensor([0, 0, 1, 1, 2])
    torch.testing.assert_close(group_advantages(reward, group, scale_std=False),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    # group 0: mean 2, std (G − 1) = sqrt(2); equal rewards and a group of one: advantage 0
    s = 2**0.5 + 1e-4
    torch.testing.assert_close(group_advantages(reward, group, scale_std=True),
                               torch.tensor([-1 / s, 1 / s, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_aggregations_weigh_tokens_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert float(aggregate(per_token, mask, "sequence")) == pytest.approx((6 / 3 + 4 / 1) / 2)  # GRPO
    assert float(aggregate(per_token, mask, "token")) == pytest.approx(10 / 4)  # DAPO
    assert float(aggregate(per_token, mask, "constant")) == pytest.approx(10 / (2 * 3))  # Dr. GRPO, L = width
    assert float(aggregate(per_token, mask, "constant", max_length=5)) == pytest.approx(10 / (2 * 5))


def test_loss_by_hand_at_ratio_one():
    """First epoch (rho = 1): the surrogate's value is −sum_i w_i·A_i·|y_i|, the k3 term beta·sum w·k3(l_t)."""
    prior = make_testbed()
    s = prior.sample(["c0"], 4, seed=0)
    reward = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    token_prior = s.token_logp - 0.5 * s.mask  # l_t = −0.5 on every policy token
    batch = Batch(samples=s, logq=s.logp.double(), token_logq=s.token_logp, logp_prior=token_prior.sum(-1).double(),
                  log_target=reward, reward=reward, token_logp_prior=token_prior, beta=2.0)
    algo = get_algorithm("grpo", scale_std=False, aggregation="token")
    loss, stats = algo.loss(batch, s.logp, s.token_logp)
    adv = reward - reward.mean()
    lengths = s.mask.sum(-1).double()
    k3 = torch.expm1(torch.tensor(-0.5)) + 0.5
    expected = (-(adv * lengths).sum() + 2.0 * k3 * lengths.sum()) / lengths.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert stats["loss/clip_fraction"] == 0.0
    with pytest.raises(TiltlmError, match="per-token log pi0"):
        algo.loss(Batch(**{**batch.__dict__, "token_logp_prior": None}), s.logp, s.token_logp)


def test_variants_are_presets_and_explicit_options_win():
    grpo, dr, dapo = (get_algorithm("grpo", variant=v).config for v in ("grpo", "dr-grpo", "dapo"))
    assert (grpo.scale_std, grpo.aggregation, grpo.clip_high, grpo.kl_in, grpo.estimator) == (True, "sequence", 0.2, "loss", "k3")
    assert (dr.scale_std, dr.aggregation, dr.kl_in) == (False, "constant", "loss")
    assert (dapo.scale_std, dapo.aggregation, dapo.clip_high, dapo.kl_in) == (True, "token", 0.28, "none")
    assert get_algorithm("grpo", variant="dapo", clip_high=0.3, kl_in="reward").config.estimator == "k1"
    with pytest.raises(TiltlmError, match="did you mean 'scale_std'"):
        get_algorithm("grpo", scale_sdt=False)


# ---- where each combination converges --------------------------------------------------------------

def test_per_token_k3_in_the_loss_converges_to_the_forward_kl_projection_at_beta_prime():
    """Dr. GRPO (no std, constant aggregation, k3 per token in the loss), G = 4: the node-wise forward-KL projection
    at beta' = beta·4/3 — not p*, and not the same projection at beta (the group mean's (G − 1)/G is real)."""
    beta, g = 0.5, 4
    policy, prior = train({"name": "grpo", "variant": "dr-grpo"}, 3000, beta=beta, n=g)
    space, log_pi0, reward, _ = space_of(prior)
    log_pi, (log_star, _) = space.log_prob(policy), normalise(log_pi0 + reward / beta)
    predicted = per_token_forward_kl(prior, "c0", beta * g / (g - 1))
    assert kl(log_pi, predicted) < 0.01
    assert kl(log_pi, per_token_forward_kl(prior, "c0", beta)) > 0.04
    assert kl(log_pi, log_star) > 0.05


def test_sequence_k3_in_the_loss_converges_to_beta_pi0_over_lambda_minus_r():
    """kl_level sequence (kl-pg's k3 in the loss): pi(y) = beta'·pi0(y)/(lambda − r(y)), the forward-KL stationary point."""
    beta, g = 0.5, 8
    policy, prior = train({"name": "grpo", "variant": "dr-grpo", "kl_level": "sequence"}, 1500, beta=beta, n=g)
    space, log_pi0, reward, _ = space_of(prior)
    log_pi, (log_star, _) = space.log_prob(policy), normalise(log_pi0 + reward / beta)
    predicted = forward_kl_projection(log_pi0, reward, beta * g / (g - 1))
    assert kl(log_pi, predicted) < 0.01
    assert kl(log_pi, log_star) > 0.05


CONTEXTS, BIASES = ("c0", "c1", "c2"), (2.0, 0.0, -2.0)


def self_consistent_tilt(log_pi0, reward, beta_prime):
    """pi ∝ pi0·exp(r/(beta'·sigma)), sigma = the std of r under that pi itself (damped fixed-point iteration)."""
    sigma = 1.0
    for _ in range(1000):
        log_pi, _ = normalise(log_pi0 + reward / (beta_prime * (sigma + 1e-4)))
        sigma, last = 0.5 * sigma + 0.5 * std_of(log_pi, reward), sigma
        if abs(sigma - last) < 1e-12:
            break
    return log_pi, sigma


def test_std_scaling_gives_each_prompt_the_coefficient_beta_sigma_x():
    """Three prompts with different reward spreads; the KL in the loss (sequence k2: the exact reverse-KL gradient)
    and the advantage divided by the group's std: prompt x converges to pi0·exp(r/(beta'·sigma_x)) with sigma_x
    self-consistent, not to p*(.|x)."""
    beta, g = 1.0, 64
    options = {"name": "grpo", "aggregation": "token", "kl_level": "sequence", "kl_estimator": "k2"}  # scale_std: GRPO's
    policy, prior = train(options, 600, beta=beta, n=g, contexts=CONTEXTS, biases=BIASES)
    sigmas = []
    for context in CONTEXTS:
        space, log_pi0, reward, _ = space_of(prior, context)
        log_pi, (log_star, _) = space.log_prob(policy), normalise(log_pi0 + reward / beta)
        predicted, sigma = self_consistent_tilt(log_pi0, reward, beta * g / (g - 1))
        sigmas.append(sigma)
        assert kl(log_pi, predicted) < 0.01, context
        if context == "c0":  # the narrowest spread: the strongest pull past p*
            assert kl(log_pi, log_star) > 0.03
    assert max(sigmas) / min(sigmas) > 1.5  # the prompts really are weighted differently


def length_tilt(log_pi0, reward, lengths, beta, g):
    """Sequence-mean aggregation, KL in the loss: pi ∝ pi0·exp((c·(r − E_pi r) − k·|y|)/beta), c = (G − 1)/G,
    k the normaliser (bisection), E_pi r self-consistent."""
    c, mean = (g - 1) / g, float((log_pi0.exp() * reward).sum())
    for _ in range(1000):
        lo, hi = -50.0, 50.0
        for _ in range(200):
            k = 0.5 * (lo + hi)
            lo, hi = (k, hi) if float(torch.logsumexp(log_pi0 + (c * (reward - mean) - k * lengths) / beta, 0)) > 0 else (lo, k)
        log_pi = log_pi0 + (c * (reward - mean) - k * lengths) / beta
        new = float((log_pi.exp() * reward).sum())
        mean, last = 0.5 * mean + 0.5 * new, mean
        if abs(mean - last) < 1e-12:
            break
    return log_pi - torch.logsumexp(log_pi, 0), k


def test_sequence_mean_aggregation_tilts_length_when_the_kl_is_in_the_loss():
    """GRPO's 1/|y| weights with the KL in the loss: a length tilt exp(−k|y|/beta) on top of the reward tilt (k < 0
    here: longer); with the KL in the reward the same weights leave the fixed point at p*."""
    beta, g = 0.5, 16
    options = {"name": "grpo", "scale_std": False, "aggregation": "sequence", "kl_level": "sequence", "kl_estimator": "k2"}
    policy, prior = train(options, 1000, beta=beta, n=g)
    space, log_pi0, reward, lengths = space_of(prior)
    log_pi, (log_star, _) = space.log_prob(policy), normalise(log_pi0 + reward / beta)
    predicted, k = length_tilt(log_pi0, reward, lengths, beta, g)
    assert k < 0
    assert kl(log_pi, predicted) < 0.005
    assert kl(log_pi, log_star) > 0.01
    assert float((log_pi.exp() * lengths).sum()) > float((log_star.exp() * lengths).sum()) + 0.05

    in_reward, _ = train({**options, "kl_in": "reward", "kl_estimator": "k1"}, 1000, beta=beta, n=g)
    assert kl(space.log_prob(in_reward), log_star) < 0.01


def test_no_kl_collapses_onto_the_argmax():
    """DAPO (no KL): E[r] alone. The last stretch is slow: a group whose G samples all score the same has A = 0."""
    policy, prior = train({"name": "grpo", "variant": "dapo"}, 300, beta=1.0, n=16)
    space = enumerate_space(prior, context="c0")
    assert float(space.log_prob(policy).exp()[space.samples.texts.index("aaa")]) > 0.97  # p*(aaa) = 0.06 here
