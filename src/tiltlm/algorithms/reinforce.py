"""REINFORCE: pure reward maximisation, the beta -> 0 (hardmax) limit of the tilt.

J(theta) = E_pi[r(x)];  grad J = E_pi[(r(x) - b) grad log pi(x)]  (Williams 1992), with the
leave-one-out baseline b of the other samples of the same context (RLOO, Kool et al. 2019).
The optimum is a point mass on argmax r within the support reached: distribution collapse.

Two explicit diversity objectives (shared with kl-pg):
- an entropy bonus alpha·H(pi) (pseudo-reward -alpha·log pi(x));
- a set-level reward: the k = n_per_context samples S of a context are scored together by R(S)
  and the objective is E[R(S)]. Its gradient is E[sum_i (R(S) - R(S minus x_i)) grad log pi(x_i)]:
  R(S minus x_i) does not depend on x_i, so it is a valid baseline and the credit of x_i is its
  marginal contribution. R is ``max`` (best-of-k reward), ``any`` (pass@k: some sample is correct)
  or ``distinct`` (number of distinct correct samples), with correct meaning r(x) >= threshold.
  The per-sample reward is replaced by the credit, and no further baseline is subtracted (a
  baseline built from the other credits would depend on x_i).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, leave_one_out, register_algorithm


def policy_gradient_loss(
    logp: torch.Tensor, reward: torch.Tensor, group: torch.Tensor, *, baseline: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-function loss -mean((R - b_loo) log pi); returns (loss, advantages). reward: (B,) treated as constant."""
    reward = reward.detach().double()
    advantage = reward - leave_one_out(reward, group) if baseline else reward
    return -(advantage.to(logp.dtype) * logp).mean(), advantage


SetReward = Literal["none", "max", "any", "distinct"]


def set_credit(texts: list[str], reward: torch.Tensor, group: torch.Tensor, kind: str, threshold: float) -> torch.Tensor:
    """Credit R(S) - R(S minus x_i) of each sample within its context's set S, (B,) float64."""
    reward = reward.double()
    credit = torch.zeros_like(reward)
    correct = reward >= threshold
    for g in group.unique().tolist():
        idx = (group == g).nonzero().squeeze(-1).tolist()
        if kind == "max":
            values = reward[idx]
            for j, i in enumerate(idx):
                others = torch.cat([values[:j], values[j + 1 :]])
                credit[i] = values.max() - others.max() if len(others) else values[j]  # R(S) - R(S minus x_i)
        elif kind == "any":
            n_correct = int(correct[idx].sum())
            for i in idx:
                credit[i] = float(bool(correct[i]) and n_correct == 1)
        elif kind == "distinct":
            counts: dict[str, int] = {}
            for i in idx:
                if correct[i]:
                    counts[texts[i]] = counts.get(texts[i], 0) + 1
            for i in idx:
                credit[i] = float(bool(correct[i]) and counts[texts[i]] == 1)
    return credit


def shaped_reward(batch, entropy_coef: float, set_reward: str, threshold: float) -> tuple[torch.Tensor, bool]:
    """The per-sample reward an on-policy gradient uses, and whether a leave-one-out baseline applies."""
    reward = batch.reward
    if set_reward != "none":
        reward = set_credit(batch.samples.texts, reward, batch.group, set_reward, threshold)
    return reward + entropy_pseudo_reward(batch.logq, entropy_coef), set_reward == "none"


def entropy_pseudo_reward(logq: torch.Tensor, coef: float) -> torch.Tensor:
    """-alpha log pi(x): its score-function gradient is alpha·grad H(pi) (on-policy)."""
    return -coef * logq.double()


class ReinforceConfig(AlgorithmConfig):
    entropy_coef: float = Field(0.0, ge=0, description="alpha of the entropy bonus alpha·H(pi); 0 = pure RL")
    set_reward: SetReward = Field("none", description="score each context's samples as a set: max, any (pass@k), distinct")
    correct_threshold: float = Field(0.5, description="a sample is correct when r(x) >= this (set rewards any/distinct)")


@register_algorithm
class Reinforce(Algorithm):
    name = "reinforce"
    Config = ReinforceConfig

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c = self.config
        reward, baseline = shaped_reward(batch, c.entropy_coef, c.set_reward, c.correct_threshold)
        loss, adv = policy_gradient_loss(logp, reward, batch.group, baseline=baseline)
        return loss, {"loss/advantage_abs": float(adv.abs().mean())}
