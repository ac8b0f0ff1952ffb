"""Fit a Bradley–Terry reward model on preference pairs (`tiltlm reward-model train`; docs/math.md §15).

    model, tokenizer, metrics = fit_reward_model(parse_rm_config({"data": {"path": "prefs.jsonl"}}))

The loss of a batch of pairs (x, y_w ≻ y_l) is the BT negative log-likelihood −log σ(r(x, y_w) − r(x, y_l)), minimised
by AdamW with a linearly decaying learning rate. It runs on this small loop, not on TRL's RewardTrainer: TRL is not a
dependency of tiltlm (only of a benchmark), and the loop must read each pair exactly as ``rm:DIR`` will score it —
the same strings (``RewardModelScorer.texts``: prompt + completion, or the chat template's turns), the same
tokenizer call, the score at the last real token whatever the padding (``sequence_scores``) — so the accuracy
measured here is that of the reward the saved directory gives.

The held-out accuracy is the fraction of held-out pairs with r(x, y_w) > r(x, y_l) (a tie counts as wrong), with its
Wilson 95% interval; it is measured before training too (``eval/accuracy_start``), the untrained model's control.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tiltlm.errors import TiltlmError
from tiltlm.metrics.proportions import wilson
from tiltlm.rewards.reward_model import BATCH_SIZE, RewardModelScorer, pad_rows, sequence_scores
from tiltlm.rmtrain.config import RewardModelConfig
from tiltlm.rmtrain.model import add_lora, load_base, scoring_model


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −log σ(r_w − r_l), (B,) each -> scalar. Its gradient in r_w is −σ(r_l − r_w) (and the
    opposite in r_l): a pair the model already orders with a wide margin pushes little."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class PairEncoder(RewardModelScorer):
    """The strings and token ids ``rm:DIR`` reads (RewardModelScorer's), for a tokenizer not yet saved as a reward model."""

    def __init__(self, name: str):  # no directory to validate yet: the reward model is being made
        self.path, self.normalize, self.batch_size = Path(name), False, BATCH_SIZE

    def pairs(self, data, tokenizer, max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
        """(token ids of (chosen, rejected) per pair no longer than max_length, pairs left out for their length)."""
        prompts = [p.prompt for p in data.pairs]
        strings = self.texts([p.chosen for p in data.pairs] + [p.rejected for p in data.pairs], prompts + prompts, tokenizer)
        n = len(data.pairs)
        ids = self.encode(strings, tokenizer, None, who=f"the base '{self.path}'",  # rm:DIR's ids: an empty text read at BOS
                          row_name=lambda k: f"{data.source} {data.numbered_as} {data.pairs[k % n].row}: prompt + "
                                             f"{'chosen' if k < n else 'rejected'}")
        kept = [(ids[k], ids[k + n]) for k in range(n) if max(len(ids[k]), len(ids[k + n])) <= max_length]
        return kept, n - len(kept)


def pair_scores(model, batch: list[tuple[list[int], list[int]]], side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), (b,) each, float32 with grad when enabled: both halves padded as one batch."""
    ids, attn = pad_rows([c for c, _ in batch] + [r for _, r in batch], side, pad_id)
    scores = sequence_scores(model, ids, attn).float()  # (2b,)
    return scores[:len(batch)], scores[len(batch):]


@torch.no_grad()
def accuracy(model, pairs, side: str, pad_id: int, batch_size: int = 32) -> tuple[int, int]:
    """(held-out pairs with r_w > r_l, pairs)."""
    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(pairs), batch_size):
        r_w, r_l = pair_scores(model, pairs[i:i + batch_size], side, pad_id)
        right += int((r_w > r_l).sum())
    model.train(was_training)
    return right, len(pairs)


def _window(model) -> int | None:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def prepare(config: RewardModelConfig):
    """(model to train, tokenizer, train pairs' ids, held-out pairs' ids, pairs left out for their length)."""
    from tiltlm.preference_data import load_preferences

    d = config.data
    data = load_preferences(d.path, prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                            rejected_column=d.rejected_column, format=d.format, split=d.split)
    train, held = data.split(seed=config.seed, **d.held_out)
    model, tokenizer = load_base(config.base, seed=config.seed)
    limit = min(config.max_length, _window(model) or config.max_length)
    encoder = PairEncoder(config.base)
    train_ids, dropped = encoder.pairs(train, tokenizer, limit)
    held_ids, held_dropped = encoder.pairs(held, tokenizer, limit)
    if not train_ids or not held_ids:
        raise TiltlmError(f"every {'training' if not train_ids else 'held-out'} pair of {data.source} is longer than "
                          f"{limit} tokens; raise max_length (up to the model's window) or shorten the texts")
    if config.lora is not None:
        model = add_lora(model, config.lora, seed=config.seed)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer, train_ids, held_ids, dropped + held_dropped


def fit_reward_model(config: RewardModelConfig, *, log: Callable[[str], None] | None = None):
    """(trained model — a peft model with LoRA —, tokenizer, metrics): the loop of the module docstring."""
    log = log or (lambda _: None)
    start = time.perf_counter()
    model, tokenizer, train_ids, held_ids, dropped = prepare(config)
    net, side, pad = scoring_model(model), tokenizer.padding_side, int(tokenizer.pad_token_id)
    start_right, n_held = accuracy(net, held_ids, side, pad)
    steps = config.total_steps(len(train_ids))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(int(config.seed))
    order: list[int] = []
    model.train()
    losses = []
    for step in range(steps):
        if len(order) < config.batch_size:  # the next epoch's shuffled order after what is left of this one
            order += torch.randperm(len(train_ids), generator=g).tolist()
        batch, order = [train_ids[i] for i in order[:config.batch_size]], order[config.batch_size:]
        for group in opt.param_groups:
            group["lr"] = config.lr * (1 - step / steps)
        loss = bt_loss(*pair_scores(net, batch, side, pad))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise TiltlmError(f"the BT loss became {losses[-1]} at step {step}; lower lr")
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    model.eval()
    right, _ = accuracy(net, held_ids, side, pad)
    train_right, n_train = accuracy(net, train_ids, side, pad)
    low, high = wilson(right, n_held)
    metrics = {"eval/accuracy": right / n_held, "eval/accuracy_low": low, "eval/accuracy_high": high, "eval/correct": right,
               "eval/pairs": n_held, "eval/accuracy_start": start_right / n_held, "train/accuracy": train_right / n_train,
               "train/pairs": n_train, "train/loss_last": sum(losses[-10:]) / len(losses[-10:]), "steps": steps,
               "pairs_too_long": dropped, "seconds": time.perf_counter() - start}
    return model, tokenizer, metrics
