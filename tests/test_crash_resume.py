"""Crash safety: `kill -9` of a real `tiltlm train` process, then `--resume`, gives the uninterrupted run.

One run of 10 steps (checkpoint every step) on a tiny GPT-2 testbed is SIGKILLed six times, each
time at a different kind of moment, and resumed after each kill:

1. inside the *first* checkpoint write (no checkpoint exists yet: resume restarts from step 0);
2. right after metrics line 4 appears (mid-step / mid-checkpoint, whatever the clock says);
3. inside a later checkpoint write (checkpoint.tmp half-written beside a good checkpoint/);
4. between the two renames of the checkpoint swap (only checkpoint.old and checkpoint.tmp exist);
5. right after metrics line 8, then half a JSON line is appended (a torn append);
6. inside the final policy/ write (policy.tmp half-written).

The run that survives all six must write metrics.jsonl and final weights byte-identical to an
uninterrupted run with the same seed (the same CLI entry point, run in this process with one thread
like the subprocesses: one process start fewer keeps the file under a minute on two cores). Kills 1, 3, 4 and 6 land in their windows for certain: the
test runs the real CLI entry point through a wrapper that only *sleeps* inside those windows
(time.sleep changes no number), and the test checks the directory it left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

STEPS = 10

WRAPPER = '''
"""The real `tiltlm` CLI, with sleeps that widen the windows a SIGKILL should hit (PAUSE names one)."""
import os, pathlib, sys, time

pause = os.environ.get("PAUSE", "")
if pause == "checkpoint_files":  # after each tensor file written into checkpoint.tmp/
    import tiltlm.train.checkpoint as ck
    _save = ck.save_file
    def save_file(tensors, path, *args, **kwargs):
        _save(tensors, path, *args, **kwargs)
        time.sleep(0.3)
    ck.save_file = save_file
elif pause == "swap":  # after checkpoint/ became checkpoint.old/, before checkpoint.tmp/ becomes checkpoint/
    _rename = pathlib.Path.rename
    def rename(self, target):
        result = _rename(self, target)
        if str(target).endswith("checkpoint.old"):
            time.sleep(0.5)
        return result
    pathlib.Path.rename = rename
elif pause == "policy":  # after policy.tmp/ is written, before it is renamed to policy/
    from tiltlm.policies.hf import HFPolicy
    _policy_save = HFPolicy.save
    def save(self, directory):
        result = _policy_save(self, directory)
        time.sleep(0.5)
        return result
    HFPolicy.save = save

from tiltlm.cli import main
sys.argv[0] = "tiltlm"
main()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("crash")
    model = make_testbed(root / "tb", vocab_size=4, n_layer=1, n_embd=16, n_head=2, seed=0, train_steps=0)
    config = {"prior": str(model), "target": {"reward": "count:a", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
              "sampling": {"n_per_context": 4, "max_new_tokens": 4}, "optim": {"steps": STEPS, "lr": 0.01, "schedule": "cosine"},
              "checkpoint": {"every": 1}, "seed": 3}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    (root / "hooked.py").write_text(WRAPPER)
    return root


def _env(pause: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PAUSE": pause, "HF_HUB_OFFLINE": "1"}
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(root: Path, out: Path, *, resume: bool, pause: str = "") -> subprocess.Popen:
    args = [sys.executable, str(root / "hooked.py"), "train", str(root / "cfg.yaml"), "--out", str(out)]
    return subprocess.Popen(args + (["--resume"] if resume else []), env=_env(pause),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _complete_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point was reached:\n{proc.stderr.read()}")


def _identity(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _rows(out: Path) -> list[str]:
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return text.splitlines()


def _uninterrupted(root: Path, out: Path, monkeypatch) -> None:
    """The reference: the same CLI entry point, in this process, with one thread like the subprocesses."""
    from tiltlm.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["tiltlm", "train", str(root / "cfg.yaml"), "--out", str(out)])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_at_six_points_then_resume_equals_the_uninterrupted_run(setup, monkeypatch):
    root = setup
    out = root / "cut"
    kills = []

    # 1. inside the first checkpoint write: nothing but config.yaml and metrics line 1 survive
    p = _launch(root, out, resume=False, pause="checkpoint_files")
    _kill_when(p, lambda: (out / "checkpoint.tmp" / "policy.safetensors").exists())
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.tmp" / "state.json").exists()
    kills.append("first checkpoint write")

    # 2. right after metrics line 4 appears
    p = _launch(root, out, resume=True)
    _kill_when(p, lambda: _complete_lines(out) >= 4)
    kills.append("after metrics line 4")

    # 3. inside a checkpoint write, beside a good checkpoint (kill 2 may have left a stale checkpoint.tmp)
    tmp_file = out / "checkpoint.tmp" / "policy.safetensors"
    stale = _identity(tmp_file)
    p = _launch(root, out, resume=True, pause="checkpoint_files")
    _kill_when(p, lambda: _identity(tmp_file) not in (None, stale))
    assert (out / "checkpoint" / "state.json").exists() and not (out / "checkpoint.tmp" / "state.json").exists()
    kills.append("later checkpoint write")

    # 4. between the renames of the checkpoint swap
    p = _launch(root, out, resume=True, pause="swap")
    _kill_when(p, lambda: (out / "checkpoint.old").exists() and not (out / "checkpoint").exists())
    assert (out / "checkpoint.old" / "state.json").exists() and not (out / "checkpoint").exists()
    kills.append("checkpoint swap")

    # 5. right after metrics line 8, then a torn append
    p = _launch(root, out, resume=True)
    _kill_when(p, lambda: _complete_lines(out) >= 8)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.12')
    kills.append("after metrics line 8 + torn line")

    # 6. inside the final policy write
    p = _launch(root, out, resume=True, pause="policy")
    _kill_when(p, lambda: (out / "policy.tmp").exists())
    assert not (out / "policy").exists() and json.loads((out / "checkpoint" / "state.json").read_text())["step"] == STEPS
    kills.append("final policy write")

    done = _launch(root, out, resume=True)
    assert done.wait(timeout=120) == 0, done.stderr.read()
    assert len(kills) == 6
    _uninterrupted(root, root / "ref", monkeypatch)

    rows_ref, rows_cut = _rows(root / "ref"), _rows(out)
    assert [json.loads(r)["step"] for r in rows_cut] == list(range(1, STEPS + 1))
    assert rows_cut == rows_ref  # the same JSON text: every float identical
    for name in ("policy/model.safetensors", "checkpoint/policy.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = load_file(str(root / "ref" / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert not any(p.name.endswith((".tmp", ".old")) for p in out.iterdir())
    # the run really moved away from the prior (the comparison is not between two untouched models)
    prior = load_file(str(root / "tb" / "model.safetensors"))
    final = load_file(str(out / "policy" / "model.safetensors"))
    assert not torch.equal(prior["transformer.wte.weight"], final["transformer.wte.weight"])


# ---- torn writes, in-process ----------------------------------------------------------------------


def _tabular_run(tmp_path, steps=3):
    from tiltlm.policies import TabularPolicy
    from tiltlm.targets import Prior, Tilt
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0)
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    cfg = parse_config({"algorithm": "kl-pg", "target": {"reward": "count:a", "beta": 1.0},
                        "sampling": {"n_per_context": 8, "max_new_tokens": 3}, "optim": {"steps": steps, "lr": 0.05},
                        "checkpoint": {"every": 1}})
    Trainer(cfg, policy=policy, target=Prior(prior) * Tilt("count:a", 1.0), out_dir=tmp_path / "run").run()
    return tmp_path / "run" / "checkpoint"


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage", ["truncate_policy_end", "truncate_policy_header", "empty_optimizer", "flip_a_weight_byte",
                                    "missing_rng", "state_json_half"])
def test_a_torn_checkpoint_never_loads_as_valid(tmp_path, damage):
    from tiltlm.errors import TiltlmError
    from tiltlm.train.checkpoint import load_checkpoint

    ckpt = _tabular_run(tmp_path)
    load_checkpoint(ckpt)  # intact: loads
    if damage == "truncate_policy_end":
        _truncate(ckpt / "policy.safetensors", -7)
    elif damage == "truncate_policy_header":
        _truncate(ckpt / "policy.safetensors", 6)
    elif damage == "empty_optimizer":
        (ckpt / "optimizer.safetensors").write_bytes(b"")
    elif damage == "flip_a_weight_byte":  # the header still parses: only the recorded hash catches it
        data = bytearray((ckpt / "policy.safetensors").read_bytes())
        data[-3] ^= 0x40
        (ckpt / "policy.safetensors").write_bytes(bytes(data))
    elif damage == "missing_rng":
        (ckpt / "rng.safetensors").unlink()
    elif damage == "state_json_half":
        text = (ckpt / "state.json").read_text()
        (ckpt / "state.json").write_text(text[: len(text) // 2])
    with pytest.raises(TiltlmError) as e:
        load_checkpoint(ckpt)
    message = str(e.value)
    assert "\n" not in message and "unreadable" in message and "--resume" in message


def test_a_torn_checkpoint_falls_back_to_an_intact_old_one(tmp_path):
    import shutil

    from tiltlm.train.checkpoint import load_checkpoint

    ckpt = _tabular_run(tmp_path)
    shutil.copytree(ckpt, ckpt.with_name("checkpoint.old"))
    _truncate(ckpt / "policy.safetensors", -7)
    assert load_checkpoint(ckpt)["state"]["step"] == 3  # read from checkpoint.old
    shutil.rmtree(ckpt)  # killed between the swap's renames: only .old is left
    assert load_checkpoint(ckpt)["state"]["step"] == 3
