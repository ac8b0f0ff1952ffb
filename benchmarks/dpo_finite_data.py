"""Where DPO, cDPO and IPO go with N preference pairs, computed exactly (docs/math.md §14, README "Learned rewards").

    python benchmarks/dpo_finite_data.py [--ns 4 16 64 256] [--methods dpo cdpo ipo] [--steps 150] [--json F]

The space: a seeded random tabular prior pi0 over the tokens {a, b, c, <eos>}, at most 3 new tokens (40 sequences);
the gold reward r(x) = count of 'a'; beta = 1, so the posterior is p* = pi0·exp(r)/Z. For each N: N pairs (x, y),
x != y, drawn i.i.d. from pi0 with the seed, each labelled once by Bradley–Terry, x ≻ y with probability
σ(r(x) - r(y)) (the population of these labels has DPO minimiser p*: tiltlm.exact.preferences). The method trains a
tabular policy from pi0 on those pairs with the one training loop (full batch, Adam, ``--steps`` steps at lr 0.1),
then every number is computed by enumerating the 40 sequences: KL(pi‖p*), KL(p*‖pi), the mass pi, pi0 and p* put on
the completions that appear in no pair, the mean log pi - log pi0 of the chosen and of the rejected completions and
the mean margin. No sampling enters the evaluation, so the values are exact (no interval) for this seed's pairs and
labels; another seed draws other pairs. The row N = population is the exact population fixed point (pairs of
every two sequences weighted by pi0·pi0, BT probabilities as labels; Newton on the convex loss), not a training run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, emit, set_threads

from tiltlm.exact import enumerate_space, kl
from tiltlm.exact.preferences import bt_probabilities, coverage_report, preference_fixed_point
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

BETA = 1.0
ALGORITHMS = {"dpo": {"name": "dpo"}, "cdpo": {"name": "cdpo", "label_smoothing": 0.1}, "ipo": {"name": "ipo"}}
COLUMNS = ["method", "N", "distinct_seen", "kl_policy_target", "kl_target_policy", "unseen_mass_policy", "unseen_mass_prior",
           "unseen_mass_target", "chosen_logp_change", "rejected_logp_change", "margin"]


def prior_policy(seed: int) -> TabularPolicy:
    prior = TabularPolicy.random(list("abc") + ["<eos>"], max_new_tokens=3, seed=seed)
    prior.logits.requires_grad_(False)
    return prior


def draw_pairs(logp0: torch.Tensor, r: torch.Tensor, n: int, seed: int) -> list[tuple[int, int]]:
    """N (chosen, rejected) index pairs: x, y ~ pi0 i.i.d. (redrawn while x == y), x ≻ y w.p. σ(r_x - r_y)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        x, y = torch.multinomial(logp0.exp(), 2, replacement=True, generator=gen).tolist()
        if x == y:
            continue
        wins = bool(torch.rand((), generator=gen, dtype=torch.float64) < torch.sigmoid(r[x] - r[y]))
        out.append((x, y) if wins else (y, x))
    return out


def train_on(pairs, texts, algorithm: dict, prior, steps: int, workdir: Path) -> TabularPolicy:
    path = workdir / f"{algorithm['name']}-{len(pairs)}.jsonl"
    path.write_text("".join(json.dumps({"prompt": "", "chosen": texts[w], "rejected": texts[l]}) + "\n" for w, l in pairs))
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    config = parse_config({"data": {"path": str(path)}, "target": {"beta": BETA}, "algorithm": algorithm,
                           "sampling": {"max_new_tokens": 3},
                           "optim": {"steps": steps, "lr": 0.1, "schedule": "constant", "minibatch_size": None}})
    Trainer(config, policy=policy, target=Prior(prior)).run()
    return policy


def population_row(method: str, logp0: torch.Tensor, r: torch.Tensor, log_target: torch.Tensor) -> dict:
    W = torch.outer(logp0.exp(), logp0.exp()).fill_diagonal_(0)
    kind, eps = ("ipo", 0.0) if method == "ipo" else ("dpo", ALGORITHMS[method].get("label_smoothing", 0.0))
    fixed = preference_fixed_point(logp0, W, bt_probabilities(r), BETA, kind=kind, eps=eps)
    return {"method": method, "N": "population", "distinct_seen": len(logp0), "kl_policy_target": kl(fixed, log_target),
            "kl_target_policy": kl(log_target, fixed), "unseen_mass_policy": 0.0, "unseen_mass_prior": 0.0, "unseen_mass_target": 0.0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--ns", type=int, nargs="+", default=None, help="numbers of pairs (default 4 16 64 256)")
    parser.add_argument("--methods", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 150; --quick 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    ns = args.ns or ([4, 16] if args.quick else [4, 16, 64, 256])
    steps = args.steps or (10 if args.quick else 150)
    prior = prior_policy(args.seed)
    space = enumerate_space(prior)
    texts, logp0 = space.samples.texts, space.logp.double()
    r = torch.tensor([float(t.count("a")) for t in texts], dtype=torch.float64)
    log_target = logp0 + r / BETA
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for method in args.methods:
            for n in ns:
                pairs = draw_pairs(logp0, r, n, args.seed * 1_000_003 + n)
                policy = train_on(pairs, texts, ALGORITHMS[method], prior, steps, Path(workdir))
                report = coverage_report(logp0, space.log_prob(policy).double(), log_target, [w for w, _ in pairs], [l for _, l in pairs])
                rows.append({"method": method, "N": n, **report})
            rows.append(population_row(method, logp0, r, torch.log_softmax(log_target, 0)))
    return emit("dpo_finite_data", rows, COLUMNS, args.json, steps=steps, beta=BETA, n_sequences=len(texts), seed=args.seed)


if __name__ == "__main__":
    main()
