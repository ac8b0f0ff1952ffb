"""Data parallelism: 2 gloo processes on the CPU train exactly what one process trains.

The known answer is the one-process run itself: with the same global batch and seed, every rank
draws only its shard of the rows, yet the global batch, the statistics computed from it (leave-one-out
baselines, the running log Z, the metrics) and the summed gradient are those of one process, so the
parameters agree to float rounding (measured: max |diff| <= 1.2e-7 after 4 Adam steps).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiltlm.distributed.dist import World
from tiltlm.records import concat
from tiltlm.envs import get_env, rollout
from tiltlm.errors import TiltlmError
from tiltlm.policies import TabularPolicy

WORKER = Path(__file__).resolve().parent / "dp_worker.py"


def _worker_module():
    spec = importlib.util.spec_from_file_location("dp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_gloo_processes_train_the_same_parameters_as_one(tmp_path):
    worker = _worker_module()
    worker.run(tmp_path / "one")  # the reference: the same cases in this process (world size 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --standalone: torchrun binds its own free port (no race between picking a port and binding it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    for name in worker.CASES:
        one = load_file(str(tmp_path / "one" / f"{name}.rank0.safetensors"))["logits"]
        rank0 = load_file(str(tmp_path / "two" / f"{name}.rank0.safetensors"))["logits"]
        rank1 = load_file(str(tmp_path / "two" / f"{name}.rank1.safetensors"))["logits"]
        _, initial, _ = worker.build_case(name)
        assert (one - initial.logits.detach()).abs().max() > 0.05, f"{name}: training must move the weights for the check to mean anything"
        torch.testing.assert_close(rank0, rank1, atol=0, rtol=0, msg=f"{name}: the replicas diverged")
        torch.testing.assert_close(rank0, one, atol=1e-6, rtol=0, msg=f"{name}: 2 processes != 1 process")
        rows_one = [json.loads(line) for line in (tmp_path / "one" / name / "metrics.jsonl").read_text().splitlines()]
        rows_two = [json.loads(line) for line in (tmp_path / "two" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows_two] == [1, 2, 3, 4], f"{name}: only rank 0 writes metrics"
        assert rows_two[0].keys() == rows_one[0].keys() and rows_two[1].keys() == rows_one[1].keys()  # exact metrics too
        for a, b in zip(rows_one, rows_two):
            for key, value in a.items():
                if isinstance(value, str):  # e.g. kl/prior_estimator
                    assert b[key] == value, f"{name} step {a['step']}: {key}"
                else:
                    assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), f"{name} step {a['step']}: {key}"
        assert (tmp_path / "two" / name / "checkpoint").is_dir() and (tmp_path / "two" / name / "policy").is_dir()


def test_a_shard_of_rows_is_drawn_as_in_the_whole_batch():
    from tiltlm.policies import HFPolicy

    lm = HFPolicy.from_pretrained("default", max_new_tokens=6)
    contexts = ["", "Once upon a time"]  # 2 contexts x 4 rows split 3 + 1 + 4: the second context is split
    full = lm.sample(contexts, 4, seed=3)
    parts = [lm.sample(contexts, 4, seed=3, rows=r) for r in (range(0, 3), range(3, 4), range(4, 8))]
    joined = concat(parts, lm.pad_id)
    assert joined.texts == full.texts and torch.equal(joined.ids, full.ids) and torch.equal(joined.mask, full.mask)
    # same tokens; the float32 log-probs of a smaller batch differ at rounding (measured up to 2.9e-6)
    torch.testing.assert_close(joined.token_logp, full.token_logp, atol=1e-5, rtol=1e-5)
    assert len(set(full.texts)) > 1  # different rows really differ

    tab = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, contexts=("x", "y"), seed=0)
    full = tab.sample(["x", "y"], 5, seed=1)
    joined = concat([tab.sample(["x", "y"], 5, seed=1, rows=r) for r in (range(0, 4), range(4, 10))], tab.pad_id)
    assert joined.texts == full.texts and torch.equal(joined.group, full.group)
    torch.testing.assert_close(joined.token_logp, full.token_logp, atol=0, rtol=0)


def test_an_episode_shard_is_played_as_in_the_whole_rollout():
    env = get_env("tabular", depth=2, seed=3)
    policy = env.make_prior()
    full = rollout(policy, env, ["start"], 9, seed=4, timeout_s=None)
    parts = [rollout(policy, env, ["start"], 9, seed=4, timeout_s=None, episodes=r) for r in (range(0, 5), range(5, 9))]
    joined = concat(parts, policy.pad_id)
    assert torch.equal(joined.ids, full.ids) and torch.equal(joined.mask, full.mask)
    assert [t.to_json() for t in joined.trajectories] == [t.to_json() for t in full.trajectories]
    assert len({tuple(t.actions + t.observations) for t in full.trajectories}) > 1


def test_a_batch_smaller_than_the_world_names_the_fix():
    assert [World(r, 3).shard(10) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    with pytest.raises(TiltlmError, match="cannot be split over 4 processes; raise sampling.n_per_context"):
        World(0, 4).shard(3)
