"""Distributional Policy Gradient (Parshakova et al. 2019; Khalifa et al. 2021), GDC++ and CDPG (Korbak et al. 2022).

Minimise the cross-entropy CE(theta) = -E_p[log pi_theta] (= KL(p || pi_theta) + const) by
importance sampling from a proposal q:

    grad CE = -E_q[(P(x) / (Z q(x))) grad log pi(x)]

- on-policy: q = pi_theta at sampling time;
- off-policy: q is a frozen copy, replaced by pi_theta when the IS estimate of KL(p||pi_theta) drops
  below that of KL(p||q) (the KL-adaptive update), checked every ``proposal_check_every`` steps on that step's
  batch with pi_theta after the step's update.
Z is a running importance-sampling estimate over every batch so far, log Z_hat = log mean P/q.
GDC++ subtracts the baseline pi/q from the weight: A(x) = P/(Zq) - pi/q; unbiased because
E_q[(pi/q) grad log pi] = sum_x grad pi(x) = 0, and it vanishes at the optimum, so the gradient
noise goes to zero as pi -> p.

**Conditional targets** (docs/math.md §3.5). With contexts c (prompts) the target is a posterior per
context, p(y|c) = P(c, y)/Z(c) with Z(c) = E_{pi0(.|c)}[phi] (for a verifier: pi0's pass rate on c), and
the objective is the average over contexts of KL(p(.|c) || pi(.|c)) (CDPG). Its gradient is

    grad = -E_c E_{q(.|c)}[(P(c, y) / (Z(c) q(y|c))) grad log pi(y|c)],

so each row's weight is normalised by *its own context's* Z(c) — ``log_z: per_context``, the default.
log Z(c) is the log-mean-exp of the importance weights P/q of c's samples, pooled with every earlier
batch's samples of c (a running estimate per context, keyed by a digest of the context string; the
``log_z_max_contexts`` most recently seen contexts are kept, so a dataset with more prompts than that
restarts a dropped prompt's estimate from its next batch). ``log_z: global`` (the behaviour before)
divides every row by one Z = mean_c Z(c) pooled over all contexts: the gradient of
sum_c (Z(c)/Z) KL(p(.|c) || pi(.|c)) — the joint p(c, y) ∝ P(c, y) over the batch's contexts — which
weighs a hard context (small Z(c)) by Z(c)/Z: a prompt that pi0 solves 1% of the time gets 50x smaller
steps than one it solves half the time (with weights shared across prompts, an optimiser cannot undo
that per prompt). With one context the two coincide exactly (same numbers, bit for bit).

A row whose log Z(c) is -inf (P = 0 on every sample of c so far: a constraint nothing met yet) gets
weight 0 — P/(Zq) is 0/0, no information about p — and no GDC++ baseline either (it is zero in
expectation, so it would be pure noise there).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Literal

import torch
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, register_algorithm, safe_exp
from tiltlm.metrics.divergences import kl_target_policy

LogZ = float | torch.Tensor
"""log Z: one float for every row (global) or (B,) per row (each row's context)."""


def dpg_loss(
    logp: torch.Tensor, logq: torch.Tensor, log_target: torch.Tensor, log_z: LogZ, *, baseline: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-mean(A log pi), A = P/(Zq) [- pi/q for GDC++]; returns (loss, A). All inputs (B,); ``log_z`` a float
    or (B,) (each row's log Z(c)).

    log Z = -inf means P(x) = 0 on every sample so far (a constraint nothing has met yet): P/(Zq) is
    then 0/0, and A is 0 (no sample carries information about p), not NaN.
    """
    log_w = log_target.double() - logq.double()
    log_z = torch.as_tensor(log_z, dtype=torch.float64).expand_as(log_w)
    known = ~torch.isneginf(log_z)
    zero = torch.zeros_like(log_w)
    weight = torch.where(known, safe_exp(log_w - torch.where(known, log_z, zero)), zero)  # P / (Z q)
    if baseline:
        weight = weight - torch.where(known, safe_exp(logp.detach().double() - logq.double()), zero)  # - pi / q
    return -(weight.to(logp.dtype) * logp).mean(), weight


def context_key(context: str) -> str:
    """The running estimate's key for a context: a 64-bit digest of the string (bounded size, stable across runs)."""
    return hashlib.blake2b(context.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class ContextLogZ:
    """Running IS estimates log Z(c) = log mean P/q over every sample of context c seen so far, at most
    ``max_contexts`` of them (the least recently seen is dropped first). JSON-able state."""

    def __init__(self, max_contexts: int):
        self.max_contexts = max_contexts
        self.entries: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (log sum of P/q, count)

    def update(self, batch: Batch) -> None:
        log_w = (batch.log_target.double() - batch.logq.double()).cpu()
        group = batch.group.cpu()
        for g, context in enumerate(batch.samples.contexts):
            rows = group == g
            n = int(rows.sum())
            if not n:
                continue
            key = context_key(context)
            total, seen = self.entries.pop(key, (-math.inf, 0))
            total = float(torch.logaddexp(torch.tensor(total, dtype=torch.float64), torch.logsumexp(log_w[rows], 0)))
            self.entries[key] = (total, seen + n)  # now the most recently seen
        while len(self.entries) > self.max_contexts:
            self.entries.popitem(last=False)

    def of_groups(self, batch: Batch) -> torch.Tensor:
        """log Z(c) of each of the batch's contexts, (C,) float64. A context without a running estimate (the
        batch was not observed, or its entry was dropped) gets the estimate of its samples in this batch."""
        log_w = (batch.log_target.double() - batch.logq.double()).cpu()
        group = batch.group.cpu()
        out = torch.zeros(len(batch.samples.contexts), dtype=torch.float64)
        for g, context in enumerate(batch.samples.contexts):
            entry = self.entries.get(context_key(context))
            if entry is None:
                rows = group == g
                entry = (float(torch.logsumexp(log_w[rows], 0)), int(rows.sum())) if rows.any() else (0.0, 1)
            out[g] = entry[0] - math.log(entry[1])
        return out

    def state_dict(self) -> list:
        return [[key, total, seen] for key, (total, seen) in self.entries.items()]  # oldest first

    def load_state_dict(self, state: list) -> None:
        self.entries = OrderedDict((key, (float(total), int(seen))) for key, total, seen in state)


class DistributionMatching(Algorithm):
    """Shared state of the DPG family: the running log Z (per context, or one) and the (optionally
    off-policy) proposal."""

    def __init__(self, config):
        super().__init__(config)
        self.on_policy = not config.off_policy
        self.log_w_sum = -math.inf  # log sum of all importance weights P/q seen so far (every context)
        self.n_seen = 0
        self.context_log_z = ContextLogZ(config.log_z_max_contexts)
        self.proposal_updates = 0
        self.steps = 0

    @property
    def per_context(self) -> bool:
        return self.config.log_z == "per_context"

    @property
    def log_z(self) -> float:
        """The global running estimate (every context pooled)."""
        return self.log_w_sum - math.log(self.n_seen) if self.n_seen else 0.0

    def row_log_z(self, batch: Batch) -> LogZ:
        """The log Z each row is normalised by: its context's (B,) or the global one (a float)."""
        if not self.per_context:
            return self.log_z
        return self.context_log_z.of_groups(batch)[batch.group.cpu()]

    def observe(self, batch: Batch) -> None:
        log_w = batch.log_target - batch.logq
        self.log_w_sum = float(torch.logaddexp(torch.tensor(self.log_w_sum, dtype=torch.float64), torch.logsumexp(log_w, 0)))
        self.n_seen += len(batch)
        if self.per_context:
            self.context_log_z.update(batch)

    def after_step(self, batch: Batch, policy, logp: torch.Tensor) -> dict[str, float]:
        self.steps += 1
        running = self.log_z
        if self.per_context:  # the mean of log Z(c) over the batch's contexts
            present = torch.bincount(batch.group.cpu(), minlength=len(batch.samples.contexts)) > 0
            running = float(self.context_log_z.of_groups(batch)[present].mean())
        stats = {"log_z/running": running}
        every = self.config.proposal_check_every
        if not self.on_policy and every and self.steps % every == 0:
            # the policy AFTER this step's update: ``logp`` is pi at the step's start, which is q itself right after
            # a replacement (and at step 1), so comparing it with q would decide by rounding
            with torch.no_grad():
                logp_now = policy.log_prob(batch.samples).double().to(batch.logq.device)
            kl_pi = self._kl_target(batch, logp_now)
            kl_q = self._kl_target(batch, batch.logq)
            stats.update({"dpg/kl_target_policy_is": kl_pi, "dpg/kl_target_proposal_is": kl_q})
            if kl_pi < kl_q:
                self.proposal = policy.copy()
                self.proposal_updates += 1
        stats["dpg/proposal_updates"] = self.proposal_updates
        return stats

    def _kl_target(self, batch: Batch, logp: torch.Tensor) -> float:
        """IS estimate of KL(p || pi): pooled over the batch (global), or the mean over the contexts of
        KL(p(.|c) || pi(.|c)) (per context; contexts without a sample in p's support are skipped)."""
        if not self.per_context:
            return kl_target_policy(batch.log_target, batch.logq, logp).value
        values = []
        for g in batch.group.unique().tolist():
            rows = batch.group == g
            value = kl_target_policy(batch.log_target[rows], batch.logq[rows], logp[rows]).value
            if math.isfinite(value):
                values.append(value)
        return sum(values) / len(values) if values else math.nan

    def state_dict(self):
        state = {"log_w_sum": self.log_w_sum, "n_seen": self.n_seen, "proposal_updates": self.proposal_updates, "steps": self.steps}
        if self.per_context:
            state["log_z_contexts"] = self.context_log_z.state_dict()
        return state

    def load_state_dict(self, state):
        self.log_w_sum, self.n_seen = float(state["log_w_sum"]), int(state["n_seen"])
        self.proposal_updates, self.steps = int(state["proposal_updates"]), int(state["steps"])
        self.context_log_z.load_state_dict(state.get("log_z_contexts", []))  # a global run's checkpoint has none


class DpgConfig(AlgorithmConfig):
    off_policy: bool = Field(False, description="sample from a frozen proposal q (initially pi0) instead of pi_theta")
    proposal_check_every: int = Field(1, ge=0, description="off-policy: steps between KL-adaptive proposal checks (0 = never update q)")
    log_z: Literal["per_context", "global"] = Field(
        "per_context", description="normalise each row by its context's running log Z(c) (the conditional p(y|c), CDPG) or by one "
                                   "log Z pooled over every context (the joint; the behaviour before per_context)")
    log_z_max_contexts: int = Field(65536, ge=1, description="per_context: running estimates kept (least recently seen context dropped first)")
    baseline: bool | None = Field(
        None, description="subtract GDC++'s baseline pi/q from the weight (unbiased; the gradient noise vanishes as pi -> p); "
                          "null = on (dpg and gdc++ alike); false = plain DPG, whose gradient noise stays of fixed size near p")


@register_algorithm
class Dpg(DistributionMatching):
    name = "dpg"
    Config = DpgConfig
    baseline = True  # GDC++'s baseline by default (plain DPG plateaus: README "Performance"); config.baseline overrides it

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        baseline = self.baseline if self.config.baseline is None else self.config.baseline
        loss, weight = dpg_loss(logp, batch.logq, batch.log_target, self.row_log_z(batch), baseline=baseline)
        return loss, {"loss/weight_abs": float(weight.abs().mean()), "loss/weight_max": float(weight.abs().max())}


@register_algorithm
class GdcPlusPlus(Dpg):
    name = "gdc++"
    baseline = True
