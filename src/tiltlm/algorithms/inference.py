"""Inference baselines: sample approximately from p* ∝ pi0·phi without training anything.

Each draws sequences from a proposal q (by default the target's prior pi0) and selects some of them;
the selected `Samples` are then measured exactly like a trained policy's. Their cost is the number
of proposals drawn, reported next to the acceptance rate, the ESS of the importance weights
w = P/q and, where the target is known, the IS estimate of log Z.

- `importance_resample`  sampling-importance-resampling (Rubin 1987): consistent as proposals -> inf.
- `quasi_rejection_sample`  QRS (Eikema, Kruszewski, Dance, Dymetman 2022): exact rejection sampling
  once beta_qrs >= max P/q, a tunable approximation below it.
- `best_of_n`  keep the highest-reward of n draws: the reward-maximising baseline, not a sampler of p*.

The ``*_exact_distribution`` functions give, on an enumerated space, the distribution each sampler
actually draws from, so tests (and the exact report) can compare them with p*.
Selected rows keep ``token_logp`` = log q: the selected distribution has no tractable density.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from tiltlm.errors import TiltlmError
from tiltlm.metrics.divergences import Estimate, effective_sample_size, log_z
from tiltlm.policies.base import Policy, Samples
from tiltlm.targets.base import Target


@dataclass
class InferenceResult:
    """Selected samples and what they cost; per-context lists follow ``samples.contexts``."""

    samples: Samples
    """The selected sequences (resampled / accepted / best-of-n)."""
    n_proposals: int
    """Sequences drawn from the proposal over all contexts: the compute cost."""
    acceptance_rate: float
    """Selected / drawn (QRS: the fraction accepted; best-of-n: 1/n; SIR: n_out / n_proposals)."""
    ess: list[float] = field(default_factory=list)
    """Per context, ESS of the importance weights P/q of the proposals ([] for best-of-n)."""
    log_z: list[Estimate] = field(default_factory=list)
    """Per context, the IS estimate log mean(P/q) from the proposals ([] for best-of-n)."""

    def as_dict(self) -> dict:
        """Flat diagnostics (means over contexts), for namespacing by the caller."""
        out = {"n_proposals": self.n_proposals, "n_selected": len(self.samples), "acceptance_rate": self.acceptance_rate}
        if self.ess:
            out["ess"] = sum(self.ess) / len(self.ess)
        if self.log_z:
            out["log_z"] = sum(e.value for e in self.log_z) / len(self.log_z)
        return out


def _child_seed(seed: int, purpose: str) -> int:
    """An independent stream for each random choice made after the proposal's own sampling."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}/{purpose}".encode()).digest()[:7], "little")


def _propose(target: Target, proposal: Policy | None, contexts: list[str], n: int, seed: int):
    """x ~ q, n per context, with log q (B,) and log P (B,) float64."""
    if int(n) < 1:
        raise TiltlmError(f"the number of proposals per context must be >= 1 (got {n})")
    q = target.prior if proposal is None else proposal
    s = q.sample(list(contexts), int(n), seed=seed)
    lq = s.logp.double().cpu()
    lt = target.log_score(s, prior_logp=s.logp if q is target.prior else None)
    return s, lq, lt


def _group_rows(s: Samples) -> list[torch.Tensor]:
    return [(s.group == g).nonzero().squeeze(-1) for g in range(len(s.contexts))]


def _is_diagnostics(s: Samples, lq: torch.Tensor, lt: torch.Tensor) -> tuple[list[float], list[Estimate]]:
    rows = _group_rows(s)
    return [effective_sample_size(lt[r] - lq[r]) for r in rows], [log_z(lt[r], lq[r]) for r in rows]


# ---- sampling-importance-resampling ---------------------------------------------------------------
def importance_resample(
    target: Target, proposal: Policy | None, contexts: list[str], n_proposals: int, n_out: int, seed: int
) -> InferenceResult:
    """SIR: per context draw ``n_proposals`` x_j ~ q, then ``n_out`` times pick x_j with probability
    w_j / sum_k w_k, w_j = P(x_j)/q(x_j) (with replacement). The draws follow the self-normalised IS
    approximation of p*, which converges to p* as n_proposals -> inf; how far it is at finite size
    is what the ESS says (n_out >> ESS means many repeats of few sequences).
    """
    if int(n_out) < 1:
        raise TiltlmError(f"n_out must be >= 1 (got {n_out})")
    s, lq, lt = _propose(target, proposal, contexts, n_proposals, seed)
    gen = torch.Generator().manual_seed(_child_seed(seed, "resample"))
    picked = []
    for g, rows in enumerate(_group_rows(s)):
        log_w = lt[rows] - lq[rows]
        if not torch.isfinite(log_w).any():
            raise TiltlmError(
                f"none of the {len(rows)} proposals for context {s.contexts[g]!r} has positive target mass; "
                "draw more proposals or loosen the constraint"
            )
        picked.append(rows[torch.multinomial(torch.softmax(log_w, 0), int(n_out), replacement=True, generator=gen)])
    ess, lz = _is_diagnostics(s, lq, lt)
    return InferenceResult(s.select(torch.cat(picked)), len(s), int(n_out) * len(contexts) / len(s), ess, lz)


# ---- quasi-rejection sampling ---------------------------------------------------------------------
def quasi_rejection_sample(
    target: Target,
    proposal: Policy | None,
    contexts: list[str],
    n_proposals: int,
    beta_qrs: float | None = None,
    seed: int = 0,
    *,
    log_beta: float | None = None,
) -> InferenceResult:
    """QRS (Eikema et al. 2022): accept x ~ q with probability min(1, P(x) / (beta_qrs q(x))).

    Accepted samples follow `qrs_exact_distribution` ∝ min(q(x), P(x)/beta_qrs): exactly p* when
    beta_qrs >= max_x P(x)/q(x) (plain rejection sampling), closer to q as beta_qrs shrinks, with
    expected acceptance rate sum_x min(q(x), P(x)/beta_qrs) (`qrs_acceptance_exact`) — quality is
    bought with proposals. Give ``log_beta`` instead of ``beta_qrs`` when P/q is beyond float range.
    Each context gets ``n_proposals`` draws, so the accepted count per context is random (maybe 0).
    """
    lb = _log_beta(beta_qrs, log_beta)
    s, lq, lt = _propose(target, proposal, contexts, n_proposals, seed)
    log_accept = torch.clamp(lt - lq - lb, max=0.0)  # (B,) log min(1, P/(beta q)); -inf where P = 0
    gen = torch.Generator().manual_seed(_child_seed(seed, "accept"))
    u = torch.rand(len(s), generator=gen, dtype=torch.float64)
    accepted = (torch.log(u) < log_accept).nonzero().squeeze(-1)
    ess, lz = _is_diagnostics(s, lq, lt)
    return InferenceResult(s.select(accepted), len(s), accepted.numel() / len(s), ess, lz)


def _log_beta(beta_qrs: float | None, log_beta: float | None) -> float:
    if (beta_qrs is None) == (log_beta is None):
        raise TiltlmError("give QRS exactly one of beta_qrs or log_beta; beta_qrs >= max P/q makes it exact rejection sampling")
    if log_beta is not None:
        if not math.isfinite(log_beta):
            raise TiltlmError(f"log_beta must be finite (got {log_beta})")
        return float(log_beta)
    if not (beta_qrs > 0 and math.isfinite(beta_qrs)):
        raise TiltlmError(f"beta_qrs must be a finite number > 0 (got {beta_qrs}); pass log_beta for values beyond float range")
    return math.log(beta_qrs)


def _log_qrs_mass(log_target_unnorm: torch.Tensor, log_q: torch.Tensor, log_beta: float) -> torch.Tensor:
    """log (q(x) min(1, P(x)/(beta q(x)))) = log min(q(x), P(x)/beta), (N,) float64."""
    return torch.minimum(log_q.double(), log_target_unnorm.double() - float(log_beta))


def qrs_exact_distribution(log_target_unnorm: torch.Tensor, log_q: torch.Tensor, log_beta: float) -> torch.Tensor:
    """log-probs (N,) of what QRS draws from: ∝ q(x) min(1, P(x)/(beta q(x))) over an enumerated space.

    For beta >= max_x P(x)/q(x) every term is P(x)/beta, so this is exactly p* = P/Z (rejection
    sampling; assuming supp p* ⊆ supp q).
    """
    log_a = _log_qrs_mass(log_target_unnorm, log_q, log_beta)
    total = torch.logsumexp(log_a, 0)
    if not torch.isfinite(total):
        raise TiltlmError("QRS accepts nothing: the target and the proposal share no sequence with positive mass")
    return log_a - total


def qrs_acceptance_exact(log_target_unnorm: torch.Tensor, log_q: torch.Tensor, log_beta: float) -> float:
    """Expected acceptance rate sum_x q(x) min(1, P(x)/(beta q(x))) (log_q normalised)."""
    return float(torch.logsumexp(_log_qrs_mass(log_target_unnorm, log_q, log_beta), 0).exp())


# ---- best-of-n ------------------------------------------------------------------------------------
def best_of_n(reward, proposal: Policy, contexts: list[str], n: int, n_out: int, seed: int) -> InferenceResult:
    """For each of ``n_out`` outputs per context, draw n x ~ q and keep the highest r(x) (first on ties).

    ``reward`` is anything `tiltlm.rewards.get_reward` accepts (e.g. ``target.tilt.reward``).
    The output follows `best_of_n_exact_distribution`; n = 1 gives q itself. It maximises reward,
    it does not sample p* (its KL to q is at most log n - (n-1)/n, Beirami et al. 2024).
    """
    from tiltlm.rewards import get_reward

    n, n_out = int(n), int(n_out)
    if n < 1 or n_out < 1:
        raise TiltlmError(f"best-of-n needs n >= 1 and n_out >= 1 (got n={n}, n_out={n_out})")
    r = get_reward(reward)
    s = proposal.sample(list(contexts), n * n_out, seed=seed)
    values = r(s.texts, [s.context_of(i) for i in range(len(s))])  # (B,) float64
    picked = []
    for rows in _group_rows(s):
        draws = rows.reshape(n_out, n)  # (n_out, n): one output per row of n draws
        picked.append(draws.gather(1, values[draws].argmax(1, keepdim=True)).squeeze(1))  # argmax: first max
    return InferenceResult(s.select(torch.cat(picked)), len(s), 1.0 / n)


def best_of_n_exact_distribution(log_q: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """log-probs (N,) of the best of n i.i.d. draws from q over an enumerated space, ties to the first.

    Group sequences by reward level v; with m_lt the q-mass below v and m_eq the mass at v,
    P(max level = v) = (m_lt + m_eq)^n - m_lt^n. Given that level, the kept draw (the first draw at
    level v) is distributed as q restricted to the level — which of the tied draws comes first is
    independent of which sequences they are — so x at level v gets P(level) q(x)/m_eq. ``log_q`` is
    normalised first; rewards are compared exactly.
    """
    n = int(n)
    if n < 1:
        raise TiltlmError(f"best-of-n needs n >= 1 (got {n})")
    log_q = log_q.double() - torch.logsumexp(log_q.double(), 0)
    q, rewards = log_q.exp(), rewards.double()
    levels, level_of = torch.unique(rewards, sorted=True, return_inverse=True)  # ascending
    m_eq = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, level_of, q)
    # from the upper tail, so the top levels (where best-of-n puts its mass) lose no precision:
    # (m_lt + m_eq)^n - m_lt^n = (1 - m_gt)^n - (1 - m_ge)^n
    m_ge = m_eq.flip(0).cumsum(0).flip(0).clamp(max=1.0)
    m_gt = (m_ge - m_eq).clamp(min=0.0)
    p_level = torch.exp(n * torch.log1p(-m_gt)) - torch.exp(n * torch.log1p(-m_ge))  # (L,)
    out = torch.full_like(log_q, -math.inf)
    keep = q > 0
    out[keep] = torch.log(p_level[level_of[keep]]) + log_q[keep] - torch.log(m_eq[level_of[keep]])
    return out
