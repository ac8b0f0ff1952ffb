"""Content identity (docs/reliability.md, "What a run is made of"): a run records its inputs' digests and a
`--resume` or a sweep re-run refuses a changed input, each case injected for real between real `tiltlm`
processes (files rewritten in place, weights replaced), ending in one line with exit 2 and nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_bad_inputs import one_line, snapshot
from tiltlm.reuse import input_changes, input_digests, path_digest

ENV = {**os.environ, "TILTLM_THREADS": "1"}
REWARD = "def score(texts):\n    return [float(t.count('a')) for t in texts]\n"


def tiltlm(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiltlm.cli", *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def printed(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def write_data(path: Path, prompts) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "a"}) + "\n" for p in prompts))


@pytest.fixture
def run(tmp_path):
    """A finished 2-step run (checkpoint every step) on a testbed, a prompt file, an eval file and a reward file."""
    from tiltlm.testbed import make_testbed

    make_testbed(tmp_path / "tb", vocab_size=4, n_layer=1, n_embd=16, n_head=2, seed=0, train_steps=0)
    write_data(tmp_path / "train.jsonl", ["a", "b", "ab"])
    write_data(tmp_path / "held.jsonl", ["ba"])
    (tmp_path / "rewards.py").write_text(REWARD)
    config = {"prior": "tb", "target": {"reward": "rewards.py:score", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
              "data": {"path": "train.jsonl", "eval_path": "held.jsonl"}, "sampling": {"n_per_context": 2, "max_new_tokens": 3},
              "optim": {"steps": 2, "lr": 0.01, "schedule": "constant"}, "checkpoint": {"every": 1}, "seed": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    done = tiltlm("train", "cfg.yaml", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, printed(done)
    return tmp_path


def test_digest_is_the_files_sha256_and_reuses_it_only_for_the_same_stat(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes(b"hello")
    d = path_digest(f)
    assert d["files"]["x.txt"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert d["sha256"] == hashlib.sha256(b"x.txt\0" + hashlib.sha256(b"hello").hexdigest().encode() + b"\n").hexdigest()
    fake = json.loads(json.dumps(d))
    fake["files"]["x.txt"]["sha256"] = "0" * 64  # an earlier record with the same stat identity: not read again
    assert path_digest(f, fake)["files"]["x.txt"]["sha256"] == "0" * 64
    f.write_bytes(b"hellp")  # same size; the write changes mtime/ctime, so the file is read
    os.utime(f, ns=(d["files"]["x.txt"]["stat"][3],) * 2)  # even with its mtime set back (ctime cannot be)
    assert path_digest(f, fake)["files"]["x.txt"]["sha256"] == hashlib.sha256(b"hellp").hexdigest()


def test_input_digests_name_every_input(run):
    from tiltlm.train.config import load_config

    os.chdir(run)
    digests = input_digests(load_config(run / "cfg.yaml"))
    assert set(digests) == {"prior", "data.path", "data.eval_path", "target.reward"}
    assert digests["target.reward"]["files"]["rewards.py"]["sha256"] == hashlib.sha256(REWARD.encode()).hexdigest()
    assert json.loads((run / "run" / "inputs.json").read_text()).keys() == digests.keys()
    assert input_changes(digests, digests) == []


@pytest.mark.parametrize("case", ["data", "eval", "reward", "prior"])
def test_resume_refuses_a_changed_input_then_accept_config_records_it(run, case):
    """The input rewritten in place between the run and its --resume: refused, one line naming the input and
    its digests, the run directory byte-identical; --accept-config continues and records the change."""
    from tiltlm.testbed import make_testbed

    before = snapshot(run / "run")
    old = json.loads((run / "run" / "inputs.json").read_text())
    name = {"data": "data.path", "eval": "data.eval_path", "reward": "target.reward", "prior": "prior"}[case]
    if case == "data":
        write_data(run / "train.jsonl", ["b", "b", "bb"])
    elif case == "eval":
        write_data(run / "held.jsonl", ["bb"])
    elif case == "reward":
        (run / "rewards.py").write_text(REWARD.replace("'a'", "'b'"))
    else:  # a re-made testbed at the same path: other weights, same shapes
        make_testbed(run / "tb", vocab_size=4, n_layer=1, n_embd=16, n_head=2, seed=5, train_steps=0, overwrite=True)
    done = tiltlm("train", "cfg.yaml", "--out", "run", "--resume", "--steps", "3", cwd=run)
    line = one_line(done.returncode, printed(done), [f"{name} '", old[name]["sha256"][:12], "--accept-config"])
    assert (" (model.safetensors" in line) == (case == "prior")
    assert snapshot(run / "run") == before
    done = tiltlm("train", "cfg.yaml", "--out", "run", "--resume", "--steps", "3", "--accept-config", cwd=run)
    assert done.returncode == 0, printed(done)
    new = json.loads((run / "run" / "inputs.json").read_text())
    records = [json.loads(line) for line in (run / "run" / "config_changes.jsonl").read_text().splitlines()]
    assert records == [{"step": 2, "changes": {"optim.steps": [2, 3], f"inputs.{name}": [old[name]["sha256"], new[name]["sha256"]]}}]
    assert json.loads((run / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_same_content_with_new_metadata_resumes(run):
    """touch and a copy back leave the content as it was: no refusal (the digest is of the content)."""
    shutil.copy(run / "train.jsonl", run / "copy.jsonl")
    os.replace(run / "copy.jsonl", run / "train.jsonl")  # another inode, the same bytes
    (run / "rewards.py").touch()
    done = tiltlm("train", "cfg.yaml", "--out", "run", "--resume", "--steps", "3", cwd=run)
    assert done.returncode == 0, printed(done)
    records = [json.loads(line) for line in (run / "run" / "config_changes.jsonl").read_text().splitlines()]
    assert records == [{"step": 2, "changes": {"optim.steps": [2, 3]}}]  # the extension alone, no input


def test_deleted_config_yaml_compares_with_the_checkpoints_config(run):
    """config.yaml deleted: the config the checkpoint recorded is compared (another algorithm: one line, not a
    KeyError); with it, and even with --accept-config, another algorithm's state is refused before loading;
    the run's own config resumes and config.yaml is written again."""
    (run / "run" / "config.yaml").unlink()
    before = snapshot(run / "run")
    other = yaml.safe_load((run / "cfg.yaml").read_text())
    other["algorithm"] = {"name": "dpg"}
    (run / "dpg.yaml").write_text(yaml.safe_dump(other))
    done = tiltlm("train", "dpg.yaml", "--out", "run", "--resume", cwd=run)
    one_line(done.returncode, printed(done), ["algorithm.name: 'kl-pg' → 'dpg'", "state.json"])
    done = tiltlm("train", "dpg.yaml", "--out", "run", "--resume", "--accept-config", cwd=run)
    one_line(done.returncode, printed(done), ["holds the state of kl-pg", "not of dpg"])
    assert snapshot(run / "run") == before
    done = tiltlm("train", "cfg.yaml", "--out", "run", "--resume", "--steps", "3", cwd=run)
    assert done.returncode == 0, printed(done)
    assert yaml.safe_load((run / "run" / "config.yaml").read_text())["optim"]["steps"] == 3


def test_a_prior_of_another_vocabulary_is_refused_before_loading(run):
    """The prior replaced by one of another vocabulary and the change accepted: a one-line refusal naming the
    tensor's shapes, not a `size mismatch` traceback, and nothing written."""
    from tiltlm.testbed import make_testbed

    make_testbed(run / "tb", vocab_size=8, n_layer=1, n_embd=16, n_head=2, seed=0, train_steps=0, overwrite=True)
    before = snapshot(run / "run")
    done = tiltlm("train", "cfg.yaml", "--out", "run", "--resume", "--accept-config", cwd=run)
    one_line(done.returncode, printed(done), ["of shape [4, 16] but this policy's is [8, 16]", "another vocabulary"])
    assert snapshot(run / "run") == before


def test_sweep_rerun_refuses_a_cell_whose_data_changed(tmp_path):
    """A finished sweep re-run after its prompt file is rewritten: refused naming a cell and the input;
    --overwrite re-runs exactly the cells made from the old file."""
    from tiltlm.testbed import make_testbed

    make_testbed(tmp_path / "tb", vocab_size=4, n_layer=1, n_embd=16, n_head=2, seed=0, train_steps=0)
    write_data(tmp_path / "train.jsonl", ["a", "b"])
    sweep = {"base": {"prior": "tb", "target": {"reward": "count:a"}, "data": {"path": "train.jsonl"},
                      "sampling": {"n_per_context": 2, "max_new_tokens": 2}, "optim": {"steps": 1}, "metrics": {"diversity": False}},
             "grid": {"algorithms": ["kl-pg"], "betas": [1.0], "seeds": [0]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    done = tiltlm("sweep", "sweep.yaml", "--out", "sw", cwd=tmp_path)
    assert done.returncode == 0, printed(done)
    write_data(tmp_path / "train.jsonl", ["b", "b"])
    before = snapshot(tmp_path / "sw")
    done = tiltlm("sweep", "sweep.yaml", "--out", "sw", cwd=tmp_path)
    one_line(done.returncode, printed(done), ["kl-pg_beta1_seed0", "data.path '", "--overwrite"])
    assert snapshot(tmp_path / "sw") == before
    done = tiltlm("sweep", "sweep.yaml", "--out", "sw", "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, printed(done)
    cell = tmp_path / "sw" / "cells" / "kl-pg_beta1_seed0"
    assert json.loads((cell / "inputs.json").read_text())["data.path"]["sha256"] == path_digest(tmp_path / "train.jsonl")["sha256"]
