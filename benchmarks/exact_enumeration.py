"""Goal 3: sequences/s of exact enumeration on a 2-layer testbed GPT-2 (10^6 sequences in < 10 s on 2 cores).

    python benchmarks/exact_enumeration.py --threads 2 [--lengths 5 6] [--vocab 11] [--no-baseline]

Per length L (V tokens with EOS, so sum_d (V-1)^d sequences):
- enumerate_s: ``enumerate_space`` (every sequence's token log-probs, ids and text), min over repeats;
- report_s: ``exact_report`` on it (log Z, KLs, TV, entropies with a count reward);
- reencode_walk_s: the log-prob walk without prefix sharing (each depth re-encodes every prefix
  from its first token: what ``enumerate_space`` did before it reused the parents' KV cache), for
  the ratio ``walk_speedup`` against ``walk_s``, the shared walk measured in the same run.
Timings are of this machine at this moment: compare ratios within one run, not across machines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, emit, quiet_transformers, set_threads


class _Reencode:
    """The policy without ``prefix_tree_logprobs``: the walk falls back to re-encoding each prefix."""

    def __init__(self, policy):
        self._policy = policy

    def __getattr__(self, name):
        if name == "prefix_tree_logprobs":
            raise AttributeError(name)
        return getattr(self._policy, name)


def _min_time(fn, repeats: int):
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.set_defaults(threads=2)
    parser.add_argument("--vocab", type=int, default=11, help="tokens including EOS")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="max_new_tokens values")
    parser.add_argument("--no-baseline", action="store_true", help="skip the re-encoding walk (slow at L=6)")
    args = parser.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    from tiltlm.exact import count_sequences, enumerate_space, exact_report
    from tiltlm.exact.enumerate import _walk
    from tiltlm.policies import HFPolicy
    from tiltlm.targets import Prior, Tilt
    from tiltlm.testbed import make_testbed

    lengths = args.lengths or ([3] if args.quick else [5, 6])
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_testbed(tmp, vocab_size=args.vocab, n_layer=2, n_embd=32, seed=0)
        for length in lengths:
            policy = HFPolicy.from_pretrained(directory, max_new_tokens=length)
            enum_s, space = _min_time(lambda: enumerate_space(policy, max_sequences=10**7), repeats)
            walk_s, _ = _min_time(lambda: _walk(policy, "", length, need_ids=False), repeats)
            t0 = time.perf_counter()
            report = exact_report(space, Prior(policy) * Tilt("count:a", 1.0))
            report_s = time.perf_counter() - t0
            row = {"vocab": args.vocab, "max_new_tokens": length, "n_sequences": count_sequences(args.vocab, length),
                   "enumerate_s": enum_s, "report_s": report_s, "sequences_per_s": len(space) / enum_s,
                   "walk_s": walk_s, "prior_mass": report["prior_mass"], "threads": torch.get_num_threads()}
            if not (args.no_baseline or args.quick):
                base_s, _ = _min_time(lambda: _walk(_Reencode(policy), "", length, need_ids=False), 1)
                row.update(reencode_walk_s=base_s, walk_speedup=base_s / walk_s)
            rows.append(row)
    return emit("exact_enumeration", rows, ["vocab", "max_new_tokens", "n_sequences", "threads", "enumerate_s", "sequences_per_s",
                                            "report_s", "walk_s", "reencode_walk_s", "walk_speedup"], args.json,
                goal={"n_sequences": 10**6, "enumerate_s_max": 10.0, "threads": 2})


if __name__ == "__main__":
    main()
