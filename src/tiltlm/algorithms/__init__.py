"""Algorithms: one small loss per file behind a registry; the training loop runs them all.

`get_algorithm("kl-pg", beta=0.1)` builds one; unknown names list the available ones.
"""

from tiltlm.algorithms.base import Algorithm, Batch, available_algorithms, get_algorithm, register_algorithm
from tiltlm.algorithms import dpg, f_dpg, kl_pg, ppo_kl, reinforce  # noqa: E402,F401  (fill the registry)
from tiltlm.algorithms.inference import (
    InferenceResult,
    best_of_n,
    best_of_n_exact_distribution,
    importance_resample,
    qrs_acceptance_exact,
    qrs_exact_distribution,
    quasi_rejection_sample,
)

__all__ = [
    "Algorithm", "Batch", "InferenceResult", "available_algorithms", "best_of_n", "best_of_n_exact_distribution",
    "get_algorithm", "importance_resample", "qrs_acceptance_exact", "qrs_exact_distribution", "quasi_rejection_sample",
    "register_algorithm",
]
