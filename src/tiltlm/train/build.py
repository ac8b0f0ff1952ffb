"""Config -> parts: the policy, the frozen prior and the target a TrainConfig describes, and the parts the
Trainer assembles around them (environment, episode runner, vLLM generator, optimiser, exact metrics).

Without LoRA the prior is its own frozen copy of the weights. With LoRA the policy is a peft model
and the prior is *the same* model with its adapters disabled: pi0 costs no second copy.
"""

from __future__ import annotations

import torch

from tiltlm.algorithms.base import algorithm_class
from tiltlm.errors import TiltlmError
from tiltlm.policies.hf import HFPolicy, load_model_and_tokenizer
from tiltlm.targets.base import Target
from tiltlm.train.config import TrainConfig


def build_policies(config: TrainConfig, *, chat_template: bool | None = None) -> tuple[HFPolicy, HFPolicy]:
    """(policy, prior) for the config; the prior's weights never require grad. ``chat_template``: contexts are
    the user's message of a chat (HFPolicy's option; None = when the tokenizer has a chat template)."""
    s = config.sampling
    if chat_template is None:  # sampling.chat_template, once the config has it
        chat_template = getattr(s, "chat_template", None)
    options = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, chat_template=chat_template,
                   sampler=s.sampler)
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
    # the policy trains here: on CPU its gradients and optimiser state share this memory (the load checks room for them)
    trained_with = None if torch.cuda.is_available() else config.optim.optimizer
    policy_model, policy_tokenizer = load_model_and_tokenizer(config.policy or config.prior, trained_with=trained_with)
    if policy_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TiltlmError("the policy's tokenizer differs from the prior's; both must share one vocabulary")
    return HFPolicy(policy_model, tokenizer, **options), HFPolicy(prior_model, tokenizer, **options)


def build(config: TrainConfig, *, chat_template: bool | None = None) -> tuple[HFPolicy, Target]:
    """(policy, target) ready for Trainer (``chat_template``: see build_policies)."""
    policy, prior = (build_tabular_env_policies(config) if _tabular_env(config)
                     else build_policies(config, chat_template=chat_template))
    if hasattr(policy, "checkpoint_layers"):  # HF policies: recompute each layer in backward (less memory)
        policy.checkpoint_layers = config.optim.checkpoint_layers
    check_sizes(config, policy)
    return policy, target_from_config(config, prior)


def check_sizes(config: TrainConfig, policy) -> None:
    """Refuse, before the run starts, batches that cannot fit the model's window or the device's memory: a
    step's samples (n_per_context for each context, or each prompt drawn) and an evaluation's (eval.n per prompt)."""
    from tiltlm.policies.base import check_batch_size

    s = config.sampling
    if config.env is not None:
        tokens, tokens_name, contexts = config.env.max_action_tokens, "env.max_action_tokens", config.env.tasks_per_step or 1
    else:
        tokens, tokens_name = s.max_new_tokens, "sampling.max_new_tokens"
        contexts = len(s.contexts) if config.data is None else config.data.prompts_per_step or 1  # at least one prompt
    check_batch_size(policy, contexts * s.n_per_context, tokens, rows_name="sampling.n_per_context", tokens_name=tokens_name)
    if config.eval is not None:
        check_batch_size(policy, config.eval.n, tokens, rows_name="eval.n", tokens_name=tokens_name)


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


def target_from_config(config: TrainConfig, prior) -> Target:
    """Prior(pi0) [* Tilt(reward, beta)] * Constraint(c) for each constraint of the config (no tilt when
    target.reward is null: the prior conditioned on the constraints); every reward call is limited to
    target.reward_timeout_s seconds."""
    from tiltlm.rewards import get_reward
    from tiltlm.targets import make_target

    reward = config.target.reward
    r = config.rollout
    if reward is not None and r.backend == "ray" and r.rewards and reward != "env":  # an expensive reward model: on Ray actors
        from tiltlm.distributed.ray_rollout import ray_reward

        reward = ray_reward(reward, num_workers=r.num_workers, address=r.address, cpus_per_worker=r.cpus_per_worker)
    limit = config.target.reward_timeout_s
    reward = get_reward(reward).limited(limit) if reward is not None else None
    constraints = [get_reward(c).limited(limit) for c in config.target.constraints]
    if reward is None and not constraints and algorithm_class(config.algorithm.name).offline_pairs:
        from tiltlm.targets import Prior

        return Prior(prior)  # offline dpo/ipo/cdpo without a reward: the pairs are the evidence, target.beta the DPO beta
    return make_target(prior, reward=reward, beta=config.target.beta, constraints=constraints)


def check_rows(target: Target, *datas) -> None:
    """Refuse, before anything is sampled, prompt data (tiltlm.data.PromptData, or None) with a row that lacks a
    column the target's reward or a constraint needs (Reward.needs: a user function's required parameters, a
    verifier's column): one line naming the first such row and the column."""
    tilt = target.tilt
    rewards = ([tilt.reward] if tilt is not None else []) + [c.predicate for c in target.constraints]
    for data in datas:
        if data is None:
            continue
        numbers = [f"{data.numbered_as} {n}" for n in data.numbers]
        for reward in rewards:
            if hasattr(reward, "check_rows"):
                reward.check_rows(data.columns, numbers, data.source)


def trainable_module(policy) -> torch.nn.Module:
    """The nn.Module holding a policy's trainable weights (the tabular policy itself, or the HF model)."""
    return policy if isinstance(policy, torch.nn.Module) else policy.model


def build_env(config: TrainConfig):
    """The environment of the interactive case (None without an env: section)."""
    from tiltlm.envs import get_env

    return get_env(config.env.name, **config.env.options) if config.env is not None else None


def build_runner(config: TrainConfig, env):
    """Ray actors that play the episodes (rollout.backend: ray), else None (this process)."""
    r = config.rollout
    if env is None or r.backend == "local":
        return None
    from functools import partial

    from tiltlm.distributed.ray_rollout import RayEpisodes
    from tiltlm.envs import get_env

    e = config.env
    return RayEpisodes(partial(get_env, e.name, **e.options), num_workers=r.num_workers, address=r.address,
                       cpus_per_worker=r.cpus_per_worker)


def build_generator(config: TrainConfig, policy, env):
    """The vLLM engine that samples for the policy (rollout.generation: vllm), else None (the policy samples)."""
    if config.rollout.generation == "policy":
        return None
    if env is not None:
        raise TiltlmError("rollout.generation: vllm samples fixed contexts only; environment episodes use the policy (drop it)")
    from tiltlm.distributed.vllm_backend import VLLMGenerator

    return VLLMGenerator(policy)


def build_optimizer(config: TrainConfig, module: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TiltlmError("the policy has no trainable parameters; check that its weights require grad")
    o = config.optim
    if o.optimizer == "adam":  # not fused: its rounding differs, and Adam amplifies rounding where a gradient is ~0, so a
        # fused one-process run and an FSDP run (DTensor, unfused) would part (tests/test_fsdp.py)
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)


def build_exact(config: TrainConfig, target: Target, env, data=None) -> list | None:
    """Exact metrics of the policy, one per context (None when off or the space is not enumerable): over the
    enumerated sequence space, or over a tabular environment's trajectories when the target is Prior * Tilt(env).
    With a prompt dataset (``data``, tiltlm.data.PromptData: the training prompts) the contexts are its prompts,
    each scored with its row's columns: the metrics average the conditional p*(.|x) over the training prompts."""
    from tiltlm.envs.tabular import TabularEnv
    from tiltlm.exact import count_sequences
    from tiltlm.exact.mdp import ExactEnvMetrics
    from tiltlm.metrics.batch import exact_for_context

    m = config.metrics
    prior = target.prior
    if not m.exact_every:
        return None
    if env is not None:
        tilt = target.tilt
        if not isinstance(env, TabularEnv) or tilt is None or tilt.reward.name != "env" or len(target.factors) != 1:
            return None
        return [ExactEnvMetrics(env, prior.log_action_probs(), tilt.beta)]
    if count_sequences(prior.vocab_size, config.sampling.max_new_tokens, at_most=m.exact_max_sequences) > m.exact_max_sequences:
        return None  # not enumerable: estimates only
    contexts = [(c, None) for c in config.sampling.contexts] if data is None else [(p, data.row(i)) for i, p in enumerate(data.prompts)]
    gold = build_gold(config)
    return [exact_for_context(target, context, row=row, max_new_tokens=config.sampling.max_new_tokens,
                              max_sequences=m.exact_max_sequences, gold=gold) for context, row in contexts]


def build_gold(config: TrainConfig):
    """metrics.gold as a Reward (None without one), limited like the target's rewards (target.reward_timeout_s)."""
    from tiltlm.rewards import get_reward

    spec = config.metrics.gold
    return None if spec is None else get_reward(spec).limited(config.target.reward_timeout_s)


def fit(config: TrainConfig, out_dir, *, resume: bool = False, accept_config: bool = False, log: str | None = None,
        progress: bool = False):
    """Build everything ``config`` describes, train it into ``out_dir`` with the trackers ``log`` names
    ("tensorboard,wandb,mlflow"; metrics.jsonl is always written) and return (trainer, metrics rows):
    what ``tiltlm train`` and every sweep cell run. A resume with a config other than the run's is refused
    unless ``accept_config`` (tiltlm.train.rundir)."""
    import json
    from pathlib import Path

    from tiltlm.train.loggers import LoggerGroup, make_loggers
    from tiltlm.train.loop import Trainer

    policy, target = build(config)
    trainer = Trainer(config, policy=policy, target=target, out_dir=out_dir, resume=resume, accept_config=accept_config)
    try:
        trackers = LoggerGroup(make_loggers(log if trainer.strategy.writes else None, Path(out_dir), json.loads(config.model_dump_json())))
        trainer.on_metrics = trackers
        try:
            rows = trainer.run(progress=progress)
        finally:
            trackers.close()
    except (TiltlmError, OSError) as e:  # a new run that fails before its first checkpoint leaves --out as it found it
        trainer.close()
        trainer.run_dir.abandon()
        if isinstance(e, OSError) and trainer.run_dir.has_checkpoint():  # a full disk mid-run: what is kept, how to go on
            from tiltlm.io import describe_os_error

            raise TiltlmError(f"{describe_os_error(e)}; the run keeps its last checkpoint, and `--resume` continues it "
                              "after the fix") from e
        raise
    return trainer, rows


def train(config: TrainConfig, *, policy, target: Target, out_dir=None, resume: bool = False, progress: bool = False) -> list[dict]:
    """Train ``policy`` toward ``target`` with ``config``; returns the metrics rows."""
    from tiltlm.train.loop import Trainer

    return Trainer(config, policy=policy, target=target, out_dir=out_dir, resume=resume).run(progress=progress)
