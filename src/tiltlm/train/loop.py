"""The one training loop: collect a batch -> loss -> optimiser step -> metrics -> log -> checkpoint.

Every algorithm runs through ``Trainer.train_step``, which knows only ``algorithm.on_policy`` (whom to sample
from: .collect) and ``algorithm.epochs``. Parts: tiltlm.train.build; updates: .minibatch; files: .rundir, .resume;
seconds per phase: .timing; the step laid over processes: tiltlm.distributed.strategy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from tiltlm.algorithms.base import Algorithm, get_algorithm
from tiltlm.distributed.strategy import make_strategy
from tiltlm.errors import TiltlmError
from tiltlm.metrics.batch import average_over_contexts, step_metrics
from tiltlm.records import Batch
from tiltlm.targets.base import Target
from tiltlm.train import guards
from tiltlm.train.build import (build_env, build_exact, build_gold, build_generator, build_optimizer, build_runner, target_from_config,
                                trainable_module)
from tiltlm.train.collect import Collector
from tiltlm.train.config import TrainConfig
from tiltlm.train.minibatch import descend, minibatches, start_of_step, token_logp
from tiltlm.train.rundir import RunDir
from tiltlm.train.resume import restore_trainer, save_trainer
from tiltlm.train.timing import PhaseTimer, write_phases

__all__ = ["Trainer", "minibatches", "target_from_config", "trainable_module"]


class Trainer:
    """Runs ``config.optim.steps`` steps of ``config.algorithm`` on ``policy`` toward ``target``; with ``out_dir`` it
    writes config.yaml, metrics.jsonl, checkpoint/ and finally policy/."""

    def __init__(self, config: TrainConfig, *, policy, target: Target, out_dir: str | Path | None = None, resume: bool = False,
                 algorithm: Algorithm | None = None, on_metrics: Callable[[dict], None] | None = None, env=None, strategy=None,
                 accept_config: bool = False):
        self.config, self.policy, self.target, self.on_metrics = config, policy, target, on_metrics
        self.strategy = strategy or make_strategy(config.distributed)
        self._owns_env = env is None and config.env is not None  # the interactive case: episodes in an environment
        self.env = build_env(config) if self._owns_env else env
        self.runner = build_runner(config, self.env)
        self.generator = build_generator(config, policy, self.env)
        self.algorithm = algorithm or get_algorithm(config.algorithm)
        if not self.algorithm.on_policy:
            self.algorithm.proposal = target.prior
        self.strategy.prepare(config, policy, target.prior)  # sharding happens before the optimiser sees the weights
        self.module = trainable_module(policy)
        self.optimizer = build_optimizer(config, self.module)
        self.timer = PhaseTimer()  # seconds per phase: time/… metrics and phases.json (tiltlm.train.timing)
        self.collect = Collector(config, policy=policy, target=target, algorithm=self.algorithm, strategy=self.strategy,
                                 env=self.env, runner=self.runner, generator=self.generator, out_dir=out_dir, timer=self.timer)
        self.exact = build_exact(config, target, self.env, self.collect.data)
        self.gold = build_gold(config)  # metrics.gold: a reward the run is judged by and never trained on
        self.step = 0
        self.run_dir = RunDir(out_dir, writes=self.strategy.writes) if out_dir is not None else None
        if self.run_dir is not None:
            try:  # a resume with another config than the run's is refused unless accept_config (tiltlm.train.rundir)
                checkpoint = self.run_dir.open(config, resume=resume, accept_config=accept_config, module=self.module,
                                               algorithm=self.algorithm)
            except TiltlmError:
                self.close()  # an environment's server, Ray actors, a vLLM engine
                raise
            if checkpoint is not None:
                self._restore(checkpoint)

    def _restore(self, data: dict) -> None:  # continue from a checkpoint (tiltlm.train.resume)
        restore_trainer(self, data)

    def make_batch(self, step: int) -> Batch:  # the batch of step ``step`` (tiltlm.train.collect)
        return self.collect(step)

    def train_step(self) -> dict:
        """One step; returns its metrics row (also logged). Running out of memory is a one-line TiltlmError."""
        try:
            return self._train_step()
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not guards.out_of_memory(e):
                raise
            raise guards.out_of_memory_error(self.config, self.step) from None

    def _train_step(self) -> dict:
        self.timer.start_step()
        if self.step == 0:  # pi0 on held-out prompts
            with self.timer.phase("eval"):
                first = self.collect.evaluator(self.target.prior, 0)
            if first:
                self._log({"step": 0, **first})
        step, batch = self.step, self.collect(self.step)
        self.algorithm.observe(batch)
        self.module.train(False)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optim.lr_at(step)
        parts = minibatches(batch.group, self.config.optim.minibatch_size)
        with self.timer.phase("score"):  # several minibatches: every row's log pi at the step's start
            batch, token_logp_before = start_of_step(self.strategy, self.policy, batch, parts)
        stats, losses, norms = {}, [], []
        for _ in range(self.algorithm.epochs):
            losses.clear()
            for rows in parts:
                with self.timer.phase("backward"):
                    token_logp_now = token_logp(self.strategy, self.policy, batch, rows, token_logp_before)  # (B, T), grad on rows
                    logp = token_logp_now.sum(-1)
                    if token_logp_before is None:
                        token_logp_before = token_logp_now.detach()
                    loss, stats = self.algorithm.loss(batch, logp, token_logp_now)
                    stats.update(self._descend(loss, batch, logp, step))
                losses.append(float(loss.detach()))
                norms.append(stats.pop("grad/norm", None))
        guards.check_weights(self.module, self.strategy, step + 1)  # once a step: a later update's loss check catches the rest
        if norms[0] is not None:  # the mean over the step's updates, and how many of them the clip shortened
            stats["grad/norm"] = sum(norms) / len(norms)
            stats["grad/clipped"] = sum(n > self.config.optim.grad_clip for n in norms) / len(norms)
        if len(parts) > 1:
            stats["optim/updates"] = len(parts) * self.algorithm.epochs
        logp_before = token_logp_before.sum(-1)
        stats.update(self.algorithm.after_step(batch, self.policy, logp_before))
        if self.generator is not None:
            self.generator.sync()
        self.step = step + 1
        row = {"step": self.step, "loss": sum(losses) / len(losses), **stats, **self._metrics(batch, token_logp_before)}
        every = self.config.checkpoint.every
        with self.timer.phase("io"):
            if self.run_dir is not None and self.strategy.joins_io and ((every and self.step % every == 0) or self.step == self.config.optim.steps):
                self.save_checkpoint()
        self.timer.step_row()  # this step's seconds per phase, into phases.json (not the metrics rows: those are reproducible)
        self._log(row)
        self._write_phases()
        return row

    def _write_phases(self) -> None:  # phases.json: the run's seconds per phase so far
        if self.run_dir is not None and self.strategy.writes:
            write_phases(self.run_dir.path, self.timer)

    def _descend(self, loss: torch.Tensor, batch: Batch, logp: torch.Tensor, step: int) -> dict:
        return descend(self.optimizer, self.strategy, self.config.optim.grad_clip, loss, batch, logp, step)

    def _metrics(self, batch: Batch, token_logp_before: torch.Tensor) -> dict:
        m = self.config.metrics
        row = step_metrics(batch, token_logp_before, on_policy=self.algorithm.on_policy, kl_estimator=m.kl_estimator,
                           diversity=m.diversity, env_counts=self.collect.env_counts, gold=self.gold)
        if self.exact and self.strategy.joins_io and (self.step % m.exact_every == 0 or self.step == self.config.optim.steps):
            with self.timer.phase("eval"):
                row.update(self.exact_metrics())
        row["samples/seen"] = self.step * len(batch)
        with self.timer.phase("eval"):
            row.update(self.collect.evaluator(self.policy, self.step))  # held-out pass@k when due (tiltlm.evaluate)
        return row

    def exact_metrics(self) -> dict[str, float]:
        """Exact metrics of the current policy: per-context conditional quantities averaged over contexts (+ maxima)."""
        return average_over_contexts([e(self.policy) for e in self.exact])

    def _log(self, row: dict) -> None:
        if not self.strategy.writes:  # every rank has the same row; one writes it
            return
        if self.run_dir is not None:
            self.run_dir.append_metrics(row)
        if self.on_metrics is not None:
            self.on_metrics(row)

    def run(self, progress: bool = False) -> list[dict]:
        """Train to ``optim.steps``, write policy/, and release what the trainer started (env, Ray, vLLM)."""
        from tiltlm.train.loggers import progress_bar

        try:
            rows = []
            with progress_bar(progress, self.config.algorithm.name, self.config.optim.steps, self.step) as advance:
                while self.step < self.config.optim.steps:
                    rows.append(self.train_step())
                    advance(self.step, rows[-1])
            if self.run_dir is not None and self.strategy.joins_io:
                if rows or not (self.run_dir.path / "policy").is_dir():  # a finished run's files stay as they are
                    with self.timer.outside_steps("io"):
                        self.save_policy()
                    self._write_phases()
                self.run_dir.close()  # the run is complete: give the directory up
            return rows
        finally:
            self.close()

    def close(self) -> None:
        """Stop what the trainer started (an environment's server process, Ray actors, a vLLM engine)."""
        for part in (self.env if self._owns_env else None, self.runner, self.generator):
            if part is not None:
                part.close()
        self.runner = None

    def save_checkpoint(self) -> None:
        """checkpoint/ (rank 0 writes; sharded: every rank calls this, to gather the full tensors)."""
        save_trainer(self)

    def save_policy(self) -> Path | None:
        """policy/: a save_pretrained directory (HF) or the tabular table (sharded: every rank calls this)."""
        return self.run_dir.save_policy(self.strategy.whole_policy(self.policy))

