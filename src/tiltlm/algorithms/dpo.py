"""DPO, cDPO, IPO on preference pairs, and online DPO: the posterior's closed form, fitted on comparisons.

With u(y) = log pi_theta(y|x) - log pi0(y|x) (pi0 = the run's prior = the reference) and, for a pair y_w ≻ y_l,
h = u(y_w) - u(y_l) (docs/math.md §14):

- ``dpo`` (Rafailov et al. 2023):  loss = -log σ(beta·h).
- ``cdpo`` (conservative DPO, label smoothing eps; Mitchell 2023, TRL's ``label_smoothing``):
  loss = -(1 - eps)·log σ(beta·h) - eps·log σ(-beta·h): each label is wrong with probability eps.
- ``ipo`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"):
  loss = (h - 1/(2·tau))², with tau = beta (TRL's convention; h is not multiplied by beta).
- ``online-dpo`` (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): the pairs are
  consecutive samples (0,1), (2,3), … of each context's n_per_context draws from the current policy, labelled by
  the target's reward r: ``label: bt`` draws y_a ≻ y_b with probability σ(r(y_a) - r(y_b)) (Bradley–Terry, seeded
  per step), ``label: argmax`` takes the higher reward (a tie: the pair is dropped). Then the dpo (or, with
  ``loss: ipo``, the ipo) loss.

beta is target.beta, the run's one beta (docs/math.md §14). Fixed points, computed exactly in
tiltlm.exact.preferences: pairs that connect the whole space with labels drawn from BT(r) make DPO's population
minimiser pi0·exp(r/beta)/Z (so bt-labelled online DPO aims at p* too; argmax labels are BT at infinite scale and
aim at the hardmax); cDPO's satisfies σ(beta·h) = (1-eps)·σ(Δr) + eps·σ(-Δr) per pair; IPO's (pairs from a
behaviour mu) is pi0·exp(P(y ≻ mu)/beta)/Z, a tilt by the bounded win rate instead of r.

Metrics (means over the step's pairs, before its update): ``reward/margin`` beta·h, ``reward/accuracy`` the
fraction with h > 0, ``logp/chosen_vs_prior`` and ``logp/rejected_vs_prior`` u(y_w) and u(y_l).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tiltlm.algorithms.base import Algorithm, AlgorithmConfig, Batch, kl_coefficient, register_algorithm
from tiltlm.errors import TiltlmError


def dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair -(1-eps)·log σ(beta·h) - eps·log σ(-beta·h), (K,); its gradient in h is
    -beta·[(1-eps)·σ(-beta·h) - eps·σ(beta·h)]: it pushes h up until σ(beta·h) = 1 - eps (never, for eps = 0)."""
    z = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair (h - 1/(2·beta))², (K,) (IPO with tau = beta); gradient 2·(h - 1/(2·beta)): h settles at 1/(2·beta)
    per labelled order, i.e. at (P - 1/2)/beta for a pair whose order is y_w ≻ y_l with probability P."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def pair_stats(h: torch.Tensor, u_w: torch.Tensor, u_l: torch.Tensor, beta: float) -> dict[str, float]:
    h, u_w, u_l = h.detach(), u_w.detach(), u_l.detach()
    return {"reward/margin": float(beta * h.mean()), "reward/accuracy": float((h > 0).double().mean()),
            "logp/chosen_vs_prior": float(u_w.mean()), "logp/rejected_vs_prior": float(u_l.mean()), "pairs/count": float(len(h))}


def preference_loss(kind: str, h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return ipo_loss(h, beta).mean() if kind == "ipo" else dpo_loss(h, beta, label_smoothing).mean()


class DpoConfig(AlgorithmConfig):
    """DPO on the pairs of ``data:`` (prompt/chosen/rejected); beta = target.beta."""

    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="eps: each label flipped with probability eps (cDPO); 0 = DPO")


class CdpoConfig(DpoConfig):
    """cDPO: DPO with label smoothing eps > 0."""

    label_smoothing: float = Field(0.1, gt=0, lt=0.5, description="eps: each label flipped with probability eps")


class IpoConfig(AlgorithmConfig):
    """IPO on the pairs of ``data:``; tau = target.beta."""


class _OfflinePreferences(Algorithm):
    """The batch is K pairs of data laid out [chosen_1..K, rejected_1..K] (tiltlm.train.pairs); nothing is sampled."""

    on_policy = False
    offline_pairs = True
    kind: str = "dpo"

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        if batch.pairs is None:
            raise TiltlmError(f"algorithm {self.name} trains on preference pairs, but this batch was sampled; give data: {{path: "
                              "prefs.jsonl}} with prompt/chosen/rejected columns, or use online-dpo")
        k, beta = batch.pairs, batch.beta
        u = logp - batch.logp_prior.to(logp.dtype).to(logp.device)  # (2K,) log pi_theta - log pi0
        h = u[:k] - u[k:]  # (K,)
        loss = preference_loss(self.kind, h, beta, getattr(self.config, "label_smoothing", 0.0))
        return loss, pair_stats(h, u[:k], u[k:], beta)


@register_algorithm
class Dpo(_OfflinePreferences):
    name = "dpo"
    Config = DpoConfig


@register_algorithm
class Cdpo(_OfflinePreferences):
    name = "cdpo"
    Config = CdpoConfig


@register_algorithm
class Ipo(_OfflinePreferences):
    name = "ipo"
    Config = IpoConfig
    kind = "ipo"


class OnlineDpoConfig(AlgorithmConfig):
    """Online DPO: pairs of the policy's own samples per context, labelled by the target's reward."""

    label: Literal["bt", "argmax"] = Field("bt", description="bt: y_a ≻ y_b with probability σ(r_a - r_b) (aims at p*); "
                                                             "argmax: the higher reward wins (aims at the hardmax)")
    loss: Literal["dpo", "ipo"] = Field("dpo", description="the loss of each pair: dpo (-log σ(beta·h)) or ipo")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="eps of the dpo loss (cDPO)")
    seed: int = Field(0, description="seed of the bt labels (with the step: a resumed run draws the same labels)")


@register_algorithm
class OnlineDpo(Algorithm):
    name = "online-dpo"
    Config = OnlineDpoConfig
    needs_tilt = True

    def __init__(self, config: OnlineDpoConfig):
        super().__init__(config)
        self.steps = 0
        self.first: torch.Tensor | None = None  # (K,) index of each pair's first row
        self.first_wins: torch.Tensor | None = None  # (K,) bool: the first row is the chosen one
        self.keep: torch.Tensor | None = None  # (K,) bool: the pair is used (argmax: not a tie)

    def observe(self, batch: Batch) -> None:
        """Pair the step's samples and draw their labels once (every minibatch and epoch of the step uses them)."""
        group = batch.group.cpu()
        first = []
        for g in dict.fromkeys(group.tolist()):
            rows = (group == g).nonzero().flatten().tolist()
            first.extend(rows[i] for i in range(0, len(rows) - 1, 2))
        if not first:
            raise TiltlmError("online-dpo pairs the samples of each context, but every context has one sample; set "
                              "sampling.n_per_context to 2 or more (an even number uses every sample)")
        self.first = torch.tensor(first, dtype=torch.long)
        diff = batch.reward.double().cpu()[self.first] - batch.reward.double().cpu()[self.first + 1]
        if self.config.label == "bt":
            gen = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + self.steps)
            self.first_wins = torch.rand(len(first), generator=gen, dtype=torch.float64) < torch.sigmoid(diff)
            self.keep = torch.ones(len(first), dtype=torch.bool)
        else:
            self.first_wins, self.keep = diff > 0, diff != 0
        self.steps += 1

    def loss(self, batch: Batch, logp: torch.Tensor, token_logp: torch.Tensor):
        beta = kl_coefficient(batch, self.name)
        u = logp - batch.logp_prior.to(logp.dtype).to(logp.device)  # (B,)
        a, b = self.first.to(u.device), (self.first + 1).to(u.device)
        wins = self.first_wins.to(u.device)
        u_w, u_l = torch.where(wins, u[a], u[b]), torch.where(wins, u[b], u[a])
        keep = self.keep.to(u.device)
        h = (u_w - u_l)[keep]
        if len(h) == 0:  # argmax labels and every pair tied: nothing to learn this step
            return (0.0 * logp).sum(), {"pairs/count": 0.0}
        loss = preference_loss(self.config.loss, h, beta, self.config.label_smoothing)
        return loss, pair_stats(h, u_w[keep], u_l[keep], beta)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))
