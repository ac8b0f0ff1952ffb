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
metrics.jsonl at step 0 (pi0), every ``eval.every`` steps and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


class Evaluator:
    """The ``eval:`` section in training: ``evaluator(policy, step)`` -> the eval/… metrics when step is due
    (0 with ``at_start``, every ``every`` steps, the last step), else {}. The seed is the same at every
    evaluation, so successive evaluations differ by the policy only."""

    def __init__(self, prompts: PromptData | None, reward, *, n: int, seed: int, every: int, last: int, at_start: bool, prior=None):
        self.prompts, self.reward, self.n, self.seed = prompts, reward, n, seed
        self.every, self.last, self.at_start, self.prior = every, last, at_start, prior

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
        return result.metrics()


def build_evaluator(config, eval_data: PromptData | None, target, *, active: bool = True) -> Evaluator:
    """The Evaluator a training config describes (one that never evaluates without ``eval:`` or when this
    process takes no part in metrics, ``active`` False)."""
    e = config.eval
    verifier = target.verifier if target is not None else None  # the tilt's reward, or 1[constraints]
    if e is None or eval_data is None or verifier is None or not active:
        return Evaluator(None, None, n=1, seed=0, every=0, last=0, at_start=False)
    return Evaluator(eval_data, verifier, n=e.n, seed=config.seed if e.seed is None else e.seed, every=e.every,
                     last=config.optim.steps, at_start=e.at_start, prior=target.prior)
