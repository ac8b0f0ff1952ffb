"""tiltlm.quiz: the verifiable task of the default prior (verifier, splits, corpus, reward, the shipped model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tiltlm import quiz
from tiltlm.data import PromptData, load_prompts
from tiltlm.rewards import get_reward

DEFAULT = Path(__file__).resolve().parents[1] / "src" / "tiltlm" / "assets" / "default"


def _row(kind: str, **spec) -> dict:
    return {"prompt": "Q: ? A:", "check": {"kind": kind, **spec}}


# ---- the verifier, family by family ------------------------------------------------------------------


def test_check_category_and_rhyme_and_letter_answers_one_of():
    fly = next(r for r in quiz.questions("train") + quiz.questions("heldout")
               if r["family"] == "category" and r["item"] == "fly")
    assert quiz.check(" owl", fly) and quiz.check("bird", fly)
    assert quiz.check("  OWL.  ", fly) and quiz.check("\tBat\n", fly)  # whitespace, case, one trailing period
    assert not quiz.check(" dog", fly)  # wrong
    assert not quiz.check("", fly) and not quiz.check("   ", fly)  # empty
    assert not quiz.check(" a bird", fly) and not quiz.check(" owl!", fly) and not quiz.check(" owl..", fly)
    assert not quiz.check(" owl and bat", fly) and not quiz.check(" owl. Once upon a time", fly)

    red = _row("one_of", answers=["apple", "fire truck"])
    assert quiz.check(" fire   truck", red) and quiz.check("Fire Truck.", red)
    assert not quiz.check(" firetruck", red) and not quiz.check(" truck", red)

    cat = next(r for r in quiz.questions("train") + quiz.questions("heldout")
               if r["family"] == "rhyme" and r["item"] == "cat")
    assert quiz.check(" hat", cat) and quiz.check(" Bat.", cat)
    assert not quiz.check(" cat", cat)  # a word does not rhyme with itself here
    assert not quiz.check(" dog", cat) and not quiz.check("", cat)

    b = next(r for r in quiz.questions("train") + quiz.questions("heldout")
             if r["family"] == "letter" and r["item"] == "b")
    assert quiz.check(" ball", b) and quiz.check(" BEAR", b)
    assert not quiz.check(" cat", b) and not quiz.check(" b", b) and not quiz.check("", b)
    assert not quiz.check(" banjo", b)  # closed world: a real word outside the lexicon is wrong


def test_check_range_is_strictly_between_and_digits_only():
    row = _row("range", lo=3, hi=9)
    assert all(quiz.check(f" {v}", row) for v in range(4, 9))
    assert not quiz.check(" 3", row) and not quiz.check(" 9", row)  # "between" excludes the bounds
    assert not quiz.check(" 2", row) and not quiz.check(" 10", row)
    assert quiz.check("5.", row) and quiz.check("  5 ", row)
    assert not quiz.check(" five", row) and not quiz.check(" 5 and 6", row) and not quiz.check(" 5.5", row)
    assert not quiz.check(" -5", row) and not quiz.check("", row)
    even = _row("range", lo=4, hi=15, parity="even")
    assert quiz.check(" 6", even) and quiz.check(" 14", even)
    assert not quiz.check(" 7", even) and not quiz.check(" 4", even) and not quiz.check(" 16", even)
    odd = _row("range", lo=0, hi=6, parity="odd")
    assert [v for v in range(0, 10) if quiz.check(str(v), odd)] == [1, 3, 5]


def test_check_sum_accepts_any_valid_pair():
    row = _row("sum", total=8)
    assert all(quiz.check(f" {a} and {8 - a}", row) for a in range(0, 9))
    assert quiz.check(" 3 AND 5.", row) and quiz.check("3  and\t5", row)
    assert not quiz.check(" 3 and 4", row) and not quiz.check(" 8", row) and not quiz.check(" 3 + 5", row)
    assert not quiz.check(" 3 and 5 and 0", row) and not quiz.check("", row) and not quiz.check(" three and five", row)


def test_check_reads_json_text_and_rejects_bad_rows():
    assert quiz.check(" 5", {"check": json.dumps({"kind": "range", "lo": 3, "hi": 9})})
    assert quiz.check(" 5", {"kind": "range", "lo": 3, "hi": 9})  # the check object itself
    with pytest.raises(ValueError, match="kind"):
        quiz.check(" 5", {"prompt": "Q: ? A:"})
    with pytest.raises(ValueError, match="unknown quiz check kind"):
        quiz.check(" 5", _row("product", total=8))


# ---- splits --------------------------------------------------------------------------------------------


def test_splits_are_disjoint_deterministic_and_sized():
    train, held = quiz.questions("train"), quiz.questions("heldout")
    assert len(train) >= 300 and 30 <= len(held) <= 120
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"] for r in train}) == len(train) and len({r["prompt"] for r in held}) == len(held)
    assert {r["family"] for r in held} == {r["family"] for r in train} == set(quiz.FAMILIES)
    assert quiz.questions("heldout", seed=3) == quiz.questions("heldout", seed=3)
    assert quiz.questions("heldout", seed=3) != quiz.questions("heldout", seed=4)  # a seed shuffles ...
    assert sorted(map(json.dumps, quiz.questions("heldout", seed=4))) == sorted(map(json.dumps, held))  # ... only
    assert quiz.questions("train", n=10, seed=5) == quiz.questions("train", seed=5)[:10]
    assert quiz.questions("heldout", n=0) == []
    with pytest.raises(ValueError, match="split"):
        quiz.questions("test")
    for row in train + held:
        assert row["prompt"] == f"Q: {row['question']} A:"
        json.dumps(row)  # JSON-able


def test_heldout_questions_are_new_combinations_of_seen_parts():
    train, held = quiz.questions("train"), quiz.questions("heldout")
    train_items = {(r["family"], r["item"]) for r in train}
    train_phrasings = {(r["family"], r["phrasing"]) for r in train}
    assert all((r["family"], r["phrasing"]) in train_phrasings for r in held)
    seen_items = [r for r in held if (r["family"], r["item"]) in train_items]
    unseen_items = [r for r in held if (r["family"], r["item"]) not in train_items]
    assert len(seen_items) >= 50  # a new phrasing of an item asked in training
    assert unseen_items and {r["family"] for r in unseen_items} <= {"range", "parity"}  # whole (lo, hi) pairs
    bounds = {(r["family"], b) for r in train if r["family"] in ("range", "parity")
              for b in (r["check"]["lo"], r["check"]["hi"])}
    for r in unseen_items:  # each of its bounds occurs in some train question
        assert (r["family"], r["check"]["lo"]) in bounds and (r["family"], r["check"]["hi"]) in bounds


def test_every_question_has_several_correct_answers_and_the_sampler_agrees_with_check():
    rng = random.Random(0)
    for row in quiz.questions("train") + quiz.questions("heldout"):
        answers = {quiz.sample_answer(row, rng) for _ in range(40)}
        assert len(answers) >= 2, row["prompt"]
        assert all(quiz.check(" " + a, row) for a in answers), row["prompt"]
        assert not any(quiz.check(" " + quiz.sample_answer(row, rng, correct=False), row) for _ in range(10))


# ---- corpus --------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_never_contains_a_heldout_prompt():
    docs = quiz.corpus(5000, seed=0)
    assert docs == quiz.corpus(5000, seed=0) and docs != quiz.corpus(5000, seed=1)
    assert all(d.startswith("Q: ") and " A: " in d for d in docs)
    text = "\n".join(docs) + "\n" + "\n".join(quiz.corpus(5000, seed=1))
    for row in quiz.questions("heldout"):
        assert row["prompt"] not in text
        assert row["question"] not in text
    train_prompts = {r["prompt"] for r in quiz.questions("train")}
    assert {d.split(" A: ")[0] + " A:" for d in docs} <= train_prompts


def test_corpus_correct_rate_matches_the_design():
    rows = quiz.corpus_rows(20_000, seed=2)
    by_prompt = {r["prompt"]: r for r in quiz.questions("train")}
    for r in rows[:3000]:  # the bookkeeping says what the verifier says
        assert quiz.check(" " + r["answer"], by_prompt[r["prompt"]]) == r["correct"]
        assert r["text"] == f"{r['prompt']} {r['answer']}"
    rate = sum(r["correct"] for r in rows) / len(rows)
    designed = quiz.expected_correct_rate()
    assert quiz.P_CORRECT_MIN < designed < quiz.P_CORRECT_MAX
    assert abs(rate - designed) < 0.015  # 20,000 Bernoulli draws: sd 0.0035
    by_family = {f: [r["correct"] for r in rows if r["family"] == f] for f in quiz.FAMILIES}
    assert all(abs(len(v) / len(rows) - 1 / len(quiz.FAMILIES)) < 0.02 for v in by_family.values())
    # some topics are much noisier than others
    p = [r["p_correct"] for r in quiz.questions("train")]
    assert min(p) < 0.2 and max(p) > 0.6


def test_write_jsonl_round_trips_through_load_prompts(tmp_path: Path):
    rows = quiz.questions("heldout", n=5)
    path = quiz.write_jsonl(tmp_path / "sub" / "heldout.jsonl", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    data = load_prompts(path)
    assert data.prompts == [r["prompt"] for r in rows]
    assert data.columns["check"] == [r["check"] for r in rows]


# ---- the reward ----------------------------------------------------------------------------------------


def test_quiz_reward_reads_the_check_column():
    rows = [_row("range", lo=3, hi=9), _row("sum", total=8), _row("one_of", answers=["owl", "bat"]), _row("sum", total=8)]
    reward = get_reward("quiz")
    texts = [" 5", " 3 and 5", " dog", "4 and 5"]
    out = reward(texts, [r["prompt"] for r in rows], {"check": [r["check"] for r in rows], "family": ["x"] * 4})
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0]
    named = get_reward("quiz:spec")  # another column name
    assert named([" 5"], ["Q: ? A:"], {"spec": [{"kind": "range", "lo": 3, "hi": 9}]}).tolist() == [1.0]
    assert reward([" 5"], ["Q: ? A:"], {"check": ['{"kind": "range", "lo": 3, "hi": 9}']}).tolist() == [1.0]
    # through the rows of questions(): each completion is judged against its own row
    held = quiz.questions("heldout", n=4, seed=1)
    rng = random.Random(0)
    good = [" " + quiz.sample_answer(r, rng) for r in held]
    bad = [" " + quiz.sample_answer(r, rng, correct=False) for r in held]
    columns = {"check": [r["check"] for r in held] * 2}
    assert reward(good + bad, [r["prompt"] for r in held] * 2, columns).tolist() == [1.0] * 4 + [0.0] * 4


def test_quiz_reward_names_a_missing_or_bad_column():
    from tiltlm.errors import TiltlmError

    with pytest.raises(TiltlmError, match="check"):
        get_reward("quiz")([" 5"], ["Q: ? A:"], {"answer": ["5"]})
    with pytest.raises(TiltlmError, match="not a quiz check object"):
        get_reward("quiz")([" 5"], ["Q: ? A:"], {"check": [{"answers": ["5"]}]})


def test_quiz_reward_is_listed_with_help():
    from tiltlm.rewards import available_rewards

    assert any(name.startswith("quiz") for name in available_rewards())


# ---- the shipped default prior answers held-out questions --------------------------------------------


@pytest.mark.skipif(not (DEFAULT / "model.safetensors").exists(), reason="default prior not built")
def test_shipped_default_prior_answers_heldout_questions_well_above_chance():
    import torch

    from tiltlm.evaluate import evaluate
    from tiltlm.policies import HFPolicy

    training = json.loads((DEFAULT / "training.json").read_text())
    assert training["n_quiz"] > 0 and "tiltlm.quiz" in training["corpus_source"]
    policy = HFPolicy.from_pretrained(DEFAULT, max_new_tokens=8, temperature=1.0)
    rows = quiz.questions("heldout")
    data = PromptData([r["prompt"] for r in rows], {"check": [r["check"] for r in rows]})
    with torch.no_grad():
        result = evaluate(policy, data, "quiz", n=8, seed=0)
    # Chance: a completion drawn from the model's story vocabulary is almost never a valid answer in
    # this exact form; a model that did not learn the quiz would score ~0 here.
    assert result.pass_at_k[1] > 0.08, result.pass_at_k
    assert result.pass_at_k[8] > 0.5, result.pass_at_k
    # several distinct correct answers (measured 2026-12-01: 1.31 distinct correct per question among 8 samples,
    # 3.64 among 64; pass@1 0.205, pass@8 0.625)
    assert result.distinct_correct > 1.0
    assert sum(p["distinct_correct"] >= 3 for p in result.per_prompt) >= 8  # measured 18 of 88
    # and it still writes stories, never a quiz, from BOS alone
    stories = HFPolicy.from_pretrained(DEFAULT, max_new_tokens=40, temperature=1.0).sample([""], 32, seed=0)
    assert not any(t.lstrip().startswith("Q:") for t in stories.texts)
