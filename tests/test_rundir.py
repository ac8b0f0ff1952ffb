"""A run owns its directory (tiltlm.train.rundir): two writers never corrupt or delete each other's files.

Real processes: a `tiltlm train` whose reward waits while a "hold" file exists holds --out while a second
process tries to start a new run there, and while a second `--resume` tries to continue it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiltlm.errors import TiltlmError
from tiltlm.train.rundir import LOCK, RunDir

SLOW_REWARD = '''
import os, time

HOLD = {hold!r}

def slow(texts, **kwargs):
    if os.path.exists(HOLD):
        open(HOLD + ".in", "w").close()  # this process is inside its reward now (after its run directory's first files)
    while os.path.exists(HOLD):  # the test keeps the run going until it has tried the second writer
        time.sleep(0.02)
    return [float(t.count("a")) for t in texts]
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("owned")
    model = make_testbed(root / "tb", vocab_size=4, n_layer=1, n_embd=16, n_head=2, seed=0, train_steps=0)
    (root / "slow.py").write_text(SLOW_REWARD.format(hold=str(root / "hold")))
    config = {"prior": str(model), "target": {"reward": f"{root / 'slow.py'}:slow", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
              "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 12, "lr": 0.01, "schedule": "constant"},  # --steps may extend it
              "checkpoint": {"every": 5}, "seed": 1}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    return root


def _train(root: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "tiltlm.cli", "train", str(root / "cfg.yaml"), "--out", str(out), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the first run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _holding(root: Path, out: Path, proc: subprocess.Popen) -> None:
    """Wait until ``proc`` owns ``out`` (its PID in the lock file); it then waits in its reward until released."""
    _wait_for(lambda: (out / LOCK).is_file() and (out / LOCK).read_text() == str(proc.pid), proc)


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _refused(proc: subprocess.Popen, holder: int) -> None:
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr
    assert f"in use by another tiltlm process (PID {holder})" in lines[0] and "choose another --out" in lines[0]


def test_a_second_writer_is_refused_and_deletes_nothing(setup, tmp_path):
    out, hold = tmp_path / "run", setup / "hold"
    hold.touch()
    first = _train(setup, out)
    _holding(setup, out, first)
    _refused(_train(setup, out), first.pid)  # a new run into a directory being written
    _refused(_train(setup, out, "--resume"), first.pid)  # a resume of a run still going
    hold.unlink()
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert _steps(out) == list(range(1, 13))  # the first run's record is whole
    assert (out / "policy" / "config.json").is_file() and (out / "checkpoint" / "state.json").is_file()

    # two resumes at once: one continues, the other is refused, and no step is written twice
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    hold.touch()
    resumed = _train(setup, out, "--resume", "--steps", "16")
    _holding(setup, out, resumed)
    _refused(_train(setup, out, "--resume", "--steps", "20"), resumed.pid)
    hold.unlink()
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert _steps(out) == list(range(1, 17))
    cfg["optim"]["steps"] = 16  # extended with a constant lr: config.yaml describes the 16-step run
    assert yaml.safe_load((out / "config.yaml").read_text()) == cfg


def test_a_killed_holder_releases_the_directory(setup, tmp_path):
    out, hold = tmp_path / "run", setup / "hold"
    inside = hold.with_name("hold.in")
    inside.unlink(missing_ok=True)
    hold.touch()
    first = _train(setup, out)
    _holding(setup, out, first)
    # killed in step 1's reward: after config.yaml (killed between taking the lock and writing it, the directory holds
    # no run to resume — a race this test lost on a busy machine), before the first checkpoint
    _wait_for(inside.exists, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    hold.unlink()
    assert (out / LOCK).read_text() == str(first.pid)  # the file stays; the lock died with the process
    resumed = _train(setup, out, "--resume", "--steps", "6")  # killed before its first checkpoint: from step 0
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert _steps(out) == list(range(1, 7))


def test_abandon_removes_only_what_the_new_run_created(tmp_path):
    from tiltlm.train.config import parse_config

    config = parse_config({"algorithm": "kl-pg"})
    empty = tmp_path / "empty"
    empty.mkdir()
    run = RunDir(empty)
    run.open(config, resume=False)
    assert (empty / "config.yaml").is_file()
    run.abandon()
    assert empty.is_dir() and not list(empty.iterdir())  # as it was found: there and empty

    new = tmp_path / "new"
    run = RunDir(new)
    run.open(config, resume=False)
    run.abandon()
    assert not new.exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(TiltlmError, match="is not empty"):
        RunDir(busy).open(config, resume=False)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]  # refused before creating anything


def test_a_killed_writers_temporary_files_are_cleared_when_the_directory_is_owned_again(tmp_path):
    """A SIGKILL inside an atomic write leaves ``.<name>.<pid>.tmp`` (phases.json is written every step); the next
    owner removes it, and a ``.<name>.<pid>.old`` only where ``<name>`` is in place (else it may be the only copy)."""
    from tiltlm.train.rundir import RunDir

    run = tmp_path / "run"
    run.mkdir()
    (run / ".phases.json.999999.tmp").write_text("{")
    (run / "policy").mkdir()
    (run / ".policy.999999.old").mkdir()
    (run / ".other.999999.old").mkdir()  # other/ is missing: kept
    (run / "notes.txt").write_text("mine")
    d = RunDir(run)
    d._acquire()
    try:
        assert sorted(p.name for p in run.iterdir()) == [".other.999999.old", ".tiltlm.lock", "notes.txt", "policy"]
    finally:
        d.close()
