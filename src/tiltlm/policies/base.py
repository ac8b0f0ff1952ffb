"""The Policy protocol and what every backend shares: the sampling transform and the row samplers.

What a policy draws is a ``Samples`` record (tiltlm.records, where the sample space is defined).
"""

from __future__ import annotations

import math
import os
from typing import Protocol, runtime_checkable

import torch

from tiltlm.errors import TiltlmError
from tiltlm.records import Samples


@runtime_checkable
class Policy(Protocol):
    """What tiltlm needs of a language model (HF or tabular).

    ``sample`` draws n sequences per context; ``log_prob`` scores given sequences under this policy
    (same temperature/top-p transform as sampling, so importance ratios are exact);
    ``next_token_logprobs`` is the one-step distribution the exact enumerator walks.
    """

    vocab_size: int
    eos_id: int
    max_new_tokens: int

    def sample(self, contexts: list[str], n: int, *, seed: int | None = None) -> Samples: ...

    def log_prob(self, samples: Samples, *, grad: bool = False, per_token: bool = False) -> torch.Tensor: ...

    def next_token_logprobs(self, context: str, prefixes: torch.Tensor) -> torch.Tensor: ...

    def decode(self, ids: list[list[int]]) -> list[str]: ...


def transform_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the sampling distribution: softmax(logits / temperature) restricted to the nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (the most
    likely token is always kept); tokens outside get log-prob -inf and the rest are renormalised.
    Sampling and scoring both call this, so log pi is the log-prob of what was actually sampled.
    logits: (..., V) -> (..., V)
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


SAMPLERS = ("gumbel", "inverse-cdf")
"""How ``row_draw`` turns a batch's random stream into tokens (``sampling.sampler``): both draw token v with
probability p_v and record the same log-probs; they consume the generator differently, so a seed gives other
tokens under each. ``gumbel`` (the default) is the stream every number in the README was measured with."""


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise TiltlmError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    return sampler


def row_draw(generator: torch.Generator, n_rows: int, rows: range, sampler: str = "gumbel"):
    """A token sampler for rows ``rows`` of an ``n_rows`` batch that does not depend on the shard.

    Each call consumes the whole batch's share of the stream and returns the tokens of the rows asked for, so
    row i's token is the same whether the batch is drawn at once or split across data-parallel ranks.
    ``gumbel``: Exp(1) noise q, (n_rows, V), and argmax(p / q) (the Gumbel-max trick: P(token = v) = p_v); on
    CPU it is bit for bit ``torch.multinomial(p, 1, generator=generator)``, which uses the same trick.
    ``inverse-cdf``: one uniform u per row, (n_rows,), and the token whose CDF interval holds u (inverse_cdf):
    one random number per row instead of V, the same distribution (docs/math.md §17).
    logp: (len(rows), V) -> (len(rows),)
    """
    check_sampler(sampler)

    def gumbel(logp: torch.Tensor) -> torch.Tensor:
        q = torch.empty((n_rows, logp.shape[-1]), device=logp.device).exponential_(1, generator=generator)
        return (logp.exp() / q[rows.start : rows.stop]).argmax(-1)

    def inverse(logp: torch.Tensor) -> torch.Tensor:
        u = torch.rand(n_rows, dtype=torch.float64, device=logp.device, generator=generator)
        return inverse_cdf(logp, u[rows.start : rows.stop])

    return gumbel if sampler == "gumbel" else inverse


def inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row whose interval (F_{v-1}, F_v] of the CDF holds u·F_V, u ~ U[0, 1): P(v) = p_v.

    The CDF is accumulated in float64 over float32 probabilities, so every token's interval has the width of its
    probability to within V·2^-53 (5.5e-12 for V = 49,152; docs/math.md §17); a token of probability 0 (outside the
    nucleus) has an empty interval and is never drawn (u·F_V is kept above 0, the first token with F_v ≥ it is the answer).
    logp: (b, V), u: (b,) float64 -> (b,)
    """
    cdf = logp.exp().double().cumsum(-1)  # (b, V)
    v = (u * cdf[:, -1]).clamp(min=1e-300)[:, None]
    return torch.searchsorted(cdf, v).squeeze(-1).clamp(max=logp.shape[-1] - 1)


def seeded_draw(seeds: list[int]):
    """A token sampler where row k draws by inverse CDF with its own generator seeded ``seeds[k]``, so a
    row's draw does not depend on the other rows of the batch (multi-turn rollouts, tiltlm.envs).
    logp: (b, V) -> (b,)
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(logp: torch.Tensor) -> torch.Tensor:
        u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(logp.device)  # (b,)
        return inverse_cdf(logp.double(), u.double())

    return draw


def batch_rows(n_contexts: int, n: int, rows: range | None) -> tuple[torch.Tensor, range]:
    """(group of the rows drawn, the rows): the batch is n rows per context, grouped context by context;
    ``rows`` (a contiguous range, e.g. a data-parallel shard) selects part of it, None all of it."""
    group = torch.arange(n_contexts).repeat_interleave(n)
    rows = range(len(group)) if rows is None else rows
    if rows.step != 1 or not (0 <= rows.start < rows.stop <= len(group)):
        raise TiltlmError(f"rows {rows} is not a non-empty contiguous part of the {len(group)} rows of the batch")
    return group[rows.start : rows.stop], rows


MIN_TEMPERATURE = 1e-6
"""Smallest sampling temperature: float32 logits divided by much less overflow (1e-300 gave NaN log-probs)."""


def check_sampling_options(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):  # inf would sample uniformly, nan anything
        raise TiltlmError(f"temperature must be > 0 and finite (got {temperature}); use 1.0 to sample from the model as trained")
    if temperature < MIN_TEMPERATURE:
        raise TiltlmError(f"temperature must be > 0 and at least {MIN_TEMPERATURE:g} (got {temperature:g}): float32 logits divided "
                          f"by less overflow; use {MIN_TEMPERATURE:g} for near-greedy sampling")
    if not (0 < top_p <= 1):
        raise TiltlmError(f"top_p must be in (0, 1] (got {top_p}); use 1.0 to disable nucleus sampling")
    if int(max_new_tokens) < 1:
        raise TiltlmError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")


def check_batch_size(policy, rows: int, max_new_tokens: int, *, rows_name: str, tokens_name: str) -> None:
    """Refuse, before any work, a batch of ``rows`` samples of up to ``max_new_tokens`` tokens that cannot fit.

    The length must leave the context at least one position of the model's window (``policy.window``, when
    it has one). While a token is drawn each row holds at least two (V,) float32 rows (the logits and their
    log-softmax) and its (T,) ids, log-probs and mask (13 bytes a token): more than the device's whole memory
    is refused, naming the setting to lower (``rows_name``, ``tokens_name``). A lower bound, so nothing that
    fits is refused; what nearly fits meets the out-of-memory guard of the training loop instead.
    """
    window = getattr(policy, "window", None)
    if isinstance(window, int) and max_new_tokens >= window:
        raise TiltlmError(f"{tokens_name} {max_new_tokens:,} does not fit the model's window of {window} tokens (the context "
                          f"needs at least one); lower {tokens_name} below {window}")
    need = rows * (2 * 4 * policy.vocab_size + 13 * max_new_tokens)
    device = getattr(policy, "device", torch.device("cpu"))
    have = device_memory(device)
    if have is not None and need > have:
        raise TiltlmError(f"{rows:,} samples ({rows_name}) of up to {max_new_tokens:,} tokens over a vocabulary of "
                          f"{policy.vocab_size:,} need at least {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB "
                          f"of {device.type} memory; lower {rows_name} or {tokens_name}")


def device_memory(device: torch.device) -> int | None:
    """Total bytes of ``device``'s memory (this machine's RAM for the CPU), None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None
