"""`tiltlm sweep`: the grid, matched budgets, summary over seeds, and restart without redoing finished cells."""

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from tiltlm.errors import TiltlmError
from tiltlm.experiments.sweep import cells, load_sweep, run_sweep


def write_sweep(tmp_path, testbed_dir, **grid):
    data = {
        "base": {"prior": str(testbed_dir), "target": {"reward": "count:a"},
                 "sampling": {"n_per_context": 8, "max_new_tokens": 3}, "optim": {"steps": 3, "lr": 0.003},
                 "metrics": {"exact_every": 3, "diversity": False}, "checkpoint": {"every": 1}},
        "grid": {"algorithms": ["kl-pg", {"name": "dpg", "label": "dpg"}], "betas": [1.0], "seeds": [0, 1], **grid},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sweep_restart_skips_finished_cells(tmp_path, testbed_dir):
    path = write_sweep(tmp_path, testbed_dir)
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop_after_two(name, seen=[]):  # noqa: B006 - a counter for this test
        seen.append(name)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(path, out, on_cell=stop_after_two)
    finished = sorted(p.parent.name for p in out.glob("cells/*/done.json"))
    assert len(finished) == 2
    before = {n: (out / "cells" / n / "metrics.jsonl").read_text() for n in finished}
    ran = []
    run_sweep(path, out, on_cell=ran.append)
    assert sorted(ran) == sorted(set(n for n, _ in cells(load_sweep(path))) - set(finished))  # only the unfinished ones
    for n, text in before.items():
        assert (out / "cells" / n / "metrics.jsonl").read_text() == text
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["algorithm"] for r in rows} == {"kl-pg", "dpg"}
    assert all(r["final"]["samples/seen"] == 3 * 8 for r in rows)  # matched sample budget
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2
    for row in summary:
        finals = [r["final"]["reward/mean"] for r in rows if r["algorithm"] == row["algorithm"]]
        assert float(row["reward/mean mean"]) == pytest.approx(sum(finals) / 2)
        assert int(row["seeds"]) == 2


def test_sweep_resumes_a_started_cell_from_its_checkpoint(tmp_path, testbed_dir):
    path = write_sweep(tmp_path, testbed_dir, algorithms=["kl-pg"], seeds=[0])
    out = tmp_path / "out"
    reference = tmp_path / "reference"
    run_sweep(path, reference)
    from tiltlm.train.build import build
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    name, cell = cells(load_sweep(path))[0]
    config = parse_config(cell["config"])
    policy, target = build(config)
    out.mkdir()
    (out / "sweep.yaml").write_text((reference / "sweep.yaml").read_text())  # a sweep writes it before its first cell
    partial = Trainer(config, policy=policy, target=target, out_dir=out / "cells" / name)
    partial.train_step()  # "killed" after one step
    run_sweep(path, out)
    assert (out / "cells" / name / "metrics.jsonl").read_text() == (reference / "cells" / name / "metrics.jsonl").read_text()


def test_sweep_config_errors(tmp_path, testbed_dir):
    with pytest.raises(TiltlmError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {}, "grid": {"algorithms": ["kl-pgg"], "betas": [1.0]}}))
    with pytest.raises(TiltlmError, match="unknown algorithm 'kl-pgg'"):
        cells(load_sweep(bad))
    bad.write_text(yaml.safe_dump({"base": {}, "grid": {"algorithms": ["kl-pg"]}}))
    with pytest.raises(TiltlmError, match="grid.betas"):
        load_sweep(bad)


EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "sweep_example.yaml"


def test_the_example_sweep_config_loads_and_runs(tmp_path):
    sweep = load_sweep(EXAMPLE)
    grid = cells(sweep)  # every cell validated as a training config
    assert len(grid) == 3 * 2 and {c["label"] for _, c in grid} == {"reinforce", "kl-pg", "dpg"}
    # the same file, cut to one step of two cells, runs end to end on the embedded default LM
    data = yaml.safe_load(EXAMPLE.read_text())
    data["base"]["optim"]["steps"] = 1
    data["base"]["sampling"] |= {"n_per_context": 2, "max_new_tokens": 4}
    data["grid"] |= {"algorithms": data["grid"]["algorithms"][1:], "betas": [1.0]}
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(data))
    out = run_sweep(small, tmp_path / "out")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == ["kl-pg_beta1_seed0", "dpg_beta1_seed0"]


def test_sweep_base_can_be_a_training_config_file(tmp_path, testbed_dir):
    (tmp_path / "configs").mkdir()
    train = {"prior": str(testbed_dir), "algorithm": {"name": "reinforce"}, "target": {"reward": "count:a", "beta": 5.0},
             "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 2}, "seed": 9}
    (tmp_path / "configs" / "train.yaml").write_text(yaml.safe_dump(train))
    path = tmp_path / "configs" / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "train.yaml", "grid": {"algorithms": ["kl-pg"], "betas": [0.5], "seeds": [1]}}))
    (name, cell), = cells(load_sweep(path))  # relative to the sweep file, not to the working directory
    config = cell["config"]
    assert name == "kl-pg_beta0.5_seed1" and config["algorithm"] == {"name": "kl-pg"}
    assert config["target"] == {"reward": "count:a", "beta": 0.5} and config["seed"] == 1 and config["optim"] == {"steps": 2}
    for base, needle in (("nope.yaml", "base 'nope.yaml' is not a file"), ("bad.yaml", "is not valid YAML"),
                         ("list.yaml", "must be a training config (a YAML mapping), not list"),
                         ("typo.yaml", "is not a valid training config")):
        (tmp_path / "configs" / "bad.yaml").write_text("prior: [unclosed\n")
        (tmp_path / "configs" / "list.yaml").write_text("- 1\n")
        (tmp_path / "configs" / "typo.yaml").write_text(yaml.safe_dump({**train, "optimm": {}}))
        path.write_text(yaml.safe_dump({"base": base, "grid": {"algorithms": ["kl-pg"], "betas": [0.5]}}))
        with pytest.raises(TiltlmError, match=re.escape(needle)) as e:
            load_sweep(path)
        assert "\n" not in str(e.value)
