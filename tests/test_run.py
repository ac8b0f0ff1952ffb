"""`tiltlm run --task sentiment` (the reward–KL comparison) end to end with a tiny budget; the default task, the
RLVR study, is tested in tests/test_rlvr.py.

The LM part runs on a small testbed prior here, so the test stays fast.
"""

import json

import pytest
import yaml
from browser import needs_chromium, render_in_chromium

from tiltlm.errors import TiltlmError
from tiltlm.experiments.run import run_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, testbed_dir):
    out = tmp_path_factory.mktemp("run") / "out"
    run_main(out, task="sentiment", prior=str(testbed_dir), reward="count:a", betas=(0.5, 1.0), main_beta=1.0, budget=0.5,
             seeds=(0,), log=lambda m: None)
    return out


def test_every_seed_of_the_run_trains_each_cell_and_runs_each_baseline(tmp_path, monkeypatch):
    """--seeds reach the sentiment study: the sweep grid of both parts, and one inference-baseline cell per seed."""
    from tiltlm.experiments import sentiment

    assert sentiment.lm_sweep("default", "sentiment", [0.1, 1.0], 0.1, 2, [0, 1, 2])["grid"]["seeds"] == [0, 1, 2]
    assert sentiment.testbed_sweep("m", [1.0, 3.0], 1.0, 2, [4, 5])["grid"]["seeds"] == [4, 5]
    seen = []
    monkeypatch.setattr(sentiment, "inference_baselines", lambda root, cfg, beta, n, seed: seen.append(seed))
    monkeypatch.setattr(sentiment, "policy_samples", lambda root, seed: None)
    monkeypatch.setattr("tiltlm.experiments.sweep.run_sweep", lambda *a, **k: seen.append(yaml.safe_load(open(a[0]))["grid"]["seeds"]))
    monkeypatch.setattr("tiltlm.experiments.report.write_report", lambda root: None)
    sentiment.lm_part(tmp_path / "lm", "default", "sentiment", [0.1], 0.1, 0.05, [3, 7], log=lambda m: None)
    assert seen == [[3, 7], 3, 7]


def _cells(part_dir):
    return [json.loads(line) for line in (part_dir / "results.jsonl").read_text().splitlines()]


def test_run_writes_both_parts_and_reports(run_dir):
    assert (run_dir / "report.html").is_file() and (run_dir / "run.json").is_file()
    for part in ("lm", "testbed"):
        assert (run_dir / part / "report" / "report.html").is_file()
        assert {"frontier.png", "divergence.png", "diversity.png"} <= {p.name for p in (run_dir / part / "report").glob("*.png")}
    algorithms = {r["algorithm"] for r in _cells(run_dir / "lm")}
    assert {"reinforce", "kl-pg", "dpg", "best-of-4", "importance-sampling"} <= algorithms  # dpg: GDC++'s baseline on
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_run_records_and_prints_the_phases_of_its_training_runs(run_dir, tmp_path, monkeypatch):
    """run.json's phases are sum_phases over every trained cell's phases.json (each part's over its own), and
    `tiltlm run` prints them on one line before the report's path."""
    from typer.testing import CliRunner

    from tiltlm.cli import app
    from tiltlm.train.timing import PHASES, run_dirs_under, sum_phases

    summary = json.loads((run_dir / "run.json").read_text())
    dirs = run_dirs_under(run_dir)
    trained = {run_dir / part / "cells" / r["cell"] for part in ("lm", "testbed") for r in _cells(run_dir / part)
               if (run_dir / part / "cells" / r["cell"] / "metrics.jsonl").exists()}
    assert trained and trained <= set(dirs)  # every trained cell counted
    assert summary["phases"] == sum_phases(dirs) and summary["phases"]["runs"] == len(dirs)
    for part in summary["parts"]:
        assert part["phases"] == sum_phases(run_dirs_under(run_dir / part["dir"]))
    assert sum(part["phases"]["runs"] for part in summary["parts"]) == len(dirs)
    assert summary["phases"]["steps"] > 0 and summary["phases"]["seconds"]["sample"] > 0
    import tiltlm.experiments.run as run_module

    monkeypatch.setattr(run_module, "run_main", lambda *a, **k: run_dir)  # the CLI's printing of this finished run
    result = CliRunner().invoke(app, ["run", "--task", "sentiment", "--prior", "x", "--out", str(tmp_path / "unused")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    (line,) = [x for x in lines if x.startswith("time per phase")]
    assert f"summed over {len(dirs)} training runs" in line and lines.index(line) == len(lines) - 2
    assert all(f"{k} " in line for k in (*PHASES, "other")) and lines[-1].startswith("report: ")


@needs_chromium
def test_run_reports_open_in_chromium_with_every_figure(run_dir, tmp_path):
    for part in ("lm", "testbed"):
        shot = render_in_chromium(run_dir / part / "report" / "report.html", tmp_path / part, ["frontier.png", "divergence.png", "diversity.png"])
        assert shot.stat().st_size > 50_000  # a full page with three figures, not a blank one


def test_reported_numbers_come_from_the_metrics(run_dir):
    """results.jsonl's final row of each trained cell is the last line of that cell's metrics.jsonl."""
    for part in ("lm", "testbed"):
        for record in _cells(run_dir / part):
            metrics = run_dir / part / "cells" / record["cell"] / "metrics.jsonl"
            if metrics.exists():
                assert record["final"] == json.loads(metrics.read_text().splitlines()[-1])


def test_exact_part_shows_collapse_and_posterior(run_dir):
    """Pure RL's exact entropy ends far below p*'s; kl-pg and dpg end closer to p* than reinforce (exact KL)."""
    exact = json.loads((run_dir / "testbed" / "exact.json").read_text())["1"]
    final = {r["algorithm"]: r["final"] for r in _cells(run_dir / "testbed") if r["beta"] == 1.0}
    assert final["reinforce"]["entropy/exact"] < 0.5 * exact["entropy_target"]
    assert final["kl-pg"]["kl/policy_target_exact"] < final["reinforce"]["kl/policy_target_exact"]
    assert final["dpg"]["kl/target_exact"] < final["reinforce"]["kl/target_exact"]


def test_run_refuses_a_non_empty_output_dir_and_bad_options(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(TiltlmError, match="not empty"):
        run_main(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(TiltlmError, match="budget"):
        run_main(tmp_path / "new", budget=0)
    for options in ({"prior": "smollm2-135m"}, {"reward": "sentiment"}):  # overopt brings its own models and golds
        with pytest.raises(TiltlmError, match="drop --prior and --reward"):
            run_main(tmp_path / "new", task="overopt", **options)
    for seed in (-1, 2**62):  # reward-model training takes seeds >= 0; the study's draws add offsets to a seed
        with pytest.raises(TiltlmError, match="takes seeds from 0 to"):
            run_main(tmp_path / "new", task="overopt", seeds=(0, seed))
    assert not (tmp_path / "new").exists()


def test_failure_mid_run_leaves_nothing_half_written(tmp_path, testbed_dir):
    with pytest.raises(TiltlmError, match="unknown reward"):
        run_main(tmp_path / "out", task="sentiment", prior=str(testbed_dir), reward="nosuchreward", budget=0.1, log=lambda m: None)
    assert not list(tmp_path.iterdir())


def test_report_table_matches_metrics_jsonl(run_dir):
    """Every number of the testbed report's table is the last metrics.jsonl row of the cell it names (one seed)."""
    from test_report import parse

    doc = parse(run_dir / "testbed" / "report" / "report.html")
    body = [cells for cls, cells in doc.rows if cls is None and any("data-key" in attrs for attrs, _ in cells)]
    checked = 0
    for cells in body:
        name, beta = cells[0][1], float(cells[1][1])
        cell = run_dir / "testbed" / "cells" / f"{name}_beta{beta:g}_seed0" / "metrics.jsonl"
        last = json.loads(cell.read_text().splitlines()[-1])
        for attrs, text in cells[3:]:
            if attrs.get("data-key") in last:
                assert float(attrs["data-mean"]) == pytest.approx(last[attrs["data-key"]], rel=1e-12, abs=1e-15)
                checked += 1
    assert len(body) == 4 and checked >= 16  # reinforce, dpg, kl-pg at two betas
