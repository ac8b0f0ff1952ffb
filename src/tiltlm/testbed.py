"""Small-vocabulary GPT-2 models whose whole sample space can be enumerated (`tiltlm testbed`).

A testbed is a real ``transformers`` GPT2LMHeadModel plus a character-level tokenizer (one token
per letter, ``<eos>`` as BOS/EOS/PAD), saved with ``save_pretrained``: every tool that takes an HF
model directory takes it, and `tiltlm exact` can enumerate it. ``train_steps > 0`` fits it to a
seeded random Markov chain over the letters so that its distribution has structure (peaks, long and
short sequences) instead of the near-uniform output of a random initialisation.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from tiltlm.errors import TiltlmError

EOS = "<eos>"


def make_tokenizer(letters: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, **{ch: i + 1 for i, ch in enumerate(letters)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def markov_corpus(n_letters: int, n_sequences: int, max_len: int, seed: int) -> list[list[int]]:
    """Token-id sequences (BOS ... EOS) from a random Markov chain with a per-state stop probability."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.softmax(torch.randn(n_letters + 1, n_letters, generator=gen) * 2.0, -1)  # state 0 = start
    stop = torch.rand(n_letters + 1, generator=gen) * 0.5
    stop[0] = 0.1
    rows = []
    for _ in range(n_sequences):
        state, row = 0, [0]
        for _ in range(max_len):
            if torch.rand(1, generator=gen).item() < stop[state]:
                break
            state = int(torch.multinomial(transition[state], 1, generator=gen)) + 1
            row.append(state)
        rows.append(row + [0])
    return rows


def make_testbed(
    out_dir: str | Path,
    *,
    vocab_size: int = 8,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 64,
    seed: int = 0,
    train_steps: int = 0,
    init_std: float = 0.5,
) -> Path:
    """Create and save a testbed GPT-2 with ``vocab_size`` tokens (EOS included); returns its directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not 2 <= vocab_size <= 27:
        raise TiltlmError(f"testbed vocab_size must be between 2 and 27 (EOS + up to 26 letters), got {vocab_size}")
    if n_embd % n_head:
        raise TiltlmError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    letters = list(string.ascii_lowercase[: vocab_size - 1])
    tokenizer = make_tokenizer(letters)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=init_std,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
    )
    torch_state = torch.random.get_rng_state()
    try:  # GPT-2 initialises from the global RNG: seed it for this call only
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(torch_state)
    info = {"vocab_size": vocab_size, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "seed": seed,
            "train_steps": train_steps, "init_std": init_std}
    if train_steps > 0:
        info["final_loss"] = _fit_markov(model, vocab_size - 1, n_positions, seed, train_steps)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "testbed.json").write_text(json.dumps(info, indent=2))
    return out


def _fit_markov(model, n_letters: int, n_positions: int, seed: int, steps: int) -> float:
    rows = markov_corpus(n_letters, 2048, min(12, n_positions - 2), seed + 1)
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, 1 : len(r)] = torch.tensor(r[1:])  # BOS is context, never a target
    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.randint(0, len(rows), (64,), generator=gen)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())
