"""Data parallelism over torch.distributed: the process group torchrun / ``accelerate launch`` describe.

How one step is split over W ranks (the Trainer asks tiltlm.distributed.strategy; nothing here knows an algorithm):

1. Every rank defines the same global batch (contexts, n per context, the step's seed) and draws only
   its contiguous shard of rows ``World.shard(B)``; each row is drawn exactly as in the whole batch
   (``Policy.sample(..., rows=)``, ``rollout(..., episodes=)``), so a run's samples do not depend on W.
2. Each rank scores its rows (rewards, log pi0, log P): the expensive model calls are split W ways.
3. ``Replicate.gather`` all-gathers the rows' records (tiltlm.records.concat), so every rank holds the identical global Batch:
   leave-one-out baselines, the running log Z, normalisations and metrics are computed on global
   values with no algorithm-specific communication.
4. Each rank computes log pi_theta with grad for its rows only and gathers the others' values
   (detached); the loss is the global loss, so its gradient on this rank is the sum over this rank's
   rows of dL/dlog pi_i · grad log pi_i. ``all_reduce_grads_`` sums those: the full-batch gradient.
   Clipping and the optimiser step then run on identical gradients, so the replicas stay identical.

Only the main rank (0) writes config, metrics, checkpoints and the final policy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tiltlm.errors import TiltlmError


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel processes (rank 0, size 1 without a group)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous rows of an n-row batch (sizes differ by at most one)."""
        if n < self.size:
            raise TiltlmError(f"a batch of {n} rows cannot be split over {self.size} processes; "
                              "raise sampling.n_per_context (or the number of contexts / tasks) or use fewer processes")
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)


def current_world() -> World:
    """The World of the initialised default process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env() -> World:
    """Join the process group that torchrun / accelerate launch describe (WORLD_SIZE, RANK, MASTER_ADDR…).

    A no-op for one process. Backend: nccl when CUDA is available (each rank on cuda:LOCAL_RANK),
    gloo on CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # CPU tensors (tabular policies, the pickled batch records) go through gloo, CUDA gradients through nccl
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return current_world()


def rank_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if torch.cuda.is_available() else torch.device("cpu")


def place_on_rank_device(*policies) -> None:
    """Move each HF policy's model to this rank's device (tabular policies stay on the CPU)."""
    device = rank_device()
    for policy in policies:
        model = getattr(policy, "model", None)
        if isinstance(model, torch.nn.Module):
            model.to(device)


def all_gather_objects(obj, world: World) -> list:
    """[obj of rank 0, …, obj of rank W-1] on every rank (pickled; keep tensors on the CPU)."""
    if world.size == 1:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_grads_(params: list[torch.Tensor], world: World) -> None:
    """Sum every parameter's gradient over the ranks, in place (one flat buffer, one collective).

    A parameter without a gradient on some rank counts as zero there, so every rank joins the same call.
    """
    if world.size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_scalar(value: int, op: str, world: World) -> int:
    """``value`` reduced over the ranks, ``op`` "min" or "max" (one collective on this rank's device)."""
    if world.size == 1:
        return value
    t = torch.tensor([int(value)], device=rank_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(t.item())


class Lockstep:
    """What ranks that run every forward pass together (sharded weights) must agree on, handed to the
    policies (``HFPolicy.decode_in_lockstep``) so that they never call torch.distributed themselves:
    ``all(flag)`` — does the flag hold on every rank (decode until every rank's rows are done) — and
    ``max(n)`` — the largest n of any rank (as many chunks of rows as the rank with the most rows)."""

    def __init__(self, world: World):
        self.world = world

    def all(self, flag: bool) -> bool:
        return bool(all_reduce_scalar(int(flag), "min", self.world))

    def max(self, n: int) -> int:
        return all_reduce_scalar(int(n), "max", self.world)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def leave_group(world: World) -> None:
    """Wait for every rank, then tear the process group down. Call it when a run has finished: a process
    that exits with the group still up can abort in the communication library's teardown
    ("terminate called without an active exception"), and torchrun then reports the run as failed."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_rows(local: torch.Tensor, world: World) -> torch.Tensor:
    """All ranks' rows of a (b_r, …) tensor, in rank order, with this rank's own rows kept as they are
    (with their autograd graph) and the others' as detached copies on the same device."""
    if world.size == 1:
        return local
    parts = all_gather_objects(local.detach().cpu(), world)
    return torch.cat([local if r == world.rank else p.to(local.device, local.dtype) for r, p in enumerate(parts)])
