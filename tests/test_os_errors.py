"""Operating-system faults and unsafe names end in one line (exit 2) and lose nothing.

The faults are real: a tmpfs too small for the run (a full disk), a tmpfs mounted read-only, a path under a
file. Mounting needs a private mount namespace (`unshare -rm`, user + mount namespaces; root in CI); where the
kernel refuses one, those tests are skipped with that reason. The file-system state after each fault is listed
from inside the namespace (the mount disappears with it).
"""

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

from test_bad_inputs import one_line, snapshot, tiltlm

CONFIG = {"target": {"reward": "count:a", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
          "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 4, "lr": 0.01}, "checkpoint": {"every": 1}}

# a reward that fills the disk at its third call (step 3), once: the marker file says it already did
FILL_PY = '''
import os
from pathlib import Path

HERE = Path(__file__).parent

def fill(texts):
    calls = HERE / "calls"
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 3 and not (HERE / "filled").exists():
        (HERE / "filled").write_text("yes")
        with open(os.environ["FILL_PATH"], "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError:
                pass
    return [float(t.count("a")) for t in texts]
'''


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


NO_NAMESPACE = _unshare_works()
needs_mounts = pytest.mark.skipif(NO_NAMESPACE is not None, reason=str(NO_NAMESPACE))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("oserr")
    prior = make_testbed(root / "tb", vocab_size=4, n_layer=1, n_embd=16, seed=0)
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump({"prior": str(prior), **CONFIG}))
    return root, config


def _in_namespace(script: str, tmp_path: Path) -> tuple[int, str, list[str]]:
    """Run ``script`` (sh) in a private mount namespace with $M a fresh mount point; it sets $RC to the exit code
    of the command under test. Returns (that code, its stderr, what was left under $M: `find -printf %P`)."""
    mount = tmp_path / "m"
    mount.mkdir(exist_ok=True)
    env = {**os.environ, "M": str(mount), "PY": sys.executable, "TILTLM_THREADS": "1"}
    wrapped = f"set -u\n{script}\necho \"RC=$RC\" >&2\nfind \"$M\" -mindepth 1 -printf '%P\\n' > {tmp_path}/left.txt\n"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", wrapped], capture_output=True, text=True, env=env, timeout=300)
    code = int(done.stderr.rsplit("RC=", 1)[1].split()[0])
    left = sorted((tmp_path / "left.txt").read_text().split())
    return code, done.stderr.rsplit("RC=", 1)[0], left


def _shown(code: int, printed: str) -> str:
    """one_line's check, and the line printed for `pytest -rA` (the catalogue's message column)."""
    line = one_line(code, printed)
    print(line)
    return line


@needs_mounts
@pytest.mark.parametrize("size", ["4k", "64k"])
def test_a_new_run_on_a_full_disk_leaves_nothing(ctx, tmp_path, size):
    """4k: config.yaml does not fit; 64k: the first checkpoint does not. Either way one line and an empty disk."""
    _, config = ctx
    code, err, left = _in_namespace(f'mount -t tmpfs -o size={size} tmpfs "$M"\n'
                                    f'"$PY" -m tiltlm.cli train {config} --out "$M/run"; RC=$?', tmp_path)
    line = _shown(code, err)
    assert "no space left on device; free some space or write to another disk" in line
    assert left == []


@needs_mounts
def test_a_disk_that_fills_mid_run_keeps_the_checkpoint_and_resume_finishes_it_identically(ctx, tmp_path):
    """The reward fills the disk at step 3: the run stops with one line saying the checkpoint of step 2 is kept;
    after freeing the space --resume finishes, and metrics.jsonl equals an uninterrupted run's byte for byte."""
    root, _ = ctx
    for name in ("fill", "ref"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "r.py").write_text(FILL_PY)
        cfg = {"prior": str(root / "tb"), **CONFIG, "target": {"reward": f"{tmp_path / name}/r.py:fill", "beta": 1.0}}
        (tmp_path / name / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "ref" / "filled").write_text("already")  # the reference never fills anything
    env = {**os.environ, "TILTLM_THREADS": "1", "FILL_PATH": str(tmp_path / "unused")}
    ref = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(tmp_path / "ref" / "cfg.yaml"), "--out",
                          str(tmp_path / "ref_run")], capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    cfg = tmp_path / "fill" / "cfg.yaml"
    script = (f'mount -t tmpfs -o size=1m tmpfs "$M"\nexport FILL_PATH="$M/filler"\n'
              f'"$PY" -m tiltlm.cli train {cfg} --out "$M/run" 2> {tmp_path}/first.txt; echo $? > {tmp_path}/first_rc\n'
              f'cp -r "$M/run" {tmp_path}/after_fault\nrm "$M/filler"\n'
              f'"$PY" -m tiltlm.cli train {cfg} --out "$M/run" --resume; RC=$?\ncp -r "$M/run" {tmp_path}/resumed')
    code, err, _ = _in_namespace(script, tmp_path)
    line = _shown(int((tmp_path / "first_rc").read_text()), (tmp_path / "first.txt").read_text())
    assert "no space left on device" in line and "the run keeps its last checkpoint, and `--resume` continues it" in line
    state = json.loads((tmp_path / "after_fault" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "after_fault" / "checkpoint.tmp").exists()
    assert code == 0, err
    assert (tmp_path / "resumed" / "metrics.jsonl").read_bytes() == (tmp_path / "ref_run" / "metrics.jsonl").read_bytes()
    assert (tmp_path / "resumed" / "policy" / "model.safetensors").read_bytes() == \
        (tmp_path / "ref_run" / "policy" / "model.safetensors").read_bytes()


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@needs_mounts
def test_read_only_disk_new_run_and_resume(ctx, tmp_path):
    """A new run into a read-only file system, and --resume of a run that lies on one: one line each, and the
    run's files are byte-identical afterwards."""
    _, config = ctx
    code, err, left = _in_namespace(f'mount -t tmpfs -o ro tmpfs "$M"\n"$PY" -m tiltlm.cli train {config} --out "$M/run"; RC=$?',
                                    tmp_path)
    assert "read-only file system; write to a writable directory" in _shown(code, err) and left == []

    done = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(config), "--out", str(tmp_path / "run"), "--steps", "2"],
                          capture_output=True, text=True, env={**os.environ, "TILTLM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    before = _digests(tmp_path / "run")
    code, err, _ = _in_namespace(f'mount -t tmpfs tmpfs "$M"\ncp -r {tmp_path}/run "$M/run"\nmount -o remount,ro "$M"\n'
                                 f'"$PY" -m tiltlm.cli train {config} --out "$M/run" --resume --steps 4; RC=$?\n'
                                 f'cp -r "$M/run" {tmp_path}/after', tmp_path)
    assert "read-only file system" in _shown(code, err)
    assert _digests(tmp_path / "after") == before


@pytest.mark.parametrize("argv", [
    ["train", "{config}", "--out", "{file}/run"],
    ["sweep", "{sweep}", "--out", "{file}/sweep"],
    ["run", "--out", "{file}/run"],
    ["run", "--out", "{file}"],
    ["testbed", "{file}/tb"],
    ["pretrain", "--out", "{file}/pre", "--steps", "1"],
    ["sample", "-n", "2", "--max-new-tokens", "2", "--model", "{prior}", "--out", "{file}/s.jsonl"],
    ["sample", "-n", "2", "--max-new-tokens", "2", "--model", "{prior}", "--out", "{dir}"],
    ["chat", "--model", "{prior}", "--secret", "cat", "--out", "{file}/chats.jsonl"],
    ["report", "{file}"],
], ids=["train", "sweep", "run", "run-out-is-a-file", "testbed", "pretrain", "sample", "sample-out-is-a-dir", "chat", "report"])
def test_a_path_under_a_file_or_of_the_wrong_kind(ctx, tmp_path, monkeypatch, capsys, argv):
    root, config = ctx
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"base": str(config), "grid": {"algorithms": ["kl-pg"], "betas": [1.0], "seeds": [0]}}))
    names = {"config": config, "file": tmp_path / "afile", "dir": tmp_path / "adir", "sweep": tmp_path / "sweep.yaml", "prior": root / "tb"}
    before = snapshot(tmp_path)
    line = _shown(*tiltlm([a.format(**names) for a in argv], monkeypatch, capsys))
    assert "is a file, not a directory" in line or "is a directory; give the path of a file" in line or "not a directory" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("label", ["../victim", "a/b", "..", ".", "", "x" * 300, "tab\there"])
def test_a_sweep_label_must_be_one_path_component(ctx, tmp_path, monkeypatch, capsys, label):
    """A label naming a path used to write cells outside --out (and delete a directory there)."""
    _, config = ctx
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep").write_text("mine")
    sweep = {"base": str(config), "grid": {"algorithms": [{"name": "kl-pg", "label": label}], "betas": [1.0], "seeds": [0]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    before = snapshot(tmp_path)
    line = _shown(*tiltlm(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out")], monkeypatch, capsys))
    assert "sweep label" in line and "cannot name a directory" in line
    assert snapshot(tmp_path) == before


def test_labels_made_from_options_never_nest_directories():
    """A derived label (name + options) replaces separators, so an option value holding a path stays one component."""
    from tiltlm.experiments.sweep import SweepConfig, cells

    sweep = SweepConfig(base={"prior": "default", "target": {"reward": "count:a"}},
                        grid={"algorithms": [{"name": "kl-pg", "estimator": "k1"}, {"name": "reinforce", "label": "plain"}],
                              "betas": [1.0], "seeds": [0]})
    names = [name for name, _ in cells(sweep)]
    assert names == ["kl-pg-estimator=k1_beta1_seed0", "plain_beta1_seed0"]
    from tiltlm.io import path_component

    for name in names:
        assert path_component(name, "cell") == name


def test_describe_os_error_names_the_path_and_the_fix():
    import errno

    from tiltlm.io import describe_os_error

    assert describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/d/x")) == \
        "'/d/x': no space left on device; free some space or write to another disk"
    assert describe_os_error(OSError(errno.EISDIR, "Is a directory", "/a", None, "/b")) == "'/a' → '/b': is a directory; give the path of a file"
    assert describe_os_error(OSError(errno.ECONNRESET, "Connection reset by peer")) == \
        "a file operation: connection reset by peer; check the path and the disk"


def test_safetensors_io_failures_become_os_errors(tmp_path):
    """safetensors reports a full disk as SafetensorError('… (os error 28)') (the text seen on a full tmpfs, where
    the tests above make it for real); os_errors turns it into the OSError it is, naming the path."""
    import errno

    from safetensors import SafetensorError

    from tiltlm.io import os_errors

    with pytest.raises(OSError) as caught, os_errors(tmp_path / "x"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "x")
    with pytest.raises(ValueError), os_errors(tmp_path):
        raise ValueError("not an I/O error")


def test_a_file_size_limit_is_one_line_not_a_killed_process(ctx, tmp_path):
    """Past `ulimit -f` the kernel sends SIGXFSZ, which kills a process by default; tiltlm ignores it, so the write
    fails with EFBIG: one line, exit 2, and the new run's directory is removed."""
    import resource

    _, config = ctx
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # noqa: E731 - smaller than a checkpoint file
    done = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(config), "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, env={**os.environ, "TILTLM_THREADS": "1"}, timeout=300, preexec_fn=limit)
    line = _shown(done.returncode, done.stderr)
    assert "file too large" in line and "ulimit -f" in line
    assert not (tmp_path / "run").exists()
