"""Per-batch diversity estimators: distinct-n, self-BLEU, sequence entropy, coverage of p*, pass@k.

docs/math.md §4. Each function is pure: texts / tensors in, a float or an `Estimate` out; namespaced keys
(``diversity/distinct_2``) and windows are assembled by the caller. A distribution that collapses
(beta -> 0 in KL-RL) shows here first: distinct-n and entropy fall, self-BLEU rises, coverage of p*
shrinks.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import torch

from tiltlm.errors import TiltlmError
from tiltlm.metrics.divergences import Estimate, _d, _mean_estimate, effective_sample_size
from tiltlm.policies.base import Samples


# ---- distinct-n ---------------------------------------------------------------------------------
def _ngrams(tokens: list, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _distinct(rows: list[list], n: int) -> float:
    if int(n) < 1:
        raise TiltlmError(f"distinct-n needs n >= 1 (got {n}); use n=1 for unigrams")
    grams = [g for row in rows for g in _ngrams(row, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / total word n-grams over the whole batch (Li et al. 2016); words = ``str.split()``.

    0.0 when no text has n words.
    """
    return _distinct([t.split() for t in texts], n)


def distinct_n_tokens(samples: Samples, n: int) -> float:
    """distinct-n over token ids: each row is ``samples.ids[i][samples.mask[i]]`` (EOS included, as it is
    one of the policy's tokens), so it works for tabular / character vocabularies with no word boundaries."""
    rows = [row[m].tolist() for row, m in zip(samples.ids, samples.mask)]
    return _distinct(rows, n)


# ---- self-BLEU ----------------------------------------------------------------------------------
def self_bleu(texts: list[str], max_n: int = 4, max_refs: int | None = None, seed: int = 0) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen): mean over i of BLEU(text_i; all other texts as references).

    Sentence BLEU (Papineni et al. 2002) on whitespace words: the geometric mean of the clipped
    n-gram precisions p_1..p_N times the brevity penalty BP = exp(1 - r/c) when c <= r (c the
    hypothesis length, r the reference length closest to c, the shorter on ties), else 1.
    Smoothing: p_1 is unsmoothed (no shared word gives BLEU 0); for n > 1, p_n = (matches + 1) /
    (total + 1), the add-one smoothing of Lin & Och 2004 (Chen & Cherry 2014, method 2 for n > 1),
    so one missing bigram does not zero the score. A hypothesis with c < max_n words uses the
    effective order N = c (as sacrebleu does), and an empty hypothesis scores 0.

    ``max_refs``: when set, each text is compared with ``max_refs`` other texts drawn without
    replacement by ``random.Random(seed)`` (deterministic); None uses all B-1 others.
    1.0 for identical texts; 0.0 when no two texts share a word.
    """
    b = len(texts)
    if b < 2:
        raise TiltlmError(f"self-BLEU compares each text with the others and needs at least 2 texts (got {b}); score a larger batch")
    if int(max_n) < 1:
        raise TiltlmError(f"self-BLEU needs max_n >= 1 (got {max_n}); the usual value is 4")
    if max_refs is not None and int(max_refs) < 1:
        raise TiltlmError(f"max_refs must be >= 1 or None for all other texts (got {max_refs})")
    words = [t.split() for t in texts]
    counts = [[Counter(_ngrams(w, n)) for n in range(1, max_n + 1)] for w in words]  # [B][N]
    lengths = [len(w) for w in words]
    total = 0.0
    if max_refs is None:
        # leave-one-out maxima in O(total n-grams): per n-gram the best count, its owner, the runner-up
        best: list[dict] = [{} for _ in range(max_n)]
        for i, per_n in enumerate(counts):
            for k, grams in enumerate(per_n):
                for g, c in grams.items():
                    c1, i1, c2 = best[k].get(g, (0, -1, 0))
                    best[k][g] = (c, i, c1) if c > c1 else (c1, i1, max(c2, c))
        by_length = Counter(lengths)
        for i in range(b):
            clip = [{g: _other_max(best[k][g], i) for g in counts[i][k]} for k in range(max_n)]
            ref_lengths = [r for r, m in by_length.items() if m - (r == lengths[i]) > 0]
            total += _bleu(counts[i], lengths[i], clip, ref_lengths)
    else:
        rng = random.Random(seed)
        for i in range(b):
            others = [j for j in range(b) if j != i]
            refs = rng.sample(others, min(int(max_refs), len(others)))
            clip = [{g: max(counts[j][k][g] for j in refs) for g in counts[i][k]} for k in range(max_n)]
            total += _bleu(counts[i], lengths[i], clip, [lengths[j] for j in refs])
    return total / b


def _other_max(best: tuple[int, int, int], i: int) -> int:
    """Largest count among texts other than i, from (best count, its text, runner-up count)."""
    c1, i1, c2 = best
    return c1 if i1 != i else c2


def _bleu(hyp: list[Counter], c: int, clip: list[dict], ref_lengths: list[int]) -> float:
    """Smoothed sentence BLEU from the hypothesis n-gram counts and the max reference count of each."""
    if c == 0:
        return 0.0
    order = min(len(hyp), c)
    log_p = 0.0
    for k in range(order):
        matches = sum(min(cnt, clip[k].get(g, 0)) for g, cnt in hyp[k].items())
        n_grams = c - k
        if k == 0:
            if matches == 0:
                return 0.0
            log_p += math.log(matches / n_grams)
        else:
            log_p += math.log((matches + 1) / (n_grams + 1))
    r = min(ref_lengths, key=lambda length: (abs(length - c), length))
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p / order)


# ---- entropy ------------------------------------------------------------------------------------
def sequence_entropy(logp: torch.Tensor) -> Estimate:
    """H(pi) = -E_pi[log pi(x)] estimated by -mean_i log pi(x_i) from x_i ~ pi (unbiased), in nats."""
    return _mean_estimate(-_d(logp))


# ---- coverage of p* -----------------------------------------------------------------------------
def coverage_exact(log_target: torch.Tensor, log_policy: torch.Tensor, threshold: float = 0.0) -> float:
    """sum_x p*(x) 1[pi(x) > threshold] over an enumerated space: the mass of p* on the policy's support.

    ``log_target`` (N,) may be unnormalised (it is normalised here); ``log_policy`` (N,) are log pi(x)
    of the same sequences. 1.0 means the policy can produce everything p* can; a collapsed policy
    covers only the p*-mass of its few modes.
    """
    log_p = _d(log_target) - torch.logsumexp(_d(log_target), 0)
    keep = _d(log_policy).exp() > threshold
    return float(log_p[keep].exp().sum())


def expected_sample_coverage(log_target: torch.Tensor, log_policy: torch.Tensor, m: int) -> float:
    """E[p*(S_m)] = sum_x p*(x) (1 - (1 - pi(x))^m), S_m the distinct sequences of m i.i.d. draws of pi.

    The exact value (on an enumerated space) of what `coverage_is` estimates from a batch of m
    policy samples; it grows to ``coverage_exact(threshold=0)`` as m -> inf.
    """
    log_p = _d(log_target) - torch.logsumexp(_d(log_target), 0)
    pi = _d(log_policy).exp().clamp(0.0, 1.0)
    hit = -torch.expm1(int(m) * torch.log1p(-pi))  # 1 - (1 - pi)^m, accurate for tiny pi
    return float((log_p.exp() * hit).sum())


def _sequence_keys(samples: Samples) -> list[tuple]:
    """(context, policy token ids) per row: sequence identity independent of how texts decode."""
    return [(samples.context_of(i), tuple(row[m].tolist())) for i, (row, m) in enumerate(zip(samples.ids, samples.mask))]


def coverage_is(
    policy_samples: Samples,
    proposal_samples: Samples,
    log_target: torch.Tensor,
    log_proposal: torch.Tensor,
) -> Estimate:
    """p*(S): the p*-mass of the set S of distinct sequences in ``policy_samples``, by self-normalised IS.

    With x_j ~ q (``proposal_samples``, e.g. pi0), w_j = P(x_j)/q(x_j) (``log_target`` = log P(x_j),
    ``log_proposal`` = log q(x_j), both (M,)), the estimate is sum_j w~_j 1[x_j in S] per context,
    averaged over contexts; stderr by the delta method, ``ess`` the per-context ESS of the weights summed. Sequences are identified
    by (context, token ids), so both batches must come from the same tokenizer.
    For m policy samples its expectation is (up to the O(1/M) SNIS bias)
    E[p*(S_m)] = `expected_sample_coverage`, which tends to the p*-mass of the policy's support.
    """
    in_s = set(_sequence_keys(policy_samples))
    keys = _sequence_keys(proposal_samples)
    hit = torch.tensor([k in in_s for k in keys], dtype=torch.float64)  # (M,)
    log_w = _d(log_target) - _d(log_proposal)
    group = proposal_samples.group
    values, variances, ess = [], [], 0.0
    for g in group.unique().tolist():
        rows = group == g
        if not torch.isfinite(log_w[rows]).any():
            raise TiltlmError(
                f"no proposal sample for context {proposal_samples.contexts[g]!r} has positive target mass; draw more proposal samples"
            )
        wn = torch.softmax(log_w[rows], 0)
        value = float((wn * hit[rows]).sum())
        values.append(value)
        variances.append(float((wn**2 * (hit[rows] - value) ** 2).sum()))
        ess += effective_sample_size(log_w[rows])
    k = len(values)
    return Estimate(sum(values) / k, math.sqrt(sum(variances)) / k, len(keys), ess)


# ---- pass@k -------------------------------------------------------------------------------------
def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (Codex): 1 - C(n-c, k) / C(n, k) from n samples, c correct.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    n, c, k = int(num_samples), int(num_correct), int(k)
    if not 0 <= c <= n:
        raise TiltlmError(f"pass@k needs 0 <= num_correct <= num_samples (got {c} correct of {n})")
    if not 1 <= k <= n:
        raise TiltlmError(f"pass@{k} needs 1 <= k <= num_samples (got {n} samples); sample at least k per context")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_groups(correct: torch.Tensor, group: torch.Tensor, k: int) -> float:
    """Mean over contexts of `pass_at_k`, with n and c counted per context: ``correct`` (B,) bool, ``group`` (B,)."""
    correct, group = torch.as_tensor(correct).bool(), torch.as_tensor(group)
    if correct.shape != group.shape:
        raise TiltlmError(f"correct {tuple(correct.shape)} and group {tuple(group.shape)} must have the same shape (B,)")
    groups = group.unique()
    if groups.numel() == 0:
        raise TiltlmError("pass@k of an empty batch; score at least k samples per context")
    return sum(pass_at_k(int((group == g).sum()), int(correct[group == g].sum()), k) for g in groups) / groups.numel()
