"""Numerical extremes: beta from 1e-3 to 1e3 and rewards up to ±1e3 (so r/beta up to ±1e6).

Everything is in log space (logsumexp, clipped exponents), so no loss, importance weight, IS metric,
exact quantity, log Z or weight may become NaN or inf. A loss that does become non-finite stops the
run with the step and the cause, and the last good checkpoint still loads and resumes.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml

from tiltlm.algorithms import available_algorithms
from tiltlm.algorithms.base import algorithm_class
from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, normalise
from tiltlm.metrics import (
    effective_sample_size,
    kl_policy_target,
    kl_target_policy,
    log_z,
    tv_target_policy,
)
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

BETAS = (1e-3, 1.0, 1e3)
REWARDS = {  # r(x) over texts of 'a', 'b' of at most 3 letters
    "up-to-+1e3": lambda texts: [1e3 * t.count("a") / 3 for t in texts],
    "down-to--1e3": lambda texts: [-1e3 * t.count("a") / 3 for t in texts],
    "plus-minus-1e3": lambda texts: [1e3 * (t.count("a") - t.count("b")) / 3 for t in texts],
}
VARIANTS = [{"name": name} for name in available_algorithms()] + [
    {"name": "dpg", "off_policy": True},
    {"name": "f-dpg", "divergence": "rkl"}, {"name": "f-dpg", "divergence": "fkl"}, {"name": "f-dpg", "divergence": "tv"},
    {"name": "kl-pg", "estimator": "k3"}, {"name": "kl-pg", "kl_in": "loss", "estimator": "k2"},
    {"name": "ppo-kl", "adaptive_kl": True, "target_kl": 0.5, "horizon": 100},
    {"name": "reinforce", "entropy_coef": 0.1},
    {"name": "cdpo", "label_smoothing": 0.3}, {"name": "online-dpo", "label": "argmax", "loss": "ipo"},
]
PAIRS = [("aaa", "bbb"), ("", "a"), ("ab", "ba"), ("bbb", "b")]  # offline preference algorithms (dpo, ipo, cdpo) train on these


def tabular(seed: int = 0):
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=seed)
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    return policy, prior


def finite_numbers(row: dict) -> dict:
    """The numeric entries of a metrics row that are NOT finite (expect {})."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not math.isfinite(v)}


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reward", list(REWARDS))
def test_every_algorithm_stays_finite(beta, reward, tmp_path):
    """Losses, weights, importance weights, running and IS log Z, exact metrics: all finite."""
    assert {v["name"] for v in VARIANTS} == set(available_algorithms())
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": "", "chosen": w, "rejected": l}) + "\n" for w, l in PAIRS))
    for variant in VARIANTS:
        policy, prior = tabular()
        target = Prior(prior) * Tilt(REWARDS[reward], beta)
        offline = {"data": {"path": str(prefs)}} if algorithm_class(variant["name"]).offline_pairs else {}
        cfg = parse_config({"algorithm": variant, "target": {"reward": "count:a", "beta": beta},
                            "sampling": {"n_per_context": 16, "max_new_tokens": 3}, "optim": {"steps": 4, "lr": 0.1},
                            "metrics": {"exact_every": 2}, **offline})
        trainer = Trainer(cfg, policy=policy, target=target)
        rows = trainer.run()
        for row in rows:
            assert finite_numbers(row) == {}, (variant, row["step"], finite_numbers(row))
            assert "log_z/exact" in row or row["step"] % 2
        assert bool(torch.isfinite(policy.logits).all())
        state = trainer.algorithm.state_dict()
        assert all(math.isfinite(v) for v in state.values() if isinstance(v, float)), (variant, state)
        # the exact log Z of the tilt sits within log of the extremes: log Z in [min r/beta, max r/beta]
        r = torch.tensor(REWARDS[reward](["aaa", "bbb", "", "a", "b"]), dtype=torch.float64) / beta
        assert float(r.min()) - 1e-6 <= rows[-1]["log_z/exact"] <= float(r.max()) + 1e-6


@pytest.mark.parametrize("beta", BETAS)
def test_exact_target_at_extremes_normalises(beta):
    """log Z by logsumexp is finite and p* sums to 1 even when r/beta = ±1e6."""
    _, prior = tabular()
    space = enumerate_space(prior)
    for fn in REWARDS.values():
        log_p, log_zv = normalise((Prior(prior) * Tilt(fn, beta)).log_score(space.samples))
        assert math.isfinite(log_zv) and bool(torch.isfinite(log_p).all())
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # beta = 1e-3, r up to 1e3: p* is the hardmax, all mass on the sequences with max reward ('aaa')
    if beta == 1e-3:
        log_p, _ = normalise((Prior(prior) * Tilt(REWARDS["up-to-+1e3"], beta)).log_score(space.samples))
        assert float(log_p.exp()[[t == "aaa" for t in space.samples.texts]].sum()) == pytest.approx(1.0)


def test_is_estimators_with_log_weights_a_million_apart():
    """IS weights e^{±1e6}: log Z, ESS, KL(p*||pi), TV and KL(pi||p*) stay finite (log-space weights)."""
    gen = torch.Generator().manual_seed(0)
    log_q = -torch.rand(64, generator=gen, dtype=torch.float64) * 5
    log_pi = log_q + torch.randn(64, generator=gen, dtype=torch.float64) * 0.1
    for scale in (1e6, -1e6):
        log_target = log_q + scale * torch.linspace(0, 1, 64, dtype=torch.float64)
        lz = log_z(log_target, log_q)
        assert math.isfinite(lz.value) and math.isfinite(lz.stderr) and 1.0 <= lz.ess <= 64
        if scale > 0:  # Z is dominated by the largest weight: log Z ≈ scale - log 64
            assert lz.value == pytest.approx(scale - math.log(64), rel=1e-9)
        for est in (kl_target_policy(log_target, log_q, log_pi), tv_target_policy(log_target, log_q, log_pi),
                    kl_policy_target(log_target, log_pi, lz.value)):
            assert math.isfinite(est.value) and math.isfinite(est.stderr), est
        assert 1.0 <= effective_sample_size(log_target - log_q) <= 64


# ---- the non-finite guard --------------------------------------------------------------------------

POISON_PY = '''
import os
calls = 0

def reward(texts):
    """count of 'a', except from call number POISON_AT on: 1e308 (r/beta overflows)."""
    global calls
    calls += 1
    at = int(os.environ.get("POISON_AT", "0"))
    if at and calls >= at:
        return [1e308] * len(texts)
    return [float(t.count("a")) for t in texts]
'''


def test_a_non_finite_loss_stops_the_run_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    """Step 4's rewards overflow: the run stops naming step 4 and the cause; the checkpoint of step 3
    resumes (without the fault) to exactly the numbers of a run that never had it."""
    (tmp_path / "poison.py").write_text(POISON_PY)
    spec = f"{tmp_path}/poison.py:reward"

    def build(beta=0.5):
        policy, prior = tabular()
        return policy, Prior(prior) * Tilt(spec, beta)

    cfg = parse_config({"algorithm": "kl-pg", "target": {"reward": spec, "beta": 0.5},
                        "sampling": {"n_per_context": 8, "max_new_tokens": 3}, "optim": {"steps": 6, "lr": 0.05},
                        "checkpoint": {"every": 1}})
    policy, target = build()
    clean = Trainer(cfg, policy=policy, target=target, out_dir=tmp_path / "clean").run()

    monkeypatch.setenv("POISON_AT", "4")  # the 4th reward call is step 4's batch
    policy, target = build()
    with pytest.raises(TiltlmError) as e:
        Trainer(cfg, policy=policy, target=target, out_dir=tmp_path / "run").run()
    message = str(e.value)
    assert "\n" not in message
    assert "at step 4" in message and "overflow r/beta" in message and "rescale the reward or raise beta" in message
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3

    monkeypatch.delenv("POISON_AT")
    policy, target = build()
    resumed = Trainer(cfg, policy=policy, target=target, out_dir=tmp_path / "run", resume=True)
    assert resumed.step == 3
    resumed.run()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "clean" / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert clean[-1]["loss"] == json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]


def test_the_cli_prints_the_non_finite_stop_as_one_line(tmp_path, monkeypatch, capsys):
    """Through `tiltlm train`: one line naming the step and the cause, exit 2, checkpoint of the last good step kept."""
    from tiltlm.cli import main
    from tiltlm.testbed import make_testbed

    model = make_testbed(tmp_path / "tb", vocab_size=4, n_layer=1, n_embd=16, seed=0)
    (tmp_path / "poison.py").write_text(POISON_PY)
    cfg = {"prior": str(model), "target": {"reward": f"{tmp_path}/poison.py:reward", "beta": 0.5}, "algorithm": {"name": "dpg"},
           "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 5, "lr": 0.01}, "checkpoint": {"every": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()  # make_testbed's own output
    monkeypatch.setenv("POISON_AT", "3")
    monkeypatch.setattr(sys, "argv", ["tiltlm", "train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    printed = capsys.readouterr()
    lines = (printed.out + printed.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the loss became") and "at step 3" in lines[0], lines
    assert "overflow r/beta" in lines[0]
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_weights_that_become_non_finite_never_replace_the_last_checkpoint(tmp_path):
    policy, prior = tabular()
    cfg = parse_config({"algorithm": "kl-pg", "target": {"reward": "count:a", "beta": 1.0},
                        "sampling": {"n_per_context": 8, "max_new_tokens": 3}, "optim": {"steps": 4, "lr": 0.05},
                        "checkpoint": {"every": 1}})
    trainer = Trainer(cfg, policy=policy, target=Prior(prior) * Tilt("count:a", 1.0), out_dir=tmp_path / "run")
    trainer.train_step()
    before = (tmp_path / "run" / "checkpoint" / "policy.safetensors").read_bytes()
    step = trainer.optimizer.step

    def overflowing_step():  # an optimiser update that overflows float32 in one weight
        step()
        with torch.no_grad():
            policy.logits[0, 0, 0] = math.inf
    trainer.optimizer.step = overflowing_step
    with pytest.raises(TiltlmError, match="weights became non-finite at step 2") as e:
        trainer.train_step()
    assert "\n" not in str(e.value) and "lower optim.lr" in str(e.value)
    assert (tmp_path / "run" / "checkpoint" / "policy.safetensors").read_bytes() == before


def test_a_constraint_no_sample_meets_gives_zero_weights_not_nan():
    """DPG-family losses when P(x) = 0 on every sample so far (running log Z = -inf): finite, no NaN."""
    from tiltlm.targets import Constraint

    for name in ("dpg", "gdc++", "f-dpg"):
        policy, prior = tabular()
        target = Prior(prior) * Tilt("count:a", 1.0) * Constraint(lambda texts: [0.0] * len(texts))
        cfg = parse_config({"algorithm": name, "target": {"reward": "count:a", "beta": 1.0},
                            "sampling": {"n_per_context": 8, "max_new_tokens": 3}, "optim": {"steps": 2, "lr": 0.05}})
        rows = Trainer(cfg, policy=policy, target=target).run()
        assert all(math.isfinite(r["loss"]) for r in rows)
        assert rows[-1]["log_z/running"] == -math.inf  # Z_hat = 0 is the honest estimate
        assert bool(torch.isfinite(policy.logits).all())


def test_a_non_finite_gradient_behind_a_finite_loss_is_stopped_before_the_update(tmp_path):
    """loss = sqrt|log pi - sg(log pi)| is 0 but its gradient is inf: the step stops before the optimiser moves a weight."""
    from tiltlm.algorithms import get_algorithm

    class SqrtLoss(type(get_algorithm("reinforce"))):
        def loss(self, batch, logp, token_logp):
            return (logp - logp.detach()).abs().sqrt().sum(), {}

    policy, prior = tabular()
    before = policy.logits.detach().clone()
    cfg = parse_config({"algorithm": "reinforce", "target": {"reward": "count:a", "beta": 1.0},
                        "sampling": {"n_per_context": 8, "max_new_tokens": 3}, "optim": {"steps": 2, "lr": 0.05}})
    trainer = Trainer(cfg, policy=policy, target=Prior(prior) * Tilt("count:a", 1.0), algorithm=SqrtLoss(cfg.algorithm))
    with pytest.raises(TiltlmError, match="gradient became non-finite at step 1") as e:
        trainer.run()
    assert "\n" not in str(e.value)
    assert torch.equal(policy.logits.detach(), before)
