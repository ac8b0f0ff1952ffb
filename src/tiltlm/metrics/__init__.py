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

__all__ = ["Estimate", "effective_sample_size", "kl_policy_prior", "kl_policy_target", "kl_target_policy", "log_z", "tv_target_policy"]
