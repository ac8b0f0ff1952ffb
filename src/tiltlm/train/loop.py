"""The one training loop: sample -> score with the target -> loss -> optimiser step -> metrics -> log -> checkpoint.

Every algorithm runs through ``Trainer.step``; nothing here knows which one it is running beyond
``algorithm.on_policy`` (whom to sample from) and ``algorithm.epochs`` (passes over a batch).
Randomness: step t samples with seed ``seed * 1_000_003 + t``, so a resumed run draws exactly what
the uninterrupted run would have drawn.
Data parallel (torchrun / accelerate launch, tiltlm.distributed.dist): each rank draws and scores its
shard of the step's rows, every rank then holds the same global batch, each computes log pi with grad
on its own rows, gradients are summed; only rank 0 writes files. With ``distributed.strategy: fsdp``
the weights are sharded too (tiltlm.distributed.fsdp): forwards, exact metrics and the gathering of
checkpoints then run on every rank together.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
import yaml

from tiltlm.algorithms.base import Algorithm, Batch, get_algorithm
from tiltlm.distributed import fsdp
from tiltlm.distributed.dist import all_reduce_grads_, current_world, gather_batch, gather_rows
from tiltlm.envs import get_env, rollout
from tiltlm.errors import TiltlmError
from tiltlm.exact import count_sequences, enumerate_space
from tiltlm.exact.mdp import ExactEnvMetrics
from tiltlm.metrics.batch import ExactMetrics, batch_metrics
from tiltlm.metrics.episodes import episode_metrics
from tiltlm.targets.base import Target, Tilt, rewards_of
from tiltlm.train.checkpoint import load_checkpoint, save_checkpoint, trainable_state
from tiltlm.train.config import TrainConfig


def trainable_module(policy) -> torch.nn.Module:
    """The nn.Module holding a policy's trainable weights (the tabular policy itself, or the HF model)."""
    return policy if isinstance(policy, torch.nn.Module) else policy.model


def score_batch(target: Target, samples, logq: torch.Tensor, *, sampler_is_prior: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi0, log P, reward) for samples; the tilt's reward is computed once and reused for log P."""
    logp_prior = logq if sampler_is_prior else target.prior.log_prob(samples).double().cpu()
    tilt = target.tilt
    reward = rewards_of(tilt.reward, samples) if tilt is not None else torch.zeros(len(samples), dtype=torch.float64)
    log_potential = torch.zeros(len(samples), dtype=torch.float64)
    for factor in target.factors:
        if factor is tilt:
            log_potential = log_potential + (reward / tilt.beta if math.isfinite(tilt.beta) else 0.0)
        else:
            log_potential = log_potential + factor.log_potential(samples)
    return logp_prior, logp_prior + log_potential, reward


def _out_of_memory(e: BaseException) -> bool:
    message = str(e).lower()  # CUDA: "CUDA out of memory"; CPU: "DefaultCPUAllocator: can't allocate memory"
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in message or "can't allocate memory" in message


def _nonfinite_cause(batch: Batch, logp: torch.Tensor, target: Target) -> str:
    """Why a loss (or gradient) is not finite: the policy's log-probs, the rewards' scale, or the loss itself."""
    if not bool(torch.isfinite(logp.detach()).all()):
        return "log pi(x) of the policy is non-finite (its weights diverged); lower optim.lr or set optim.grad_clip"
    beta = target.tilt.beta if target.tilt is not None else math.inf
    r_max = float(batch.reward.abs().max()) if len(batch) else 0.0
    lt = batch.log_target
    if bool((torch.isnan(lt) | (lt == math.inf)).any()) or not math.isfinite(float(batch.reward.sum())):
        return f"the rewards (|r| up to {r_max:.3g}) overflow r/beta (beta {beta:g}); rescale the reward or raise beta"
    return f"the loss overflowed with rewards up to |r| = {r_max:.3g} and beta {beta:g}; lower optim.lr, rescale the reward or raise beta"


class Trainer:
    """Runs ``config.optim.steps`` steps of ``config.algorithm`` on ``policy`` toward ``target``.

    With ``out_dir`` it writes config.yaml, metrics.jsonl, checkpoint/ and finally policy/.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        policy,
        target: Target,
        out_dir: str | Path | None = None,
        resume: bool = False,
        algorithm: Algorithm | None = None,
        on_metrics: Callable[[dict], None] | None = None,
        env=None,
    ):
        self.config = config
        self.policy = policy
        self.target = target
        # the interactive case: episodes are played in an environment (built from config.env unless given)
        self._owns_env = env is None and config.env is not None
        self.env = get_env(config.env.name, **config.env.options) if self._owns_env else env
        self.env_counts = {"episodes": 0, "failures": 0}
        self.world = current_world()  # rank and size of the data-parallel group (1 process without one)
        self.runner = self._build_runner()  # where episodes are played (None: in this process)
        self.generator = self._build_generator(policy)  # vLLM engine that samples for the policy (None: the policy samples)
        self.algorithm = algorithm or get_algorithm(config.algorithm)
        if not self.algorithm.on_policy:
            self.algorithm.proposal = target.prior
        # fsdp: weights, gradients and optimiser moments sharded over the ranks (before the optimiser sees the parameters)
        self.sharded = config.distributed.strategy == "fsdp" and self.world.size > 1
        if self.sharded:
            fsdp.check_supported(config, policy)
            d = config.distributed
            fsdp.shard_policies(policy, target.prior, self.world, units=d.fsdp_units, reshard_after_forward=d.reshard_after_forward)
        self.module = trainable_module(policy)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise TiltlmError("the policy has no trainable parameters; check that its weights require grad")
        o = config.optim
        self.optimizer = (
            torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
            if o.optimizer == "adam"
            else torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
        )
        self.step = 0
        self.on_metrics = on_metrics
        self.exact = self._build_exact()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self._prepare_out_dir(resume)

    # ---- set-up ------------------------------------------------------------------------
    def _build_runner(self):
        """Ray actors that play the episodes (rollout.backend: ray), else None (this process)."""
        r = self.config.rollout
        if self.env is None or r.backend == "local":
            return None
        from functools import partial

        from tiltlm.distributed.ray_rollout import RayEpisodes

        e = self.config.env
        return RayEpisodes(partial(get_env, e.name, **e.options), num_workers=r.num_workers, address=r.address,
                           cpus_per_worker=r.cpus_per_worker)

    def _build_generator(self, policy):
        if self.config.rollout.generation == "policy":
            return None
        if self.env is not None:
            raise TiltlmError("rollout.generation: vllm samples fixed contexts only; environment episodes use the policy (drop it)")
        from tiltlm.distributed.vllm_backend import VLLMGenerator

        return VLLMGenerator(policy)

    def _build_exact(self) -> list[ExactMetrics] | None:
        m = self.config.metrics
        prior = self.target.prior
        if not m.exact_every:
            return None
        if self.env is not None:
            return self._build_exact_env()
        if count_sequences(prior.vocab_size, self.config.sampling.max_new_tokens) > m.exact_max_sequences:
            return None  # not enumerable: estimates only
        out = []
        for context in self.config.sampling.contexts:
            space = enumerate_space(prior, context=context, max_new_tokens=self.config.sampling.max_new_tokens,
                                    max_sequences=m.exact_max_sequences)
            logq = space.logp
            _, log_target, reward = score_batch(self.target, space.samples, logq, sampler_is_prior=True)
            out.append(ExactMetrics(space, log_target - logq, reward))
        return out

    def _build_exact_env(self) -> list | None:
        """Exact trajectory metrics when the env is tabular and the target is Prior * Tilt(env)."""
        tilt = self.target.tilt
        if not hasattr(self.env, "histories") or tilt is None or tilt.reward.name != "env" or len(self.target.factors) != 1:
            return None
        return [ExactEnvMetrics(self.env, self.target.prior.log_action_probs(), tilt.beta)]

    def _prepare_out_dir(self, resume: bool) -> None:
        out = self.out_dir
        ckpt = out / "checkpoint"
        if not self.world.is_main:  # rank 0 writes the run directory; every rank loads the same checkpoint
            if resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
                self._load(ckpt)
            return
        if resume:
            if not (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
                if (out / "config.yaml").is_file():  # killed before its first checkpoint: restart from step 0
                    self._truncate_metrics(0)
                    return
                raise TiltlmError(f"no checkpoint in '{out}' to resume; run without --resume")
            self._load(ckpt)
            return
        if out.exists() and not out.is_dir():
            raise TiltlmError(f"--out '{out}' is a file, not a directory; choose another --out")
        if out.exists() and any(out.iterdir()):
            raise TiltlmError(f"output directory '{out}' is not empty; pass --resume to continue that run or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.yaml.tmp"  # temp file + rename: a kill never leaves half a config
        tmp.write_text(yaml.safe_dump(json.loads(self.config.model_dump_json()), sort_keys=False))
        tmp.replace(out / "config.yaml")

    def _load(self, ckpt: Path) -> None:
        data = load_checkpoint(ckpt)
        state = data["state"]
        missing = set(data["policy"]) ^ {n for n, p in self.module.named_parameters() if p.requires_grad}
        if missing:
            raise TiltlmError(f"checkpoint '{ckpt}' does not match this policy ({len(missing)} tensors differ); resume with the same config")
        if self.sharded:
            fsdp.load_state(self.module, self.optimizer, data["policy"], data["optimizer"])
        else:
            self.module.load_state_dict(data["policy"], strict=False)
            self.optimizer.load_state_dict(data["optimizer"])
        torch.random.set_rng_state(data["rng"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.env_counts = dict(state.get("env", self.env_counts))
        if "proposal" in data:
            proposal = self.policy.copy()
            trainable_module(proposal).load_state_dict(data["proposal"])
            self.algorithm.proposal = proposal
        self.step = int(state["step"])
        if self.generator is not None:
            self.generator.sync()  # the engine started from the initial weights
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Keep only complete lines of steps <= the checkpoint's (a crash may have left more, or half a line)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists() or not self.world.is_main:
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row.get("step", 0) <= step:
                keep.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)

    # ---- the loop ----------------------------------------------------------------------
    def seed_for(self, step: int) -> int:
        return self.config.seed * 1_000_003 + step

    def make_batch(self, step: int) -> Batch:
        s = self.config.sampling
        sampler = self.policy if self.algorithm.on_policy else self.algorithm.proposal
        if sampler is self.policy and self.generator is not None:
            sampler = self.generator  # vLLM draws, the policy's model scores (vllm_backend)
        if self.env is not None:
            samples = self._rollout(sampler, step)
        else:  # data parallel: this rank's rows only, each drawn as in the whole batch
            rows = {} if self.world.size == 1 else {"rows": self.world.shard(len(s.contexts) * s.n_per_context)}
            samples = sampler.sample(list(s.contexts), s.n_per_context, seed=self.seed_for(step), **rows)
        logq = samples.logp.double()
        is_prior = sampler is self.target.prior
        token_logp_prior = None
        if samples.trajectories is not None:  # per-token log pi0 for the per-turn KL
            token_logp_prior = samples.token_logp if is_prior else self.target.prior.log_prob(samples, per_token=True).detach().cpu()
            logq_prior = token_logp_prior.sum(-1).double()
            logp_prior, log_target, reward = score_batch(self.target, samples, logq_prior, sampler_is_prior=True)
        else:
            logp_prior, log_target, reward = score_batch(self.target, samples, logq, sampler_is_prior=is_prior)
        batch = Batch(samples=samples, logq=logq, token_logq=samples.token_logp, logp_prior=logp_prior,
                      log_target=log_target, reward=reward, token_logp_prior=token_logp_prior)
        batch = gather_batch(batch, self.world, pad_id=getattr(sampler, "pad_id", sampler.eos_id))  # every rank: the global batch
        if self.env is not None:
            self._count_failures(batch.samples, step)
        return batch

    def _rollout(self, sampler, step: int):
        """Play this step's episodes: n_per_context per task, tasks drawn by the step's seed."""
        e, n = self.config.env, self.config.sampling.n_per_context
        tasks = list(self.env.tasks())
        if e.tasks_per_step is not None and e.tasks_per_step < len(tasks):
            rng = torch.Generator().manual_seed(self.seed_for(step))
            tasks = [tasks[i] for i in sorted(torch.randperm(len(tasks), generator=rng)[: e.tasks_per_step].tolist())]
        episodes = None if self.world.size == 1 else self.world.shard(len(tasks) * n)
        return rollout(sampler, self.env, tasks, n, seed=self.seed_for(step), max_action_tokens=e.max_action_tokens,
                       timeout_s=e.timeout_s, max_observation_chars=e.max_observation_chars,
                       max_observation_tokens=e.max_observation_tokens, episodes=episodes, runner=self.runner)

    def _count_failures(self, samples, step: int) -> None:
        """Count the step's failed episodes; stop the run when too many have failed."""
        e = self.config.env
        failures = [t.failure for t in samples.trajectories if t.failure]
        self.env_counts["episodes"] += len(samples)
        self.env_counts["failures"] += len(failures)
        rate = self.env_counts["failures"] / self.env_counts["episodes"]
        if failures and rate > e.max_failure_rate:
            common = max(set(failures), key=failures.count)
            raise TiltlmError(
                f"environment '{e.name}': {self.env_counts['failures']} of {self.env_counts['episodes']} episodes failed by step {step + 1} "
                f"({rate:.0%} > env.max_failure_rate {e.max_failure_rate:.0%}); most common: {common}; fix the environment or raise env.max_failure_rate"
            )

    def train_step(self) -> dict:
        """One step; returns its metrics row (also logged). Running out of memory is a one-line TiltlmError."""
        try:
            return self._train_step()
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not _out_of_memory(e):
                raise
            s = self.config.sampling
            raise TiltlmError(
                f"out of memory at step {self.step + 1} with {len(s.contexts) * s.n_per_context} samples of up to {s.max_new_tokens} tokens; "
                "lower sampling.n_per_context or sampling.max_new_tokens (or use a smaller model / LoRA)"
            ) from None

    def _train_step(self) -> dict:
        step = self.step
        batch = self.make_batch(step)
        self.algorithm.observe(batch)
        stats: dict = {}
        logp_before = None
        self.module.train(False)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optim.lr_at(step)
        for _ in range(self.algorithm.epochs):
            token_logp = self._token_logp(batch)
            logp = token_logp.sum(-1)
            if logp_before is None:
                logp_before, token_logp_before = logp.detach(), token_logp.detach()
            loss, stats = self.algorithm.loss(batch, logp, token_logp)
            if not torch.isfinite(loss):
                raise TiltlmError(f"the loss became {float(loss.detach())} at step {step + 1}: {_nonfinite_cause(batch, logp, self.target)}; "
                                  "nothing of this step was saved (after the fix, --resume continues from the last checkpoint)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = self.optimizer.param_groups[0]["params"]
            if not self.sharded:  # (fsdp's backward already reduce-scattered the sum)
                all_reduce_grads_(params, self.world)  # data parallel: the sum of the ranks' rows = the full-batch gradient
            if not self._all_finite(p.grad for p in params if p.grad is not None):
                raise TiltlmError(f"the gradient became non-finite at step {step + 1} (loss {float(loss.detach()):.4g}): {_nonfinite_cause(batch, logp, self.target)}; "
                                  "nothing of this step was saved (after the fix, --resume continues from the last checkpoint)")
            if self.config.optim.grad_clip is not None:
                stats["grad/norm"] = float(fsdp.full(torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)))
            self.optimizer.step()
            self._check_weights(step + 1)
        stats.update(self.algorithm.after_step(batch, self.policy, logp_before))
        if self.generator is not None:
            self.generator.sync()
        self.step = step + 1
        row = {"step": self.step, "loss": float(loss.detach()), **stats,
               **batch_metrics(batch, logp_before, on_policy=self.algorithm.on_policy,
                               kl_estimator=self.config.metrics.kl_estimator, diversity=self.config.metrics.diversity)}
        if batch.samples.trajectories is not None:
            row.update(episode_metrics(batch, token_logp_before, on_policy=self.algorithm.on_policy))
            row["env/failure_rate_run"] = self.env_counts["failures"] / max(1, self.env_counts["episodes"])
        if self.exact and (self.world.is_main or self.sharded) and (self.step % self.config.metrics.exact_every == 0 or self.step == self.config.optim.steps):
            row.update(self.exact_metrics())
        row["samples/seen"] = self.step * len(batch)
        self._log(row)
        every = self.config.checkpoint.every
        if self.out_dir is not None and (self.world.is_main or self.sharded) and ((every and self.step % every == 0) or self.step == self.config.optim.steps):
            self.save_checkpoint()
        return row

    def _token_logp(self, batch: Batch) -> torch.Tensor:
        """log pi_theta per token, (B, T), with grad. Data parallel: this rank's rows carry the graph, the
        other ranks' rows are their detached values, so the loss is the global one and backward reaches
        only this rank's share of the gradient (summed over ranks after backward)."""
        if self.world.size == 1:
            return self.policy.log_prob(batch.samples, grad=True, per_token=True)
        rows = self.world.shard(len(batch))
        local = self.policy.log_prob(batch.samples.select(list(rows)), grad=True, per_token=True)
        return gather_rows(local, self.world)

    def exact_metrics(self) -> dict[str, float]:
        """Exact metrics of the current policy, averaged over contexts."""
        rows = [e(self.policy) for e in self.exact]
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    def run(self, progress: bool = False) -> list[dict]:
        """Train to ``optim.steps``, write policy/, and release an environment the trainer built."""
        try:
            return self._run(progress)
        finally:
            self.close()

    def close(self) -> None:
        """Stop what the trainer started (an environment's server process, for instance)."""
        if self._owns_env and self.env is not None:
            self.env.close()
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if self.generator is not None:
            self.generator.close()

    def _run(self, progress: bool) -> list[dict]:
        rows = []
        total = self.config.optim.steps
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("reward {task.fields[reward]:.3f}  KL(pi||pi0) {task.fields[kl]:.3f}")]
            with Progress(*columns) as bar:
                task = bar.add_task(self.config.algorithm.name, total=total, completed=self.step, reward=float("nan"), kl=float("nan"))
                while self.step < total:
                    row = self.train_step()
                    rows.append(row)
                    bar.update(task, completed=self.step, reward=row["reward/mean"], kl=row["kl/prior_seq"])
        else:
            while self.step < total:
                rows.append(self.train_step())
        if self.out_dir is not None and (self.world.is_main or self.sharded):
            self.save_policy()
        return rows

    # ---- outputs -----------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if not self.world.is_main:  # every rank has the same row; one writes it
            return
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(row)

    def _all_finite(self, tensors) -> bool:
        """Every tensor finite (fsdp: on every rank's shard, so all ranks stop together)."""
        ok = all(bool(torch.isfinite(fsdp.local(t)).all()) for t in tensors)
        return fsdp.everyone(ok, self.world) if self.sharded else ok

    def _check_weights(self, step: int) -> None:
        """Stop (before any checkpoint could store them) when an optimiser step made a weight inf or NaN."""
        bad = next((n for n, p in self.module.named_parameters() if p.requires_grad and not bool(torch.isfinite(fsdp.local(p)).all())), None)
        if self.sharded and not fsdp.everyone(bad is None, self.world):
            bad = bad or "a parameter shard of another rank"
        if bad is not None:
            raise TiltlmError(f"the policy's weights became non-finite at step {step} ({bad}); the last good checkpoint is kept; "
                              "lower optim.lr or set optim.grad_clip, then --resume")

    def save_checkpoint(self) -> None:
        """Rank 0 writes checkpoint/ (fsdp: every rank calls this, to gather the full tensors)."""
        self._check_weights(self.step)  # never replace the last good checkpoint with a broken one
        if self.sharded:
            weights = fsdp.trainable_state(self.module, self.world)
            optimizer = fsdp.optimizer_state(self.module, self.optimizer, self.world)
        else:
            weights, optimizer = trainable_state(self.module), self.optimizer.state_dict()
        if not self.world.is_main:
            return
        proposal = self.algorithm.proposal
        keep_proposal = proposal is not None and proposal is not self.target.prior
        save_checkpoint(
            self.out_dir / "checkpoint", step=self.step, weights=weights, optimizer=optimizer,
            extra={"algorithm": self.algorithm.state_dict(), "env": self.env_counts},
            proposal=trainable_module(proposal).state_dict() if keep_proposal else None,
        )

    def save_policy(self) -> Path | None:
        """Write policy/ atomically: a save_pretrained directory (HF) or the tabular table (rank 0; fsdp:
        every rank calls this, to gather the full weights)."""
        policy = fsdp.unsharded_policy(self.policy, self.world) if self.sharded else self.policy
        if not self.world.is_main:
            return None
        final = self.out_dir / "policy"
        tmp = self.out_dir / "policy.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final


def train(config: TrainConfig, *, policy, target: Target, out_dir=None, resume: bool = False, progress: bool = False) -> list[dict]:
    """Train ``policy`` toward ``target`` with ``config``; returns the metrics rows."""
    return Trainer(config, policy=policy, target=target, out_dir=out_dir, resume=resume).run(progress=progress)


def target_from_config(config: TrainConfig, prior) -> Target:
    """Prior(pi0) * Tilt(reward, beta) * Constraint(c) for each constraint of the config."""
    from tiltlm.targets import Constraint, Prior

    reward = config.target.reward
    r = config.rollout
    if r.backend == "ray" and r.rewards and reward != "env":  # an expensive reward model: score on Ray actors
        from tiltlm.distributed.ray_rollout import ray_reward

        reward = ray_reward(reward, num_workers=r.num_workers, address=r.address, cpus_per_worker=r.cpus_per_worker)
    target = Prior(prior) * Tilt(reward, config.target.beta)
    for c in config.target.constraints:
        target = target * Constraint(c)
    return target
