"""Build the policy, the frozen prior and the target that a TrainConfig describes (HF models).

Without LoRA the prior is its own frozen copy of the weights. With LoRA the policy is a peft model
and the prior is *the same* model with its adapters disabled: pi0 costs no second copy.
"""

from __future__ import annotations

import torch

from tiltlm.errors import TiltlmError
from tiltlm.policies.hf import HFPolicy, load_model_and_tokenizer
from tiltlm.targets.base import Target
from tiltlm.train.config import TrainConfig
from tiltlm.train.loop import target_from_config


def build_policies(config: TrainConfig) -> tuple[HFPolicy, HFPolicy]:
    """(policy, prior) for the config; the prior's weights never require grad."""
    s = config.sampling
    options = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
    if config.lora is not None:
        if config.policy not in (None, config.prior):
            raise TiltlmError("LoRA trains adapters on the prior itself; drop `policy:` or drop `lora:`")
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise TiltlmError("LoRA needs the package peft; pip install peft") from None
        model, tokenizer = load_model_and_tokenizer(config.prior)
        lora = config.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules) if lora.target_modules else None, task_type="CAUSAL_LM")
        try:
            # the adapters' random init comes from config.seed: a rerun, and every data-parallel rank, starts
            # from the same adapters (the global RNG is left as it was)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = get_peft_model(model, peft_config)
        except ValueError as e:
            raise TiltlmError(f"cannot add LoRA adapters ({str(e).splitlines()[0]}); set lora.target_modules to module names of this model") from None
        return HFPolicy(model, tokenizer, **options), HFPolicy(model, tokenizer, disable_adapters=True, **options)
    prior_model, tokenizer = load_model_and_tokenizer(config.prior)
    prior_model.requires_grad_(False)
    policy_model, policy_tokenizer = load_model_and_tokenizer(config.policy or config.prior)
    if policy_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TiltlmError("the policy's tokenizer differs from the prior's; both must share one vocabulary")
    return HFPolicy(policy_model, tokenizer, **options), HFPolicy(prior_model, tokenizer, **options)


def build(config: TrainConfig) -> tuple[HFPolicy, Target]:
    """(policy, target) ready for Trainer."""
    policy, prior = build_tabular_env_policies(config) if _tabular_env(config) else build_policies(config)
    return policy, target_from_config(config, prior)


def _tabular_env(config: TrainConfig) -> bool:
    return config.env is not None and config.env.name == "tabular"


def build_tabular_env_policies(config: TrainConfig):
    """A tabular environment brings its own exact prior (TabularEnvPolicy); the policy starts as its copy."""
    from tiltlm.envs import get_env

    if config.prior != "default" or config.lora is not None:
        raise TiltlmError("the tabular environment's prior is its own table; drop `prior:` and `lora:` from the config")
    prior = get_env("tabular", **config.env.options).make_prior()
    if config.policy is not None:
        from tiltlm.policies.tabular_env import TabularEnvPolicy

        policy = TabularEnvPolicy.load(config.policy)
        if policy.logits.shape != prior.logits.shape:
            raise TiltlmError(f"policy '{config.policy}' was trained on another tabular environment; start from the prior (drop `policy:`)")
        policy.env = prior.env
    else:
        policy = prior.copy()
    prior.requires_grad_(False)
    policy.requires_grad_(True)
    return policy, prior
