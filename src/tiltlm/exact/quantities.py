"""Exact divergences and expectations over an enumerated space, from log-prob vectors (float64).

Zero-probability sequences contribute 0 (0 · log 0 = 0); a divergence KL(p||q) is +inf when p puts
mass where q has none.
"""

from __future__ import annotations

import math

import torch

from tiltlm.exact.enumerate import SequenceSpace
from tiltlm.targets.base import Target


def normalise(log_p: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(log p, log Z) for an unnormalised log P."""
    log_z = torch.logsumexp(log_p.double(), 0)
    if not torch.isfinite(log_z):
        from tiltlm.errors import TiltlmError

        raise TiltlmError("the target gives every sequence zero (or infinite) mass; loosen the constraint or check the reward")
    return log_p.double() - log_z, float(log_z)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(p || q) = sum_x p(x) (log p(x) - log q(x)) for normalised log-prob vectors.

    The one KL of tiltlm.exact (sequences here, trajectories in tiltlm.exact.mdp). Support rule:
    x with p(x) = 0 contributes 0 (0 · log(0/q) = 0), any x with p(x) > 0 = q(x) makes it +inf.
    The sum is clamped at 0, so rounding (or float32-normalised inputs) never reads as a negative KL.
    """
    p = log_p.exp()
    support = p > 0
    if bool((support & torch.isneginf(log_q)).any()):
        return math.inf
    return float((p[support] * (log_p[support] - log_q[support])).sum().clamp(min=0.0))


def tv(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Total variation ½ sum_x |p(x) - q(x)|."""
    return float(0.5 * (log_p.exp() - log_q.exp()).abs().sum())


def entropy(log_p: torch.Tensor) -> float:
    """H(p) = -sum_x p(x) log p(x) in nats."""
    p = log_p.exp()
    support = p > 0
    return float(-(p[support] * log_p[support]).sum())


def expectation(log_p: torch.Tensor, values: torch.Tensor) -> float:
    p = log_p.exp()
    support = p > 0
    return float((p[support] * values.double()[support]).sum())


def exact_report(space: SequenceSpace, target: Target, policy=None, *, prior_logp: torch.Tensor | None = None) -> dict:
    """Every exact quantity of pi0, p* (and a policy) over the space; keys match `tiltlm exact --json`.

    ``space`` should be enumerated with the target's prior (then its log-probs are pi0's);
    ``reward_*`` use the target's Tilt reward; without a Tilt, the constraints' 0/1 indicator (Target.score:
    reward_prior is then pi0's pass rate, exp(log_z)), or 0 without constraints either.
    """
    log_pi0 = space.logp if prior_logp is None else prior_logp.double()
    mass = float(log_pi0.exp().sum())
    log_target, log_z = normalise(log_pi0 + target.log_potential(space.samples))
    tilt = target.tilt
    if tilt is not None:
        rewards = tilt.reward(space.samples.texts, [space.context] * len(space))
    else:
        rewards = target.score(space.samples, prior_logp=log_pi0).reward
    out = {
        "n_sequences": len(space),
        "prior_mass": mass,
        "log_z": log_z,
        "reward_prior": expectation(log_pi0, rewards),
        "reward_target": expectation(log_target, rewards),
        "kl_target_prior": kl(log_target, log_pi0),
        "kl_prior_target": kl(log_pi0, log_target),
        "tv_prior_target": tv(log_pi0, log_target),
        "entropy_prior": entropy(log_pi0),
        "entropy_target": entropy(log_target),
    }
    if policy is not None:
        log_pi = space.log_prob(policy)
        out.update(
            policy_mass=float(log_pi.exp().sum()),
            reward_policy=expectation(log_pi, rewards),
            kl_target_policy=kl(log_target, log_pi),
            kl_policy_target=kl(log_pi, log_target),
            kl_policy_prior=kl(log_pi, log_pi0),
            tv_policy_target=tv(log_pi, log_target),
            entropy_policy=entropy(log_pi),
        )
    return out
