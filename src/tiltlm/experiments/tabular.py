"""Collapse vs posterior, exactly: every algorithm on a tabular testbed, measured by enumeration.

    python -m tiltlm.experiments.tabular [--steps 300] [--beta 1.0] [--seed 0] [--json]

The prior is a random tabular policy over {a, b, <eos>} with at most 3 tokens (15 sequences); the
target is p* ∝ pi0·exp(count_a/beta). Each algorithm trains a well-specified tabular policy from pi0
with the same samples per step and steps (matched sample budget); the table shows exact reward,
entropy and divergences to p*.
"""

from __future__ import annotations

import argparse
import json

from tiltlm.exact import enumerate_space, exact_report
from tiltlm.experiments.grid import STUDY_OPTIM
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

ALGORITHMS: dict[str, dict] = {
    "reinforce": {"name": "reinforce"},
    "kl-pg": {"name": "kl-pg"},
    "ppo-kl": {"name": "ppo-kl", "epochs": 4},
    "dpg": {"name": "dpg", "baseline": False},  # plain DPG beside gdc++
    "gdc++": {"name": "gdc++"},
    "f-dpg (js)": {"name": "f-dpg", "divergence": "js"},
}


def compare(steps: int = 300, beta: float = 1.0, seed: int = 0, n: int = 64, lr: float = 0.05) -> dict[str, dict]:
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=seed, scale=1.0)
    prior.logits.requires_grad_(False)
    target = Prior(prior) * Tilt("count:a", beta)
    space = enumerate_space(prior)
    rows = {"pi0 (prior)": _keys(exact_report(space, target, prior))}
    for label, algorithm in ALGORITHMS.items():
        policy = prior.copy()
        policy.logits.requires_grad_(True)
        config = parse_config({"algorithm": algorithm, "target": {"reward": "count:a", "beta": beta}, "seed": seed,
                               "sampling": {"n_per_context": n, "max_new_tokens": 3},
                               "optim": {**STUDY_OPTIM, "steps": steps, "lr": lr, "schedule": "linear"},
                               "metrics": {"exact_every": steps, "diversity": False}})
        Trainer(config, policy=policy, target=target).run()
        rows[label] = _keys(exact_report(space, target, policy))
    report = exact_report(space, target)
    rows["p* (target)"] = {"reward": report["reward_target"], "entropy": report["entropy_target"],
                           "kl_policy_target": 0.0, "kl_target_policy": 0.0, "kl_policy_prior": report["kl_target_prior"]}
    return rows


def _keys(r: dict) -> dict:
    return {"reward": r["reward_policy"], "entropy": r["entropy_policy"], "kl_policy_target": r["kl_policy_target"],
            "kl_target_policy": r["kl_target_policy"], "kl_policy_prior": r["kl_policy_prior"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = compare(args.steps, args.beta, args.seed)
    if args.json:
        print(json.dumps(rows))
        return
    print("| distribution | E[r] | entropy (nats) | KL(pi‖p*) | KL(p*‖pi) | KL(pi‖pi0) |\n|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['reward']:.3f} | {r['entropy']:.3f} | {r['kl_policy_target']:.4f} | {r['kl_target_policy']:.4f} | {r['kl_policy_prior']:.3f} |")


if __name__ == "__main__":
    main()
