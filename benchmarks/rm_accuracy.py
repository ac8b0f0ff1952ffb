"""Held-out accuracy of Bradley–Terry reward models trained on synthetic preferences of a known gold (README "Learned rewards").

    python benchmarks/rm_accuracy.py [--quick] [--settings testbed default] [--json out.json]

Each setting draws pairs from a prior with tiltlm.preferences (the `tiltlm preferences` construction), trains a reward
model on them with tiltlm.rmtrain (`tiltlm reward-model train`) and reports, on the held-out pairs:

- ``acc_labels``: the fraction the RM orders as the file's labels do (training.json's eval/accuracy), Wilson 95%;
- ``acc_gold``: the fraction of the held-out pairs the gold orders (g_w ≠ g_l) that the RM, scored through ``rm:DIR``,
  orders as the gold does, Wilson 95% — the proxy's agreement with the gold itself, which Bernoulli labels cap
  ``acc_labels`` below (a label disagrees with the gold with probability σ(−|Δg|/tau));
- ``acc_start``: ``acc_labels`` of the same model untrained (random score head), the control.

Settings: ``testbed`` — a near-uniform 6-token testbed (a–e, EOS; ≤ 8 tokens), g = count:a, argmax labels without
ties, the testbed itself as the base; ``default`` — the embedded story LM as prior and base (≤ 24 tokens), g = VADER
sentiment, Bernoulli labels with tau 0.1, ties (mostly two neutral stories, g = 0) left out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, quiet_transformers, set_threads  # noqa: E402

SETTINGS = {
    "testbed": dict(prior="testbed", gold="count:a", labels="argmax", tau=1.0, max_new_tokens=8, pairs=1200, eval_size=300,
                    train=dict(lr=3e-3, epochs=4, batch_size=16)),
    "default": dict(prior="default", gold="sentiment", labels="bernoulli", tau=0.1, max_new_tokens=24, pairs=2000, eval_size=400,
                    train=dict(lr=3e-4, epochs=2, batch_size=16)),  # lr 5e-5: 0.595 [0.546, 0.642] (README)
}
QUICK = {"pairs": 60, "eval_size": 20, "train": dict(lr=3e-3, steps=3, batch_size=8)}


def run_setting(name: str, spec: dict, root: Path, *, seed: int = 0) -> dict:
    from tiltlm.metrics.proportions import wilson
    from tiltlm.policies import HFPolicy
    from tiltlm.preference_data import load_preferences
    from tiltlm.preferences import synthesize, write_preferences
    from tiltlm.rewards import get_reward
    from tiltlm.rmtrain import parse_rm_config, train_reward_model
    from tiltlm.testbed import make_testbed

    start = time.perf_counter()
    prior = str(make_testbed(root / "testbed", vocab_size=6, n_embd=32, seed=0, init_std=0.1)) if spec["prior"] == "testbed" else "default"
    gold = get_reward(spec["gold"])
    rows = synthesize(HFPolicy.from_pretrained(prior, max_new_tokens=spec["max_new_tokens"]), [""], pairs=spec["pairs"], gold=gold,
                      tau=spec["tau"], seed=seed, labels=spec["labels"], no_ties=True)
    prefs = write_preferences(root / f"{name}.jsonl", rows)
    config = parse_rm_config({"base": prior, "data": {"path": str(prefs), "eval_size": spec["eval_size"]}, "seed": seed,
                              **spec["train"]})
    m = train_reward_model(config, root / f"rm_{name}")["metrics"]
    held = load_preferences(prefs).split(eval_size=spec["eval_size"], seed=seed)[1]
    by_text = {(r["prompt"], r["chosen"], r["rejected"]): r for r in rows}
    rm = get_reward(f"rm:{root / f'rm_{name}'}")
    r_w = rm([p.chosen for p in held], [p.prompt for p in held])
    r_l = rm([p.rejected for p in held], [p.prompt for p in held])
    gap = [by_text[(p.prompt, p.chosen, p.rejected)] for p in held]
    agree = sum((float(w) > float(lo)) == (g["gold_chosen"] > g["gold_rejected"]) for w, lo, g in zip(r_w, r_l, gap))
    low, high = wilson(agree, len(held))
    return {"setting": name, "gold": spec["gold"], "labels": spec["labels"], "tau": spec["tau"], "train_pairs": m["train/pairs"],
            "eval_pairs": m["eval/pairs"], "steps": m["steps"], "acc_labels": m["eval/accuracy"], "acc_labels_low": m["eval/accuracy_low"],
            "acc_labels_high": m["eval/accuracy_high"], "acc_gold": agree / len(held), "acc_gold_low": low, "acc_gold_high": high,
            "acc_start": m["eval/accuracy_start"], "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="60 pairs, 3 steps per setting (a smoke run)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="override every setting's learning rate")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            spec = {**SETTINGS[name], **(QUICK if args.quick else {})}
            if args.lr is not None:
                spec = {**spec, "train": {**spec["train"], "lr": args.lr}}
            out.append(run_setting(name, spec, Path(tmp), seed=args.seed))
            r = out[-1]
            print(f"{name}: held-out accuracy against the gold {r['acc_gold']:.3f} [{r['acc_gold_low']:.3f}, {r['acc_gold_high']:.3f}], "
                  f"against the labels {r['acc_labels']:.3f} [{r['acc_labels_low']:.3f}, {r['acc_labels_high']:.3f}] "
                  f"(Wilson 95%, {r['eval_pairs']} pairs; untrained {r['acc_start']:.3f}; {r['seconds']:.0f} s)", flush=True)
    columns = ["setting", "gold", "labels", "train_pairs", "eval_pairs", "steps", "acc_gold", "acc_gold_low", "acc_gold_high",
               "acc_labels", "acc_start", "seconds"]
    payload = emit("rm_accuracy", out, columns, args.json, quick=args.quick)
    return payload


if __name__ == "__main__":
    main()
