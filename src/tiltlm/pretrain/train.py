"""Pretrain tiltlm's default prior: a small GPT-2 on the story grammar, from scratch, on a CPU.

The whole recipe, top to bottom:

1. generate ``n_stories`` training stories and a few held-out ones (`tiltlm.pretrain.corpus`), and
   ``n_quiz`` quiz documents ``"Q: <question> A: <answer>"`` over the quiz's train questions
   (`tiltlm.quiz.corpus`, noisy answers), shuffled in among the stories (seeded);
2. train a byte-level BPE tokenizer on the training documents, with ``<|endoftext|>`` as its only
   special token, used as BOS, EOS and PAD (the GPT-2 convention);
3. format every document as ``<|endoftext|> text <|endoftext|>`` (BOS, text, EOS) and pack whole
   documents greedily into blocks of ``block_size`` tokens, so every block starts with a BOS at
   position 0 (as sampling from the prior does) and the model learns to end a document with EOS;
   the tail of a block is padding, masked out of the loss. The first token of a quiz document
   (the ``Q`` after its BOS) is masked out of the loss too: the model sees quizzes (so it answers
   ``BOS Q: … A:`` prompts) but is never trained to *start* one, so sampling from BOS alone still
   writes stories (the output at position 0 sees only the BOS and is trained on story openings only);
4. train a `transformers.GPT2LMHeadModel` with AdamW and a linear-warmup + cosine schedule;
5. save model and tokenizer with ``save_pretrained`` plus ``training.json`` (config, losses, time).

The tokenizer adds no special tokens by itself: callers prepend BOS to contexts, as tiltlm's
policies do. All torch randomness runs inside `torch.random.fork_rng`, so `pretrain` leaves the
global RNG as it found it; it does not touch `torch.set_num_threads` (scripts do that).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tiltlm.pretrain.corpus import generate_stories
from tiltlm.reuse import model_dir, publish

__all__ = ["ModelShape", "OptimConfig", "pretrain", "ENDOFTEXT"]

ENDOFTEXT = "<|endoftext|>"
"""The one special token: BOS, EOS and PAD."""


@dataclass(frozen=True)
class ModelShape:
    """Size of the GPT-2 and its tokenizer."""

    vocab_size: int = 1536
    """Target BPE vocabulary, special token and 256 byte symbols included."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 256
    """Model width (d_model); must be divisible by `n_head`."""
    n_head: int = 4
    """Attention heads."""
    n_positions: int = 256
    """Longest sequence the model can see (context plus generated tokens)."""


@dataclass(frozen=True)
class OptimConfig:
    """How the model is trained."""

    batch_size: int = 16
    """Blocks per optimiser step."""
    block_size: int = 256
    """Tokens per block; at most `ModelShape.n_positions`."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine decays to `lr * min_lr_ratio` at the last step."""
    warmup_steps: int = 30
    """Linear warmup from 0 to `lr` (capped at a tenth of the run for short runs)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices only (not biases, LayerNorms)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW moment decays."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    bf16_autocast: bool = True
    """Run forward/backward under CPU bfloat16 autocast (weights and optimiser stay fp32).

    About 2x faster on CPUs with AVX512-BF16 or AMX; turn it off on CPUs without them."""
    heldout_stories: int = 500
    """Stories kept out of training to measure held-out loss (at most 5% of `n_stories`)."""
    log_every: int = 25
    """Print the running train loss every this many steps (0: never)."""


@dataclass
class _Blocks:
    """Packed training blocks: ids (N, L), loss labels (N, L) with -100 on padding, mask (N, L)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    n_tokens: int = field(default=0)


def train_tokenizer(
    stories: list[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style, no prefix space) with ``<|endoftext|>`` as BOS/EOS/PAD."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stories, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=max_length,
    )


def pack_stories(
    stories: list[str], tokenizer: PreTrainedTokenizerFast, block_size: int,
    mask_first: list[bool] | None = None,
) -> _Blocks:
    """Encode each document as BOS + text + EOS and pack whole documents greedily into blocks.

    A document never spans two blocks (one longer than a block is truncated), so every block starts
    with BOS at position 0. Padding uses the PAD id (== EOS id), hence labels are masked by
    position, not by id: the real EOS that ends a story stays a training target. Where
    ``mask_first[i]`` is true, the first text token of document i (the one after its BOS) is left
    out of the loss as well (quiz documents: the model is never trained to start one).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = tokenizer(stories, add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = []
    masked: list[list[int]] = []  # per row: positions whose label is dropped
    current: list[int] = []
    current_masked: list[int] = []
    for i, ids in enumerate(encoded):
        seq = ([bos] + ids + [eos])[:block_size]
        if len(current) + len(seq) > block_size:
            rows.append(current)
            masked.append(current_masked)
            current, current_masked = [], []
        if mask_first is not None and mask_first[i] and len(seq) > 1:
            current_masked.append(len(current) + 1)
        current = current + seq
    if current:
        rows.append(current)
        masked.append(current_masked)
    input_ids = torch.full((len(rows), block_size), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), block_size), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for i, positions in enumerate(masked):
        labels[i, positions] = -100
    return _Blocks(input_ids, labels, attention_mask, int(attention_mask.sum()))


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


@torch.no_grad()
def _mean_loss(model: GPT2LMHeadModel, blocks: _Blocks, batch_size: int) -> float:
    """Token-weighted mean next-token loss (nats) over all blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks.input_ids), batch_size):
        ids, labels = blocks.input_ids[i:i + batch_size], blocks.labels[i:i + batch_size]
        out = model(input_ids=ids, attention_mask=blocks.attention_mask[i:i + batch_size],
                    labels=labels)
        n = int((labels[:, 1:] != -100).sum())  # targets after the internal shift
        total += float(out.loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def pretrain(
    out_dir: Path,
    *,
    n_stories: int,
    steps: int,
    seed: int = 0,
    n_quiz: int = 0,
    model_shape: ModelShape = ModelShape(),
    optim: OptimConfig = OptimConfig(),
    log: Callable[[str], None] | None = print,
    overwrite: bool = False,
) -> dict:
    """Train the default prior from scratch and save it to `out_dir`; return the training record.

    ``n_quiz`` quiz documents (`tiltlm.quiz.corpus` with the same seed) are mixed into the stories
    (module docstring, steps 1 and 3); 0 trains on stories alone, exactly as before they existed.

    The record (also written to ``out_dir/training.json``) holds the resolved configuration,
    step count, final train loss (mean of the last 10% of steps), held-out loss (on held-out
    stories; with a quiz also on held-out quiz documents), wall time, parameter count, corpus
    source and license.

    ``out_dir`` is written whole and then moved into place. When it already holds a model pretrained with the
    same parameters (its training.json) nothing is trained and that record is returned; a model with other
    parameters is replaced only with ``overwrite``, and a non-empty directory tiltlm did not write never
    (tiltlm.reuse.model_dir).
    """
    if optim.block_size > model_shape.n_positions:
        raise ValueError(f"block_size {optim.block_size} > n_positions {model_shape.n_positions}; "
                         "lower OptimConfig.block_size or raise ModelShape.n_positions")
    if steps < 1 or n_stories < 2 or n_quiz < 0:
        raise ValueError(f"need steps >= 1, n_stories >= 2 and n_quiz >= 0, got {steps}, {n_stories} and {n_quiz}")
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    final_dir = Path(out_dir)
    wanted = json.loads(json.dumps({"model_shape": asdict(model_shape), "optim": asdict(optim), "seed": seed, "n_stories": n_stories,
                                    "n_quiz": n_quiz, "steps": steps}))
    if model_dir(final_dir, "training.json", wanted, overwrite=overwrite, what="pretrained model"):
        say(f"{final_dir} already holds this model (the same parameters in its training.json); left as it was")
        return json.loads((final_dir / "training.json").read_text())
    final_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    out_dir = final_dir.absolute().with_name(f".{final_dir.absolute().name}.{os.getpid()}.tmp")
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        record = _pretrain(out_dir, n_stories, steps, seed, n_quiz, model_shape, optim, say, start)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    publish(out_dir, final_dir.absolute(), overwrite=overwrite, what="pretrained model")
    return record


def _pretrain(out_dir: Path, n_stories: int, steps: int, seed: int, n_quiz: int, model_shape: ModelShape, optim: OptimConfig,
              say: Callable[[str], None], start: float) -> dict:
    """pretrain's work, written into the directory ``out_dir``."""
    out_dir.mkdir(parents=True)

    n_heldout = max(1, min(optim.heldout_stories, n_stories // 20))
    tokenizer, train, heldout, quiz_heldout = _corpus(n_stories, n_heldout, n_quiz, seed, model_shape, optim)
    say(f"corpus: {n_stories} stories + {n_quiz} quiz documents -> {len(train.input_ids)} blocks, "
        f"{train.n_tokens} tokens; vocab {len(tokenizer)}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(_gpt2_config(model_shape, tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        n_params = sum(p.numel() for p in model.parameters())
        say(f"model: {n_params:,} parameters")
        losses, tokens_seen = _train_loop(model, train, steps, optim, seed, say)
    train_seconds = time.perf_counter() - start
    heldout_loss = _mean_loss(model, heldout, optim.batch_size)
    quiz_loss = _mean_loss(model, quiz_heldout, optim.batch_size) if quiz_heldout is not None else None
    tail = losses[-max(1, steps // 10):]
    final_train = sum(tail) / len(tail)
    say(f"done: train loss {final_train:.3f}, held-out loss {heldout_loss:.3f}, "
        f"{train_seconds:.0f} s")

    model.save_pretrained(out_dir)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(out_dir)
    record = {
        "model": "GPT2LMHeadModel",
        "model_shape": asdict(model_shape),
        "optim": asdict(optim),
        "seed": seed,
        "n_stories": n_stories,
        "n_heldout_stories": n_heldout,
        "n_quiz": n_quiz,
        "train_tokens": train.n_tokens,
        "tokens_seen": tokens_seen,
        "steps": steps,
        "final_train_loss": round(final_train, 4),
        "heldout_loss": round(heldout_loss, 4),
        **({"quiz_heldout_loss": round(quiz_loss, 4)} if quiz_loss is not None else {}),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "special_tokens": {"bos": ENDOFTEXT, "eos": ENDOFTEXT, "pad": ENDOFTEXT},
        "format": "<|endoftext|> story <|endoftext|>, whole stories packed into blocks" if not n_quiz else
                  "<|endoftext|> document <|endoftext|> (stories and 'Q: <question> A: <answer>' quiz documents, "
                  "shuffled), whole documents packed into blocks; the first token of a quiz document is not a target",
        "corpus_source": f"tiltlm story grammar, seed {seed}" if not n_quiz else
                         f"tiltlm story grammar, seed {seed}; tiltlm.quiz corpus (train questions), seed {seed}",
        "license": "MIT (model, tokenizer and corpus generated by the tiltlm project)",
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "tokenizers": _version("tokenizers")},
    }
    text = json.dumps(record, indent=2)
    (out_dir / "training.json").write_text(text + "\n")
    return json.loads(text)  # exactly what was saved (tuples become lists)


def _corpus(n_stories: int, n_heldout: int, n_quiz: int, seed: int, model_shape: ModelShape,
            optim: OptimConfig) -> tuple[PreTrainedTokenizerFast, _Blocks, _Blocks, _Blocks | None]:
    """(tokenizer, train blocks, held-out story blocks, held-out quiz blocks or None): the tokenizer
    is trained on the training documents only.

    Held-out quiz documents are drawn like the corpus but over the quiz's held-out questions; they
    measure the loss on question/answer combinations the model never saw."""
    stories = generate_stories(n_stories + n_heldout, seed)
    train_docs, heldout_stories = stories[:n_stories], stories[n_stories:]
    is_quiz = [False] * n_stories
    quiz_heldout = None
    if n_quiz:
        from tiltlm import quiz

        docs = [(s, False) for s in train_docs] + [(q, True) for q in quiz.corpus(n_quiz, seed)]
        random.Random(f"tiltlm pretrain mix {seed}").shuffle(docs)
        train_docs, is_quiz = [d for d, _ in docs], [q for _, q in docs]
    tokenizer = train_tokenizer(train_docs, model_shape.vocab_size, model_shape.n_positions)
    train = pack_stories(train_docs, tokenizer, optim.block_size, mask_first=is_quiz)
    heldout = pack_stories(heldout_stories, tokenizer, optim.block_size)
    if n_quiz:
        quiz_heldout = pack_stories(_heldout_quiz_docs(max(1, n_heldout), seed), tokenizer, optim.block_size,
                                    mask_first=[True] * max(1, n_heldout))
    return tokenizer, train, heldout, quiz_heldout


def _heldout_quiz_docs(n: int, seed: int) -> list[str]:
    """``n`` documents over the quiz's held-out questions, answered correctly (for a held-out loss)."""
    from tiltlm import quiz

    rng = random.Random(f"tiltlm pretrain quiz heldout {seed}")
    rows = quiz.questions("heldout", seed=seed)
    return [f"{row['prompt']} {quiz.sample_answer(row, rng)}" for row in (rng.choice(rows) for _ in range(n))]


def _gpt2_config(model_shape: ModelShape, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=model_shape.n_positions,
        n_embd=model_shape.n_embd, n_layer=model_shape.n_layer, n_head=model_shape.n_head,
        # The corpus is generated fresh and seen about once: no dropout needed.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )


def _train_loop(model: GPT2LMHeadModel, train: _Blocks, steps: int, optim: OptimConfig,
                seed: int, say: Callable[[str], None]) -> tuple[list[float], int]:
    """AdamW over shuffled batches of blocks (epoch-wise permutations).

    Returns the per-step losses and the number of (non-padding) tokens trained on.
    """
    generator = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, optim)
    warmup = min(optim.warmup_steps, max(1, steps // 10))
    n_blocks = len(train.input_ids)
    order = torch.randperm(n_blocks, generator=generator)
    cursor, losses, tokens_seen, tick = 0, [], 0, time.perf_counter()
    model.train()
    for step in range(steps):
        if cursor + optim.batch_size > n_blocks:
            order, cursor = torch.randperm(n_blocks, generator=generator), 0
        idx = order[cursor:cursor + optim.batch_size]  # (B,)
        cursor += optim.batch_size
        tokens_seen += int(train.attention_mask[idx].sum())
        for group in opt.param_groups:
            group["lr"] = optim.lr * _lr_factor(step, steps, warmup, optim.min_lr_ratio)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=optim.bf16_autocast):
            out = model(input_ids=train.input_ids[idx], attention_mask=train.attention_mask[idx],
                        labels=train.labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        losses.append(out.loss.item())
        if optim.log_every and ((step + 1) % optim.log_every == 0 or step + 1 == steps):
            window = losses[-optim.log_every:]
            rate = (time.perf_counter() - tick) / (step + 1)
            say(f"step {step + 1}/{steps}  loss {sum(window) / len(window):.3f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {rate:.2f} s/step")
    return losses, tokens_seen


def _version(package: str) -> str:
    """Installed version of `package` (for the training record)."""
    from importlib.metadata import version

    return version(package)
