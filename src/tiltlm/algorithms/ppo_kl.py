"""PPO with a KL penalty (Schulman et al. 2017; Ziegler et al. 2019 for LMs).

Sequence-level advantages (leave-one-out baseline of the KL-penalised reward, as kl-pg) and
per-token ratios rho_t = pi_theta(x_t|x_<t) / pi_old(x_t|x_<t); the clipped surrogate
sum_t min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) is maximised for ``epochs`` passes over the batch.
At rho = 1 (first epoch, or no clipping) sum_t grad rho_t = grad log pi(x), so one epoch without
clipping has exactly kl-pg's gradient with the same KL placement (tested).

The KL coefficient is the target's beta (``Batch.beta``), or — an explicit choice, ``adaptive_kl`` — starts
there and is adapted (Ziegler) towards a target KL per step:
beta <- beta·(1 + clip(KL/target - 1, -0.2, 0.2)·n/horizon). With an adaptive beta the optimum
is p* for the *final* beta, not for the target's beta; the coefficient is logged as ``kl/coef`` each
step, while the metrics keep measuring against the target's p*.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, kl_coefficient, leave_one_out, register_algorithm
from tiltlm.algorithms.kl_pg import kl_estimate
from tiltlm.algorithms.reinforce import entropy_pseudo_reward


def ppo_clip_loss(
    token_logp: torch.Tensor, token_logq: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, float]:
    """-mean_i sum_t min(rho A, clip(rho) A); returns (loss, fraction of clipped tokens). Shapes (B, T), (B,)."""
    ratio = torch.exp(token_logp - token_logq.to(token_logp.dtype))  # (B, T)
    adv = advantage.to(token_logp.dtype)[:, None]
    surrogate = ratio * adv
    if clip is not None:
        clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * adv
        surrogate = torch.minimum(surrogate, clipped)
        frac = float(((ratio - 1).abs() > clip)[mask].float().mean()) if mask.any() else 0.0
    else:
        frac = 0.0
    return -(surrogate * mask).sum(-1).mean(), frac


class PpoKlConfig(AlgorithmConfig):
    kl_in: Literal["reward", "loss"] = "reward"
    estimator: Literal["k1", "k2", "k3"] = "k1"
    clip: float | None = Field(0.2, gt=0, description="PPO clip range eps; null disables clipping")
    epochs: int = Field(4, ge=1, description="optimisation passes over each batch")
    adaptive_kl: bool = Field(False, description="adapt the KL coefficient (from the target's beta) towards target_kl (Ziegler et al. 2019)")
    target_kl: float | None = Field(None, gt=0, description="KL(pi||pi0) per sequence that the adaptive beta aims at")
    horizon: int = Field(10000, gt=0, description="adaptive controller horizon, in samples")
    entropy_coef: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _target_needed(self):
        if self.adaptive_kl and self.target_kl is None:
            raise ValueError("adaptive_kl needs target_kl")
        return self


@register_algorithm
class PpoKl(Algorithm):
    name = "ppo-kl"
    needs_tilt = True
    Config = PpoKlConfig

    def __init__(self, config: PpoKlConfig):
        super().__init__(config)
        self.beta: float | None = None  # the KL coefficient in use: the target's, or the adapted one

    @property
    def epochs(self) -> int:
        return self.config.epochs

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c = self.config
        if self.beta is None or not c.adaptive_kl:  # adaptive: the target's beta is only where it starts
            self.beta = kl_coefficient(batch, self.name)
        reward = batch.reward + entropy_pseudo_reward(batch.logq, c.entropy_coef)
        if c.kl_in == "reward":
            reward = reward - self.beta * kl_estimate(batch.logp_prior - batch.logq, c.estimator)
        advantage = reward - leave_one_out(reward, batch.group)
        loss, clipped = ppo_clip_loss(token_logp, batch.token_logq, batch.samples.mask, advantage, c.clip)
        if c.kl_in == "loss":
            loss = loss + self.beta * kl_estimate(batch.logp_prior.to(logp.dtype) - logp, c.estimator).mean()
        return loss, {"loss/clip_fraction": clipped, "loss/advantage_abs": float(advantage.abs().mean())}

    def after_step(self, batch: Batch, policy, logp: torch.Tensor) -> dict[str, float]:
        c = self.config
        if c.adaptive_kl:
            kl = float((batch.logq - batch.logp_prior).mean())
            error = max(-0.2, min(0.2, kl / c.target_kl - 1))
            self.beta *= 1 + error * len(batch) / c.horizon
        return {"kl/coef": self.beta}

    def state_dict(self):
        return {"beta": self.beta}

    def load_state_dict(self, state):
        self.beta = None if state.get("beta") is None else float(state["beta"])
