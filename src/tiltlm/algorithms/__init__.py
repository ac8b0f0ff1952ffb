"""Algorithms: one small loss per file behind a registry; the training loop runs them all.

`get_algorithm("kl-pg", estimator="k1")` builds one; unknown names list the available ones. Every module of
this package is imported, so a new algorithm is one new file with a ``@register_algorithm`` class.
"""

from tiltlm.algorithms.base import Algorithm, Batch, available_algorithms, get_algorithm, register_algorithm
from tiltlm.algorithms.inference import (
    InferenceResult,
    best_of_n,
    best_of_n_exact_distribution,
    importance_resample,
    qrs_acceptance_exact,
    qrs_exact_distribution,
    quasi_rejection_sample,
)
from tiltlm.algorithms.smc import LogZBounds, SMCResult, exact_posterior, log_z_bounds, reward_twist, smc
from tiltlm.registry import import_submodules

import_submodules(__name__, __path__)  # every module here registers its algorithms: a new one is one new file

__all__ = [
    "Algorithm", "Batch", "InferenceResult", "available_algorithms", "best_of_n", "best_of_n_exact_distribution",
    "get_algorithm", "importance_resample", "qrs_acceptance_exact", "qrs_exact_distribution", "quasi_rejection_sample",
    "register_algorithm",
    "LogZBounds", "SMCResult", "exact_posterior", "log_z_bounds", "reward_twist", "smc",  # tiltlm.algorithms.smc
]
