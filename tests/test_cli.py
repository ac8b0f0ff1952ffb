"""The CLI end to end (real subprocesses): JSON keys, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

EXACT_KEYS = {"log_z", "n_sequences", "reward_prior", "reward_target", "kl_target_prior", "kl_prior_target", "entropy_prior", "entropy_target"}
POLICY_KEYS = {"reward_policy", "kl_target_policy", "kl_policy_target", "tv_policy_target", "entropy_policy"}


def tiltlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiltlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_exact_json(testbed_dir):
    r = tiltlm("exact", "--prior", str(testbed_dir), "--policy", str(testbed_dir), "--reward", "count:a", "--beta", "0.5",
               "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert EXACT_KEYS | POLICY_KEYS <= set(report)
    assert report["n_sequences"] == 1 + 4 + 16 + 64
    assert report["kl_target_policy"] == pytest.approx(report["kl_target_prior"], abs=1e-6)


def test_testbed_then_sample(tmp_path):
    out = tmp_path / "tb"
    r = tiltlm("testbed", str(out), "--vocab-size", "4", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    r = tiltlm("sample", "--model", str(out), "-n", "5", "--max-new-tokens", "4", "--reward", "count:a", "--out", str(tmp_path / "s.jsonl"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(row["reward"] == row["text"].count("a") for row in rows)
    r = tiltlm("sample", "--model", str(out), "-n", "5", "--max-new-tokens", "4", "--sampler", "inverse-cdf", "--out", str(tmp_path / "f.jsonl"))
    assert r.returncode == 0, r.stderr
    fast = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert len(fast) == 5 and [row["text"] for row in fast] != [row["text"] for row in rows]  # the other stream


@pytest.mark.parametrize(
    "args,needle",
    [
        (["exact", "--prior", "/nonexistent/model", "--reward", "count:a", "--beta", "1", "--max-new-tokens", "3"], "not found"),
        (["exact", "--prior", "{tb}", "--reward", "nosuchreward", "--beta", "1", "--max-new-tokens", "3"], "unknown reward"),
        (["exact", "--prior", "{tb}", "--reward", "count:a", "--beta", "0", "--max-new-tokens", "3"], "beta must be > 0"),
        (["exact", "--prior", "{tb}", "--reward", "count:a", "--beta", "-2", "--max-new-tokens", "3"], "beta must be > 0"),
        (["exact", "--prior", "{tb}", "--reward", "count:a", "--beta", "1", "--max-new-tokens", "30"], "lower --max-new-tokens"),
        (["sample", "--model", "{tb}", "--temperature", "0"], "temperature must be > 0"),
        (["sample", "--model", "{tb}", "--sampler", "fast"], "unknown sampler 'fast'; use one of gumbel, inverse-cdf"),
    ],
)
def test_bad_inputs_end_in_one_line(testbed_dir, args, needle):
    r = tiltlm(*[a.replace("{tb}", str(testbed_dir)) for a in args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_exact_on_a_model_tiltlm_did_not_create(tmp_path):
    """A plain transformers Llama with its own tokenizer (BOS != EOS, no PAD): every token is a possible next token."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "x": 2, "y": 3, "z": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    r = tiltlm("exact", "--prior", str(tmp_path), "--reward", "count:x", "--beta", "1", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n_sequences"] == 1 + 4 + 16 + 64  # <s> counts as an ordinary next token; </s> ends
    assert report["prior_mass"] == pytest.approx(1.0, abs=1e-5)
