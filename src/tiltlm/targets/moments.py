"""Moment constraints (GDC, Khalifa et al. 2021): p_lambda(x) ∝ pi0(x) exp(lambda · phi(x)).

Among all p with E_p[phi] = mu_bar, p_lambda is the one closest to pi0 in KL(p || pi0). lambda
minimises the convex dual  L(lambda) = log Z(lambda) - lambda · mu_bar, whose gradient is
mu(lambda) - mu_bar and whose Hessian is Cov_lambda(phi). mu(lambda) is estimated by self-normalised
importance sampling over samples x_i with log-weights log w_i (0 for samples of pi0; log pi0(x_i)
over an enumerated space, which makes the fit exact):

    mu_hat(lambda) = sum_i softmax(log w + Phi lambda)_i phi_i

We take damped Newton steps on L rather than the fixed-rate gradient iteration
lambda <- lambda + eta (mu_bar - mu_hat) of the paper: the same fixed point, reached in a handful
of steps even when a moment is near the edge of what the samples can express.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Samples
from tiltlm.targets.base import Factor, _as_reward, rewards_of


@dataclass(frozen=True)
class MomentFit:
    """The result of fitting lambda: achieved moments (under the fitting weights) and the fit error."""

    lambdas: tuple[float, ...]
    targets: tuple[float, ...]
    achieved: tuple[float, ...]
    error: float  # max_i |achieved_i - target_i|
    iterations: int
    ess: float  # effective sample size of the final self-normalised weights


def fit_lambdas(
    phi: torch.Tensor,
    targets: torch.Tensor,
    log_weights: torch.Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 200,
    init: torch.Tensor | None = None,
) -> MomentFit:
    """Solve mu(lambda) = targets. phi: (N, k) features; log_weights: (N,) or None (plain samples)."""
    phi = phi.double()
    targets = targets.double()
    n, k = phi.shape
    logw = torch.zeros(n, dtype=torch.float64) if log_weights is None else log_weights.double()
    lo, hi = phi[torch.isfinite(logw)].min(0).values, phi[torch.isfinite(logw)].max(0).values
    if bool(((targets < lo) | (targets > hi)).any()):
        raise TiltlmError(
            f"requested moments {targets.tolist()} lie outside the range of the features on these samples "
            f"(min {lo.tolist()}, max {hi.tolist()}); request moments the prior can reach or draw more samples"
        )
    lam = torch.zeros(k, dtype=torch.float64) if init is None else init.double().clone()

    def dual(l: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logw + phi @ l, 0) - l @ targets

    iterations = 0
    for iterations in range(1, max_iter + 1):
        q = torch.softmax(logw + phi @ lam, 0)  # (N,)
        mu = q @ phi  # (k,)
        grad = mu - targets
        if float(grad.abs().max()) < tol:
            break
        centred = phi - mu
        hess = (centred * q[:, None]).T @ centred + 1e-9 * torch.eye(k, dtype=torch.float64)
        step = -torch.linalg.solve(hess, grad)
        f0, t = dual(lam), 1.0
        while t > 1e-8 and float(dual(lam + t * step)) > float(f0) + 1e-4 * t * float(grad @ step):
            t *= 0.5
        lam = lam + t * step
    q = torch.softmax(logw + phi @ lam, 0)
    achieved = q @ phi
    return MomentFit(
        lambdas=tuple(lam.tolist()), targets=tuple(targets.tolist()), achieved=tuple(achieved.tolist()),
        error=float((achieved - targets).abs().max()), iterations=iterations, ess=float(1.0 / (q**2).sum()),
    )


class Moments(Factor):
    """phi(x) = exp(lambda · features(x)) with lambda fitted so that E_p[features] = targets.

    ``features`` are reward specs / callables (one per moment); call ``fit(samples_of_prior)`` (or
    ``fit(space.samples, log_weights=space.logp)`` for an exact fit) before scoring.
    """

    def __init__(self, features: list, targets: list[float], lambdas: list[float] | None = None):
        if len(features) != len(targets) or not features:
            raise TiltlmError(f"Moments needs one target per feature (got {len(features)} features, {len(targets)} targets)")
        self.features = [_as_reward(f) for f in features]
        self.targets = torch.tensor([float(t) for t in targets], dtype=torch.float64)
        self.lambdas = None if lambdas is None else torch.tensor(lambdas, dtype=torch.float64)
        self.fit_result: MomentFit | None = None

    def features_of(self, samples: Samples) -> torch.Tensor:
        """(B, k) float64 feature matrix."""
        return torch.stack([rewards_of(f, samples) for f in self.features], dim=1)

    def fit(self, samples: Samples, log_weights: torch.Tensor | None = None, *, tol: float = 1e-6, max_iter: int = 200) -> MomentFit:
        """Fit lambda on samples of pi0 (or on an enumerated space with log_weights = log pi0)."""
        self.fit_result = fit_lambdas(self.features_of(samples), self.targets, log_weights, tol=tol, max_iter=max_iter)
        self.lambdas = torch.tensor(self.fit_result.lambdas, dtype=torch.float64)
        return self.fit_result

    def log_potential(self, samples: Samples) -> torch.Tensor:
        if self.lambdas is None:
            raise TiltlmError("Moments has no fitted lambda; call .fit(samples_of_the_prior) first or pass lambdas")
        return self.features_of(samples) @ self.lambdas

    def __repr__(self) -> str:
        names = [f.name for f in self.features]
        return f"Moments({names}, targets={self.targets.tolist()})"
