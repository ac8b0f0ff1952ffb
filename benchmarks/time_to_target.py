"""Time to target: wall-clock seconds until the exact KL(pi||p*) of the policy being trained first falls to a
threshold, tiltlm's algorithms (their defaults) vs TRL's RLOOTrainer (CPU).

    python benchmarks/time_to_target.py --seeds 0 1 2 --methods kl-pg dpg gdc++ \\
        --json benchmarks/results/time_to_target.json

The testbed, the target, the samples per step and both trainers are benchmarks/sample_efficiency.py's
(imported from it): a small GPT-2 fitted to a random Markov chain, BOS as the one context, at most 4 new
tokens (341 sequences), p* ∝ pi0·exp(count:a / 1), 64 samples per step.

- tiltlm: ``sample_efficiency.tiltlm_config`` (prior, target, context, samples per step, length, seed and
  optim.steps = --max-samples / 64; lr, schedule, clipping and every other option are the library's
  **defaults**, whatever they are at the time of the run), built by ``tiltlm.train.build.build`` and
  driven step by step through ``Trainer.train_step`` (no run directory: no checkpoint or metrics file is
  written, as TRL saves nothing either). A method ``algo@key=value,...`` overrides options as in
  sample_efficiency (keys of optim go there, the rest are the algorithm's).
- TRL: ``sample_efficiency.trl_trainer`` (RLOOTrainer, KL in the reward with beta = the tilt's,
  leave-one-out baseline, AdamW, linear decay over max_steps = --max-samples / 64, max_grad_norm 1)
  at ``--trl-lr`` (default 1e-3, the lr tuned in benchmarks/results/sample_efficiency.json); a
  ``TrainerCallback`` evaluates at ``on_step_end`` and stops the training there once the target is met.

Clock: every ``--eval-every`` optimiser steps the live model is scored exactly by enumeration
(``sample_efficiency.ExactScorer``); the clock is paused around that evaluation, so a run's seconds are
training only (sampling, scoring, backward, optimiser). tiltlm's clock starts at its first train_step (the
Trainer is built before), TRL's at ``on_train_begin`` (after its optimiser and scheduler exist). A run stops
when KL(pi||p*) <= ``--target-kl`` (checked after each evaluated step, from step 1) or at ``--max-samples``;
a run reports seconds-, samples- and step-to-target (or not reached), its seconds per optimiser step, and
the KL trace. Within a seed the runs alternate tool by tool (order reversed on every other seed) so the
machine's load hits both alike; before the measured runs each tool runs ``--warmup-steps`` untimed steps
(imports, first-call costs). Rows: per method the mean and min–max over seeds (over the seeds that reached
the target; ``reached`` counts them), and the ratio tiltlm/TRL of the mean seconds and samples to target
(only when every seed of both reached it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, quiet_transformers, set_threads
from sample_efficiency import (BETA, MAX_NEW_TOKENS, PER_STEP, QUICK_TESTBED, REWARD_SPEC, TESTBED, ExactScorer, tiltlm_config,
                               trl_trainer)

TARGET_KL, TRL_LR, MAX_SAMPLES, QUICK_MAX_SAMPLES = 0.007, 1e-3, 32768, 4 * PER_STEP


class Watch:
    """The clock of one run, paused around each exact evaluation; says when the run has met the target."""

    def __init__(self, target_kl: float, eval_every: int, max_steps: int):
        self.target_kl, self.eval_every, self.max_steps = target_kl, eval_every, max_steps
        self.seconds = self.eval_seconds = 0.0
        self.steps, self.trace, self.reached_at, self.kl_start = 0, [], None, None
        self._t0: float | None = None

    def start(self, evaluate: Callable[[], dict]) -> None:
        """Score the initial policy (untimed), then start the clock."""
        self.kl_start = evaluate()["kl_policy_target"]
        self._t0 = time.perf_counter()

    def step_end(self, step: int, evaluate: Callable[[], dict]) -> bool:
        """After optimiser step ``step``: stop the clock, evaluate when due; True = stop the run (target met or budget spent)."""
        self.seconds += time.perf_counter() - self._t0
        self._t0, self.steps = None, step
        if step % self.eval_every == 0 or step >= self.max_steps:
            t0 = time.perf_counter()
            kl = evaluate()["kl_policy_target"]
            self.eval_seconds += time.perf_counter() - t0
            self.trace.append([step, kl])
            if kl <= self.target_kl:
                self.reached_at = (step, self.seconds)
                return True
        if step >= self.max_steps:
            return True
        self._t0 = time.perf_counter()
        return False

    def result(self, per_step: int) -> dict:
        kls = [kl for _, kl in self.trace]
        step, seconds = self.reached_at or (None, None)
        return {"reached": self.reached_at is not None, "seconds_to_target": seconds, "step_to_target": step,
                "samples_to_target": step * per_step if step is not None else None, "steps_run": self.steps,
                "seconds_run": self.seconds, "seconds_per_step": self.seconds / self.steps if self.steps else None,
                "eval_seconds": self.eval_seconds, "kl_start": self.kl_start, "kl_last": kls[-1] if kls else None,
                "kl_min": min(kls) if kls else None, "trace": self.trace}


def tiltlm_to_target(spec: str, prior: Path, score: ExactScorer, seed: int, per_step: int, max_steps: int, target_kl: float,
                     eval_every: int) -> dict:
    """Drive Trainer.train_step on the library's defaults until the exact KL(pi||p*) meets ``target_kl``."""
    from tiltlm.train.build import build
    from tiltlm.train.loop import Trainer

    config = tiltlm_config(spec, prior, max_steps, seed, per_step)
    policy, target = build(config)
    trainer = Trainer(config, policy=policy, target=target)
    watch, norms = Watch(target_kl, eval_every, max_steps), []
    evaluate = lambda: score.score(trainer.policy)  # noqa: E731 - the live policy (its enumeration runs without grad)
    try:
        watch.start(evaluate)
        while trainer.step < max_steps:
            row = trainer.train_step()
            if "grad/norm" in row:
                norms.append(row["grad/norm"])
            if watch.step_end(trainer.step, evaluate):
                break
    finally:
        trainer.close()
    out = watch.result(per_step)
    o = config.optim
    out["optim"] = o.model_dump(include={"lr", "schedule", "grad_clip", "warmup_steps", "optimizer", "minibatch_size"})
    if norms:
        out.update(grad_norm_median=statistics.median(norms),
                   clip_fraction=sum(n > o.grad_clip for n in norms) / len(norms) if o.grad_clip else 0.0)
    return out


def trl_to_target(lr: float, prior: Path, score: ExactScorer, seed: int, per_step: int, max_steps: int, target_kl: float,
                  eval_every: int) -> dict:
    """RLOOTrainer at ``lr`` with a callback that scores the live model at each step's end and stops at the target."""
    from transformers import PrinterCallback, TrainerCallback

    watch, holder = Watch(target_kl, eval_every, max_steps), {}

    class ToTarget(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            watch.start(lambda: score.live(model, holder["tokenizer"]))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if watch.step_end(state.global_step, lambda: score.live(model, holder["tokenizer"])):
                control.should_training_stop = True
            return control

    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(lr, prior, max_steps, seed, per_step, Path(tmp) / "run", callbacks=[ToTarget()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training line would land in the middle of the table
        holder["tokenizer"] = trainer.processing_class
        trainer.train()
    a = trainer.args
    return {**watch.result(per_step), "optim": {"lr": lr, "schedule": getattr(a.lr_scheduler_type, "value", str(a.lr_scheduler_type)),
                                                "grad_clip": a.max_grad_norm, "optimizer": getattr(a.optim, "value", str(a.optim))}}


def one_run(method: str, seed: int, prior: Path, score: ExactScorer, args, max_steps: int, target_kl: float | None = None,
            log: bool = True) -> dict:
    target_kl = args.target_kl if target_kl is None else target_kl
    common = dict(prior=prior, score=score, seed=seed, per_step=args.per_step, max_steps=max_steps, target_kl=target_kl,
                  eval_every=args.eval_every)
    if method.startswith("trl-rloo@lr="):
        stats = trl_to_target(float(method.split("=", 1)[1]), **common)
        tool = "trl"
    else:
        stats = tiltlm_to_target(method, **common)
        tool = "tiltlm"
    row = {"tool": tool, "method": method, "seed": seed, **stats}
    if log:
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), file=sys.stderr, flush=True)
    return row


def _spread(values: list[float], key: str, row: dict) -> None:
    if values:
        row[key], row[key + "_min"], row[key + "_max"] = statistics.fmean(values), min(values), max(values)


def summarise(runs: list[dict], trl_method: str | None) -> list[dict]:
    """One row per method: reached count, mean and min–max over the seeds that reached the target, ratio to TRL."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["method"], []).append(r)
    table = []
    for method, group in groups.items():
        hit = [g for g in group if g["reached"]]
        row = {"tool": group[0]["tool"], "method": method, "seeds": len(group), "reached": f"{len(hit)}/{len(group)}",
               "all_reached": len(hit) == len(group)}
        _spread([g["seconds_to_target"] for g in hit], "seconds_to_target", row)
        _spread([g["samples_to_target"] for g in hit], "samples_to_target", row)
        _spread([g["step_to_target"] for g in hit], "step_to_target", row)
        row["seconds_per_step"] = statistics.fmean(g["seconds_per_step"] for g in group if g["seconds_per_step"] is not None)
        row["kl_min"] = min(g["kl_min"] for g in group)
        for key in ("grad_norm_median", "clip_fraction"):
            values = [g[key] for g in group if key in g]
            if values:
                row[key] = statistics.fmean(values)
        table.append(row)
    trl = next((r for r in table if r["method"] == trl_method), None)
    for row in table:
        if row["tool"] == "tiltlm" and trl is not None:
            both = row["all_reached"] and trl["all_reached"]
            row["ratio_seconds_vs_trl"] = row["seconds_to_target"] / trl["seconds_to_target"] if both else None
            row["ratio_samples_vs_trl"] = row["samples_to_target"] / trl["samples_to_target"] if both else None
            row["ratio_step_time_vs_trl"] = row["seconds_per_step"] / trl["seconds_per_step"]
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help=f"a barely fitted testbed, {QUICK_MAX_SAMPLES // PER_STEP} steps, "
                                                             "one seed, no warm-up (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--target-kl", type=float, default=TARGET_KL, help="the threshold on the exact KL(pi||p*)")
    parser.add_argument("--max-samples", type=int, default=None, help=f"budget of a run (default {MAX_SAMPLES}; "
                                                                      f"{QUICK_MAX_SAMPLES} with --quick)")
    parser.add_argument("--eval-every", type=int, default=1, help="score the live policy every N optimiser steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--per-step", type=int, default=PER_STEP)
    parser.add_argument("--methods", nargs="+", default=["kl-pg", "dpg", "gdc++"], help="tiltlm methods: algo[@k=v,...]")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--trl-lr", type=float, default=TRL_LR, help="TRL's learning rate")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps of each tool before the measured runs "
                                                                       "(default 2; 0 with --quick)")
    parser.add_argument("--testbed-dir", type=Path, default=None, help="where the testbed model is kept (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.eval_every < 1 or args.per_step < 2 or args.target_kl < 0:
        parser.error("--eval-every must be >= 1, --per-step >= 2 and --target-kl >= 0")
    quiet_transformers()
    set_threads(args.threads)
    max_samples = args.max_samples or (QUICK_MAX_SAMPLES if args.quick else MAX_SAMPLES)
    max_steps = max_samples // args.per_step
    if max_steps < 1:
        parser.error(f"--max-samples ({max_samples}) is less than one step of --per-step ({args.per_step}) samples")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    warmup = args.warmup_steps if args.warmup_steps is not None else (0 if args.quick else 2)
    use_trl = not args.no_trl
    if use_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed (pip install -e '.[bench]'): skipping the TRL runs", file=sys.stderr)
            use_trl = False
    trl_method = f"trl-rloo@lr={args.trl_lr:g}" if use_trl else None
    methods = list(args.methods) + ([trl_method] if use_trl else [])

    from tiltlm.testbed import make_testbed

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = QUICK_TESTBED if args.quick else TESTBED
        prior = make_testbed(args.testbed_dir or Path(tmp) / "testbed", **spec)
        score = ExactScorer(prior)
        for method in methods if warmup else []:  # first-call costs out of the measured runs
            one_run(method, 0, prior, score, args, min(warmup, max_steps), target_kl=-1.0, log=False)
        for i, seed in enumerate(seeds):
            for method in (methods if i % 2 == 0 else methods[::-1]):
                runs.append(one_run(method, seed, prior, score, args, max_steps))
                if args.json is not None:  # after every run: what is done survives an interruption
                    args.json.write_text(json.dumps({"runs": runs}, indent=1))
        prior_report = {k: score.prior_report[k] for k in ("n_sequences", "log_z", "kl_target_prior", "kl_prior_target")}
    table = summarise(runs, trl_method)
    columns = ["method", "reached", "seconds_to_target", "seconds_to_target_min", "seconds_to_target_max", "samples_to_target",
               "samples_to_target_min", "samples_to_target_max", "step_to_target", "seconds_per_step", "kl_min",
               "ratio_seconds_vs_trl", "ratio_samples_vs_trl", "ratio_step_time_vs_trl"]
    payload = emit("time_to_target", table, columns, None, testbed={**spec, "max_new_tokens": MAX_NEW_TOKENS, "reward": REWARD_SPEC,
                   "beta": BETA, **prior_report}, target_kl=args.target_kl, max_samples=max_samples, per_step=args.per_step,
                   eval_every=args.eval_every, warmup_steps=warmup, trl_lr=args.trl_lr if use_trl else None, seeds=seeds, runs=runs)
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
