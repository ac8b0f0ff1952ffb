"""Evaluation on held-out prompts (tiltlm.evaluate, `tiltlm eval`): the pass@k estimator against brute force
and against exact pass@k, TRL-style rewards reading the rows' columns, and the CLI's JSON contract."""

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from tiltlm.data import PromptData
from tiltlm.evaluate import evaluate, exact_p_correct, exact_pass_at_k, ks_for
from tiltlm.metrics import pass_at_k
from tiltlm.policies import TabularPolicy

TRL_REWARD = '''
def accuracy(completions, answer, **kwargs):
    """TRL's shape: the completions and the dataset's answer column by keyword."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
'''


def test_ks_are_powers_of_two_up_to_n_and_n():
    assert ks_for(1) == [1]
    assert ks_for(6) == [1, 2, 4, 6]
    assert ks_for(8) == [1, 2, 4, 8]
    assert ks_for(20) == [1, 2, 4, 8, 16, 20]


def test_the_estimator_equals_the_mean_over_all_k_subsets():
    """1 - C(n-c, k)/C(n, k) is exactly the fraction of the C(n, k) subsets of k samples holding a correct one."""
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5, abs=1e-12)  # stable where the binomials are ~1e59
    assert math.isfinite(pass_at_k(10_000, 3, 5_000))


def tabular(contexts=("q",), seed=0):
    return TabularPolicy.random(["a", "b", "<eos>"], max_new_tokens=2, contexts=tuple(contexts), seed=seed, scale=1.5)


def test_the_estimators_mean_matches_exact_pass_at_k():
    """500 independent draws of n = 8 completions of one prompt (answer 'ab'): the mean of the unbiased pass@k is
    within 4 standard errors of 1 - (1 - p)^k, p = pi's exact mass on 'ab'."""
    policy = tabular()
    p = exact_p_correct(policy, "exact_match", context="q", row={"answer": "ab"})
    assert 0.05 < p < 0.6, p  # a prompt neither trivial nor hopeless
    space_p = float(torch.tensor([policy.next_token_logprobs("q", torch.zeros((1, 0), dtype=torch.long))[0, 0],
                                  policy.next_token_logprobs("q", torch.tensor([[0]]))[0, 1]]).sum().exp())
    assert p == pytest.approx(space_p, rel=1e-6)  # pi(a) · pi(b | a): 'ab' ends at the length limit
    held = PromptData(["q"] * 500, {"answer": ["ab"] * 500})
    result = evaluate(policy, held, "exact_match", n=8, seed=0)
    assert list(result.pass_at_k) == [1, 2, 4, 8] and result.n_samples == 4000
    for k in (1, 2, 4, 8):
        values = torch.tensor([row["pass_at_k"][k] for row in result.per_prompt], dtype=torch.float64)
        stderr = float(values.std() / math.sqrt(len(values)))
        exact = exact_pass_at_k(policy, "exact_match", k, context="q", row={"answer": "ab"})
        assert exact == pytest.approx(1 - (1 - p) ** k)
        assert abs(result.pass_at_k[k] - exact) < 4 * stderr + 1e-9, (k, result.pass_at_k[k], exact, stderr)
    assert result.mean_reward == pytest.approx(result.pass_at_k[1], abs=1e-12)  # pass@1 = fraction correct
    assert result.distinct_correct == pytest.approx(float(sum(r["n_correct"] > 0 for r in result.per_prompt)) / 500)


def test_per_prompt_numbers_kl_and_a_trl_reward_reading_a_column(tmp_path):
    (tmp_path / "rewards.py").write_text(TRL_REWARD)
    prior = tabular(["x", "y"], seed=1)
    policy = tabular(["x", "y"], seed=2)
    data = PromptData(["x", "y"], {"answer": ["a", "bb"], "unused": [1, 2]})
    result = evaluate(policy, data, f"{tmp_path}/rewards.py:accuracy", n=6, seed=3, prior=prior)
    again = evaluate(policy, data, f"{tmp_path}/rewards.py:accuracy", n=6, seed=3, prior=prior)
    assert result.to_json() == again.to_json()  # seeded
    s = policy.sample(["x", "y"], 6, seed=3 * 1_000_003)  # the first batch's seed
    for g, answer in enumerate(["a", "bb"]):
        texts = s.texts[6 * g : 6 * g + 6]
        c = sum(t == answer for t in texts)
        row = result.per_prompt[g]
        assert row["n_correct"] == c and row["distinct_correct"] == int(c > 0)
        assert row["pass_at_k"] == {k: pass_at_k(6, c, k) for k in (1, 2, 4, 6)}
        k1 = float((s.logp.double() - prior.log_prob(s).double())[6 * g : 6 * g + 6].mean())
        assert row["kl_prior"] == pytest.approx(k1, abs=1e-9)
    assert evaluate(prior, data, "exact_match", n=4, seed=0, prior=prior).kl_prior == 0.0


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "ab", "answer": "a", "id": 1}, {"prompt": "ba", "answer": "b", "id": 2}, {"prompt": "c", "answer": "ca", "id": 3}]))
    (root / "rewards.py").write_text(TRL_REWARD)
    return root


def tiltlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tiltlm.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_tiltlm_eval_json_contract(testbed_dir, eval_files):
    args = ["eval", "--model", str(testbed_dir), "--data", str(eval_files / "prompts.jsonl"), "--reward",
            f"{eval_files}/rewards.py:accuracy", "-n", "6", "--seed", "0", "--max-new-tokens", "3", "--json"]
    r = tiltlm(*args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert {"n_prompts", "n_samples", "mean_reward", "distinct_correct", "pass_at_k"} <= set(out)
    assert out["n_prompts"] == 3 and out["n_samples"] == 18 and isinstance(out["n_samples"], int)
    assert isinstance(out["mean_reward"], float) and isinstance(out["distinct_correct"], float)
    assert list(out["pass_at_k"]) == ["1", "2", "4", "6"]  # powers of two <= N, and N
    values = list(out["pass_at_k"].values())
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values) and out["pass_at_k"]["1"] == pytest.approx(out["mean_reward"])  # 0/1 reward
    assert 0 < out["mean_reward"] < 1  # the testbed gets some answers right, not all
    # the same numbers in Python (the prompts as contexts, BOS prepended) and again from the CLI (seeded)
    from tiltlm.data import load_prompts
    from tiltlm.policies import HFPolicy

    policy = HFPolicy.from_pretrained(testbed_dir, max_new_tokens=3)
    expected = evaluate(policy, load_prompts(eval_files / "prompts.jsonl"), f"{eval_files}/rewards.py:accuracy", n=6, seed=0)
    want, got = expected.to_json(), dict(out)
    assert got.pop("pass_at_k") == pytest.approx(want.pop("pass_at_k")) and got == pytest.approx(want)
    assert json.loads(tiltlm(*args).stdout) == out
    r = tiltlm(*args[:-1])  # without --json: a table
    assert r.returncode == 0 and "pass@6" in r.stdout and "mean_reward" in r.stdout


@pytest.mark.parametrize("extra,needle", [
    (["--data", "/nonexistent/p.jsonl"], "data file '/nonexistent/p.jsonl' not found"),
    (["--reward", "exact_mach"], "unknown reward 'exact_mach' (did you mean 'exact_match'?)"),
    (["-n", "0"], "-n must be >= 1"),
    (["--prompt-column", "question"], "has no column 'question'; its columns: prompt, answer, id"),
])
def test_tiltlm_eval_errors_are_one_line(testbed_dir, eval_files, extra, needle):
    args = {"--model": str(testbed_dir), "--data": str(eval_files / "prompts.jsonl"), "--reward": "exact_match"}
    flags = dict(zip(extra[::2], extra[1::2]))
    argv = [x for k, v in {**args, **flags}.items() for x in (k, v)]
    r = tiltlm("eval", *argv, "--json")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_training_logs_held_out_evaluations(tmp_path, testbed_dir):
    """`tiltlm train` with data: and eval: on the testbed writes eval/… rows: pi0 at step 0 (KL 0), then every 2
    steps and at the end."""
    prompts = [{"prompt": p, "answer": a} for p, a in [("ab", "a"), ("ba", "b"), ("c", "ca"), ("dd", "a"), ("a", "ab"), ("bc", "c")]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    cfg = {"prior": str(testbed_dir), "target": {"reward": "exact_match", "beta": 0.5}, "algorithm": {"name": "kl-pg"},
           "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 3, "lr": 0.01},
           "data": {"path": str(tmp_path / "p.jsonl"), "prompts_per_step": 2, "eval_size": 2}, "eval": {"n": 4, "every": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = tiltlm("train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    keys = {"eval/reward", "eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/distinct_correct", "eval/kl_prior"}
    # the testbed's space (4 letters, 3 new tokens: 85 completions per prompt) is enumerable: exact values too
    exact = {"eval/pass@1_exact", "eval/pass@2_exact", "eval/pass@4_exact", "eval/distinct_correct_exact", "eval/reward_exact",
             "eval/kl_prior_exact", "eval/kl_target_exact", "eval/kl_policy_target_exact"}
    assert [keys | exact <= set(row) for row in rows] == [True, False, True, True]
    assert rows[0]["eval/kl_prior"] == 0.0 and rows[0]["eval/kl_prior_exact"] == 0.0 and set(rows[0]) == keys | exact | {"step"}
    assert all(0 <= rows[i][k] <= 1 for i in (0, 2, 3) for k in keys - {"eval/kl_prior", "eval/distinct_correct"})
    assert rows[1]["samples/seen"] == 8  # 2 prompts × 4 samples per step


def test_builtin_verifiers_compare_with_a_column():
    from tiltlm.errors import TiltlmError
    from tiltlm.rewards import available_rewards, get_reward
    from tiltlm.rewards.builtin import final_answer, parse_number

    assert {"exact_match[:<column>]", "numeric_match[:<column>]", "math_verify[:<column>]", "reasoning_gym"} <= set(available_rewards())
    assert [final_answer(t) for t in ["so \\boxed{\\frac{1}{2}}.", "work\n#### 42", "The answer is 7.", "<answer> B </answer>", "x\n\n  y  \n"]] == [
        "\\frac{1}{2}", "42", "7", "B", "y"]
    assert [parse_number(t) for t in ["1,234.5 apples", "\\boxed{-3/4} not 9", "about 1e-3", "none"]] == [1234.5, -0.75, 0.001, None]
    texts = ["The answer is Paris.", "paris", "\\boxed{Lyon}", "Rome"]
    exact = get_reward("exact_match")
    assert exact(texts, None, {"answer": ["Paris", "Paris", "Lyon", "Paris"]}).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert get_reward("exact_match:city")(["x\nParis"], None, {"city": ["paris"], "answer": ["no"]}).tolist() == [1.0]
    numeric = get_reward("numeric_match")
    assert numeric(["it is 0.5", "x = 2", "#### 1,000", "\\boxed{3} then 4", "no number"], None,
                   {"answer": ["1/2", 3, "1000", "3.0000000001", "0"]}).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(TiltlmError, match=r"reward 'exact_match:answer' compares with the column 'answer', but the samples carry no "
                                          r"data columns; add that column"):
        exact(["x"])
    with pytest.raises(TiltlmError, match="the samples' data columns are: solution"):
        numeric(["1"], None, {"solution": ["1"]})
    with pytest.raises(TiltlmError, match="needs an argument; write exact_match\\[:<column>\\]"):
        get_reward("exact_match:")
    try:
        import math_verify  # noqa: F401
    except ImportError:
        with pytest.raises(TiltlmError, match="needs the package math-verify; pip install math-verify"):
            get_reward("math_verify")
    else:
        assert get_reward("math_verify")(["$\\frac{1}{2}$", "$0.3$"], None, {"answer": ["0.5", "1/2"]}).tolist() == [1.0, 0.0]


def test_a_reward_built_by_hand_without_keywords_still_scores_rows():
    from tiltlm.rewards import Reward

    seen = []
    by_hand = Reward("by-hand", lambda texts, contexts: seen.append(contexts) or [1.0] * len(texts))
    assert by_hand(["a", "b"], ["p", "q"], {"answer": ["a", "c"]}).tolist() == [1.0, 1.0] and seen == [["p", "q"]]
    with_rows = Reward("rows", lambda texts, contexts, answer=(), **kw: [float(t == a) for t, a in zip(texts, answer)])
    assert with_rows(["a", "b"], None, {"answer": ["a", "c"], "id": [1, 2]}).tolist() == [1.0, 0.0]
