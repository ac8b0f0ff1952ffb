"""Pure RL: REINFORCE with a leave-one-out baseline, the beta -> 0 (hardmax) end of the tilt.

Objective (Williams 1992):  J(theta) = E_{x ~ pi_theta}[r(x)]
Gradient:                   grad J = E_{pi_theta}[(r(x) - b) grad log pi_theta(x)]
with b, for each sample, the mean reward of the *other* B - 1 samples of the batch (RLOO, Kool et al.
2019): it does not depend on x itself, so the estimator stays unbiased while its variance drops.

Optimum: a point mass on argmax_x r(x) (within the support the policy reaches) -- distribution
collapse. Nothing ties pi_theta to the prior pi0. ``--beta`` is not part of this objective: it only
defines the Bayesian posterior p*(x) = pi0(x) exp(r(x)/beta) / Z against which we *measure* how far
pure RL overshoots (docs/math.md §1-2). Everything is measured exactly by enumerating the ~341 sequences.

    python scripts/pure_rl.py --steps 150 --batch 32 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch
from transformers.utils import logging as hf_logging

from tiltlm.algorithms.reinforce import policy_gradient_loss
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
    parser.add_argument("--beta", type=float, default=1.0, help="only to define p* for measuring; not in J")
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
        # ---- set-up: frozen prior pi0, trainable pi_theta (initialised at pi0), reward, target p*
        prior_dir = args.prior or make_testbed(tmp, vocab_size=5, n_layer=2, train_steps=60, seed=0)
        prior = HFPolicy.from_pretrained(prior_dir, max_new_tokens=args.max_new_tokens)
        prior.model.requires_grad_(False)
        policy = HFPolicy.from_pretrained(prior_dir, max_new_tokens=args.max_new_tokens)
        target = Prior(prior) * Tilt("count:a", args.beta)  # p*(x) ∝ pi0(x) exp(r(x)/beta), for measuring
        reward_fn = target.tilt.reward  # r(x) = number of 'a's in x
        optimizer = torch.optim.Adam(policy.model.parameters(), lr=args.lr)

        space = enumerate_space(prior)  # every sequence after BOS, with exact log pi0
        before = exact(space, target, policy)
        report = exact_report(space, target)  # p* itself: its reward, entropy and log Z, exactly
        optimum = {"reward_policy": report["reward_target"], "entropy_policy": report["entropy_target"],
                   "kl_policy_target": 0.0, "kl_target_policy": 0.0}

        # ---- the loop: sample -> reward -> RLOO policy-gradient loss -> Adam step
        for step in range(args.steps):
            samples = policy.sample([""], args.batch, seed=args.seed * 1_000_003 + step)  # B sequences ~ pi_theta
            reward = reward_fn(samples.texts)  # (B,) float64; pi0 plays no part in J
            logp = policy.log_prob(samples, grad=True)  # (B,) log pi_theta(x), differentiable
            # loss = -mean((r - b_loo) log pi); its gradient is -grad J. samples.group is all 0 (one context)
            loss, advantage = policy_gradient_loss(logp, reward, samples.group)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % max(1, args.steps // 10) == 0:
                log(f"step {step + 1:4d}  reward/mean {reward.mean():.3f}  |advantage| {advantage.abs().mean():.3f}")

        after = exact(space, target, policy)

    # ---- report: exact numbers before and after (p* column: the Bayesian posterior pure RL overshoots)
    if args.json:
        print(json.dumps({"before": before, "after": after, "target": optimum}))
        return
    print(f"\n{'exact':12s} {'before':>10s} {'after':>10s} {'p*':>10s}")
    for key, label in KEYS.items():
        print(f"{label:12s} {before[key]:10.4f} {after[key]:10.4f} {optimum[key]:10.4f}")
    print(f"max_x r(x) = {args.max_new_tokens} ('a' * L): the optimum of J")


if __name__ == "__main__":
    main()
