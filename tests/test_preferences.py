"""Synthetic preferences (tiltlm.preferences, `tiltlm preferences`): the BT labels against their closed form, the pair
draw's conditions, the Wilson interval against its closed form, the file through load_preferences, the bad inputs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_bad_inputs import one_line, tiltlm

from tiltlm.errors import TiltlmError
from tiltlm.metrics.proportions import wilson
from tiltlm.preferences import agreement, draw_pairs, label_pairs, spread
from tiltlm.rewards import get_reward

Z = 1.959963984540054


def test_wilson_matches_its_closed_forms():
    assert wilson(0, 10) == (0.0, pytest.approx(Z * Z / (10 + Z * Z)))  # k = 0: the upper end is z²/(n + z²)
    assert wilson(10, 10) == (pytest.approx(10 / (10 + Z * Z)), 1.0)
    low, high = wilson(5, 10)
    assert low == pytest.approx(1 - high) and low == pytest.approx(0.2366, abs=1e-4)  # symmetric about 1/2
    assert wilson(45, 50) == (pytest.approx(0.7864, abs=1e-4), pytest.approx(0.9565, abs=1e-4))
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bernoulli_labels_follow_the_bt_probability():
    n = 4000
    a, b = ["xx"] * n, ["x"] * n  # length: g(a) − g(b) = 1
    rows = label_pairs([""] * n, a, b, get_reward("length"), tau=0.5, seed=3)
    p = 1 / (1 + math.exp(-1 / 0.5))  # σ(Δg/tau)
    wins = sum(r["chosen"] == "xx" for r in rows)
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n), (wins / n, p)
    for r in rows:  # p_chosen is σ((g_chosen − g_rejected)/tau) of the row as written
        assert r["p_chosen"] == pytest.approx(1 / (1 + math.exp(-(r["gold_chosen"] - r["gold_rejected"]) / 0.5)))
        assert {r["chosen"], r["rejected"]} == {"xx", "x"} and r["gold_chosen"] == len(r["chosen"])
    assert rows == label_pairs([""] * n, a, b, get_reward("length"), tau=0.5, seed=3)  # seeded
    assert agreement(rows) == (wins, n, 0)


def test_argmax_labels_follow_the_gold_and_break_ties_by_a_coin():
    n = 400
    rows = label_pairs([""] * n, ["ab"] * n, ["abc"] * n, get_reward("length"), tau=1.0, seed=0, labels="argmax")
    assert all(r["chosen"] == "abc" for r in rows)
    ties = label_pairs([""] * n, ["ab"] * n, ["cd"] * n, get_reward("length"), tau=1.0, seed=0, labels="argmax")
    first = sum(r["chosen"] == "ab" for r in ties)
    assert abs(first / n - 0.5) < 4 * 0.5 / math.sqrt(n) and agreement(ties) == (0, 0, n)


class Stub:
    """A policy double: each call returns the next batch of texts, context by context."""

    def __init__(self, batches):
        self.batches, self.calls = list(batches), []

    def sample(self, contexts, n, seed=None):
        self.calls.append((list(contexts), n, seed))
        texts = self.batches.pop(0) if self.batches else ["same"] * (len(contexts) * n)
        return SimpleNamespace(texts=texts[: len(contexts) * n] + ["same"] * max(0, len(contexts) * n - len(texts)))


def test_pairs_are_two_different_non_empty_completions_of_one_context():
    # round 0, n = 2·2 + 2 = 6 per context: context 0 gives (a, a) no, (a, b) yes, ("", c) no; context 1 ("x", "y") yes …
    stub = Stub([["a", "a", "a", "b", "", "c"] + ["x", "y", "y", "x", "z", "z"], ["d", "e", "f", "f", "g", "h"]])
    found = draw_pairs(stub, ["p", "q"], [2, 2], seed=5)
    assert found == [[("a", "b"), ("d", "e")], [("x", "y"), ("y", "x")]]
    assert [c[2] for c in stub.calls] == [5 * 1_000_003, 5 * 1_000_003 + 1] and stub.calls[1][0] == ["p"]  # only the short one
    assert spread(7, 3) == [3, 2, 2] and spread(2, 4) == [1, 1, 0, 0]


def test_a_prior_that_repeats_itself_is_one_line():
    with pytest.raises(TiltlmError, match="repeats itself; raise --max-new-tokens"):
        draw_pairs(Stub([]), [""], [1], seed=0)


def test_cli_writes_pairs_that_load_preferences_reads(testbed_dir, tmp_path, monkeypatch, capsys):
    from tiltlm.preference_data import load_preferences

    out = tmp_path / "prefs.jsonl"
    argv = ["preferences", "--prior", str(testbed_dir), "--gold", "count:a", "--pairs", "30", "--tau", "0.5", "--no-ties",
            "--context", "", "--context", "b", "--max-new-tokens", "4", "--out", str(out), "--seed", "1"]
    code, printed = tiltlm(argv, monkeypatch, capsys)
    assert code == 0, printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and [r["prompt"] for r in rows] == [""] * 15 + ["b"] * 15
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "p_chosen"}
    gold = get_reward("count:a")
    assert torch.equal(gold([r["chosen"] for r in rows]), torch.tensor([r["gold_chosen"] for r in rows], dtype=torch.float64))
    assert all(r["gold_chosen"] != r["gold_rejected"] for r in rows)  # --no-ties
    agree, ordered, ties = agreement(rows)
    low, high = wilson(agree, ordered)
    assert ties == 0 and f"{agree / ordered:.3f} [{low:.3f}, {high:.3f}] ({agree}/{ordered})" in printed
    data = load_preferences(out)
    assert [(p.prompt, p.chosen, p.rejected) for p in data.pairs] == [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    before = out.read_bytes()
    assert tiltlm(argv, monkeypatch, capsys)[0] == 0 and out.read_bytes() == before  # seeded: the same file again


@pytest.mark.parametrize("extra, needles", [
    (["--gold", "nope:x"], ["unknown reward 'nope:x'"]),
    (["--tau", "0"], ["--tau must be a finite number > 0 (got 0.0)"]),
    (["--tau", "-1"], ["--tau must be a finite number > 0"]),
    (["--tau", "inf"], ["--tau must be a finite number > 0"]),
    (["--tau", "nan"], ["--tau must be a finite number > 0"]),
    (["--pairs", "0"], ["--pairs must be >= 1 (got 0)"]),
    (["--pairs", "-3"], ["--pairs must be >= 1"]),
    (["--labels", "majority"], ["--labels must be one of: bernoulli, argmax"]),
    (["--data", "PROMPTS", "--context", "x"], ["give --data (a prompt file) or --context (strings), not both"]),
    (["--prior", "MISSING"], ["not found"]),
])
def test_bad_inputs_are_one_line(tmp_path, monkeypatch, capsys, extra, needles):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    extra = [str(tmp_path / "p.jsonl") if x == "PROMPTS" else str(tmp_path / "nope") if x == "MISSING" else x for x in extra]
    # an option given twice (--gold, --pairs, --tau): the later value counts (click)
    argv = ["preferences", "--gold", "length", "--pairs", "4", "--out", str(tmp_path / "out.jsonl"), *extra]
    one_line(*tiltlm(argv, monkeypatch, capsys), needles)
    assert not (tmp_path / "out.jsonl").exists()


def test_prompts_from_a_file_bring_their_columns_to_the_gold(testbed_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "b", "answer": "a"}\n')
    out = tmp_path / "prefs.jsonl"
    code, printed = tiltlm(["preferences", "--prior", str(testbed_dir), "--data", str(data), "--gold", "exact_match",
                            "--pairs", "9", "--max-new-tokens", "2", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a"] * 5 + ["b"] * 4
    answers = {"a": "b", "b": "a"}
    for r in rows:  # each row's gold read the answer of its own prompt
        assert r["gold_chosen"] == float(r["chosen"].strip() == answers[r["prompt"]])
    one_line(*tiltlm(["preferences", "--prior", str(testbed_dir), "--data", str(tmp_path / "prefs.jsonl"), "--gold",
                      "exact_match", "--pairs", "2", "--out", str(tmp_path / "x.jsonl")], monkeypatch, capsys),
             ["needs the column 'answer'"])
