"""f-DPG (Go et al. 2023): minimise any f-divergence D_f(pi || p) = E_p[f(pi/p)] to the target.

    grad D_f = E_q[(pi/q) f'(pi/p) grad log pi]

so each divergence is one f' of t = pi/p (computed from log t = log pi - log P + log Z, with
log Z the running IS estimate of the DPG family: each row's context's log Z(c) by default, see
tiltlm.algorithms.dpg). The pseudo-reward is -f'(t):

    reverse KL  f'(t) = log t + 1           -> -f' = r/beta - log(pi/pi0) + const: the KL-RL reward
    forward KL  f'(t) = -1/t                -> DPG's weight p/pi
    Jensen-Shannon  f'(t) = log 2 - log(1 + 1/t)
    total variation f'(t) = sign(t - 1)/2

A baseline b (the self-normalised mean of f'(t) under pi) is subtracted; unbiased since
E_q[(pi/q) grad log pi] = 0. With ``log_z: per_context`` b is each context's own mean, so the
per-context constant -log Z(c) cancels (reverse KL: the kl-pg gradient with several contexts too, §3.4),
and a context none of whose samples is in p's support yet (log Z(c) = -inf) has zero credit. log t is clipped to ±50 so a sequence outside the target's support
(P = 0, log t = +inf) gives a large finite push away instead of NaN.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field

from tiltlm.algorithms.base import Batch, register_algorithm, safe_exp
from tiltlm.algorithms.dpg import DistributionMatching, DpgConfig, LogZ

F_PRIME: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rkl": lambda log_t: log_t + 1,
    "fkl": lambda log_t: -torch.exp(-log_t),
    "js": lambda log_t: math.log(2) - torch.nn.functional.softplus(-log_t),
    "tv": lambda log_t: 0.5 * torch.sign(log_t),
}
"""f'(t) as a function of log t, one line per divergence."""


def f_dpg_loss(
    logp: torch.Tensor, logq: torch.Tensor, log_target: torch.Tensor, log_z: LogZ, *, divergence: str, baseline: bool = True,
    group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean((pi/q)(f'(pi/p) - b) log pi); returns (loss, pseudo-rewards -f'). All (B,); ``log_z`` a float or
    (B,) per row. ``group`` (B,): the baseline is each context's self-normalised mean (else the batch's)."""
    logp_d = logp.detach().double()
    log_z = torch.as_tensor(log_z, dtype=torch.float64).expand_as(logp_d)
    # log Z = -inf: P = 0 on every sample so far, so log p = -inf
    log_p = torch.where(torch.isneginf(log_z), -math.inf, log_target.double() - torch.where(torch.isneginf(log_z), 0.0, log_z))
    log_t = (logp_d - log_p).clamp(-50.0, 50.0)  # log pi/p
    fp = F_PRIME[divergence](log_t)
    ratio = safe_exp(logp_d - logq.double())  # pi / q (1 on-policy)
    if baseline:
        for rows in [slice(None)] if group is None else [group == g for g in group.unique().tolist()]:
            fp[rows] = fp[rows] - (ratio[rows] * fp[rows]).sum() / ratio[rows].sum()
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
        loss, pseudo = f_dpg_loss(logp, batch.logq, batch.log_target, self.row_log_z(batch), divergence=c.divergence,
                                  baseline=c.baseline, group=batch.group.cpu() if self.per_context else None)
        return loss, {"loss/pseudo_reward_mean": float(pseudo.mean())}
