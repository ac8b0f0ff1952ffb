"""Training a study's cells: each cell one training run (tiltlm.train.build.fit) in ``cells/<name>/``, on ONE torch
thread, in a pool of worker processes.

One thread per cell makes the numbers the same on any number of cores, and a busy neighbour only makes the run slower:
single-threaded processes share cores by plain time slicing, without the stalls of intra-op threads waiting for a
descheduled sibling (docs/reliability.md, threads), and small models use cores better as processes than as threads.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Iterator

SEEDS = (0, 1, 2)  # `tiltlm run`'s default training seeds: every interval of its verdicts combines seeds and questions

# The interactive and tabular studies' optimiser settings (one update per batch, a constant lr unless they set one), not
# the library's defaults, for a reason: the tabular parts measure where each method converges (the path there does not
# change it), and the 30-step twenty-questions run is not a fixed point, where a linear decay to 0 halves the average
# step. The RLVR study (`tiltlm run`'s main job) and the sentiment comparison run the library's defaults.
STUDY_OPTIM = {"schedule": "constant", "minibatch_size": None}


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside the block (restored after): the study's numbers never depend on the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_cell(job: tuple[str, dict, str]) -> tuple[str, dict, float]:
    """One cell (name, raw training config, directory), on one thread: (name, its final metrics row, seconds)."""
    from tiltlm.train.build import fit
    from tiltlm.train.config import parse_config

    name, config, cell_dir = job
    start = time.perf_counter()
    with one_thread(), warnings.catch_warnings():  # transformers' / peft's deprecation notices would flood the log
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _, rows = fit(parse_config(config), Path(cell_dir))
    return name, rows[-1], time.perf_counter() - start


def train_cells(jobs: list[tuple[str, dict, str]], workers: int) -> Iterator[tuple[str, dict, float]]:
    """`train_cell` over ``jobs``, yielding results as they finish: in this process with one worker, else in ``workers``
    spawned processes (a failing job raises here, the others are cancelled)."""
    if workers == 1:
        yield from map(train_cell, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_cell, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
