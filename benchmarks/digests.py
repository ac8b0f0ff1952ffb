"""What content identity costs (docs/reliability.md, "What a run is made of"): the time to take a run's input
digests (tiltlm.reuse.input_digests) for a prior, against the time to load that prior, in the same process.

Three costs per prior:
- ``first``: no earlier record, every file read and hashed (SHA-256) — a new run, or a file whose stat changed;
- ``again``: the record of an earlier run given (``--resume``, a sweep re-run): files whose stat identity (device,
  inode, size, mtime, ctime) is unchanged keep their recorded SHA-256 and are not read;
- ``load``: ``HFPolicy.from_pretrained`` of the same directory, the work every run does anyway.

Files are read from the page cache after the first round (min of repeats), so ``first`` is the hashing rate, not the
disk's; a cold disk adds its read time to loading the weights as well.

    python benchmarks/digests.py                       # default and smollm2-135m (if its package is installed)
    python benchmarks/digests.py --priors default --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, emit, interleaved_min, quiet_transformers, set_threads  # noqa: E402


def _row(prior: str, repeats: int) -> dict:
    from tiltlm import reuse
    from tiltlm.policies.hf import HFPolicy, resolve_model_dir
    from tiltlm.train.config import parse_config

    config = parse_config({"prior": prior, "target": {"reward": "contains:a"}, "algorithm": {"name": "kl-pg"}})
    recorded = reuse.input_digests(config)
    size = sum(f["bytes"] for f in recorded["prior"]["files"].values())

    def first():
        reuse._MEMO.clear()  # noqa: SLF001 - the process memo would turn every read into a lookup
        reuse.input_digests(config)

    times = interleaved_min({"first": first, "again": lambda: reuse.input_digests(config, recorded),
                             "load": lambda: HFPolicy.from_pretrained(str(resolve_model_dir(prior)))}, repeats)
    return {"prior": prior, "MB": size / 1e6, "files": len(recorded["prior"]["files"]),
            "first_s": times["first"], "again_s": times["again"], "load_s": times["load"],
            "hash_GB_per_s": size / times["first"] / 1e9, "first_over_load": times["first"] / times["load"],
            "again_over_load": times["again"] / times["load"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--priors", nargs="+", default=None, help="named priors or model directories")
    add_common_args(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    quiet_transformers()
    priors = args.priors or ["default", *(["smollm2-135m"] if _has_smollm2() else [])]
    repeats = args.repeats or (1 if args.quick else 5)
    rows = [_row(p, repeats) for p in priors]
    return emit("digests", rows, ["prior", "MB", "files", "first_s", "again_s", "load_s", "hash_GB_per_s",
                                  "first_over_load", "again_over_load"], args.json)


def _has_smollm2() -> bool:
    from tiltlm.errors import TiltlmError
    from tiltlm.policies.hf import resolve_model_dir

    try:
        resolve_model_dir("smollm2-135m")
    except TiltlmError:
        return False
    return True


if __name__ == "__main__":
    main()
