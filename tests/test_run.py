"""`tiltlm run` (the README's main job) end to end with a tiny budget on the embedded default prior."""

import json

import pytest

from tiltlm.errors import TiltlmError
from tiltlm.experiments.posterior import run_posterior_experiment


def test_run_writes_results_from_the_run(tmp_path):
    out = tmp_path / "run"
    results = run_posterior_experiment(out, n=16, max_new_tokens=12, seed=0)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["lm"]["log_z"] == results["lm"]["log_z"]
    assert json.loads((out / "config.json").read_text())["n"] == 16
    assert len((out / "samples.jsonl").read_text().splitlines()) == 16
    exact = on_disk["testbed"]["exact"]
    assert exact["prior_mass"] == pytest.approx(1.0, abs=1e-5)
    # the largest IS estimate of log Z on the testbed agrees with the exact value within its interval (+ slack)
    big = on_disk["testbed"]["estimates"][-1]["log_z"]
    assert big["low"] - 0.05 < exact["log_z"] < big["high"] + 0.05
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_run_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(TiltlmError, match="not empty"):
        run_posterior_experiment(tmp_path, n=4, max_new_tokens=4)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_run_failure_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TiltlmError, match="unknown reward"):
        run_posterior_experiment(out, reward="nosuchreward", n=4, max_new_tokens=4)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_reward_failing_mid_run_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TiltlmError, match="nan"):
        run_posterior_experiment(out, reward=lambda texts: [float("nan")] * len(texts), n=4, max_new_tokens=4)
    assert not list(tmp_path.iterdir())
