"""Metrics of a batch of environment episodes (the interactive case).

  env/success_rate, env/failure_rate, env/truncated_rate   fractions of the batch's episodes
  env/return_mean, env/turns_mean                          R(tau) and the number of policy turns
  kl/prior_turn_<t>                                        KL(pi||pi0) carried by turn t (k1): the mean
                                                           over episodes of Σ_{tokens of turn t} log pi/pi0;
                                                           the turns sum to the sequence k1 estimate
  diversity/distinct_first_action                          distinct first actions (queries, questions) /
                                                           episodes that took an action
Off-policy batches (samples from a proposal) are weighted by pi/q like batch_metrics does.
Each metric is defined once below (``episode_values``, ``turn_log_ratios``, ``distinct_first_action``);
``episode_metrics`` averages them for a training step, ``eval_episode_metrics`` for an evaluation.
"""

from __future__ import annotations

import torch

from tiltlm.records import Batch


def episode_values(trajs) -> dict[str, list]:
    """Per-episode value of env/success_rate, env/return_mean, env/turns_mean (each metric is its mean)."""
    return {
        "env/success_rate": [t.success for t in trajs],
        "env/return_mean": [t.total_reward for t in trajs],
        "env/turns_mean": [t.turns for t in trajs],
    }


def turn_log_ratios(log_ratio: torch.Tensor, mask: torch.Tensor, turn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-episode value of kl/prior_turn_<t>, t = 1..max turn: Σ over the policy tokens (``mask``) of turn t
    of ``log_ratio`` = log pi - log pi0 per token, (B,) float64 each."""
    log_ratio = torch.where(mask, log_ratio.double(), torch.zeros((), dtype=torch.float64))
    return {f"kl/prior_turn_{t}": (log_ratio * (turn == t)).sum(-1) for t in range(1, int(turn.max()) + 1)}


def distinct_first_action(trajs) -> float:
    """diversity/distinct_first_action: distinct first actions / episodes that took an action."""
    firsts = [t.actions[0] for t in trajs if t.actions]
    return len(set(firsts)) / max(1, len(firsts))


def episode_metrics(batch: Batch, token_logp: torch.Tensor, *, on_policy: bool = True) -> dict[str, float]:
    """``token_logp``: (B, T) log pi_theta per token before the step (detached)."""
    samples = batch.samples
    trajs = samples.trajectories
    token_logp = token_logp.detach().double().cpu()
    if on_policy:
        w = torch.full((len(trajs),), 1.0 / len(trajs), dtype=torch.float64)
    else:
        w = torch.softmax(token_logp.sum(-1) - batch.logq.cpu(), 0)

    def mean(values) -> float:
        return float((w * torch.as_tensor(values, dtype=torch.float64)).sum())

    values = episode_values(trajs)
    out = {
        "env/success_rate": mean(values["env/success_rate"]),
        "env/failure_rate": sum(t.failure is not None for t in trajs) / len(trajs),
        "env/truncated_rate": sum(t.truncated for t in trajs) / len(trajs),
        "env/return_mean": mean(values["env/return_mean"]),
        "env/turns_mean": mean(values["env/turns_mean"]),
    }
    if batch.token_logp_prior is not None and samples.turn is not None:
        log_ratio = token_logp - batch.token_logp_prior.double()
        out.update({k: mean(v) for k, v in turn_log_ratios(log_ratio, samples.mask, samples.turn).items()})
    out["diversity/distinct_first_action"] = distinct_first_action(trajs)
    return out


def eval_episode_metrics(samples, log_ratio: torch.Tensor) -> dict[str, float]:
    """Evaluation episodes of the policy itself (every episode counts once): env/success_rate, env/return_mean,
    env/turns_mean, diversity/distinct_first_action and kl/prior_turn_<t>; ``log_ratio`` is (B, T)
    log pi - log pi0 per token (zero off the policy mask)."""
    trajs = samples.trajectories
    out: dict[str, float] = {k: sum(v) / len(v) for k, v in episode_values(trajs).items()}
    out["diversity/distinct_first_action"] = distinct_first_action(trajs)
    turns = turn_log_ratios(log_ratio.cpu(), samples.mask, samples.turn)
    out.update({k: float(v.mean()) for k, v in turns.items()})
    return out
