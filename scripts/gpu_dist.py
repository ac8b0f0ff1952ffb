"""The GPU check's dist part, under ``torchrun --nproc_per_node 1`` (scripts/gpu_check.py starts it so).

A process group with the nccl backend for CUDA tensors (cpu:gloo,cuda:nccl, as tiltlm.distributed.dist.init_from_env
makes it for W > 1), an nccl all_reduce, then --dist-steps kl-pg steps with the Replicate and the Fsdp strategy (FSDP2
gathers and reduce-scatters over nccl even with one rank) against the same steps in one process on the GPU: max |weight
difference| and the losses. With W = 1 ``make_strategy`` gives the one-process strategy, so this part builds Replicate /
Fsdp itself. ``--device cpu``: the same path on gloo (how the tests run it without a GPU).
"""

from __future__ import annotations

import os

from gpu_parts import placed, timed, validated


def _steps(trainer, steps: int) -> tuple[list[dict], list[float]]:
    rows, seconds = [], []
    while trainer.step < steps:
        out: dict = {}
        seconds.append(timed(lambda: out.update(trainer.train_step())))
        rows.append(out)
    return rows, seconds


def _group(device_arg: str):
    """Initialise the process group; (device, facts about it)."""
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    cuda = device_arg.startswith("cuda")
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")  # what init_from_env does for W > 1
    t = torch.full((4,), 2.0, device=device)
    dist.all_reduce(t)
    nccl = torch.cuda.nccl.version() if cuda else None
    return device, {"world_size": dist.get_world_size(), "backend": str(dist.get_backend()), "device": device,
                    "nccl_version": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                    "all_reduce_ok": bool(torch.equal(t.cpu(), torch.full((4,), 2.0 * dist.get_world_size())))}


def part_dist(args) -> dict:
    import torch
    import torch.distributed as dist

    from tiltlm.distributed.dist import World
    from tiltlm.distributed.strategy import Fsdp, Replicate, Single
    from tiltlm.train.build import build
    from tiltlm.train.loop import Trainer

    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("gpu_check: the dist part runs under torchrun (python -m torch.distributed.run --nproc_per_node 1 ...)")
    device, out = _group(args.device)
    world = World(dist.get_rank(), dist.get_world_size())
    cfgs = validated(args)
    weights, runs = {}, {}
    for name in ("single", "replicate", "fsdp"):
        config = cfgs["dist-fsdp" if name == "fsdp" else "dist-replicate"]
        if name == "single":
            policy, target = placed(config, device)
            strategy = Single(world)
        else:
            policy, target = build(config)  # the strategy places them on cuda:LOCAL_RANK (and shards them)
            strategy = Replicate(world) if name == "replicate" else Fsdp(world, config.distributed)
        trainer = Trainer(config, policy=policy, target=target, strategy=strategy)
        try:
            if name == "single":  # where training started: how far it moved the weights (the scale of a difference)
                start, _ = strategy.full_state(trainer.module, trainer.optimizer)
                start = {k: v.detach().float().cpu().clone() for k, v in start.items()}
            rows, seconds = _steps(trainer, config.optim.steps)
            state, _ = strategy.full_state(trainer.module, trainer.optimizer)
            weights[name] = {k: v.detach().float().cpu() for k, v in state.items()}
            runs[name] = {"device": str(next(trainer.module.parameters()).device), "losses": [r.get("loss") for r in rows],
                          "step_s": seconds, "strategy": type(strategy).__name__}
        finally:
            trainer.close()
        del trainer, policy, target
        if device != "cpu":
            torch.cuda.empty_cache()
    for name in ("replicate", "fsdp"):
        common = set(weights[name]) & set(weights["single"])
        runs[name]["max_abs_weight_diff_vs_single"] = max((float((weights[name][k] - weights["single"][k]).abs().max())
                                                           for k in common), default=None)
        runs[name]["same_tensors"] = set(weights[name]) == set(weights["single"])
        moved = max((float((weights["single"][k] - start[k]).abs().max()) for k in common if k in start), default=None)
        runs[name]["max_abs_weight_change_single"] = moved
        runs[name]["weight_diff_vs_change"] = (runs[name]["max_abs_weight_diff_vs_single"] / moved) if moved else None
    dist.destroy_process_group()
    return {**out, "runs": runs}
