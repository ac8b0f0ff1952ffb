"""The RLVR study, `tiltlm run`'s main part: does RL with a verifier narrow the model, and does the posterior keep
the base model's breadth? Read top to bottom: the task, the methods, the cells, the evaluation, the figures, the verdict.

A task is a prompt dataset with a verifier v(x, y) ∈ {0, 1}. The target is the base model conditioned on being
right, p*(y|x) = pi0(y|x)·v(x, y) / Z(x), Z(x) = pi0's pass rate on x (docs/math.md, "Conditional targets"). Every
method trains from pi0 with the same samples per step (prompts_per_step × n_per_context) and the same steps, with the
library's default optimiser (minibatches of 16 with the pi/pi_start correction, linear decay; docs/math.md §12):

- ``reinforce`` maximises v (the beta → 0 limit; RLOO leave-one-out baseline within each prompt's group, GRPO-style);
- ``kl-pg`` at each beta maximises E[v] − beta·KL(pi‖pi0): reverse KL to p_beta ∝ pi0·exp(v/beta);
- ``dpg`` matches p* = pi0·1[correct]/Z itself (forward KL, importance weights p*/pi, a log Z per prompt, the GDC++
  baseline: the library's default);
- ``best-of-n`` with the verifier trains nothing: it draws n pi0 samples per answer and returns a correct one when
  there is one, so its pass@k is pi0's pass@(n·k) at n times the samples.

Each method trains once per seed. Every trained policy and pi0 (once, in the first cell) are evaluated on held-out
prompts never trained on (``eval:``): pass@k for k = 1 … 64 (the unbiased estimator over 64 completions per prompt),
distinct correct answers per prompt and KL(pi‖pi0); on an enumerable space also their exact values and the exact
KL(p*(·|x)‖pi(·|x)) per prompt. The cells are laid out like a sweep (``cells/<name>/``, ``results.jsonl``), so
`tiltlm report` draws them; ``per_question.json`` keeps every held-out prompt's numbers (first seed), and
``verdict.json`` the differences to pi0 with their intervals over seeds × questions and the calls
(tiltlm.experiments.verdict) that the report's first screen states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tiltlm.errors import TiltlmError
from tiltlm.experiments.grid import one_thread, train_cells
from tiltlm.experiments.verdict import write_verdict
from tiltlm.io import atomic_write_text

EVAL_N = 64  # completions per held-out prompt: pass@k up to k = 64


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
            Method("dpg", None, {"name": "dpg"})]


def cell_config(task: Task, method: Method, *, steps: int, seed: int, eval_at_start: bool) -> dict:
    """The training config of one cell (validated by the caller through parse_config)."""
    target = ({"reward": None, "constraints": [task.verifier]} if method.beta is None
              else {"reward": task.verifier, "beta": method.beta})
    return {
        "prior": task.prior, "seed": seed, "target": target, "algorithm": dict(method.algorithm),
        "sampling": {"n_per_context": task.n_per_context, "max_new_tokens": task.max_new_tokens},
        "data": {**task.data, "prompts_per_step": task.prompts_per_step},
        "eval": {"n": task.eval_n, "every": 0, "at_start": eval_at_start, "seed": 10_000 + seed, "exact": task.exact},
        "optim": {"steps": steps, "lr": task.lr},  # the library's defaults otherwise
        "metrics": {"diversity": False},
        "checkpoint": {"every": 0},
        **({"lora": dict(task.lora)} if task.lora else {}),
    }


def cell_name(method: Method, seed: int) -> str:
    return f"{method.label}" + (f"_beta{method.beta:g}" if method.beta is not None else "") + f"_seed{seed}"


def run_study(root: Path, task: Task, *, betas: tuple[float, ...], steps: int, seeds: tuple[int, ...],
              log: Callable[[str], None] = print, workers: int | None = None) -> Path:
    """The study into ``root``: cells (every method × seed, in ``workers`` one-thread processes: tiltlm.experiments.grid)
    → evaluation (results.jsonl, per_question.json) → verdict (verdict.json) → figures and the part's report."""
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import collect
    from tiltlm.threads import available_cores
    from tiltlm.train.config import parse_config

    root = Path(root)
    # 1. cells: one training config per method × seed, all validated before anything trains
    grid = [(m, s) for s in seeds for m in methods(betas)]
    raw = {cell_name(m, s): cell_config(task, m, steps=steps, seed=s, eval_at_start=(i == 0)) for i, (m, s) in enumerate(grid)}
    configs = {name: (m, s, parse_config(raw[name])) for name, (m, s) in zip(raw, grid)}
    workers = max(1, min(len(configs), workers or available_cores()))
    log(f"  {len(configs)} runs of {steps} steps × {task.prompts_per_step * task.n_per_context} samples, then {task.eval_n} completions "
        f"per held-out prompt; {workers} at a time, one thread each")
    jobs = [(name, raw[name], str(root / "cells" / name)) for name in configs]
    for i, (name, final, seconds) in enumerate(train_cells(jobs, workers), 1):
        method, seed, _ = configs[name]
        record = {"cell": name, "algorithm": method.label, "beta": method.beta, "seed": seed, "final": final}
        atomic_write_text(root / "cells" / name / "done.json", json.dumps(record))
        log(f"  [{i}/{len(configs)}] {name} done in {seconds:.0f} s: pass@1 {final.get('eval/pass@1', float('nan')):.3f}, "
            f"pass@{task.eval_n} {final.get(f'eval/pass@{task.eval_n}', float('nan')):.3f}, KL(pi||pi0) {final.get('eval/kl_prior', float('nan')):.3f}")
    # 2. evaluation: the cells' final rows and every held-out question's numbers
    collect(root, list(configs))
    per_question(root, task, configs)
    # 3. verdict: differences to pi0 with intervals over seeds × questions, a call per claim
    write_verdict(root)
    # 4. figures and the part's own report
    write_report(root)
    return root


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
        raise TiltlmError(f"--task '{spec}' is neither quiz, letters, sentiment, overopt, reasoning-gym:<task> nor an existing prompt "
                          "file; pass one of those")
    return Task(path.name, prior, verifier or "exact_match", {"path": str(path.resolve()), "eval_fraction": 0.2}, **sizes)
