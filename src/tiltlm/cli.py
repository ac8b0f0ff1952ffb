"""The `tiltlm` command line (typer + rich).

Every user-fixable problem is a TiltlmError, printed as one line `error: <problem>; <fix>` with
exit code 2, and so is every OSError (a full or read-only disk, a path under a file: the machine's
problem, named with its path and fix); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table as RichTable

from tiltlm.errors import TiltlmError
from tiltlm.io import atomic_write_text, check_file_destination

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models toward a target distribution p*(x) ∝ pi0(x)·exp(r(x)/beta) and measure the result.",
)
PIPE_WIDTH = 1000  # columns when stdout is not a terminal: a table as wide as its cells, never cut to 80


class WideConsole(Console):
    """A rich Console that never cuts table cells: piped or redirected (not a terminal), it is PIPE_WIDTH columns wide
    (tables only take the width their cells need); on a terminal it has the terminal's width and every column of a
    ``Table`` below folds long cells onto more lines instead of truncating them with an ellipsis."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(max(size.width, PIPE_WIDTH), size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


def Table(*headers, **options) -> RichTable:  # noqa: N802 - a drop-in for rich.table.Table
    """rich's Table whose columns fold (wrap) long cells instead of cutting them off."""
    table = RichTable(*headers, **options)
    for column in table.columns:
        column.overflow = "fold"
    return table


console = WideConsole()


def _quiet_transformers() -> None:
    """Progress bars and advisory warnings from transformers would drown the CLI's own output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fmt(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


@app.command()
def run(
    out: Path = typer.Option(Path("runs/run"), help="Results directory (written atomically)."),
    task: str = typer.Option("quiz", help="quiz (the RLVR study on the embedded default's questions), letters (its exact "
                                          "testbed alone), reasoning-gym:<task>, "
                                          "a prompt file (.jsonl/.csv/.parquet; 20% held out), sentiment (the reward–KL comparison), "
                                          "or overopt (proxy vs gold reward: the overoptimization study, exact and on the default LM)."),
    prior: str = typer.Option("default", help="Prior LM: 'default' (embedded), smollm2-135m, or a save_pretrained directory."),
    reward: str = typer.Option(None, help="The verifier of a prompt-file task (default exact_match), or sentiment's reward (default sentiment)."),
    betas: str = typer.Option(None, help="Comma-separated kl-pg betas (default 0.1,1 for RLVR tasks; 0.05,0.2,1 for sentiment; 1,0.25 for overopt's exact twin, whose LM part keeps 2,0.5)."),
    beta: float = typer.Option(0.2, help="sentiment only: the p* that reinforce, dpg and the baselines are measured against."),
    budget: float = typer.Option(1.0, help="Scales every part's steps (1.0: the README's run, under 10 minutes on 2 CPU cores)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds of the RLVR study (each adds one run per method; "
                                           "the verdict's intervals combine seeds and questions)."),
    overwrite: bool = typer.Option(False, help="Replace the results directory of an earlier `tiltlm run` (one with run.json; "
                                               "never a directory tiltlm did not write)."),
    interactive: bool = typer.Option(False, help="Add the interactive case: DPG vs KL-PG on tabular envs (exact) and twenty questions."),
    workers: int = typer.Option(None, min=1, help="Training processes at once, one thread each (default: the usable cores); "
                                                  "the numbers do not depend on it."),
) -> None:
    """The main job: does RL with a verifier narrow the model (pass@k), does the posterior keep the breadth? With a report."""
    from tiltlm.experiments.run import run_main

    _quiet_transformers()
    beta_list = _numbers(betas, "--betas", float) if betas is not None else None
    seed_list = _numbers(seeds, "--seeds", int)
    path = run_main(out, task=task, prior=prior, reward=reward, betas=beta_list, main_beta=beta, budget=budget, seeds=seed_list,
                    overwrite=overwrite, interactive=interactive, workers=workers, log=console.print)
    summary = json.loads((path / "run.json").read_text())
    if task == "sentiment":
        _print_sentiment(path, prior, reward or "sentiment")
    elif task == "overopt":
        from tiltlm.experiments.verdict import read_verdict

        for part in summary["parts"]:
            console.print(part["title"], markup=False, highlight=False)
            for sentence in (read_verdict(path / part["dir"]) or {}).get("sentences", ["No verdict.json was written."]):
                console.print("  " + sentence, markup=False, highlight=False)
    else:
        from tiltlm.experiments.page import console_study

        for part in summary["parts"]:
            if part["dir"] in ("rlvr", "exact"):
                headers, rows, sentences = console_study(path / part["dir"])
                table = Table(*headers, title=part["title"], title_justify="left")
                for row in rows:
                    table.add_row(*row)
                console.print(table, markup=False)
                console.print(" ".join(sentences), markup=False, highlight=False)
    if interactive:
        _print_interactive(path / "interactive")
    if summary.get("phases"):  # the training runs' seconds per phase, added up (run.json)
        from tiltlm.train.timing import format_phases_line

        console.print(format_phases_line(summary["phases"]), markup=False, highlight=False)
    console.print(f"report: {path / 'report.html'}  ({summary['seconds']:.0f} s)")


REWARD_TIMEOUT_S = 300.0  # the --reward-timeout default, as target.reward_timeout_s in a training config


def _limit(reward_timeout: float) -> float | None:
    """--reward-timeout as Reward.limited takes it: 0 means no limit."""
    if not (reward_timeout >= 0 and reward_timeout < float("inf")):
        raise TiltlmError(f"--reward-timeout must be a finite number of seconds >= 0 (got {reward_timeout}); 0 means no limit")
    return reward_timeout or None


def _check_count(value: int, flag: str, what: str) -> None:
    if value < 1:
        raise TiltlmError(f"{flag} must be >= 1 (got {value}); it counts {what}")


def _check_seed(seed: int, stride: int) -> None:
    """Batch j samples with seed·stride + j, which torch takes as a 64-bit integer."""
    from tiltlm.train.config import MAX_SEED

    bound = MAX_SEED if stride > 1 else 2**63 - 1
    why = f"batch j draws with seed·{stride:,} + j" if stride > 1 else "torch takes it"
    if abs(seed) > bound:
        raise TiltlmError(f"--seed {seed} is outside ±{bound:,} ({why} as a 64-bit integer); pick a smaller seed")


def _numbers(text: str, flag: str, kind):
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TiltlmError(f"{flag} must be comma-separated {'numbers' if kind is float else 'integers'} (got {text!r})") from None
    if not values:
        raise TiltlmError(f"{flag} needs at least one value (got {text!r})")
    return values


def _print_sentiment(path: Path, prior: str, reward: str) -> None:
    for part, title in (("lm", f"{prior} prior, r = {reward}"), ("testbed", "exact testbed, r = count:a")):
        table = Table("algorithm", "beta", "reward", "KL(pi||pi0)", "KL(p*||pi)", "entropy", "distinct-2", title=title)
        for line in (path / part / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            f = r["final"]
            pick = lambda *keys: next((_fmt(f[k]) for k in keys if k in f), "–")  # noqa: E731
            table.add_row(r["algorithm"], f"{r['beta']:g}", pick("reward/exact", "reward/mean"), pick("kl/prior_exact", "kl/prior_seq"),
                          pick("kl/target_exact", "kl/target_is"), pick("entropy/exact", "entropy/seq"),
                          pick("diversity/distinct_2" if part == "lm" else "diversity/distinct_2_tokens"))
        console.print(table)


def _print_interactive(root: Path) -> None:
    """Part 3's tables: exact KLs to the two optima per env, and the twenty-questions evaluation."""
    table = Table("environment", "algorithm", "KL(q_opt||pi)", "KL(pi||q_var)", "E[R]", title="interactive: exact optima (beta 1)")
    for env in ("tabular_stochastic", "tabular_deterministic"):
        for line in (root / env / "results.jsonl").read_text().splitlines():
            f = json.loads(line)["final"]
            table.add_row(env.split("_")[1], json.loads(line)["algorithm"], _fmt(f.get("kl/optimistic_exact", float("nan"))),
                          _fmt(f.get("kl/variational_exact", float("nan"))), _fmt(f.get("reward/exact", float("nan"))))
    console.print(table)
    table = Table("policy", "success", "KL(pi||pi0)", "KL turn 1", "KL turn 2", "distinct 1st", title="interactive: twenty questions (eval)")
    for line in (root / "dialogue" / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["algorithm"].endswith("eval"):
            f = r["final"]
            table.add_row(r["algorithm"], _fmt(f["env/success_rate"]), _fmt(f["kl/prior_seq"]), _fmt(f.get("kl/prior_turn_1", float("nan"))),
                          _fmt(f.get("kl/prior_turn_2", float("nan"))), _fmt(f["diversity/distinct_first_action"]))
    console.print(table)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML training config (see docs/config.md)."),
    out: Path = typer.Option(..., help="Run directory: config.yaml, metrics.jsonl, checkpoint/, policy/."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint, with CONFIG: it must be the "
                                            "run's config (compared after parsing; raising --steps is fine with a constant lr)."),
    accept_config: bool = typer.Option(False, help="With --resume: continue with CONFIG although it differs from the run's "
                                                   "config.yaml, which is rewritten (the change is kept in config_changes.jsonl)."),
    steps: Optional[int] = typer.Option(None, help="Override optim.steps."),
    seed: Optional[int] = typer.Option(None, help="Override seed."),
    log: Optional[str] = typer.Option(None, help="Extra trackers beside metrics.jsonl: tensorboard,wandb,mlflow."),
    timings: bool = typer.Option(False, help="Print the run's seconds per phase (sampling, scoring, backward, evaluation, "
                                             "I/O) at the end; they are always recorded in --out/phases.json."),
) -> None:
    """Train a policy toward the config's target with the config's algorithm.

    ``--resume`` continues the run in --out with CONFIG (and --steps / --seed) only when that resolves to the
    run's own config.yaml; otherwise it stops with the differing keys, unless ``--accept-config`` (see
    tiltlm.train.rundir). Raising --steps to extend a finished or started run is not a change that needs the
    flag when the learning rate is constant: the steps taken are those of a run started with the larger
    number, so config.yaml, rewritten with it, describes the whole run."""
    from tiltlm.distributed.dist import init_from_env, leave_group
    from tiltlm.train.build import fit
    from tiltlm.train.config import load_config, parse_config

    if accept_config and not resume:
        raise TiltlmError("--accept-config continues an existing run with a changed config; add --resume, or drop --accept-config")
    _quiet_transformers()
    world = init_from_env()  # under torchrun / accelerate launch: join the data-parallel group (else 1 process)
    cfg = load_config(config)
    if steps is not None or seed is not None:
        data = cfg.model_dump()
        if steps is not None:
            data["optim"]["steps"] = steps
        if seed is not None:
            data["seed"] = seed
        cfg = parse_config(data)
    trainer, rows = fit(cfg, out, resume=resume, accept_config=accept_config, log=log, progress=sys.stderr.isatty())
    leave_group(world)
    if world.is_main:
        from tiltlm.reuse import describe

        if trainer.run_dir.changes:
            console.print(f"config changed from step {trainer.run_dir.changed_at}: {describe(trainer.run_dir.changes)} "
                          f"(config.yaml rewritten; recorded in {out / 'config_changes.jsonl'})", markup=False, highlight=False)
        if rows:
            last = rows[-1]
            from tiltlm.metrics.batch import kl_text

            console.print(f"done: {trainer.step} steps; reward {last.get('reward/mean', float('nan')):.4f}, "
                          f"{kl_text(last)} (last batch); policy saved to {out / 'policy'}", markup=False, highlight=False)
        else:
            console.print(f"done: the run was already at step {trainer.step}; policy in {out / 'policy'}")
        if timings:
            from tiltlm.train.timing import format_phases, sum_phases

            console.print(format_phases(sum_phases([out])), markup=False, highlight=False)
    if world.size > 1:
        # everything is written and the group is left: skip the interpreter's teardown, where a rank of a sharded
        # run intermittently aborted ("terminate called without an active exception", seen ~1 in 8 FSDP launches
        # on 2 gloo ranks), which made torchrun report a finished run as failed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="YAML sweep config: base (a training config) + grid {algorithms, betas, seeds}."),
    out: Path = typer.Option(..., help="Sweep directory; re-running it skips finished cells and resumes started ones."),
    log: Optional[str] = typer.Option(None, help="Extra trackers per cell: tensorboard,wandb,mlflow."),
    overwrite: bool = typer.Option(False, help="Re-run, from scratch, the cells in --out that the sweep.yaml there describes "
                                               "differently from CONFIG (only cells it names are deleted)."),
) -> None:
    """Matched-compute grid of algorithms × beta × seeds; results.jsonl and summary.csv (mean, std over seeds).

    A re-run into the same --out must have the same config as its sweep.yaml or only add cells to the grid;
    anything else is refused with the differing keys unless --overwrite (tiltlm.experiments.sweep)."""
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import run_sweep

    _quiet_transformers()
    run_sweep(config, out, progress=sys.stderr.isatty(), on_cell=lambda name: console.print(f"finished {name}"), log=log,
              overwrite=overwrite)
    console.print(f"report: {write_report(out)}")
    _print_pass_at_k(out)
    console.print(f"results: {out / 'results.jsonl'}, summary: {out / 'summary.csv'}")


def _print_pass_at_k(run_dir: Path) -> None:
    """The report's held-out pass@k table (pi0 at step 0, each configuration's last evaluation), when there is one."""
    from tiltlm.experiments.report import pass_at_k_table

    found = pass_at_k_table(run_dir)
    if found is None:
        return
    headers, rows, sentences = found
    table = Table(*headers, title="pass@k on held-out prompts (π0 = step 0; mean over seeds)")
    for column in table.columns[1:]:
        column.justify, column.overflow = "right", "fold"
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if sentences:
        console.print(" ".join(sentences), markup=False, highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A sweep directory, lm/, testbed/ or overopt_exact/ / overopt_lm/ of a run, or the --out of tiltlm train.")) -> None:
    """Write DIR/report/report.html (frontier, divergence, diversity and, with held-out evaluations, pass@k figures and tables)
    and print the pass@k table."""
    from tiltlm.experiments.report import write_report

    console.print(f"report: {write_report(run_dir)}")
    if (run_dir / "study.json").is_file() and (run_dir / "curves.jsonl").is_file():  # an overopt part: its verdict
        for sentence in json.loads((run_dir / "verdict.json").read_text())["sentences"]:
            console.print("  " + sentence, markup=False, highlight=False)
        return
    _print_pass_at_k(run_dir)


@app.command()
def sample(
    model: str = typer.Option("default", help="'default' or a save_pretrained directory."),
    context: str = typer.Option("", help="Context to continue ('' = just BOS)."),
    n: int = typer.Option(8, "-n", help="Number of samples."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(1.0),
    top_p: float = typer.Option(1.0),
    sampler: str = typer.Option("gumbel", help="gumbel (the default stream) or inverse-cdf (faster; other samples for a seed)."),
    reward: Optional[str] = typer.Option(None, help="Also score each sample with this reward spec."),
    reward_timeout: float = typer.Option(REWARD_TIMEOUT_S, help="Seconds the reward may take (0: no limit)."),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Write samples as JSONL here."),
) -> None:
    """Sample from a model and print each text with its log-prob (and reward)."""
    from tiltlm.policies import HFPolicy
    from tiltlm.policies.base import check_batch_size, check_sampler
    from tiltlm.rewards import get_reward

    check_sampler(sampler)
    if out is not None:  # said before sampling, not after
        check_file_destination(out, "--out")
    _check_count(n, "-n", "samples")
    _check_seed(seed, 1)
    _quiet_transformers()
    scorer = get_reward(reward).limited(_limit(reward_timeout)) if reward else None
    policy = HFPolicy.from_pretrained(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, sampler=sampler)
    check_batch_size(policy, n, max_new_tokens, rows_name="-n", tokens_name="--max-new-tokens")
    s = policy.sample([context], n, seed=seed)
    rewards = scorer(s.texts, [context] * n).tolist() if scorer else [None] * n
    rows = [{"context": context, "text": t, "logp": lp, "tokens": int(k), "eos": bool(e), "reward": r}
            for t, lp, k, e, r in zip(s.texts, s.logp.tolist(), s.lengths.tolist(), s.eos.tolist(), rewards)]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    table = Table("logp", "tokens", *(["reward"] if scorer else []), "text", show_lines=True)
    for r in rows:
        table.add_row(f"{r['logp']:.2f}", f"{r['tokens']}{'' if r['eos'] else '+'}", *([f"{r['reward']:.3f}"] if scorer else []), r["text"])
    console.print(table)


EVAL_NEW_TOKENS = 64  # tiltlm eval's default --max-new-tokens, where the model's window allows it


def _fit_new_tokens(policy, prompts: list[str]) -> int:
    """EVAL_NEW_TOKENS, or what the model's window leaves after the longest prompt (with a note on stderr)."""
    window = policy.window
    if window is None:
        return EVAL_NEW_TOKENS
    longest = max(len(policy.encode_context(p)) for p in prompts)  # one token must fit: a longer prompt is refused here
    fitted = min(EVAL_NEW_TOKENS, window - longest)
    if fitted < EVAL_NEW_TOKENS:
        print(f"note: --max-new-tokens {fitted}: the default {EVAL_NEW_TOKENS} does not fit the model's window of {window} tokens "
              f"after the longest prompt ({longest} tokens); pass --max-new-tokens to choose", file=sys.stderr)
    return fitted


@app.command(name="eval")
def eval_(
    model: str = typer.Option(..., help="The policy: 'default' (embedded) or a save_pretrained directory."),
    data: Path = typer.Option(..., help="Prompts: a .jsonl / .csv / .parquet file or a datasets.save_to_disk directory."),
    reward: str = typer.Option(..., help="Reward spec (any that train accepts); a file.py:function gets the rows' other columns as keyword lists."),
    n: int = typer.Option(8, "-n", help="Completions per prompt (pass@k for k = 1, 2, 4, … and N)."),
    seed: int = typer.Option(0),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help=f"Length limit of a completion (default {EVAL_NEW_TOKENS}, "
                                                 "or what the model's window leaves after the longest prompt, with a note)."),
    temperature: float = typer.Option(1.0),
    prompt_column: str = typer.Option("prompt", help="The column holding the prompts (text or chat messages)."),
    prior: Optional[str] = typer.Option(None, help="Also estimate KL(pi||pi0) against this prior (a model directory)."),
    chat: bool = typer.Option(False, "--chat", help="Render each prompt with the tokenizer's chat template."),
    reward_timeout: float = typer.Option(REWARD_TIMEOUT_S, help="Seconds one reward call (a batch of prompts) may take (0: no limit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Sample N completions per held-out prompt and report mean reward, pass@k and distinct correct answers."""
    from tiltlm.data import load_prompts
    from tiltlm.evaluate import evaluate
    from tiltlm.policies import HFPolicy
    from tiltlm.policies.base import check_batch_size
    from tiltlm.rewards import get_reward

    if n < 1:
        raise TiltlmError(f"-n must be >= 1 (got {n}); pass@k needs at least one completion per prompt")
    _check_seed(seed, 1_000_003)
    # the prompt as-is (BOS prepended) unless --chat: then the tokenizer's chat template renders it as the user's turn
    options = dict(max_new_tokens=max_new_tokens or 1, temperature=temperature, chat_template=chat)
    _quiet_transformers()
    prompts = load_prompts(data, prompt_column=prompt_column)
    scorer = get_reward(reward).limited(_limit(reward_timeout))
    scorer.check_rows(prompts.columns, [f"{prompts.numbered_as} {i}" for i in prompts.numbers], prompts.source)
    policy = HFPolicy.from_pretrained(model, **options)
    if max_new_tokens is None:  # the default, fitted to the model's window
        max_new_tokens = options["max_new_tokens"] = policy.max_new_tokens = _fit_new_tokens(policy, prompts.prompts)
    check_batch_size(policy, min(len(prompts), 64) * n, max_new_tokens, rows_name="-n",
                     tokens_name="--max-new-tokens")  # evaluate() samples 64 prompts at a time
    pi0 = HFPolicy.from_pretrained(prior, **options) if prior else None
    result = evaluate(policy, prompts, scorer, n=n, seed=seed, prior=pi0).to_json()
    if as_json:
        print(json.dumps(result))
        return
    table = Table("quantity", "value", title=f"{model} on {data} ({result['n_prompts']} prompts × {n}), r = {reward}")
    for key in ("n_prompts", "n_samples", "mean_reward", "distinct_correct", *(["kl_prior"] if pi0 else [])):
        # the k1 estimate of KL(pi||pi0) (mean log-ratio of the samples): unbiased, and below 0 when pi is near pi0
        table.add_row("kl_prior (k1 estimate, may be < 0)" if key == "kl_prior" else key, _fmt(result[key]))
    for k, v in result["pass_at_k"].items():
        table.add_row(f"pass@{k}", _fmt(v))
    console.print(table)


@app.command()
def exact(
    prior: str = typer.Option(..., help="Prior: a small-vocabulary save_pretrained directory."),
    reward: str = typer.Option(..., help="Reward spec."),
    beta: float = typer.Option(..., help="Tilt temperature (> 0)."),
    max_new_tokens: int = typer.Option(..., help="Length limit L of the sample space."),
    policy: Optional[str] = typer.Option(None, help="A policy directory to compare with p*."),
    context: str = typer.Option("", help="Context ('' = just BOS)."),
    max_sequences: int = typer.Option(2_000_000, help="Refuse spaces larger than this."),
    reward_timeout: float = typer.Option(REWARD_TIMEOUT_S, help="Seconds the reward may take on the whole space (0: no limit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Enumerate the whole sample space and compute log Z, KLs, TV, entropies and rewards exactly."""
    from tiltlm.exact import enumerate_space, exact_report
    from tiltlm.policies import HFPolicy
    from tiltlm.rewards import get_reward
    from tiltlm.targets import Prior, Tilt

    _check_count(max_new_tokens, "--max-new-tokens", "tokens")
    _check_count(max_sequences, "--max-sequences", "sequences")
    _quiet_transformers()
    start = time.perf_counter()
    tilt = Tilt(get_reward(reward).limited(_limit(reward_timeout)), beta)
    pi0 = HFPolicy.from_pretrained(prior, max_new_tokens=max_new_tokens)
    pi = HFPolicy.from_pretrained(policy, max_new_tokens=max_new_tokens) if policy else None
    space = enumerate_space(pi0, context=context, max_sequences=max_sequences)
    report = exact_report(space, Prior(pi0) * tilt, pi)
    report["seconds"] = time.perf_counter() - start
    if as_json:
        print(json.dumps(report))
        return
    table = Table("quantity", "value")
    for k, v in report.items():
        table.add_row(k, _fmt(v))
    console.print(table)


@app.command()
def testbed(
    out: Path = typer.Argument(..., help="Directory to write the model into."),
    vocab_size: int = typer.Option(8, help="Tokens including EOS (letters a, b, … plus <eos>)."),
    layers: int = typer.Option(2),
    embd: int = typer.Option(32),
    heads: int = typer.Option(2),
    seed: int = typer.Option(0),
    train_steps: int = typer.Option(0, help="Fit to a seeded random Markov chain for this many steps (0 = random init)."),
    overwrite: bool = typer.Option(False, help="Replace a testbed with other parameters in OUT (never a directory tiltlm did not write)."),
) -> None:
    """Create a small-vocabulary GPT-2 whose sample space `tiltlm exact` can enumerate. OUT already holding a testbed
    with these parameters is left as it is; another testbed is replaced only with --overwrite."""
    from tiltlm.testbed import make_testbed

    check_file_destination(out, "the testbed directory", directory=True)
    _quiet_transformers()
    make_testbed(out, vocab_size=vocab_size, n_layer=layers, n_embd=embd, n_head=heads, seed=seed, train_steps=train_steps,
                 overwrite=overwrite, log=lambda line: console.print(line, markup=False, highlight=False))


@app.command()
def pretrain(
    out: Path = typer.Option(Path("pretrained"), help="Where to save the model and tokenizer."),
    steps: int = typer.Option(1000, help="Optimiser steps (the shipped model: 1000)."),
    n_stories: int = typer.Option(60000, help="Training stories from the grammar (the shipped model: 60000)."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace a model pretrained with other parameters in --out (never a directory "
                                               "tiltlm did not write)."),
) -> None:
    """Re-train the embedded default LM from tiltlm's story grammar (about 13 minutes on 2 idle CPU cores). An --out
    that already holds a model pretrained with these parameters is left as it is; another one is replaced only
    with --overwrite."""
    from tiltlm.pretrain import pretrain as run_pretrain

    check_file_destination(out, "--out", directory=True)
    _quiet_transformers()
    info = run_pretrain(out, n_stories=n_stories, steps=steps, seed=seed, log=console.print, overwrite=overwrite)
    console.print(f"model in {out}: {info['parameters']:,} parameters, held-out loss {info['heldout_loss']:.4f}")


@app.command()
def chat(
    model: str = typer.Option("default", help="The policy: 'default' (embedded) or a save_pretrained directory."),
    out: Path = typer.Option(Path("chats.jsonl"), help="Recorded games, one JSON line appended per game (DialogueEnv(human_answers=...) reads it)."),
    secret: Optional[str] = typer.Option(None, help="The secret animal (default: you are asked for it, the model never sees it)."),
    episodes: int = typer.Option(1, min=1, help="Games to play."),
    max_turns: int = typer.Option(4, min=1, help="Model utterances per game."),
    max_action_tokens: int = typer.Option(16, min=1, help="Tokens per model utterance."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (default: from the clock)."),
) -> None:
    """Play the dialogue game (twenty questions) against the model: you keep an animal secret and answer its questions."""
    from tiltlm.envs.dialogue import THINGS, append_jsonl, canonical_thing, play_chat, timestamp
    from tiltlm.envs.rollout import episode_seed
    from tiltlm.policies import HFPolicy

    def pick(name: str) -> str | None:
        thing = canonical_thing(name)
        return thing if thing in THINGS else None

    check_file_destination(out, "--out")  # before the games, which would be lost
    if secret is not None and pick(secret) is None:
        raise TiltlmError(f"--secret '{secret}' is not an animal the game knows; choose from: {', '.join(THINGS)}")
    _quiet_transformers()
    policy = HFPolicy.from_pretrained(model, max_new_tokens=max_action_tokens)
    seed = int(time.time()) % 2**31 if seed is None else seed
    for game in range(episodes):
        thing = pick(secret) if secret is not None else None
        while thing is None:
            typed = typer.prompt(f"Think of an animal ({', '.join(THINGS)}) and type it; the model does not see it")
            thing = pick(typed)
            if thing is None:
                typer.echo(f"'{typed}' is not one of the animals listed; try again")
        record = play_chat(policy, secret=thing, ask=lambda text: typer.prompt(text, default="", show_default=False),
                           tell=typer.echo, max_turns=max_turns, seed=episode_seed(seed, game), max_action_tokens=max_action_tokens)
        record["success"] = typer.confirm("Did the model guess your animal?", default=record.pop("guessed"))
        rating = None
        while rating not in (1, 2, 3, 4, 5):
            rating = typer.prompt("Rate the conversation from 1 (bad) to 5 (good)", type=int)
        record["rating"] = rating
        record.update(model=model, seed=episode_seed(seed, game), timestamp=timestamp())
        append_jsonl(out, record)
        typer.echo(f"game {game + 1} of {episodes} appended to {out}")


@app.command()
def preferences(
    gold: str = typer.Option(..., help="The gold reward g (any reward spec) whose Bradley–Terry model labels the pairs."),
    pairs: int = typer.Option(..., help="Labelled pairs in total, spread evenly over the prompts."),
    out: Path = typer.Option(..., help="JSONL file to write (prompt, chosen, rejected, gold_chosen, gold_rejected, p_chosen)."),
    prior: str = typer.Option("default", help="The model the completions are sampled from: 'default' or a save_pretrained directory."),
    data: Optional[Path] = typer.Option(None, help="Prompts: a .jsonl / .csv / .parquet file or a datasets.save_to_disk directory."),
    context: Optional[list[str]] = typer.Option(None, help="A prompt (repeat for several; default: just BOS). Not with --data."),
    prompt_column: str = typer.Option("prompt", help="With --data: the column holding the prompts."),
    tau: float = typer.Option(1.0, help="Label temperature: P(a ≻ b) = σ((g(a) − g(b))/tau)."),
    labels: str = typer.Option("bernoulli", help="bernoulli: each label drawn from P(a ≻ b); argmax: the larger g wins (ties by a coin)."),
    no_ties: bool = typer.Option(False, "--no-ties", help="Draw only pairs the gold tells apart (g(a) ≠ g(b))."),
    seed: int = typer.Option(0, help="Seeds the completions and the labels."),
    max_new_tokens: int = typer.Option(32, min=1, help="Length limit of a completion."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the prior."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Render prompts with the tokenizer's chat template "
                                        "(default: when it has one)."),
) -> None:
    """Synthetic preferences of known quality: pairs of the prior's completions per prompt, labelled by the
    Bradley–Terry model of a gold reward (docs/math.md §15); prints how often the labels agree with the gold."""
    from tiltlm.preferences import run_preferences

    check_file_destination(out, "--out")
    _check_seed(seed, 1_000_003)
    _quiet_transformers()
    line = run_preferences(out, gold=gold, pairs=pairs, prior=prior, data=data, contexts=context, prompt_column=prompt_column,
                           tau=tau, seed=seed, labels=labels, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
                           no_ties=no_ties)
    console.print(line, markup=False, highlight=False)


reward_model_app = typer.Typer(no_args_is_help=True, help="Reward models: Bradley–Terry fits on preference pairs.")
app.add_typer(reward_model_app, name="reward-model")


@reward_model_app.command(name="train")
def reward_model_train(
    config: Path = typer.Argument(..., help="YAML reward-model config (see docs/config.md)."),
    out: Path = typer.Option(..., help="The reward model's save_pretrained directory (model, tokenizer, training.json)."),
    overwrite: bool = typer.Option(False, help="Replace a reward model trained with another config in --out (never a directory "
                                               "tiltlm did not write)."),
) -> None:
    """Fit a Bradley–Terry reward model (a base LM with a one-output score head) on preference pairs; prints the
    held-out pairwise accuracy with its Wilson 95% interval. Score with it as the reward `rm:OUT`."""
    from tiltlm.rmtrain import load_rm_config, train_reward_model

    cfg = load_rm_config(config)
    check_file_destination(out, "--out", directory=True)
    _quiet_transformers()
    m = train_reward_model(cfg, out, overwrite=overwrite, log=lambda line: console.print(line, markup=False, highlight=False))["metrics"]
    console.print(f"done: {m['steps']} steps on {m['train/pairs']} pairs; held-out pairwise accuracy {m['eval/accuracy']:.3f} "
                  f"[{m['eval/accuracy_low']:.3f}, {m['eval/accuracy_high']:.3f}] (Wilson 95%, {m['eval/correct']}/{m['eval/pairs']}; "
                  f"untrained {m['eval/accuracy_start']:.3f}); reward model in {out} (reward rm:{out})", markup=False, highlight=False)


def usage_error(e: typer.TyperException) -> str:
    """click's (typer's) usage error as the one line ``<problem>; <fix>`` (instead of its boxed usage panel)."""
    message = " ".join((e.format_message() if hasattr(e, "format_message") else str(e)).split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    where = f"`{ctx.command_path} --help`" if ctx is not None else "`tiltlm --help`"
    return f"{message}; run {where} for the usage"


def main() -> None:
    """Entry point: user errors become one line and exit code 2."""
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write fails with EFBIG (one line below) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        from tiltlm.threads import configure_threads

        configure_threads()  # the free cores, not the machine's: no oversubscription beside busy neighbours
        code = app(standalone_mode=False, prog_name="tiltlm")  # click's usage errors come here, to be one line like every other mistake
        if isinstance(code, int) and not isinstance(code, bool) and code:  # typer.Exit(code) / Ctrl-C (130)
            sys.exit(code)
    except typer.TyperException as e:  # a usage error: a bad option value, an unknown option, a missing argument
        print(f"error: {usage_error(e)}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except TiltlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the machine, not tiltlm: a full or read-only disk, a path under a file, permissions
        from tiltlm.io import describe_os_error

        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
