"""Rows a reward needs (docs/reliability.md): a reward whose signature declares a column, or a verifier that
compares with one, refuses prompt data with a row that lacks it, before anything is sampled: one line naming
the first such row and the column, exit 2, --out left absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.test_bad_inputs import one_line
from tiltlm.rewards import get_reward

REWARDS = '''
def acc(completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]

def loose(completions, answer=None, **kwargs):
    return [0.0] * len(completions)
'''


def acc(completions, answer, **kwargs):
    return [0.0] * len(completions)


def test_needs_from_signatures_and_verifiers(tmp_path):
    (tmp_path / "rw.py").write_text(REWARDS)
    assert get_reward("exact_match").needs == ("answer",)
    assert get_reward("exact_match:gold").needs == ("gold",)
    assert get_reward("numeric_match").needs == ("answer",)
    assert get_reward("quiz").needs == ("check",)
    assert get_reward("contains:a").needs == ()
    assert get_reward(acc).needs == ("answer",)
    assert get_reward(f"{tmp_path / 'rw.py'}:acc").needs == ("answer",)
    assert get_reward(f"{tmp_path / 'rw.py'}:loose").needs == ()  # a default: rows may lack it
    assert get_reward("exact_match").limited(5.0).needs == ("answer",)


def test_check_rows_names_the_first_row_and_the_column():
    from tiltlm.errors import TiltlmError

    reward = get_reward("exact_match")
    reward.check_rows({"answer": ["1", "2"]}, ["line 1", "line 2"], "data file 'd.jsonl'")  # every row has one
    with pytest.raises(TiltlmError, match=r"needs the column 'answer', but data file 'd.jsonl' line 4 has none"):
        reward.check_rows({"answer": ["1", None, None]}, ["line 1", "line 4", "line 5"], "data file 'd.jsonl'")
    with pytest.raises(TiltlmError, match=r"needs the column 'answer', but data file 'd.jsonl' has none \(its columns are: gold\)"):
        reward.check_rows({"gold": ["1"]}, ["line 1"], "data file 'd.jsonl'")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("rows")
    make_testbed(root / "tb", vocab_size=4, n_layer=1, n_embd=16, n_head=2, seed=0, train_steps=0)
    (root / "rw.py").write_text(REWARDS)
    rows = [{"prompt": "a", "answer": "a"}, {"prompt": "b", "answer": "b"}, {"prompt": "ab"}, {"prompt": "ba", "answer": None}]
    (root / "some.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return root


@pytest.mark.parametrize("reward, data, needle", [
    ("exact_match", {"path": "some.jsonl"}, "reward 'exact_match' needs the column 'answer', but data file 'some.jsonl' line 3 has none"),
    ("rw.py:acc", {"path": "some.jsonl"}, "reward 'rw.py:acc' needs the column 'answer', but data file 'some.jsonl' line 3 has none"),
    ("exact_match", {"path": "full.jsonl", "eval_path": "some.jsonl"}, "data file 'some.jsonl' line 3 has none"),
    ("exact_match:gold", {"path": "full.jsonl"}, "needs the column 'gold', but data file 'full.jsonl' has none"),
])
def test_train_refuses_rows_without_the_column(setup, reward, data, needle):
    config = {"prior": "tb", "target": {"reward": reward, "beta": 1.0}, "algorithm": {"name": "kl-pg"}, "data": data,
              "sampling": {"n_per_context": 2, "max_new_tokens": 3}, "optim": {"steps": 1}}
    (setup / "cfg.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", "cfg.yaml", "--out", "out"], capture_output=True,
                          text=True, cwd=setup, env={**os.environ, "TILTLM_THREADS": "1"}, timeout=300)
    one_line(done.returncode, done.stdout + done.stderr, [needle])
    assert not (setup / "out").exists()


def test_loose_reward_trains_on_rows_without_the_column(setup):
    config = {"prior": "tb", "target": {"reward": "rw.py:loose", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
              "data": {"path": "some.jsonl"}, "sampling": {"n_per_context": 2, "max_new_tokens": 3}, "optim": {"steps": 1}}
    (setup / "loose.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", "loose.yaml", "--out", "loose"], capture_output=True,
                          text=True, cwd=setup, env={**os.environ, "TILTLM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
