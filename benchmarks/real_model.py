"""A kl-pg step on a real 49k-vocabulary model (SmolLM2-135M): peak RSS and seconds, split into its parts.

    python benchmarks/real_model.py [--batch 16] [--length 64] [--steps 3] [--quick] [--json out.json]

Each configuration (full fine-tuning, LoRA r=8) runs in a fresh child process, one chat prompt,
B completions of at most T tokens, ``--steps`` steps written to a run directory. Reported per
configuration:

- ``rss_built_mb``: VmRSS after building the trainer (weights, optimiser);
- ``peak_step_mb``: VmHWM over the steps, the high-water mark reset after building
  (``/proc/self/clear_refs``), so it is the training step's own peak, not the loader's;
- ``step_s`` and its parts, the minimum over steps 2.. (step 1 warms up): ``sample_s`` (the KV-cache
  sampling loop), ``reference_s`` (log pi0 of the samples, no grad; with LoRA the same model with its
  adapters off), ``score_s`` (log pi with grad, the loss's forward), ``backward_s`` (backward, clipping
  and the optimiser step); what is left (reward, metrics) is in ``step_s`` only;
- ``metrics``: the rows of metrics.jsonl, to compare two versions of the code number for number.

``--quick``: a tiny tied Llama testbed instead of SmolLM2 (seconds), for tests/test_benchmarks.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, current_rss_mb, emit, quiet_transformers, set_threads

PROMPT = "Write a short poem about the sea."
QUICK_PROMPT = "abc"
PARTS = ("sample_s", "reference_s", "score_s", "backward_s")


def _vm(key: str) -> float:
    """A /proc/self/status field in MiB (VmHWM: peak resident set since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _timed(times: dict, key: str, fn):
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
    return wrapped


def _child(prior: str, b: int, t: int, lora: bool, steps: int, threads: int, prompt: str) -> dict:
    """Runs in the child: build, reset the peak, step ``steps`` times with every part timed."""
    quiet_transformers()
    set_threads(threads)
    from tiltlm.train.build import build
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    config = parse_config({"prior": prior, "target": {"reward": "count:e", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
                           "sampling": {"contexts": [prompt], "n_per_context": b, "max_new_tokens": t},
                           "optim": {"steps": steps, "lr": 1e-4}, "metrics": {"diversity": False}, "seed": 3,
                           **({"lora": {"r": 8}} if lora else {})})
    policy, target = build(config)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, policy=policy, target=target, out_dir=Path(tmp) / "run")
        built = current_rss_mb()
        times: dict = {}
        policy.sample = _timed(times, "sample_s", policy.sample)
        target.prior.log_prob = _timed(times, "reference_s", target.prior.log_prob)
        trainer.strategy.token_logp = _timed(times, "score_s", trainer.strategy.token_logp)
        trainer._descend = _timed(times, "backward_s", trainer._descend)
        reset = _reset_peak()
        per_step = []
        for _ in range(steps):
            times.clear()
            t0 = time.perf_counter()
            trainer.train_step()
            per_step.append({"step_s": time.perf_counter() - t0, **{k: times.get(k, 0.0) for k in PARTS}})
        peak = _vm("VmHWM")
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = per_step[1:] or per_step
    best = {k: min(s[k] for s in timed) for k in ("step_s", *PARTS)}
    same = policy.model is target.prior.model
    return {"rss_built_mb": built, "peak_step_mb": peak if reset else float("nan"), "peak_is_step_only": reset, **best,
            "prior_is_policy_model": same, "vocab": policy.vocab_size, "metrics": metrics}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--prior", default=None, help="model (default smollm2-135m; --quick: a tiny tied Llama testbed)")
    parser.add_argument("--batch", type=int, default=None, help="B completions of the one prompt (16)")
    parser.add_argument("--length", type=int, default=None, help="T, max new tokens (64)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration (3)")
    parser.add_argument("--configs", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--child", nargs=6, metavar=("PRIOR", "B", "T", "LORA", "STEPS", "PROMPT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        prior, b, t, lora, steps, prompt = args.child
        print(json.dumps(_child(prior, int(b), int(t), lora == "1", int(steps), args.threads, prompt)))
        return {}
    set_threads(args.threads)
    b = args.batch or (4 if args.quick else 16)
    t = args.length or (8 if args.quick else 64)
    steps = args.steps or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        prior = args.prior
        if prior is None and args.quick:
            from tiltlm.testbed import make_testbed

            prior = str(make_testbed(Path(tmp) / "llama", arch="llama", vocab_size=31, n_layer=2, n_embd=32, n_head=4, n_positions=128))
        prior = prior or "smollm2-135m"
        prompt = QUICK_PROMPT if args.quick and args.prior is None else PROMPT  # the testbed's tokenizer knows lowercase letters only
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        rows = []
        for name in args.configs:
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", prior, str(b), str(t), str(int(name == "lora")), str(steps), prompt]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()
                raise RuntimeError(f"{name}: child failed ({proc.returncode}): {err[-1] if err else ''}")
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"config": f"kl-pg {name} B={b} T={t}", **info})
    return emit("real_model", rows, ["config", "rss_built_mb", "peak_step_mb", "step_s", *PARTS], args.json, threads=args.threads,
                prior=prior if args.prior or not args.quick else "testbed llama", prompt=prompt)


if __name__ == "__main__":
    main()
