"""`tiltlm reward-model train` (tiltlm.rmtrain): a Bradley–Terry reward model fitted to synthetic preferences of a known
gold reaches a held-out accuracy no untrained (or constant, or coin-flip) model reaches; the saved directory scores the
same through ``rm:DIR`` and through plain transformers; LoRA is merged; the bad inputs are one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_bad_inputs import one_line, tiltlm

from tiltlm.metrics.proportions import wilson

GOLD = "count:a"
PAIRS, HELD_OUT = 300, 60
# trained: >= 0.85 (measured 0.983, 59/60, untrained 0.533); a model that cannot tell the pairs apart scores ~0.5, and its
# accuracy on 60 pairs reaches 0.85 with probability < 1e-7 (binomial tail); the Wilson lower end must also clear 0.7
THRESHOLD, LOW_END, CONTROL = 0.85, 0.7, 0.7


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    """A near-uniform testbed over a–e and EOS (init scale 0.1): completions of varied lengths and letters."""
    from tiltlm.testbed import make_testbed

    return make_testbed(tmp_path_factory.mktemp("rm_prior"), vocab_size=6, n_layer=2, n_embd=32, seed=0, init_std=0.1)


@pytest.fixture(scope="module")
def prefs(prior_dir, tmp_path_factory):
    """Pairs from the prior labelled by argmax of the gold count of 'a' (no ties): the labels are the gold's ordering."""
    from tiltlm.policies import HFPolicy
    from tiltlm.preferences import synthesize, write_preferences
    from tiltlm.rewards import get_reward

    rows = synthesize(HFPolicy.from_pretrained(prior_dir, max_new_tokens=6), [""], pairs=PAIRS, gold=get_reward(GOLD),
                      tau=1.0, seed=0, labels="argmax", no_ties=True)
    return write_preferences(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


@pytest.fixture(scope="module")
def trained(prior_dir, prefs, tmp_path_factory):
    from tiltlm.rmtrain import parse_rm_config, train_reward_model

    config = parse_rm_config({"base": str(prior_dir), "data": {"path": str(prefs), "eval_size": HELD_OUT}, "lr": 3e-3,
                              "epochs": 4, "batch_size": 16, "seed": 0})
    out = tmp_path_factory.mktemp("rm") / "rm"
    return config, out, train_reward_model(config, out)


def test_a_bt_reward_model_reaches_the_stated_held_out_accuracy(trained):
    _, _, record = trained
    m = record["metrics"]
    assert m["eval/pairs"] == HELD_OUT and m["train/pairs"] == PAIRS - HELD_OUT and m["steps"] == 4 * math.ceil(240 / 16)
    assert m["eval/accuracy"] >= THRESHOLD and m["eval/accuracy_low"] > LOW_END, m
    assert (m["eval/accuracy_low"], m["eval/accuracy_high"]) == pytest.approx(wilson(m["eval/correct"], HELD_OUT))
    assert m["eval/accuracy_start"] < CONTROL, m  # the control: the same model untrained (random score head)


def _held_out(config):
    from tiltlm.preference_data import load_preferences

    return load_preferences(config.data.path).split(eval_size=HELD_OUT, seed=config.seed)[1]


def test_rm_dir_scores_what_training_measured_and_transformers_agrees(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tiltlm.rewards import get_reward

    config, out, record = trained
    held = _held_out(config)
    reward = get_reward(f"rm:{out}")
    r_w = reward([p.chosen for p in held], [p.prompt for p in held])
    r_l = reward([p.rejected for p in held], [p.prompt for p in held])
    assert int((r_w > r_l).sum()) == record["metrics"]["eval/correct"]  # the accuracy is that of the reward rm:DIR gives
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers, no peft, no tiltlm
    assert model.config.num_labels == 1 and json.loads((out / "training.json").read_text())["metrics"] == record["metrics"]
    with torch.no_grad():
        plain = [float(model(**tok(p.prompt + p.chosen, return_tensors="pt")).logits[0, 0]) for p in held.pairs[:8]]
    assert torch.allclose(r_w[:8], torch.tensor(plain, dtype=torch.float64), atol=1e-5)


def test_lora_is_merged_before_saving(prior_dir, prefs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from tiltlm.rewards import get_reward
    from tiltlm.rmtrain import parse_rm_config, train_reward_model

    config = parse_rm_config({"base": str(prior_dir), "data": {"path": str(prefs), "eval_size": HELD_OUT}, "steps": 3,
                              "lr": 1e-2, "lora": {"r": 4, "target_modules": ["c_attn"]}})
    out = tmp_path / "rm"
    train_reward_model(config, out)
    assert not list(out.glob("adapter_*")) and "peft" not in (out / "config.json").read_text()
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in weights)
    base = load_file(prior_dir / "model.safetensors")
    key = next(k for k in base if k.endswith("h.0.attn.c_attn.weight"))
    assert not torch.allclose(weights[key], base[key])  # the adapter is in the merged weights
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        plain = float(model(input_ids=torch.tensor([[1, 2, 3]])).logits[0, 0])
    assert float(get_reward(f"rm:{out}")(["abc"])[0]) == pytest.approx(plain, abs=1e-5)


def _config(tmp_path, base, prefs, **extra) -> str:
    import yaml

    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "data": {"path": str(prefs), "eval_size": 20}, "steps": 2, **extra}))
    return str(path)


def test_cli_trains_reports_and_leaves_the_same_model_alone(prior_dir, prefs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rm"
    argv = ["reward-model", "train", _config(tmp_path, prior_dir, prefs), "--out", str(out)]
    code, printed = tiltlm(argv, monkeypatch, capsys)
    m = json.loads((out / "training.json").read_text())["metrics"]
    assert code == 0 and (f"held-out pairwise accuracy {m['eval/accuracy']:.3f} [{m['eval/accuracy_low']:.3f}, "
                          f"{m['eval/accuracy_high']:.3f}] (Wilson 95%, {m['eval/correct']}/20") in printed, printed
    before = (out / "model.safetensors").read_bytes()
    code, printed = tiltlm(argv, monkeypatch, capsys)
    assert code == 0 and "already holds a reward model" in printed and (out / "model.safetensors").read_bytes() == before
    argv[2] = _config(tmp_path, prior_dir, prefs, lr=1e-3)
    one_line(*tiltlm(argv, monkeypatch, capsys), ["holds a reward model with other parameters", "--overwrite"])
    assert tiltlm(argv + ["--overwrite"], monkeypatch, capsys)[0] == 0


@pytest.mark.parametrize("case, needles", [
    ("missing base", ["model directory", "not found"]),
    ("base without config", ["has no config.json"]),
    ("reward model as base", ["is a sequence classifier", "not a causal LM"]),
    ("no rejected column", ["has no column 'rejected'", "columns: prompt, chosen"]),
    ("unknown key", ["unknown config key 'epoch'", "did you mean 'epochs'"]),
    ("unknown data key", ["unknown config key 'data.eval_sise'", "did you mean 'eval_size'"]),
    ("bad value", ["config 'batch_size'"]),
    ("missing config", ["config file", "not found"]),
])
def test_bad_inputs_are_one_line(prior_dir, prefs, trained, tmp_path, monkeypatch, capsys, case, needles):
    base, extra, data = prior_dir, {}, prefs
    if case == "missing base":
        base = tmp_path / "nowhere"
    elif case == "base without config":
        base = tmp_path / "empty"
        base.mkdir()
        (base / "model.safetensors").write_bytes(b"")
    elif case == "reward model as base":
        base = trained[1]
    elif case == "no rejected column":
        data = tmp_path / "prompts.jsonl"
        data.write_text('{"prompt": "", "chosen": "a"}\n{"prompt": "", "chosen": "b"}\n')
    elif case == "unknown key":
        extra = {"epoch": 2}
    elif case == "bad value":
        extra = {"batch_size": 0}
    config = _config(tmp_path, base, data, **extra)
    if case == "unknown data key":
        text = (tmp_path / "rm.yaml").read_text().replace("eval_size", "eval_sise")
        (tmp_path / "rm.yaml").write_text(text)
    if case == "missing config":
        config = str(tmp_path / "none.yaml")
    one_line(*tiltlm(["reward-model", "train", config, "--out", str(tmp_path / "out")], monkeypatch, capsys), needles)
    assert not (tmp_path / "out").exists()
