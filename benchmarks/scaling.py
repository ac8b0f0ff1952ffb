"""Goal 2: how a training step scales with batch size and length, and a multi-turn rollout with turns.

    python benchmarks/scaling.py --threads 1 [--batches 8 16 32 64] [--lengths 8 16 32 64] [--turns 1 2 4 8]

- step vs B (T fixed) and step vs T (B fixed): seconds of one kl-pg ``Trainer.train_step`` on the
  default model, min over interleaved rounds, and the fitted exponent k of time ~ size^k (1 = linear;
  below 1 while fixed per-step costs still matter).
- rollout vs turns: an echo environment that never ends an episode, so every episode plays exactly
  K turns (a short observation and an action of up to 8 tokens each). ``rollout`` with the HF
  policy's KV session (each turn encodes only the new observation) vs re-encoding the whole history
  every turn (the policy without ``session``): seconds per turn and the exponent of total time in K.
Every episode uses the same seeds in both modes, so they play the same tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_common_args,
    emit,
    fit_exponent,
    interleaved_min,
    quiet_transformers,
    set_threads,
)
from step_throughput import make_trainer


def step_scaling(batches: list[int], lengths: list[int], t_fixed: int, b_fixed: int, repeats: int) -> list[dict]:
    rows = []
    for axis, sizes in (("B", batches), ("T", lengths)):
        trainers = {s: make_trainer("kl-pg", s if axis == "B" else b_fixed, t_fixed if axis == "B" else s, diversity=True) for s in sizes}
        best = interleaved_min({str(s): trainers[s].train_step for s in sizes}, repeats)
        times = [best[str(s)] for s in sizes]
        k = fit_exponent(sizes, times)
        for s, sec in zip(sizes, times):
            b, t = (s, t_fixed) if axis == "B" else (b_fixed, s)
            rows.append({"kind": f"step vs {axis}", "B": b, "T": t, "turns": "-", "seconds": sec, "per_unit_ms": 1000 * sec / s,
                         "exponent": k, "threads": torch.get_num_threads()})
    return rows


def _echo_env(turns: int):
    from tiltlm.envs import Env, StepResult

    class Echo(Env):
        """Never done: every episode plays exactly ``max_turns`` turns; the observation is short and fixed."""

        name = "bench-echo"
        max_turns = turns

        def tasks(self):
            return ["a", "b"]

        def episode(self, seed):
            class Episode:
                def reset(self, task):
                    return f"Task {task}. Speak:"

                def step(self, action):
                    return StepResult(" Go on:", float("e" in action), False, {})

            return Episode()

    return Echo()


class _NoSession:
    """The HF policy without ``session``: rollout falls back to re-encoding the history each turn."""

    def __init__(self, policy):
        self._policy = policy

    def __getattr__(self, name):
        if name == "session":
            raise AttributeError(name)
        return getattr(self._policy, name)


def turn_scaling(turns: list[int], episodes_per_task: int, action_tokens: int, repeats: int) -> list[dict]:
    from tiltlm.envs import rollout
    from tiltlm.policies.hf import HFPolicy

    policy = HFPolicy.from_pretrained("default")
    plain = _NoSession(policy)
    fns = {}
    for k in turns:
        env = _echo_env(k)
        fns[f"session/{k}"] = lambda env=env: rollout(policy, env, env.tasks(), episodes_per_task, seed=0, max_action_tokens=action_tokens, timeout_s=None)
        fns[f"reencode/{k}"] = lambda env=env: rollout(plain, env, env.tasks(), episodes_per_task, seed=0, max_action_tokens=action_tokens, timeout_s=None)
    best = interleaved_min(fns, repeats)
    rows = []
    for mode in ("session", "reencode"):
        times = [best[f"{mode}/{k}"] for k in turns]
        exponent = fit_exponent(turns, times)
        for k, sec in zip(turns, times):
            rows.append({"kind": f"rollout ({mode})", "B": 2 * episodes_per_task, "T": action_tokens, "turns": k, "seconds": sec,
                         "per_unit_ms": 1000 * sec / k, "exponent": exponent, "threads": torch.get_num_threads()})
    for k in turns:
        rows.append({"kind": "rollout reencode/session", "B": 2 * episodes_per_task, "T": action_tokens, "turns": k,
                     "seconds": best[f"reencode/{k}"] / best[f"session/{k}"], "per_unit_ms": "-", "exponent": "-",
                     "threads": torch.get_num_threads()})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--turns", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    if args.quick:
        batches, lengths, turns, repeats, t_fixed, b_fixed, per_task = [2, 4], [4, 8], [1, 2], 1, 8, 4, 2
    else:
        batches, lengths, turns, repeats, t_fixed, b_fixed, per_task = [8, 16, 32, 64], [8, 16, 32, 64], [1, 2, 4, 8], 3, 32, 16, 8
    batches, lengths, turns = args.batches or batches, args.lengths or lengths, args.turns or turns
    repeats = args.repeats or repeats
    rows = step_scaling(batches, lengths, t_fixed, b_fixed, repeats) + turn_scaling(turns, per_task, 8, repeats)
    return emit("scaling", rows, ["kind", "B", "T", "turns", "threads", "seconds", "per_unit_ms", "exponent"], args.json)


if __name__ == "__main__":
    main()
