"""Model directories are validated before use (tiltlm.policies.modeldir): real directories with one fault
each, run through the CLI, end in one line ``error: <problem>; <fix>``, exit 2, no traceback, --out as it
was; sound directories (tied Llama, sharded weights, GPT-2 keys without the base-model prefix, the
embedded default) still load."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_bad_inputs import one_line, tiltlm

from tiltlm.errors import TiltlmError
from tiltlm.policies import modeldir
from tiltlm.policies.modeldir import memory_needed


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    if config:
        _edit_json(dst / "config.json", **config)
    return dst


def _tiny_llama(path: Path, *, tie: bool = True) -> Path:
    """A LlamaForCausalLM from LlamaConfig (tied embeddings, grouped-query attention) and a ChatML tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiltlm.testbed import make_chat_tokenizer

    tokenizer = make_chat_tokenizer(list("abcd"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("modeldirs")
    tb = make_testbed(root / "tb", vocab_size=8, n_layer=2, n_embd=16, seed=0)
    llama = _tiny_llama(root / "llama")
    d = SimpleNamespace(root=root, tb=tb, llama=llama)
    d.no_tokenizer = _copy(tb, root / "no_tokenizer")
    for f in d.no_tokenizer.glob("tokenizer*"):
        f.unlink()
    d.llama_config = _copy(tb, root / "llama_config", model_type="llama", architectures=["LlamaForCausalLM"])
    d.wider = _copy(tb, root / "wider", n_embd=32)
    d.deeper = _copy(tb, root / "deeper", n_layer=3)
    d.bigger_vocab = _copy(tb, root / "bigger_vocab", vocab_size=16)
    d.llama_kv_heads = _copy(llama, root / "llama_kv_heads", num_key_value_heads=4)
    d.llama_untied = _copy(llama, root / "llama_untied", tie_word_embeddings=False)
    d.ids_past_vocab = _copy(tb, root / "ids_past_vocab")  # 3 tokens, but one has id 9 in an 8-row model
    tok = json.loads((tb / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {"<eos>": 0, "a": 1, "b": 9}
    (d.ids_past_vocab / "tokenizer.json").write_text(json.dumps(tok))
    d.no_eos = _copy(tb, root / "no_eos", eos_token_id=None)
    _edit_json(d.no_eos / "tokenizer_config.json", eos_token=None)
    (d.no_eos / "generation_config.json").unlink()
    d.config_not_json = _copy(tb, root / "config_not_json")
    (d.config_not_json / "config.json").write_text('{"model_type": "gpt2",')
    d.unknown_type = _copy(tb, root / "unknown_type", model_type="gpt9", architectures=["GPT9LMHeadModel"])
    d.shard_missing = _sharded(tb, root / "shard_missing")
    max(d.shard_missing.glob("model-*.safetensors")).unlink()  # the last shard
    (root / "prompts.jsonl").write_text('{"prompt": "ab"}\n')
    return d


def _sharded(src: Path, dst: Path) -> Path:
    """``src`` re-saved as several safetensors shards with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, use_safetensors=True)
    model.save_pretrained(dst, max_shard_size="20KB")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)
    assert (dst / "model.safetensors.index.json").is_file() and len(list(dst.glob("model-*.safetensors"))) > 1
    return dst


def _train(prior: str, tmp_path: Path, monkeypatch, capsys, **cfg) -> tuple[int, str, Path]:
    config = {"prior": prior, "target": {"reward": "count:a", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
              "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 2, "lr": 0.01}, **cfg}
    path, out = tmp_path / "cfg.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(config))
    code, printed = tiltlm(["train", str(path), "--out", str(out)], monkeypatch, capsys)
    return code, printed, out


def _other(command: str, model: Path, d, tmp_path: Path) -> tuple[list[str], Path]:
    """argv of `tiltlm sample|eval|exact|chat` on ``model`` and the file it would write."""
    out = tmp_path / "out.jsonl"
    return {
        "sample": ["sample", "--model", str(model), "-n", "2", "--max-new-tokens", "3", "--out", str(out)],
        "eval": ["eval", "--model", str(model), "--data", str(d.root / "prompts.jsonl"), "--reward", "count:a", "-n", "2",
                 "--max-new-tokens", "3"],
        "exact": ["exact", "--prior", str(model), "--reward", "count:a", "--beta", "1", "--max-new-tokens", "2"],
        "chat": ["chat", "--model", str(model), "--secret", "cat", "--out", str(out)],
    }[command], out


# fault -> (directory attribute, the other command it is also run through, needles of the message)
FAULTS = {
    "tokenizer-files-missing": ("no_tokenizer", "eval", ["has no tokenizer files (tokenizer.json", "copy the tokenizer saved with these weights"]),
    "config-other-architecture": ("llama_config", "sample", ["config.json' does not describe its weights (it builds a LlamaForCausalLM",
                                                             "missing from the files: model.embed_tokens.weight",
                                                             "restore the config.json saved with these weights"]),
    "config-n-embd-edited": ("wider", "exact", ["does not describe its weights", "shapes differ: lm_head.weight [8, 16] vs [8, 32]"]),
    "config-n-layer-edited": ("deeper", "sample", ["does not describe its weights", "missing from the files: transformer.h.2."]),
    "config-vocab-size-edited": ("bigger_vocab", "exact", ["shapes differ: lm_head.weight [8, 16] vs [16, 16]"]),
    "config-kv-heads-edited": ("llama_kv_heads", "sample", ["shapes differ: model.layers.0.self_attn.k_proj.weight [8, 16] vs [16, 16]"]),
    "config-untied-over-tied-weights": ("llama_untied", "eval", ["missing from the files: lm_head.weight"]),
    "tokenizer-id-past-vocab": ("ids_past_vocab", "sample", ["the tokenizer's token 'b' has id 9 but the model has only 8 output rows",
                                                              "use the tokenizer saved with this model"]),
    "tokenizer-without-eos": ("no_eos", "exact", ["the tokenizer has no EOS token", "set tokenizer.eos_token"]),
    "config-not-json": ("config_not_json", "eval", ["config.json' is not valid JSON", "restore the config.json saved with these weights"]),
    "config-unknown-model-type": ("unknown_type", "exact", ["names model_type 'gpt9', which this transformers does not know",
                                                            "use a model of a built-in architecture"]),
    "weights-shard-missing": ("shard_missing", "sample", ["model.safetensors is unreadable: shard model-0000", "is missing"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_model_dir_is_one_line_in_train_and_another_command(fault, dirs, tmp_path, monkeypatch, capsys):
    attr, command, needles = FAULTS[fault]
    model = getattr(dirs, attr)
    start = time.perf_counter()
    code, printed, out = _train(str(model), tmp_path, monkeypatch, capsys)
    line = one_line(code, printed, needles)
    assert not out.exists()
    assert time.perf_counter() - start < 30  # refused before allocating (the Llama config over GPT-2 weights is 6.5B parameters)
    argv, out = _other(command, model, dirs, tmp_path)
    assert one_line(*tiltlm(argv, monkeypatch, capsys), needles) == line
    assert not out.exists()
    print(line)  # shown by `pytest -rA`: the message column of docs/reliability.md


def test_chat_with_a_model_that_cannot_read_english_is_one_line(dirs, tmp_path, monkeypatch, capsys):
    """`tiltlm chat` on a letters testbed: its tokenizer has no [UNK] for the game's English opening."""
    argv, out = _other("chat", dirs.tb, dirs, tmp_path)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("yes\n" * 20))
    line = one_line(*tiltlm(argv, monkeypatch, capsys), ["the tokenizer cannot encode the text 'I am thinking of an animal",
                                                           "use a model whose tokenizer covers the environment's text"])
    assert not out.exists()
    print(line)


def test_memory_needed_is_parameters_times_bytes_times_training_copies():
    assert memory_needed(1_000, 4) == 4_000  # a frozen float32 model
    assert memory_needed(135_000_000, 2) == 270_000_000  # 135M bfloat16 weights
    assert memory_needed(1_000, 4, trained_with="adam") == 16_000  # weights, gradients, two Adam moments
    assert memory_needed(1_000, 4, trained_with="sgd") == 8_000  # weights and gradients


def test_a_model_too_large_for_memory_is_refused_before_loading(dirs, tmp_path, monkeypatch, capsys):
    """The testbed (V = 8, d = 16, 2 layers, 64 positions, untied) has float32 parameters: wte 8·16 + wpe 64·16 +
    lm_head 8·16 + ln_f 32 + per layer (ln_1 32 + c_attn 16·48+48 + c_proj 16·16+16 + ln_2 32 + c_fc 16·64+64 +
    c_proj 64·16+16 = 3,280) × 2 = 7,872, i.e. 31,488 bytes; trained with Adam ×4 = 125,952, with SGD ×2 = 62,976.
    100 kB holds the frozen prior and the SGD policy, not the Adam one; 30 kB holds nothing."""
    weights = modeldir.read_weights(dirs.tb)
    assert weights.n_params == 7_872 and weights.nbytes == 31_488
    monkeypatch.setenv(modeldir.MEMORY_ENV, "100000")
    code, printed, out = _train(str(dirs.tb), tmp_path, monkeypatch, capsys)
    line = one_line(code, printed, ["needs at least 125.95 kB (7,872 parameters × 4 bytes × 4: weights, gradients and Adam's two moments)",
                                     "but only 100.00 kB of memory is available", "LoRA"])
    assert not out.exists()
    code, printed, out = _train(str(dirs.tb), tmp_path, monkeypatch, capsys, optim={"steps": 2, "lr": 0.01, "optimizer": "sgd"})
    assert code == 0, printed  # SGD keeps no moments: 62.98 kB fits
    monkeypatch.setenv(modeldir.MEMORY_ENV, "30000")
    argv, out = _other("sample", dirs.tb, dirs, tmp_path)
    frozen = one_line(*tiltlm(argv, monkeypatch, capsys), ["needs at least 31.49 kB (7,872 parameters × 4 bytes) but only 30.00 kB"])
    assert not out.exists()
    print(line, frozen, sep="\n")


def test_available_memory_is_meminfo_capped_by_the_cgroup(monkeypatch):
    monkeypatch.delenv(modeldir.MEMORY_ENV, raising=False)
    measured = modeldir.available_memory()
    assert measured is None or measured > 0
    monkeypatch.setattr(modeldir, "_cgroup_available", lambda: 12_345)
    assert modeldir.available_memory() == 12_345  # a container's limit below the host's free memory wins
    monkeypatch.setenv(modeldir.MEMORY_ENV, "777")
    assert modeldir.available_memory() == 777
    monkeypatch.setenv(modeldir.MEMORY_ENV, "lots")
    with pytest.raises(TiltlmError, match="is not a number of bytes"):
        modeldir.available_memory()


def test_loading_info_is_never_accepted_silently(tmp_path):
    modeldir.check_loading_info(tmp_path, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []})
    with pytest.raises(TiltlmError) as info:
        modeldir.check_loading_info(tmp_path, {"missing_keys": {"lm_head.weight", "a", "b"}, "unexpected_keys": {"v_head.weight"}})
    message = str(info.value)
    assert "missing (randomly initialised): a, b and 1 more" in message and "unused: v_head.weight" in message
    assert "\n" not in message and message.endswith("restore the config.json saved with these weights")


def test_sound_directories_load(dirs, tmp_path):
    """Tied Llama (no lm_head.weight in the file), sharded weights, the embedded default, and GPT-2 weights saved
    the way the Hub's gpt2 is (no 'transformer.' prefix, old attn.bias buffers) all pass and load."""
    from tiltlm.policies import HFPolicy, load_model_and_tokenizer

    assert "lm_head.weight" not in modeldir.read_weights(dirs.llama).shapes
    hub_style = _copy(dirs.tb, tmp_path / "hub_style")
    tensors = load_file(hub_style / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(renamed | {"lm_head.weight": tensors["lm_head.weight"]}, hub_style / "model.safetensors", metadata={"format": "pt"})
    sharded = _sharded(dirs.tb, tmp_path / "sharded")
    reference = HFPolicy.from_pretrained(dirs.tb, max_new_tokens=3).sample([""], 4, seed=0)
    for path in (dirs.llama, sharded, hub_style, "default"):
        model, tokenizer = load_model_and_tokenizer(path)
        assert model.get_output_embeddings().weight.shape[0] >= len(tokenizer)
        if path in (sharded, hub_style):  # the same weights as the testbed, so the same samples
            assert torch.equal(HFPolicy(model, tokenizer, max_new_tokens=3).sample([""], 4, seed=0).ids, reference.ids)
    llama, _ = load_model_and_tokenizer(dirs.llama)
    assert llama.get_input_embeddings().weight is llama.get_output_embeddings().weight


def test_a_padded_vocabulary_is_fine(dirs, tmp_path):
    """GPT-2 / SmolLM2 pad their embedding matrix beyond len(tokenizer): more rows than tokens loads."""
    from tiltlm.policies import HFPolicy
    from tiltlm.testbed import make_testbed

    padded = make_testbed(tmp_path / "padded", vocab_size=8, n_layer=1, n_embd=16, seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(padded, use_safetensors=True)
    model.resize_token_embeddings(16)
    model.save_pretrained(padded)
    policy = HFPolicy.from_pretrained(padded, max_new_tokens=2)
    assert policy.vocab_size == 16 and len(policy.tokenizer) == 8
