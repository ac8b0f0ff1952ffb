"""Distributional Policy Gradient (Parshakova et al. 2019; Khalifa et al. 2021) and GDC++ (Korbak et al. 2022).

Minimise the cross-entropy CE(theta) = -E_p[log pi_theta] (= KL(p || pi_theta) + const) by
importance sampling from a proposal q:

    grad CE = -E_q[(P(x) / (Z q(x))) grad log pi(x)]

- on-policy: q = pi_theta at sampling time;
- off-policy: q is a frozen copy, replaced by pi_theta when the IS estimate of KL(p||pi_theta) drops
  below that of KL(p||q) (the KL-adaptive update), checked every ``proposal_check_every`` steps.
Z is a running importance-sampling estimate over every batch so far, log Z_hat = log mean P/q.
GDC++ subtracts the baseline pi/q from the weight: A(x) = P/(Zq) - pi/q; unbiased because
E_q[(pi/q) grad log pi] = sum_x grad pi(x) = 0, and it vanishes at the optimum, so the gradient
noise goes to zero as pi -> p.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, register_algorithm, safe_exp
from tiltlm.metrics.divergences import kl_target_policy


def dpg_loss(
    logp: torch.Tensor, logq: torch.Tensor, log_target: torch.Tensor, log_z: float, *, baseline: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-mean(A log pi), A = P/(Zq) [- pi/q for GDC++]; returns (loss, A). All inputs (B,).

    log Z = -inf means P(x) = 0 on every sample so far (a constraint nothing has met yet): P/(Zq) is
    then 0/0, and the weight is 0 (no sample carries information about p), not NaN.
    """
    log_w = log_target.double() - logq.double()
    weight = torch.zeros_like(log_w) if log_z == -math.inf else safe_exp(log_w - log_z)  # P / (Z q)
    if baseline:
        weight = weight - safe_exp(logp.detach().double() - logq.double())  # - pi / q
    return -(weight.to(logp.dtype) * logp).mean(), weight


class DistributionMatching(Algorithm):
    """Shared state of the DPG family: the running log Z and the (optionally off-policy) proposal."""

    def __init__(self, config):
        super().__init__(config)
        self.on_policy = not config.off_policy
        self.log_w_sum = -math.inf  # log sum of all importance weights P/q seen so far
        self.n_seen = 0
        self.proposal_updates = 0
        self.steps = 0

    @property
    def log_z(self) -> float:
        return self.log_w_sum - math.log(self.n_seen) if self.n_seen else 0.0

    def observe(self, batch: Batch) -> None:
        log_w = batch.log_target - batch.logq
        self.log_w_sum = float(torch.logaddexp(torch.tensor(self.log_w_sum, dtype=torch.float64), torch.logsumexp(log_w, 0)))
        self.n_seen += len(batch)

    def after_step(self, batch: Batch, policy, logp: torch.Tensor) -> dict[str, float]:
        self.steps += 1
        stats = {"log_z/running": self.log_z}
        every = self.config.proposal_check_every
        if not self.on_policy and every and self.steps % every == 0:
            kl_pi = kl_target_policy(batch.log_target, batch.logq, logp.detach().double()).value
            kl_q = kl_target_policy(batch.log_target, batch.logq, batch.logq).value
            stats.update({"dpg/kl_target_policy_is": kl_pi, "dpg/kl_target_proposal_is": kl_q})
            if kl_pi < kl_q:
                self.proposal = policy.copy()
                self.proposal_updates += 1
        stats["dpg/proposal_updates"] = self.proposal_updates
        return stats

    def state_dict(self):
        return {"log_w_sum": self.log_w_sum, "n_seen": self.n_seen, "proposal_updates": self.proposal_updates, "steps": self.steps}

    def load_state_dict(self, state):
        self.log_w_sum, self.n_seen = float(state["log_w_sum"]), int(state["n_seen"])
        self.proposal_updates, self.steps = int(state["proposal_updates"]), int(state["steps"])


class DpgConfig(AlgorithmConfig):
    off_policy: bool = Field(False, description="sample from a frozen proposal q (initially pi0) instead of pi_theta")
    proposal_check_every: int = Field(1, ge=0, description="off-policy: steps between KL-adaptive proposal checks (0 = never update q)")


@register_algorithm
class Dpg(DistributionMatching):
    name = "dpg"
    Config = DpgConfig
    baseline = False

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        loss, weight = dpg_loss(logp, batch.logq, batch.log_target, self.log_z, baseline=self.baseline)
        return loss, {"loss/weight_abs": float(weight.abs().mean()), "loss/weight_max": float(weight.abs().max())}


@register_algorithm
class GdcPlusPlus(Dpg):
    name = "gdc++"
    baseline = True
