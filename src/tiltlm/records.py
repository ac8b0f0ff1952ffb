"""The two records one training step passes along, each field listed once (docs/architecture.md).

``Samples``: what a policy (or an environment rollout) drew. ``Batch``: those samples scored by the target
— everything an algorithm's loss and the metrics read. Both are tables of B rows; ``select`` (a subset of
rows, e.g. a data-parallel shard or an importance resample) and ``concat`` (rows of several parts, e.g.
the ranks' shards) are generic over the fields, so a new field is one line here and nothing elsewhere.

How a field behaves under those operations is declared where it is defined:
  ``shared()``      the same for every row (kept from the first part);
  ``rows()``        one entry per row along dim 0 (tensors, or Python lists);
  ``tokens(pad)``   a (B, T) tensor of generated positions: parts of different widths are right-padded
                    with ``pad`` ("pad_id": the padding token of the policy that drew them).

The sample space (used everywhere: sampling, scoring, exact enumeration): a sequence x is the list of
tokens generated after a context, ended either by EOS — the EOS token is part of x and its probability is
a factor of pi(x) — or by reaching ``max_new_tokens``, in which case there is no EOS factor. With this
definition sum_x pi(x | context) = 1 exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from tiltlm.errors import TiltlmError

R = TypeVar("R")


def shared(default: Any = dataclasses.MISSING):
    return field(default=default, metadata={"kind": "shared"})


def rows(default: Any = dataclasses.MISSING):
    return field(default=default, metadata={"kind": "rows"})


def tokens(pad: Any, default: Any = dataclasses.MISSING):
    return field(default=default, metadata={"kind": "tokens", "pad": pad})


@dataclass
class Samples:
    """A batch of B sequences, each generated after one of the batch's contexts.

    The generated part is right-padded; environment tokens (interactive case) live in ``ids`` with
    ``attn`` True and ``mask`` False, so they condition the policy but are never scored or trained.
    """

    contexts: list[str] = shared()  # the distinct contexts of the batch
    group: torch.Tensor = rows()  # (B,) long, index into ``contexts``
    context_ids: torch.Tensor = rows()  # (B, C) long, left-padded context tokens (C may be 0 for tabular)
    context_attn: torch.Tensor = rows()  # (B, C) bool, False on left padding
    ids: torch.Tensor = tokens("pad_id")  # (B, T) long, generated tokens, right-padded
    attn: torch.Tensor = tokens(False)  # (B, T) bool, True on real (policy or environment) tokens
    mask: torch.Tensor = tokens(False)  # (B, T) bool, True on policy tokens (EOS included): what log pi sums over
    token_logp: torch.Tensor = tokens(0.0)  # (B, T) log-prob of each token under the sampling policy, 0 off ``mask``
    texts: list[str] = rows()  # (B,) decoded generated text, EOS and padding removed
    eos: torch.Tensor | None = rows(None)  # (B,) bool, True where the sequence ended with EOS
    # the interactive case (tiltlm.envs): the turn of each token (-1 on padding) and each episode's record
    turn: torch.Tensor | None = tokens(-1, None)  # (B, T) long
    trajectories: list | None = rows(None)  # (B,) tiltlm.envs.Trajectory
    # a prompt dataset's other columns (tiltlm.data): name -> one value per entry of ``contexts``; rewards get them per row
    columns: dict[str, list] | None = shared(None)

    @property
    def env_return(self) -> torch.Tensor:
        """R(tau) = the sum of the environment's rewards of each trajectory, (B,) float64."""
        if self.trajectories is None:
            raise TiltlmError("reward 'env' reads environment returns, but these samples are not environment rollouts; add an env: section")
        return torch.tensor([t.total_reward for t in self.trajectories], dtype=torch.float64)

    @property
    def logp(self) -> torch.Tensor:
        """log pi(x | context) under the sampling policy, (B,)."""
        return self.token_logp.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of policy tokens per sequence (EOS counted), (B,)."""
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def context_of(self, i: int) -> str:
        return self.contexts[int(self.group[i])]

    def select(self, index: torch.Tensor | list[int]) -> "Samples":
        """The rows ``index`` (e.g. an importance resample), same contexts."""
        return select(self, index)


@dataclass
class Batch:
    """One step's data: the samples and every per-sequence quantity the losses need, (B,) each.

    ``logq`` is the log-prob under the distribution that drew the samples (the policy before this step
    when on-policy, a frozen proposal when off-policy); importance weights are P/q. ``beta`` is the
    temperature of the target's tilt (p* ∝ pi0·exp(r/beta)) that scored the batch: the one KL coefficient
    of the KL-regularised algorithms (None when the target has no tilt).
    """

    samples: Samples = rows()
    logq: torch.Tensor = rows()  # (B,) float64, log q(x) of the sampler
    token_logq: torch.Tensor = tokens(0.0)  # (B, T) float32, per-token log q (PPO ratios)
    logp_prior: torch.Tensor = rows()  # (B,) float64, log pi0(x)
    log_target: torch.Tensor = rows()  # (B,) float64, unnormalised log P(x)
    reward: torch.Tensor = rows()  # (B,) float64, r(x) of the target's tilt (0 without one)
    token_logp_prior: torch.Tensor | None = tokens(0.0, None)  # (B, T) log pi0 per token; environment rollouts (per-turn KL)
    beta: float | None = shared(None)  # the target's tilt temperature (Target.beta)
    logp_start: torch.Tensor | None = rows(None)  # (B,) float64, log pi at the step's start when a step makes several
    # updates (optim.minibatch_size): the score-function losses weight a later minibatch by pi/pi_start (stale_weight)
    pairs: int | None = shared(None)  # K: the rows are K preference pairs of data, rows [chosen_1..K, rejected_1..K], not draws

    @property
    def group(self) -> torch.Tensor:
        return self.samples.group

    def stale_weight(self, logp: torch.Tensor) -> torch.Tensor | None:
        """pi_theta(x)/pi_start(x) per row, float64 (detached), for a minibatch drawn before the current weights:
        the importance weight that keeps an on-policy score-function gradient unbiased; None within one update."""
        if self.logp_start is None:
            return None
        return torch.exp(logp.detach().double() - self.logp_start)

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, index: torch.Tensor | list[int]) -> "Batch":
        return select(self, index)


def select(record: R, index: torch.Tensor | list[int]) -> R:
    """The rows ``index`` of a Samples or Batch (fields kept in their order, shared fields as they are)."""
    index = torch.as_tensor(index, dtype=torch.long)
    positions = index.tolist()
    values = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if value is None or f.metadata["kind"] == "shared":
            values[f.name] = value
        elif isinstance(value, torch.Tensor):
            values[f.name] = value[index]
        elif isinstance(value, list):
            values[f.name] = [value[i] for i in positions]
        else:  # a nested record
            values[f.name] = select(value, index)
    return type(record)(**values)


def concat(parts: list[R], pad_id: int) -> R:
    """The rows of ``parts`` in order as one record of the first part's type; token fields right-padded to
    the widest part with their declared pad (``pad_id`` for token ids), so the result is the record one
    process would have built for all the rows."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    values = {}
    for f in dataclasses.fields(first):
        column = [getattr(p, f.name) for p in parts]
        kind = f.metadata["kind"]
        if column[0] is None or kind == "shared":
            values[f.name] = column[0]
        elif kind == "tokens":
            pad = pad_id if f.metadata["pad"] == "pad_id" else f.metadata["pad"]
            width = max(t.shape[1] for t in column)
            values[f.name] = torch.cat([_pad_right(t, width, pad) for t in column])
        elif isinstance(column[0], torch.Tensor):
            if column[0].dim() > 1 and len({t.shape[1] for t in column}) != 1:
                raise TiltlmError(f"the parts of a batch have '{f.name}' of different widths; every data-parallel rank must "
                                  "sample the same contexts")
            values[f.name] = torch.cat(column)
        elif isinstance(column[0], list):
            values[f.name] = [x for part in column for x in part]
        else:  # a nested record
            values[f.name] = concat(column, pad_id)
    return type(first)(**values)


def _pad_right(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)], dim=1)
