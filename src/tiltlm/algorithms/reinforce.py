"""REINFORCE: pure reward maximisation, the beta -> 0 (hardmax) limit of the tilt.

J(theta) = E_pi[r(x)];  grad J = E_pi[(r(x) - b) grad log pi(x)]  (Williams 1992), with the
leave-one-out baseline b of the other samples of the same context (RLOO, Kool et al. 2019).
The optimum is a point mass on argmax r within the support reached: distribution collapse.

Two explicit diversity objectives (shared with kl-pg):
- an entropy bonus alpha·H(pi) (pseudo-reward -alpha·log pi(x));
- a set-level reward: the k = n_per_context samples S of a context are scored together by R(S)
  and the objective is E[R(S)]. Its gradient is E[sum_i (R(S) - R(S minus x_i)) grad log pi(x_i)]:
  R(S minus x_i) does not depend on x_i, so it is a valid baseline and the credit of x_i is its
  marginal contribution. R is ``max`` (best-of-k reward), ``any`` (pass@k: some sample is correct)
  or ``distinct`` (number of distinct correct samples), with correct meaning r(x) >= threshold.
  The per-sample reward is replaced by n times the credit (the loss averages over the n samples of
  a context, so its gradient estimates grad E[R(S)]), and no further baseline is subtracted (a
  baseline built from the other credits would depend on x_i).

pass@k and max@k for any k <= n (PKPO, Walder & Karkhanis 2025, "Pass@k Policy Optimization";
docs/math.md §10.1): with ``k`` set, ``any``/``max`` optimise E[max of k i.i.d. samples' f] (f = 1[correct]
or r) from a group of n >= k. Averaging R over all C(n, k) k-subsets I of the group gives the unbiased
estimate rho = mean_I max_{i in I} f_i (binary: 1 - C(n-c, k)/C(n, k), c correct); the score-function
terms of x_i survive only in the subsets that contain i, so

    grad pass@k ≈ sum_i s_i grad log pi(x_i),   s_i = (k/n) · mean_{|T| = k-1, T ⊂ others} max(f_i, max_T f)

(binary: k/n when correct, (k/n)·(1 - C(n-1-c, k-1)/C(n-1, k-1)) when not), unbiased. A baseline of
the other samples keeps it unbiased (``set_baseline``): ``loo-1`` (the
default) subtracts (k/n)·mean_T max_T f, so s_i = (k/n)·mean_T [max(f_i, max_T f) - max_T f] is x_i's
average marginal contribution to a (k-1)-subset (binary: (k/n)·C(n-c, k-1)/C(n-1, k-1) when correct, 0
when not). k = n (or k unset) is exactly the set credit above. ``loo`` subtracts (k/n)·rho(others, k)
(needs n > k; k = 1 gives RLOO / n: the n·s_i the loss uses is then reinforce's advantage). For one
context pass@k = 1 - (1-p)^k is a function of the pass rate p alone, so its maximisers are those of pass@1: every pi with pi(correct) = 1; it does not prefer
spreading over the correct set (docs/math.md §10.3).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, leave_one_out, register_algorithm
from tiltlm.errors import TiltlmError


def policy_gradient_loss(
    logp: torch.Tensor, reward: torch.Tensor, group: torch.Tensor, *, baseline: bool = True, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-function loss -mean(w·(R - b_loo)·log pi); returns (loss, advantages). reward: (B,) treated as constant;
    ``weight`` w: importance weights of rows drawn by an earlier policy (``Batch.stale_weight``; None = 1)."""
    reward = reward.detach().double()
    advantage = reward - leave_one_out(reward, group) if baseline else reward
    scaled = advantage if weight is None else advantage * weight
    return -(scaled.to(logp.dtype) * logp).mean(), advantage


SetReward = Literal["none", "max", "any", "distinct"]


def subset_max_credit(values: torch.Tensor, k: int, baseline: str = "loo-1") -> torch.Tensor:
    """PKPO's credit s_i of each of one group's n samples for max@k (pass@k when ``values`` are 0/1), (n,) float64.

    s_i = (k/n) · (mean over the (k-1)-subsets T of the others of max(f_i, max_T f)) - b_i, with b_i = 0
    (``none``), (k/n)·mean_T max_T f (``loo-1``; max over the empty T is 0) or (k/n)·rho_k(others) (``loo``).
    With the others sorted ascending v_1..v_m (m = n - 1), P(max_T = v_j) = C(j-1, k-2)/C(m, k-1) and a
    k-subset of the others has max v_j with probability C(j-1, k-1)/C(m, k): O(n²), no subset enumeration.
    """
    values = values.double()
    n = values.numel()
    if not 1 <= k <= n:
        raise TiltlmError(f"set reward at k = {k} needs n_per_context >= k samples per context (got {n}); lower k or raise sampling.n_per_context")
    if baseline == "loo" and k >= n:
        raise TiltlmError(f"set_baseline 'loo' estimates pass@{k} from the other n - 1 = {n - 1} samples, which needs n_per_context > k; "
                          "use set_baseline 'loo-1' or lower k")
    m = n - 1
    vals, order = values.sort()
    keep = torch.arange(m).unsqueeze(0) + (torch.arange(m).unsqueeze(0) >= torch.arange(n).unsqueeze(1)).long()  # (n, m)
    others = vals[keep]  # (n, m): row r = the sorted values without the r-th smallest
    j = range(1, m + 1)
    if k >= 2:
        w = torch.tensor([math.comb(i - 1, k - 2) / math.comb(m, k - 1) for i in j], dtype=torch.float64)  # (m,)
        with_i = (torch.maximum(vals.unsqueeze(1), others) * w).sum(1)
        without_i = (others * w).sum(1)  # mean_T max_T f
    else:  # T is empty: max(f_i, max_T) = f_i, and max over nothing is 0
        with_i, without_i = vals, torch.zeros_like(vals)
    credit = with_i
    if baseline == "loo-1":
        credit = with_i - without_i
    elif baseline == "loo":
        u = torch.tensor([math.comb(i - 1, k - 1) / math.comb(m, k) for i in j], dtype=torch.float64)
        credit = with_i - (others * u).sum(1)
    out = torch.empty_like(values)
    out[order] = (k / n) * credit
    return out


def set_credit(
    texts: list[str], reward: torch.Tensor, group: torch.Tensor, kind: str, threshold: float,
    k: int | None = None, baseline: str = "loo-1",
) -> torch.Tensor:
    """Credit of each sample within its context's set S, (B,) float64: R(S) - R(S minus x_i) when k is None (k = n),
    PKPO's subset credit of max@k / pass@k otherwise (``subset_max_credit``)."""
    reward = reward.double()
    credit = torch.zeros_like(reward)
    correct = reward >= threshold
    for g in group.unique().tolist():
        rows = (group == g).nonzero().squeeze(-1)
        idx = rows.tolist()
        if kind in ("max", "any"):
            values = reward[rows] if kind == "max" else correct[rows].double()
            credit[rows] = subset_max_credit(values, len(idx) if k is None else k, baseline)
        elif kind == "distinct":
            counts: dict[str, int] = {}
            for i in idx:
                if correct[i]:
                    counts[texts[i]] = counts.get(texts[i], 0) + 1
            for i in idx:
                credit[i] = float(bool(correct[i]) and counts[texts[i]] == 1)
    return credit


def shaped_reward(batch, c: "SetRewardConfig") -> tuple[torch.Tensor, bool]:
    """The per-sample reward an on-policy gradient uses, and whether a leave-one-out baseline applies."""
    reward = batch.reward
    if c.set_reward != "none":
        credit = set_credit(batch.samples.texts, reward, batch.group, c.set_reward, c.correct_threshold, c.k, c.set_baseline)
        # sum_i credit_i grad log pi(x_i) estimates grad E[R]; the loss is a mean over the batch, so scale by the
        # group's size n: the loss's gradient is then grad E[R] averaged over the contexts (at k = 1 with loo: RLOO exactly)
        reward = credit * torch.bincount(batch.group).double()[batch.group]
    return reward + entropy_pseudo_reward(batch.logq, c.entropy_coef), c.set_reward == "none"


def entropy_pseudo_reward(logq: torch.Tensor, coef: float) -> torch.Tensor:
    """-alpha log pi(x): its score-function gradient is alpha·grad H(pi) (on-policy)."""
    return -coef * logq.double()


class SetRewardConfig(AlgorithmConfig):
    """The reward-shaping options reinforce and kl-pg share (entropy bonus, set-level rewards, PKPO's pass@k)."""

    entropy_coef: float = Field(0.0, ge=0, description="alpha of the entropy bonus alpha·H(pi); 0 = pure RL")
    set_reward: SetReward = Field("none", description="score each context's samples as a set: max, any (pass@k), distinct")
    correct_threshold: float = Field(0.5, description="a sample is correct when r(x) >= this (set rewards any/distinct)")
    k: int | None = Field(None, ge=1, description="set rewards any/max: optimise pass@k / max@k of k <= n_per_context samples "
                                                  "(PKPO); null = k = n_per_context")
    set_baseline: Literal["loo-1", "loo", "none"] = Field(
        "loo-1", description="baseline of the set credits: loo-1 (marginal over the others' (k-1)-subsets), loo (the others' "
                             "pass@k, needs n > k) or none")

    @model_validator(mode="after")
    def _k_needs_a_subset_reward(self):
        if self.k is not None and self.set_reward not in ("any", "max"):
            raise ValueError(f"k = {self.k} is the subset size of set_reward any (pass@k) or max (max@k); set one of those "
                             f"(set_reward is '{self.set_reward}') or drop k")
        return self


class ReinforceConfig(SetRewardConfig):
    pass


@register_algorithm
class Reinforce(Algorithm):
    name = "reinforce"
    Config = ReinforceConfig

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        reward, baseline = shaped_reward(batch, self.config)
        loss, adv = policy_gradient_loss(logp, reward, batch.group, baseline=baseline, weight=batch.stale_weight(logp))
        return loss, {"loss/advantage_abs": float(adv.abs().mean())}
