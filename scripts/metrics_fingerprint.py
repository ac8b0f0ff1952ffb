"""Fixed-seed runs whose metrics.jsonl must not change under a refactor: run before and after, compare bytes.

    python scripts/metrics_fingerprint.py OUT_DIR                # writes OUT_DIR/<case>/metrics.jsonl
    python scripts/metrics_fingerprint.py OUT_DIR --compare REF  # … and exits 1 unless every file equals REF's

Each case is a `tiltlm train` subprocess on one torch thread (float order then depends only on the code):
every algorithm (and its variants: off-policy proposal updates, adaptive KL, f-DPG divergences, constraints) on
a random small-vocabulary testbed with exact metrics, LoRA and full fine-tuning on the embedded default LM, and
the interactive case (exact tabular env, twenty questions).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

TESTBED = {"target": {"reward": "count:a", "beta": 1.0}, "sampling": {"n_per_context": 8, "max_new_tokens": 4},
           "optim": {"steps": 4, "lr": 0.01}, "metrics": {"exact_every": 2}, "checkpoint": {"every": 2}}
CASES = {
    "kl-pg": {"algorithm": "kl-pg"},
    "kl-pg-loss-k3": {"algorithm": {"name": "kl-pg", "kl_in": "loss", "estimator": "k3"}},
    "reinforce": {"algorithm": "reinforce"},
    "ppo-kl-adaptive": {"algorithm": {"name": "ppo-kl", "epochs": 2, "adaptive_kl": True, "target_kl": 0.1, "horizon": 100}},
    "dpg": {"algorithm": "dpg"},
    "dpg-off-policy": {"algorithm": {"name": "dpg", "off_policy": True, "proposal_check_every": 2}},
    "gdc++": {"algorithm": "gdc++", "target": {"reward": "count:a", "beta": 0.5, "constraints": ["contains:b"]}},
    "f-dpg-js": {"algorithm": {"name": "f-dpg", "divergence": "js"}},
    "lm-kl-pg-lora": {"prior": "default", "algorithm": "kl-pg", "lora": {"r": 4},
                      "target": {"reward": "sentiment", "beta": 0.1}, "metrics": {"exact_every": 0},
                      "sampling": {"contexts": ["", "Once upon a time"], "n_per_context": 4, "max_new_tokens": 8},
                      "optim": {"steps": 3, "lr": 1e-4}},
    "lm-dpg-full": {"prior": "default", "algorithm": "dpg", "target": {"reward": "contains:the", "beta": 1.0},
                    "metrics": {"exact_every": 0}, "sampling": {"n_per_context": 4, "max_new_tokens": 8},
                    "optim": {"steps": 2, "lr": 1e-4}},
    "env-tabular-dpg": {"algorithm": "dpg", "env": {"name": "tabular", "options": {"depth": 2, "seed": 3, "stochasticity": 1.0},
                                                    "timeout_s": None},
                        "target": {"beta": 1.0}, "sampling": {"n_per_context": 16}, "optim": {"steps": 4, "lr": 0.05},
                        "metrics": {"exact_every": 2, "diversity": False}},
    "env-tabular-kl-pg": {"algorithm": "kl-pg", "env": {"name": "tabular", "options": {"depth": 2, "seed": 3}, "timeout_s": None},
                          "target": {"beta": 1.0}, "sampling": {"n_per_context": 16}, "optim": {"steps": 4, "lr": 0.05},
                          "metrics": {"exact_every": 2}},
    "env-dialogue-kl-pg": {"algorithm": "kl-pg", "prior": "default",
                           "env": {"name": "dialogue", "options": {"retry_cue": True, "max_turns": 2, "things": ["owl", "frog"]},
                                   "max_action_tokens": 5},
                           "target": {"beta": 0.05}, "sampling": {"n_per_context": 4}, "optim": {"steps": 2, "lr": 2e-4},
                           "metrics": {"exact_every": 0}},
}


def case_config(name: str, testbed: Path) -> dict:
    case = dict(CASES[name])
    if "prior" in case or "env" in case:
        base = {k: v for k, v in TESTBED.items() if k not in case} if "env" not in case else {}
    else:
        base = {**TESTBED, "prior": str(testbed)}
    return {**base, **case}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, default=None, help="a previous OUT_DIR to compare with, byte for byte")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    args.out.mkdir(parents=True, exist_ok=True)
    testbed = args.out / "testbed"
    if not testbed.exists():
        subprocess.run([sys.executable, "-m", "tiltlm.cli", "testbed", str(testbed), "--vocab-size", "5", "--train-steps", "0"],
                       check=True, env=env)
    different = []
    for name in CASES:
        run = args.out / name
        if not (run / "policy").exists():
            (args.out / f"{name}.yaml").write_text(yaml.safe_dump(case_config(name, testbed)))
            subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(args.out / f"{name}.yaml"), "--out", str(run)],
                           check=True, env=env)
        if args.compare is not None:
            same = (run / "metrics.jsonl").read_bytes() == (args.compare / name / "metrics.jsonl").read_bytes()
            print(f"{name}: {'identical' if same else 'DIFFERENT'}")
            if not same:
                different.append(name)
    if args.compare is not None:
        print(f"{len(CASES) - len(different)} of {len(CASES)} metrics.jsonl byte-identical")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
