"""Distributional Policy Gradient (DPG): forward-KL distribution matching to the tilted prior.

Objective (Parshakova, Andreoli & Dymetman 2019; Khalifa, Elsahar & Dymetman 2021):
    CE(theta) = -E_{x ~ p*}[log pi_theta(x)] = KL(p* || pi_theta) + H(p*),
    p*(x) = P(x) / Z,  P(x) = pi0(x) exp(r(x)/beta).
We cannot sample p*, so importance-sample from q = pi_theta at sampling time (on-policy DPG):
    grad CE = -E_{x ~ q}[(P(x) / (Z q(x))) grad log pi_theta(x)],
with Z replaced by a running importance-sampling estimate Z_hat = mean(P/q) over every batch so far.
Optimum: p* itself (forward KL is mass-covering: it would rather spread than miss p*'s mass).
Compare scripts/kl_pg.py, which reaches the same p* from the other side, by minimising KL(pi || p*).
See docs/math.md §3 and tiltlm/algorithms/dpg.py (off-policy proposals, the GDC++ baseline).

    python scripts/dpg.py --steps 150 --batch 32 --beta 1 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch
from transformers.utils import logging as hf_logging

from tiltlm.algorithms.dpg import dpg_loss
from tiltlm.exact import enumerate_space, exact_report
from tiltlm.metrics.divergences import log_z
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
    parser.add_argument("--beta", type=float, default=1.0, help="temperature of p* = pi0 exp(r/beta) / Z")
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

        # Running estimate of log Z. For ANY proposal q that covers p*, E_q[P/q] = sum_x P(x) = Z, so
        # every batch's weights are unbiased for Z even though q = pi_theta changes from step to step:
        # pooling all of them, log Z_hat = log mean(P/q) over every sample so far, only lowers the
        # variance (log of a mean is biased low by Jensen, but the bias shrinks as samples accumulate).
        history_log_target, history_logq = [], []  # per-batch (B,) tensors of log P and log q
        log_z_hat = float("nan")

        # ---- the loop: sample -> score (log pi0, r, log P) -> update log Z_hat -> DPG loss -> Adam step
        for step in range(args.steps):
            samples = policy.sample([""], args.batch, seed=args.seed * 1_000_003 + step)  # B sequences ~ q = pi_theta
            logq = samples.logp.double()  # (B,) log q(x): pi_theta at sampling time, a constant
            logp_prior = prior.log_prob(samples).double()  # (B,) log pi0(x)
            log_target = target.log_score(samples, prior_logp=logp_prior)  # (B,) log P = log pi0 + r/beta
            history_log_target.append(log_target)
            history_logq.append(logq)
            log_z_hat = log_z(torch.cat(history_log_target), torch.cat(history_logq)).value  # log mean P/q
            logp = policy.log_prob(samples, grad=True)  # (B,) log pi_theta(x), differentiable
            # loss = -mean(w log pi) with w = P/(Z_hat q): its gradient is the IS estimate of grad CE
            loss, weight = dpg_loss(logp, logq, log_target, log_z_hat, baseline=False)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % max(1, args.steps // 10) == 0:
                reward = target.tilt.reward(samples.texts)  # (B,) r(x), only for the log line
                log(f"step {step + 1:4d}  reward/mean {reward.mean():.3f}  log Z_hat {log_z_hat:.4f}  max w {weight.max():.2f}")

        after = exact(space, target, policy)

    # ---- report: exact numbers before and after training (p* column: where DPG should end)
    if args.json:
        print(json.dumps({"before": before, "after": after, "target": optimum,
                          "log_z": {"estimate": log_z_hat, "exact": report["log_z"]}}))
        return
    print(f"\n{'exact':12s} {'before':>10s} {'after':>10s} {'p*':>10s}")
    for key, label in KEYS.items():
        print(f"{label:12s} {before[key]:10.4f} {after[key]:10.4f} {optimum[key]:10.4f}")
    print(f"log Z: running IS estimate {log_z_hat:.4f}, exact {report['log_z']:.4f}")


if __name__ == "__main__":
    main()
