"""Scoring time of ``HFPolicy.log_prob`` without grad: each distinct context encoded once vs every row's whole sequence.

    python benchmarks/scoring.py [--threads 1] [--contexts 16] [--n 64] [--tokens 8] [--repeats 3]

The held-out evaluation's pi0 scoring (tiltlm.evaluate: ``prior.log_prob(samples)`` of n completions per question):
the policy (the embedded default) samples n completions for each of ``--contexts`` held-out quiz questions
(tiltlm.quiz, ``"Q: <question> A:"``, up to ``--tokens`` new tokens: the quiz task's 8), then the same samples are
scored twice per round, interleaved (benchmarks/common.interleaved_min, the minimum kept):

- ``full_s``: ``share_contexts=False``, one forward pass of context + completion per row (how log_prob scored
  before, and still does with grad);
- ``shared_s``: ``share_contexts=True`` (the default), each distinct context prefilled once and the rows'
  completions fed on its cached keys and values (HFPolicy._shared_context_logp);
- ``ratio``: full_s / shared_s; ``max_abs_diff``: the largest difference of the two per-token log-probs (nats).

Absolute seconds are of this machine at this moment; the ratio, measured in one process, is the result.
Recorded: benchmarks/results/scoring.json (16 × 64, this default) and scoring_64x64.json (``--contexts 64``: one
batch of the held-out evaluation, two row chunks of 2048), on 2 shared cores, one thread, load in ``environment``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, emit, interleaved_min, quiet_transformers, set_threads


def measure(policy, prompts: list[str], n: int, repeats: int, seed: int = 0) -> dict:
    """One row: sample n per prompt, then time both scoring routes on those samples."""
    samples = policy.sample(prompts, n, seed=seed)
    out = {}

    def route(share: bool):
        def run():
            policy.share_contexts = share
            out[share] = policy.log_prob(samples, per_token=True)
        return run

    try:
        best = interleaved_min({"full": route(False), "shared": route(True)}, repeats)
    finally:
        policy.share_contexts = True
    return {"contexts": len(prompts), "n": n, "rows": len(samples), "C": int(samples.context_ids.shape[1]),
            "T": int(samples.ids.shape[1]), "mean_len": float(samples.mask.sum(-1).float().mean()),
            "full_s": best["full"], "shared_s": best["shared"], "ratio": best["full"] / best["shared"],
            "max_abs_diff": float((out[True] - out[False]).abs().max())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--contexts", type=int, default=16, help="held-out quiz questions")
    parser.add_argument("--n", type=int, default=64, help="completions per question (the evaluation's 64)")
    parser.add_argument("--tokens", type=int, default=8, help="max_new_tokens (the quiz task's 8)")
    args = parser.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    from tiltlm.policies.hf import HFPolicy
    from tiltlm.quiz import questions

    repeats = args.repeats or (1 if args.quick else 3)
    contexts, n = (3, 4) if args.quick else (args.contexts, args.n)
    torch.manual_seed(0)  # nothing depends on it; the samples are seeded
    policy = HFPolicy.from_pretrained("default", max_new_tokens=args.tokens)
    prompts = [row["prompt"] for row in questions("heldout")][:contexts]
    rows = [{"model": "default", **measure(policy, prompts, n, repeats)}]
    columns = ["model", "contexts", "n", "rows", "C", "T", "mean_len", "full_s", "shared_s", "ratio", "max_abs_diff"]
    return emit("scoring", rows, columns, args.json)


if __name__ == "__main__":
    main()
