"""Metrics of a batch of environment episodes (the interactive case).

  env/success_rate, env/failure_rate, env/truncated_rate   fractions of the batch's episodes
  env/return_mean, env/turns_mean                          R(tau) and the number of policy turns
  kl/prior_turn_<t>                                        KL(pi||pi0) carried by turn t (k1): the mean
                                                           over episodes of Σ_{tokens of turn t} log pi/pi0;
                                                           the turns sum to the sequence k1 estimate
  diversity/distinct_first_action                          distinct first actions (queries, questions) / B
Off-policy batches (samples from a proposal) are weighted by pi/q like batch_metrics does.
"""

from __future__ import annotations

import torch

from tiltlm.records import Batch


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

    out = {
        "env/success_rate": mean([t.success for t in trajs]),
        "env/failure_rate": sum(t.failure is not None for t in trajs) / len(trajs),
        "env/truncated_rate": sum(t.truncated for t in trajs) / len(trajs),
        "env/return_mean": mean([t.total_reward for t in trajs]),
        "env/turns_mean": mean([t.turns for t in trajs]),
    }
    if batch.token_logp_prior is not None and samples.turn is not None:
        log_ratio = torch.where(samples.mask, token_logp - batch.token_logp_prior.double(), torch.zeros((), dtype=torch.float64))
        for t in range(1, int(samples.turn.max()) + 1):
            out[f"kl/prior_turn_{t}"] = mean((log_ratio * (samples.turn == t)).sum(-1))
    firsts = [t.actions[0] for t in trajs if t.actions]
    out["diversity/distinct_first_action"] = len(set(firsts)) / max(1, len(firsts))
    return out
