"""A Trainer's state to and from its checkpoint: weights, optimiser, RNG, algorithm and environment state, step.

tiltlm.train.checkpoint writes and reads the files; this module decides what of the Trainer goes in and how a
resumed Trainer is put back to the step it was checkpointed at (metrics and phase timings cut back to it).
"""

from __future__ import annotations

import torch

from tiltlm.errors import TiltlmError
from tiltlm.train import guards
from tiltlm.train.build import trainable_module
from tiltlm.train.checkpoint import restore_proposal, trainable_names, trainable_state
from tiltlm.train.timing import PHASES_FILE


def restore_trainer(trainer, data: dict) -> None:
    """Continue ``trainer`` from a loaded checkpoint ``data`` (tiltlm.train.checkpoint.load_checkpoint)."""
    t, state = trainer, data["state"]
    if differ := set(data["policy"]) ^ trainable_names(t.module):
        raise TiltlmError(f"checkpoint '{t.run_dir.checkpoint}' does not match this policy ({len(differ)} tensors differ); "
                          "resume with the same config")
    t.strategy.load_state(t.module, t.optimizer, data["policy"], data["optimizer"])
    torch.random.set_rng_state(data["rng"])
    t.algorithm.load_state_dict(state["algorithm"])
    t.collect.env_counts = dict(state.get("env", t.collect.env_counts))
    if "proposal" in data:
        t.algorithm.proposal = restore_proposal(t.policy, data["proposal"], trainable_names(t.module))
        if t.algorithm.proposal is None:
            raise TiltlmError(f"checkpoint '{t.run_dir.checkpoint}' has a proposal that does not match this policy; "
                              "resume with the same config")
    t.step = int(state["step"])
    if t.generator is not None:
        t.generator.sync()  # the engine started from the initial weights
    t.run_dir.truncate_metrics(t.step)
    t.timer.resume_from(t.run_dir.path / PHASES_FILE, t.step)  # the seconds of the steps before the checkpoint


def save_trainer(trainer) -> None:
    """checkpoint/ of ``trainer`` at its current step (rank 0 writes; sharded: every rank calls this, to gather)."""
    t = trainer
    guards.check_weights(t.module, t.strategy, t.step)  # never replace the last good checkpoint with a broken one
    weights, optimizer = t.strategy.full_state(t.module, t.optimizer)
    proposal = t.algorithm.proposal
    keep_proposal = proposal is not None and proposal is not t.target.prior and t.strategy.writes
    t.run_dir.save_checkpoint(
        step=t.step, weights=weights, optimizer=optimizer,
        extra={"algorithm": t.algorithm.state_dict(), "env": t.collect.env_counts},
        # only the tensors training changes (a tied head is not stored twice; LoRA: the adapters)
        proposal=trainable_state(trainable_module(proposal), trainable_names(t.module)) if keep_proposal else None,
    )
