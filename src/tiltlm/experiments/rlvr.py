"""The RLVR study, `tiltlm run`'s main part: does RL with a verifier narrow the model, and does the posterior keep
the base model's breadth?

A task is a prompt dataset with a verifier v(x, y) ∈ {0, 1}. The target is the base model conditioned on being
right, p*(y|x) = pi0(y|x)·v(x, y) / Z(x), Z(x) = pi0's pass rate on x (docs/math.md, "Conditional targets"). Every
method trains from pi0 with the same samples per step (prompts_per_step × n_per_context) and the same steps:

- ``reinforce`` maximises v (the beta → 0 limit; RLOO leave-one-out baseline within each prompt's group, GRPO-style);
- ``kl-pg`` at each beta maximises E[v] − beta·KL(pi‖pi0): reverse KL to p_beta ∝ pi0·exp(v/beta);
- ``dpg`` matches p* = pi0·1[correct]/Z itself (forward KL, importance weights p*/pi, a log Z per prompt);
- ``best-of-n`` with the verifier trains nothing: it draws n pi0 samples per answer and returns a correct one when
  there is one, so its pass@k is pi0's pass@(n·k) at n times the samples.

Each trained policy and pi0 are evaluated on held-out prompts never trained on (``eval:``): pass@k for k = 1 … 64
(the unbiased estimator over 64 completions per prompt), distinct correct answers per prompt and KL(pi‖pi0); on an
enumerable space also their exact values and the exact KL(p*(·|x)‖pi(·|x)) per prompt. The cells are laid out like a
sweep (``cells/<name>/``, ``results.jsonl``), so `tiltlm report` draws them; ``per_question.json`` keeps every
held-out prompt's numbers, and `verdict` turns the numbers into the two sentences on the report's first screen.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tiltlm.errors import TiltlmError
from tiltlm.io import atomic_write_text

EVAL_N = 64  # completions per held-out prompt: pass@k up to k = 64
BEST_OF = 4  # the training-free baseline's n


# The studies were tuned and measured with the optimiser defaults of before optim.minibatch_size (one update per batch,
# a constant lr unless they set one); they keep them so the results in README.md reproduce (re-tuning is open work).
STUDY_OPTIM = {"schedule": "constant", "minibatch_size": None}


@dataclass
class Task:
    """What a study trains on: the prior, the verifier (a reward spec scoring 1 correct / 0 wrong, reading the rows'
    columns), the training config's ``data:`` section (training prompts and held-out prompts) and the sampling length."""

    name: str
    prior: str
    verifier: str
    data: dict
    max_new_tokens: int
    lr: float
    prompts_per_step: int = 8
    n_per_context: int = 8
    eval_n: int = EVAL_N
    lora: dict | None = None
    exact: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Method:
    label: str
    beta: float | None  # None: the target is pi0·1[correct] itself
    algorithm: dict

    @property
    def title(self) -> str:
        """The name reports give this method (tiltlm.experiments.passk.lines: label and beta)."""
        return self.label + (f" β={self.beta:g}" if self.beta is not None else "")


def methods(betas: tuple[float, ...]) -> list[Method]:
    """reinforce, kl-pg at each beta, dpg (in this order)."""
    return [Method("reinforce", None, {"name": "reinforce"}),
            *[Method("kl-pg", b, {"name": "kl-pg"}) for b in betas],
            Method("dpg", None, {"name": "dpg", "baseline": False})]  # plain DPG, as measured (see STUDY_OPTIM)


def cell_config(task: Task, method: Method, *, steps: int, seed: int, eval_at_start: bool) -> dict:
    """The training config of one cell (validated by the caller through parse_config)."""
    target = ({"reward": None, "constraints": [task.verifier]} if method.beta is None
              else {"reward": task.verifier, "beta": method.beta})
    return {
        "prior": task.prior, "seed": seed, "target": target, "algorithm": dict(method.algorithm),
        "sampling": {"n_per_context": task.n_per_context, "max_new_tokens": task.max_new_tokens},
        "data": {**task.data, "prompts_per_step": task.prompts_per_step},
        "eval": {"n": task.eval_n, "every": 0, "at_start": eval_at_start, "seed": 10_000 + seed, "exact": task.exact},
        "optim": {**STUDY_OPTIM, "steps": steps, "lr": task.lr},
        "metrics": {"diversity": False},
        "checkpoint": {"every": 0},
        **({"lora": dict(task.lora)} if task.lora else {}),
    }


def cell_name(method: Method, seed: int) -> str:
    return f"{method.label}" + (f"_beta{method.beta:g}" if method.beta is not None else "") + f"_seed{seed}"


def run_study(root: Path, task: Task, *, betas: tuple[float, ...], steps: int, seeds: tuple[int, ...],
              log: Callable[[str], None] = print, workers: int | None = None) -> Path:
    """Train every method × seed into ``root/cells``, then results.jsonl, per_question.json and the part's report.

    Each cell trains on ONE torch thread, in ``workers`` processes at once (default: the cores this process may use,
    tiltlm.threads.available_cores): the numbers are the same on any number of cores, and a busy neighbour only makes
    the run slower — single-threaded processes share cores by plain time slicing, without the stalls of intra-op
    threads waiting for a descheduled sibling (docs/reliability.md, threads) — and small models use cores better as
    processes than as threads."""
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import collect
    from tiltlm.threads import available_cores
    from tiltlm.train.config import parse_config

    root = Path(root)
    grid = [(m, s) for s in seeds for m in methods(betas)]
    raw = {cell_name(m, s): cell_config(task, m, steps=steps, seed=s, eval_at_start=(i == 0)) for i, (m, s) in enumerate(grid)}
    configs = {name: (m, s, parse_config(raw[name])) for name, (m, s) in zip(raw, grid)}  # all validated before anything trains
    workers = max(1, min(len(configs), workers or available_cores()))
    log(f"  {len(configs)} runs of {steps} steps × {task.prompts_per_step * task.n_per_context} samples, then {task.eval_n} completions "
        f"per held-out prompt; {workers} at a time, one thread each")
    jobs = [(name, raw[name], str(root / "cells" / name)) for name in configs]
    for i, (name, final, seconds) in enumerate(_map(_train_cell, jobs, workers), 1):
        method, seed, _ = configs[name]
        record = {"cell": name, "algorithm": method.label, "beta": method.beta, "seed": seed, "final": final}
        atomic_write_text(root / "cells" / name / "done.json", json.dumps(record))
        log(f"  [{i}/{len(configs)}] {name} done in {seconds:.0f} s: pass@1 {final.get('eval/pass@1', float('nan')):.3f}, "
            f"pass@{task.eval_n} {final.get(f'eval/pass@{task.eval_n}', float('nan')):.3f}, KL(pi||pi0) {final.get('eval/kl_prior', float('nan')):.3f}")
    collect(root, list(configs))
    per_question(root, task, configs)
    write_report(root)
    return root


def _train_cell(job: tuple[str, dict, str]) -> tuple[str, dict, float]:
    """One cell, on one thread (run in a worker process, or in this one with one_thread): (name, final row, seconds)."""
    from tiltlm.train.build import fit
    from tiltlm.train.config import parse_config

    name, config, cell_dir = job
    start = time.perf_counter()
    with one_thread(), warnings.catch_warnings():  # transformers' / peft's deprecation notices would flood the log
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _, rows = fit(parse_config(config), Path(cell_dir))
    return name, rows[-1], time.perf_counter() - start


def _map(fn, jobs: list, workers: int):
    """fn over jobs, yielding results as they finish: in this process with one worker, else in ``workers`` spawned
    processes (a failing job raises here, the others are cancelled)."""
    if workers == 1:
        yield from map(fn, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


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


def per_question(root: Path, task: Task, configs: dict) -> None:
    """per_question.json: every held-out prompt's pass@1, pass@n, distinct correct answers, KL(pi‖pi0) and (on an
    enumerable space) exact pass rate and KL(p*(·|x)‖pi(·|x)), for pi0 (the first cell's step-0 evaluation) and each
    method's final policy (its last evaluation; the first seed's cells). They come from each cell's
    eval_per_prompt.jsonl, the evaluation whose means are the metrics' eval/ values."""
    keys = ("pass@1", f"pass@{task.eval_n}", "distinct_correct", "kl_prior", "pass@1_exact", "kl_target_exact")
    out: dict = {"n": task.eval_n, "methods": {}}
    first_seed = next(iter(configs.values()))[1]
    for i, (name, (method, seed, _)) in enumerate(configs.items()):
        if seed != first_seed:
            continue  # the table compares methods, not seeds
        lines = [json.loads(x) for x in (root / "cells" / name / "eval_per_prompt.jsonl").read_text().splitlines() if x.strip()]
        by_step = {line["step"]: line["prompts"] for line in lines}  # a repeated step (resume): the last line counts
        picks = ([("π0", by_step[0])] if i == 0 and 0 in by_step else []) + [(method.title, by_step[max(by_step)])]
        for label, prompts in picks:
            out["prompts"] = [p["prompt"] for p in prompts]
            out["methods"][label] = [{k: p[k] for k in keys if k in p} for p in prompts]
    atomic_write_text(root / "per_question.json", json.dumps(out, indent=1))


# ---- tasks -------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def quiz_task(root: Path, prior: str = "default") -> Task:
    """The embedded default's verifiable task (tiltlm.quiz): short questions with many correct answers; training and
    held-out questions written to ``root/data``."""
    from tiltlm import quiz

    train = _write_jsonl(root / "data" / "train.jsonl", quiz.questions("train"))
    held = _write_jsonl(root / "data" / "heldout.jsonl", quiz.questions("heldout"))
    return Task("quiz", prior, "quiz", {"path": str(train), "eval_path": str(held)}, max_new_tokens=8, lr=1e-4)


LETTERS = "abcd"


def letters(completions: list[str], letter: list[str], times: list[int], **kwargs) -> list[float]:
    """The exact testbed's verifier: 1 if the completion contains the row's ``letter`` at least ``times`` times."""
    return [float(c.count(a) >= int(t)) for c, a, t in zip(completions, letter, times)]


def letters_task(root: Path, seed: int = 0) -> Task:
    """The enumerable testbed: a 5-token GPT-2 fitted to a random Markov chain (tiltlm.testbed). A prompt is a noise
    letter, then a letter written t times: "contain that letter at least t times" in ≤ 4 tokens ("bcc": two c's). Every
    completion can be enumerated (341 per prompt), so pass@k, distinct correct answers and KL(p*(·|x)‖pi(·|x)) are
    exact. Each of the 12 requirements is held out after one noise letter (12 held-out prompts) and trained after the
    other three (36 training prompts)."""
    import itertools
    import random

    from tiltlm.testbed import make_testbed

    with one_thread():  # its fit's floats depend on the thread count
        model = make_testbed(root / "model", vocab_size=5, n_layer=2, seed=seed, train_steps=100)
    rng = random.Random(seed)
    rows = [{"prompt": noise + letter * times, "letter": letter, "times": times}
            for letter, times, noise in itertools.product(LETTERS, (1, 2, 3), LETTERS)]
    held_noise = {(letter, times): rng.choice(LETTERS) for letter, times in itertools.product(LETTERS, (1, 2, 3))}
    held = [r for r in rows if held_noise[r["letter"], r["times"]] == r["prompt"][0]]
    train = [r for r in rows if r not in held]
    return Task("letters (exact testbed)", str(model), "tiltlm.experiments.rlvr:letters",
                {"path": str(_write_jsonl(root / "data" / "train.jsonl", train)),
                 "eval_path": str(_write_jsonl(root / "data" / "heldout.jsonl", held))}, max_new_tokens=4, lr=3e-3, exact=True)


def user_task(spec: str, root: Path, prior: str, verifier: str | None) -> Task:
    """``--task``: ``reasoning-gym:<name>`` (offline, the task's own scorer) or a prompt file (.jsonl/.csv/.parquet,
    20% held out, ``verifier`` default exact_match against its ``answer`` column). Sized for a ~100M-parameter model on
    a CPU: LoRA r 8 (the embedded default trains all weights), 4 prompts × 4 completions of ≤ 48 tokens per step,
    16 completions per held-out prompt."""
    small = prior == "default"
    sizes = dict(max_new_tokens=48, lr=1e-3 if small else 3e-4, prompts_per_step=4, n_per_context=4, eval_n=16,
                 lora=None if small else {"r": 8, "alpha": 16})
    if spec.startswith("reasoning-gym:"):
        name = spec.split(":", 1)[1]
        return Task(spec, prior, verifier or "reasoning_gym", {"reasoning_gym": {"task": name, "size": 216}, "eval_size": 16}, **sizes)
    path = Path(spec).expanduser()
    if not path.exists():
        raise TiltlmError(f"--task '{spec}' is neither quiz, letters, sentiment, reasoning-gym:<task> nor an existing prompt "
                          "file; pass one of those")
    return Task(path.name, prior, verifier or "exact_match", {"path": str(path.resolve()), "eval_fraction": 0.2}, **sizes)


# ---- reading a study back: lines, the baseline, the verdict ------------------------------------------------


def study_lines(root: Path):
    """(pi0, [trained lines], [training-free lines]) of a study directory (tiltlm.experiments.passk.Line)."""
    from tiltlm.experiments import passk
    from tiltlm.experiments.report import _groups, load_cells

    pi0, trained = passk.lines(_groups(load_cells(root)))
    return pi0, trained, ([best_of_n_line(pi0, BEST_OF)] if pi0 is not None else [])


def best_of_n_line(pi0, n: int):
    """Best-of-n with the verifier from pi0's own evaluation: pass@k(BoN_n) = pass@(n·k)(pi0) (one correct among n·k
    pi0 samples), for the k with n·k evaluated."""
    from tiltlm.experiments.passk import Line

    values = pi0.values
    row = {f"eval/pass@{k}": values[f"eval/pass@{n * k}"] for k in (1, 2, 4, 8, 16, 32, 64) if f"eval/pass@{n * k}" in values}
    row.update({f"eval/pass@{k}_exact": values[f"eval/pass@{n * k}_exact"] for k in (1, 2, 4, 8, 16, 32, 64)
                if f"eval/pass@{n * k}_exact" in values})
    return Line(f"best-of-{n} (verifier, {n}× samples)", None, [row])


def _console_columns(big: int) -> tuple:
    return (("pass@1", "eval/pass@1"), (f"pass@{big}", f"eval/pass@{big}"), ("distinct correct", "eval/distinct_correct"),
            ("KL(pi||pi0)", "eval/kl_prior"), ("KL(p*||pi) exact", "eval/kl_target_exact"))


def console_table(pi0, lines: list) -> tuple[list[str], list[list[str]]]:
    """The few columns `tiltlm run` prints (the report has them all), crossover last; exact pass@k where enumerated."""
    from tiltlm.experiments.passk import _crossover_text, crossover
    from tiltlm.experiments.report import _fmt

    every = ([pi0] if pi0 is not None else []) + lines
    big = max((k for line in every for k in line.curve()), default=1)
    cols = [(h, k) for h, k in _console_columns(big) if any(k in line.values for line in every)]
    exact = [(h + " exact", k + "_exact") for h, k in cols[:3] if any(k + "_exact" in line.values for line in every)]
    cols = cols[:3] + exact + cols[3:]
    rows = []
    for line in every:
        cross = "—" if line is pi0 or pi0 is None else _crossover_text(*crossover(pi0, line))
        rows.append([line.name, *[_fmt(line.values.get(k), 3) for _, k in cols], cross])
    return ["method", *[h for h, _ in cols], "π0 overtakes at k"], rows


KEEP_PASS, KEEP_DISTINCT = 0.02, 0.95  # breadth kept: pass@K within 0.02 of pi0's, distinct correct within 5%


def _get(line, key: str) -> float | None:
    return line.values.get(key) if line is not None else None


def verdict(pi0, trained: list) -> list[str]:
    """Two sentences computed from the numbers: did RL (reinforce, else the smallest-beta kl-pg) narrow the model —
    pi0 overtakes it at some k, or its pass@K is more than KEEP_PASS below pi0's —, and did dpg (the posterior) keep the
    breadth — pass@K at most KEEP_PASS below pi0's and at least KEEP_DISTINCT × pi0's distinct correct answers per
    prompt (the slack is evaluation noise)? K is the largest k. When dpg
    did not, the smallest-beta kl-pg that did (and gained pass@1) is named."""
    from tiltlm.experiments.passk import crossover

    if pi0 is None or not trained:
        return ["No held-out evaluation to compare: the study has no π0 row or no trained policy."]
    exact = "eval/pass@1_exact" in pi0.values and all("eval/pass@1_exact" in line.values for line in trained)
    sfx = "_exact" if exact else ""  # the exact values where every line has them, as the crossover uses
    big = max(pi0.curve(exact), default=1)
    kk, k1, kd = f"eval/pass@{big}{sfx}", f"eval/pass@1{sfx}", f"eval/distinct_correct{sfx}"
    p1, pk, dc = _get(pi0, k1), _get(pi0, kk), _get(pi0, kd)
    if None in (p1, pk, dc):
        return [f"The π0 row lacks {k1}, {kk} or {kd}: no verdict."]
    rl = next((l for l in trained if l.name == "reinforce"), None) or min(
        (l for l in trained if l.name.startswith("kl-pg")), key=lambda l: l.beta or 0.0, default=None)
    post = next((l for l in trained if l.name == "dpg"), None)
    out = []
    if rl is not None:
        r1, rk, rdc = _get(rl, k1), _get(rl, kk), _get(rl, kd)
        k, _ = crossover(pi0, rl)
        if None in (r1, rk, rdc):
            out.append(f"{rl.name} lacks {k1}, {kk} or {kd}: no verdict on narrowing.")
        elif k is not None or rk < pk - KEEP_PASS:
            where = f"π0 overtakes it at k = {k}" if k is not None else f"its pass@{big} is below π0's"
            out.append(f"RL with the verifier narrowed the model: {rl.name} moved pass@1 from {p1:.2f} to {r1:.2f}, but {where} "
                       f"(pass@{big} {rk:.2f} against π0's {pk:.2f}) and it finds {rdc:.1f} distinct correct answers per "
                       f"question against π0's {dc:.1f}.")
        else:
            out.append(f"RL with the verifier did not narrow the model at this budget: {rl.name} moved pass@1 from {p1:.2f} to "
                       f"{r1:.2f} and stayed at or above π0 up to k = {big} (pass@{big} {rk:.2f} against {pk:.2f}; distinct correct "
                       f"{rdc:.1f} against {dc:.1f}).")
    if post is not None:
        q1, qk, qdc = _get(post, k1), _get(post, kk), _get(post, kd)
        lost = [] if None in (q1, qk, qdc) else (([f"pass@{big}"] if qk < pk - KEEP_PASS else []) +
                                                 (["distinct correct answers"] if qdc < KEEP_DISTINCT * dc else []))
        how = "" if None in (q1, qk, qdc) else (f"pass@1 {p1:.2f} → {q1:.2f}, pass@{big} {qk:.2f} against π0's {pk:.2f}, "
                                                f"{qdc:.1f} distinct correct answers against π0's {dc:.1f}")
        keeper = next((l for l in sorted(trained, key=lambda l: l.beta or 0.0) if l.name.startswith("kl-pg")
                       and None not in (_get(l, k1), _get(l, kk), _get(l, kd)) and _get(l, kk) >= pk - KEEP_PASS
                       and _get(l, kd) >= KEEP_DISTINCT * dc
                       and _get(l, k1) > p1), None)
        also = ("" if keeper is None else
                f"; {keeper.name}, whose target π0·exp(v/{keeper.beta:g}) tilts toward the same posterior, kept it (pass@1 "
                f"{_get(keeper, k1):.2f}, pass@{big} {_get(keeper, kk):.2f}, {_get(keeper, kd):.1f} distinct correct answers)")
        if not how:
            out.append(f"dpg lacks {k1}, {kk} or {kd}: no verdict on the posterior.")
        elif not lost:
            out.append(f"The posterior kept the breadth: dpg, trained toward π0·1[correct], gained accuracy without losing "
                       f"coverage ({how}).")
        else:
            out.append(f"The posterior did not keep the breadth here: dpg, trained toward π0·1[correct], fell below π0 in "
                       f"{' and '.join(lost)} ({how}){also}.")
    return out if not exact else [*out, "(Exact values: every completion was enumerated.)"]
