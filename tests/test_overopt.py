"""The overoptimization study (tiltlm.experiments.overopt, overopt_verdict; docs/math.md §16): the gold-optimal frontier
against brute force and as a bound on every policy of a small run, the proxy posterior against an independent
computation, Gao et al.'s fits on known coefficients, and the verdict's calls on synthetic curves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact import expectation, kl
from tiltlm.exact.quantities import normalise
from tiltlm.experiments import overopt
from tiltlm.experiments.overopt_verdict import (GOLD_MARGIN, LESS, MORE, SAME, UNDETERMINED, check_points, early_stopped,
                                                fit_form, frontier_at, sentences, verdict_of)


# ---- the frontier ----------------------------------------------------------------------------------------------------


def _random_problem(seed: int, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    logp0 = torch.log_softmax(torch.randn(n, generator=gen, dtype=torch.float64) * 1.5, 0)
    gold = torch.randint(-3, 4, (n,), generator=gen).double()
    return logp0, gold


def test_frontier_on_two_points_is_the_closed_form():
    # pi0 = (1/2, 1/2), g = (0, 1): q = (1 − t, t) has KL = log 2 + t log t + (1 − t) log(1 − t) and E[g] = t
    logp0 = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    gold = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for t in (0.6, 0.75, 0.9, 0.99):
        k = math.log(2) + t * math.log(t) + (1 - t) * math.log(1 - t)
        assert frontier_at(logp0, gold, k) == pytest.approx(t, abs=1e-9)
    assert frontier_at(logp0, gold, 0.0) == pytest.approx(0.5)
    assert frontier_at(logp0, gold, math.log(2)) == 1.0  # KL of pi0 restricted to the argmax: max g from there on
    assert frontier_at(logp0, gold, 5.0) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_no_distribution_passes_the_frontier(seed):
    """Random distributions q (and random tilts of pi0) never have more gold than F(KL(q‖pi0)); the tilt by the
    gold itself attains it."""
    logp0, gold = _random_problem(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(200):
        log_q = torch.log_softmax(logp0 + torch.randn(len(gold), generator=gen, dtype=torch.float64) * 2.0, 0)
        k = kl(log_q, logp0)
        assert expectation(log_q, gold) <= frontier_at(logp0, gold, k) + 1e-9
    for lam in (0.1, 0.7, 2.0):
        log_q = normalise(logp0 + lam * gold)[0]
        assert frontier_at(logp0, gold, kl(log_q, logp0)) == pytest.approx(expectation(log_q, gold), abs=1e-8)


def test_frontier_is_increasing_and_bounded():
    logp0, gold = _random_problem(7)
    values = [frontier_at(logp0, gold, k) for k in np.linspace(0, 4, 30)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(expectation(logp0, gold)) and values[-1] <= float(gold.max()) + 1e-12


# ---- Gao et al.'s forms ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fit_recovers_known_coefficients(form):
    d = np.linspace(0.1, 3.0, 25)
    second = d * d if form == "bon" else d * np.log(d)
    gain = d * 0.9 - 0.35 * second
    fit = fit_form(d, gain, form)
    assert fit["alpha"] == pytest.approx(0.9, abs=1e-9) and fit["beta"] == pytest.approx(0.35, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = fit_form(d, gain + np.random.default_rng(0).normal(0, 0.01, len(d)), form)
    assert abs(noisy["alpha"] - 0.9) < 0.05 and 0.9 < noisy["r2"] < 1.0


def test_fit_needs_two_points():
    with pytest.raises(TiltlmError, match="at least two points"):
        fit_form(np.array([0.0, 1.0]), np.array([0.0, 0.5]), "rl")


def test_early_stopping_interpolates_and_says_never():
    traj = [{"kl": 0.0, "gold": 0.0}, {"kl": 1.0, "gold": 1.0}, {"kl": 3.0, "gold": -1.0}]
    assert early_stopped(traj, 0.5) == pytest.approx(0.5)
    assert early_stopped(traj, 2.0) == pytest.approx(0.0)
    assert early_stopped(traj, 3.5) is None


# ---- the verdict on synthetic curves ---------------------------------------------------------------------------------


def _synthetic(deltas: list[float], *, posterior_gap: float = 0.0):
    """Curves and finals where kl-pg's endpoint has gold = reinforce-at-its-KL + delta_s in seed s: reinforce's gold
    is the KL itself along a straight trajectory, kl-pg ends at KL 1."""
    seeds = list(range(len(deltas)))
    points, finals = [], {}
    for s, delta in zip(seeds, deltas):
        for step, k in enumerate((0.0, 0.5, 1.0, 2.0)):
            points.append({"method": "reinforce", "n_labels": 32, "beta": None, "seed": s, "step": step, "kl": k, "gold": k, "proxy": k})
            points.append({"method": "kl-pg", "n_labels": 32, "beta": 1.0, "seed": s, "step": step, "kl": k / 2,
                           "gold": k / 2 + delta * (k / 2), "proxy": k})
        post = {"kl": 1.0, "gold": 1.0 + delta + posterior_gap}
        finals[("kl-pg", 1.0, 32, s)] = {"kl": 1.0, "gold": 1.0 + delta, "kl_to_posterior": 0.1, "kl_to_gold_posterior": 0.2,
                                        "posterior": post, "gold_posterior": post}
        finals[("reinforce", None, 32, s)] = {"kl": 2.0, "gold": 2.0, "kl_to_posterior": 1.0, "kl_to_gold_posterior": 1.0,
                                             "posterior": post, "gold_posterior": post}
    study = {"seeds": seeds, "gold_prior": 0.0, "n_labels": [32], "main_beta": 1.0}
    return verdict_of(points, study, finals, lambda k: 2.0 * k + 0.1)


@pytest.mark.parametrize("deltas, expected", [
    ([0.30, 0.25, 0.35, 0.28], MORE),
    ([-0.30, -0.25, -0.35, -0.28], LESS),
    ([0.004, -0.003, 0.002, 0.0], SAME),
    ([0.6, -0.5, 0.4, -0.6], UNDETERMINED),
])
def test_the_early_stopping_call_follows_the_numbers(deltas, expected):
    v = _synthetic(deltas)
    es = v["methods"]["kl-pg β=1 N=32"]["vs_reinforce_early_stopped"]
    assert es["call"] == expected
    assert es["diff"] == pytest.approx(np.mean(deltas))
    assert es["lo"] <= es["diff"] <= es["hi"]
    text = " ".join(sentences(v))
    assert {MORE: "more than early stopping", LESS: "worse than early stopping", SAME: "the same as early stopping",
            UNDETERMINED: "cannot be told"}[expected] in text


def test_the_posterior_call_and_one_seed():
    v = _synthetic([0.0, 0.0, 0.0], posterior_gap=0.2)  # the posterior has 0.2 more gold than the endpoint
    assert v["methods"]["kl-pg β=1 N=32"]["vs_posterior"]["call"] == LESS
    assert v["methods"]["kl-pg β=1 N=32"]["vs_posterior"]["diff"] == pytest.approx(-0.2)
    one = _synthetic([0.3])  # one seed: exact numbers, no call
    assert one["methods"]["kl-pg β=1 N=32"]["vs_reinforce_early_stopped"]["call"] == UNDETERMINED
    assert one["methods"]["kl-pg β=1 N=32"]["vs_posterior"]["call"] == UNDETERMINED
    assert any(s.startswith("One seed: every number is exact") for s in sentences(one))
    assert any(s.startswith("One seed: every number is an estimate") for s in sentences({**one, "exact": False}))
    assert 0 < GOLD_MARGIN < 0.1


def test_frontier_fraction_of_a_synthetic_posterior():
    v = _synthetic([0.0, 0.0, 0.0])
    # the posterior: KL 1, gold 1; the frontier at KL 1 is 2.1, pi0's gold 0: 1/2.1 of the frontier's gain
    assert v["posteriors"]["β=1 N=32"]["frontier_fraction"]["diff"] == pytest.approx(1 / 2.1)


# ---- a small run, exactly --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("overopt")
    root = overopt.run_exact(out / "overopt_exact", budget=0.04, seeds=(0, 1), n_labels=(32,), betas=(1.0,), workers=2,
                             log=lambda _: None)
    points = [json.loads(line) for line in (root / "curves.jsonl").read_text().splitlines()]
    return out, root, points, json.loads((root / "study.json").read_text())


def test_the_contract_files(study):
    out, root, points, meta = study
    for p in points:
        assert {"method", "n_labels", "beta", "seed", "kl", "gold", "proxy"} <= set(p)
        assert ("n" in p) == (p["method"] == "best-of-n") and ("step" in p) == (p["method"] != "best-of-n")
    assert {p["method"] for p in points} == {"reinforce", "kl-pg", "dpg", "dpo", "best-of-n", "proxy-posterior", "gold-posterior"}
    assert (out / meta["testbed"] / "config.json").is_file() and meta["max_new_tokens"] == overopt.MAX_NEW_TOKENS
    from tiltlm.rewards import get_reward

    assert get_reward(meta["gold"])(["", "d", "dd", "ddd", "dddd"]).tolist() == [0.0, 1.0, 1.0, 0.0, -2.0]
    verdict = json.loads((root / "verdict.json").read_text())
    assert verdict["exact"] and verdict["sentences"] and "kl-pg β=1 N=32" in verdict["methods"]
    assert (root / "report" / "gold_vs_kl.png").stat().st_size > 0


def test_every_policy_lies_under_the_frontier(study):
    """Every evaluated point, and every cell's final policy enumerated afresh, has gold ≤ F(its KL)."""
    from tiltlm.policies import HFPolicy

    out, root, points, meta = study
    space = overopt.space_of(out / meta["testbed"])
    assert float(space.logp0.exp().sum()) == pytest.approx(1.0, abs=1e-6)  # the whole space (a float32 model)
    for p in points:
        assert p["gold"] <= frontier_at(space.logp0, space.gold, p["kl"]) + 1e-9, p
    for cell in sorted((root / "cells").iterdir()):
        policy = HFPolicy.from_pretrained(str(cell / "policy"), max_new_tokens=meta["max_new_tokens"])
        log_pi = space.enumerated.log_prob(policy)
        assert float(log_pi.exp().sum()) == pytest.approx(1.0, abs=1e-6)
        assert expectation(log_pi, space.gold) <= frontier_at(space.logp0, space.gold, kl(log_pi, space.logp0)) + 1e-9
    trained = [p for p in points if p["method"] in ("reinforce", "kl-pg") and p["step"]]
    assert max(p["kl"] for p in trained) > 1e-3  # training moved: the bound is not checked at pi0 alone


def test_the_proxy_posterior_equals_an_independent_computation(study):
    """pi0·exp(r̂/beta)/Z from transformers' own forward passes: the reward model row by row on each text, and pi0 of
    each text as the product of the causal LM's next-token probabilities."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, root, points, meta = study
    rm_dir = root / "proxies" / "N32_seed0" / "rm"
    tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    lm_dir = out / meta["testbed"]
    lm, lm_tok = AutoModelForCausalLM.from_pretrained(lm_dir).eval(), AutoTokenizer.from_pretrained(lm_dir)
    space = overopt.space_of(lm_dir)
    bos, eos = lm_tok.bos_token_id, lm_tok.eos_token_id
    proxy, logp0 = [], []
    with torch.no_grad():
        for text in space.texts:
            ids = tok(text)["input_ids"] or [tok.bos_token_id]
            proxy.append(float(rm(torch.tensor([ids])).logits[0, 0]))
            body = lm_tok(text, add_special_tokens=False)["input_ids"]
            seq = [bos, *body] + ([eos] if len(body) < meta["max_new_tokens"] else [])
            logits = lm(torch.tensor([seq])).logits[0].double().log_softmax(-1)
            logp0.append(float(sum(logits[i, seq[i + 1]] for i in range(len(seq) - 1))))
    proxy_t, logp0_t = torch.tensor(proxy, dtype=torch.float64), torch.tensor(logp0, dtype=torch.float64)
    assert torch.allclose(logp0_t, space.logp0, atol=1e-5)
    curve = sorted((p for p in points if p["method"] == "proxy-posterior" and p["seed"] == 0), key=lambda p: -(p["beta"] or math.inf))
    assert len(curve) == len(overopt.TILT_BETAS)
    for p in curve:
        log_q = logp0_t if p["beta"] is None else torch.log_softmax(logp0_t + proxy_t / p["beta"], 0)
        q = log_q.exp()
        assert p["kl"] == pytest.approx(float((q * (log_q - logp0_t)).sum()), rel=1e-4, abs=1e-5)
        assert p["gold"] == pytest.approx(float((q * space.gold).sum()), rel=1e-4, abs=1e-5)
        assert p["proxy"] == pytest.approx(float((q * proxy_t).sum()), rel=1e-4, abs=1e-5)


def test_a_broken_curves_file_is_refused(study):
    bad = [{"method": "kl-pg", "n_labels": 32, "seed": 0, "kl": float("nan"), "gold": 0.0, "proxy": 0.0}]
    with pytest.raises(TiltlmError, match="kl = nan"):
        check_points(bad)


def test_gold_metrics_of_a_cell_are_its_policy_s(study):
    """metrics.gold: gold/exact of the last step is E_pi[g] of the saved policy, enumerated afresh; gold/mean is the
    gold's mean on each step's samples (a value the gold can take, on average)."""
    from tiltlm.experiments.cells import read_jsonl
    from tiltlm.policies import HFPolicy

    out, root, points, meta = study
    space = overopt.space_of(out / meta["testbed"])
    cell = root / "cells" / "kl-pg_N32_beta1_seed0"
    rows = read_jsonl(cell / "metrics.jsonl", strict=True)
    policy = HFPolicy.from_pretrained(str(cell / "policy"), max_new_tokens=meta["max_new_tokens"])
    assert rows[-1]["gold/exact"] == pytest.approx(expectation(space.enumerated.log_prob(policy), space.gold), abs=1e-6)
    assert all(-5.0 <= r["gold/mean"] <= 1.0 for r in rows)
    assert len({r["gold/mean"] for r in rows}) > 1


def test_tiltlm_report_rewrites_the_part_from_its_files(study):
    """`tiltlm report overopt_exact/`: verdict.json and report/ again from the files alone, the same bytes; the
    sentences printed."""
    from typer.testing import CliRunner

    from tiltlm.cli import app

    out, root, points, meta = study
    before = (root / "verdict.json").read_bytes()
    (root / "verdict.json").unlink()
    (root / "report" / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "verdict.json").read_bytes() == before and (root / "report" / "report.html").is_file()
    assert json.loads(before)["sentences"][0] in result.output
