"""Exact held-out evaluation on enumerable spaces (tiltlm.evaluate.ExactEvaluation) and training-time exact
metrics with a prompt dataset: checked against brute force over every k-tuple of completions, against the
sampled estimators' mean over many seeds, and end to end through a training run on a tiny GPT-2 testbed."""

import itertools
import json
import math

import pytest
import torch

from tiltlm.data import PromptData
from tiltlm.evaluate import ExactEvaluation, evaluate, exact_p_correct
from tiltlm.policies import TabularPolicy
from tiltlm.rewards import get_reward
from tiltlm.targets import Prior, Tilt

CONTAINS = '''
def contains_answer(completions, answer, **kwargs):
    """A contains:-style verifier reading the row's answer column (TRL's signature)."""
    return [float(a in c) for c, a in zip(completions, answer)]
'''
TOKENS = ["a", "b", "<eos>"]
PROMPTS = PromptData(["a", "b", "c"], {"answer": ["b", "ab", "a"], "id": [1, 2, 3]})
BETA = 0.5


def tabular(seed):
    return TabularPolicy.random(TOKENS, max_new_tokens=2, contexts=("a", "b", "c"), seed=seed, scale=1.5)


def brute_space(policy, context):
    """{completion text: pi(text | context)} by the chain rule, one sequence at a time (no enumerate_space)."""
    out = {}
    for d in range(3):
        for seq in itertools.product([0, 1], repeat=d):
            logp = 0.0
            for i, tok in enumerate(seq):
                logp += float(policy.next_token_logprobs(context, torch.tensor([list(seq[:i])], dtype=torch.long))[0, tok])
            if d < 2:  # ended by EOS before the length limit
                logp += float(policy.next_token_logprobs(context, torch.tensor([list(seq)], dtype=torch.long))[0, 2])
            out["".join(TOKENS[t] for t in seq)] = math.exp(logp)
    return out


@pytest.fixture(params=["exact_match", "file"])
def reward_spec(request, tmp_path):
    if request.param == "file":
        (tmp_path / "verifier.py").write_text(CONTAINS)
        return f"{tmp_path}/verifier.py:contains_answer"
    return "exact_match"


def test_exact_pass_at_k_and_kls_equal_brute_force_over_k_tuples(reward_spec):
    """n = 3: pass@k_exact for k = 1, 2, 3 is P(some correct among k draws) summed over all 7^k k-tuples, the
    expected distinct correct texts over all 343 triples, and KL(p*‖pi), KL(pi‖p*), KL(pi‖pi0), E_pi[r] by hand."""
    prior, policy = tabular(0), tabular(1)
    target = Prior(prior) * Tilt(reward_spec, BETA)
    reward = get_reward(reward_spec)
    got = ExactEvaluation(PROMPTS, target, target.verifier, n=3)(policy)
    assert sorted(got) == sorted(["eval/pass@1_exact", "eval/pass@2_exact", "eval/pass@3_exact", "eval/distinct_correct_exact",
                                  "eval/reward_exact", "eval/kl_prior_exact", "eval/kl_target_exact", "eval/kl_policy_target_exact"])
    want = {k: [] for k in got}
    for i, x in enumerate(PROMPTS.prompts):
        pi, pi0 = brute_space(policy, x), brute_space(prior, x)
        texts = list(pi)
        assert sum(pi.values()) == pytest.approx(1.0, abs=1e-6)
        r = dict(zip(texts, reward(texts, [x] * len(texts), {"answer": [PROMPTS.columns["answer"][i]] * len(texts),
                                                               "id": [i + 1] * len(texts)}).tolist()))
        correct = {t for t in texts if r[t] > 0.5}
        assert 0 < len(correct) < len(texts)  # every prompt has right and wrong answers
        for k in (1, 2, 3):
            want[f"eval/pass@{k}_exact"].append(sum(math.prod(pi[t] for t in tup) for tup in itertools.product(texts, repeat=k)
                                                    if any(t in correct for t in tup)))
        want["eval/distinct_correct_exact"].append(sum(math.prod(pi[t] for t in tup) * len(set(tup) & correct)
                                                       for tup in itertools.product(texts, repeat=3)))
        z = sum(pi0[t] * math.exp(r[t] / BETA) for t in texts)
        p_star = {t: pi0[t] * math.exp(r[t] / BETA) / z for t in texts}
        want["eval/kl_target_exact"].append(sum(p_star[t] * math.log(p_star[t] / pi[t]) for t in texts))
        want["eval/kl_policy_target_exact"].append(sum(pi[t] * math.log(pi[t] / p_star[t]) for t in texts))
        want["eval/kl_prior_exact"].append(sum(pi[t] * math.log(pi[t] / pi0[t]) for t in texts))
        want["eval/reward_exact"].append(sum(pi[t] * r[t] for t in texts))
    for key, values in want.items():
        assert got[key] == pytest.approx(sum(values) / 3, rel=1e-5, abs=1e-9), key
    # pass@1_exact is the exact mass on correct completions (the existing one-prompt helper agrees)
    p = [exact_p_correct(policy, reward_spec, context=x, row=PROMPTS.row(i)) for i, x in enumerate(PROMPTS.prompts)]
    assert got["eval/pass@1_exact"] == pytest.approx(sum(p) / 3, rel=1e-9)
    at_prior = ExactEvaluation(PROMPTS, target, target.verifier, n=3)(prior)
    assert at_prior["eval/kl_prior_exact"] == 0.0 and at_prior["eval/kl_target_exact"] > 0


def test_the_sampled_estimators_mean_over_seeds_matches_the_exact_values(reward_spec):
    """300 independent evaluations of n = 8 completions per prompt (each replicate its own seed): per prompt and
    averaged over prompts, the mean of the unbiased pass@k, of distinct correct and of the k1 KL(pi‖pi0) are within
    4 standard errors of the exact values (for pass@k at least the largest standard error a [0, 1] value can have)."""
    prior, policy = tabular(0), tabular(1)
    target = Prior(prior) * Tilt(reward_spec, BETA)
    exact = ExactEvaluation(PROMPTS, target, target.verifier, n=8)
    per_prompt = exact.per_prompt(policy)
    reps = 300
    held = PROMPTS.select([i for i in range(3) for _ in range(reps)])
    result = evaluate(policy, held, reward_spec, n=8, seed=7, prior=prior, prompts_per_batch=50)
    for i in range(3):
        rows = result.per_prompt[i * reps:(i + 1) * reps]
        pairs = [(f"pass@{k}", lambda r, k=k: r["pass_at_k"][k]) for k in (1, 2, 4, 8)]
        pairs += [("distinct_correct", lambda r: r["distinct_correct"]), ("kl_prior", lambda r: r["kl_prior"])]
        for name, value in pairs:
            values = torch.tensor([value(r) for r in rows], dtype=torch.float64)
            stderr = float(values.std() / math.sqrt(reps))
            exact_value = per_prompt[i][f"eval/{name}_exact"]
            if name.startswith("pass@"):  # a [0, 1] value of mean v has sd <= sqrt(v(1-v)) (Bhatia–Davis): a near-certain
                stderr = max(stderr, math.sqrt(exact_value * (1 - exact_value) / reps))  # pass@8 may be 1 in every replicate
            assert abs(float(values.mean()) - exact_value) < 4 * stderr + 1e-9, (i, name, float(values.mean()), exact_value, stderr)
    means = exact(policy)
    for k in (1, 2, 4, 8):
        assert means[f"eval/pass@{k}_exact"] == pytest.approx(sum(r[f"eval/pass@{k}_exact"] for r in per_prompt) / 3)
        assert abs(result.pass_at_k[k] - means[f"eval/pass@{k}_exact"]) < 0.04, k


# ---- in training: a tiny GPT-2 testbed, a dataset with an answer column --------------------------------------


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    return make_testbed(tmp_path_factory.mktemp("tiny"), vocab_size=5, n_layer=1, n_embd=16, n_head=2, seed=0)


def test_training_logs_exact_held_out_and_training_prompt_metrics(tmp_path, tiny_testbed):
    """data: + eval: + metrics.exact_every on an enumerable testbed (4 letters, 3 new tokens: 85 completions per prompt):
    eval/…_exact at steps 0, 2, 3 equal a recomputation from the enumerated spaces, and kl/target_exact at each step
    is the mean over the *training* prompts of KL(p*(·|x)‖pi(·|x)), recomputed here from scratch."""
    from tiltlm.exact import enumerate_space, kl
    from tiltlm.train.build import build
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    (tmp_path / "verifier.py").write_text(CONTAINS)
    rows = [{"prompt": p, "answer": a} for p, a in [("ab", "a"), ("ba", "b"), ("c", "ca"), ("dd", "d"), ("a", "ab"), ("bc", "c")]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = f"{tmp_path}/verifier.py:contains_answer"
    config = parse_config({"prior": str(tiny_testbed), "target": {"reward": reward, "beta": 0.5}, "algorithm": {"name": "kl-pg"},
                           "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 3, "lr": 0.05},
                           "metrics": {"exact_every": 1, "diversity": False},
                           "data": {"path": str(tmp_path / "p.jsonl"), "prompts_per_step": 2, "eval_size": 2},
                           "eval": {"n": 4, "every": 2}})
    policy, target = build(config)
    trainer = Trainer(config, policy=policy, target=target, out_dir=tmp_path / "run")
    held, train = trainer.collect.eval_data, trainer.collect.data
    assert len(held) == 2 and len(train) == 4 and len(trainer.exact) == 4
    prior_pass = [exact_p_correct(target.prior, reward, context=x, row=held.row(i)) for i, x in enumerate(held.prompts)]
    trainer.run()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    exact_keys = {f"eval/pass@{k}_exact" for k in (1, 2, 4)} | {"eval/distinct_correct_exact", "eval/reward_exact",
                                                                 "eval/kl_prior_exact", "eval/kl_target_exact", "eval/kl_policy_target_exact"}
    assert [exact_keys <= set(m) for m in metrics] == [True, False, True, True]
    first, last = metrics[0], metrics[-1]
    assert first["eval/kl_prior_exact"] == 0.0
    for k in (1, 2, 4):
        assert first[f"eval/pass@{k}_exact"] == pytest.approx(sum(1 - (1 - p) ** k for p in prior_pass) / 2, rel=1e-9)
        trained = [exact_p_correct(trainer.policy, reward, context=x, row=held.row(i)) for i, x in enumerate(held.prompts)]
        assert last[f"eval/pass@{k}_exact"] == pytest.approx(sum(1 - (1 - p) ** k for p in trained) / 2, rel=1e-6)
    assert last["eval/kl_prior_exact"] > 0
    # training-time exact metrics: over the 4 training prompts, each with its own answer column
    kls = []
    for i, x in enumerate(train.prompts):
        space = enumerate_space(target.prior, context=x, max_new_tokens=3)
        space.samples.columns = {"answer": [train.row(i)["answer"]]}
        r = get_reward(reward)(space.samples.texts, [x] * len(space), {"answer": [train.row(i)["answer"]] * len(space)})
        log_p_star = torch.log_softmax(space.logp + r / 0.5, 0)
        kls.append(kl(log_p_star, space.log_prob(trainer.policy)))
        assert 0 < float(r.sum()) < len(space)
    assert last["kl/target_exact"] == pytest.approx(sum(kls) / 4, rel=1e-5)
    assert last["kl/target_exact_max"] == pytest.approx(max(kls), rel=1e-5)
    assert all("kl/target_exact" in m for m in metrics[1:])


def test_exact_evaluation_is_on_only_for_enumerable_spaces_and_eval_exact():
    """7 completions per prompt here: exact with the defaults, off over metrics.exact_max_sequences or with eval.exact false."""
    from tiltlm.evaluate import build_evaluator
    from tiltlm.train.config import parse_config

    target = Prior(tabular(0)) * Tilt("exact_match", BETA)
    base = {"algorithm": "kl-pg", "target": {"reward": "exact_match", "beta": BETA}, "sampling": {"max_new_tokens": 2},
            "data": {"path": "unused.jsonl", "eval_size": 1}}
    on = build_evaluator(parse_config({**base, "eval": {"n": 4}}), PROMPTS, target)
    assert isinstance(on.exact, ExactEvaluation) and len(on.exact.parts) == 3
    assert set(on(target.prior, 0)) >= {"eval/pass@4", "eval/pass@4_exact", "eval/kl_target_exact"}
    assert build_evaluator(parse_config({**base, "eval": {"n": 4, "exact": False}}), PROMPTS, target).exact is None
    small = parse_config({**base, "eval": {"n": 4}, "metrics": {"exact_max_sequences": 6}})
    assert build_evaluator(small, PROMPTS, target).exact is None
    assert "eval/pass@4_exact" not in build_evaluator(small, PROMPTS, target)(target.prior, 0)
