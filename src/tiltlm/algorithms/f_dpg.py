"""f-DPG (Go et al. 2023): minimise any f-divergence D_f(pi || p) = E_p[f(pi/p)] to the target.

    grad D_f = E_q[(pi/q) f'(pi/p) grad log pi]

so each divergence is one f' of t = pi/p (computed from log t = log pi - log P + log Z, with
log Z the running IS estimate of the DPG family). The pseudo-reward is -f'(t):

    reverse KL  f'(t) = log t + 1           -> -f' = r/beta - log(pi/pi0) + const: the KL-RL reward
    forward KL  f'(t) = -1/t                -> DPG's weight p/pi
    Jensen-Shannon  f'(t) = log 2 - log(1 + 1/t)
    total variation f'(t) = sign(t - 1)/2

A baseline b (the self-normalised mean of f'(t) under pi) is subtracted; unbiased since
E_q[(pi/q) grad log pi] = 0. log t is clipped to ±50 so a sequence outside the target's support
(P = 0, log t = +inf) gives a large finite push away instead of NaN.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field

from tiltlm.algorithms.base import Batch, register_algorithm, safe_exp
from tiltlm.algorithms.dpg import DistributionMatching, DpgConfig

F_PRIME: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rkl": lambda log_t: log_t + 1,
    "fkl": lambda log_t: -torch.exp(-log_t),
    "js": lambda log_t: math.log(2) - torch.nn.functional.softplus(-log_t),
    "tv": lambda log_t: 0.5 * torch.sign(log_t),
}
"""f'(t) as a function of log t, one line per divergence."""


def f_dpg_loss(
    logp: torch.Tensor, logq: torch.Tensor, log_target: torch.Tensor, log_z: float, *, divergence: str, baseline: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean((pi/q)(f'(pi/p) - b) log pi); returns (loss, pseudo-rewards -f'). All (B,)."""
    logp_d = logp.detach().double()
    log_p = torch.full_like(logp_d, -math.inf) if log_z == -math.inf else log_target.double() - log_z  # log Z = -inf: P = 0 so far
    log_t = (logp_d - log_p).clamp(-50.0, 50.0)  # log pi/p
    fp = F_PRIME[divergence](log_t)
    ratio = safe_exp(logp_d - logq.double())  # pi / q (1 on-policy)
    if baseline:
        fp = fp - (ratio * fp).sum() / ratio.sum()
    return ((ratio * fp).to(logp.dtype) * logp).mean(), -F_PRIME[divergence](log_t)


class FDpgConfig(DpgConfig):
    divergence: Literal["rkl", "fkl", "js", "tv"] = Field("js", description="which D_f(pi||p) to minimise")
    baseline: bool = Field(True, description="subtract the self-normalised mean of f'(pi/p)")


@register_algorithm
class FDpg(DistributionMatching):
    name = "f-dpg"
    Config = FDpgConfig

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c = self.config
        loss, pseudo = f_dpg_loss(logp, batch.logq, batch.log_target, self.log_z, divergence=c.divergence, baseline=c.baseline)
        return loss, {"loss/pseudo_reward_mean": float(pseudo.mean())}
