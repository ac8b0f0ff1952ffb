"""`tiltlm run`, the main job: does RL with a verifier narrow the model, and does the posterior keep its breadth?

By default (``task="quiz"``) two parts, each a directory of training runs with its own report:

1. ``rlvr/``: the RLVR study (tiltlm.experiments.rlvr) on the embedded default prior and its quiz — reinforce, kl-pg
   at two betas, dpg toward pi0·1[correct] and best-of-n, pass@k on held-out questions, SEEDS training seeds each;
2. ``exact/``: the same study on an enumerable testbed, where pass@k and KL(p*(·|x)‖pi(·|x)) are exact.

``task="overopt"`` is the overoptimization study: ``overopt_exact/`` (tiltlm.experiments.overopt: proxy reward models
learned from N gold labels, gold against KL for every method, exact) and ``overopt_lm/`` (tiltlm.experiments.overopt_lm:
the same on the embedded default LM with the sentiment as the gold, estimated). ``task="sentiment"`` is the earlier reward–KL comparison (``lm/`` and ``testbed/``: reinforce, kl-pg at several beta,
dpg with GDC++'s baseline, importance resampling, best-of-n toward the sentiment tilt); ``interactive`` adds ``interactive/``. The
top-level ``report.html`` (tiltlm.experiments.page.write_index) leads with the pass@k figure and the computed verdict. Everything is written
into a temporary directory renamed at the end; ``budget`` scales the steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tiltlm.errors import TiltlmError
from tiltlm.experiments import interactive as interactive_study
from tiltlm.experiments import overopt, overopt_lm, rlvr, sentiment
from tiltlm.experiments.grid import SEEDS, one_thread
from tiltlm.experiments.page import write_index
from tiltlm.io import check_file_destination, replace_dir


@dataclass
class Parts:
    """The parts of one run as they finish: ``add`` runs one part into ``work/<name>`` and records its time."""

    work: Path
    log: Callable[[str], None]
    done: list[dict] = field(default_factory=list)

    def add(self, name: str, title: str, fn: Callable[[Path], None]) -> None:
        t = time.time()
        self.log(f"part {len(self.done) + 1}: {title}")
        fn(self.work / name)
        self.done.append({"dir": name, "title": title, "seconds": round(time.time() - t, 1), "phases": phases_under(self.work / name)})
        self.log(f"  part {len(self.done)} finished in {time.time() - t:.0f} s")


def phases_under(root: Path) -> dict | None:
    """The seconds per phase of every training run under ``root``, added up (tiltlm.train.timing.sum_phases: the
    runs' own totals, so runs trained side by side add up to more than the wall time); None without any run."""
    from tiltlm.train.timing import run_dirs_under, sum_phases

    dirs = run_dirs_under(root)
    return sum_phases(dirs) if dirs else None


def _check(out: Path, overwrite: bool, budget: float, seeds: tuple[int, ...]) -> None:
    """One line for each argument run_main refuses, before anything is written."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TiltlmError(f"output directory '{out}' is not empty; pass --overwrite or choose another --out")
    if overwrite and out.exists() and any(out.iterdir()) and not (out / "run.json").is_file():
        raise TiltlmError(f"'{out}' is not the results of a tiltlm run (no run.json), and --overwrite only replaces those; "
                          "choose another --out")
    if not (budget > 0 and math.isfinite(budget)):
        raise TiltlmError(f"--budget must be a positive number (got {budget}); 1.0 is the default run")
    if not seeds or len(set(seeds)) != len(seeds):
        raise TiltlmError(f"--seeds needs distinct seeds (got {list(seeds)}), e.g. --seeds 0 or --seeds 0,1,2")


def _rlvr_parts(parts: Parts, task: str, prior: str, reward: str | None, betas: tuple[float, ...], budget: float,
                seeds: tuple[int, ...], workers: int | None) -> None:
    """The RLVR study on the task (unless ``task`` is "letters") and its exact twin on the enumerable testbed."""
    study = dict(betas=betas, seeds=seeds, log=parts.log, workers=workers)
    if task != "letters":
        steps = max(2, round(60 * budget))
        the_task = (rlvr.quiz_task(parts.work / "rlvr", prior) if task == "quiz"
                    else rlvr.user_task(task, parts.work / "rlvr", prior, reward))
        parts.add("rlvr", f"RLVR on {the_task.name} with {prior}: reinforce, kl-pg β={','.join(f'{b:g}' for b in betas)}, dpg; "
                          f"{steps} steps, seeds {','.join(map(str, seeds))}",
                  lambda root: rlvr.run_study(root, the_task, steps=steps, **study))
    exact_task = rlvr.letters_task(parts.work / "exact", seeds[0])
    title = ("RLVR on an enumerable testbed" if task == "letters" else "the same study on an enumerable testbed")
    parts.add("exact", f"{title} (exact pass@k and KL to p*(·|x))",
              lambda root: rlvr.run_study(root, exact_task, steps=max(2, round(80 * budget)), **study))


def _sentiment_parts(parts: Parts, prior: str, reward: str | None, betas: tuple[float, ...], main_beta: float,
                     budget: float, seeds: tuple[int, ...]) -> None:
    if main_beta not in betas:
        raise TiltlmError(f"the main beta {main_beta} must be one of the betas {list(betas)}")
    with one_thread():  # one thread: the same numbers on every machine (floats reduce in one order)
        parts.add("lm", f"{prior} prior, reward {reward or 'sentiment'}: reward–KL at matched samples",
                  lambda root: sentiment.lm_part(root, prior, reward or "sentiment", betas, main_beta, budget, list(seeds), parts.log))
        parts.add("testbed", "exact testbed, reward count:a", lambda root: sentiment.testbed_part(root, budget, list(seeds), parts.log))


def _publish(work: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``work`` directory to ``out`` (atomically); a directory another process filled meanwhile is
    kept, and this run's results go beside it."""
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / "run.json").is_file()):
        kept = out.with_name(f"{out.name}.{os.getpid()}")
        relocate(work, kept)
        write_index(work, name=kept.name)
        work.rename(kept)
        raise TiltlmError(f"'{out}' was filled by another process while this run worked; this run's results are in "
                          f"'{kept}' (nothing was overwritten)")
    relocate(work, out)
    write_index(work, name=out.name)
    replace_dir(work, out)


def run_main(out: str | Path, *, task: str = "quiz", prior: str = "default", reward: str | None = None,
             betas: tuple[float, ...] | None = None, main_beta: float = 0.2, budget: float = 1.0,
             seeds: tuple[int, ...] = SEEDS, overwrite: bool = False, interactive: bool = False, workers: int | None = None,
             log: Callable[[str], None] = print) -> Path:
    """The main job into ``out`` (atomically: a temporary directory renamed at the end).

    ``task`` "quiz" (default): the RLVR study (tiltlm.experiments.rlvr) on ``prior`` and its exact twin on a testbed;
    "letters": the exact twin alone; "reasoning-gym:<name>" or a prompt file: the same study on that task (``reward`` the
    verifier); "overopt": the overoptimization study, its exact twin and its LM part (``betas``: the exact twin's kl-pg betas);
    "sentiment": the reward–KL comparison on the story prior and an exact testbed (``reward`` default
    sentiment, kl-pg at ``betas``, the rest at ``main_beta``; every seed). ``interactive`` adds the interactive part.
    ``budget`` scales every part's steps. ``seeds``: the RLVR and sentiment studies train every method once per seed (the interactive part: the first). ``workers``:
    training processes at once in the RLVR study (default: the usable cores)."""
    out = check_file_destination(out, "--out", directory=True)
    _check(out, overwrite, budget, seeds)
    if task == "overopt" and (prior != "default" or reward is not None):
        raise TiltlmError("--task overopt runs on its own testbed and the embedded default LM with its own gold rewards; "
                          "drop --prior and --reward (train on another model with metrics.gold in a config: docs/config.md)")
    if task == "overopt":
        overopt.check_seeds(seeds)
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)).resolve()  # absolute: configs name paths in it
    parts = Parts(work, log)
    try:
        if task == "sentiment":
            betas = betas or (0.05, 0.2, 1.0)
            _sentiment_parts(parts, prior, reward, betas, main_beta, budget, seeds)
        elif task == "overopt":
            betas = betas or overopt.BETAS
            parts.add("overopt_exact", "overoptimization, exact twin: proxy reward models from N gold labels; best-of-n, reinforce, "
                                       f"kl-pg β={','.join(f'{b:g}' for b in betas)}, dpg and DPO, gold against KL",
                      lambda root: overopt.run_exact(root, budget=budget, seeds=seeds, betas=tuple(betas), workers=workers, log=parts.log))
            parts.add("overopt_lm", f"overoptimization on the default LM: gold = VADER sentiment, proxy reward models from "
                                    f"N = {', '.join(map(str, overopt_lm.N_LABELS))} labels; best-of-n, reinforce, kl-pg "
                                    f"β={','.join(f'{b:g}' for b in overopt_lm.BETAS)}, dpg and DPO, gold against KL (estimates)",
                      lambda root: overopt_lm.run_lm(root, budget=budget, seeds=seeds, workers=workers, log=parts.log))
        else:
            betas = betas or (0.1, 1.0)
            _rlvr_parts(parts, task, prior, reward, betas, budget, seeds, workers)
        if interactive:
            parts.add("interactive", "the interactive case: tabular environments (exact) and twenty questions",
                      lambda root: interactive_study.interactive_part(root, prior, budget, seeds[0], log))
        summary = {"task": task, "prior": prior, "reward": reward, "betas": list(betas), "main_beta": main_beta,
                   "budget": budget, "seeds": list(seeds), "interactive": interactive, "parts": parts.done,
                   "seconds": round(time.time() - start, 1), "phases": phases_under(work)}
        (work / "run.json").write_text(json.dumps(summary, indent=1))
        _publish(work, out, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def relocate(work: Path, out: Path) -> None:
    """Configs written inside the temporary directory name it; point them at ``out``, where they will live."""
    old, new = str(work.resolve()), str(out.resolve())
    for path in work.rglob("*"):
        if path.suffix in (".yaml", ".json", ".jsonl", ".csv") and path.is_file():
            text = path.read_text()
            if old in text:
                path.write_text(text.replace(old, new))
