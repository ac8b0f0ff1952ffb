"""What stops a step before it can do harm, each in one line that names the fix: running out of memory,
a non-finite loss or gradient (and why: the policy, the rewards' scale or the loss), non-finite weights."""

from __future__ import annotations

import math

import torch

from tiltlm.distributed.fsdp import local
from tiltlm.errors import TiltlmError
from tiltlm.records import Batch

RESUME = "nothing of this step was saved (after the fix, --resume continues from the last checkpoint)"


def out_of_memory(e: BaseException) -> bool:
    message = str(e).lower()  # CUDA: "CUDA out of memory"; CPU: "DefaultCPUAllocator: can't allocate memory"
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in message or "can't allocate memory" in message


def out_of_memory_error(config, step: int) -> TiltlmError:
    s = config.sampling
    return TiltlmError(
        f"out of memory at step {step + 1} with {len(s.contexts) * s.n_per_context} samples of up to {s.max_new_tokens} tokens; "
        "lower sampling.n_per_context or sampling.max_new_tokens (or use a smaller model / LoRA)"
    )


def nonfinite_cause(batch: Batch, logp: torch.Tensor) -> str:
    """Why a loss (or gradient) is not finite: the policy's log-probs, the rewards' scale, or the loss itself."""
    if not bool(torch.isfinite(logp.detach()).all()):
        return "log pi(x) of the policy is non-finite (its weights diverged); lower optim.lr or set optim.grad_clip"
    beta = batch.beta if batch.beta is not None else math.inf
    r_max = float(batch.reward.abs().max()) if len(batch) else 0.0
    lt = batch.log_target
    if bool((torch.isnan(lt) | (lt == math.inf)).any()) or not math.isfinite(float(batch.reward.sum())):
        return f"the rewards (|r| up to {r_max:.3g}) overflow r/beta (beta {beta:g}); rescale the reward or raise beta"
    return f"the loss overflowed with rewards up to |r| = {r_max:.3g} and beta {beta:g}; lower optim.lr, rescale the reward or raise beta"


def check_loss(loss: torch.Tensor, batch: Batch, logp: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise TiltlmError(f"the loss became {float(loss.detach())} at step {step + 1}: {nonfinite_cause(batch, logp)}; {RESUME}")


def check_gradients(params: list, strategy, loss: torch.Tensor, batch: Batch, logp: torch.Tensor, step: int) -> None:
    if not strategy.all_finite(p.grad for p in params if p.grad is not None):
        raise TiltlmError(f"the gradient became non-finite at step {step + 1} (loss {float(loss.detach()):.4g}): "
                          f"{nonfinite_cause(batch, logp)}; {RESUME}")


def check_weights(module: torch.nn.Module, strategy, step: int) -> None:
    """Stop (before any checkpoint could store them) when an optimiser step made a weight inf or NaN
    (sharded weights: every rank stops when any rank's shard is bad)."""
    bad = next((n for n, p in module.named_parameters() if p.requires_grad and not bool(torch.isfinite(local(p)).all())), None)
    if not strategy.everyone(bad is None):
        bad = bad or "a parameter shard of another rank"
    if bad is not None:
        raise TiltlmError(f"the policy's weights became non-finite at step {step} ({bad}); the last good checkpoint is kept; "
                          "lower optim.lr or set optim.grad_clip, then --resume")
