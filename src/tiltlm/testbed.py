"""Small-vocabulary GPT-2 models whose whole sample space can be enumerated (`tiltlm testbed`).

A testbed is a real ``transformers`` GPT2LMHeadModel plus a character-level tokenizer (one token
per letter, ``<eos>`` as BOS/EOS/PAD), saved with ``save_pretrained``: every tool that takes an HF
model directory takes it, and `tiltlm exact` can enumerate it. ``train_steps > 0`` fits it to a
seeded random Markov chain over the letters so that its distribution has structure (peaks, long and
short sequences) instead of the near-uniform output of a random initialisation.

``arch="llama"`` builds the architecture of today's small real models instead (e.g. SmolLM2): a
LlamaForCausalLM with tied input/output embeddings and grouped-query attention (``n_kv_head`` < ``n_head``),
and a ChatML tokenizer like SmolLM2's: ``<|im_start|>`` is BOS, ``<|im_end|>`` is EOS and PAD, and a
chat template writes ``<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`` (``user``,
``assistant`` and ``\n`` are single tokens), so the vocabulary stays small enough to enumerate.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Callable

import torch

from tiltlm.errors import TiltlmError

EOS = "<eos>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = [IM_END, IM_START, "user", "assistant", "\n"]  # ids 0..4 of the llama testbed: EOS/PAD, BOS, roles, newline
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(letters: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, **{ch: i + 1 for i, ch in enumerate(letters)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def make_chat_tokenizer(letters: list[str], *, chat_template: bool = True):
    """Character-level tokenizer with ChatML tokens (CHAT_TOKENS first, then ``letters``) and, with
    ``chat_template``, SmolLM2-style ChatML chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(CHAT_TOKENS + letters)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(IM_START, special=True, normalized=False), AddedToken(IM_END, special=True, normalized=False)])
    tok.add_tokens([AddedToken(word, normalized=False) for word in ("user", "assistant")])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=IM_START, eos_token=IM_END, pad_token=IM_END)
    if chat_template:
        out.chat_template = CHATML_TEMPLATE
    return out


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
    init_std: float | None = None,
    arch: str = "gpt2",
    n_kv_head: int | None = None,
    chat_template: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Create and save a testbed model with ``vocab_size`` tokens (special tokens included); returns its directory.

    ``out_dir`` is written whole and then moved into place. When it already holds a testbed with the same
    parameters (its testbed.json) it is left as it is; another testbed is replaced only with ``overwrite``,
    and a non-empty directory that is not a testbed never (tiltlm.reuse.model_dir). ``log`` is told which happened.

    ``arch``: "gpt2" (EOS = BOS = PAD, then ``vocab_size - 1`` letters) or "llama" (tied embeddings,
    ``n_kv_head`` key/value heads, default ``n_head // 2``; the 5 ChatML tokens, then ``vocab_size - 5``
    letters, and the ChatML chat template unless ``chat_template`` is False). ``init_std`` (the weights'
    init scale) defaults to 0.5 for gpt2 and 0.1 for llama, whose unnormalised 2·n_embd-wide MLP and tied
    head make a 0.5-scale net so sensitive that one Adam step of 1e-3 can move KL(p*||pi) by 1 nat.
    """
    if arch not in ("gpt2", "llama"):
        raise TiltlmError(f"testbed arch must be 'gpt2' or 'llama', got {arch!r}")
    if n_embd % n_head:
        raise TiltlmError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    from tiltlm.quiet import quiet_transformers

    from tiltlm.reuse import model_dir

    init_std = (0.5 if arch == "gpt2" else 0.1) if init_std is None else init_std
    if arch == "llama":
        n_kv_head = max(1, n_head // 2) if n_kv_head is None else n_kv_head
    out = Path(out_dir)
    if model_dir(out, "testbed.json", testbed_parameters(arch, vocab_size, n_layer, n_embd, n_head, n_positions, seed, train_steps,
                                                         init_std, n_kv_head, chat_template), overwrite=overwrite, what="testbed"):
        (log or (lambda _: None))(f"{out} already holds this testbed (the same parameters in its testbed.json); left as it was")
        return out
    with quiet_transformers():  # no progress bars or advisory warnings while fitting and saving
        _make_testbed(out.absolute(), vocab_size, n_layer, n_embd, n_head, n_positions, seed, train_steps, init_std, arch, n_kv_head,
                      chat_template, overwrite)
    (log or (lambda _: None))(f"testbed model written to {out}")
    return out


def testbed_parameters(arch, vocab_size, n_layer, n_embd, n_head, n_positions, seed, train_steps, init_std, n_kv_head,
                       chat_template) -> dict:
    """What testbed.json records of the parameters (all that decide the model)."""
    info = {"arch": arch, "vocab_size": vocab_size, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": n_positions,
            "seed": seed, "train_steps": train_steps, "init_std": init_std}
    if arch == "llama":
        info.update(n_kv_head=n_kv_head, chat_template=chat_template, tied_embeddings=True)
    return info


def _make_testbed(out, vocab_size, n_layer, n_embd, n_head, n_positions, seed, train_steps, init_std, arch, n_kv_head,
                  chat_template, overwrite) -> Path:
    import os
    import shutil

    from tiltlm.reuse import publish

    build = _gpt2_parts if arch == "gpt2" else _llama_parts
    model_class, config, tokenizer, letter_ids, prefixes, n_kv_head = build(vocab_size, n_layer, n_embd, n_head, n_positions, init_std,
                                                                            n_kv_head, chat_template)
    torch_state = torch.random.get_rng_state()
    try:  # transformers initialises from the global RNG: seed it for this call only
        torch.manual_seed(seed)
        model = model_class(config)
    finally:
        torch.random.set_rng_state(torch_state)
    info = testbed_parameters(arch, vocab_size, n_layer, n_embd, n_head, n_positions, seed, train_steps, init_std, n_kv_head,
                              chat_template)
    if train_steps > 0:
        info["final_loss"] = _fit_markov(model, letter_ids, prefixes, int(config.eos_token_id), n_positions, seed, train_steps)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "testbed.json").write_text(json.dumps(info, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, out, overwrite=overwrite, what="testbed")


def _gpt2_parts(vocab_size, n_layer, n_embd, n_head, n_positions, init_std, n_kv_head, chat_template):
    """(model class, config, tokenizer, letter ids, prefixes the chain is fitted after, kv heads) of a GPT-2 testbed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not 2 <= vocab_size <= 27:
        raise TiltlmError(f"testbed vocab_size must be between 2 and 27 (EOS + up to 26 letters), got {vocab_size}")
    letters = list(string.ascii_lowercase[: vocab_size - 1])
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=init_std,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
    )
    return GPT2LMHeadModel, config, make_tokenizer(letters), list(range(1, vocab_size)), [[0]], None


def _llama_parts(vocab_size, n_layer, n_embd, n_head, n_positions, init_std, n_kv_head, chat_template):
    """The same for a Llama testbed: tied embeddings, grouped-query attention, a ChatML tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    first = len(CHAT_TOKENS)
    if not first + 1 <= vocab_size <= first + 26:
        raise TiltlmError(f"llama testbed vocab_size must be between {first + 1} and {first + 26} "
                          f"({first} ChatML tokens + up to 26 letters), got {vocab_size}")
    n_kv_head = max(1, n_head // 2) if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise TiltlmError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
    letters = list(string.ascii_lowercase[: vocab_size - first])
    tokenizer = make_chat_tokenizer(letters, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=2 * n_embd, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=n_positions,
        bos_token_id=1, eos_token_id=0, pad_token_id=0, initializer_range=init_std, tie_word_embeddings=True,
    )
    # the Markov chain is fitted after BOS and after the chat prompt of the empty context
    chat_prefix = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False,
                                                 chat_template=CHATML_TEMPLATE)
    prefixes = [[1], list(tokenizer(chat_prefix, add_special_tokens=False)["input_ids"])]
    return LlamaForCausalLM, config, tokenizer, list(range(first, vocab_size)), prefixes, n_kv_head


def _fit_markov(model, letter_ids: list[int], prefixes: list[list[int]], eos: int, n_positions: int, seed: int, steps: int) -> float:
    """Fit the chain's sequences (letters, then EOS) after each of ``prefixes`` in turn (the context, never a target)."""
    longest = max(map(len, prefixes))
    chain = markov_corpus(len(letter_ids), 2048, min(12, n_positions - longest - 1), seed + 1)
    rows = [(prefixes[i % len(prefixes)], [letter_ids[t - 1] for t in r[1:-1]] + [eos]) for i, r in enumerate(chain)]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
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
