"""Monte-Carlo estimates of log Z and divergences, each with a standard error and a 95% interval.

Inputs are per-sample log-quantities (float tensors, (N,)) for samples x_i ~ q:
``log_target`` = log P(x_i) (unnormalised p*), ``log_proposal`` = log q(x_i), ``log_policy`` = log pi(x_i).
Importance weights w_i = P(x_i)/q(x_i) are handled in log space (shifted by their max), so rewards
of ±1e3 and tiny beta never overflow. Intervals are normal approximations (delta method for the
self-normalised estimators); they are honest only when the effective sample size is not tiny, so
every estimate carries its ESS.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float
    n: int
    ess: float

    @property
    def low(self) -> float:
        return self.value - Z95 * self.stderr

    @property
    def high(self) -> float:
        return self.value + Z95 * self.stderr

    def as_dict(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high}


def _d(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().cpu()


def _mean_estimate(values: torch.Tensor) -> Estimate:
    n = values.shape[0]
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate(float(values.mean()), se, n, float(n))


def effective_sample_size(log_w: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2, computed in log space."""
    log_w = _d(log_w)
    if not torch.isfinite(log_w).any():
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def _normalised_weights(log_w: torch.Tensor) -> torch.Tensor:
    return torch.softmax(log_w, 0)


def log_z(log_target: torch.Tensor, log_proposal: torch.Tensor) -> Estimate:
    """log Z_hat = log mean_i P(x_i)/q(x_i); stderr by the delta method, se(Z_hat)/Z_hat."""
    log_w = _d(log_target) - _d(log_proposal)
    n = log_w.shape[0]
    value = float(torch.logsumexp(log_w, 0) - math.log(n))
    if not math.isfinite(value):
        return Estimate(value, math.nan, n, 0.0)
    w = torch.exp(log_w - torch.logsumexp(log_w, 0)) * n  # w_i / mean(w), mean 1
    se = float(w.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate(value, se, n, effective_sample_size(log_w))


def kl_target_policy(log_target: torch.Tensor, log_proposal: torch.Tensor, log_policy: torch.Tensor) -> Estimate:
    """KL(p* || pi) by self-normalised IS: sum_i w~_i (log P_i - log Z_hat - log pi_i)."""
    log_target, log_proposal, log_policy = _d(log_target), _d(log_proposal), _d(log_policy)
    log_w = log_target - log_proposal
    wn = _normalised_weights(log_w)
    lz = log_z(log_target, log_proposal).value
    keep = wn > 0
    f = torch.zeros_like(log_w)
    f[keep] = log_target[keep] - lz - log_policy[keep]
    value = float((wn * f).sum())
    se = float(torch.sqrt((wn**2 * (f - value) ** 2).sum()))
    return Estimate(value, se, log_w.shape[0], effective_sample_size(log_w))


def kl_policy_target(log_target: torch.Tensor, log_policy: torch.Tensor, log_z_value: float) -> Estimate:
    """KL(pi || p*) from samples of pi: mean(log pi - log P) + log Z (log Z from elsewhere, e.g. exact or IS)."""
    est = _mean_estimate(_d(log_policy) - _d(log_target))
    return Estimate(est.value + log_z_value, est.stderr, est.n, est.ess)


def tv_target_policy(log_target: torch.Tensor, log_proposal: torch.Tensor, log_policy: torch.Tensor) -> Estimate:
    """TV(p*, pi) = ½ E_q[|p*(x) - pi(x)| / q(x)], with p* = P / Z_hat."""
    log_target, log_proposal, log_policy = _d(log_target), _d(log_proposal), _d(log_policy)
    lz = log_z(log_target, log_proposal).value
    terms = 0.5 * (torch.exp(log_target - lz - log_proposal) - torch.exp(log_policy - log_proposal)).abs()
    est = _mean_estimate(terms)
    return Estimate(est.value, est.stderr, est.n, effective_sample_size(log_target - log_proposal))


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_policy_prior(log_policy: torch.Tensor, log_prior: torch.Tensor, estimator: str = "k1") -> Estimate:
    """Sequence-level KL(pi || pi0) from samples of pi, with l = log pi0 - log pi per sequence:
    k1 = -l (unbiased, can be negative per sample), k2 = l²/2 (biased, low variance),
    k3 = (e^l - 1) - l (unbiased, >= 0 per sample).
    """
    log_ratio = _d(log_prior) - _d(log_policy)
    if estimator == "k1":
        values = -log_ratio
    elif estimator == "k2":
        values = 0.5 * log_ratio**2
    elif estimator == "k3":
        values = torch.expm1(log_ratio) - log_ratio
    else:
        from tiltlm.errors import TiltlmError

        raise TiltlmError(f"unknown KL estimator '{estimator}'; available: {', '.join(KL_ESTIMATORS)}")
    return _mean_estimate(values)
