"""Policies: the narrow protocol (sample / log_prob / next_token_logprobs) and its backends."""

from tiltlm.policies.base import Policy, Samples, transform_logits
from tiltlm.policies.hf import HFPolicy, load_model_and_tokenizer, resolve_model_dir
from tiltlm.policies.tabular import TabularPolicy
from tiltlm.policies.tabular_env import TabularEnvPolicy

__all__ = ["HFPolicy", "Policy", "Samples", "TabularEnvPolicy", "TabularPolicy", "load_model_and_tokenizer", "resolve_model_dir", "transform_logits"]
