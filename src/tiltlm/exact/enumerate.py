"""Enumerate the whole sample space of a small-vocabulary policy, batched by depth.

The space after one context: every prefix of non-EOS tokens of depth d < L followed by EOS, plus
every prefix of depth L (ended by the length limit). With n = V - 1 non-EOS tokens that is
sum_{d=0}^{L} n^d sequences. One batched ``next_token_logprobs`` call per depth scores all prefixes
of that depth (n^d rows), so the cost is dominated by the n^(L-1) prefixes of the last level, and
the n^L sequences of the final level need no forward pass at all. A policy that offers
``prefix_tree_logprobs`` (HFPolicy) shares prefixes: each depth feeds one token on top of the
parent prefixes' KV cache instead of re-encoding every prefix from its first token.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Policy, Samples, device_memory

DEFAULT_MAX_SEQUENCES = 2_000_000


def count_sequences(vocab_size: int, max_new_tokens: int, at_most: int | None = None) -> int:
    """sum_{d=0}^{L} (V-1)^d = ((V-1)^(L+1) - 1) / (V-2): the size of the sample space.

    With ``at_most`` any count above it is answered ``at_most + 1`` from logarithms, without forming
    (V-1)^(L+1): a length of 10^12 is answered at once, not by a sum of 10^12 terms."""
    n, length = vocab_size - 1, int(max_new_tokens)
    if n <= 1:
        total = length + 1 if n == 1 else 1
    elif at_most is not None and length * math.log2(n) > math.log2(max(at_most, 1)) + 1:
        return at_most + 1  # (V-1)^L alone is already more than at_most
    else:
        total = (n ** (length + 1) - 1) // (n - 1)
    return total if at_most is None else min(total, at_most + 1)


def _about(vocab_size: int, max_new_tokens: int) -> str:
    """The size of a sample space in words, exact when it is small, as a power of ten when it is not."""
    total = count_sequences(vocab_size, max_new_tokens, at_most=10**15)
    if total <= 10**15 or vocab_size <= 2:
        return f"{total:,}"
    return f"about 10^{max_new_tokens * math.log10(vocab_size - 1):,.0f}"


@dataclass
class SequenceSpace:
    """Every sequence after ``context``, in a fixed order, with its log-prob under the enumerating policy."""

    context: str
    max_new_tokens: int
    samples: Samples  # all N sequences; samples.token_logp is under the enumerating policy
    vocab_size: int
    eos_id: int

    @property
    def logp(self) -> torch.Tensor:
        """(N,) float64 log pi(x) of the enumerating policy."""
        return self.samples.token_logp.double().sum(-1)

    def __len__(self) -> int:
        return len(self.samples)

    def log_prob(self, policy: Policy) -> torch.Tensor:
        """(N,) float64 log-probs of every sequence of this space under another policy (same vocabulary)."""
        if policy.vocab_size != self.vocab_size or policy.eos_id != self.eos_id:
            raise TiltlmError(
                f"policy vocabulary ({policy.vocab_size} tokens, EOS {policy.eos_id}) differs from the enumerated space's "
                f"({self.vocab_size}, EOS {self.eos_id}); compare policies that share a tokenizer"
            )
        token_logp, _ = _walk(policy, self.context, self.max_new_tokens, need_ids=False)
        return token_logp.double().sum(-1)


def enumerate_space(
    policy: Policy,
    *,
    context: str = "",
    max_new_tokens: int | None = None,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
) -> SequenceSpace:
    """All sequences of ``policy`` after ``context`` with exact log-probs; sum_x pi(x) = 1."""
    length = int(max_new_tokens if max_new_tokens is not None else policy.max_new_tokens)
    if length < 1:
        raise TiltlmError(f"max_new_tokens must be >= 1 to enumerate (got {length})")
    total = count_sequences(policy.vocab_size, length, at_most=max_sequences)
    if total > max_sequences:
        raise TiltlmError(
            f"a vocabulary of {policy.vocab_size} tokens over {length:,} new tokens has {_about(policy.vocab_size, length)} sequences, "
            f"over the limit of {max_sequences:.3g}; lower --max-new-tokens or use a small-vocabulary model (`tiltlm testbed`)"
        )
    need, have = total * (length * 13 + 16), device_memory(torch.device("cpu"))  # ids, log-probs and mask per token
    if have is not None and need > have:
        raise TiltlmError(
            f"the {total:,} sequences of up to {length:,} tokens need at least {need / 2**30:,.1f} GiB, more than the "
            f"{have / 2**30:,.1f} GiB of memory; lower --max-new-tokens (or the limit on sequences)"
        )
    token_logp, ids = _walk(policy, context, length, need_ids=True)
    pad = getattr(policy, "pad_id", policy.eos_id)
    mask = ids >= 0
    ids = torch.where(mask, ids, torch.full_like(ids, pad))
    # the texts' token rows (EOS dropped) in the walk's order, built without reading ids back: for each
    # depth d the n^d prefixes in lexicographic order, which is itertools.product's order
    free = [i for i in range(policy.vocab_size) if i != policy.eos_id]
    rows = [row for d in range(length + 1) for row in itertools.product(free, repeat=d)]
    b = ids.shape[0]
    samples = Samples(
        contexts=[context], group=torch.zeros(b, dtype=torch.long),
        context_ids=torch.zeros((b, 0), dtype=torch.long), context_attn=torch.zeros((b, 0), dtype=torch.bool),
        ids=ids, attn=mask.clone(), mask=mask, token_logp=token_logp,
        texts=policy.decode(rows), eos=((ids == policy.eos_id) & mask).any(-1),
    )
    _attach_context(samples, policy, context)
    return SequenceSpace(context=context, max_new_tokens=length, samples=samples, vocab_size=policy.vocab_size, eos_id=policy.eos_id)


def _attach_context(samples: Samples, policy: Policy, context: str) -> None:
    """Give the enumerated samples the policy's context tokens, so ``policy.log_prob`` can re-score them."""
    encode = getattr(policy, "encode_context", None)
    if encode is None:
        return
    ctx = torch.tensor(encode(context), dtype=torch.long)
    samples.context_ids = ctx.expand(len(samples), -1)
    samples.context_attn = torch.ones(samples.context_ids.shape, dtype=torch.bool)


def _walk(policy: Policy, context: str, length: int, *, need_ids: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs (N, L) of every sequence in the canonical order, and their ids (-1 = padding).

    Order: for d = 0..L-1 the n^d sequences prefix_d + EOS (prefixes in lexicographic order of the
    non-EOS token ids), then the n^L sequences of length L.
    """
    eos = policy.eos_id
    free = torch.tensor([i for i in range(policy.vocab_size) if i != eos], dtype=torch.long)  # (n,)
    n = free.shape[0]
    prefixes = torch.zeros((1, 0), dtype=torch.long)  # (M, d)
    prefix_tok_lp = torch.zeros((1, 0))  # (M, d)
    out_lp, out_ids = [], []

    def emit(tok_lp: torch.Tensor, ids: torch.Tensor | None) -> None:
        m, d = tok_lp.shape
        padded = torch.zeros((m, length))
        padded[:, :d] = tok_lp
        out_lp.append(padded)
        if need_ids:
            padded_ids = torch.full((m, length), -1, dtype=torch.long)
            padded_ids[:, :d] = ids
            out_ids.append(padded_ids)

    tree = getattr(policy, "prefix_tree_logprobs", None)
    levels = tree(context, length, free) if tree is not None else None  # None: no prefix sharing for this policy
    for d in range(length):
        lp = (next(levels) if levels is not None else policy.next_token_logprobs(context, prefixes)).float()  # (M, V)
        m = prefix_tok_lp.shape[0]
        ended_ids = torch.cat([prefixes, torch.full((m, 1), eos, dtype=torch.long)], dim=1) if need_ids else None
        emit(torch.cat([prefix_tok_lp, lp[:, eos : eos + 1]], dim=1), ended_ids)
        if need_ids or levels is None:
            prefixes = torch.cat([prefixes.repeat_interleave(n, 0), free.repeat(m)[:, None]], dim=1)
        prefix_tok_lp = torch.cat([prefix_tok_lp.repeat_interleave(n, 0), lp[:, free].reshape(-1, 1)], dim=1)
    emit(prefix_tok_lp, prefixes)
    return torch.cat(out_lp), (torch.cat(out_ids) if need_ids else None)
