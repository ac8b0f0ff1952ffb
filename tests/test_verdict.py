"""The calls of tiltlm.experiments.verdict on synthetic per-question data: undetermined without a real difference,
yes (or no) once one is put in, undetermined again when it is taken out; the sentences state the intervals."""

import numpy as np
import pytest

from tiltlm.experiments.questions import Evaluations
from tiltlm.experiments.verdict import NO, UNDETERMINED, YES, sentences, verdict_json

KS = (1, 2, 4, 8, 16, 32, 64)
N = 64


def _evaluations(name, p, rng, seeds=1, distinct=None):
    """Per-question pass@k estimates from N completions at pass rates ``p`` ((Q,) or (S, Q)), distinct correct answers."""
    from math import comb

    p = np.broadcast_to(np.asarray(p, float), (seeds, len(np.atleast_1d(p)) if np.ndim(p) == 1 else np.shape(p)[-1]))
    c = rng.binomial(N, p)
    values = {f"pass@{k}": np.vectorize(lambda x, k=k: 1 - comb(N - x, k) / comb(N, k))(c) for k in KS}
    values["distinct_correct"] = c * 0.2 if distinct is None else np.broadcast_to(distinct, c.shape).astype(float)
    values["reward"], values["kl_prior"] = c / N, np.zeros(c.shape)
    return Evaluations(name, None, list(range(seeds)), [f"q{i}" for i in range(p.shape[1])], values)


def _verdict(method_p, base_p, *, seeds=3, distinct=None, base_distinct=None, seed=0):
    rng = np.random.default_rng(seed)
    pi0 = _evaluations("π0", base_p, rng, distinct=base_distinct)
    pi0.values = {k: v.mean(0, keepdims=True) for k, v in pi0.values.items()}
    m = _evaluations("reinforce", method_p, rng, seeds=seeds, distinct=distinct)
    return verdict_json(pi0, [m], seeds=list(range(seeds)))


def test_no_difference_is_undetermined_and_a_real_one_flips_the_calls():
    rng = np.random.default_rng(0)
    p0 = rng.beta(1, 5, size=200)
    same = _verdict(p0, p0)["methods"]["reinforce"]
    assert same["narrowed"] == UNDETERMINED and same["kept_breadth"] == UNDETERMINED
    # a policy that is right more often on the questions π0 solves and never on those it rarely does: better at k = 1,
    # far behind at k = 64 — narrowed, breadth lost
    sharp = np.where(p0 > 0.15, np.minimum(1, 3 * p0), 0.0)
    narrowed = _verdict(sharp, p0)["methods"]["reinforce"]
    assert narrowed["pass_at_k"]["1"]["lo"] > 0 and narrowed["pass_at_k"]["64"]["hi"] < 0
    assert narrowed["narrowed"] == YES and narrowed["kept_breadth"] == NO
    # a uniform gain that keeps coverage: not narrowed, breadth kept
    broad = _verdict(np.minimum(1, p0 + 0.1), p0, distinct=4.0, base_distinct=4.0)["methods"]["reinforce"]
    assert broad["narrowed"] == NO and broad["kept_breadth"] == YES
    # the difference removed again: back to undetermined
    again = _verdict(p0, p0, seed=1)["methods"]["reinforce"]
    assert again["narrowed"] == UNDETERMINED and again["kept_breadth"] == UNDETERMINED


def test_too_few_questions_cannot_tell_what_many_can():
    rng = np.random.default_rng(2)
    p0 = rng.beta(1, 5, size=400)
    sharp = np.where(p0 > 0.15, np.minimum(1, 1.3 * p0), 0.7 * p0)
    assert _verdict(sharp, p0)["methods"]["reinforce"]["narrowed"] == YES
    few = _verdict(sharp[:12], p0[:12], seeds=1)["methods"]["reinforce"]
    assert few["narrowed"] == UNDETERMINED


def test_the_contract_and_the_sentences_carry_the_intervals():
    rng = np.random.default_rng(0)
    p0 = rng.beta(1, 5, size=200)
    v = _verdict(np.where(p0 > 0.15, np.minimum(1, 3 * p0), 0.0), p0)
    m = v["methods"]["reinforce"]
    assert v["level"] == 0.95 and v["seeds"] == [0, 1, 2] and v["n_questions"] == 200
    assert set(m["pass_at_k"]) == {str(k) for k in KS} and set(m["distinct_correct"]) == {"diff", "lo", "hi"}
    for iv in m["pass_at_k"].values():
        assert iv["lo"] <= iv["diff"] <= iv["hi"]
    text = " ".join(sentences(v))
    k = min(int(k) for k, iv in m["pass_at_k"].items() if iv["hi"] < 0)
    iv = m["pass_at_k"][str(k)]
    assert f"π0 overtakes it from k = {k} (Δpass@{k} {iv['diff']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]" in text
    assert text == " ".join(v["sentences"])
    same = _verdict(p0, p0)
    assert "cannot be told from this run" in " ".join(same["sentences"]) and "would decide" in " ".join(same["sentences"])


def test_no_data_has_a_sentence():
    assert sentences({"methods": {}}) == ["No held-out evaluation to compare: the study has no π0 evaluation or no trained policy."]


@pytest.mark.parametrize("gain", [0.0, 0.01])
def test_a_gain_within_the_margin_decides_nothing(gain):
    """A policy within PASS_MARGIN of π0 at k = 1 is the same as π0 there: neither "no" nor "yes" for the breadth."""
    rng = np.random.default_rng(4)
    p0 = rng.beta(1, 5, size=300)
    m = _verdict(np.minimum(1, p0 + gain), p0)["methods"]["reinforce"]
    assert m["narrowed"] != NO and m["kept_breadth"] != YES
