"""One step's data: sample (or roll out) -> score with the target -> gather -> Batch.

Randomness: step t draws with seed ``seed * 1_000_003 + t`` (``step_seed``), so a resumed run draws exactly
what the uninterrupted run would have drawn — with a prompt dataset (``data:``, tiltlm.data) that includes the
step's ``prompts_per_step`` prompts, whose rows' other columns travel with the samples to the reward. Data parallel: each rank draws and scores only its rows of the
global batch (``strategy.rows``), each exactly as one process would, and ``strategy.gather`` hands every rank
the whole Batch (tiltlm.distributed.strategy). An offline preference algorithm (``algorithm.offline_pairs``: dpo, ipo,
cdpo) samples nothing: its batch is the step's preference pairs (tiltlm.train.pairs).
"""

from __future__ import annotations

import torch

from tiltlm.data import load_data
from tiltlm.envs import rollout
from tiltlm.errors import TiltlmError
from tiltlm.evaluate import build_evaluator
from tiltlm.records import Batch
from tiltlm.targets.base import Target
from tiltlm.train.build import check_rows
from tiltlm.train.config import TrainConfig
from tiltlm.train.pairs import PairCollector
from tiltlm.train.timing import PhaseTimer


def step_seed(config: TrainConfig, step: int) -> int:
    return config.seed * 1_000_003 + step


class Collector:
    """Draws and scores the batch of each step; counts failed environment episodes across the run."""

    def __init__(self, config: TrainConfig, *, policy, target: Target, algorithm, strategy, env=None, runner=None, generator=None,
                 out_dir=None, timer=None):
        self.config, self.policy, self.target, self.algorithm = config, policy, target, algorithm
        self.timer = timer if timer is not None else PhaseTimer()  # seconds of sampling and scoring (tiltlm.train.timing)
        self.strategy, self.env, self.runner, self.generator = strategy, env, runner, generator
        self.env_counts = {"episodes": 0, "failures": 0}
        # the offline preference algorithms (dpo, ipo, cdpo) sample nothing: their batches are pairs of data (.pairs)
        self.pairs = PairCollector(config, policy=policy, target=target) if algorithm.offline_pairs else None
        if self.pairs is not None:  # the pairs' prompts are the contexts of the exact metrics; no held-out prompts
            self.data, self.eval_data = self.pairs.prompts, None
        else:
            self.data, self.eval_data = load_data(config.data) if config.data is not None else (None, None)
        check_rows(target, self.data, self.eval_data)  # a row without a column the reward needs: refused before sampling
        self.evaluator = build_evaluator(config, self.eval_data, target, active=strategy.joins_io,  # held-out pass@k (tiltlm.evaluate)
                                         out_dir=out_dir if strategy.writes else None)

    def sampler(self):
        """Whom this step samples from: the policy (or the vLLM engine drawing for it) on-policy, else the
        algorithm's proposal."""
        if not self.algorithm.on_policy:
            return self.algorithm.proposal
        return self.generator if self.generator is not None else self.policy

    def __call__(self, step: int) -> Batch:
        if self.pairs is not None:
            with self.timer.phase("score"):
                return self.pairs(step)
        sampler = self.sampler()
        with self.timer.phase("sample"):
            samples = self._sample(sampler, step)
        with self.timer.phase("score"):
            batch = self._score(sampler, samples)
        if self.env is not None:
            self._count_failures(batch.samples, step)
        return batch

    def _sample(self, sampler, step: int):
        if self.env is not None:
            samples = self._rollout(sampler, step)
        else:
            s = self.config.sampling
            prompts = self.data.draw(self.config.data.prompts_per_step, step_seed(self.config, step)) if self.data else None
            contexts = prompts.prompts if prompts is not None else list(s.contexts)
            rows = self.strategy.rows(len(contexts) * s.n_per_context)
            samples = sampler.sample(contexts, s.n_per_context, seed=step_seed(self.config, step),
                                     **({} if rows is None else {"rows": rows}))
            samples.columns = prompts.columns if prompts is not None else None
        return samples

    def _score(self, sampler, samples) -> Batch:
        logq = samples.logp.double()
        is_prior = sampler is self.target.prior
        token_logp_prior = None
        if samples.trajectories is not None or self.algorithm.needs_token_prior:  # per-token log pi0: per-turn / per-token KL
            token_logp_prior = samples.token_logp if is_prior else self.target.prior.log_prob(samples, per_token=True).detach().cpu()
            scores = self.target.score(samples, prior_logp=token_logp_prior.sum(-1).double())
        else:
            scores = self.target.score(samples, prior_logp=logq if is_prior else None)
        batch = Batch(samples=samples, logq=logq, token_logq=samples.token_logp, logp_prior=scores.logp_prior,
                      log_target=scores.log_target, reward=scores.reward, token_logp_prior=token_logp_prior, beta=self.target.beta)
        return self.strategy.gather(batch, pad_id=getattr(sampler, "pad_id", sampler.eos_id))

    def _rollout(self, sampler, step: int):
        """Play this step's episodes: n_per_context per task, tasks drawn by the step's seed."""
        e, n = self.config.env, self.config.sampling.n_per_context
        from tiltlm.envs.base import EnvFault, call_with_timeout

        try:  # user code: its exceptions, sys.exit() and hangs are one line, as its reset/step calls' are
            tasks = call_with_timeout(lambda: list(self.env.tasks()), e.timeout_s)
        except EnvFault as fault:
            raise TiltlmError(f"environment '{e.name}': tasks() {fault}; fix the environment's tasks()") from None
        if e.tasks_per_step is not None and e.tasks_per_step < len(tasks):
            rng = torch.Generator().manual_seed(step_seed(self.config, step))
            tasks = [tasks[i] for i in sorted(torch.randperm(len(tasks), generator=rng)[: e.tasks_per_step].tolist())]
        return rollout(sampler, self.env, tasks, n, seed=step_seed(self.config, step), max_action_tokens=e.max_action_tokens,
                       timeout_s=e.timeout_s, max_observation_chars=e.max_observation_chars,
                       max_observation_tokens=e.max_observation_tokens, episodes=self.strategy.rows(len(tasks) * n),
                       runner=self.runner)

    def _count_failures(self, samples, step: int) -> None:
        """Count the step's failed episodes; stop the run when too many have failed."""
        e, counts = self.config.env, self.env_counts
        failures = [t.failure for t in samples.trajectories if t.failure]
        counts["episodes"] += len(samples)
        counts["failures"] += len(failures)
        rate = counts["failures"] / counts["episodes"]
        if failures and rate > e.max_failure_rate:
            common = max(set(failures), key=failures.count)
            raise TiltlmError(
                f"environment '{e.name}': {counts['failures']} of {counts['episodes']} episodes failed by step {step + 1} "
                f"({rate:.0%} > env.max_failure_rate {e.max_failure_rate:.0%}); most common: {common}; fix the environment or raise env.max_failure_rate"
            )
