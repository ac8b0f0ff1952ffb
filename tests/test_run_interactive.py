"""`tiltlm run --interactive`'s part 3 at a tiny budget: every piece written, and the numbers are the cells'."""

import json
from pathlib import Path

import pytest
import yaml

from tiltlm.experiments.interactive import interactive_part
from tiltlm.train.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run") / "interactive"
    interactive_part(root, "default", budget=0.02, seed=0, log=lambda _: None)
    return root


def test_tabular_parts_have_exact_optima_and_metrics(part):
    for name, deterministic in (("tabular_stochastic", False), ("tabular_deterministic", True)):
        d = part / name
        exact = json.loads((d / "exact_env.json").read_text())["1"]
        assert exact["deterministic"] is deterministic
        if deterministic:
            assert exact["kl_variational_optimistic"] < 1e-12
        else:
            assert exact["kl_variational_optimistic"] > 0.03 and exact["kl_optimistic_variational"] > 0.03
        rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
        assert {r["algorithm"] for r in rows} == {"dpg", "kl-pg", "reinforce"}
        for r in rows:
            last = json.loads((d / "cells" / r["cell"] / "metrics.jsonl").read_text().splitlines()[-1])
            assert r["final"]["kl/optimistic_exact"] == last["kl/optimistic_exact"]
        html = (d / "report" / "report.html").read_text()
        assert "KL(q_opt‖π)" in html and "KL(π‖q_var)" in html


def test_dialogue_part_evaluates_prior_and_policies_on_the_same_episodes(part):
    d = part / "dialogue"
    rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    evals = {r["algorithm"]: r["final"] for r in rows if r["algorithm"].endswith("eval")}
    assert set(evals) == {"prior eval", "kl-pg eval", "dpg eval", "reinforce eval"}
    prior = evals["prior eval"]
    assert prior["kl/prior_seq"] == pytest.approx(0.0, abs=1e-5) and prior["eval/episodes"] == 4 * 32
    for final in evals.values():
        assert 0 <= final["env/success_rate"] <= 1
        assert final["kl/prior_turn_1"] + final.get("kl/prior_turn_2", 0.0) == pytest.approx(final["kl/prior_seq"], abs=1e-4)
    html = (d / "report" / "report.html").read_text()
    assert "success" in html and "KL turn 1" in html and "distinct 1st actions" in html
    samples = json.loads((d / "samples.json").read_text())
    assert any("[env]" in t and "[policy]" in t for t in samples["prior (eval)"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    if "grid" in yaml.safe_load(path.read_text()):  # a sweep config (configs/sweep_example.yaml): every cell validated
        from tiltlm.experiments.sweep import cells, load_sweep

        assert cells(load_sweep(path))
        return
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())["algorithm"]
    assert config.algorithm.name == (raw if isinstance(raw, str) else raw["name"])
