"""Prompt datasets (tiltlm.data): formats, chat messages, the seeded split, bad data as one line, the step's
prompts drawn by the step's seed (and drawn again the same on resume), rows' columns reaching the reward."""

import csv
import json
import sys
import types

import pytest
import torch

from tiltlm.data import PromptData, load_data, load_prompts, prompt_data
from tiltlm.errors import TiltlmError
from tiltlm.policies import TabularPolicy
from tiltlm.rewards import get_reward
from tiltlm.targets import Prior, Tilt
from tiltlm.train.collect import step_seed
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

ROWS = [{"prompt": f"q{i}", "answer": "ab"[i % 2], "id": i} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_lists(data: PromptData):
    return data.prompts, data.columns


# ---- formats ------------------------------------------------------------------------------------


def test_jsonl_csv_json_array_and_parquet_read_the_same_rows(tmp_path):
    jsonl = load_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert jsonl.prompts == [f"q{i}" for i in range(10)]
    assert jsonl.columns == {"answer": ["a", "b"] * 5, "id": list(range(10))}
    array = tmp_path / "p.json"
    array.write_text(json.dumps(ROWS))
    assert as_lists(load_prompts(array)) == as_lists(jsonl)
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "answer", "id"])
        w.writeheader()
        w.writerows(ROWS)
    from_csv = load_prompts(tmp_path / "p.csv")  # CSV cells are text
    assert from_csv.prompts == jsonl.prompts and from_csv.columns["id"] == [str(i) for i in range(10)]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    assert as_lists(load_prompts(tmp_path / "p.parquet")) == as_lists(jsonl)
    assert as_lists(load_prompts(tmp_path / "p.parquet", prompt_column="answer"))[0] == ["a", "b"] * 5


def test_parquet_without_pyarrow_or_pandas_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(TiltlmError, match=r"needs the package pyarrow; pip install pyarrow"):
        load_prompts(tmp_path / "p.parquet")


def test_a_saved_datasets_directory_is_read_with_load_from_disk(tmp_path, monkeypatch):
    """Without the datasets package: a one-line error; with it (a stand-in module here): load_from_disk, the
    train split of a DatasetDict unless data.split names another."""
    saved = tmp_path / "ds"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TiltlmError, match="needs the package datasets: pip install datasets"):
        load_prompts(saved)

    class Split(list):
        def to_list(self):
            return list(self)

    class DatasetDict(dict):
        pass

    fake = types.SimpleNamespace(DatasetDict=DatasetDict, Dataset=Split, load_from_disk=lambda path: DatasetDict(
        train=Split(ROWS[:6]), test=Split(ROWS[6:])))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_prompts(saved).prompts == [f"q{i}" for i in range(6)]
    assert load_prompts(saved, split="test").prompts == [f"q{i}" for i in range(6, 10)]
    with pytest.raises(TiltlmError, match="has the splits train, test; choose one with data.split"):
        load_prompts(saved, split="validation")


def test_chat_messages_become_the_last_user_turn(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                          {"role": "assistant", "content": "ok"}, {"role": "user", "content": "ab"}], "answer": "a"}]
    data = load_prompts(write_jsonl(tmp_path / "chat.jsonl", rows), prompt_column="messages")
    assert data.prompts == ["ab"] and data.columns == {"answer": ["a"]}
    with pytest.raises(TiltlmError, match="has no column 'prompt'.*its columns: messages, answer.*prompt_column: messages"):
        load_prompts(tmp_path / "chat.jsonl")
    with pytest.raises(TiltlmError, match="line 1: the messages in 'messages' have no user turn"):
        load_prompts(write_jsonl(tmp_path / "sys.jsonl", [{"messages": [{"role": "system", "content": "x"}]}]), prompt_column="messages")


# ---- bad data: one line each ----------------------------------------------------------------------


@pytest.mark.parametrize("name,content,column,needles", [
    ("missing.jsonl", None, "prompt", ["data file", "missing.jsonl' not found", "JSONL, CSV or Parquet"]),
    ("empty.jsonl", "\n\n", "prompt", ["empty.jsonl' has no rows"]),
    ("empty.csv", "prompt,answer\n", "prompt", ["empty.csv' has no rows"]),
    ("cols.jsonl", '{"question": "q0", "answer": "a"}\n', "prompt", ["has no column 'prompt'; its columns: question, answer", "data.prompt_column"]),
    ("nontext.jsonl", '{"prompt": "q0"}\n\n{"prompt": 7}\n', "prompt", ["nontext.jsonl' line 3: the prompt in 'prompt' is int, not text"]),
    ("absent.jsonl", '{"prompt": "q0"}\n{"answer": "a"}\n', "prompt", ["line 2: the prompt in 'prompt' is missing"]),
    ("bad.jsonl", '{"prompt": "q0"}\n{"prompt": "q1",\n', "prompt", ["bad.jsonl' line 2 is not valid JSON", "fix that line"]),
    ("list.jsonl", '["q0"]\n', "prompt", ["line 1 is a list, not a JSON object"]),
    ("prompts.txt", "q0\n", "prompt", ["unknown data format '.txt'", "set data.format"]),
    ("reserved.jsonl", '{"prompt": "q0", "completions": "x"}\n', "prompt", ["has a column 'completions'", "rename that column"]),
])
def test_bad_data_is_one_line(tmp_path, name, content, column, needles):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(TiltlmError) as e:
        load_prompts(path, prompt_column=column)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(TiltlmError, match="is a directory but not one written by datasets' save_to_disk"):
        load_prompts(tmp_path)


def test_config_errors_of_the_data_section(tmp_path):
    base = {"algorithm": "kl-pg", "data": {"path": "p.jsonl"}}
    with pytest.raises(TiltlmError, match="sets both 'data' and 'sampling.contexts'.*drop sampling.contexts"):
        parse_config({**base, "sampling": {"contexts": ["q0"]}})
    parse_config({**base, "sampling": {"contexts": [""]}})  # the default, as a resolved config.yaml writes it
    with pytest.raises(TiltlmError, match="sets both 'data' and 'env'"):
        parse_config({**base, "env": {"name": "tabular"}})
    # exact metrics with data: average over the training prompts (tests/test_eval_exact.py checks the numbers)
    assert parse_config({**base, "metrics": {"exact_every": 5}}).metrics.exact_every == 5
    with pytest.raises(TiltlmError, match="exactly one"):
        parse_config({"algorithm": "kl-pg", "data": {"prompt_column": "q"}})
    with pytest.raises(TiltlmError, match="set data.eval_size, data.eval_fraction or data.eval_path"):
        parse_config({**base, "eval": {"n": 4}})
    with pytest.raises(TiltlmError, match="unknown config key 'data.prompts_per_stp'; did you mean 'prompts_per_step'"):
        parse_config({"algorithm": "kl-pg", "data": {"path": "p.jsonl", "prompts_per_stp": 2}})


# ---- the split and the step's draw ------------------------------------------------------------------


def test_split_is_seeded_deterministic_disjoint_and_keeps_order():
    data = PromptData([r["prompt"] for r in ROWS], {"answer": [r["answer"] for r in ROWS]})
    train, held = data.split(eval_size=3, seed=0)
    again_train, again_held = data.split(eval_size=3, seed=0)
    assert held.prompts == again_held.prompts and train.prompts == again_train.prompts
    assert len(held) == 3 and len(train) == 7
    assert sorted(held.prompts + train.prompts, key=lambda p: int(p[1:])) == data.prompts
    assert held.prompts == sorted(held.prompts, key=lambda p: int(p[1:]))  # dataset order
    assert held.columns["answer"] == ["ab"[int(p[1:]) % 2] for p in held.prompts]  # columns follow their rows
    others = {tuple(data.split(eval_size=3, seed=s)[1].prompts) for s in range(1, 6)}
    assert others != {tuple(held.prompts)}  # another seed, another split
    assert len(data.split(eval_fraction=0.25, seed=0)[1]) == 2  # round(0.25 * 10) = 2 (3 rounds down too)
    assert data.split()[1] is None
    with pytest.raises(TiltlmError, match="leaves no training prompts"):
        data.split(eval_size=10)


def test_eval_path_is_a_separate_held_out_file(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", ROWS[:6])
    held_path = write_jsonl(tmp_path / "held.jsonl", ROWS[6:])
    cfg = parse_config({"algorithm": "kl-pg", "target": {"reward": "exact_match", "beta": 1.0},
                        "data": {"path": str(train_path), "eval_path": str(held_path)}, "eval": {"n": 4}})
    train, held = load_data(cfg.data)
    assert train.prompts == [r["prompt"] for r in ROWS[:6]]  # nothing split off the training file
    assert held.prompts == [r["prompt"] for r in ROWS[6:]] and held.columns["answer"] == [r["answer"] for r in ROWS[6:]]
    with pytest.raises(TiltlmError, match="one of data.eval_size, data.eval_fraction, data.eval_path"):
        parse_config({"algorithm": "kl-pg", "data": {"path": str(train_path), "eval_path": str(held_path), "eval_size": 2}})
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x", "solution": "y"}])
    cfg = parse_config({"algorithm": "kl-pg", "data": {"path": str(train_path), "eval_path": str(other)}, "eval": {"n": 4}})
    with pytest.raises(TiltlmError, match="the same columns"):
        load_data(cfg.data)
    cfg = parse_config({"algorithm": "kl-pg", "data": {"path": str(train_path), "eval_path": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(TiltlmError, match="nope.jsonl"):
        load_data(cfg.data)


def test_the_steps_prompts_are_drawn_by_the_steps_seed(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    cfg = parse_config({"algorithm": "kl-pg", "target": {"reward": "exact_match", "beta": 1.0}, "seed": 3,
                        "sampling": {"n_per_context": 2, "max_new_tokens": 2}, "data": {"path": str(path), "prompts_per_step": 4}})
    train, held = load_data(cfg.data)
    assert held is None and len(train) == 10
    trainer = Trainer(cfg, **tabular_parts(train.prompts))
    draws = []
    for step in range(5):
        batch = trainer.make_batch(step)
        expected = train.draw(4, step_seed(cfg, step))
        assert batch.samples.contexts == expected.prompts and len(expected) == 4
        assert batch.samples.columns == expected.columns
        assert trainer.make_batch(step).samples.contexts == expected.prompts  # the same step draws the same again
        draws.append(tuple(expected.prompts))
    assert len(set(draws)) > 1  # and other steps other prompts
    assert train.draw(None, 0) is train and train.draw(50, 0) is train  # null or more than there are: every prompt


def tabular_parts(contexts, seed=0):
    prior = TabularPolicy.random(["a", "b", "<eos>"], max_new_tokens=2, contexts=tuple(contexts), seed=seed).requires_grad_(False)
    return {"policy": prior.copy().requires_grad_(True), "target": Prior(prior) * Tilt("exact_match", 1.0)}


def test_the_rows_columns_reach_the_reward_per_sample(tmp_path):
    """exact_match compares each sample with its own prompt's answer; a TRL-style function gets the
    columns as keyword lists aligned with the completions."""
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    cfg = parse_config({"algorithm": "kl-pg", "target": {"reward": "exact_match", "beta": 1.0},
                        "sampling": {"n_per_context": 16, "max_new_tokens": 2}, "data": {"path": str(path), "prompts_per_step": 4}})
    parts = tabular_parts([r["prompt"] for r in ROWS])
    seen = []

    def rec(prompts, completions, answer, id, **kwargs):  # noqa: A002 - a column named id
        seen.append((list(prompts), list(answer), list(id), kwargs))
        return [float(c == a) for c, a in zip(completions, answer)]

    trainer = Trainer(cfg, policy=parts["policy"], target=Prior(parts["target"].prior) * Tilt(rec, 1.0))
    batch = trainer.make_batch(0)
    s = batch.samples
    answers = {r["prompt"]: r["answer"] for r in ROWS}
    expected = [float(t == answers[s.context_of(i)]) for i, t in enumerate(s.texts)]
    assert batch.reward.tolist() == expected and 0 < sum(expected) < len(expected)
    prompts, answer, ids, kwargs = seen[0]
    assert prompts == [s.context_of(i) for i in range(len(s))]
    assert answer == [answers[p] for p in prompts] and ids == [int(p[1:]) for p in prompts] and kwargs == {}
    exact = get_reward("exact_match")
    torch.testing.assert_close(exact(s.texts, prompts, {"answer": answer}), batch.reward)


def test_resume_draws_the_same_prompts_and_numbers(tmp_path):
    """A run with data (3 of 10 prompts per step, 2 held out, eval every 2 steps) stopped after 3 of 6 steps and
    resumed from its checkpoint draws the same prompts and writes the same metrics.jsonl as the uninterrupted
    run, the step-0 evaluation of pi0 included."""
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    cfg = parse_config({"algorithm": "kl-pg", "target": {"reward": "exact_match", "beta": 0.5}, "seed": 1,
                        "sampling": {"n_per_context": 4, "max_new_tokens": 2}, "optim": {"steps": 6, "lr": 0.1},
                        "checkpoint": {"every": 1}, "data": {"path": str(path), "prompts_per_step": 3, "eval_size": 2},
                        "eval": {"n": 4, "every": 2}})
    contexts = [r["prompt"] for r in ROWS]
    drawn = {"full": [], "cut": []}

    def recorder(key):
        def rec(prompts, completions, answer, **kwargs):
            drawn[key].append(tuple(prompts))
            return [float(c == a) for c, a in zip(completions, answer)]
        return rec

    def parts(key, seed=0):
        p = tabular_parts(contexts, seed=seed)
        return {"policy": p["policy"], "target": Prior(p["target"].prior) * Tilt(recorder(key), 0.5)}

    full_parts = parts("full")
    Trainer(cfg, **full_parts, out_dir=tmp_path / "full").run()
    cut = Trainer(cfg, **parts("cut"), out_dir=tmp_path / "cut")
    for _ in range(3):
        cut.train_step()
    resumed_parts = parts("cut", seed=0)
    resumed_parts["policy"].logits.data.normal_()  # overwritten by the checkpoint
    resumed = Trainer(cfg, **resumed_parts, out_dir=tmp_path / "cut", resume=True)
    assert resumed.step == 3
    resumed.run()
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    full, cut_rows = read("full"), read("cut")
    assert [r["step"] for r in cut_rows] == [0, 1, 2, 3, 4, 5, 6]
    assert cut_rows == full
    assert cut_rows[0]["eval/kl_prior"] == 0.0 and set(cut_rows[0]) >= {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/reward"}
    assert [("eval/pass@1" in r) for r in cut_rows] == [True, False, True, False, True, False, True]
    train_draws = lambda d: [p for p in d if set(p) <= set(load_data(cfg.data)[0].prompts) and len(set(p)) == 3]  # noqa: E731
    assert train_draws(drawn["cut"]) == train_draws(drawn["full"]) and len(train_draws(drawn["full"])) == 6
    torch.testing.assert_close(resumed_parts["policy"].logits, full_parts["policy"].logits, atol=0, rtol=0)


# ---- reasoning-gym ---------------------------------------------------------------------------------


def test_reasoning_gym_task_by_name_scored_by_its_own_score_answer():
    pytest.importorskip("reasoning_gym")
    cfg = parse_config({"algorithm": "kl-pg", "data": {"reasoning_gym": {"task": "basic_arithmetic", "size": 12, "seed": 0,
                                                                           "config": {"min_terms": 2, "max_terms": 2}},
                                                         "eval_size": 2}})
    assert cfg.target.reward == "reasoning_gym"  # the default reward of a reasoning-gym task
    train, held = load_data(cfg.data)
    assert len(train) == 10 and len(held) == 2
    again = load_data(cfg.data)[0]
    assert again.prompts == train.prompts  # procedural and seeded
    assert all(p.startswith("Calculate") for p in train.prompts) and set(train.columns) == {"answer", "metadata"}
    reward = get_reward("reasoning_gym")
    answers = train.columns["answer"]
    texts = [f"<answer>{answers[0]}</answer>", f"so the answer is {answers[1]}", "<answer>no idea</answer>"]
    columns = {k: v[:3] for k, v in train.columns.items()}
    assert reward(texts, train.prompts[:3], columns).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(TiltlmError, match="unknown reasoning-gym task 'basic_arithmetc' \\(did you mean 'basic_arithmetic'\\?\\)"):
        load_data(parse_config({"algorithm": "kl-pg", "data": {"reasoning_gym": {"task": "basic_arithmetc"}}}).data)


def test_prompt_data_from_rows_in_python():
    data = prompt_data([{"prompt": "q0", "answer": 1}, {"prompt": "q1"}], "prompt", "my rows")
    assert data.prompts == ["q0", "q1"] and data.columns == {"answer": [1, None]}
    assert data.row(0) == {"answer": 1} and len(data.select([1])) == 1
