"""Exact optima of tabular environments (docs/math.md §5) against closed forms and brute force."""

import math

import pytest
import torch

from tiltlm.envs import get_env
from tiltlm.envs.tabular import lottery_q_values
from tiltlm.errors import TiltlmError
from tiltlm.exact import mdp


def _reachable(env) -> torch.Tensor:
    """Histories of positive environment probability (elsewhere any policy is optimal)."""
    trajs = mdp.trajectories(env)
    return torch.unique(trajs.steps[..., 0])


def test_lottery_q_values_match_math_md():
    env = get_env("tabular", preset="lottery")
    log_prior = env.make_prior().log_action_probs()
    assert torch.allclose(log_prior.exp(), torch.full((1, 2), 0.5))  # docs/math.md §5.4's uniform prior
    opt = mdp.solve(env, log_prior, 1.0, "optimistic")
    var = mdp.solve(env, log_prior, 1.0, "variational")
    assert opt.q_reward[0, 1].item() == pytest.approx(math.log(0.5 * math.exp(10) + 0.5 * math.exp(-10)), abs=1e-9)
    assert opt.q_reward[0, 1].item() == pytest.approx(9.307, abs=1e-3)
    assert var.q_reward[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert opt.q_reward[0, 0].item() == var.q_reward[0, 0].item() == 0.0
    # the optimistic policy all but commits to B; the variational one stays at the prior
    assert opt.log_policy.exp()[0, 1].item() == pytest.approx(math.exp(9.307) / (1 + math.exp(9.307)), rel=1e-3)
    assert torch.allclose(var.log_policy.exp(), torch.full((1, 2), 0.5, dtype=torch.float64))
    assert lottery_q_values(1.0)["optimistic"] == pytest.approx(opt.q_reward[0, 1].item(), abs=1e-9)
    # V(root) of the optimistic backup is log Z of p*(tau)
    _, log_z = mdp.log_target(mdp.trajectories(env), log_prior, 1.0)
    assert opt.v[0].item() == pytest.approx(log_z, abs=1e-9)


@pytest.mark.parametrize("seed,depth,actions,obs", [(0, 2, 2, 2), (3, 3, 2, 2), (5, 2, 3, 2)])
def test_solver_matches_brute_force(seed, depth, actions, obs):
    env = get_env("tabular", depth=depth, n_actions=actions, n_observations=obs, seed=seed, reward_scale=2.0)
    log_prior = env.make_prior().log_action_probs()
    seen = _reachable(env)
    for beta in (0.5, 1.0, 3.0):
        opt = mdp.solve(env, log_prior, beta, "optimistic").log_policy
        brute = mdp.posterior_conditional(env, log_prior, beta)
        assert torch.allclose(opt[seen], brute[seen], atol=1e-9)
        var = mdp.solve(env, log_prior, beta, "variational").log_policy
        descent = mdp.variational_by_descent(env, log_prior, beta)
        trajs = mdp.trajectories(env)
        log_p, _ = mdp.log_target(trajs, log_prior, beta)
        as_traj = lambda lp: trajs.log_env + trajs.log_policy(lp)  # noqa: E731
        reverse = lambda lp: mdp.kl(as_traj(lp), log_p)  # noqa: E731 - the objective KL-RL minimises
        # direct minimisation of the exact objective never beats the backup, and lands on it
        assert reverse(var) <= reverse(descent) + 1e-12
        assert mdp.trajectory_kl(env, var, descent) < 1e-4
        gen = torch.Generator().manual_seed(seed)
        for _ in range(5):
            assert reverse(var) < reverse(torch.log_softmax(var + 0.05 * torch.randn(var.shape, generator=gen, dtype=torch.float64), -1))
        # per history where the optimum goes with probability > 1% (elsewhere the objective barely sees q)
        reach = torch.zeros(log_prior.shape[0], dtype=torch.float64)
        q_tau = (trajs.log_env + trajs.log_policy(var)).exp()
        for t in range(trajs.steps.shape[1]):
            reach.index_add_(0, trajs.steps[:, t, 0], q_tau)
        often = reach > 0.01
        assert torch.allclose(var[often].exp(), descent[often].exp(), atol=1e-3)
        # each optimum is optimal for its own objective: the other one is worse there
        assert mdp.kl(log_p, as_traj(opt)) <= mdp.kl(log_p, as_traj(var)) + 1e-12
        assert mdp.kl(as_traj(var), log_p) <= mdp.kl(as_traj(opt), log_p) + 1e-12


def test_variational_value_is_the_kl_rl_objective():
    """V(root) = max_q E_q[R] - beta KL(q||pi0) = beta log Z - beta min KL(q||p*)."""
    env = get_env("tabular", depth=2, seed=1, reward_scale=1.5)
    log_prior = env.make_prior().log_action_probs()
    beta = 0.7
    var = mdp.solve(env, log_prior, beta, "variational")
    trajs = mdp.trajectories(env)
    log_q = trajs.log_env + trajs.log_policy(var.log_policy)
    objective = float((log_q.exp() * trajs.reward).sum()) - beta * mdp.kl(log_q, trajs.log_env + trajs.log_policy(log_prior))
    assert var.v[0].item() == pytest.approx(objective, abs=1e-9)


def test_optima_coincide_iff_environment_is_deterministic():
    for stochasticity, differ in ((0.0, False), (1.0, True)):
        env = get_env("tabular", depth=3, seed=3, reward_scale=2.0, stochasticity=stochasticity)
        assert env.deterministic == (not differ)
        log_prior = env.make_prior().log_action_probs()
        opt = mdp.solve(env, log_prior, 1.0, "optimistic").log_policy
        var = mdp.solve(env, log_prior, 1.0, "variational").log_policy
        gap = mdp.trajectory_kl(env, var, opt)
        assert (gap > 0.05) if differ else (gap < 1e-12)
        if not differ:
            seen = _reachable(env)
            assert torch.allclose(opt[seen], var[seen], atol=1e-12)


def test_bad_solver_arguments():
    env = get_env("tabular", depth=1)
    with pytest.raises(TiltlmError, match="available: optimistic, variational"):
        mdp.solve(env, env.make_prior().log_action_probs(), 1.0, "pessimistic")
    with pytest.raises(TiltlmError, match="beta must be > 0"):
        mdp.solve(env, env.make_prior().log_action_probs(), 0.0, "optimistic")
    with pytest.raises(TiltlmError, match="too many"):
        get_env("tabular", depth=12, n_actions=3, n_observations=3)
