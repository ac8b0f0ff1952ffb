"""Torch threads from the cores this process can use (tiltlm.threads), set by the CLI only."""

import os
import subprocess
import sys

import pytest

from tiltlm.threads import available_cores, choose_threads

PROBE = "import torch; from tiltlm.threads import configure_threads; print(configure_threads(), torch.get_num_threads())"


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TILTLM_THREADS")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("cores", "load", "threads"), [(2, 0.0, 2), (2, 0.9, 2), (2, 1.0, 1), (2, 1.7, 1), (2, 5.0, 1),
                                                        (16, 3.2, 13), (1, 0.0, 1)])
def test_busy_cores_are_left_to_their_owners(cores, load, threads):
    assert choose_threads(cores, load) == threads


def test_available_cores_respects_affinity():
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_explicit_settings_win():
    assert _probe(TILTLM_THREADS="1").stdout.split() == ["1", "1"]
    assert _probe(OMP_NUM_THREADS="1").stdout.split() == ["None", "1"]  # torch honours it itself
    bad = _probe(TILTLM_THREADS="zero")
    assert bad.returncode != 0 and "TILTLM_THREADS must be a whole number >= 1 (got 'zero')" in bad.stderr
    auto = _probe()
    chosen, actual = auto.stdout.split()
    assert chosen == actual and 1 <= int(chosen) <= available_cores()


def test_a_caller_that_set_fewer_threads_keeps_them():
    import torch

    from tiltlm.threads import configure_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert configure_threads() in (None, 1) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
