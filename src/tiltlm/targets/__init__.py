"""Target algebra: Prior(pi0) * Tilt(reward, beta) * Constraint(predicate) * Moments(features, targets)."""

from tiltlm.targets.base import Constraint, Factor, Prior, Product, Target, Tilt, make_target
from tiltlm.targets.moments import MomentFit, Moments, fit_lambdas

__all__ = ["Constraint", "Factor", "MomentFit", "Moments", "Prior", "Product", "Target", "Tilt", "fit_lambdas", "make_target"]
