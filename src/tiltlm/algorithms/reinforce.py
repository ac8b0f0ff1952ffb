"""REINFORCE: pure reward maximisation, the beta -> 0 (hardmax) limit of the tilt.

J(theta) = E_pi[r(x)];  grad J = E_pi[(r(x) - b) grad log pi(x)]  (Williams 1992), with the
leave-one-out baseline b of the other samples of the same context (RLOO, Kool et al. 2019).
The optimum is a point mass on argmax r within the support reached: distribution collapse.
An optional entropy bonus adds alpha·H(pi) to J (pseudo-reward -alpha·log pi(x)).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, leave_one_out, register_algorithm


def policy_gradient_loss(logp: torch.Tensor, reward: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-function loss -mean((R - b_loo) log pi); returns (loss, advantages). reward: (B,) treated as constant."""
    reward = reward.detach().double()
    advantage = reward - leave_one_out(reward, group)
    return -(advantage.to(logp.dtype) * logp).mean(), advantage


def entropy_pseudo_reward(logq: torch.Tensor, coef: float) -> torch.Tensor:
    """-alpha log pi(x): its score-function gradient is alpha·grad H(pi) (on-policy)."""
    return -coef * logq.double()


class ReinforceConfig(AlgorithmConfig):
    entropy_coef: float = Field(0.0, ge=0, description="alpha of the entropy bonus alpha·H(pi); 0 = pure RL")


@register_algorithm
class Reinforce(Algorithm):
    name = "reinforce"
    Config = ReinforceConfig

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        reward = batch.reward + entropy_pseudo_reward(batch.logq, self.config.entropy_coef)
        loss, adv = policy_gradient_loss(logp, reward, batch.group)
        return loss, {"loss/advantage_abs": float(adv.abs().mean())}
