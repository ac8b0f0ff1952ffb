"""Per-sample estimators of divergences and log Z with confidence intervals."""

from tiltlm.metrics.divergences import (
    Estimate,
    effective_sample_size,
    kl_policy_prior,
    kl_policy_target,
    kl_target_policy,
    log_z,
    tv_target_policy,
)
from tiltlm.metrics.diversity import (
    coverage_exact,
    coverage_is,
    distinct_n,
    distinct_n_tokens,
    expected_sample_coverage,
    pass_at_k,
    pass_at_k_groups,
    self_bleu,
    sequence_entropy,
)

__all__ = [
    "Estimate", "coverage_exact", "coverage_is", "distinct_n", "distinct_n_tokens", "effective_sample_size",
    "expected_sample_coverage", "kl_policy_prior", "kl_policy_target", "kl_target_policy", "log_z", "pass_at_k",
    "pass_at_k_groups", "self_bleu", "sequence_entropy", "tv_target_policy",
]
