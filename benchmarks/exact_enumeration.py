"""Sequences/s of exact enumeration on a 2-layer testbed GPT-2 (issue: `tiltlm exact` in seconds).

    python benchmarks/exact_enumeration.py [--sizes 5 6] [--vocab 11]

Prints a table and one JSON line per size: enumeration time (all log-probs), report time (log Z,
KLs, TV, entropies with a count reward), and sequences per second. Timings are of this machine at
this moment: compare ratios within one run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from tiltlm.exact import count_sequences, enumerate_space, exact_report
from tiltlm.policies import HFPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.testbed import make_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=11, help="tokens including EOS")
    parser.add_argument("--lengths", type=int, nargs="+", default=[5, 6], help="max_new_tokens values")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_testbed(tmp, vocab_size=args.vocab, n_layer=2, n_embd=32, seed=0)
        rows = []
        for length in args.lengths:
            policy = HFPolicy.from_pretrained(directory, max_new_tokens=length)
            t0 = time.perf_counter()
            space = enumerate_space(policy, max_sequences=10**7)
            t1 = time.perf_counter()
            report = exact_report(space, Prior(policy) * Tilt("count:a", 1.0))
            t2 = time.perf_counter()
            row = {
                "benchmark": "exact_enumeration", "vocab": args.vocab, "max_new_tokens": length,
                "n_sequences": count_sequences(args.vocab, length), "enumerate_s": t1 - t0, "report_s": t2 - t1,
                "sequences_per_s": len(space) / (t2 - t0), "prior_mass": report["prior_mass"],
                "threads": torch.get_num_threads(),
            }
            rows.append(row)
    print(f"{'V':>3} {'L':>2} {'sequences':>10} {'enumerate s':>12} {'report s':>9} {'seq/s':>10}")
    for r in rows:
        print(f"{r['vocab']:>3} {r['max_new_tokens']:>2} {r['n_sequences']:>10} {r['enumerate_s']:>12.2f} {r['report_s']:>9.2f} {r['sequences_per_s']:>10.0f}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
