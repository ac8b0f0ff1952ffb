"""KL-regularised policy gradient (RLOO / GRPO-style) = reverse-KL variational inference to p*.

J(theta) = E_pi[r] - beta KL(pi || pi0) = -beta KL(pi || p*) + beta log Z   (docs/math.md §2).
beta is the target's (``Batch.beta``): the KL coefficient and the tilt's temperature are one number.

Where the KL goes, with l = log pi0(x) - log pi(x) per sampled sequence, decides what is optimised
(on-policy; see also Tang & Munos 2025 on KL gradient estimators):

- ``kl_in="reward"``: pseudo-reward r - beta·k(l) with a leave-one-out baseline.
  * k1 (= log pi - log pi0): the exact, unbiased gradient of J. Optimum: p*. **The default.**
  * k2 (= l²/2) and k3 (= e^l - 1 - l) as rewards drop the pathwise term of d/dtheta k(l);
    they optimise neither J nor a known divergence exactly (k3's *value* is unbiased for the KL,
    its score-function-only gradient is not).
- ``kl_in="loss"``: policy gradient on r alone, plus beta·mean(k(l)) differentiated through log pi
  (GRPO places k3 here).
  * k1 in the loss has expected gradient E_pi[grad log pi] = 0: the KL does nothing; optimises E[r].
  * k2 in the loss: grad E[l²/2] = E[(log pi - log pi0) grad log pi] = grad KL(pi || pi0): correct.
  * k3 in the loss: expected gradient -E_pi0[grad log pi] = grad KL(pi0 || pi): the *forward* KL
    to the prior, a mass-covering regulariser; the optimum is not p*.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, Batch, kl_coefficient, leave_one_out, register_algorithm
from tiltlm.algorithms.reinforce import SetRewardConfig, policy_gradient_loss, shaped_reward


def kl_estimate(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-sample KL(pi||pi0) estimators of l = log pi0 - log pi: k1 = -l, k2 = l²/2, k3 = e^l - 1 - l."""
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(log_ratio) - log_ratio


def kl_pg_loss(
    logp: torch.Tensor, logq: torch.Tensor, logp_prior: torch.Tensor, reward: torch.Tensor, group: torch.Tensor,
    *, beta: float, kl_in: str = "reward", estimator: str = "k1", baseline: bool = True, logp_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss whose gradient is the chosen estimate (see module docstring); returns (loss, advantages).

    logp: (B,) log pi_theta with grad; logq: (B,) log-prob at sampling (= logp's value on-policy).
    logp_start: (B,) log pi at the step's start when this is a later minibatch of the step (Batch.logp_start): the
    KL term is then taken at the current weights and each row weighted by pi/pi_start (unbiased at pi).
    """
    weight = None
    if logp_start is not None:
        shift = logp.detach().double() - logp_start  # log pi_theta - log pi_start
        logq, weight = logq.double() + shift, torch.exp(shift)
    if kl_in == "reward":
        log_ratio = logp_prior.double() - logq.double()
        kl = beta * kl_estimate(log_ratio, estimator)
        if not baseline:  # set-level credits carry their own baseline; the KL part keeps the leave-one-out one
            kl = kl - leave_one_out(kl, group)
        return policy_gradient_loss(logp, reward.double() - kl, group, baseline=baseline, weight=weight)
    pg, adv = policy_gradient_loss(logp, reward, group, baseline=baseline, weight=weight)
    log_ratio = logp_prior.to(logp.dtype) - logp  # grad flows through log pi
    return pg + beta * kl_estimate(log_ratio, estimator).mean(), adv


class KlPgConfig(SetRewardConfig):
    """entropy_coef (an extra bonus beside the KL), set_reward, correct_threshold, k, set_baseline: as reinforce's."""

    kl_in: Literal["reward", "loss"] = Field("reward", description="put the KL in the reward or in the loss")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-sample KL estimator (module docstring)")


@register_algorithm
class KlPg(Algorithm):
    name = "kl-pg"
    needs_tilt = True
    Config = KlPgConfig

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        c = self.config
        reward, baseline = shaped_reward(batch, c)
        loss, adv = kl_pg_loss(logp, batch.logq, batch.logp_prior, reward, batch.group,
                               beta=kl_coefficient(batch, self.name), kl_in=c.kl_in, estimator=c.estimator, baseline=baseline,
                               logp_start=batch.logp_start)
        return loss, {"loss/advantage_abs": float(adv.abs().mean())}
