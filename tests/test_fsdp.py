"""FSDP: 2 gloo processes with sharded weights train what one process trains, through `tiltlm train`.

Known answer: the one-process run of the same config (one process ignores `distributed`). Each case
is interrupted after step 2 and resumed under torchrun, so the test also covers gathering the
sharded weights and Adam moments into a checkpoint, reloading them into shards, and writing policy/.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiltlm.errors import TiltlmError
from tiltlm.train.config import parse_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def _train(config: Path, out: Path, *args: str, ranks: int = 1) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "tiltlm.cli", "train", str(config), "--out", str(out), *args],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_same_run(one: Path, two: Path, initial: dict[str, torch.Tensor], weights_atol: float, checkpoint_atol: float) -> None:
    rows_one, rows_two = _metrics(one), _metrics(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4], "rank 0 alone writes, and the resumed run appends steps 3-4"
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys(), f"step {a['step']}"
        for key, value in a.items():
            if isinstance(value, str):
                assert b[key] == value
            else:
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), f"step {a['step']}: {key}"
    final_one = load_file(str(one / "policy" / "model.safetensors"))
    final_two = load_file(str(two / "policy" / "model.safetensors"))
    assert final_one.keys() == final_two.keys()
    moved = max(float((final_one[k] - initial[k]).abs().max()) for k in final_one if k in initial)
    assert moved > 20 * weights_atol, "training must move the weights for the comparison to mean anything"
    for k in final_one:
        torch.testing.assert_close(final_two[k], final_one[k], atol=weights_atol, rtol=0)
    # the gathered checkpoint has the one-process format and values: either run resumes the other
    for file in ("policy.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(one / "checkpoint" / file)), load_file(str(two / "checkpoint" / file))
        assert a.keys() == b.keys(), file
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=checkpoint_atol, rtol=0, msg=lambda m, k=k, f=file: f"{f} {k}: {m}")
    state_one = json.loads((one / "checkpoint" / "state.json").read_text())
    state_two = json.loads((two / "checkpoint" / "state.json").read_text())
    assert state_one["optimizer"] == state_two["optimizer"] and state_one["step"] == state_two["step"] == 4


def _run_both(tmp_path: Path, config: dict, initial: dict[str, torch.Tensor], weights_atol: float, checkpoint_atol: float) -> None:
    """The configs set a constant lr: a run stopped by --steps 2 and extended by --resume --steps 4 is then the 4-step run."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    _train(path, tmp_path / "one")
    _train(path, tmp_path / "two", "--steps", "2", ranks=2)  # interrupted after step 2 …
    assert [r["step"] for r in _metrics(tmp_path / "two")] == [1, 2]
    _train(path, tmp_path / "two", "--resume", "--steps", "4", ranks=2)  # … and resumed from its checkpoint
    _check_same_run(tmp_path / "one", tmp_path / "two", initial, weights_atol, checkpoint_atol)


def test_fsdp_full_fine_tuning_with_exact_metrics_equals_one_process(tmp_path):
    from tiltlm.testbed import make_testbed

    model = make_testbed(tmp_path / "tb", vocab_size=5, n_layer=2, n_embd=16, n_head=2, seed=0, train_steps=60)
    config = {
        "prior": str(model), "algorithm": {"name": "kl-pg"}, "target": {"reward": "count:c", "beta": 1.0},
        # 7 rows: rank 0 draws 3, rank 1 draws 4 (uneven shards)
        "sampling": {"contexts": [""], "n_per_context": 7, "max_new_tokens": 4},
        # SGD here: with Adam, weights whose gradient is 0 up to rounding (embeddings of rare tokens, key biases) take
        # lr-sized steps decided by float noise, so even 1 thread vs 2 threads in one process differs by 3e-4 on this model;
        # the LoRA case below checks the sharded Adam moments
        "optim": {"steps": 4, "lr": 0.05, "optimizer": "sgd", "grad_clip": 1.0, "schedule": "constant"}, "metrics": {"exact_every": 2}, "checkpoint": {"every": 2},
        "distributed": {"strategy": "fsdp"}, "seed": 3,
    }
    _run_both(tmp_path, config, load_file(str(model / "model.safetensors")), weights_atol=1e-6, checkpoint_atol=1e-6)  # measured 1.2e-7
    assert "kl/target_exact" in _metrics(tmp_path / "two")[1]  # exact metrics computed by both ranks together
    # the FSDP run's checkpoint resumes in one process, as the one-process run's own does
    for run in ("one", "two"):
        _train(tmp_path / "config.yaml", tmp_path / run, "--resume", "--steps", "5")
    step5_one, step5_two = _metrics(tmp_path / "one")[-1], _metrics(tmp_path / "two")[-1]
    assert step5_one["step"] == step5_two["step"] == 5
    assert step5_two["loss"] == pytest.approx(step5_one["loss"], rel=1e-4, abs=1e-5)
    assert step5_two["kl/target_exact"] == pytest.approx(step5_one["kl/target_exact"], rel=1e-4)


def test_fsdp_lora_on_the_default_lm_equals_one_process(tmp_path):
    from tiltlm.policies.hf import resolve_model_dir

    config = {
        # plain DPG: with GDC++'s baseline every weight P/(Zq) - pi/q is ~0 at the first step (no sample contains 'dog'),
        # so the first gradient is rounding noise that Adam scales to lr-sized steps: even one process on 1 vs 2 threads
        # then differs by 0.02 in the step-2 loss (3.7613 vs 3.7417, measured 2026-12-01), as FSDP does
        "lora": {"r": 4}, "algorithm": {"name": "dpg", "baseline": False}, "target": {"reward": "contains:dog", "beta": 0.2},
        # 2 contexts x 3 rows: each rank draws one context's rows, which end at different lengths
        "sampling": {"contexts": ["Once upon a time", "The dog"], "n_per_context": 3, "max_new_tokens": 8},
        "optim": {"steps": 4, "lr": 2e-3, "schedule": "constant"}, "metrics": {"diversity": False}, "checkpoint": {"every": 2},
        "distributed": {"strategy": "fsdp"}, "seed": 0,
    }
    initial = load_file(str(resolve_model_dir("default") / "model.safetensors"))
    # measured on the stories + quiz default prior (2026-12-01): merged weights 1.4e-5 apart (one entry of
    # h.1.attn.c_attn; the other layers 1e-7 to 9e-7), Adam moments 1.2e-7, the adapters themselves 5.2e-5 — where
    # Adam normalises gradients that are 0 up to rounding; the same one-process run on 1 vs 2 threads differs there
    # by as much (merged weights 9.7e-6, adapters 3.7e-5). (On the stories-only prior before it: 2.3e-7, 2.3e-8,
    # 5.6e-6 and 6.3e-6 on 1 vs 2 threads, with atols 2e-6 / 3e-5.)
    _run_both(tmp_path, config, initial, weights_atol=3e-5, checkpoint_atol=1e-4)


def test_fsdp_episodes_that_end_at_different_turns_on_each_rank_equal_one_process(tmp_path):
    from tiltlm.policies.hf import resolve_model_dir

    env = str(Path(__file__).resolve().parent / "turns_env.py") + ":Turns"
    config = {
        # 2 tasks x 3 episodes: rank 0 plays the three 1-turn episodes, rank 1 the three 3-turn ones
        "algorithm": {"name": "kl-pg"}, "env": {"name": env, "max_action_tokens": 4}, "target": {"beta": 0.5},
        "sampling": {"n_per_context": 3}, "optim": {"steps": 4, "lr": 0.01, "optimizer": "sgd", "schedule": "constant"}, "metrics": {"diversity": False},
        # reshard_after_forward false: a unit's gathered weights stay from the decoding forwards until the backward
        "checkpoint": {"every": 2}, "distributed": {"strategy": "fsdp", "reshard_after_forward": False}, "seed": 1,
    }
    _run_both(tmp_path, config, load_file(str(resolve_model_dir("default") / "model.safetensors")), weights_atol=1e-6, checkpoint_atol=1e-6)
    assert all(row["env/turns_mean"] == 2.0 for row in _metrics(tmp_path / "two"))  # (3 x 1 + 3 x 3) / 6


@pytest.mark.parametrize("change, message", [
    ({"rollout": {"generation": "vllm"}}, "rollout.generation: vllm"),
    ({"algorithm": {"name": "dpg", "off_policy": True}}, "set algorithm.proposal_check_every: 0"),
])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(change, message, testbed_policy):
    from tiltlm.distributed.fsdp import check_supported

    config = parse_config({"algorithm": {"name": "kl-pg"}, "distributed": {"strategy": "fsdp"}, **change})
    with pytest.raises(TiltlmError, match=message):
        check_supported(config, testbed_policy)
    check_supported(parse_config({"algorithm": {"name": "dpg", "off_policy": True, "proposal_check_every": 0}}), testbed_policy)


def test_fsdp_refuses_a_tabular_policy():
    from tiltlm.distributed.fsdp import check_supported
    from tiltlm.policies import TabularPolicy

    tab = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=2, seed=0)
    with pytest.raises(TiltlmError, match="only Hugging Face policies are sharded"):
        check_supported(parse_config({"algorithm": {"name": "kl-pg"}}), tab)


def test_log_prob_chunks_cover_every_row_once(testbed_policy):
    policy = testbed_policy
    saved = policy.chunk_size
    try:
        policy.chunk_size = 2
        assert [(s.start, s.stop) for s in policy._chunks(5)] == [(0, 1), (1, 3), (3, 5)]
        assert policy._chunks(0) == []
        samples = policy.sample(["", "a"], 3, seed=1)
        chunked = policy.log_prob(samples)
        policy.chunk_size = 64
        torch.testing.assert_close(chunked, policy.log_prob(samples), atol=1e-5, rtol=1e-5)
    finally:
        policy.chunk_size = saved


def test_fsdp_units_default_to_the_transformer_blocks_and_unknown_names_fail_in_one_line(testbed_policy):
    from tiltlm.distributed.fsdp import _units

    model = testbed_policy.model
    assert [type(m).__name__ for m in _units(model, None)] == ["GPT2Block"] * model.config.n_layer
    assert len(_units(model, ("GPT2MLP",))) == model.config.n_layer
    with pytest.raises(TiltlmError, match=r"fsdp_units \['NoSuchBlock'\] match no module of the model; module classes: .*GPT2Block"):
        _units(model, ("NoSuchBlock",))
