"""FlowRL (Zhu et al. 2025, arXiv 2509.15207): trajectory balance (Malkin et al. 2022) toward p*.

The residual of a sample y of context x, with log phi = log P − log pi0 (= r(x, y)/beta for the tilt
Prior * Tilt(r, beta); any target with finite log P works) and a learned per-context log Z(x):

    delta(x, y) = log Z(x) + log pi(y|x) − log pi0(y|x) − log phi(x, y)

and the loss mean(delta²), differentiated through log pi and log Z but not through the sampling
distribution (on-policy, one pass per batch). FlowRL multiplies each term by a detached, clipped
importance weight clip(pi/pi_old, 1 ± eps) to reuse a rollout for several micro-batch updates; here every
batch is used once, at the weights that drew it, where that weight is exactly 1 — so it is left out.

**Fixed point** (docs/math.md §7). delta = 0 for every y ⇔ pi(y|x) = pi0·phi / Z(x) = p*(y|x) and
log Z(x) = the true log normaliser. More strongly, the expected gradient in theta is
2 E_pi[delta grad log pi] = 2 grad KL(pi || p*) for *any* value of log Z (a per-context constant times
E_pi[grad log pi] = 0): log Z is only a baseline, and on-policy TB is reverse-KL descent (as kl-pg). With
``log_z: batch`` the per-sample gradient is exactly 2/beta times kl-pg's (k1 in the reward, leave-one-out
baseline): delta = −A/beta.

``length_normalize`` (FlowRL's 1/|y| on the log-probability terms, reward not divided):

    delta_n = log Z(x) + (log pi(y|x) − log pi0(y|x)) / |y| − log phi(x, y)

changes the target. delta_n = 0 everywhere ⇔ pi(y|x) = pi0(y|x) exp(|y| (log phi(x, y) − c(x))) with c(x)
the unique root of sum_y pi0(y|x) exp(|y| (log phi − c)) = 1 (the sum falls strictly from +inf to 0 as
c grows, since |y| >= 1). This length tilt is *not* p*: among sequences of one length l it is
∝ pi0·phi^l (for the tilt, p* at temperature beta/l), and length l is reweighted by e^{−l c}; it equals p*
only where |y| = 1 for all y or phi is constant. log Z(x) converges to c(x), not to log Z*(x). It is the
only interior stationary point of the on-policy loss jointly in (pi, log Z) (docs/math.md §7.3);
``length_normalized_fixed_point`` computes it exactly. Here the value of log Z matters
(E_pi[grad log pi / |y|] != 0), so it must be at its own optimum.

**log Z** is a table of scalars, one per context (keyed by a digest of the context string, the
``log_z_max_contexts`` most recently seen kept), checkpointed with the algorithm's state; FlowRL's Z is an
MLP on the prompt's hidden state, which generalises across prompts — a table does not. ``log_z``:

- ``learned`` (default): each batch, after the policy's step, one gradient step of size ``log_z_lr`` on
  the context's ½·mean(delta²): log Z ← log Z − lr·mean(delta), i.e. an exponential moving average
  toward the batch's closed-form optimum log Z = −mean(delta − log Z). A context seen for the first time
  starts at that closed-form value. The loss of a batch uses the log Z of the batches before it.
- ``batch``: no memory; each row's log Z is the closed form over the *other* samples of its context
  (leave-one-out, so it is independent of the row and the stationary condition is the learned one's).
  Needs n_per_context >= 2; better when prompts recur rarely (a prompt dataset).

Where FlowRL differs beyond that: it uses a group-normalised reward beta_F·(r − mean)/std, which sets a
per-prompt temperature std(x)/beta_F; here phi is the target's, so the fixed point is this target's p*.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, leave_one_out, register_algorithm
from tiltlm.algorithms.dpg import context_key
from tiltlm.errors import TiltlmError


def tb_terms(logp: torch.Tensor, logp_prior: torch.Tensor, log_target: torch.Tensor, lengths: torch.Tensor,
             *, length_normalize: bool) -> torch.Tensor:
    """delta − log Z per row, (B,): (log pi − log pi0)[/|y|] − log phi; differentiable through ``logp`` (B,)."""
    log_ratio = logp - logp_prior.to(logp.dtype)
    if length_normalize:
        log_ratio = log_ratio / lengths.to(logp.dtype).clamp(min=1)
    log_phi = (log_target.double() - logp_prior.double()).to(logp.dtype)
    return log_ratio - log_phi


def tb_loss(terms: torch.Tensor, log_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectory balance mean((log Z + terms)²) and the residuals delta (B,); ``log_z`` (B,) each row's (detached)."""
    delta = log_z.to(terms.dtype) + terms
    return (delta**2).mean(), delta.detach()


def length_normalized_fixed_point(log_prior: torch.Tensor, log_phi: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The fixed point of length-normalised TB over one context's enumerated space: (log pi (N,), c) with
    pi(y) = pi0(y) exp(|y| (log phi(y) − c)) and c the root of sum_y pi(y) = 1 (bisection, float64).

    log sum_y pi0 exp(|y| (log phi − c)) falls strictly in c; it is >= 0 at c = min log phi and <= 0 at
    c = max log phi (over pi0's support), so the root is bracketed there."""
    log_prior, log_phi, lengths = log_prior.double(), log_phi.double(), lengths.double()
    support = ~torch.isneginf(log_prior)
    if not bool((lengths[support] >= 1).all()):
        raise TiltlmError("every sequence needs at least one token (|y| >= 1) for the length-normalised fixed point")

    def log_mass(c: float) -> float:
        return float(torch.logsumexp(log_prior + lengths * (log_phi - c), 0))

    lo, hi = float(log_phi[support].min()), float(log_phi[support].max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_mass(mid) > 0 else (lo, mid)
    c = 0.5 * (lo + hi)
    log_pi = log_prior + lengths * (log_phi - c)
    return log_pi - torch.logsumexp(log_pi, 0), c  # the renormalisation only removes bisection rounding


class FlowRlConfig(AlgorithmConfig):
    length_normalize: bool = Field(False, description="divide log pi − log pi0 by |y| (FlowRL): the fixed point becomes the "
                                                      "length tilt pi0·exp(|y|(log phi − c)), not p* (docs/math.md §7)")
    log_z: Literal["learned", "batch"] = Field("learned", description="learned: a per-context table stepped by log_z_lr each "
                                                                     "batch; batch: each row's leave-one-out closed form")
    log_z_lr: float = Field(0.1, gt=0, le=1, description="learned: step on ½·mean(delta²) per context (1 = jump to the batch's optimum)")
    log_z_max_contexts: int = Field(65536, ge=1, description="learned: contexts kept in the table (least recently seen dropped first)")


@register_algorithm
class FlowRl(Algorithm):
    name = "flowrl"
    Config = FlowRlConfig

    def __init__(self, config: FlowRlConfig):
        super().__init__(config)
        self.table: OrderedDict[str, float] = OrderedDict()  # context digest -> learned log Z(x)

    def _terms(self, batch: Batch, logp: torch.Tensor) -> torch.Tensor:
        if bool(torch.isneginf(batch.log_target).any()):
            raise TiltlmError("flowrl's residual log Z + log pi − log P is infinite on a sample the target gives zero mass "
                              "(a constraint): trajectory balance cannot fit P = 0; use dpg, gdc++ or f-dpg for constraint targets")
        return tb_terms(logp, batch.logp_prior, batch.log_target, batch.samples.lengths,
                        length_normalize=self.config.length_normalize)

    def row_log_z(self, batch: Batch, terms: torch.Tensor) -> torch.Tensor:
        """Each row's log Z (B,) float64: its context's table entry, or (``batch``) the leave-one-out closed form."""
        terms = terms.detach().double().cpu()
        group = batch.group.cpu()
        if self.config.log_z == "batch":
            return -leave_one_out(terms, group)
        fallback = -torch.zeros(len(batch.samples.contexts), dtype=torch.float64).index_add_(0, group, terms) / torch.bincount(
            group, minlength=len(batch.samples.contexts)).clamp(min=1)  # a context not in the table: this batch's optimum
        per_group = torch.tensor([self.table.get(context_key(c), float(f)) for c, f in zip(batch.samples.contexts, fallback)],
                                 dtype=torch.float64)
        return per_group[group]

    def observe(self, batch: Batch) -> None:
        """A context seen for the first time starts at the batch's closed-form optimum −mean(terms)."""
        if self.config.log_z != "learned":
            return
        terms, group = self._terms(batch, batch.logq).double().cpu(), batch.group.cpu()
        for g, context in enumerate(batch.samples.contexts):
            rows = group == g
            if rows.any() and context_key(context) not in self.table:
                self._set(context_key(context), -float(terms[rows].mean()))

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        terms = self._terms(batch, logp)
        log_z = self.row_log_z(batch, terms).to(terms.device)
        loss, delta = tb_loss(terms, log_z)
        return loss, {"loss/residual_abs": float(delta.abs().mean()), "log_z/mean": float(log_z.mean())}

    def after_step(self, batch: Batch, policy, logp: torch.Tensor) -> dict[str, float]:
        """learned: log Z(x) ← log Z(x) − lr·mean(delta) over x's rows, at the pre-step policy (a joint gradient step)."""
        if self.config.log_z != "learned":
            return {}
        terms, group = self._terms(batch, logp).double().cpu(), batch.group.cpu()
        lr = self.config.log_z_lr
        for g, context in enumerate(batch.samples.contexts):
            rows = group == g
            if rows.any():
                key = context_key(context)
                old = self.table.get(key, -float(terms[rows].mean()))
                self._set(key, old - lr * float((old + terms[rows]).mean()))
        return {"log_z/table_size": len(self.table)}

    def _set(self, key: str, value: float) -> None:
        self.table.pop(key, None)
        self.table[key] = value  # now the most recently seen
        while len(self.table) > self.config.log_z_max_contexts:
            self.table.popitem(last=False)

    def state_dict(self):
        return {"log_z": [[key, value] for key, value in self.table.items()]}  # oldest first

    def load_state_dict(self, state):
        self.table = OrderedDict((key, float(value)) for key, value in state.get("log_z", []))
