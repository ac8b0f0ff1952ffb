"""Where a run's time goes: seconds per phase of each training step, and their sums over runs.

Phases (the keys of ``phases.json`` in the run directory: the run's totals, and each step's ``time/<phase>`` row;
they stay out of metrics.jsonl, whose rows a resumed or repeated run reproduces number for number):

- ``sample``: drawing the batch (``policy.sample`` or an environment's rollouts);
- ``score``: the target's score of the samples (reward, log pi0) and the prior's per-token log-probs;
- ``backward``: the loss's forward with grad, backward, clipping and the optimiser step (every update of the step);
- ``eval``: held-out evaluation (``eval:``) and exact metrics;
- ``io``: metrics rows, checkpoints and the final policy written to disk.

What no phase covers (metrics, the algorithm's bookkeeping) is ``other`` = the step's wall time minus the phases.
``sum_phases(run_dirs)`` adds the ``phases.json`` of several runs (a study's cells) into one breakdown;
``run_dirs_under(root)`` finds them (`tiltlm run` records the sum in run.json and prints ``format_phases_line``).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from tiltlm.errors import TiltlmError

PHASES = ("sample", "score", "backward", "eval", "io")
PHASES_FILE = "phases.json"


class PhaseTimer:
    """Accumulates wall seconds per phase: ``with timer.phase("sample"): ...``; ``step_row()`` returns and clears the
    current step's seconds (``time/<phase>`` keys), ``totals`` holds the run's."""

    def __init__(self):
        self.current = dict.fromkeys(PHASES, 0.0)
        self.totals = dict.fromkeys((*PHASES, "other", "total"), 0.0)
        self.steps = 0
        self.per_step: list[dict] = []  # {step, time/<phase>…} of each step timed in this process
        self._step_start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in self.current:
            raise TiltlmError(f"unknown timing phase '{name}'; available: {', '.join(PHASES)}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.current[name] += time.perf_counter() - t0

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def step_row(self) -> dict[str, float]:
        """This step's seconds per phase (and ``time/other``, ``time/step``), added to the totals and cleared."""
        total = time.perf_counter() - self._step_start
        other = max(0.0, total - sum(self.current.values()))
        row = {f"time/{k}": v for k, v in self.current.items()} | {"time/other": other, "time/step": total}
        for k, v in self.current.items():
            self.totals[k] += v
        self.totals["other"] += other
        self.totals["total"] += total
        self.steps += 1
        self.current = dict.fromkeys(PHASES, 0.0)
        self.per_step.append({"step": self.steps, **row})
        return row

    @contextlib.contextmanager
    def outside_steps(self, name: str):
        """Seconds spent outside any step (writing the final policy), counted into the run's totals of ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.totals[name] += seconds
            self.totals["total"] += seconds

    def resume_from(self, path: Path, step: int) -> None:
        """Continue a resumed run's phases.json from its checkpoint's ``step``: the rows of steps 1..step and their
        sums are kept (later steps are re-run); none or unreadable: from zero."""
        try:
            data = json.loads(Path(path).read_text())
            rows = [r for r in data["per_step"] if int(r["step"]) <= int(step)]
            for r in rows:
                for k in (*PHASES, "other"):
                    self.totals[k] += float(r[f"time/{k}"])
                self.totals["total"] += float(r["time/step"])
            self.per_step, self.steps = rows, len(rows)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def to_json(self) -> dict:
        return {"steps": self.steps, "seconds": dict(self.totals), "per_step": self.per_step}


def write_phases(run_dir: str | Path, timer: PhaseTimer) -> Path:
    """``run_dir``/phases.json from ``timer`` (written atomically, tiltlm.io)."""
    from tiltlm.io import atomic_write_text

    return atomic_write_text(Path(run_dir) / PHASES_FILE, json.dumps(timer.to_json(), indent=1))


def read_phases(run_dir: str | Path) -> dict:
    """A run directory's phases.json ({steps, seconds: {phase: s}}); a one-line error when it has none."""
    path = Path(run_dir) / PHASES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TiltlmError(f"'{run_dir}' has no {PHASES_FILE}; it records timings from this version of tiltlm on: "
                          "re-run the training there") from None
    except (OSError, ValueError) as e:
        raise TiltlmError(f"cannot read '{path}' ({type(e).__name__}); re-run the training to write it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("seconds"), dict):
        raise TiltlmError(f"'{path}' is not a tiltlm phases file; re-run the training to write it again")
    return data


def sum_phases(run_dirs) -> dict:
    """The phases of several runs added up: {runs, steps, seconds: {phase: s}, share: {phase: fraction of total}}."""
    seconds = dict.fromkeys((*PHASES, "other", "total"), 0.0)
    runs = steps = 0
    for d in run_dirs:
        data = read_phases(d)
        runs, steps = runs + 1, steps + int(data.get("steps", 0))
        for k, v in data["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
    total = seconds["total"]
    share = {k: (v / total if total > 0 else 0.0) for k, v in seconds.items() if k != "total"}
    return {"runs": runs, "steps": steps, "seconds": seconds, "share": share}


def format_phases(summary: dict) -> str:
    """One line per phase: seconds and share of the total (what ``tiltlm train --timings`` prints)."""
    s, share = summary["seconds"], summary.get("share", {})
    lines = [f"time per phase ({summary.get('steps', 0)} steps, {s['total']:.1f} s):"]
    for k in (*PHASES, "other"):
        lines.append(f"  {k:<9}{s.get(k, 0.0):9.2f} s  {100 * share.get(k, 0.0):5.1f}%")
    return "\n".join(lines)


def run_dirs_under(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds a phases.json: its training runs, sorted."""
    return sorted(path.parent for path in Path(root).rglob(PHASES_FILE) if path.is_file())


def format_phases_line(summary: dict) -> str:
    """The breakdown on one line: seconds and share of each phase, summed over ``summary['runs']`` runs."""
    s, share = summary["seconds"], summary.get("share", {})
    parts = ", ".join(f"{k} {s.get(k, 0.0):.1f} s ({100 * share.get(k, 0.0):.0f}%)" for k in (*PHASES, "other"))
    return (f"time per phase, summed over {summary.get('runs', 0)} training runs ({summary.get('steps', 0)} steps, "
            f"{s['total']:.1f} s): {parts}")
