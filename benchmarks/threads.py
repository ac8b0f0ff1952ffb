"""Torch threads beside a busy neighbour: a short `tiltlm train` on the embedded default LM, timed alone and
next to a busy-loop process, with the threads tiltlm chooses (tiltlm.threads) and with one thread per core.

    python benchmarks/threads.py [--quick] [--json]

Prints wall seconds per setting and the ratios: how much a busy neighbour slows the run with tiltlm's choice
versus torch's default of one thread per core. Ratios within one run; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _busy(stop) -> None:
    while not stop.is_set():
        pass


def _train(config: Path, out: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tiltlm.cli", "train", str(config), "--out", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps instead of 8 (for the tests)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TILTLM_THREADS")}
    settings = {"tiltlm's choice": base, f"{cores} threads (torch default)": {**base, "TILTLM_THREADS": str(cores)},
                "1 thread": {**base, "TILTLM_THREADS": "1"}}
    config = {"prior": "default", "algorithm": "kl-pg", "target": {"reward": "count:e", "beta": 1.0},
              "sampling": {"n_per_context": 16, "max_new_tokens": 32}, "optim": {"steps": 2 if args.quick else 8, "lr": 1e-4},
              "metrics": {"diversity": False}}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(yaml.safe_dump(config))
        for neighbour in (False, True):
            stop = multiprocessing.Event()
            busy = multiprocessing.Process(target=_busy, args=(stop,), daemon=True) if neighbour else None
            if busy is not None:
                busy.start()
                time.sleep(1.0)
            try:
                for name, env in settings.items():
                    key = f"{name}, {'beside a busy process' if neighbour else 'alone'}"
                    seconds[key] = _train(path, Path(tmp) / key.replace(" ", "_").replace("'", "").replace(",", ""), env)
            finally:
                if busy is not None:
                    stop.set()
                    busy.join()
    names = list(settings)
    result = {"cores": cores, "seconds": seconds,
              "slowdown_beside_busy": {n: seconds[f"{n}, beside a busy process"] / seconds[f"{n}, alone"] for n in names}}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in seconds.items():
            print(f"{key:55s} {value:7.1f} s")
        for n, ratio in result["slowdown_beside_busy"].items():
            print(f"slowdown beside a busy process, {n}: {ratio:.2f}x")
    return result


if __name__ == "__main__":
    main()
