"""KL-regularised policy gradient = reverse-KL variational inference to the tilted prior.

Objective (Korbak, Perez & Buckley 2022, "RL with KL penalties is better viewed as Bayesian inference"):
    J(theta) = E_{x ~ pi_theta}[r(x)] - beta KL(pi_theta || pi0) = -beta KL(pi_theta || p*) + beta log Z,
    p*(x) = pi0(x) exp(r(x)/beta) / Z.
So maximising J *is* minimising KL(pi_theta || p*): the optimum is p* itself, not argmax r.
Gradient (exact, on-policy, k1 estimator in the reward):
    grad J = E_pi[(r(x) - beta log(pi_theta(x)/pi0(x)) - b) grad log pi_theta(x)]
with the pseudo-reward r - beta log(pi/pi0) = beta (log P(x) - log pi_theta(x)), P = pi0 exp(r/beta),
and b its leave-one-out mean over the other samples of the batch (RLOO). See docs/math.md §2 and
tiltlm/algorithms/kl_pg.py for what the other KL estimators (k2, k3, KL in the loss) optimise instead.

    python scripts/kl_pg.py --steps 150 --batch 32 --beta 1 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch
from transformers.utils import logging as hf_logging

from tiltlm.algorithms.kl_pg import kl_pg_loss
from tiltlm.exact import enumerate_space, exact_report
from tiltlm.policies import HFPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.testbed import make_testbed

KEYS = {"reward_policy": "E_pi[r]", "entropy_policy": "H(pi)", "kl_policy_target": "KL(pi||p*)", "kl_target_policy": "KL(p*||pi)"}


def exact(space, target, policy) -> dict:
    """The four exact numbers we track: sum over every sequence of the space, no sampling."""
    report = exact_report(space, target, policy)
    return {k: report[k] for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=32, help="samples per step (B)")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    parser.add_argument("--beta", type=float, default=1.0, help="KL coefficient = temperature of p*")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--prior", default=None, help="HF model dir of pi0 (default: a fresh 5-token testbed)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="max sequence length L")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the model is tiny: 1 is fastest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # a script may pin global state; the library never does
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print  # keep stdout pure JSON
    hf_logging.set_verbosity_error()  # no load/save progress bars or warnings in the output
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        # ---- set-up: frozen prior pi0, trainable pi_theta (initialised at pi0), target P = pi0 exp(r/beta)
        prior_dir = args.prior or make_testbed(tmp, vocab_size=5, n_layer=2, train_steps=60, seed=0)
        prior = HFPolicy.from_pretrained(prior_dir, max_new_tokens=args.max_new_tokens)
        prior.model.requires_grad_(False)
        policy = HFPolicy.from_pretrained(prior_dir, max_new_tokens=args.max_new_tokens)
        target = Prior(prior) * Tilt("count:a", args.beta)  # p*(x) ∝ pi0(x) exp(r(x)/beta)
        optimizer = torch.optim.Adam(policy.model.parameters(), lr=args.lr)

        space = enumerate_space(prior)  # every sequence after BOS, with exact log pi0
        before = exact(space, target, policy)
        report = exact_report(space, target)  # p* itself: its reward, entropy and log Z, exactly
        optimum = {"reward_policy": report["reward_target"], "entropy_policy": report["entropy_target"],
                   "kl_policy_target": 0.0, "kl_target_policy": 0.0}

        # ---- the loop: sample -> score (log pi0, r, log P) -> KL-PG loss -> Adam step
        for step in range(args.steps):
            samples = policy.sample([""], args.batch, seed=args.seed * 1_000_003 + step)  # B sequences ~ pi_theta
            logq = samples.logp.double()  # (B,) log pi_theta(x) at sampling time (no grad)
            logp_prior = prior.log_prob(samples).double()  # (B,) log pi0(x)
            reward = target.tilt.reward(samples.texts)  # (B,) r(x)
            log_target = target.log_score(samples, prior_logp=logp_prior)  # (B,) log P = log pi0 + r/beta
            logp = policy.log_prob(samples, grad=True)  # (B,) log pi_theta(x), differentiable
            # pseudo-reward r - beta (logq - logp_prior), RLOO baseline; -grad loss = grad J
            loss, advantage = kl_pg_loss(logp, logq, logp_prior, reward, samples.group, beta=args.beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % max(1, args.steps // 10) == 0:
                # mean(log pi - log P) estimates KL(pi||p*) - log Z, the negative ELBO: it falls to -log Z
                neg_elbo = float((logq - log_target).mean())
                log(f"step {step + 1:4d}  reward/mean {reward.mean():.3f}  E[log pi - log P] {neg_elbo:.3f}")

        after = exact(space, target, policy)

    # ---- report: exact numbers before and after training (p* column: where KL-PG should end)
    if args.json:
        print(json.dumps({"before": before, "after": after, "target": optimum}))
        return
    print(f"\n{'exact':12s} {'before':>10s} {'after':>10s} {'p*':>10s}")
    for key, label in KEYS.items():
        print(f"{label:12s} {before[key]:10.4f} {after[key]:10.4f} {optimum[key]:10.4f}")
    print(f"log Z = {report['log_z']:.4f}")


if __name__ == "__main__":
    main()
