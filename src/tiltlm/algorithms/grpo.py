"""GRPO and the variants users configure in TRL / verl: Dr. GRPO, DAPO (docs/math.md §11).

Per context x, a group of G samples y_1..y_G ~ pi_old(.|x) with rewards R_i; the group advantage
(Shao et al. 2024, DeepSeekMath)

    A_i = (R_i − mean_g R) / (std_g R + 1e-4)      (``scale_std``; std with G−1, as torch.std in TRL/verl)
    A_i =  R_i − mean_g R                          (Dr. GRPO, Liu et al. 2025: ``scale_std: false``)

and per token t of y_i, with rho_t = pi_theta(y_t|y_<t) / pi_old(y_t|y_<t), the PPO-clipped surrogate
plus, with ``kl_in: loss``, beta·k3 of the *token* log-ratio l_t = log pi0(y_t|.) − log pi_theta(y_t|.):

    ell_{i,t} = −min(rho_t A_i, clip(rho_t, 1 − clip_low, 1 + clip_high) A_i) + beta·(e^{l_t} − 1 − l_t)

aggregated (``aggregation``) as ``sequence``: mean_i (1/|y_i|) sum_t ell (GRPO); ``token``: sum_{i,t} ell /
sum_i |y_i| (DAPO); ``constant``: sum_{i,t} ell / (B·L), L = ``max_length`` (Dr. GRPO). ``clip_high`` >
``clip_low`` is DAPO's clip-higher; ``epochs`` passes over each batch (TRL's num_iterations).
``kl_in: reward`` instead subtracts beta·sum_t k(l_t) (k1 by default: beta·log(pi/pi0)(y)) from R before
the group statistics (verl's use_kl_in_reward); ``kl_in: none`` drops the KL (DAPO).

Fixed points, on-policy, for a policy that can represent every per-prompt distribution, with
beta' = beta·G/(G−1) because the group mean includes R_i itself (it scales the policy-gradient part
by (G−1)/G and not the loss's KL):

- ``kl_in: reward`` (k1), any ``aggregation``, ``scale_std`` or not: **p*** — the 1/|y| weights and the
  1/std scale leave the per-prompt stationary point where the shaped reward is constant.
- ``kl_in: loss`` (k3), ``aggregation`` token or constant, no std: the forward KL to the prior. Per token
  (``kl_level: token``, TRL/verl): pi(a|h) = beta'·pi0(a|h) / (lambda_h − Q(h, a)), Q the expected reward
  after (h, a) under pi, lambda_h normalising (backed up from the last token). Per sequence
  (``kl_level: sequence``, as kl-pg): pi(y) = beta'·pi0(y) / (lambda − r(y)). Neither is p*.
- with ``scale_std`` and the KL in the loss, prompt x's coefficient becomes beta'·sigma_x, sigma_x the
  reward's std under the fixed point itself (self-consistent): with sequence k2 (the reverse KL's exact
  gradient) pi(.|x) ∝ pi0·exp(r/(beta'·sigma_x)); prompts with a narrow spread are pushed past p*(.|x).
- ``aggregation: sequence`` with the KL in the loss (sequence k2): the 1/|y| weights add a length tilt,
  pi ∝ pi0·exp(((G−1)/G·r − k|y|)/beta), k normalising (k < 0, longer, on the count:a testbed).
- ``kl_in: none``: E[R] alone: collapse onto the argmax of R (beta = 0).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tiltlm.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    kl_coefficient,
    register_algorithm,
)
from tiltlm.algorithms.kl_pg import kl_estimate
from tiltlm.errors import TiltlmError

STD_EPS = 1e-4  # TRL's epsilon in (R − mean)/(std + eps)

# what each variant sets; options given explicitly win
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"scale_std": True, "aggregation": "sequence", "clip_high": 0.2, "kl_in": "loss"},  # Shao et al. 2024
    "dr-grpo": {"scale_std": False, "aggregation": "constant", "clip_high": 0.2, "kl_in": "loss"},  # Liu et al. 2025
    "dapo": {"scale_std": True, "aggregation": "token", "clip_high": 0.28, "kl_in": "none"},  # Yu et al. 2025
}


def group_advantages(reward: torch.Tensor, group: torch.Tensor, *, scale_std: bool) -> torch.Tensor:
    """A_i = R_i − mean of i's group (itself included), divided by (std_g + 1e-4) with ``scale_std``. (B,) float64.

    The std is the unbiased one (G − 1); a group of one sample has advantage 0.
    """
    reward = reward.double()
    n = int(group.max()) + 1
    counts = torch.zeros(n, dtype=reward.dtype).index_add_(0, group, torch.ones_like(reward))
    mean = torch.zeros(n, dtype=reward.dtype).index_add_(0, group, reward) / counts
    centred = reward - mean[group]
    if not scale_std:
        return centred
    var = torch.zeros(n, dtype=reward.dtype).index_add_(0, group, centred**2) / (counts - 1).clamp(min=1)
    return centred / (var.sqrt()[group] + STD_EPS)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_length: int | None = None) -> torch.Tensor:
    """The scalar loss from per-token terms (B, T): the weight of each token is what differs.

    sequence: mean_i (1/|y_i|) sum_t;  token: sum / sum_i |y_i|;  constant: sum / (B · max_length).
    """
    per_token = per_token * mask
    if how == "sequence":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if how == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    length = max_length if max_length is not None else mask.shape[1]
    return per_token.sum() / (mask.shape[0] * max(length, 1))


def grpo_loss(
    token_logp: torch.Tensor, token_logq: torch.Tensor, token_logp_prior: torch.Tensor | None, mask: torch.Tensor,
    advantage: torch.Tensor, *, clip_low: float, clip_high: float, aggregation: str, beta: float = 0.0,
    estimator: str = "k3", kl_level: str = "token", max_length: int | None = None,
) -> tuple[torch.Tensor, float]:
    """The aggregated clipped surrogate (+ beta·k per token when ``token_logp_prior`` is given); (loss, clipped fraction).

    token_logp: (B, T) with grad; token_logq, token_logp_prior: (B, T); advantage: (B,).
    """
    ratio = torch.exp(token_logp - token_logq.to(token_logp.dtype))  # (B, T)
    adv = advantage.to(token_logp.dtype)[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    per_token = -surrogate
    if token_logp_prior is not None:
        log_ratio = (token_logp_prior.to(token_logp.dtype) - token_logp) * mask  # (B, T)
        if kl_level == "token":
            per_token = per_token + beta * kl_estimate(log_ratio, estimator)
        else:  # k of the sequence's log-ratio, spread evenly over its tokens: weighted per sequence as A_i is
            lengths = mask.sum(-1, keepdim=True).clamp(min=1)
            per_token = per_token + beta * kl_estimate(log_ratio.sum(-1, keepdim=True), estimator) / lengths
    clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high))[mask]
    return aggregate(per_token, mask, aggregation, max_length), float(clipped.float().mean()) if clipped.numel() else 0.0


class GrpoConfig(AlgorithmConfig):
    variant: Literal["grpo", "dr-grpo", "dapo"] = Field(
        "grpo", description="preset for scale_std, aggregation, clip_high and kl_in (module PRESETS); explicit options win")
    scale_std: bool = Field(description="divide the group-centred advantage by the group's reward std (GRPO; Dr. GRPO: false)")
    aggregation: Literal["sequence", "token", "constant"] = Field(
        description="token weights: sequence = mean over each sequence then over sequences (GRPO); token = sum / total "
                    "tokens (DAPO); constant = sum / (B·max_length) (Dr. GRPO)")
    max_length: int | None = Field(None, ge=1, description="aggregation constant's L; null = the batch's token width")
    clip_low: float = Field(0.2, gt=0, lt=1, description="ratio clipped below at 1 − clip_low")
    clip_high: float = Field(gt=0, description="ratio clipped above at 1 + clip_high (DAPO's clip-higher: 0.28)")
    epochs: int = Field(1, ge=1, description="optimisation passes over each batch (TRL num_iterations)")
    kl_in: Literal["loss", "reward", "none"] = Field(
        description="loss: beta·k per token in the loss (GRPO); reward: R − beta·sum_t k (verl use_kl_in_reward); none: no KL")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="KL estimator; null = k3 in the loss (GRPO's), k1 in the reward")
    kl_level: Literal["token", "sequence"] = Field(
        "token", description="kl_in loss: k of each token's log-ratio (TRL, verl) or of the sequence's (as kl-pg)")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            variant = data.get("variant", "grpo")
            data = {**PRESETS.get(variant, {}), **data}
        return data

    @property
    def estimator(self) -> str:
        return self.kl_estimator or ("k1" if self.kl_in == "reward" else "k3")


@register_algorithm
class Grpo(Algorithm):
    name = "grpo"
    needs_tilt = True
    needs_token_prior = True  # the per-token KL reads log pi0(y_t | y_<t) (Batch.token_logp_prior)
    Config = GrpoConfig

    @property
    def epochs(self) -> int:
        return self.config.epochs

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c = self.config
        mask = batch.samples.mask
        beta = kl_coefficient(batch, self.name) if c.kl_in != "none" else 0.0
        prior = batch.token_logp_prior
        if c.kl_in != "none" and prior is None:
            raise TiltlmError("algorithm 'grpo' puts the KL on each token but the batch has no per-token log pi0 "
                              "(Batch.token_logp_prior); build batches with the Trainer, or set kl_in: none")
        reward = batch.reward.double()
        if c.kl_in == "reward":
            log_ratio = (prior.double() - batch.token_logq.double()) * mask  # (B, T)
            kl = kl_estimate(log_ratio, c.estimator).sum(-1) if c.kl_level == "token" else kl_estimate(log_ratio.sum(-1), c.estimator)
            reward = reward - beta * kl
        advantage = group_advantages(reward, batch.group, scale_std=c.scale_std)
        loss, clipped = grpo_loss(token_logp, batch.token_logq, prior if c.kl_in == "loss" else None, mask, advantage,
                                  clip_low=c.clip_low, clip_high=c.clip_high, aggregation=c.aggregation, beta=beta,
                                  estimator=c.estimator, kl_level=c.kl_level, max_length=c.max_length)
        return loss, {"loss/clip_fraction": clipped, "loss/advantage_abs": float(advantage.abs().mean())}
