"""Goal 4: peak resident memory of a default `tiltlm run` and of one B=64 training step; LoRA shares pi0.

    python benchmarks/memory.py [--budget 0.05] [--batch 64] [--no-run]

Each measurement runs in a fresh child process (so one does not inherit another's peak):
- ``tiltlm run --budget <budget>`` (the default job, all parts, scaled down: peak RSS hardly depends
  on the number of steps);
- a kl-pg step of B sequences of T=32 tokens with the default model: RSS after building the
  trainer, and the peak over two steps; once with full fine-tuning (the prior is a frozen second
  copy by design) and once with LoRA, where the prior is the same peft model with its adapters off.
  ``weight_copies`` counts the distinct parameter storages of policy + prior in units of one model:
  2 for full fine-tuning, 1 (+ the adapters) with LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_common_args,
    current_rss_mb,
    emit,
    peak_rss_mb,
    quiet_transformers,
    set_threads,
)


def _child_step(b: int, t: int, lora: bool, threads: int) -> None:
    """Runs in the child: build, measure, step twice, print one JSON line."""
    quiet_transformers()
    set_threads(threads)
    from tiltlm.train.build import build
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    before = current_rss_mb()
    config = parse_config({"prior": "default", "target": {"reward": "count:e", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
                           "sampling": {"n_per_context": b, "max_new_tokens": t}, "optim": {"steps": 10, "lr": 1e-4},
                           **({"lora": {"r": 8}} if lora else {})})
    policy, target = build(config)
    trainer = Trainer(config, policy=policy, target=target)
    built = current_rss_mb()
    storages = {}
    for model in (policy.model, target.prior.model):
        for p in model.parameters():
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    one_model = sum(p.numel() * p.element_size() for n, p in target.prior.model.named_parameters() if "lora_" not in n)
    for _ in range(2):
        trainer.train_step()
    print(json.dumps({"rss_after_import_mb": before, "rss_built_mb": built, "peak_rss_mb": peak_rss_mb(),
                      "weight_copies": sum(storages.values()) / one_model, "same_model_object": policy.model is target.prior.model}))


def _run_child(args: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, env=env, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise RuntimeError(f"{' '.join(args[:4])} failed ({proc.returncode}): {err[-1] if err else ''}")
    return proc.stdout


def _peak_of(cmd: list[str], threads: int) -> tuple[str, float]:
    """Run ``cmd`` under a tiny Python wrapper that reports the child's own peak RSS (wait4)."""
    wrapper = ("import json,os,subprocess,sys;p=subprocess.Popen(sys.argv[1:],stdout=subprocess.PIPE,stderr=subprocess.DEVNULL);"
               "out=p.stdout.read();_,status,ru=os.wait4(p.pid,0);sys.stdout.write(out.decode());"
               "print(json.dumps({'__peak_mb__':ru.ru_maxrss/1024,'__status__':os.waitstatus_to_exitcode(status)}))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    out = _run_child([sys.executable, "-c", wrapper, *cmd], env)
    lines = out.strip().splitlines()
    meta = json.loads(lines[-1])
    if meta["__status__"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} exited with {meta['__status__']}")
    return "\n".join(lines[:-1]), meta["__peak_mb__"]


def _tiltlm_command() -> list[str]:
    """The `tiltlm` console script next to this Python, else the module's typer app."""
    script = Path(sys.executable).with_name("tiltlm")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from tiltlm.cli import main; main()"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--budget", type=float, default=0.05, help="tiltlm run --budget (steps scale with it)")
    parser.add_argument("--batch", type=int, default=None, help="B of the measured step (64)")
    parser.add_argument("--length", type=int, default=32, help="T of the measured step")
    parser.add_argument("--no-run", action="store_true", help="skip the `tiltlm run` measurement")
    parser.add_argument("--child-step", nargs=3, metavar=("B", "T", "LORA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_step:
        b, t, lora = args.child_step
        _child_step(int(b), int(t), lora == "1", args.threads)
        return {}
    set_threads(args.threads)
    batch = args.batch or (4 if args.quick else 64)
    length = 8 if args.quick else args.length
    rows = []
    for lora in (False, True):
        out, peak = _peak_of([sys.executable, __file__, "--threads", str(args.threads), "--child-step", str(batch), str(length), str(int(lora))], args.threads)
        info = json.loads(out.strip().splitlines()[-1])
        rows.append({"what": f"kl-pg step B={batch} T={length}" + (" LoRA r=8" if lora else " full"), "peak_rss_mb": peak,
                     "rss_built_mb": info["rss_built_mb"], "rss_after_import_mb": info["rss_after_import_mb"],
                     "weight_copies": info["weight_copies"], "prior_is_policy_model": info["same_model_object"]})
    if not (args.no_run or args.quick):
        with tempfile.TemporaryDirectory() as tmp:
            _, peak = _peak_of([*_tiltlm_command(), "run", "--out", str(Path(tmp) / "run"), "--budget", str(args.budget)], args.threads)
        rows.append({"what": f"tiltlm run --budget {args.budget:g}", "peak_rss_mb": peak})
    return emit("memory", rows, ["what", "peak_rss_mb", "rss_built_mb", "rss_after_import_mb", "weight_copies", "prior_is_policy_model"],
                args.json, threads=args.threads)


if __name__ == "__main__":
    main()
