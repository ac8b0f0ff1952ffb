"""Scale-out goal: what FSDP saves per rank, and what it costs in step time, vs replicated weights.

    python benchmarks/sharding.py [--ranks 2] [--batch 16] [--length 16] [--quick]

For each strategy (``replicate``; ``fsdp``; ``fsdp-keep`` = fsdp with ``reshard_after_forward: false``,
which keeps a unit's gathered weights from its forward until the backward, so a no-grad decode loop
gathers each unit once instead of once per token) a fresh ``torchrun --standalone --nproc_per_node RANKS``
group (gloo on the CPU, nccl on GPUs) builds the default model for full fine-tuning with kl-pg and
takes 3 steps of B sequences of up to T tokens. Every rank reports the bytes it holds of the policy's
and the prior's weights, of the gradients and of the Adam moments (its shards under FSDP), its peak
RSS, and the time of the last step; the table shows the largest rank. ``state_mb`` (weights +
gradients + Adam) is what sharding divides by RANKS; activations and the just-in-time all-gathers are
not sharded, and on a CPU the all-gathers make FSDP slower: its point is a model that does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, emit, peak_rss_mb, quiet_transformers, set_threads

MB = 1024 * 1024


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _child(strategy: str, batch: int, length: int, threads: int) -> None:
    """One rank of the group: build, step, report this rank's figures (rank 0 prints every rank's)."""
    quiet_transformers()
    set_threads(threads)
    import torch

    from tiltlm.distributed.dist import all_gather_objects, init_from_env, leave_group, place_on_rank_device
    from tiltlm.train.build import build
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    world = init_from_env()
    config = parse_config({"prior": "default", "target": {"reward": "count:e", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
                           "sampling": {"n_per_context": batch, "max_new_tokens": length}, "optim": {"steps": 10, "lr": 1e-4},
                           "metrics": {"diversity": False},
                           "distributed": {"strategy": strategy.split("-")[0], "reshard_after_forward": not strategy.endswith("-keep")}})
    policy, target = build(config)
    place_on_rank_device(policy, target.prior)
    trainer = Trainer(config, policy=policy, target=target)
    seconds = 0.0
    for _ in range(3):
        start = time.perf_counter()
        trainer.train_step()
        seconds = time.perf_counter() - start  # the last step: caches and allocator warm
    params = list(policy.model.parameters()) + list(target.prior.model.parameters())
    moments = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    mine = {"weights_mb": _local_bytes(params) / MB,
            # the gradients live from backward to the optimiser step (freed after it): one per trained weight, sharded alike
            "grads_mb": _local_bytes(p for p in policy.model.parameters() if p.requires_grad) / MB,
            "adam_mb": _local_bytes(moments) / MB, "peak_rss_mb": peak_rss_mb(), "step_s": seconds}
    everyone = all_gather_objects(mine, world)
    if world.is_main:
        print(json.dumps(everyone), flush=True)
    leave_group(world)
    # skip the interpreter's teardown: in the test suite this child's rank 0 aborted there about 1 run in 4
    # ("terminate called without an active exception", after its figures were printed and the group was
    # left); never seen in ~80 `tiltlm train` launches under torchrun, cause not found
    os._exit(0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--ranks", type=int, default=2, help="processes in the group")
    parser.add_argument("--batch", type=int, default=None, help="B: sequences per step, over all ranks (16)")
    parser.add_argument("--length", type=int, default=None, help="T: max new tokens (16)")
    parser.add_argument("--child", nargs=3, metavar=("STRATEGY", "B", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        strategy, b, t = args.child
        _child(strategy, int(b), int(t), args.threads)
        return {}
    set_threads(args.threads)
    batch = args.batch or (4 if args.quick else 16)
    length = args.length or (4 if args.quick else 16)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    rows = []
    for strategy in ("replicate", "fsdp", "fsdp-keep"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks), __file__,
               "--threads", str(args.threads), "--child", strategy, str(batch), str(length)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            why = [line.strip() for line in done.stderr.splitlines() if "Error:" in line or "exitcode" in line or "terminate" in line]
            raise RuntimeError(f"{strategy} group failed ({done.returncode}): {' | '.join(why[-4:]) or done.stderr[-300:]}")
        ranks = json.loads(done.stdout.strip().splitlines()[-1])
        worst = {k: max(r[k] for r in ranks) for k in ranks[0]}
        worst["state_mb"] = worst["weights_mb"] + worst["grads_mb"] + worst["adam_mb"]
        rows.append({"strategy": strategy, "ranks": args.ranks, "B": batch, "T": length, **worst})
    replicate = rows[0]
    for row in rows[1:]:
        for key in ("state_mb", "peak_rss_mb", "step_s"):
            row[f"{key}_vs_replicate"] = row[key] / replicate[key]
    return emit("sharding", rows, ["strategy", "ranks", "B", "T", "weights_mb", "grads_mb", "adam_mb", "state_mb", "state_mb_vs_replicate",
                                   "peak_rss_mb", "peak_rss_mb_vs_replicate", "step_s", "step_s_vs_replicate"], args.json, threads=args.threads)


if __name__ == "__main__":
    main()
