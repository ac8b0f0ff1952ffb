"""Exact fixed points of DPO, cDPO and IPO on an enumerable space (docs/math.md §14).

Sequences are indexed 0..N-1 (e.g. the rows of ``enumerate_space``); ``logp0`` (N,) is log pi0, u = log pi - log pi0
the policy's log-ratio. Preference data in the population is a symmetric weight matrix ``W`` (N, N) (W[a, b] =
how often a and b are compared, 0 on the diagonal) and ``P`` (N, N) with P[a, b] = P(a ≻ b) = 1 - P[b, a]. The
population loss of a method is sum_{a<b} W[a, b]·ℓ(u_a - u_b; P[a, b]) with

    dpo/cdpo:  ℓ(h; P) = -P'·log σ(beta·h) - (1 - P')·log σ(-beta·h),   P' = (1 - eps)·P + eps·(1 - P)
    ipo:       ℓ(h; P) = P·(h - 1/(2·beta))² + (1 - P)·(h + 1/(2·beta))²     (tau = beta)

Each ℓ is convex in h and depends on u only through differences, so where the pairs connect the space the minimiser
is unique up to one constant (the normalisation). Closed forms:

- dpo with BT labels P[a, b] = σ(r_a - r_b): beta·(u_a - u_b) = r_a - r_b on every compared pair, whatever W, so
  pi = pi0·exp(r/beta)/Z (``dpo_population_optimum``).
- ipo: per pair the minimiser is h = (2P - 1)/(2·beta); with W[a, b] = mu(a)·mu(b) (pairs drawn i.i.d. from a
  behaviour mu) the least-squares solution is u_a = P(a ≻ mu)/beta + const: pi = pi0·exp(P(y ≻ mu)/beta)/Z
  (Azar et al. 2023's regularised optimum; ``ipo_population_optimum``).
- cdpo: σ(beta·h) = P' per pair when those targets are consistent; otherwise only ``preference_fixed_point``
  (Newton on the convex loss) says where it goes.

Where pairs do not connect a sequence to the others nothing in the loss fixes its mass: finite-data DPO can move
mass there (``coverage_report`` measures it for a trained policy).
"""

from __future__ import annotations

import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact.quantities import kl, normalise


def bt_probabilities(r: torch.Tensor) -> torch.Tensor:
    """P[a, b] = σ(r_a - r_b) (Bradley–Terry with scale 1), (N, N) float64."""
    r = r.double()
    return torch.sigmoid(r[:, None] - r[None, :])


def dpo_population_optimum(logp0: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi0·exp(r/beta)/Z: DPO's minimiser for BT(r) labels on pairs that connect the space, (N,)."""
    return normalise(logp0.double() + r.double() / beta)[0]


def ipo_population_optimum(logp0: torch.Tensor, P: torch.Tensor, beta: float, mu_logp: torch.Tensor | None = None) -> torch.Tensor:
    """log pi0·exp(P(y ≻ mu)/beta)/Z: IPO's minimiser for pairs drawn i.i.d. from mu (default pi0), (N,)."""
    mu = (logp0 if mu_logp is None else mu_logp).double().exp()
    # P(a ≻ mu) = sum_{b != a} mu(b)·P[a, b] + ½·mu(a): a draw of a itself is no pair (a tie, counted ½)
    win_rate = P.double() @ mu - torch.diagonal(P.double()) * mu + 0.5 * mu
    return normalise(logp0.double() + win_rate / beta)[0]


def _pair_loss(h: torch.Tensor, P: torch.Tensor, beta: float, kind: str, eps: float) -> torch.Tensor:
    if kind == "ipo":
        t = 1.0 / (2.0 * beta)
        return P * (h - t) ** 2 + (1 - P) * (h + t) ** 2
    q = (1 - eps) * P + eps * (1 - P)
    z = beta * h
    return -q * torch.nn.functional.logsigmoid(z) - (1 - q) * torch.nn.functional.logsigmoid(-z)


def population_loss(u: torch.Tensor, W: torch.Tensor, P: torch.Tensor, beta: float, kind: str = "dpo", eps: float = 0.0) -> torch.Tensor:
    """sum_{a<b} W[a, b]·ℓ(u_a - u_b; P[a, b]) (module docstring)."""
    h = u[:, None] - u[None, :]
    upper = torch.triu(torch.ones_like(W, dtype=torch.bool), diagonal=1)
    return (W * _pair_loss(h, P, beta, kind, eps))[upper].sum()


def connected(W: torch.Tensor) -> bool:
    """Whether the comparison graph (an edge where W > 0) connects every sequence."""
    n = W.shape[0]
    seen, frontier = {0}, [0]
    adj = W > 0
    while frontier:
        a = frontier.pop()
        for b in adj[a].nonzero().flatten().tolist():
            if b not in seen:
                seen.add(b)
                frontier.append(b)
    return len(seen) == n


def preference_fixed_point(logp0: torch.Tensor, W: torch.Tensor, P: torch.Tensor, beta: float, *, kind: str = "dpo",
                           eps: float = 0.0, iterations: int = 100, tol: float = 1e-12) -> torch.Tensor:
    """log pi of the population minimiser (damped Newton on u, float64), (N,); the pairs must connect the space.
    A consistent-label DPO with eps = 0 and P in {0, 1} has no minimiser (h → ±∞): refused."""
    W, P = W.double(), P.double()
    if not connected(W):
        raise TiltlmError("the pairs do not connect every sequence, so the fixed point is not unique; give weights W > 0 "
                          "that connect the space (or measure a trained policy with coverage_report)")
    if kind != "ipo" and eps == 0 and bool(((P == 0) | (P == 1))[W > 0].any()):
        raise TiltlmError("a pair with a certain label (P = 0 or 1) has no DPO minimiser (its margin grows without bound); "
                          "use BT probabilities in (0, 1), label smoothing (cdpo) or ipo")
    n = W.shape[0]
    u = torch.zeros(n, dtype=torch.float64)
    f = lambda v: population_loss(v, W, P, beta, kind, eps)  # noqa: E731
    for _ in range(iterations):
        g = torch.autograd.functional.jacobian(f, u)
        H = torch.autograd.functional.hessian(f, u)
        step = torch.linalg.lstsq(H + 1e-12 * torch.eye(n, dtype=H.dtype), -g[:, None], driver="gelsd").solution.flatten()
        step = step - step.mean()  # the loss does not see a constant shift
        t, value = 1.0, float(f(u))
        while float(f(u + t * step)) > value + 1e-4 * t * float(g @ step) and t > 1e-8:
            t *= 0.5
        u = u + t * step
        if float(g.norm()) < tol:
            break
    return normalise(logp0.double() + u)[0]


def coverage_report(logp0: torch.Tensor, logp: torch.Tensor, log_target: torch.Tensor, chosen: list[int], rejected: list[int]) -> dict:
    """Where a policy trained on the pairs (chosen[k] ≻ rejected[k], sequence indices) put its mass, exactly:
    KL(pi‖p*) and KL(p*‖pi) to the normalised ``log_target``, the mass of pi and of pi0 on sequences in no pair,
    the mean change of log pi vs pi0 of the chosen and of the rejected completions, and the mean margin u_w - u_l."""
    logp0, logp, log_target = logp0.double(), logp.double(), normalise(log_target.double())[0]
    seen = torch.zeros(len(logp0), dtype=torch.bool)
    seen[chosen] = True
    seen[rejected] = True
    u = logp - logp0
    w, l = torch.tensor(chosen), torch.tensor(rejected)
    return {"kl_policy_target": kl(logp, log_target), "kl_target_policy": kl(log_target, logp),
            "unseen_mass_policy": float(logp.exp()[~seen].sum()), "unseen_mass_prior": float(logp0.exp()[~seen].sum()),
            "unseen_mass_target": float(log_target.exp()[~seen].sum()),
            "chosen_logp_change": float(u[w].mean()), "rejected_logp_change": float(u[l].mean()),
            "margin": float((u[w] - u[l]).mean()), "distinct_seen": int(seen.sum())}
