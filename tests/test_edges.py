"""The last rough edges (docs/reliability.md): each injected for real through a subprocess of the `tiltlm` CLI,
ending in one line (exit 2, no traceback, nothing written) or working as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.test_bad_inputs import one_line
from tiltlm.metrics.batch import kl_text

REWARDS = '''
def huge(texts):
    return [10 ** 400] * len(texts)

def emptying(texts):
    scores = [1.0] * len(texts)
    texts.clear()  # the reward's own list: the count is taken before the call
    return scores
'''


def tiltlm(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiltlm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "TILTLM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("edges")
    make_testbed(root / "tb", vocab_size=4, n_layer=1, n_embd=16, n_head=2, seed=0, train_steps=0)  # a 64-token window
    (root / "rw.py").write_text(REWARDS)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "abab"]))
    return root


def config(reward: str) -> dict:
    return {"prior": "tb", "target": {"reward": reward, "beta": 1.0}, "algorithm": {"name": "kl-pg"},
            "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 1}}


def test_a_key_twice_in_the_config_is_refused(root):
    text = yaml.safe_dump(config("count:a")) + "optim:\n  lr: 0.5\n"  # a second optim: after the first
    (root / "twice.yaml").write_text(text)
    done = tiltlm("train", "twice.yaml", "--out", "twice", cwd=root)
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("optim:"))
    one_line(done.returncode, done.stdout + done.stderr, [f"has the key 'optim' twice in one mapping (line {first} and line "
                                                         f"{len(text.splitlines()) - 1})", "keep one"])
    assert not (root / "twice").exists()


def test_a_huge_int_reward_is_one_line(root):
    (root / "huge.yaml").write_text(yaml.safe_dump(config("rw.py:huge")))
    done = tiltlm("train", "huge.yaml", "--out", "huge", cwd=root)
    one_line(done.returncode, done.stdout + done.stderr, ["reward 'rw.py:huge' returned an integer of 1,329 bits at index 0",
                                                         "finite floats"])
    assert not (root / "huge").exists()


def test_a_reward_that_empties_its_list_trains_and_kl_is_printed_as_an_estimate(root):
    (root / "emptying.yaml").write_text(yaml.safe_dump(config("rw.py:emptying")))
    done = tiltlm("train", "emptying.yaml", "--out", "emptying", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    row = json.loads((root / "emptying" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["reward/mean"] == 1.0
    assert kl_text(row) in done.stdout and "k1 estimate" in done.stdout and "95% interval [" in done.stdout


def test_kl_text_names_the_estimate_and_its_interval():
    row = {"kl/prior_seq": -0.055, "kl/prior_seq_low": -0.1, "kl/prior_seq_high": 0.01, "kl/prior_estimator": "k1"}
    assert kl_text(row) == "KL(pi||pi0) k1 estimate -0.0550, 95% interval [-0.1000, 0.0100]"
    assert kl_text({**row, "kl/prior_exact": 0.0123}) == "KL(pi||pi0) 0.0123 (exact)"
    assert kl_text({}) == "KL(pi||pi0) not measured"


@pytest.mark.parametrize("args, needles", [
    (["run", "--workers", "0"], ["Invalid value for '--workers'", "greater than or equal to 1", "`tiltlm run --help`"]),
    (["train"], ["Missing argument 'config'", "`tiltlm train --help`"]),
    (["train", "x.yaml", "--bogus"], ["No such option: --bogus", "`tiltlm train --help`"]),
    (["sweep", "s.yaml", "--out"], ["'--out' requires an argument"]),
])
def test_usage_errors_are_one_line(root, args, needles):
    done = tiltlm(*args, cwd=root)
    one_line(done.returncode, done.stdout + done.stderr, needles)


def test_eval_of_a_run_directory_points_at_its_policy_and_fits_the_window(root):
    (root / "run.yaml").write_text(yaml.safe_dump(config("count:a")))
    assert tiltlm("train", "run.yaml", "--out", "run", cwd=root).returncode == 0
    done = tiltlm("eval", "--model", "run", "--data", "prompts.jsonl", "--reward", "count:a", "-n", "2", cwd=root)
    one_line(done.returncode, done.stdout + done.stderr, ["'run' is a run directory, not a model", "'run/policy'"])
    # the default --max-new-tokens (64) does not fit a 64-token window: fitted to 64 - 5 (BOS + 'abab'), with a note
    done = tiltlm("eval", "--model", "run/policy", "--data", "prompts.jsonl", "--reward", "count:a", "-n", "2", "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ("note: --max-new-tokens 59: the default 64 does not fit the model's window of 64 tokens after "
                                   "the longest prompt (5 tokens); pass --max-new-tokens to choose")
    assert json.loads(done.stdout)["n_samples"] == 4
    done = tiltlm("eval", "--model", "run/policy", "--data", "prompts.jsonl", "--reward", "count:a", "--max-new-tokens", "64", cwd=root)
    one_line(done.returncode, done.stdout + done.stderr, ["--max-new-tokens 64 does not fit the model's window of 64 tokens"])
