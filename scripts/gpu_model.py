"""The GPU check's model: SmolLM2-135M's architecture with random weights, as a save_pretrained directory (no download).

SmolLM2-135M-Instruct's config (Llama: hidden 576, 30 layers, 9 heads, 3 key/value heads, intermediate 1536,
vocabulary 49,152, tied embeddings; the numbers of benchmarks/sampling.py's SMOLLM_CONFIG) with the weights drawn by
transformers' initialiser from a seed, and a tokenizer of the same vocabulary size made here (tiltlm.testbed's ChatML
character tokenizer): the ChatML tokens, one token per printable character (a prompt is encoded character by
character, through the SmolLM2-style chat template), then filler tokens ``<i>`` up to 49,152 (drawn by the random
model, decoded as text). Throughput depends on the shapes, not on the weights, and with random weights EOS is rarely
drawn: every row runs to max_new_tokens. Nothing is fetched: the weights of the real SmolLM2 cannot travel (its GGUF
alone is more than the 64 MiB a device call may carry).

``SIZES["stand-in"]``: the same construction at toy sizes, for the dry run and the CPU tests.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
               initializer_range=0.041666666666666664)
STAND_IN = dict(SMOLLM2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=160, max_position_embeddings=256)
SIZES = {"smollm2-135m-config": SMOLLM2, "stand-in": STAND_IN}
LETTERS = [c for c in string.printable if c not in "\n\r\x0b\x0c"]  # "\n" is one of tiltlm.testbed.CHAT_TOKENS
MARKER = "gpu_model.json"


def llama_config(name: str):
    """The LlamaConfig of ``SIZES[name]`` with the testbed tokenizer's special ids (EOS = PAD = <|im_end|> 0, BOS 1)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[name], bos_token_id=1, eos_token_id=0, pad_token_id=0)


def parameter_count(name: str) -> int:
    """Parameters of the model (tied head counted once), built on the meta device: no memory, no weights."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(name))
    return sum(p.numel() for p in model.parameters())


def tokenizer_of(vocab_size: int):
    """tiltlm.testbed's ChatML character tokenizer, padded with filler tokens to exactly ``vocab_size``."""
    from tiltlm.testbed import CHAT_TOKENS, make_chat_tokenizer

    base = len(CHAT_TOKENS) + len(LETTERS)
    if vocab_size < base:
        raise ValueError(f"vocab_size {vocab_size} < the {base} ChatML and character tokens")
    return make_chat_tokenizer(LETTERS + [f"<{i}>" for i in range(vocab_size - base)])


def write_model(out_dir: str | Path, name: str = "smollm2-135m-config", seed: int = 0) -> Path:
    """Write the random model ``name`` and its tokenizer into ``out_dir`` (kept when its MARKER already says the same)."""
    import torch
    from transformers import LlamaForCausalLM

    from tiltlm.quiet import quiet_transformers

    out = Path(out_dir)
    facts = {"name": name, "seed": seed, "config": SIZES[name]}
    if (out / MARKER).is_file():
        old = json.loads((out / MARKER).read_text())
        if old.get("config") == facts["config"] and old.get("seed") == seed:
            return out
    state = torch.random.get_rng_state()
    try:  # transformers initialises from the global RNG: seeded for this call only
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(name)).float()
    finally:
        torch.random.set_rng_state(state)
    tokenizer = tokenizer_of(SIZES[name]["vocab_size"])
    assert len(tokenizer) == model.config.vocab_size, (len(tokenizer), model.config.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():  # no progress bar
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    facts["parameters"] = sum(p.numel() for p in model.parameters())
    (out / MARKER).write_text(json.dumps(facts, indent=1))
    return out
