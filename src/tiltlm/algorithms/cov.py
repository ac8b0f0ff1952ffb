"""Entropy control by covariance: Clip-Cov and KL-Cov (Cui et al. 2025, arXiv 2505.22617).

The paper's mechanism (docs/math.md §9): for a softmax policy pi(.|s) = softmax(z_s), any small change
of the logits changes the entropy of the state by

    H(pi'(.|s)) - H(pi(.|s)) = -Cov_{a~pi(.|s)}(log pi(a|s), z'_{s,a} - z_{s,a}) + O(|dz|²),

so a policy-gradient step (dz_{s,a} = eta·d(s)·pi(a|s)·A(s,a) for vanilla PG on tabular logits,
eta·A(s,a) for natural PG) lowers the entropy exactly when high-probability actions have high
advantage. The paper measures the per-token centred product over the N policy tokens of a batch,

    Cov(y_i) = (log pi(y_i) - mean_j log pi(y_j)) · (A(y_i) - mean_j A(y_j)),              (B, T)

whose mean over tokens (the batch covariance, logged as ``entropy/cov_logp_adv``) is the entropy
brake's signal, and restrains only the few tokens with the largest Cov:

- ``clip-cov``: among the tokens with ``cov_low < Cov < cov_high`` pick max(1, floor(clip_ratio·N)) at
  random and drop them from the policy gradient (their gradient is detached);
- ``kl-cov``: on the top ``max(1, floor(top_k·N))`` tokens by Cov add ``kl_coef·|log pi - log pi_old|``
  (the released code's per-token KL surrogate) to the loss.

Both are reward maximisers on reinforce's path: sequence advantage A = r - b_loo (leave-one-out,
``policy_gradient_loss``), broadcast to the tokens, no KL to pi0 (the target's beta is not used).
Tokens are selected once per batch from the sampling policy's log-probs (``Batch.token_logq``), among
the rows the loss sees (under data parallel: each rank's shard, with that shard's means).

**Fixed point: collapse, as reinforce** (docs/math.md §9.3). Every deterministic policy gives A = 0
to every sample and is a fixed point; the maximiser of r is the attractor. Clip-Cov removes a few
tokens' terms from the gradient, it does not zero it; KL-Cov's anchor pi_old is the policy of the
same step, so the penalty vanishes at any stationary point and changes only the path. One on-policy
pass (``epochs=1``) has grad |log pi - log pi_old| = 0 at pi = pi_old: kl-cov is then reinforce
exactly (tested); its brake acts from the second pass over a batch (the paper's PPO minibatches).
On the tabular testbed (300 steps x 64 samples) both end with pi(argmax) > 0.99 like reinforce;
with larger fractions than the paper's they keep up to 3.7x the entropy of the same update
without the brake (0.146 vs 0.040 nats; p* has 2.2), and by 3000 steps all have H < 0.002.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from tiltlm.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    leave_one_out,
    register_algorithm,
    safe_exp,
)
from tiltlm.algorithms.reinforce import policy_gradient_loss


def token_covariance(token_logp: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov(y_i) = (log pi_t - mean log pi)(A - mean A) over the policy tokens of the batch, (B, T) float64, 0 off mask.

    token_logp: (B, T) log pi of each token; advantage: (B,) sequence advantage (the same for its tokens);
    mask: (B, T) bool, the policy tokens. Means are over all N = mask.sum() tokens of the batch.
    """
    logp = token_logp.detach().double()
    adv = advantage.detach().double()[:, None].expand_as(logp)  # (B, T)
    n = mask.sum().clamp(min=1)
    centred_logp = logp - (logp * mask).sum() / n
    centred_adv = adv - (adv * mask).sum() / n
    return torch.where(mask, centred_logp * centred_adv, torch.zeros((), dtype=torch.float64))


def batch_covariance(token_logp: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor) -> float:
    """Cov over the batch's policy tokens of (log pi(y_t), A(y_t)): the mean of ``token_covariance``."""
    return float(token_covariance(token_logp, advantage, mask).sum() / mask.sum().clamp(min=1))


def n_selected(fraction: float, mask: torch.Tensor) -> int:
    """max(1, floor(fraction·N)) tokens, N the batch's policy tokens (the released code's count)."""
    return max(1, int(fraction * int(mask.sum())))


def clip_cov_keep(cov: torch.Tensor, mask: torch.Tensor, ratio: float, low: float, high: float,
                  generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool: the policy tokens whose gradient is kept; n_selected(ratio) tokens drawn uniformly from
    those with low < Cov < high are dropped (all of them when fewer are in the band)."""
    band = (mask & (cov > low) & (cov < high)).flatten().nonzero().squeeze(-1)
    drop = band[torch.randperm(band.numel(), generator=generator)[: n_selected(ratio, mask)]]
    keep = mask.clone().flatten()
    keep[drop] = False
    return keep.view_as(mask)


def kl_cov_select(cov: torch.Tensor, mask: torch.Tensor, top_k: float) -> torch.Tensor:
    """(B, T) bool: the n_selected(top_k) policy tokens with the largest Cov."""
    k = min(n_selected(top_k, mask), int(mask.sum()))
    scores = torch.where(mask, cov, torch.full((), -torch.inf, dtype=cov.dtype)).flatten()
    selected = torch.zeros_like(scores, dtype=torch.bool)
    selected[torch.topk(scores, k).indices] = True
    return selected.view_as(mask) & mask


def sequence_advantage(batch: Batch) -> torch.Tensor:
    """A = r - b_loo (reinforce's leave-one-out baseline), (B,) float64."""
    reward = batch.reward.double()
    return reward - leave_one_out(reward, batch.group)


class ClipCovConfig(AlgorithmConfig):
    clip_ratio: float = Field(2e-4, gt=0, le=1, description="fraction r of the batch's tokens whose gradient is detached (at least one)")
    cov_low: float = Field(1.0, description="omega_low: a token is a candidate when Cov > this")
    cov_high: float = Field(5.0, description="omega_high: ... and Cov < this")
    seed: int = Field(0, description="seed of the random choice among the candidates (one draw per step)")

    @model_validator(mode="after")
    def _band(self):
        if self.cov_low >= self.cov_high:
            raise ValueError(f"cov_low ({self.cov_low}) must be below cov_high ({self.cov_high})")
        return self


@register_algorithm
class ClipCov(Algorithm):
    """Clip-Cov: reinforce with the gradient of a few random high-covariance tokens detached."""

    name = "clip-cov"
    Config = ClipCovConfig

    def __init__(self, config: ClipCovConfig):
        super().__init__(config)
        self.steps = 0  # seeds the step's draw: reproducible and resumable

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c, mask = self.config, batch.samples.mask
        adv = sequence_advantage(batch)
        cov = token_covariance(batch.token_logq, adv, mask)  # (B, T)
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + self.steps)
        keep = clip_cov_keep(cov, mask, c.clip_ratio, c.cov_low, c.cov_high, generator)  # (B, T)
        kept_logp = torch.where(keep, token_logp, token_logp.detach()).sum(-1)  # value log pi(x), gradient of the kept tokens
        loss, _ = policy_gradient_loss(kept_logp, adv, batch.group, baseline=False)
        return loss, {"entropy/cov_logp_adv": batch_covariance(batch.token_logq, adv, mask),
                      "loss/cov_selected_fraction": float((mask & ~keep).sum() / mask.sum().clamp(min=1)),
                      "loss/advantage_abs": float(adv.abs().mean())}

    def after_step(self, batch: Batch, policy, logp: torch.Tensor) -> dict[str, float]:
        self.steps += 1
        return {}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))


class KlCovConfig(AlgorithmConfig):
    top_k: float = Field(2e-3, gt=0, le=1, description="fraction k of the batch's tokens, those of largest Cov, that get the KL penalty (at least one)")
    kl_coef: float = Field(1.0, ge=0, description="beta of the penalty kl_coef·|log pi - log pi_old| on the selected tokens")
    epochs: int = Field(4, ge=1, description="passes over each batch; the penalty has zero gradient on the first (pi = pi_old)")


@register_algorithm
class KlCov(Algorithm):
    """KL-Cov: importance-weighted policy gradient, plus a KL anchor to pi_old on the top-k covariance tokens."""

    name = "kl-cov"
    Config = KlCovConfig

    @property
    def epochs(self) -> int:
        return self.config.epochs

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c, mask = self.config, batch.samples.mask
        adv = sequence_advantage(batch)
        cov = token_covariance(batch.token_logq, adv, mask)  # (B, T)
        selected = kl_cov_select(cov, mask, c.top_k)  # (B, T)
        log_ratio = torch.where(mask, token_logp - batch.token_logq.to(token_logp.dtype), torch.zeros((), dtype=token_logp.dtype))
        # sum_t rho_t: value = length on the first pass, gradient sum_t rho_t grad log pi_t (= grad log pi(x) at rho = 1)
        surrogate = (safe_exp(log_ratio) * mask).sum(-1)  # (B,)
        pg, _ = policy_gradient_loss(surrogate, adv, batch.group, baseline=False)
        penalty = (log_ratio.abs() * selected).sum() / len(batch)  # the same per-token scale as the PG's sum over t
        return pg + c.kl_coef * penalty, {
            "entropy/cov_logp_adv": batch_covariance(batch.token_logq, adv, mask),
            "loss/cov_selected_fraction": float(selected.sum() / mask.sum().clamp(min=1)),
            "loss/cov_kl": float(penalty.detach()), "loss/advantage_abs": float(adv.abs().mean())}
