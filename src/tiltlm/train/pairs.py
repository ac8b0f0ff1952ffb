"""One step's batch of preference pairs for the offline preference algorithms (dpo, cdpo, ipo; tiltlm.algorithms.dpo).

Nothing is sampled: step t draws ``data.prompts_per_step`` pairs (null = every pair) of the training pairs by the
step's seed (tiltlm.train.collect.step_seed, so a resumed run draws the same ones) and lays them out as a Batch of
2K rows, ``[chosen_1, …, chosen_K, rejected_1, …, rejected_K]`` (``Batch.pairs = K``), each row the completion's
tokens after its prompt's context. ``logp_prior`` is log pi0 of each completion (pi0 = the run's prior = DPO's
reference); ``logq`` is the same (no policy drew these rows); ``beta`` is target.beta, the run's one beta, with or
without a target.reward. The loop then computes log pi_theta of every row with grad, as for any batch.

The sample space is the one of tiltlm.records: a completion of k tokens is those tokens then EOS when
k < max_new_tokens; a longer one is cut to its first max_new_tokens tokens, with no EOS factor (as TRL cuts
completions to max_completion_length).
"""

from __future__ import annotations

import torch

from tiltlm.data import PromptData
from tiltlm.errors import TiltlmError
from tiltlm.preference_data import PreferenceData, require_preferences
from tiltlm.records import Batch, Samples


def completion_ids(policy, text: str) -> list[int]:
    """The tokens of a completion's text: the HF tokenizer without special tokens, or a tabular policy's
    vocabulary matched greedily (longest token first)."""
    if hasattr(policy, "encode_text"):
        return policy.encode_text(text)
    vocab = [(tok, i) for i, tok in enumerate(policy.vocab) if i != policy.eos_id and tok]
    vocab.sort(key=lambda item: -len(item[0]))
    ids, at = [], 0
    while at < len(text):
        match = next(((tok, i) for tok, i in vocab if text.startswith(tok, at)), None)
        if match is None:
            raise TiltlmError(f"the completion {text[:40]!r} has {text[at]!r}, which is in no token of the policy's vocabulary "
                              f"{policy.vocab}; use only those tokens")
        ids.append(match[1])
        at += len(match[0])
    return ids


def pair_samples(policy, prompts: list[str], completions: list[str]) -> Samples:
    """Samples whose rows are ``completions[i]`` after ``prompts[i]`` (tokens, EOS, the length limit: module docstring)."""
    contexts = list(dict.fromkeys(prompts))
    group = torch.tensor([contexts.index(p) for p in prompts], dtype=torch.long)
    length, eos_id, pad_id = policy.max_new_tokens, policy.eos_id, getattr(policy, "pad_id", policy.eos_id)
    rows = []
    for text in completions:
        ids = completion_ids(policy, text)
        rows.append(ids + [eos_id] if len(ids) < length else ids[:length])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[k, : len(r)] = True
    if hasattr(policy, "contexts_tensor"):
        context_ids, context_attn = policy.contexts_tensor(contexts, group)
    else:  # tabular: the context is the table's row, no tokens
        context_ids, context_attn = torch.zeros((len(rows), 0), dtype=torch.long), torch.zeros((len(rows), 0), dtype=torch.bool)
    eos = torch.tensor([len(r) > 0 and r[-1] == eos_id for r in rows])
    return Samples(contexts=contexts, group=group, context_ids=context_ids, context_attn=context_attn, ids=ids, attn=mask.clone(),
                   mask=mask, token_logp=torch.zeros((len(rows), width)), texts=list(completions), eos=eos)


def pair_batch(pairs: PreferenceData, *, policy, target, beta: float) -> Batch:
    """The Batch of ``pairs`` (rows: chosen then rejected), scored by pi0 and by the target (its reward, 0 without one)."""
    prompts = [p.prompt for p in pairs] * 2
    samples = pair_samples(policy, prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    logp_prior = target.prior.log_prob(samples).detach().double().cpu()
    scores = target.score(samples, prior_logp=logp_prior)
    return Batch(samples=samples, logq=logp_prior, token_logq=samples.token_logp, logp_prior=scores.logp_prior,
                 log_target=scores.log_target, reward=scores.reward, beta=beta, pairs=len(pairs))


class PairCollector:
    """The batch of preference pairs of each step (module docstring); ``prompts`` are the training pairs' distinct
    prompts (the contexts of the run's exact metrics)."""

    def __init__(self, config, *, policy, target):
        d = config.data
        if d is None or d.path is None:
            raise TiltlmError(f"algorithm {config.algorithm.name} trains on preference pairs; give data: {{path: prefs.jsonl}} with "
                              "prompt/chosen/rejected columns (or use online-dpo, which draws its pairs from the policy)")
        data = require_preferences(d.path, algorithm=config.algorithm.name, prompt_column=d.prompt_column,
                                   chosen_column=d.chosen_column, rejected_column=d.rejected_column, format=d.format, split=d.split)
        self.train, self.held_out = data.split(d.eval_size, d.split_seed, eval_fraction=d.eval_fraction)
        self.config, self.policy, self.target = config, policy, target
        self.prompts = PromptData(self.train.prompts, source=data.source)

    def __call__(self, step: int) -> Batch:
        from tiltlm.train.collect import step_seed

        pairs = self.train.draw(self.config.data.prompts_per_step, step_seed(self.config, step))
        return pair_batch(pairs, policy=self.policy, target=self.target, beta=self.config.target.beta)
