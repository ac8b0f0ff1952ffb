"""benchmarks/time_to_target.py stays runnable: its clock leaves the evaluations out, a run stops at the target
(tiltlm's loop and TRL's callback alike), and --quick returns the documented keys. No timing is asserted."""

import importlib
import math
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def ttt():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("time_to_target")
    finally:
        sys.path.remove(str(BENCH))


def _consistent(run: dict, target_kl: float, eval_every: int, max_steps: int) -> None:
    trace = run["trace"]
    assert trace and all(math.isfinite(kl) and kl >= 0 for _, kl in trace)
    assert [s for s, _ in trace] == [s for s in range(1, run["steps_run"] + 1) if s % eval_every == 0 or s == max_steps]
    assert math.isfinite(run["kl_start"]) and run["seconds_run"] > 0 and run["seconds_per_step"] > 0
    hits = [s for s, kl in trace if kl <= target_kl]
    if run["reached"]:
        assert run["step_to_target"] == hits[0] == run["steps_run"]  # the run stopped where it first met the target
        assert run["samples_to_target"] == 64 * hits[0] and run["seconds_to_target"] == run["seconds_run"]
    else:
        assert not hits and run["steps_run"] == max_steps and run["seconds_to_target"] is None


def test_watch_pauses_the_clock_around_evaluations(ttt):
    kls = iter([0.5, 0.3, 0.2, 0.05, 0.01])

    def evaluate():
        time.sleep(0.05)  # an evaluation: never on the clock
        return {"kl_policy_target": next(kls)}

    watch = ttt.Watch(target_kl=0.1, eval_every=1, max_steps=10)
    watch.start(evaluate)
    stops = [watch.step_end(step, evaluate) for step in (1, 2, 3)]
    assert stops == [False, False, True]
    result = watch.result(per_step=64)
    assert result["reached"] and result["step_to_target"] == 3 and result["samples_to_target"] == 192
    assert result["kl_start"] == 0.5 and [kl for _, kl in result["trace"]] == [0.3, 0.2, 0.05]
    assert result["seconds_to_target"] < 0.05 <= result["eval_seconds"] / 3


def test_quick_tiltlm(ttt, tmp_path):
    """Library defaults plus an overridden spec, evaluated every 2 steps: traces, budget, table rows, --json."""
    out = tmp_path / "ttt.json"
    payload = ttt.main(["--quick", "--no-trl", "--methods", "kl-pg", "dpg@lr=1e-3", "--eval-every", "2", "--json", str(out)])
    assert payload["benchmark"] == "time_to_target" and out.is_file()
    assert payload["target_kl"] == 0.007 and payload["trl_lr"] is None and payload["seeds"] == [0]
    assert payload["testbed"]["n_sequences"] == 341
    max_steps = payload["max_samples"] // payload["per_step"]
    for run in payload["runs"]:
        assert run["tool"] == "tiltlm"
        _consistent(run, payload["target_kl"], 2, max_steps)
    assert payload["runs"][1]["optim"]["lr"] == 1e-3  # the spec's override reached the config
    rows = payload["rows"]
    assert [r["method"] for r in rows] == ["kl-pg", "dpg@lr=1e-3"]
    for r in rows:
        assert math.isfinite(r["seconds_per_step"]) and "ratio_seconds_vs_trl" not in r


def test_reaching_the_target_stops_both_tools(ttt):
    """A threshold every policy meets: each run, TRL's included, stops after its first step; the ratios are there."""
    pytest.importorskip("trl")
    payload = ttt.main(["--quick", "--methods", "kl-pg", "--target-kl", "10", "--warmup-steps", "1"])
    runs = {r["tool"]: r for r in payload["runs"]}
    assert set(runs) == {"tiltlm", "trl"}
    for run in runs.values():
        _consistent(run, 10.0, 1, 4)
        assert run["reached"] and run["step_to_target"] == 1 and run["steps_run"] == 1
    tiltlm_row, trl_row = payload["rows"]
    assert trl_row["method"] == "trl-rloo@lr=0.001" and trl_row["reached"] == "1/1"
    for key in ("ratio_seconds_vs_trl", "ratio_samples_vs_trl", "ratio_step_time_vs_trl"):
        assert math.isfinite(tiltlm_row[key]) and tiltlm_row[key] > 0
    assert tiltlm_row["ratio_samples_vs_trl"] == 1.0
