"""MaxRL ("Maximum Likelihood Reinforcement Learning", arXiv:2602.02710, 2026): maximise the log pass rate.

With a verifier (correct = r(x) >= ``correct_threshold``) the policy's pass rate on a context is
p = P_pi(correct) = Z_pi, and the objective is its log-likelihood, averaged over contexts:

    J(theta) = log p,    grad J = E_pi[1[c] grad log pi] / p = E_{pi(.|c)}[grad log pi],

the score of the policy's own posterior pi·1[c]/p (docs/math.md §10.2). No finite group estimates it
without bias (the mean of any function of n samples is a polynomial of degree n in p, 1/p is not).
MaxRL's estimator divides by the group's pass rate c/n: each correct sample of a group of n with
c >= 1 correct gets weight n/c (the mean over the correct samples of grad log pi), a group with none
gets 0. That is exactly unbiased for the truncation of log p = -sum_k (1-p)^k/k at order n,

    J_n = -sum_{k=1..n} (1-p)^k / k = sum_{k=1..n} pass@k / k + const,   grad J_n = (1 - (1-p)^n) grad p / p,

and consistent for grad log p as n grows. ``baseline`` (the paper's advantage (r - mean r)/mean r) also
subtracts 1 from every sample of a group with c >= 1: the realised advantages are centred, and the
estimate is then exactly unbiased for J_{n-1} (the subtracted term has mean (1-p)^{n-1} grad p).

Fixed point. J_n is increasing in p alone, so without a KL every pi with pi(correct) = 1 is optimal —
the same set as REINFORCE's (pass@1) and PKPO's (pass@k); gradient flow of any f(p) follows one path in
parameter space (grad f(p) = f'(p) grad p), only its speed differs, so which correct distribution is
reached is decided by the parametrisation, not the objective (docs/math.md §10.3). With ``kl`` (the
target's beta, k1 in the reward as kl-pg), maximising J_n - beta KL(pi || pi0) over distributions gives

    pi(x) ∝ pi0(x) exp(lambda 1[c(x)]),   lambda = J_n'(p)/beta,   p = Z0 e^lambda / (Z0 e^lambda + 1 - Z0),

Z0 = pi0's pass rate: the correct set keeps exactly the posterior's shape p* = pi0·1[c]/Z0
(KL(p* || pi) = -log p) and the tilt is that of Tilt(1[c], beta/J_n'(p)) — for J = log p an effective
temperature beta·p < beta, so more mass on the correct set than kl-pg's p*_beta ∝ pi0 exp(1[c]/beta).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, kl_coefficient, register_algorithm
from tiltlm.algorithms.kl_pg import kl_pg_loss
from tiltlm.algorithms.reinforce import policy_gradient_loss


def maxrl_weights(correct: torch.Tensor, group: torch.Tensor, *, baseline: bool = True) -> torch.Tensor:
    """Per-sample pseudo-reward A_i = n·1[c_i]/c (- 1 with the baseline) of each context's n samples, c of them
    correct; 0 for every sample of a context with none correct. (B,) float64."""
    correct = correct.double()
    groups = int(group.max()) + 1
    n = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(correct))[group]  # (B,)
    c = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, correct)[group]  # (B,)
    weight = n * correct / c.clamp(min=1)
    if baseline:
        weight = weight - 1.0
    return torch.where(c > 0, weight, torch.zeros_like(weight))


class MaxRLConfig(AlgorithmConfig):
    correct_threshold: float = Field(0.5, description="a sample is correct when r(x) >= this")
    baseline: bool = Field(True, description="centre each group's weights (the paper's (r - mean)/mean): unbiased for "
                                             "J_{n-1} instead of J_n, lower variance")
    kl: bool = Field(False, description="add -beta·KL(pi || pi0) with the target's beta (k1 in the reward, as kl-pg)")


@register_algorithm
class MaxRL(Algorithm):
    name = "maxrl"
    Config = MaxRLConfig

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c = self.config
        weight = maxrl_weights(batch.reward >= c.correct_threshold, batch.group, baseline=c.baseline)
        if c.kl:  # the KL part keeps kl-pg's leave-one-out baseline; the MaxRL weights carry their own
            loss, adv = kl_pg_loss(logp, batch.logq, batch.logp_prior, weight, batch.group,
                                   beta=kl_coefficient(batch, self.name), baseline=False)
        else:
            loss, adv = policy_gradient_loss(logp, weight, batch.group, baseline=False)
        solved = torch.zeros(int(batch.group.max()) + 1, dtype=torch.float64).index_add_(0, batch.group, (batch.reward >= c.correct_threshold).double())
        present = torch.bincount(batch.group) > 0
        return loss, {"loss/advantage_abs": float(adv.abs().mean()), "maxrl/contexts_solved": float((solved[present] > 0).double().mean())}
