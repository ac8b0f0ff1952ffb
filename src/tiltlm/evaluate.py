"""Evaluation on held-out prompts: reward, pass@k, distinct correct answers and KL(pi‖pi0).

    result = evaluate(policy, held_out, "exact_match", n=16, seed=0, prior=pi0)
    result.pass_at_k[4]      # mean over prompts of the unbiased pass@4 (Chen et al. 2021)
    result.to_json()         # what `tiltlm eval --json` prints

For each prompt, n completions are sampled (seeded) and scored by the reward with the prompt's row
(tiltlm.data); a completion is *correct* when its reward is > 0.5. Per prompt, with c correct of n:

- pass@k = 1 - C(n-c, k)/C(n, k), the unbiased estimator of the probability that at least one of k
  completions is correct, computed as a product (tiltlm.metrics.pass_at_k), for k = 1, 2, 4, … (powers of
  two up to n) and n itself;
- distinct correct = the number of distinct correct completions (texts stripped of surrounding space);
- KL(pi‖pi0) (with a prior) = the k1 estimate, the mean of log pi(y|x) - log pi0(y|x) over the samples.

Each is averaged over prompts. On an enumerable space pass@k is also known exactly,
1 - (1 - p)^k with p = pi's mass on correct completions (`exact_pass_at_k`), which is what the estimator's
expectation equals. In training, an ``eval:`` section (`Evaluator`) logs these as ``eval/…`` rows of
metrics.jsonl at step 0 (pi0), every ``eval.every`` steps and at the end; when pi0's space after a prompt is
enumerable (≤ ``metrics.exact_max_sequences`` sequences) `ExactEvaluation` adds their exact values and the exact
divergences to the training target p*(·|x), each averaged over the held-out prompts:

- eval/pass@k_exact = 1 - (1 - p_x)^k, p_x = pi's mass on the correct completions of x;
- eval/distinct_correct_exact = Σ_t 1 - (1 - pi(t|x))^n over the distinct correct texts t (the expectation of
  distinct correct among n samples);
- eval/reward_exact = E_pi[r]; eval/kl_prior_exact = KL(pi‖pi0); eval/kl_target_exact = KL(p*(·|x)‖pi(·|x)) and
  eval/kl_policy_target_exact = KL(pi(·|x)‖p*(·|x)), p* the training target conditioned on x (its row's columns
  reach the reward exactly as in training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tiltlm.data import PromptData
from tiltlm.errors import TiltlmError
from tiltlm.metrics.diversity import pass_at_k

CORRECT_THRESHOLD = 0.5


def ks_for(n: int) -> list[int]:
    """The k of pass@k reported for n samples: 1, 2, 4, … (powers of two <= n), and n itself."""
    if int(n) < 1:
        raise TiltlmError(f"evaluation needs n >= 1 samples per prompt (got {n})")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else ks + [int(n)]


@dataclass
class Evaluation:
    """Means over prompts (``per_prompt`` holds each prompt's numbers)."""

    n_prompts: int
    n: int  # completions per prompt
    mean_reward: float
    pass_at_k: dict[int, float]
    distinct_correct: float
    kl_prior: float | None = None
    per_prompt: list[dict] = field(default_factory=list, repr=False)

    @property
    def n_samples(self) -> int:
        return self.n_prompts * self.n

    def to_json(self) -> dict:
        """The object `tiltlm eval --json` prints (pass_at_k keyed by k as a string)."""
        out = {"n_prompts": self.n_prompts, "n_samples": self.n_samples, "n": self.n, "mean_reward": self.mean_reward,
               "distinct_correct": self.distinct_correct, "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()}}
        if self.kl_prior is not None:
            out["kl_prior"] = self.kl_prior
        return out

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """The metrics.jsonl keys: eval/reward, eval/pass@k…, eval/distinct_correct, eval/kl_prior."""
        out = {f"{prefix}reward": self.mean_reward, **{f"{prefix}pass@{k}": v for k, v in self.pass_at_k.items()},
               f"{prefix}distinct_correct": self.distinct_correct}
        if self.kl_prior is not None:
            out[f"{prefix}kl_prior"] = self.kl_prior
        return out


def evaluate(policy, prompts: PromptData | list[str], reward, *, n: int, seed: int = 0, prior=None,
             threshold: float = CORRECT_THRESHOLD, prompts_per_batch: int = 64) -> Evaluation:
    """Sample ``n`` completions per prompt from ``policy`` and score them with ``reward`` (a spec, callable or
    Reward; it gets each prompt's row as keyword columns). Prompts are sampled ``prompts_per_batch`` at a time,
    batch j with seed ``seed * 1_000_003 + j``, so a result depends only on (policy, prompts, n, seed)."""
    from tiltlm.rewards import get_reward
    from tiltlm.targets.base import rewards_of

    data = prompts if isinstance(prompts, PromptData) else PromptData(list(prompts))
    if len(data) == 0:
        raise TiltlmError("no prompts to evaluate; give at least one")
    ks = ks_for(n)
    reward = get_reward(reward)
    per_prompt = []
    for j, start in enumerate(range(0, len(data), prompts_per_batch)):
        part = data.select(list(range(start, min(start + prompts_per_batch, len(data)))))
        samples = policy.sample(part.prompts, n, seed=seed * 1_000_003 + j)
        samples.columns = part.columns or None
        rewards = rewards_of(reward, samples)
        log_ratio = None
        if prior is not None:
            log_ratio = samples.logp.double().cpu() - (samples.logp.double().cpu() if prior is policy else prior.log_prob(samples).double().cpu())
        group = samples.group
        for g in range(len(part)):
            rows = (group == g).nonzero().squeeze(-1)
            r = rewards[rows]
            correct = r > threshold
            texts = {samples.texts[i].strip() for i, ok in zip(rows.tolist(), correct.tolist()) if ok}
            per_prompt.append({
                "prompt": part.prompts[g], "reward": float(r.mean()), "n_correct": int(correct.sum()),
                "distinct_correct": len(texts), "pass_at_k": {k: pass_at_k(len(rows), int(correct.sum()), k) for k in ks},
                **({} if log_ratio is None else {"kl_prior": float(log_ratio[rows].mean())}),
            })
    mean = lambda key: sum(p[key] for p in per_prompt) / len(per_prompt)  # noqa: E731
    return Evaluation(
        n_prompts=len(per_prompt), n=int(n), mean_reward=mean("reward"),
        pass_at_k={k: sum(p["pass_at_k"][k] for p in per_prompt) / len(per_prompt) for k in ks},
        distinct_correct=mean("distinct_correct"), kl_prior=mean("kl_prior") if prior is not None else None,
        per_prompt=per_prompt,
    )


def exact_p_correct(policy, reward, *, context: str = "", row: dict | None = None, threshold: float = CORRECT_THRESHOLD,
                    max_sequences: int | None = None) -> float:
    """pi's exact mass on correct completions (reward > threshold) after ``context``, by enumerating its
    whole sample space (tiltlm.exact.enumerate_space); ``row`` is the prompt's other columns."""
    from tiltlm.exact import enumerate_space
    from tiltlm.rewards import get_reward
    from tiltlm.targets.base import rewards_of

    space = enumerate_space(policy, context=context, **({} if max_sequences is None else {"max_sequences": max_sequences}))
    space.samples.columns = {k: [v] for k, v in row.items()} if row else None
    correct = rewards_of(get_reward(reward), space.samples) > threshold
    return float(space.logp.exp()[correct].sum().clamp(max=1.0))


def exact_pass_at_k(policy, reward, k: int, **kwargs) -> float:
    """pass@k exactly: 1 - (1 - p)^k, p = `exact_p_correct` (the expectation of the unbiased estimator)."""
    return 1.0 - (1.0 - exact_p_correct(policy, reward, **kwargs)) ** int(k)


class ExactEvaluation:
    """The exact eval/…_exact metrics (module docstring) of any policy on the held-out ``prompts``: pi0's space
    after each prompt is enumerated once, here (tiltlm.metrics.batch.exact_for_context), and each evaluation
    scores the policy on those spaces. ``reward`` decides correctness (> ``threshold``), as in `evaluate`."""

    def __init__(self, prompts: PromptData, target, reward, *, n: int, max_new_tokens: int | None = None,
                 max_sequences: int | None = None, threshold: float = CORRECT_THRESHOLD):
        from tiltlm.metrics.batch import exact_for_context
        from tiltlm.targets.base import rewards_of

        self.ks, self.n, self.prior = ks_for(n), int(n), target.prior
        self.parts = []  # (ExactMetrics, correct (N,) bool, index of each correct sequence's distinct text)
        for i, prompt in enumerate(prompts.prompts):
            try:
                exact = exact_for_context(target, prompt, row=prompts.row(i), max_new_tokens=max_new_tokens,
                                          max_sequences=max_sequences)
            except TiltlmError as e:
                raise TiltlmError(f"held-out prompt {i + 1} ({prompt[:40]!r}): {e}") from None
            correct = rewards_of(reward, exact.space.samples) > threshold
            texts = [t.strip() for t, ok in zip(exact.space.samples.texts, correct.tolist()) if ok]
            index = {t: j for j, t in enumerate(dict.fromkeys(texts))}
            self.parts.append((exact, correct, torch.tensor([index[t] for t in texts], dtype=torch.long)))

    def per_prompt(self, policy) -> list[dict[str, float]]:
        """One row of eval/…_exact values per held-out prompt."""
        rows = []
        for exact, correct, text_index in self.parts:
            log_pi = exact.log_prior if policy is self.prior else exact.space.log_prob(policy)
            pi = log_pi.exp()
            p = float(pi[correct].sum().clamp(max=1.0))
            per_text = torch.zeros(int(text_index.max()) + 1 if len(text_index) else 0, dtype=torch.float64)
            per_text.index_add_(0, text_index, pi[correct])
            m = exact.of(log_pi)
            rows.append({**{f"eval/pass@{k}_exact": 1.0 - (1.0 - p) ** k for k in self.ks},
                         "eval/distinct_correct_exact": float((1 - (1 - per_text.clamp(max=1.0)) ** self.n).sum()),
                         "eval/reward_exact": m["reward/exact"], "eval/kl_prior_exact": m["kl/prior_exact"],
                         "eval/kl_target_exact": m["kl/target_exact"], "eval/kl_policy_target_exact": m["kl/policy_target_exact"]})
        return rows

    def __call__(self, policy) -> dict[str, float]:
        """The eval/…_exact metrics, each the mean over the held-out prompts."""
        rows = self.per_prompt(policy)
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


class Evaluator:
    """The ``eval:`` section in training: ``evaluator(policy, step)`` -> the eval/… metrics when step is due
    (0 with ``at_start``, every ``every`` steps, the last step), else {}. The seed is the same at every
    evaluation, so successive evaluations differ by the policy only. With ``exact`` (an ExactEvaluation) the
    exact values join each evaluation."""

    def __init__(self, prompts: PromptData | None, reward, *, n: int, seed: int, every: int, last: int, at_start: bool, prior=None,
                 exact: ExactEvaluation | None = None, path=None):
        self.prompts, self.reward, self.n, self.seed = prompts, reward, n, seed
        self.every, self.last, self.at_start, self.prior, self.exact = every, last, at_start, prior, exact
        self.path = path  # eval_per_prompt.jsonl: one line per evaluation, every prompt's numbers

    def due(self, step: int) -> bool:
        if self.prompts is None:
            return False
        if step == 0:
            return self.at_start
        return step == self.last or (self.every > 0 and step % self.every == 0)

    def __call__(self, policy, step: int) -> dict[str, float]:
        if not self.due(step):
            return {}
        with torch.no_grad():
            result = evaluate(policy, self.prompts, self.reward, n=self.n, seed=self.seed, prior=self.prior)
            exact = self.exact.per_prompt(policy) if self.exact is not None else None
        if self.path is not None:
            self._write(step, result.per_prompt, exact)
        means = {k: sum(r[k] for r in exact) / len(exact) for k in exact[0]} if exact else {}
        return {**result.metrics(), **means}

    def _write(self, step: int, per_prompt: list[dict], exact: list[dict] | None) -> None:
        """One JSON line {step, prompts: [{prompt, reward, n_correct, distinct_correct, pass@k…, kl_prior, …_exact}]}: the
        numbers whose means are this evaluation's eval/ metrics (a resumed run may repeat a step; the last line counts)."""
        import json

        rows = []
        for i, p in enumerate(per_prompt):
            row = {k: v for k, v in p.items() if k != "pass_at_k"} | {f"pass@{k}": v for k, v in p["pass_at_k"].items()}
            rows.append(row | ({k.removeprefix("eval/"): v for k, v in exact[i].items()} if exact else {}))
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "prompts": rows}) + "\n")


def build_evaluator(config, eval_data: PromptData | None, target, *, active: bool = True, out_dir=None) -> Evaluator:
    """The Evaluator a training config describes (one that never evaluates without ``eval:`` or when this
    process takes no part in metrics, ``active`` False)."""
    e = config.eval
    verifier = target.verifier if target is not None else None  # the tilt's reward, or 1[constraints]
    if e is None or eval_data is None or verifier is None or not active:
        return Evaluator(None, None, n=1, seed=0, every=0, last=0, at_start=False)
    return Evaluator(eval_data, verifier, n=e.n, seed=config.seed if e.seed is None else e.seed, every=e.every,
                     last=config.optim.steps, at_start=e.at_start, prior=target.prior,
                     exact=build_exact_evaluation(config, eval_data, target, verifier),
                     path=None if out_dir is None else Path(out_dir) / "eval_per_prompt.jsonl")


def build_exact_evaluation(config, eval_data: PromptData, target, verifier) -> ExactEvaluation | None:
    """Exact held-out metrics when ``eval.exact`` is on and pi0's space after a prompt has at most
    ``metrics.exact_max_sequences`` sequences (else None: estimates only)."""
    from tiltlm.exact import count_sequences

    m, length = config.metrics, config.sampling.max_new_tokens
    if not config.eval.exact or count_sequences(target.prior.vocab_size, length, at_most=m.exact_max_sequences) > m.exact_max_sequences:
        return None
    return ExactEvaluation(eval_data, target, verifier, n=config.eval.n, max_new_tokens=length, max_sequences=m.exact_max_sequences)
