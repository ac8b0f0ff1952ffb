"""The training config: typed, frozen, one docstring per field, loaded from YAML or built in Python.

    prior: default                 # 'default' (embedded LM) or a save_pretrained directory
    target: {reward: sentiment, beta: 0.1, constraints: ["contains:dog"]}
    algorithm: {name: kl-pg, estimator: k1}     # its KL coefficient is target.beta
    sampling: {contexts: [""], n_per_context: 8, max_new_tokens: 32}
    optim: {lr: 1e-4, steps: 100}

Every problem (bad YAML, unknown keys, wrong types, unknown names) becomes one TiltlmError line.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from tiltlm.algorithms.base import AlgorithmConfig, algorithm_class, make_config
from tiltlm.errors import TiltlmError
from tiltlm.io import load_yaml


MAX_SEED = (2**63 - 1) // 1_000_003 - 1_000_003
"""Largest |seed|: step t draws with seed·1000003 + t (tiltlm.train.collect.step_seed), which torch takes as a
64-bit integer; this leaves room for a million steps (`TrainConfig` checks the run's own)."""

MAX_LR = 1e6
"""Largest optim.lr (and weight_decay): far past any that converges (the weights check stops such a run);
past ~3e38 torch cannot even apply the step to float32 weights (a traceback inside Adam)."""


def _seed_in_range(value: int | None) -> int | None:
    if value is not None and abs(value) > MAX_SEED:
        raise ValueError(f"must be between -{MAX_SEED} and {MAX_SEED} (got {value}): each step (or evaluation batch) draws "
                         "with seed·1000003 + its number, a 64-bit integer")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TargetConfig(_Strict):
    reward: str | None = Field("sentiment", description="reward spec: sentiment, contains:dog, mymod:f, …; null: no tilt, "
                                                        "p* ∝ pi0·1[constraints] (the prior conditioned on the constraints)")
    beta: float = Field(0.1, gt=0, allow_inf_nan=False, description="tilt temperature: p* ∝ pi0·exp(r/beta)")
    constraints: tuple[str, ...] = Field((), description="pointwise constraints b(x) (reward specs; > 0 means satisfied)")
    reward_timeout_s: float | None = Field(300.0, gt=0, allow_inf_nan=False, description="seconds one call of the reward (or of "
                                           "a constraint) may take on a batch before the run stops; null = no limit")


class SamplingConfig(_Strict):
    contexts: tuple[str, ...] = Field(("",), min_length=1, description="contexts to sample after ('' = just BOS)")
    n_per_context: int = Field(8, ge=2, description="samples per context per step (>= 2 for leave-one-out baselines)")
    max_new_tokens: int = Field(32, ge=1, description="length limit of a sequence")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="sampling temperature (at least 1e-6); log-probs account for it")

    @field_validator("temperature")
    @classmethod
    def _not_tiny(cls, value: float) -> float:
        from tiltlm.policies.base import MIN_TEMPERATURE

        if value < MIN_TEMPERATURE:
            raise ValueError(f"must be at least {MIN_TEMPERATURE:g} (got {value:g}): float32 logits divided by less overflow")
        return value
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass; log-probs account for it")
    sampler: Literal["gumbel", "inverse-cdf"] = Field(
        "gumbel", description="how a seed becomes tokens: gumbel (Exp(1) noise per vocabulary entry, the stream the README's "
                              "numbers were measured with) or inverse-cdf (one uniform per row and token: faster, the same "
                              "distribution and log-probs, other samples for a seed)")
    chat_template: bool | None = Field(None, description="contexts are the user's turn of a chat, rendered by the tokenizer's "
                                                         "chat template (the sample space is the reply); null = when the tokenizer has one")


class OptimConfig(_Strict):
    steps: int = Field(100, ge=1, description="optimiser steps (batches)")
    lr: float = Field(2e-4, gt=0, le=MAX_LR, allow_inf_nan=False, description="learning rate")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="torch.optim.Adam or plain SGD")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    weight_decay: float = Field(0.0, ge=0, le=MAX_LR, allow_inf_nan=False)
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="learning-rate decay to 0 over the run")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the schedule")
    checkpoint_layers: bool = Field(False, description="HF policies: recompute each decoder layer in backward instead of storing "
                                    "its activations (same numbers; less memory, a slower step: README 'Performance')")
    minibatch_size: int | None = Field(16, ge=1, description="rows per optimiser update: a larger batch is cut into "
                                       "minibatches, one update each (tiltlm.train.loop.minibatches); null: one update per batch")

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): a pure function of the step, so resuming needs no scheduler state."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.schedule == "linear":
            return self.lr * (1 - progress)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = Field(None, description="module names to adapt; null = peft's default for the architecture")


class MetricsConfig(_Strict):
    exact_every: int = Field(0, ge=0, description="exact metrics every N steps when the space is enumerable (0 = never)")
    exact_max_sequences: int = Field(200_000, ge=1, description="largest space enumerated for exact metrics")
    diversity: bool = Field(True, description="distinct-n and self-BLEU of each batch")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="estimator reported as kl/prior_seq")
    gold: str | None = Field(None, description="a reward to judge the policy by that training never sees (the gold reward "
                                               "beside a learned proxy): gold/mean on every batch, gold/exact with the exact metrics")


class EnvConfig(_Strict):
    """The interactive case: trajectories are played in an environment (tiltlm.envs) instead of sampled
    after fixed contexts; the target's reward defaults to ``env`` (the trajectory's return R(tau))."""

    name: str = Field(..., description="environment: tabular, search, api, dialogue, or any registered name")
    options: dict[str, Any] = Field(default_factory=dict, description="the environment's own options, e.g. {depth: 2} for tabular")
    tasks_per_step: int | None = Field(None, ge=1, description="tasks played per step, drawn by the step's seed; null = every task")
    max_action_tokens: int = Field(16, ge=1, description="length limit of one policy turn (an action ends at EOS or here)")
    timeout_s: float | None = Field(10.0, gt=0, description="a reset/step call running longer fails its episode; null = no limit")
    max_observation_chars: int = Field(2000, ge=1, description="longer observations are cut (and noted)")
    max_observation_tokens: int = Field(256, ge=1, description="observation tokens kept in the history")
    max_failure_rate: float = Field(0.2, ge=0, le=1, description="stop the run when more episodes than this fraction have failed")


class RolloutConfig(_Strict):
    """Where environment episodes (and, optionally, the reward) are computed. The policy always
    generates in the trainer's process, batched; workers only reset and step episodes, so a run's
    trajectories are the same for either backend (tiltlm.distributed.ray_rollout)."""

    backend: Literal["local", "ray"] = Field("local", description="local: env calls in this process; ray: on Ray actors")
    num_workers: int = Field(2, ge=1, description="Ray actors, each owning one copy of the environment (or reward model)")
    address: str | None = Field(None, description="Ray cluster address ('auto', 'ray://head:10001'); null = start a local Ray")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each actor")
    rewards: bool = Field(False, description="also compute the target's reward on Ray actors (an expensive reward model)")
    generation: Literal["policy", "vllm"] = Field("policy", description="on-policy sampling by the policy itself or by vLLM "
                                                   "(CUDA; weights synced after each step, log-probs recomputed by the policy)")


class DistributedConfig(_Strict):
    """How the weights are laid out over the processes of a torchrun / accelerate launch group
    (tiltlm.distributed). Either way each rank draws and backpropagates its share of the global batch
    and the run equals the one-process run; one process ignores this section."""

    strategy: Literal["replicate", "fsdp"] = Field(
        "replicate", description="replicate: every rank holds the whole model; fsdp: each rank holds 1/W of the weights, "
                                 "gradients and optimiser moments (torch FSDP2), for models that do not fit on one device")
    fsdp_units: tuple[str, ...] | None = Field(
        None, description="fsdp: module class names sharded as one unit each (gathered together); null = the model's "
                          "_no_split_modules (its transformer blocks)")
    reshard_after_forward: bool = Field(True, description="fsdp: free a unit's gathered weights after each forward; false "
                                                          "keeps them until the backward, so decoding gathers once, not per token")


class ReasoningGymConfig(_Strict):
    task: str = Field(..., description="a reasoning-gym task name, e.g. basic_arithmetic (offline, procedural)")
    size: int = Field(200, ge=1, description="problems generated")
    seed: int = Field(0, description="the generator's seed")
    config: dict[str, Any] = Field(default_factory=dict, description="the task's own options, e.g. {min_terms: 2}")


class DataConfig(_Strict):
    """A prompt dataset (tiltlm.data): each step samples n_per_context completions after each of
    ``prompts_per_step`` prompts drawn by the step's seed; the rows' other columns reach the reward."""

    path: str | None = Field(None, description="a .jsonl / .csv / .parquet file or a datasets.save_to_disk directory")
    prompt_column: str = Field("prompt", description="the column holding the prompts (text or chat messages)")
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = Field("auto", description="auto: by suffix / directory contents")
    split: str | None = Field(None, description="which split of a saved DatasetDict (default: train)")
    reasoning_gym: ReasoningGymConfig | None = Field(None, description="generate a reasoning-gym task instead of reading a file")
    prompts_per_step: int | None = Field(None, ge=1, description="prompts per step (preference pairs per step for dpo, ipo, cdpo), drawn by the step's seed; null = every one")
    eval_size: int | None = Field(None, ge=1, description="rows held out for evaluation (eval:)")
    eval_fraction: float | None = Field(None, gt=0, lt=1, description="fraction of rows held out (instead of eval_size)")
    eval_path: str | None = Field(None, description="a separate file of held-out prompts (same prompt_column and format; "
                                                    "instead of eval_size / eval_fraction)")
    split_seed: int = Field(0, ge=-(2**63), lt=2**63, description="seed of the train/eval split")
    chosen_column: str = Field("chosen", description="preference pairs (dpo, ipo, cdpo): the column of the preferred completions")
    rejected_column: str = Field("rejected", description="preference pairs: the column of the dispreferred completions")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.path is None) == (self.reasoning_gym is None):
            raise ValueError("give data.path (a prompt file) or data.reasoning_gym (a task), exactly one")
        if sum(x is not None for x in (self.eval_size, self.eval_fraction, self.eval_path)) > 1:
            raise ValueError("give one of data.eval_size, data.eval_fraction, data.eval_path")
        return self


class EvalConfig(_Strict):
    """Evaluation on the data's held-out prompts (tiltlm.evaluate): pass@k, reward, distinct correct answers
    and KL(pi‖pi0), logged as eval/… rows; pi0 at step 0 for comparison."""

    every: int = Field(0, ge=0, description="evaluate every N steps (0: only at step 0 and at the end)")
    n: int = Field(8, ge=1, description="completions per held-out prompt (pass@k for k = 1, 2, 4, … up to n)")
    seed: int | None = Field(None, description="sampling seed, the same at every evaluation; null = the run's seed")

    _seed = field_validator("seed")(_seed_in_range)
    at_start: bool = Field(True, description="evaluate the prior pi0 at step 0")
    exact: bool = Field(True, description="also the exact pass@k, distinct correct and KLs to p*(.|x) when pi0's space "
                                          "after a prompt has <= metrics.exact_max_sequences sequences (enumerated once per prompt)")


class CheckpointConfig(_Strict):
    every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")


class TrainConfig(_Strict):
    prior: str = Field("default", description="the frozen prior pi0: 'default' or a save_pretrained directory")
    policy: str | None = Field(None, description="initial policy directory; null = a copy of the prior")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of all weights (prior shares the base)")
    target: TargetConfig = TargetConfig()
    algorithm: SerializeAsAny[AlgorithmConfig] = Field(..., description="{name: <algorithm>, …its options}")
    sampling: SamplingConfig = SamplingConfig()
    optim: OptimConfig = OptimConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    env: EnvConfig | None = Field(None, description="play episodes in an environment (the interactive case)")
    data: DataConfig | None = Field(None, description="a prompt dataset: each step's contexts are drawn from it")
    eval: EvalConfig | None = Field(None, description="evaluate on the data's held-out prompts (pass@k, reward, KL)")
    rollout: RolloutConfig = Field(RolloutConfig(), description="where episodes and rewards run: this process or Ray actors")
    distributed: DistributedConfig = Field(DistributedConfig(), description="replicated or fully sharded weights under torchrun")
    seed: int = Field(0, description="every random draw derives from this seed and the step number")

    _seed = field_validator("seed")(_seed_in_range)

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, data: Any) -> Any:
        """An env's return is the default reward; ``algorithm: name`` is short for ``{name: name}``; an
        ``algorithm.beta`` (configs before beta lived only in the target) must equal target.beta."""
        if isinstance(data, dict) and data.get("env") is not None:  # an env's return is the default reward
            target = data.get("target")
            if target is None or (isinstance(target, dict) and "reward" not in target):
                data = {**data, "target": {**(target or {}), "reward": "env"}}
        section = data.get("data") if isinstance(data, dict) else None
        if isinstance(section, dict) and section.get("reasoning_gym") is not None:  # the task's own score_answer
            target = data.get("target")
            if target is None or (isinstance(target, dict) and "reward" not in target):
                data = {**data, "target": {**(target or {}), "reward": "reasoning_gym"}}
        data = _offline_defaults(data)
        target = data.get("target") if isinstance(data, dict) else None
        if target is not None and not isinstance(target, (dict, TargetConfig)):
            raise TiltlmError(f"config 'target' must be a mapping (reward, beta, constraints), not {type(target).__name__}; fix that value")
        if isinstance(target, dict) and "beta" in target and not _positive_finite(target["beta"]):
            raise TiltlmError(f"config 'target.beta' must be a finite number > 0 (got {target['beta']!r}); "
                              "small beta follows the reward closely, large beta stays near the prior")
        if isinstance(target, dict) and "reward" in target and target["reward"] is None and "beta" in target and not _offline(data):
            raise TiltlmError("config 'target.reward' is null (no tilt, p* ∝ pi0·1[constraints]), so there is no beta; drop target.beta")
        _check_data(data)
        if isinstance(data, dict) and isinstance(data.get("algorithm"), str):
            data = {**data, "algorithm": {"name": data["algorithm"]}}
        if isinstance(data, dict) and isinstance(data.get("algorithm"), dict):
            algo = dict(data["algorithm"])
            if algo.get("name") is None:
                raise ValueError("algorithm needs a name")
            if "beta" in algo:
                _check_algorithm_beta(algo.pop("beta"), data.get("target"))
            data = {**data, "algorithm": algo}
        return data

    @model_validator(mode="after")
    def _target_fits_algorithm(self) -> "TrainConfig":
        if abs(self.seed) * 1_000_003 + self.optim.steps >= 2**63:
            raise TiltlmError(f"config 'seed' ({self.seed}) with optim.steps {self.optim.steps:,}: step t draws with "
                              "seed·1000003 + t, past a 64-bit integer; pick fewer steps or a smaller seed")
        t = self.target
        if t.reward is None and not t.constraints and not algorithm_class(self.algorithm.name).offline_pairs:
            raise TiltlmError("config 'target' has neither a reward nor a constraint (p* would be the prior itself); "
                              "set target.reward or target.constraints")
        if t.reward is None and algorithm_class(self.algorithm.name).needs_tilt:
            raise TiltlmError(f"algorithm '{self.algorithm.name}' weighs the KL by the target's beta, but target.reward is null "
                              "(no tilt); use dpg, gdc++, f-dpg or reinforce for p* ∝ pi0·1[constraints], or set target.reward")
        return self

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm(cls, value: Any) -> AlgorithmConfig:
        if isinstance(value, AlgorithmConfig):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError("algorithm must be a mapping with a name")
        value = dict(value)
        return make_config(value.pop("name"), **value)


def _offline(data: Any) -> bool:
    """Whether the config's algorithm trains offline on preference pairs (dpo, ipo, cdpo: Algorithm.offline_pairs)."""
    algo = data.get("algorithm") if isinstance(data, dict) else None
    name = algo.get("name") if isinstance(algo, dict) else algo
    try:
        return isinstance(name, str) and algorithm_class(name).offline_pairs
    except TiltlmError:  # an unknown name: the algorithm field's own error
        return False


def _offline_defaults(data: Any) -> Any:
    """An offline preference algorithm needs no reward: target.reward defaults to null (target.beta is the DPO beta)."""
    if not _offline(data):
        return data
    target = data.get("target")
    if target is None or (isinstance(target, dict) and "reward" not in target):
        data = {**data, "target": {**(target or {}), "reward": None}}
    return data


def _check_data(data: Any) -> None:
    """With ``data:`` the step's contexts are its drawn prompts: no sampling.contexts or env (``metrics.exact_every``
    then averages the exact metrics over the training prompts); ``eval:`` needs the data's held-out split."""
    if not isinstance(data, dict):
        return
    section = data.get("data")
    if section is None:
        if data.get("eval") is not None:
            raise TiltlmError("config 'eval' evaluates on held-out prompts; add a data: section with eval_size, eval_fraction or eval_path")
        return
    sampling = data.get("sampling") or {}
    contexts = sampling.get("contexts") if isinstance(sampling, dict) else None
    if contexts is not None and list(contexts) != [""]:
        raise TiltlmError("config sets both 'data' and 'sampling.contexts': with data: each step's contexts are its drawn "
                          "prompts; drop sampling.contexts (or data:)")
    if data.get("env") is not None:
        raise TiltlmError("config sets both 'data' and 'env': environment tasks are the prompts of the interactive case; drop one")
    if data.get("eval") is not None and isinstance(section, dict) and all(section.get(k) is None for k in ("eval_size", "eval_fraction", "eval_path")):
        raise TiltlmError("config 'eval' evaluates on held-out prompts; set data.eval_size, data.eval_fraction or data.eval_path")


def _check_algorithm_beta(beta: Any, target: Any) -> None:
    """There is one beta per run, the target's: the KL coefficient of kl-pg / ppo-kl is the temperature of
    the p* the metrics measure against. An algorithm.beta equal to it is accepted (and dropped)."""
    target_beta = (target or {}).get("beta", TargetConfig().beta) if not isinstance(target, TargetConfig) else target.beta
    if not (_positive_finite(beta) and _positive_finite(target_beta) and float(beta) == float(target_beta)):
        raise TiltlmError(f"config 'algorithm.beta' ({beta!r}) differs from target.beta ({target_beta!r}): the KL coefficient is "
                          "the target's beta (one p* for training and metrics); set target.beta and drop algorithm.beta")


def _positive_finite(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and 0 < float(value) < math.inf
    except (TypeError, ValueError):
        return False


def _explain(e: ValidationError, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        owner: Any = model
        for part in loc[:-1]:
            field = owner.model_fields.get(part) if hasattr(owner, "model_fields") else None
            owner = getattr(field, "annotation", None) if field else None
            owner = next((a for a in getattr(owner, "__args__", ()) if hasattr(a, "model_fields")), owner)  # X | None -> X
        known = list(getattr(owner, "model_fields", {}) or [])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown config key '{where}'; {hint}known keys here: {', '.join(known)}"
    message = err["msg"].removeprefix("Value error, ")
    return f"config '{where}': {message}; fix that value" if loc else f"config: {message}; fix that value"


def parse_config(data: dict) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise TiltlmError(_explain(e, TrainConfig)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML file into a validated TrainConfig (one-line errors)."""
    data = read_config_mapping(path, "training")
    return parse_config({**data, **(overrides or {})})


def read_config_mapping(path: str | Path, kind: str) -> dict:
    """A YAML config file's top-level mapping, or one line: a missing file, bad YAML, not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise TiltlmError(f"config file '{path}' not found; pass the path of a YAML {kind} config")
    data = load_yaml(path, f"config '{path}'") or {}
    if not isinstance(data, dict):
        raise TiltlmError(f"config '{path}' must be a YAML mapping (key: value), not {type(data).__name__}")
    return data
