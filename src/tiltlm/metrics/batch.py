"""The metrics of one training step, from its batch, and exact metrics on enumerable spaces.

Key names (namespaced):
  reward/mean, reward/std                 r(x) under the samples of pi (SNIS-weighted when off-policy)
  kl/prior_seq (+ _stderr, _low, _high)   KL(pi || pi0) per sequence, estimator in kl/prior_estimator
  kl/target_is (+ _stderr)                KL(p* || pi), self-normalised IS          (forward, "to the target")
  kl/policy_target_is                     KL(pi || p*) = E_pi[log pi - log P] + log Z_hat  (reverse)
  tv/target_is                            TV(pi, p*)
  log_z/is (+ _stderr), is/ess            log Z estimate from this batch and the ESS of its weights
  entropy/seq (+ _stderr)                 -E_pi[log pi(x)], the sequence entropy
  diversity/distinct_1, distinct_2        word n-grams;  diversity/distinct_{1,2}_tokens: token n-grams
  diversity/self_bleu
and every N steps on enumerable spaces the exact values: kl/target_exact, kl/policy_target_exact,
tv/target_exact, kl/prior_exact, entropy/exact, reward/exact, log_z/exact. With ``metrics.gold`` (a reward training
never sees) also gold/mean on every batch and gold/exact with the exact metrics. With several contexts each is
the per-prompt conditional quantity (p*(y|x) = P(x, y)/Z(x), one ExactMetrics per context) averaged over
the contexts (``average_over_contexts``), plus the worst context's kl/target_exact_max and
kl/policy_target_exact_max. With a prompt dataset (``data:``) the contexts are the training prompts, each
enumerated once with its row's columns (``exact_for_context``), so the rewards that read a column score it.
"""

from __future__ import annotations

import math

import torch

from tiltlm.records import Batch
from tiltlm.exact import SequenceSpace, entropy, expectation, kl, normalise, tv
from tiltlm.metrics.diversity import distinct_n, distinct_n_tokens, self_bleu, sequence_entropy
from tiltlm.metrics.divergences import (
    effective_sample_size,
    kl_policy_prior,
    kl_policy_target,
    kl_target_policy,
    log_z,
    tv_target_policy,
)


def step_metrics(batch: Batch, token_logp: torch.Tensor, *, on_policy: bool, kl_estimator: str, diversity: bool,
                 env_counts: dict | None = None, gold=None) -> dict[str, float]:
    """A training step's row: ``batch_metrics``, with ``gold`` (metrics.gold, a Reward) ``gold_metrics``, and, for
    environment episodes, ``episode_metrics`` and the run's failure rate so far. ``token_logp``: (B, T) log pi_theta
    per token before the step (detached)."""
    from tiltlm.metrics.episodes import episode_metrics

    if batch.pairs is not None:  # preference pairs of data, drawn by no policy: the algorithm's own reward/margin etc.
        return {}
    row = batch_metrics(batch, token_logp.sum(-1), on_policy=on_policy, kl_estimator=kl_estimator, diversity=diversity)
    if gold is not None:
        row.update(gold_metrics(batch, token_logp.sum(-1), gold, on_policy=on_policy))
    if batch.samples.trajectories is not None:
        row.update(episode_metrics(batch, token_logp, on_policy=on_policy))
        counts = env_counts or {"episodes": 0, "failures": 0}
        row["env/failure_rate_run"] = counts["failures"] / max(1, counts["episodes"])
    return row


def _estimate(out: dict, key: str, est, *, interval: bool = False) -> None:
    out[key] = est.value
    out[f"{key}_stderr"] = est.stderr
    if interval:
        out[f"{key}_low"], out[f"{key}_high"] = est.low, est.high


def batch_metrics(
    batch: Batch, logp: torch.Tensor, *, on_policy: bool = True, kl_estimator: str = "k1", diversity: bool = True
) -> dict[str, float]:
    """Per-step metrics; ``logp`` is log pi_theta(x) of the batch's samples before the step (detached);
    ``on_policy`` says the samples were drawn from that policy (else from a proposal q: weighted by pi/q)."""
    logp = logp.detach().double().cpu()
    logq, lt, lp0, r = batch.logq.cpu(), batch.log_target.cpu(), batch.logp_prior.cpu(), batch.reward.cpu()
    out: dict[str, float] = {}
    if on_policy:
        out["reward/mean"], out["reward/std"] = float(r.mean()), float(r.std()) if len(r) > 1 else 0.0
        _estimate(out, "kl/prior_seq", kl_policy_prior(logp, lp0, kl_estimator), interval=True)
        _estimate(out, "entropy/seq", sequence_entropy(logp))
    else:  # samples of a proposal q: weight by pi/q
        w = torch.softmax(logp - logq, 0)
        out["reward/mean"] = float((w * r).sum())
        out["reward/std"] = float(((w * (r - out["reward/mean"]) ** 2).sum()).sqrt())
        out["kl/prior_seq"] = float((w * (logp - lp0)).sum())
        out["entropy/seq"] = float(-(w * logp).sum())
        out["is/ess_policy"] = effective_sample_size(logp - logq)
    out["kl/prior_estimator"] = kl_estimator
    lz = log_z(lt, logq)
    _estimate(out, "log_z/is", lz)
    out["is/ess"] = lz.ess
    _estimate(out, "kl/target_is", kl_target_policy(lt, logq, logp))
    _estimate(out, "tv/target_is", tv_target_policy(lt, logq, logp))
    if on_policy and math.isfinite(lz.value):
        _estimate(out, "kl/policy_target_is", kl_policy_target(lt, logp, lz.value))
    if diversity:
        texts = batch.samples.texts
        out["diversity/distinct_1"] = distinct_n(texts, 1)  # word n-grams
        out["diversity/distinct_2"] = distinct_n(texts, 2)
        out["diversity/distinct_1_tokens"] = distinct_n_tokens(batch.samples, 1)  # token n-grams (any vocabulary)
        out["diversity/distinct_2_tokens"] = distinct_n_tokens(batch.samples, 2)
        out["diversity/self_bleu"] = self_bleu(texts)
    return out


def average_over_contexts(rows: list[dict[str, float]]) -> dict[str, float]:
    """One row of exact metrics from one row per context: the mean over contexts of every key (so
    kl/target_exact = mean_x KL(p*(.|x) || pi(.|x)) and log_z/exact = mean_x log Z(x)), and with more than one
    context the largest per-context KLs, kl/target_exact_max and kl/policy_target_exact_max."""
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if len(rows) > 1:
        for key in ("kl/target_exact", "kl/policy_target_exact"):
            if key in rows[0]:
                out[f"{key}_max"] = max(r[key] for r in rows)
    return out


class ExactMetrics:
    """Exact metrics of a policy against p* over the enumerated space of one context x (enumerated once,
    with the prior). The target is normalised over this context's sequences alone, so every value is the
    conditional one: p*(y|x) = pi0(y|x) phi(x, y) / Z(x), log_z/exact = log Z(x), KLs between p*(.|x) and pi(.|x)."""

    def __init__(self, space: SequenceSpace, log_potential: torch.Tensor, rewards: torch.Tensor, gold: torch.Tensor | None = None):
        self.space = space
        self.log_prior = space.logp
        self.log_target, self.log_z = normalise(self.log_prior + log_potential)
        self.rewards = rewards
        self.gold = gold  # metrics.gold's values over the space: gold/exact

    def __call__(self, policy) -> dict[str, float]:
        return self.of(self.space.log_prob(policy))

    def of(self, log_pi: torch.Tensor) -> dict[str, float]:
        """The same metrics for any distribution over the space given as log-probs (N,), e.g. the exact
        distribution of best-of-n or QRS (tiltlm.algorithms.inference), so baselines are measured like policies."""
        log_pi = log_pi.double()
        return {
            "kl/target_exact": kl(self.log_target, log_pi),
            "kl/policy_target_exact": kl(log_pi, self.log_target),
            "tv/target_exact": tv(log_pi, self.log_target),
            "kl/prior_exact": kl(log_pi, self.log_prior),
            "entropy/exact": entropy(log_pi),
            "reward/exact": expectation(log_pi, self.rewards),
            "log_z/exact": self.log_z,
            **({} if self.gold is None else {"gold/exact": expectation(log_pi, self.gold)}),
        }


def exact_for_context(target, context: str, *, row: dict | None = None, max_new_tokens: int | None = None,
                      max_sequences: int | None = None, gold=None) -> ExactMetrics:
    """ExactMetrics of one context x (a prompt, with its dataset ``row``'s other columns): pi0's whole space after x,
    enumerated once, scored by the target as training scores a sample of x, so p* is the conditional p*(.|x);
    ``gold`` (a Reward, metrics.gold) scores the same sequences for gold/exact."""
    from tiltlm.exact import enumerate_space
    from tiltlm.targets.base import rewards_of

    options = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("max_sequences", max_sequences)) if v is not None}
    space = enumerate_space(target.prior, context=context, **options)
    space.samples.columns = {k: [v] for k, v in row.items()} if row else None
    scores = target.score(space.samples, prior_logp=space.logp)
    return ExactMetrics(space, scores.log_target - space.logp, scores.reward,
                        None if gold is None else rewards_of(gold, space.samples))


def gold_metrics(batch: Batch, logp: torch.Tensor, gold, *, on_policy: bool) -> dict[str, float]:
    """gold/mean: the gold reward (metrics.gold, a Reward training never sees) under the batch's samples of pi; drawn
    from a proposal q, weighted by pi/q (self-normalised) as reward/mean is. ``logp``: log pi(x) before the step."""
    from tiltlm.targets.base import rewards_of

    g = rewards_of(gold, batch.samples)  # finite: a Reward refuses NaN and inf (tiltlm.rewards.base)
    if on_policy:
        return {"gold/mean": float(g.mean())}
    w = torch.softmax(logp.detach().double().cpu() - batch.logq.cpu(), 0)
    return {"gold/mean": float((w * g).sum())}


def kl_text(row: dict, key: str = "kl/prior_seq") -> str:
    """KL(pi‖pi0) of a metrics row as users should read it: the exact value when the row has one, else the
    estimate named as an estimate, with its 95% interval (a k1 estimate is unbiased but may come out < 0)."""
    exact = row.get(key.replace("_seq", "_exact"))
    if isinstance(exact, (int, float)):
        return f"KL(pi||pi0) {exact:.4f} (exact)"
    value = row.get(key)
    if not isinstance(value, (int, float)):
        return "KL(pi||pi0) not measured"
    name = row.get(key.replace("_seq", "_estimator"), "k1")
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    interval = f", 95% interval [{low:.4f}, {high:.4f}]" if isinstance(low, (int, float)) and isinstance(high, (int, float)) else ""
    return f"KL(pi||pi0) {name} estimate {value:.4f}{interval}"
