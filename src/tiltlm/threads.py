"""How many intra-op threads torch should use: the cores this process may actually run on, less the cores
other processes are keeping busy.

torch defaults to one thread per physical core of the machine. In a container limited by a cgroup CPU
quota, in a process pinned to fewer cores (taskset, Slurm), or beside a neighbour that keeps a core busy,
that oversubscribes: the OpenMP workers spin and wait for each other, and small ops (a (64, V)
log-softmax) become milliseconds each — the main job ran 3–4× slower beside one busy process on 2 cores.

Order of precedence: ``TILTLM_THREADS``, then ``OMP_NUM_THREADS`` (torch honours it itself; left alone),
then min(CPU affinity, cgroup quota) minus the whole cores other processes are keeping busy right now
(/proc/stat sampled over 0.2 s while this process sleeps; the 1-minute load average where /proc is missing),
at least 1, and never more than torch already uses. Only the CLI calls ``configure_threads`` (the library never changes torch's global state).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from tiltlm.errors import TiltlmError


def available_cores() -> int:
    """Cores this process may run on: CPU affinity, capped by a cgroup v2 (or v1) CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota is not None else cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (quota / period), None when unlimited or unknown."""
    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota, v1_period = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if v1_quota.is_file() and v1_period.is_file():
            quota = int(v1_quota.read_text())
            return None if quota <= 0 else quota / int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return None


def busy_cores(interval: float = 0.2) -> float:
    """Cores other processes keep busy now: the machine's non-idle CPU time over ``interval`` seconds while
    this process sleeps (from /proc/stat), else the 1-minute load average."""
    import time

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if total1 <= total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_threads(cores: int, load: float) -> int:
    """Threads for ``cores`` usable cores when other processes keep ``load`` cores busy (load average)."""
    return max(1, min(cores, cores - int(load)))


def configure_threads() -> int | None:
    """Set torch's intra-op threads for this process (see the module docstring); returns the number set,
    or None when OMP_NUM_THREADS already decides."""
    import torch

    wanted = os.environ.get("TILTLM_THREADS")
    if wanted is not None:
        try:
            n = int(wanted)
        except ValueError:
            n = 0
        if n < 1:
            raise TiltlmError(f"TILTLM_THREADS must be a whole number >= 1 (got {wanted!r}); unset it to choose from the free cores")
    elif os.environ.get("OMP_NUM_THREADS"):
        return None
    else:
        # a core ≥ 80% busy counts as taken; never more than torch already uses (a caller that set fewer, e.g. a
        # test harness calling the CLI in-process with one thread, keeps its setting)
        n = min(torch.get_num_threads(), choose_threads(available_cores(), busy_cores() + 0.2))
    torch.set_num_threads(n)
    return n
