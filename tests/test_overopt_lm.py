"""The overoptimization study's LM part (tiltlm.experiments.overopt_lm): its estimators against brute force and
closed forms, and a small run end to end (in this process, with small pools and few steps)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from tiltlm.experiments import overopt_lm


def test_best_of_n_is_the_mean_over_all_subsets():
    """The U-statistic equals the average, over every n-subset of the pool, of the gold of the subset's proxy argmax."""
    gen = torch.Generator().manual_seed(0)
    proxy = torch.randn(9, generator=gen, dtype=torch.float64)
    gold = torch.randn(9, generator=gen, dtype=torch.float64)
    points = {p["n"]: p for p in overopt_lm.best_of_n_points(gold, proxy, ns=(1, 2, 3, 5, 9, 16))}
    assert set(points) == {1, 2, 3, 5, 9}  # n larger than the pool is left out
    for n, p in points.items():
        subsets = list(itertools.combinations(range(9), n))
        best = [max(c, key=lambda i: float(proxy[i])) for c in subsets]
        assert p["gold"] == pytest.approx(sum(float(gold[i]) for i in best) / len(subsets), abs=1e-12)
        assert p["proxy"] == pytest.approx(sum(float(proxy[i]) for i in best) / len(subsets), abs=1e-12)
        assert p["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert points[1]["gold"] == pytest.approx(float(gold.mean()))


def test_posterior_by_importance_weights():
    proxy = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    gold = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    p = overopt_lm.posterior_point(gold, proxy, 0.5)
    w = torch.exp(proxy / 0.5) / torch.exp(proxy / 0.5).sum()
    assert p["gold"] == pytest.approx(float((w * gold).sum()))
    # the pool as the distribution pi0 (uniform over 3): KL(w‖uniform) = Σ w log(3w)
    assert p["kl"] == pytest.approx(float((w * torch.log(3 * w)).sum()))
    assert p["ess"] == pytest.approx(1 / float((w * w).sum()))
    assert overopt_lm.posterior_point(gold, proxy, math.inf) == {"kl": 0.0, "gold": pytest.approx(1 / 6), "proxy": 1.0,
                                                                  "ess": 3.0, "log_z": 0.0}


def test_windows_average_blocks_ending_at_the_last_step():
    rows = [{"step": s, "kl/prior_seq": float(s), "gold/mean": 2.0 * s, "reward/mean": -s} for s in range(1, 11)]
    points = overopt_lm.windows(rows, width=4)
    assert [p["step"] for p in points] == [2, 6, 10]
    assert points[-1]["kl"] == pytest.approx((7 + 8 + 9 + 10) / 4) and points[0]["gold"] == pytest.approx(3.0)
    assert points[0]["samples"] == 2 * overopt_lm.N_PER_STEP and points[-1]["samples"] == 4 * overopt_lm.N_PER_STEP  # a short first block


def test_a_small_lm_study_end_to_end(tmp_path, monkeypatch):
    for name, value in {"POOL": 48, "FINAL_SAMPLES": 16, "RM_STEPS": 4, "RM_EPOCHS": 1, "STEPS": 8, "N_PER_STEP": 4,
                        "MAX_NEW_TOKENS": 12, "BON_NS": (1, 2, 4), "TILT_BETAS": (math.inf, 1.0)}.items():
        monkeypatch.setattr(overopt_lm, name, value)
    root = overopt_lm.run_lm(tmp_path / "overopt_lm", seeds=(0, 1), n_labels=(8, 16), betas=(1.0,), workers=1, log=lambda _: None)
    points = [json.loads(line) for line in (root / "curves.jsonl").read_text().splitlines()]
    assert {p["method"] for p in points} == {"reinforce", "kl-pg", "dpg", "dpo", "best-of-n", "proxy-posterior"}
    for p in points:
        assert {"method", "n_labels", "beta", "seed", "kl", "gold", "proxy"} <= set(p) and -1 <= p["gold"] <= 1
    dpo = [p for p in points if p["method"] == "dpo" and p["seed"] == 0 and p["n_labels"] == 16]
    assert [p["step"] for p in dpo] == [0, 8] and dpo[1]["samples"] == 16
    verdict = json.loads((root / "verdict.json").read_text())
    assert not verdict["exact"] and "kl-pg β=1 N=16" in verdict["methods"]
    assert "frontier_fraction" not in verdict["methods"]["kl-pg β=1 N=16"]
    assert any("estimates from its samples" in s for s in verdict["sentences"])
    pairs = (root / "seed0" / "N16" / "train_pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 16 and (root / "seed0" / "N8" / "labels.jsonl").read_text().splitlines() == \
        (root / "seed0" / "labels.jsonl").read_text().splitlines()[:10]  # the smaller N: the first rows of the larger draw
    assert (root / "report" / "gold_vs_kl.png").stat().st_size > 0


def test_tiltlm_run_task_overopt_writes_both_parts(tmp_path, monkeypatch):
    """`tiltlm run --task overopt`: both parts (shrunk here: fewer labels, pools and steps, in this process), each with
    its verdict.json, the sentences printed, and the top-level page with both figures."""
    import functools

    from typer.testing import CliRunner

    from tiltlm.cli import app
    from tiltlm.experiments import overopt

    for name, value in {"POOL": 48, "FINAL_SAMPLES": 16, "RM_STEPS": 4, "RM_EPOCHS": 1, "N_PER_STEP": 4,
                        "MAX_NEW_TOKENS": 12, "BON_NS": (1, 2, 4), "TILT_BETAS": (math.inf, 1.0)}.items():
        monkeypatch.setattr(overopt_lm, name, value)
    monkeypatch.setattr(overopt, "run_exact", functools.partial(overopt.run_exact, n_labels=(32,)))
    monkeypatch.setattr(overopt_lm, "run_lm", functools.partial(overopt_lm.run_lm, n_labels=(8,), betas=(1.0,)))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--task", "overopt", "--budget", "0.05", "--seeds", "0,1", "--workers", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for part in ("overopt_exact", "overopt_lm"):
        verdict = json.loads((out / part / "verdict.json").read_text())
        assert verdict["sentences"][0] in result.output
        assert (out / part / "report" / "gold_vs_kl.png").is_file()
    page = (out / "report.html").read_text()
    assert "overopt_exact/report/gold_vs_kl.png" in page and "overopt_lm/report/gold_vs_kl.png" in page
    assert json.loads((out / "overopt_exact" / "study.json").read_text())["testbed"] == "overopt_exact/model"
