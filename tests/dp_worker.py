"""Runs the data-parallel equivalence cases of test_distributed.py in one process of a group.

    torchrun --nproc_per_node 2 tests/dp_worker.py OUT     # each case in OUT/<case>/, params of every rank
    python tests/dp_worker.py OUT                          # the same cases in one process

Kept out of the test module so torchrun's workers import only this (and tiltlm).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiltlm.distributed import init_from_env
from tiltlm.distributed.dist import leave_group
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

CONTEXTS = ["x", "y", "z"]  # 3 contexts x 3 samples = 9 rows: 2 ranks get rows 0-3 and 4-8, so context y is split
BASE = {"target": {"reward": "count:a", "beta": 1.0}, "sampling": {"contexts": CONTEXTS, "n_per_context": 3, "max_new_tokens": 3},
        "optim": {"steps": 4, "lr": 0.1}, "metrics": {"exact_every": 2}, "seed": 5}
CASES = {
    "kl-pg": {**BASE, "algorithm": {"name": "kl-pg"}},
    "dpg": {**BASE, "algorithm": {"name": "dpg"}},
    "gdc++-off-policy": {**BASE, "algorithm": {"name": "gdc++", "off_policy": True}},
    "ppo-kl": {**BASE, "algorithm": {"name": "ppo-kl", "epochs": 2}},
    "env-kl-pg": {"algorithm": {"name": "kl-pg"}, "target": {"beta": 1.0}, "sampling": {"n_per_context": 5},
                  "env": {"name": "tabular", "options": {"depth": 2, "seed": 3, "reward_scale": 2.0}, "timeout_s": None},
                  # SGD: here some true gradients are exactly 0, and Adam turns float noise of 1e-9 there into lr-sized steps
                  "optim": {"steps": 4, "lr": 0.5, "optimizer": "sgd"}, "metrics": {"exact_every": 2, "diversity": False}, "seed": 1},
}


def build_case(name: str):
    cfg = parse_config(CASES[name])
    if cfg.env is not None:
        from tiltlm.train.build import build

        return (cfg, *build(cfg))
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, contexts=tuple(CONTEXTS), seed=0)
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    return cfg, policy, Prior(prior) * Tilt("count:a", 1.0)


def run(out: Path, rank: int = 0) -> None:
    for name in CASES:
        cfg, policy, target = build_case(name)
        Trainer(cfg, policy=policy, target=target, out_dir=out / name).run()
        save_file({"logits": policy.logits.detach().contiguous()}, str(out / f"{name}.rank{rank}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    world = init_from_env()
    run(Path(sys.argv[1]), world.rank)
    leave_group(world)
