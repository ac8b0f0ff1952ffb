"""The Algorithm base class and the registry (the Batch every loss reads is in tiltlm.records).

An algorithm is a small loss over the tensors of a ``Batch`` plus whatever state it must carry
across steps (an adaptive KL coefficient, a running log Z, an off-policy proposal). The training
loop (tiltlm.train.loop) is the only place that samples, scores, steps and logs.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from tiltlm.errors import TiltlmError
from tiltlm.records import Batch
from tiltlm.registry import Registry


def leave_one_out(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Baseline b_i = mean of the other samples of i's context (RLOO); the batch's others when alone."""
    values = values.double()
    sums = torch.zeros(int(group.max()) + 1, dtype=values.dtype).index_add_(0, group, values)
    counts = torch.zeros_like(sums).index_add_(0, group, torch.ones_like(values))
    k = counts[group]
    in_group = (sums[group] - values) / (k - 1).clamp(min=1)
    n = values.shape[0]
    global_loo = (values.sum() - values) / max(n - 1, 1)
    return torch.where(k > 1, in_group, global_loo)


def kl_coefficient(batch: Batch, algorithm: str) -> float:
    """The KL coefficient of a KL-regularised algorithm: the beta of the target that scored the batch (one
    beta per run, so training and the metrics aim at the same p* ∝ pi0·exp(r/beta))."""
    if batch.beta is None:
        raise TiltlmError(f"algorithm '{algorithm}' weighs the KL by the target's beta, but the target has no Tilt; "
                          "multiply the target by Tilt(reward, beta) (config: set target.reward), or for a constraint-only "
                          "target use dpg, gdc++, f-dpg or reinforce")
    return batch.beta


def safe_exp(x: torch.Tensor, cap: float = 80.0) -> torch.Tensor:
    """exp(x) with x clipped at ``cap`` so importance weights stay finite (documented bias past e^80)."""
    return torch.exp(x.clamp(max=cap))


class AlgorithmConfig(BaseModel):
    """Base of every algorithm's typed, frozen config; unknown keys are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str


class Algorithm:
    """Subclasses set ``name``, ``Config`` and implement ``loss``; optional ``epochs``/``after_step``."""

    name: ClassVar[str]
    Config: ClassVar[type[AlgorithmConfig]]
    on_policy: bool = True  # False: samples come from ``self.proposal`` (off-policy DPG)
    needs_tilt: ClassVar[bool] = False  # True: the KL coefficient is the target's beta (kl_coefficient)
    needs_token_prior: ClassVar[bool] = False  # True: batches carry log pi0 per token (Batch.token_logp_prior)
    offline_pairs: ClassVar[bool] = False  # True: batches are preference pairs of data:, nothing sampled (tiltlm.train.pairs)

    def __init__(self, config: AlgorithmConfig):
        self.config = config
        self.proposal = None

    @property
    def epochs(self) -> int:
        return 1

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss whose gradient is the method's gradient estimate, and stats to log.

        logp: (B,) log pi_theta(x) with grad; token_logp: (B, T) the same per token.
        """
        raise NotImplementedError

    def observe(self, batch: Batch) -> None:
        """Called once per fresh batch before the loss (e.g. to update a running log Z)."""

    def after_step(self, batch: Batch, policy, logp: torch.Tensor) -> dict[str, float]:
        """Called after the optimiser step(s) with the step's detached log pi (e.g. adapt a coefficient)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state carried across steps (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_REGISTRY: Registry[type[Algorithm]] = Registry("algorithm")


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    return _REGISTRY.register(cls.name, cls)


def available_algorithms() -> list[str]:
    return _REGISTRY.names()


def algorithm_class(name: str) -> type[Algorithm]:
    return _REGISTRY.get(name)


def make_config(name: str, **options) -> AlgorithmConfig:
    cls = algorithm_class(name)
    try:
        return cls.Config(name=name, **options)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or name
        known = [f for f in cls.Config.model_fields if f != "name"]
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(where, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise TiltlmError(f"algorithm '{name}' has no option '{where}'; {hint}its options: {', '.join(known)}") from None
        raise TiltlmError(f"algorithm '{name}' option '{where}': {err['msg']}; its options: {', '.join(known)}") from None


def get_algorithm(name_or_config: str | AlgorithmConfig, **options) -> Algorithm:
    """Build an algorithm by name (``get_algorithm("kl-pg", estimator="k1")``) or from its config."""
    config = name_or_config if isinstance(name_or_config, AlgorithmConfig) else make_config(name_or_config, **options)
    return algorithm_class(config.name)(config)
