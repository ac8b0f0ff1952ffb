"""Preference pairs (tiltlm.preference_data): TRL's three formats (explicit, implicit prompt, conversational), the
sources of tiltlm.data, the seeded split, and bad rows as one TiltlmError line naming the row and the fix."""

import csv
import json

import pytest

from tiltlm.data import load_prompts
from tiltlm.errors import TiltlmError
from tiltlm.preference_data import (PreferenceData, PreferencePair, implicit_prompt, is_preference_file, load_preferences,
                                    require_preferences)

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "id": i} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_explicit_prompt_from_jsonl_csv_and_parquet(tmp_path):
    data = load_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert len(data) == 10 and isinstance(data, PreferenceData)
    assert data.pairs[3] == PreferencePair("q3", "good 3", "bad 3", 4)  # JSONL: the line number
    assert [p.chosen for p in data] == [f"good {i}" for i in range(10)]
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    assert load_preferences(tmp_path / "p.csv").pairs == data.pairs
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    assert load_preferences(tmp_path / "p.parquet").pairs == data.pairs


def test_jsonl_rows_are_numbered_by_line_skipping_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [p.row for p in load_preferences(path)] == [1, 3]


def test_renamed_columns(tmp_path):
    rows = [{"q": "x", "win": "a", "lose": "b"}]
    data = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), prompt_column="q", chosen_column="win", rejected_column="lose")
    assert data.pairs == [PreferencePair("x", "a", "b", 1)]


def test_implicit_prompt_is_the_longest_common_prefix_with_the_space_kept_by_the_completions(tmp_path):
    assert implicit_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert implicit_prompt("ab", "ac") == ("a", "b", "c")
    assert implicit_prompt("abc", "ab") == ("ab", "c", "")  # one completion may be empty (just EOS)
    assert implicit_prompt("x", "y") == ("", "x", "y")  # nothing shared: the prior's BOS context
    rows = [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}]
    assert load_preferences(write_jsonl(tmp_path / "p.jsonl", rows)).pairs == [PreferencePair("Q: 2+2? A:", " 4", " 5", 1)]


def test_conversational_with_and_without_a_prompt_column(tmp_path):
    user = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi?"}]
    rows = [{"chosen": user + [{"role": "assistant", "content": "hello"}],
             "rejected": user + [{"role": "assistant", "content": "go away"}]}]
    assert load_preferences(write_jsonl(tmp_path / "a.jsonl", rows)).pairs == [PreferencePair("hi?", "hello", "go away", 1)]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]
    assert load_preferences(write_jsonl(tmp_path / "b.jsonl", rows)).pairs == [PreferencePair("hi?", "hello", "go away", 1)]
    rows = [{"prompt": "plain", "chosen": [{"role": "assistant", "content": "y"}], "rejected": [{"role": "assistant", "content": "n"}]}]
    assert load_preferences(write_jsonl(tmp_path / "c.jsonl", rows)).pairs == [PreferencePair("plain", "y", "n", 1)]


def test_empty_prompt_is_kept_as_the_bos_context(tmp_path):
    data = load_preferences(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "", "chosen": "ab", "rejected": "b"}]))
    assert data.pairs[0].prompt == "" and data.prompts == [""]


def test_hf_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    data = load_preferences(tmp_path / "ds")
    assert data.pairs[0] == PreferencePair("q0", "good 0", "bad 0", 1) and len(data) == 10


def test_split_is_seeded_disjoint_and_the_same_permutation_as_prompt_data(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    data = load_preferences(path)
    train, held = data.split(eval_size=3, seed=7)
    assert len(train) == 7 and len(held) == 3
    assert {p.row for p in train}.isdisjoint({p.row for p in held}) and {p.row for p in train} | {p.row for p in held} == set(range(1, 11))
    again = data.split(3, 7)  # positional: the same
    assert again[0].pairs == train.pairs and again[1].pairs == held.pairs
    assert any(data.split(eval_size=3, seed=s)[1].pairs != held.pairs for s in range(8, 12))  # another seed, another split
    _, held_prompts = load_prompts(path).split(eval_size=3, seed=7)
    assert [p.prompt for p in held] == held_prompts.prompts
    assert data.split() == (data, None)
    assert len(data.split(eval_fraction=0.2, seed=0)[1]) == 2
    with pytest.raises(TiltlmError, match="leaves no training pairs"):
        data.split(eval_size=10, seed=0)


def test_draw_is_seeded_and_keeps_order(tmp_path):
    data = load_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS))
    a, b = data.draw(4, seed=3), data.draw(4, seed=3)
    assert a.pairs == b.pairs and len(a) == 4 and [p.row for p in a] == sorted(p.row for p in a)
    assert data.draw(None, seed=0) is data and data.draw(99, seed=0) is data


@pytest.mark.parametrize("rows, needles", [
    ([{"prompt": "x", "chosen": "a"}], ["no column 'rejected'", "its columns: prompt, chosen"]),
    ([{"prompt": "x", "rejected": "a"}], ["no column 'chosen'", "data.chosen_column"]),
    ([{"prompt": "x", "chosen": "a", "rejected": "b"}, {"prompt": "y", "chosen": "s", "rejected": "s"}], ["line 2", "the same completion"]),
    ([{"prompt": "x", "chosen": 3, "rejected": "b"}], ["line 1", "'chosen' is int, not text"]),
    ([{"prompt": "x", "chosen": None, "rejected": "b"}], ["line 1", "'chosen' is missing"]),
    ([{"prompt": 5, "chosen": "a", "rejected": "b"}], ["line 1", "prompt in 'prompt' is int"]),
    ([{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}], ["line 1", "the same format"]),
    ([{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}], ["end with a 'user' turn"]),
    ([{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "y"}],
       "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "n"}]}], ["last user turns", "differ"]),
])
def test_bad_rows_are_one_line_naming_the_row(tmp_path, rows, needles):
    with pytest.raises(TiltlmError) as e:
        load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_empty_file_malformed_line_and_missing_prompt_column(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(TiltlmError, match="has no rows; add pairs"):
        load_preferences(tmp_path / "e.jsonl")
    (tmp_path / "m.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(TiltlmError, match="line 2 is not valid JSON"):
        load_preferences(tmp_path / "m.jsonl")
    with pytest.raises(TiltlmError, match="no column 'question'; its columns: prompt, chosen, rejected, id"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS), prompt_column="question")
    with pytest.raises(TiltlmError, match="not found"):
        load_preferences(tmp_path / "absent.jsonl")


def test_detection_and_prompt_only_data_for_dpo(tmp_path):
    prefs = write_jsonl(tmp_path / "p.jsonl", ROWS)
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x"}])
    assert is_preference_file(prefs) and not is_preference_file(prompts) and not is_preference_file(tmp_path / "absent.jsonl")
    assert len(require_preferences(prefs, algorithm="dpo")) == 10
    with pytest.raises(TiltlmError) as e:
        require_preferences(prompts, algorithm="dpo")
    assert "algorithm dpo trains on preference pairs" in str(e.value) and "'chosen' or 'rejected'" in str(e.value)
    assert "\n" not in str(e.value)
