"""The training loop: determinism, resume == uninterrupted, the CLI's outputs, HF and LoRA runs."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tiltlm.errors import TiltlmError
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import load_config, parse_config
from tiltlm.train.loop import Trainer


def tabular(seed=0):
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=seed)
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    return policy, Prior(prior) * Tilt("count:a", 1.0)


def config(algorithm, steps=6, **extra):
    return parse_config({"algorithm": algorithm, "target": {"reward": "count:a", "beta": 1.0},
                         "sampling": {"n_per_context": 16, "max_new_tokens": 3}, "optim": {"steps": steps, "lr": 0.05, "schedule": "cosine"},
                         "metrics": {"exact_every": 2}, "checkpoint": {"every": 1}, **extra})


ALGORITHMS = [
    {"name": "kl-pg"},
    {"name": "dpg", "off_policy": True},
    {"name": "ppo-kl", "adaptive_kl": True, "target_kl": 0.1, "horizon": 100, "epochs": 2},
]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a["name"])
def test_resume_continues_the_same_run(tmp_path, algorithm):
    cfg = config(algorithm)
    policy, target = tabular()
    Trainer(cfg, policy=policy, target=target, out_dir=tmp_path / "full").run()

    policy2, target2 = tabular()
    interrupted = Trainer(cfg, policy=policy2, target=target2, out_dir=tmp_path / "cut")
    for _ in range(3):
        interrupted.train_step()
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a crash mid-write leaves half a line
        f.write('{"step": 4, "rew')
    policy3, target3 = tabular(seed=99)  # fresh objects: everything must come from the checkpoint
    policy3.logits.data.copy_(tabular()[0].logits.data)  # same architecture; values are overwritten anyway
    resumed = Trainer(cfg, policy=policy3, target=Prior(target2.prior) * Tilt("count:a", 1.0), out_dir=tmp_path / "cut", resume=True)
    assert resumed.step == 3
    resumed.run()
    rows_full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_cut] == [1, 2, 3, 4, 5, 6]
    assert rows_cut == rows_full
    torch.testing.assert_close(policy3.logits, policy.logits, atol=0, rtol=0)


def test_same_seed_same_numbers_and_other_seed_differs():
    rows = []
    for seed in (0, 0, 1):
        policy, target = tabular()
        rows.append(Trainer(config({"name": "gdc++"}, steps=3, seed=seed), policy=policy, target=target).run())
    assert rows[0] == rows[1]
    assert rows[0] != rows[2]


def test_out_dir_must_be_new_or_resumed(tmp_path):
    (tmp_path / "x").write_text("keep")
    policy, target = tabular()
    with pytest.raises(TiltlmError, match="not empty"):
        Trainer(config({"name": "kl-pg"}), policy=policy, target=target, out_dir=tmp_path)
    with pytest.raises(TiltlmError, match="no checkpoint"):
        Trainer(config({"name": "kl-pg"}), policy=policy, target=target, out_dir=tmp_path / "new", resume=True)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: {name: kl-pg\n  oops")
    with pytest.raises(TiltlmError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(TiltlmError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(TiltlmError, match="unknown config key 'sampling.n_per_contxt'; did you mean 'n_per_context'"):
        parse_config({"algorithm": "kl-pg", "sampling": {"n_per_contxt": 4}})
    with pytest.raises(TiltlmError, match="unknown algorithm"):
        parse_config({"algorithm": "ppo"})
    with pytest.raises(TiltlmError, match="optim.lr"):
        parse_config({"algorithm": "kl-pg", "optim": {"lr": 0}})
    # one beta per run, the target's: an algorithm.beta equal to it is accepted (older configs), another refused
    assert parse_config({"algorithm": {"name": "kl-pg", "beta": 0.3}, "target": {"beta": 0.3}}).target.beta == 0.3
    with pytest.raises(TiltlmError, match=r"'algorithm.beta' \(0.5\) differs from target.beta \(0.3\)"):
        parse_config({"algorithm": {"name": "kl-pg", "beta": 0.5}, "target": {"beta": 0.3}})


def _exact_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "kl/target_exact" in r]


@pytest.mark.parametrize("algorithm,key", [("kl-pg", "kl/policy_target_exact"), ("dpg", "kl/target_exact")])
def test_train_cli_on_a_neural_testbed_lowers_the_exact_divergence(tmp_path, testbed_dir, algorithm, key):
    """kl-pg lowers KL(pi||p*) and dpg lowers KL(p*||pi), exactly, on a small GPT-2; outputs load in transformers."""
    from tiltlm.exact import enumerate_space, exact_report
    from tiltlm.policies import HFPolicy

    cfg = {"prior": str(testbed_dir), "target": {"reward": "count:a", "beta": 1.0}, "algorithm": {"name": algorithm},
           "sampling": {"n_per_context": 32, "max_new_tokens": 4}, "optim": {"steps": 25, "lr": 0.003},
           "metrics": {"exact_every": 25}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(path), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "checkpoint", "policy", ".tiltlm.lock", "phases.json", "inputs.json"}  # the lock: who owns the run
    prior = HFPolicy.from_pretrained(testbed_dir, max_new_tokens=4)
    before = exact_report(enumerate_space(prior), Prior(prior) * Tilt("count:a", 1.0), prior)
    start = before["kl_policy_target"] if key == "kl/policy_target_exact" else before["kl_target_policy"]
    end = _exact_rows(out)[-1][key]
    assert end < 0.7 * start, (start, end)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "policy")
    trained = HFPolicy.from_pretrained(out / "policy", max_new_tokens=4)
    after = exact_report(enumerate_space(prior), Prior(prior) * Tilt("count:a", 1.0), trained)
    assert after["kl_policy_target" if key == "kl/policy_target_exact" else "kl_target_policy"] == pytest.approx(end, abs=1e-4)


def test_lora_shares_the_prior_weights(tmp_path, testbed_dir):
    pytest.importorskip("peft")
    from tiltlm.train.build import build

    cfg = parse_config({"prior": str(testbed_dir), "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]},
                        "target": {"reward": "count:a", "beta": 1.0}, "algorithm": "kl-pg",
                        "sampling": {"n_per_context": 16, "max_new_tokens": 4}, "optim": {"steps": 8, "lr": 0.01}})
    policy, target = build(cfg)
    assert target.prior.model is policy.model  # one copy of the weights
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    s = target.prior.sample([""], 16, seed=0)
    prior_before = target.prior.log_prob(s)
    Trainer(cfg, policy=policy, target=target, out_dir=tmp_path / "run").run()
    torch.testing.assert_close(target.prior.log_prob(s), prior_before)  # pi0 unchanged by training
    assert not torch.allclose(policy.log_prob(s), prior_before)  # pi moved
    from tiltlm.policies import HFPolicy

    merged = HFPolicy.from_pretrained(tmp_path / "run" / "policy", max_new_tokens=4)
    torch.testing.assert_close(merged.log_prob(s), policy.log_prob(s), atol=1e-4, rtol=0)


def test_lora_adapters_start_from_the_config_seed(testbed_dir):
    """The adapters' random init is drawn from config.seed (not the global RNG): a rerun and every
    data-parallel rank start from the same adapters, and the global RNG is untouched."""
    pytest.importorskip("peft")
    from tiltlm.train.build import build

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        cfg = parse_config({"prior": str(testbed_dir), "lora": {"r": 4}, "algorithm": "kl-pg", "seed": seed})
        return {n: p.detach().clone() for n, p in build(cfg)[0].model.named_parameters() if p.requires_grad}

    state = torch.random.get_rng_state()
    first, again, other = adapters(0), adapters(0), adapters(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    lora_a = [n for n in first if "lora_A" in n]
    assert lora_a and all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in lora_a)


def test_shipped_example_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    paths = sorted((root / "configs").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        if "grid" in yaml.safe_load(path.read_text()):  # a sweep config: tests/test_sweep.py runs it
            continue
        load_config(path)


def test_tensorboard_logger_and_unknown_logger(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tiltlm.train.loggers import LoggerGroup, make_loggers

    policy, target = tabular()
    cfg = config({"name": "kl-pg"}, steps=3)
    trainer = Trainer(cfg, policy=policy, target=target, out_dir=tmp_path / "run")
    trackers = LoggerGroup(make_loggers("tensorboard", tmp_path / "run", {"seed": 0}))
    trainer.on_metrics = trackers
    rows = trainer.run()
    trackers.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("reward/mean")]
    assert logged == pytest.approx([r["reward/mean"] for r in rows])
    with pytest.raises(TiltlmError, match="unknown logger 'tensorbord'; available: jsonl, tensorboard, wandb, mlflow"):
        make_loggers("tensorbord", tmp_path, {})


def test_step_metrics_entropy_and_kl_by_hand():
    """entropy/seq = -mean log pi and kl/prior_seq (k1) = mean(log pi - log pi0) on the step's own batch."""
    policy, target = tabular()
    with torch.no_grad():
        policy.logits.add_(torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(3)))
    trainer = Trainer(config({"name": "kl-pg"}, steps=1), policy=policy, target=target)
    batch = trainer.make_batch(0)
    from tiltlm.metrics.batch import batch_metrics

    m = batch_metrics(batch, batch.logq)
    assert m["entropy/seq"] == pytest.approx(float(-batch.logq.mean()))
    assert m["kl/prior_seq"] == pytest.approx(float((batch.logq - batch.logp_prior).mean()))
    assert m["entropy/seq"] > 0


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_wandb_offline_and_mlflow_file_store(tmp_path, monkeypatch, name, module):
    pytest.importorskip(module, reason=f"the {name} extra is not installed")
    from tiltlm.train.loggers import LoggerGroup, make_loggers

    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    policy, target = tabular()
    trainer = Trainer(config({"name": "kl-pg"}, steps=2), policy=policy, target=target, out_dir=tmp_path / "run")
    trackers = LoggerGroup(make_loggers(name, tmp_path / "run", {"seed": 0, "optim": {"lr": 0.05}}))
    trainer.on_metrics = trackers
    trainer.run()
    trackers.close()
    if name == "wandb":
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")), "wandb wrote no offline run"
    else:
        metric = list((tmp_path / "run" / "mlruns").glob("*/*/metrics/reward.mean")) or list((tmp_path / "run" / "mlruns").rglob("reward.mean"))
        assert metric, "mlflow logged no reward.mean"
        assert len(metric[0].read_text().splitlines()) == 2


def test_optim_checkpoint_layers_reaches_the_policy(testbed_dir):
    """optim.checkpoint_layers switches the HF policy's activation checkpointing (tests/test_policies.py checks its
    numbers); off by default."""
    from tiltlm.train.build import build

    for on in (False, True):
        config = parse_config({"prior": str(testbed_dir), "algorithm": "kl-pg", "target": {"reward": "count:a", "beta": 1.0},
                               "optim": {"checkpoint_layers": on}})
        policy, _ = build(config)
        assert policy.checkpoint_layers is on
    assert parse_config({"algorithm": "kl-pg"}).optim.checkpoint_layers is False


def test_sampling_sampler_reaches_both_policies(testbed_dir):
    """sampling.sampler sets how the policy and the prior draw (tests/test_policies.py checks the draws); gumbel,
    the stream every recorded number was measured with, by default."""
    from tiltlm.train.build import build

    for sampler in ("gumbel", "inverse-cdf"):
        config = parse_config({"prior": str(testbed_dir), "algorithm": "kl-pg", "target": {"reward": "count:a", "beta": 1.0},
                               "sampling": {"sampler": sampler}})
        policy, target = build(config)
        assert policy.sampler == target.prior.sampler == sampler
    assert parse_config({"algorithm": "kl-pg"}).sampling.sampler == "gumbel"
    from typing import get_args

    from tiltlm.policies.base import SAMPLERS
    from tiltlm.train.config import SamplingConfig

    assert get_args(SamplingConfig.model_fields["sampler"].annotation) == SAMPLERS  # the config offers what the policy draws
