"""Train tiltlm's embedded default prior and write it to ``src/tiltlm/assets/default``.

    python scripts/pretrain_default.py --threads 2

This is the exact recipe behind the shipped model (see docs/default_model.md): a 4-layer GPT-2
(d_model 256, 4 heads, 256 positions, ~3.6M parameters) trained from scratch on stories from the
tiltlm story grammar mixed with 40,000 documents of the verifiable quiz (tiltlm.quiz), about
13–20 minutes on 2 CPU cores (use --threads 1 when another process keeps one core busy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tiltlm.pretrain import ModelShape, OptimConfig, pretrain

N_QUIZ = 40_000
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "tiltlm" / "assets" / "default"


def main() -> None:
    """Parse the few knobs, pin the thread count (a script may; the library does not) and train."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    parser.add_argument("--n-stories", type=int, default=60_000, help="training stories")
    parser.add_argument("--n-quiz", type=int, default=N_QUIZ,
                        help="quiz documents (tiltlm.quiz) mixed into the stories; 0 = stories only")
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus, init and batches")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-bf16", action="store_true",
                        help="train in fp32 (use on CPUs without AVX512-BF16/AMX)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    record = pretrain(
        args.out,
        n_stories=args.n_stories,
        n_quiz=args.n_quiz,
        steps=args.steps,
        seed=args.seed,
        model_shape=ModelShape(),
        optim=OptimConfig(bf16_autocast=not args.no_bf16),
    )
    print(f"wrote {args.out}: {record['parameters']:,} parameters, "
          f"held-out loss {record['heldout_loss']}, {record['wall_time_s']} s")


if __name__ == "__main__":
    main()
