"""Diversity estimators against answers worked out by hand and by exact enumeration."""

import math
import random

import pytest
import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact import entropy, enumerate_space
from tiltlm.metrics.diversity import (
    coverage_exact,
    coverage_is,
    distinct_n,
    distinct_n_tokens,
    expected_sample_coverage,
    pass_at_k,
    pass_at_k_groups,
    self_bleu,
    sequence_entropy,
)
from tiltlm.policies import Samples, TabularPolicy
from tiltlm.targets import Prior, Tilt

VOCAB = list("ab") + ["<eos>"]


def _samples(rows: list[list[int]], mask: list[list[bool]]) -> Samples:
    ids, m = torch.tensor(rows), torch.tensor(mask)
    b = ids.shape[0]
    return Samples(
        contexts=[""], group=torch.zeros(b, dtype=torch.long),
        context_ids=torch.zeros((b, 0), dtype=torch.long), context_attn=torch.zeros((b, 0), dtype=torch.bool),
        ids=ids, attn=m.clone(), mask=m, token_logp=torch.zeros(ids.shape), texts=[""] * b,
    )


# ---- distinct-n ---------------------------------------------------------------------------------
def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams a b a b a b c: 3 distinct of 7; bigrams ab ba ab ab bc: 3 distinct of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 5) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["x y", "x y"], 2) == 0.5
    with pytest.raises(TiltlmError, match="n >= 1"):
        distinct_n(texts, 0)


def test_distinct_n_tokens_uses_the_policy_mask():
    s = _samples([[1, 2, 1, 0], [1, 2, 0, 7]], [[True, True, True, True], [True, True, True, False]])
    # rows 1 2 1 0 | 1 2 0 (the 7 is padding): unigrams 3 distinct of 7; bigrams 12 21 10 12 20: 4 of 5
    assert distinct_n_tokens(s, 1) == pytest.approx(3 / 7)
    assert distinct_n_tokens(s, 2) == pytest.approx(4 / 5)
    assert distinct_n_tokens(s, 4) == pytest.approx(1.0)


# ---- self-BLEU ----------------------------------------------------------------------------------
def test_self_bleu_extremes():
    assert self_bleu(["the cat sat on the mat"] * 4) == pytest.approx(1.0)
    assert self_bleu(["a b c", "d e f", "g h i"]) == 0.0
    assert self_bleu(["a b c", "d e f"], max_refs=1) == 0.0


def test_self_bleu_by_hand():
    texts = ["the cat sat", "the cat ran", "a dog ran"]
    # "the cat sat" vs {"the cat ran", "a dog ran"}: p1 = 2/3, p2 = (1+1)/(2+1), BP = 1 -> 2/3
    # "the cat ran": p1 = 3/3, p2 = (1+1)/(2+1) -> sqrt(2/3)
    # "a dog ran":   p1 = 1/3, p2 = (0+1)/(2+1) -> 1/3
    expected = (2 / 3 + math.sqrt(2 / 3) + 1 / 3) / 3
    assert self_bleu(texts, max_n=2) == pytest.approx(expected)
    # clipping and brevity penalty, unigrams only:
    # "the the the" vs "the cat": clipped p1 = 1/3, c=3 > r=2 so BP = 1
    # "the cat" vs "the the the": p1 = 1/2, c=2 <= r=3 so BP = exp(1 - 3/2)
    assert self_bleu(["the the the", "the cat"], max_n=1) == pytest.approx((1 / 3 + 0.5 * math.exp(-0.5)) / 2)
    # a 1-word hypothesis uses effective order 1: "cat" vs "the cat sat" -> p1 = 1, BP = exp(1 - 3)
    # "the cat sat" vs "cat": p1 = 1/3, p2 = (0+1)/(2+1), p3 = (0+1)/(1+1), BP = 1
    assert self_bleu(["cat", "the cat sat"], max_n=4) == pytest.approx((math.exp(-2) + (1 / 3 * 1 / 3 * 1 / 2) ** (1 / 3)) / 2)


def test_self_bleu_two_routes_agree_and_subsampling_is_deterministic():
    rng = random.Random(0)
    texts = [" ".join(rng.choice("abcdef") for _ in range(rng.randint(0, 9))) for _ in range(30)]
    # leave-one-out maxima (max_refs=None) vs an explicit max over all 29 other texts
    assert self_bleu(texts) == pytest.approx(self_bleu(texts, max_refs=29), abs=1e-12)
    sub = self_bleu(texts, max_refs=5, seed=3)
    assert sub == self_bleu(texts, max_refs=5, seed=3)
    assert 0.0 <= sub <= 1.0
    with pytest.raises(TiltlmError, match="at least 2 texts"):
        self_bleu(["one"])


# ---- entropy ------------------------------------------------------------------------------------
def test_sequence_entropy_by_hand_and_against_exact():
    est = sequence_entropy(torch.tensor([math.log(0.5), math.log(0.25)]))
    assert est.value == pytest.approx(1.5 * math.log(2))
    assert est.stderr == pytest.approx(math.log(2) / math.sqrt(2) / math.sqrt(2))  # std(log2, log4) / sqrt(2)
    policy = TabularPolicy.random(VOCAB, max_new_tokens=3, seed=0, scale=1.0)
    est = sequence_entropy(policy.sample([""], 20000, seed=1).logp)
    assert est.value == pytest.approx(entropy(enumerate_space(policy).logp), abs=4 * est.stderr)


# ---- coverage -----------------------------------------------------------------------------------
def test_coverage_exact_by_hand():
    log_target = torch.tensor([0.5, 0.3, 0.2]).log()
    log_policy = torch.tensor([0.9, 0.1, 0.0]).log()
    assert coverage_exact(log_target, log_policy) == pytest.approx(0.8)
    assert coverage_exact(log_target, log_policy, threshold=0.5) == pytest.approx(0.5)
    assert coverage_exact(torch.tensor([1.0, 0.6, 0.4]).log(), log_policy) == pytest.approx(0.8)  # unnormalised
    # m = 2 draws: 0.5 (1 - 0.1^2) + 0.3 (1 - 0.9^2) + 0.2 (1 - 1^2)
    assert expected_sample_coverage(log_target, log_policy, 2) == pytest.approx(0.5 * 0.99 + 0.3 * 0.19)
    assert expected_sample_coverage(log_target, log_policy, 10**9) == pytest.approx(0.8)


def test_coverage_is_matches_exact_mass_of_the_sampled_set():
    prior = TabularPolicy.random(VOCAB, max_new_tokens=3, seed=0, scale=1.0)
    policy = TabularPolicy.random(VOCAB, max_new_tokens=3, seed=5, scale=2.0)
    target = Prior(prior) * Tilt("count:b", 1.0)
    space = enumerate_space(prior)
    log_p = target.log_score(space.samples, prior_logp=space.logp)
    log_p = log_p - torch.logsumexp(log_p, 0)
    pol = policy.sample([""], 6, seed=2)
    in_s = {t for t in pol.texts}  # texts are unique in this space
    exact = float(sum(log_p[i].exp() for i, t in enumerate(space.samples.texts) if t in in_s))
    q = prior.sample([""], 40000, seed=3)
    est = coverage_is(pol, q, target.log_score(q, prior_logp=q.logp), q.logp)
    assert 0.0 < exact < 1.0
    assert est.value == pytest.approx(exact, abs=4 * est.stderr + 1e-3)
    assert 0 < est.ess <= 40000


# ---- pass@k -------------------------------------------------------------------------------------
def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10), rel=1e-12)
    with pytest.raises(TiltlmError, match="k <= num_samples"):
        pass_at_k(3, 1, 4)


def test_pass_at_k_is_unbiased():
    """E[pass@k] over c ~ Binomial(n, p) equals 1 - (1 - p)^k exactly."""
    n, k, p = 12, 4, 0.15
    mean = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * pass_at_k(n, c, k) for c in range(n + 1))
    assert mean == pytest.approx(1 - (1 - p) ** k, abs=1e-12)


def test_pass_at_k_groups_by_hand():
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: 1 - C(3,2)/C(4,2) = 1/2; group 1: 1 - C(2,2)/C(4,2) = 5/6
    assert pass_at_k_groups(correct, group, 2) == pytest.approx((0.5 + 5 / 6) / 2)
    with pytest.raises(TiltlmError):
        pass_at_k_groups(correct[:5], group[:5], 2)  # group 1 has one sample
