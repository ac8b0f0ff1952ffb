"""The optimiser updates of one sampled batch: which rows each update takes (``optim.minibatch_size``), the (B, T)
log pi of the whole batch that each update's loss reads, and one guarded update (``descend``).

The rows outside an update's minibatch keep their log pi at the step's start (no gradient), the rows inside are
at the current weights with their gradient scaled by B / len(rows), so each update's gradient estimates the
whole batch's (tests/test_minibatches.py).
"""

from __future__ import annotations

import dataclasses

import torch

from tiltlm.records import Batch
from tiltlm.train import guards


def minibatches(group: torch.Tensor, size: int | None) -> list[torch.Tensor | None]:
    """The rows of each optimiser update of one batch: ``[None]`` (the whole batch, one update) when ``size`` is
    None or the batch has at most ``size`` rows; else consecutive minibatches of at most ``size`` rows, a context's
    group kept whole when it fits and otherwise cut into near-equal parts (64 samples of one context, size 16:
    4 minibatches of 16)."""
    n = len(group)
    if size is None or n <= size:
        return [None]
    pieces = []
    for g in dict.fromkeys(group.tolist()):  # contexts in order of first appearance
        rows = (group == g).nonzero().flatten()
        pieces.extend(rows.tensor_split(-(-len(rows) // size)))
    out: list[list[torch.Tensor]] = [[]]
    for piece in pieces:
        if out[-1] and sum(map(len, out[-1])) + len(piece) > size:
            out.append([])
        out[-1].append(piece)
    return [torch.cat(parts) for parts in out]


def start_of_step(strategy, policy, batch: Batch, parts: list) -> tuple[Batch, torch.Tensor | None]:
    """With several minibatches: every row's (B, T) log pi at the step's start (the other rows' values in each
    minibatch's loss), and the batch with ``logp_start`` set; with one: the batch as it is and None."""
    if len(parts) <= 1:
        return batch, None
    with torch.no_grad():
        before = strategy.token_logp(policy, batch).detach()
    return dataclasses.replace(batch, logp_start=before.sum(-1).double()), before


def token_logp(strategy, policy, batch: Batch, rows: torch.Tensor | None, before: torch.Tensor | None) -> torch.Tensor:
    """(B, T) log pi of the whole batch for the loss: all rows with grad (one minibatch), or ``rows`` at the
    current weights with their gradient scaled by B/len(rows) and the other rows at the step's start."""
    if rows is None:
        return strategy.token_logp(policy, batch)
    part = strategy.token_logp(policy, batch.select(rows))
    scale = len(batch) / len(rows)  # the minibatch's gradient estimates the whole batch's
    part = part * scale - part.detach() * (scale - 1)  # value unchanged, gradient x scale
    return before.to(part.dtype).index_put((rows.to(part.device),), part)


def descend(optimizer, strategy, grad_clip: float | None, loss: torch.Tensor, batch: Batch, logp: torch.Tensor, step: int) -> dict:
    """Backward, the full-batch gradient, clipping and the optimiser step, each guarded (tiltlm.train.guards)."""
    guards.check_loss(loss, batch, logp, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = optimizer.param_groups[0]["params"]
    strategy.reduce_grads(params)  # data parallel: the sum of the ranks' rows = the full-batch gradient
    guards.check_gradients(params, strategy, loss, batch, logp, step)
    stats = {}
    if grad_clip is not None:
        stats["grad/norm"] = float(strategy.full(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward (full fine-tuning: a model's size)
    return stats
