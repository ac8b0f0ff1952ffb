"""Exact optima of the interactive case on tabular environments (docs/math.md §5), and brute-force checks.

Target over trajectories: p*(tau) ∝ p_env(tau) · Π_t pi0(a_t|h_t) · exp(R(tau)/beta), R = Σ_t r_t.
Policies induce q(tau) = p_env(tau) · Π_t q(a_t|h_t); p_env is fixed.

- ``optimistic`` — the exact posterior conditional q(a|h) = p*(a|h), what forward KL / DPG converges
  to (argmin_q KL(p*||q)). Backup in log-potential units:
      Q(h,a) = log E_{o~p_env}[exp(r(h,a,o)/beta + V(hao))],   V(h) = log Σ_a pi0(a|h) exp Q(h,a),
      q(a|h) = pi0(a|h) exp(Q(h,a) − V(h)).   V(root) = log Z.
- ``variational`` — the KL-RL optimum argmin_q KL(q||p*) (reverse KL, kl-pg / PPO-KL). Backup:
      Q(h,a) = E_{o~p_env}[r(h,a,o) + V(hao)],   V(h) = beta log Σ_a pi0(a|h) exp(Q(h,a)/beta),
      q(a|h) = pi0(a|h) exp((Q(h,a) − V(h))/beta).
``Solution.q_reward`` reports both Q's in reward units (the optimistic one times beta) so they compare
directly: on the lottery at beta = 1, Q_B = 9.307 (optimistic) vs 0 (variational). The two coincide
when the environment is deterministic (log E exp = E over a point mass).

Brute force: ``trajectories`` enumerates every trajectory with its probabilities; from p*(tau),
``posterior_conditional`` marginalises p*(a|h) directly, and ``variational_by_descent`` minimises
the exact KL(q||p*) over free logits — two routes that must agree with the backups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact.quantities import kl  # the one KL (support rule there); over trajectories here


@dataclass
class Solution:
    kind: str
    q: torch.Tensor  # (H, A) Q(h, a) in the backup's own units (log-potential for optimistic, reward for variational)
    v: torch.Tensor  # (H,) V(h)
    log_policy: torch.Tensor  # (H, A) log q(a|h)
    beta: float

    @property
    def q_reward(self) -> torch.Tensor:
        """Q in reward units (optimistic Q times beta), comparable across the two kinds."""
        return self.q * self.beta if self.kind == "optimistic" else self.q


def solve(env, log_prior: torch.Tensor, beta: float, kind: str) -> Solution:
    """Backward induction over ``env.histories`` (deepest first); log_prior is (H, A) log pi0(a|h)."""
    if kind not in ("optimistic", "variational"):
        raise TiltlmError(f"unknown solution kind '{kind}'; available: optimistic, variational")
    if not beta > 0:
        raise TiltlmError(f"beta must be > 0 (got {beta})")
    log_prior = log_prior.detach().double()
    n_h, n_a = log_prior.shape
    q = torch.zeros((n_h, n_a), dtype=torch.float64)
    v = torch.zeros(n_h, dtype=torch.float64)
    for h in reversed(env.histories):
        i = env.node[h]
        for a in range(n_a):
            terms = []
            for o, p, r in env.outcomes[(h, a)]:
                child = h + ((a, o),)
                v_child = v[env.node[child]] if child in env.node else torch.tensor(0.0, dtype=torch.float64)
                if kind == "optimistic":
                    terms.append(torch.log(torch.tensor(p, dtype=torch.float64)) + r / beta + v_child)
                else:
                    terms.append(p * (r + v_child))
            q[i, a] = torch.logsumexp(torch.stack(terms), 0) if kind == "optimistic" else torch.stack(terms).sum()
        if kind == "optimistic":
            v[i] = torch.logsumexp(log_prior[i] + q[i], 0)
        else:
            v[i] = beta * torch.logsumexp(log_prior[i] + q[i] / beta, 0)
    if kind == "optimistic":
        log_policy = log_prior + q - v[:, None]
    else:
        log_policy = log_prior + (q - v[:, None]) / beta
    return Solution(kind, q, v, log_policy, float(beta))


@dataclass
class Trajectories:
    """Every trajectory of a tabular env: (N,) tensors plus, per trajectory, the (node, action) it took each turn."""

    log_env: torch.Tensor  # (N,) log p_env(tau) = Σ_t log p_env(o_t | h_t, a_t)
    reward: torch.Tensor  # (N,) R(tau)
    steps: torch.Tensor  # (N, D, 2) long: (history node, action) per turn

    def log_policy(self, log_action: torch.Tensor) -> torch.Tensor:
        """Σ_t log q(a_t | h_t) for a policy given as (H, A) log-probs, (N,)."""
        return log_action.double()[self.steps[..., 0], self.steps[..., 1]].sum(-1)


def trajectories(env) -> Trajectories:
    """Enumerate every trajectory of positive environment probability."""
    rows: list[tuple[float, float, list[tuple[int, int]]]] = []

    def walk(h, log_env, reward, steps):
        if len(h) == env.depth:
            rows.append((log_env, reward, steps))
            return
        for a in range(len(env.actions)):
            for o, p, r in env.outcomes[(h, a)]:
                walk(h + ((a, o),), log_env + float(torch.log(torch.tensor(p, dtype=torch.float64))), reward + r,
                     steps + [(env.node[h], a)])

    walk((), 0.0, 0.0, [])
    return Trajectories(
        log_env=torch.tensor([r[0] for r in rows], dtype=torch.float64),
        reward=torch.tensor([r[1] for r in rows], dtype=torch.float64),
        steps=torch.tensor([r[2] for r in rows], dtype=torch.long),
    )


def log_target(trajs: Trajectories, log_prior: torch.Tensor, beta: float) -> tuple[torch.Tensor, float]:
    """(log p*(tau) normalised, log Z) over the enumerated trajectories."""
    log_p = trajs.log_env + trajs.log_policy(log_prior.detach().double()) + trajs.reward / beta
    log_z = torch.logsumexp(log_p, 0)
    return log_p - log_z, float(log_z)


def posterior_conditional(env, log_prior: torch.Tensor, beta: float) -> torch.Tensor:
    """Brute force: p*(a|h) = Σ_{tau through h,a} p*(tau) / Σ_{tau through h} p*(tau), (H, A) log-probs.
    Histories p* never reaches get pi0 (any value is optimal there)."""
    trajs = trajectories(env)
    log_p, _ = log_target(trajs, log_prior, beta)
    n_h, n_a = log_prior.shape
    mass = torch.zeros((n_h, n_a), dtype=torch.float64)
    for t in range(trajs.steps.shape[1]):
        mass.index_put_((trajs.steps[:, t, 0], trajs.steps[:, t, 1]), log_p.exp(), accumulate=True)
    total = mass.sum(-1, keepdim=True)
    return torch.where(total > 0, (mass / total.clamp(min=1e-300)).log(), log_prior.detach().double().log_softmax(-1))


def variational_by_descent(env, log_prior: torch.Tensor, beta: float, *, iterations: int = 200) -> torch.Tensor:
    """Brute force: minimise the exact KL(q||p*) over free logits with L-BFGS on every trajectory, (H, A)."""
    trajs = trajectories(env)
    log_p, _ = log_target(trajs, log_prior, beta)
    logits = log_prior.detach().double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=iterations, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        log_q = trajs.log_env + trajs.log_policy(torch.log_softmax(logits, -1))
        loss = (log_q.exp() * (log_q - log_p)).sum()
        loss.backward()
        return loss

    last = float("inf")
    for _ in range(20):  # L-BFGS restarts until the exact objective stops moving
        loss = float(opt.step(closure).detach())
        if last - loss < 1e-15:
            break
        last = loss
    return torch.log_softmax(logits.detach(), -1)


def trajectory_kl(env, log_policy_p: torch.Tensor, log_policy_q: torch.Tensor, trajs: Trajectories | None = None) -> float:
    """KL between the trajectory distributions two policies induce in env (p_env cancels but weights)."""
    trajs = trajs if trajs is not None else trajectories(env)
    return kl(trajs.log_env + trajs.log_policy(log_policy_p.detach().double()), trajs.log_env + trajs.log_policy(log_policy_q.detach().double()))


class ExactEnvMetrics:
    """Exact metrics of a TabularEnvPolicy against the two optima and p* (set up once per run).

    kl/optimistic_exact     KL(q_opt || pi)  — what DPG minimises; 0 at the posterior conditional
    kl/variational_exact    KL(pi || q_var)  — what KL-RL minimises (up to a constant); 0 at its optimum
    kl/target_exact         KL(p* || pi),  kl/policy_target_exact  KL(pi || p*)   (over trajectories)
    kl/prior_exact          KL(pi || pi0) over trajectories;  reward/exact  E_pi[R];  log_z/exact
    """

    def __init__(self, env, log_prior: torch.Tensor, beta: float):
        self.env = env
        self.trajs = trajectories(env)
        self.log_prior = log_prior.detach().double()
        self.log_target, self.log_z = log_target(self.trajs, self.log_prior, beta)
        self.optimistic = solve(env, self.log_prior, beta, "optimistic").log_policy
        self.variational = solve(env, self.log_prior, beta, "variational").log_policy

    def __call__(self, policy) -> dict[str, float]:
        with torch.no_grad():
            return self.of(policy.log_action_probs())

    def of(self, log_action: torch.Tensor) -> dict[str, float]:
        t = self.trajs
        log_pi = t.log_env + t.log_policy(log_action.double())
        return {
            "kl/optimistic_exact": kl(t.log_env + t.log_policy(self.optimistic), log_pi),
            "kl/variational_exact": kl(log_pi, t.log_env + t.log_policy(self.variational)),
            "kl/target_exact": kl(self.log_target, log_pi),
            "kl/policy_target_exact": kl(log_pi, self.log_target),
            "kl/prior_exact": kl(log_pi, t.log_env + t.log_policy(self.log_prior)),
            "reward/exact": float((log_pi.exp() * t.reward).sum()),
            "log_z/exact": self.log_z,
        }
