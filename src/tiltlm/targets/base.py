"""Targets: an unnormalised log P(x) = log pi0(x) + log phi(x) that composes with ``*``.

    target = Prior(pi0) * Tilt("sentiment", beta=0.1) * Constraint("contains:dog")
    target.log_score(samples)   # (B,) float64 unnormalised log P(x)
    target.score(samples)       # (log pi0(x), log P(x), r(x)): all a training step needs, each computed once

    Prior(pi0) * Constraint("contains:dog")   # constraint-only: pi0 conditioned on the predicate (reward = 1[holds])

A *factor* is the log-potential log phi(x) beside the prior; factors multiply (their log-potentials
add). Everything is in log space so small beta, large rewards and hard constraints (log 0 = -inf)
never overflow.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Policy, Samples


def _as_reward(spec):
    from tiltlm.rewards import get_reward

    return get_reward(spec)


def rewards_of(reward, samples: Samples) -> torch.Tensor:
    """r(x) for each sample, (B,) float64. The reward ``env`` is the return R(tau) of an environment
    rollout (the sum of its per-turn rewards); any other reward scores the policy's text, given its prompt
    and, for samples of a prompt dataset, its row's other columns (one value per sample)."""
    if reward.name == "env":
        return samples.env_return
    group = samples.group.tolist()
    columns = {k: [v[g] for g in group] for k, v in (getattr(samples, "columns", None) or {}).items()}
    return reward(samples.texts, [samples.contexts[g] for g in group], columns)


class Factor:
    """A log-potential log phi(x) >= -inf; ``a * b`` is the product of potentials."""

    def log_potential(self, samples: Samples) -> torch.Tensor:  # (B,) float64
        raise NotImplementedError

    def __mul__(self, other: "Factor") -> "Factor":
        if isinstance(other, Target):
            return other * self
        if not isinstance(other, Factor):
            return NotImplemented
        return Product((*_factors(self), *_factors(other)))


def _factors(f: Factor) -> tuple[Factor, ...]:
    return f.factors if isinstance(f, Product) else (f,)


class Product(Factor):
    """phi(x) = prod_i phi_i(x): the sum of log-potentials."""

    def __init__(self, factors: tuple[Factor, ...] = ()):
        self.factors = tuple(factors)

    def log_potential(self, samples: Samples) -> torch.Tensor:
        total = torch.zeros(len(samples), dtype=torch.float64)
        for f in self.factors:
            total = total + f.log_potential(samples)
        return total

    def __repr__(self) -> str:
        return " * ".join(map(repr, self.factors)) or "1"


class Tilt(Factor):
    """phi(x) = exp(r(x)/beta): the Bayesian posterior p(x | y=1) with p(y=1|x) ∝ exp(r(x)/beta).

    beta -> 0 is the hardmax (all mass on argmax r); beta -> inf gives back the prior.
    """

    def __init__(self, reward, beta: float):
        beta = float(beta)
        if not beta > 0:  # also rejects NaN
            raise TiltlmError(
                f"beta must be > 0 (got {beta}); beta -> 0 is pure reward maximisation (use the reinforce algorithm), large beta stays near the prior"
            )
        self.reward = _as_reward(reward)
        self.beta = beta

    def log_potential(self, samples: Samples) -> torch.Tensor:
        return self.from_reward(rewards_of(self.reward, samples))

    def from_reward(self, reward: torch.Tensor) -> torch.Tensor:
        """log phi = r/beta for rewards already computed, (B,) float64 (0 for beta = inf)."""
        if math.isinf(self.beta):
            return torch.zeros_like(reward)
        return reward / self.beta

    def __repr__(self) -> str:
        return f"Tilt({self.reward.name!r}, beta={self.beta:g})"


class Constraint(Factor):
    """phi(x) = b(x) in {0, 1}: keep only the sequences that satisfy the predicate.

    ``predicate`` is a reward spec / callable whose value > 0 means satisfied (e.g. ``"contains:dog"``).
    log phi is 0 or -inf, never NaN.
    """

    def __init__(self, predicate: str | Callable):
        self.predicate = _as_reward(predicate)

    def log_potential(self, samples: Samples) -> torch.Tensor:
        ok = rewards_of(self.predicate, samples) > 0
        return torch.where(ok, 0.0, float("-inf")).double()

    def __repr__(self) -> str:
        return f"Constraint({self.predicate.name!r})"


class Scores(NamedTuple):
    """What the target says of a batch of samples, (B,) float64 each."""

    logp_prior: torch.Tensor  # log pi0(x)
    log_target: torch.Tensor  # unnormalised log P(x) = log pi0(x) + log phi(x)
    reward: torch.Tensor  # r(x) of the tilt; without one, 1[every constraint holds] (0 without constraints either)


class Target:
    """P(x) = pi0(x) · phi(x), with pi0 a Policy (the frozen prior) and phi a product of factors."""

    def __init__(self, prior: Policy, factor: Factor | None = None):
        self.prior = prior
        self.factor = factor if factor is not None else Product(())

    def score(self, samples: Samples, prior_logp: torch.Tensor | None = None) -> Scores:
        """(log pi0, log P, r) of each sample: the one place a training step scores its samples. The tilt's
        reward is computed once and serves both log P and the reward column. Pass ``prior_logp`` when log pi0
        is already known (the sampler was the prior).

        Without a Tilt the reward column is the constraints' indicator 1[b(x) = 1 for every Constraint] (0/1),
        so the constraint-only target p*(y|x) ∝ pi0(y|x)·b(x, y) ("the base model conditioned on being
        right", the beta -> inf limit of a tilt times a hard constraint) gives reinforce a reward and the
        metrics a pass rate (reward/mean, reward/exact); 0 when there are no constraints either."""
        if prior_logp is None:
            prior_logp = self.prior.log_prob(samples)
        prior_logp = prior_logp.double().cpu()
        tilt = self.tilt
        reward = rewards_of(tilt.reward, samples) if tilt is not None else torch.zeros(len(samples), dtype=torch.float64)
        log_potential = torch.zeros(len(samples), dtype=torch.float64)
        holds = torch.ones(len(samples), dtype=torch.bool)  # every constraint satisfied
        for factor in self.factors:
            term = tilt.from_reward(reward) if factor is tilt else factor.log_potential(samples)
            if isinstance(factor, Constraint):
                holds = holds & ~torch.isneginf(term)
            log_potential = log_potential + term
        if tilt is None and self.constraints:
            reward = holds.double()
        return Scores(prior_logp, prior_logp + log_potential, reward)

    def log_score(self, samples: Samples, prior_logp: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised log P(x), (B,) float64. Pass ``prior_logp`` when log pi0 is already known."""
        return self.score(samples, prior_logp).log_target

    def log_potential(self, samples: Samples) -> torch.Tensor:
        """log phi(x) = log P(x) - log pi0(x), (B,) float64."""
        return self.factor.log_potential(samples)

    @property
    def factors(self) -> tuple[Factor, ...]:
        return _factors(self.factor)

    @property
    def constraints(self) -> tuple[Constraint, ...]:
        return tuple(f for f in self.factors if isinstance(f, Constraint))

    @property
    def tilt(self) -> Tilt | None:
        """The first Tilt factor (its reward is the one reports show), or None."""
        return next((f for f in self.factors if isinstance(f, Tilt)), None)

    @property
    def verifier(self):
        """The reward a held-out evaluation scores with: the tilt's reward, or for a constraint-only target the
        indicator that every constraint holds (a Reward; None for the prior alone)."""
        if self.tilt is not None:
            return self.tilt.reward
        constraints = self.constraints
        if not constraints:
            return None
        from tiltlm.rewards.base import Reward

        def indicator(texts, contexts=None, **columns):
            ok = torch.ones(len(texts), dtype=torch.bool)
            for c in constraints:
                ok &= c.predicate(texts, contexts, columns or None) > 0
            return ok.double().tolist()

        return Reward("1[" + " and ".join(c.predicate.name for c in constraints) + "]", indicator)

    @property
    def beta(self) -> float | None:
        """The tilt's temperature (p* ∝ pi0·exp(r/beta)): also the KL coefficient of the KL-regularised
        algorithms, which read it from here (via Batch.beta) so that training and metrics aim at one p*.
        None without a tilt."""
        tilt = self.tilt
        return tilt.beta if tilt is not None else None

    def __mul__(self, other: Factor) -> "Target":
        if not isinstance(other, Factor):
            return NotImplemented
        return Target(self.prior, Product((*self.factors, *_factors(other))))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Prior * {self.factor!r}" if self.factors else "Prior"


def Prior(policy: Policy) -> Target:  # noqa: N802 - reads as a constructor in target algebra
    """The prior alone as a target (phi = 1); multiply factors onto it."""
    return Target(policy)


def make_target(prior: Policy, *, reward=None, beta: float | None = None, constraints=()) -> Target:
    """Prior(pi0) [* Tilt(reward, beta)] * Constraint(c) for each c: the target a config's ``target:`` section
    describes (tiltlm.train.build.target_from_config).

    ``reward=None`` means no tilt: with constraints that is the constraint-only target
    p*(y|x) ∝ pi0(y|x)·1[every constraint holds] ("the base model conditioned on being right"), whose
    Z(x) is pi0's pass rate on x; ``beta`` is then unused. dpg, gdc++, f-dpg and reinforce (reward: the
    0/1 indicator, Target.score) train toward it; kl-pg and ppo-kl need a tilt's beta and refuse it.
    """
    if reward is None and not constraints:
        raise TiltlmError("the target has neither a reward nor a constraint (p* would be the prior itself); set target.reward "
                          "or target.constraints")
    target = Prior(prior)
    if reward is not None:
        if beta is None:
            raise TiltlmError("a reward tilts the prior by exp(r/beta); give target.beta (> 0)")
        target = target * Tilt(reward, beta)
    for c in constraints:
        target = target * Constraint(c)
    return target
