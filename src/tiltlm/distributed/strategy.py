"""How one training step is laid over the processes: the object the Trainer is handed instead of calling
torch.distributed itself.

    Single      one process (the default, and what every other strategy must equal);
    Replicate   data parallel, every rank holds the whole model (tiltlm.distributed.dist);
    Fsdp        data parallel with the weights, gradients and Adam moments sharded (tiltlm.distributed.fsdp).

What a strategy answers, in the order a step asks (the Trainer reads top to bottom with these names):
``rows(n)`` which rows of the n-row batch this rank draws; ``gather(batch)`` the global Batch on every rank;
``token_logp(policy, batch)`` log pi with grad on this rank's rows; ``reduce_grads`` the full-batch
gradient; ``all_finite`` / ``full`` one verdict or value on every rank; ``full_state`` / ``load_state`` /
``whole_policy`` checkpoints and policy/ in the one-process format. ``writes`` says whether this rank writes
files; ``joins_io`` whether it must take part in checkpointing and exact metrics (sharded: every rank).
"""

from __future__ import annotations

import torch

from tiltlm.distributed import fsdp
from tiltlm.distributed.dist import (
    Lockstep,
    World,
    all_gather_objects,
    all_reduce_grads_,
    current_world,
    gather_rows,
    place_on_rank_device,
)
from tiltlm.records import Batch, concat


class Single:
    """One process: every method is the identity of the distributed case."""

    sharded = False

    def __init__(self, world: World | None = None):
        self.world = world or World()

    @property
    def writes(self) -> bool:
        """This process writes config, metrics, checkpoints and policy/ (rank 0)."""
        return self.world.is_main

    @property
    def joins_io(self) -> bool:
        """This process takes part in saving checkpoints and computing exact metrics."""
        return self.world.is_main

    def prepare(self, config, policy, prior) -> None:
        """Lay the policy's and the prior's weights out for this strategy (before the optimiser sees them): one
        process moves CPU models to cuda:LOCAL_RANK when CUDA is available (not checked on a GPU); a model the
        caller placed on a device stays there."""
        on_cpu = [p for p in (policy, prior) if isinstance(getattr(p, "model", None), torch.nn.Module)
                  and next(p.model.parameters()).device.type == "cpu"]
        if torch.cuda.is_available() and on_cpu:
            place_on_rank_device(*on_cpu)

    def rows(self, n: int) -> range | None:
        """This rank's contiguous rows of an n-row batch (None: all of them)."""
        return None

    def gather(self, batch: Batch, pad_id: int) -> Batch:
        """The global batch, rows of rank 0 then rank 1 …, on every rank."""
        return batch

    def token_logp(self, policy, batch: Batch) -> torch.Tensor:
        """log pi_theta per token, (B, T), with grad (data parallel: on this rank's rows only)."""
        return policy.log_prob(batch.samples, grad=True, per_token=True)

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Turn each rank's gradient into the full-batch gradient, in place."""

    def all_finite(self, tensors) -> bool:
        """Every tensor finite (sharded: on every rank's shard, so all ranks stop together)."""
        local = [fsdp.local(t) for t in tensors]
        local = [t for t in local if t.numel()]
        if not local:
            return True
        by_device: dict = {}
        for t in local:  # one max-|x| per tensor (NaN stays NaN), a few kernels instead of one isfinite per tensor
            by_device.setdefault((t.device, t.dtype), []).append(t)
        return all(bool(torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all()) for ts in by_device.values())

    def everyone(self, flag: bool) -> bool:
        return flag

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The whole value of a (possibly sharded) tensor."""
        return t

    def full_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(trainable weights, optimiser state) in the one-process format ({} on ranks that do not write)."""
        from tiltlm.train.checkpoint import trainable_state

        return trainable_state(module), optimizer.state_dict()

    def load_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
        module.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optim_state)

    def whole_policy(self, policy):
        """The policy with its whole weights, to save (None on ranks that do not write)."""
        return policy


class Replicate(Single):
    """Data parallel with a whole copy of the weights on every rank (tiltlm.distributed.dist's recipe)."""

    def prepare(self, config, policy, prior) -> None:
        place_on_rank_device(policy, prior)

    def rows(self, n: int) -> range | None:
        return self.world.shard(n)

    def gather(self, batch: Batch, pad_id: int) -> Batch:
        return concat(all_gather_objects(batch, self.world), pad_id)

    def token_logp(self, policy, batch: Batch) -> torch.Tensor:
        # this rank's rows carry the graph, the others' are their detached values: the loss is the global one and
        # backward reaches only this rank's share of the gradient (summed over ranks by reduce_grads)
        local = policy.log_prob(batch.samples.select(list(self.rows(len(batch)))), grad=True, per_token=True)
        return gather_rows(local, self.world)

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        all_reduce_grads_(params, self.world)


class Fsdp(Replicate):
    """Data parallel with sharded weights (torch FSDP2): forwards are collectives, so the policies decode in
    lockstep, and checkpoints / exact metrics are computed by every rank together."""

    sharded = True

    def __init__(self, world: World, distributed_config):
        super().__init__(world)
        self.options = distributed_config

    @property
    def joins_io(self) -> bool:
        return True

    def prepare(self, config, policy, prior) -> None:
        super().prepare(config, policy, prior)
        fsdp.check_supported(config, policy)
        o = self.options
        fsdp.shard_policies(policy, prior, self.world, units=o.fsdp_units, reshard_after_forward=o.reshard_after_forward)
        lockstep = Lockstep(self.world)
        for p in (policy, prior):
            p.decode_in_lockstep(lockstep)

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Nothing: FSDP's backward already reduce-scattered the sum."""

    def all_finite(self, tensors) -> bool:
        return self.everyone(super().all_finite(tensors))

    def everyone(self, flag: bool) -> bool:
        return Lockstep(self.world).all(flag)

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return fsdp.full(t)

    def full_state(self, module, optimizer) -> tuple[dict, dict]:
        return fsdp.trainable_state(module, self.world), fsdp.optimizer_state(module, optimizer, self.world)

    def load_state(self, module, optimizer, weights, optim_state) -> None:
        fsdp.load_state(module, optimizer, weights, optim_state)

    def whole_policy(self, policy):
        return fsdp.unsharded_policy(policy, self.world)


def make_strategy(distributed_config, world: World | None = None) -> Single:
    """The strategy of a run: one process, or the group torchrun / accelerate launch started (``world``
    defaults to the initialised process group) with the config's ``distributed.strategy``."""
    world = world or current_world()
    if world.size == 1:
        return Single(world)
    if distributed_config.strategy == "fsdp":
        return Fsdp(world, distributed_config)
    return Replicate(world)
