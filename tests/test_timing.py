"""Seconds per phase of a training run (tiltlm.train.timing): phases.json, sum_phases, `tiltlm train --timings`."""

import json
import subprocess
import sys
import time

import pytest
import yaml

from tiltlm.errors import TiltlmError
from tiltlm.train.timing import PHASES, PhaseTimer, format_phases, sum_phases


def test_phase_timer_adds_each_phase_and_the_rest():
    timer = PhaseTimer()
    timer.start_step()
    with timer.phase("sample"):
        time.sleep(0.05)
    with timer.phase("io"):
        time.sleep(0.02)
    time.sleep(0.03)  # in no phase: "other"
    row = timer.step_row()
    assert row["time/sample"] >= 0.05 and row["time/io"] >= 0.02 and row["time/other"] >= 0.03
    assert row["time/step"] == pytest.approx(sum(row[f"time/{k}"] for k in (*PHASES, "other")))
    assert timer.totals["sample"] == row["time/sample"] and timer.steps == 1
    assert timer.step_row()["time/sample"] == 0.0  # cleared for the next step
    with pytest.raises(TiltlmError, match="unknown timing phase 'sampling'; available: sample"):
        with timer.phase("sampling"):
            pass


def test_sum_phases_adds_runs(tmp_path):
    for name, seconds in (("a", 1.0), ("b", 3.0)):
        (tmp_path / name).mkdir()
        data = {"steps": 2, "seconds": {"sample": seconds, "score": 0.0, "backward": 1.0, "eval": 0.0, "io": 0.0, "other": 0.0,
                                        "total": seconds + 1.0}}
        (tmp_path / name / "phases.json").write_text(json.dumps(data))
    out = sum_phases([tmp_path / "a", tmp_path / "b"])
    assert out["runs"] == 2 and out["steps"] == 4
    assert out["seconds"]["sample"] == 4.0 and out["seconds"]["total"] == 6.0
    assert out["share"]["sample"] == pytest.approx(4 / 6) and out["share"]["backward"] == pytest.approx(2 / 6)
    assert "  sample        4.00 s   66.7%" in format_phases(out).splitlines()
    with pytest.raises(TiltlmError, match="has no phases.json"):
        sum_phases([tmp_path])


def test_train_records_phases_and_prints_them(tmp_path, testbed_dir):
    cfg = {"prior": str(testbed_dir), "target": {"reward": "count:a", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
           "sampling": {"n_per_context": 8, "max_new_tokens": 4}, "optim": {"steps": 3, "lr": 0.003, "schedule": "constant"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(path), "--out", str(out), "--timings"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "phases.json").read_text())
    assert data["steps"] == 3 and [row["step"] for row in data["per_step"]] == [1, 2, 3]
    s = data["seconds"]
    assert s["sample"] > 0 and s["backward"] > 0 and s["io"] > 0  # the last step's checkpoint and the policy
    assert s["total"] == pytest.approx(sum(s[k] for k in (*PHASES, "other")), rel=1e-9)
    assert all("time/sample" not in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert "time per phase (3 steps" in r.stdout and "backward" in r.stdout
    # a resume from the checkpoint keeps the earlier steps' seconds
    r = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(path), "--out", str(out), "--resume", "--steps", "4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "phases.json").read_text())
    assert [row["step"] for row in again["per_step"]] == [1, 2, 3, 4] and again["per_step"][:3] == data["per_step"]
