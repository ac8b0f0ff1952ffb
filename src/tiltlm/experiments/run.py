"""`tiltlm run`, the main job: does RL with a verifier narrow the model, and does the posterior keep its breadth?

By default (``task="quiz"``) two parts, each a directory of training runs with its own report:

1. ``rlvr/``: the RLVR study (tiltlm.experiments.rlvr) on the embedded default prior and its quiz — reinforce, kl-pg
   at two betas, dpg toward pi0·1[correct] and best-of-n, pass@k on held-out questions;
2. ``exact/``: the same study on an enumerable testbed, where pass@k and KL(p*(·|x)‖pi(·|x)) are exact.

``task="sentiment"`` is the earlier reward–KL comparison (``lm/`` and ``testbed/``: reinforce, kl-pg at several beta,
dpg, gdc++, importance resampling, best-of-n toward the sentiment tilt); ``interactive`` adds ``interactive/``. The
top-level ``report.html`` (`write_index`) leads with the pass@k figure and the computed verdict. Everything is written
into a temporary directory renamed at the end; ``budget`` scales the steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from tiltlm.errors import TiltlmError
from tiltlm.experiments.rlvr import STUDY_OPTIM
from tiltlm.io import atomic_write_text, check_file_destination, replace_dir


def lm_sweep(prior: str, reward: str, betas: list[float], main_beta: float, steps: int, seed: int) -> dict:
    return {
        "base": {"prior": prior, "target": {"reward": reward},
                 "sampling": {"contexts": [""], "n_per_context": 16, "max_new_tokens": 32},
                 "optim": {**STUDY_OPTIM, "steps": steps, "lr": 1e-4}, "checkpoint": {"every": 10}},
        "grid": {"betas": betas, "seeds": [seed], "algorithms": [
            {"name": "reinforce", "betas": [main_beta]},
            {"name": "kl-pg"},
            {"name": "dpg", "label": "dpg", "baseline": False, "betas": [main_beta]},
            {"name": "gdc++", "betas": [main_beta]},
        ]},
    }


def testbed_sweep(prior: str, betas: list[float], main_beta: float, steps: int, seed: int) -> dict:
    return {
        "base": {"prior": prior, "target": {"reward": "count:a"},
                 "sampling": {"n_per_context": 32, "max_new_tokens": 4},
                 "optim": {**STUDY_OPTIM, "steps": steps, "lr": 3e-3}, "metrics": {"exact_every": max(1, steps // 10)},
                 "checkpoint": {"every": 20}},
        "grid": {"betas": betas, "seeds": [seed], "algorithms": [
            {"name": "reinforce", "betas": [main_beta]},
            {"name": "kl-pg"},
            {"name": "dpg", "label": "dpg", "baseline": False, "betas": [main_beta]},
            {"name": "gdc++", "betas": [main_beta]},
        ]},
    }


def tabular_env_sweep(stochasticity: float, steps: int, seed: int) -> dict:
    """DPG (forward KL) vs KL-PG (reverse KL) on a depth-2 tabular env, exact metrics against both optima."""
    return {
        "base": {"env": {"name": "tabular", "options": {"depth": 2, "seed": 3, "reward_scale": 2.0, "stochasticity": stochasticity},
                         "timeout_s": None},
                 "sampling": {"n_per_context": 64}, "optim": {**STUDY_OPTIM, "steps": steps, "lr": 0.05, "schedule": "linear"},
                 "metrics": {"exact_every": max(1, steps // 10), "diversity": False}, "checkpoint": {"every": 100}},
        "grid": {"betas": [1.0], "seeds": [seed], "algorithms": [{"name": "dpg", "label": "dpg", "baseline": False}, "kl-pg", {"name": "reinforce"}]},
    }


DIALOGUE_THINGS = ("owl", "frog", "lion", "duck")


def dialogue_sweep(prior: str, steps: int, seed: int, beta: float = 0.05) -> dict:
    """Twenty questions with the simulated human: success is the reward (binary), per-turn KL to pi0.

    The secrets are animals the story prior rarely names (pi0 wins ~6% of two-turn games), so the gap
    between pi0, a policy that collapses onto one guess, and a posterior that spreads its guesses shows.
    """
    return {
        "base": {"prior": prior, "env": {"name": "dialogue", "options": {"retry_cue": True, "max_turns": 2, "things": list(DIALOGUE_THINGS)},
                                         "tasks_per_step": 4, "max_action_tokens": 5},
                 "sampling": {"n_per_context": 8}, "optim": {**STUDY_OPTIM, "steps": steps, "lr": 2e-4}, "checkpoint": {"every": 10},
                 "metrics": {"diversity": False}},
        "grid": {"betas": [beta], "seeds": [seed], "algorithms": ["kl-pg", {"name": "dpg", "label": "dpg", "baseline": False}, "reinforce"]},
    }


def evaluate_env_cells(sweep_dir: Path, config: dict, beta: float, episodes_per_task: int, seed: int) -> None:
    """pi0 and every trained cell's final policy on every task with the same episode seeds; appended to
    results.jsonl as '<algorithm> eval' cells (success rate, return, per-turn KL, distinct first actions)."""
    from tiltlm.envs import get_env, rollout
    from tiltlm.metrics.episodes import eval_episode_metrics
    from tiltlm.policies import HFPolicy

    env_cfg = config["base"]["env"]
    prior = HFPolicy.from_pretrained(config["base"].get("prior", "default"))
    policies = [("prior", "prior eval", None, prior)]
    for done in sorted(sweep_dir.glob("cells/*/done.json")):
        cell = done.parent
        algorithm = yaml.safe_load((cell / "config.yaml").read_text())["algorithm"]["name"]
        policies.append((cell.name, f"{algorithm} eval", beta, HFPolicy.from_pretrained(cell / "policy")))
    records, texts = [], {}
    with get_env(env_cfg["name"], **env_cfg.get("options", {})) as env:
        for name, algorithm, b, policy in policies:
            samples = rollout(policy, env, env.tasks(), episodes_per_task, seed=seed + 1_000, max_action_tokens=env_cfg["max_action_tokens"])
            trajs = samples.trajectories
            log_ratio = (policy.log_prob(samples, per_token=True) - prior.log_prob(samples, per_token=True)).double()
            final = {**eval_episode_metrics(samples, log_ratio),
                     "kl/prior_seq": float(log_ratio.sum(-1).mean()), "eval/episodes": len(trajs)}
            records.append({"cell": f"{name}_eval", "algorithm": algorithm, "beta": b, "seed": seed, "final": final})
            texts[f"{name} (eval)"] = [t.transcript().replace("\n", " | ") for t in trajs[:: max(1, len(trajs) // 6)]][:6]
    with open(sweep_dir / "results.jsonl", "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    _add_samples(sweep_dir, texts)


def exact_env_optima(sweep_dir: Path, config: dict) -> None:
    """exact_env.json: the two exact optima of the sweep's tabular env (Q at the root, their KLs, log Z)."""
    from tiltlm.envs import get_env
    from tiltlm.exact import mdp

    env = get_env("tabular", **config["base"]["env"]["options"])
    log_prior = env.make_prior().log_action_probs()
    out = {}
    for beta in config["grid"]["betas"]:
        opt, var = (mdp.solve(env, log_prior, beta, kind) for kind in ("optimistic", "variational"))
        out[f"{beta:g}"] = {
            "deterministic": env.deterministic,
            "q_root_optimistic": opt.q_reward[0].tolist(), "q_root_variational": var.q_reward[0].tolist(),
            "kl_variational_optimistic": mdp.trajectory_kl(env, var.log_policy, opt.log_policy),
            "kl_optimistic_variational": mdp.trajectory_kl(env, opt.log_policy, var.log_policy),
            "log_z": float(opt.v[0]),
        }
    (sweep_dir / "exact_env.json").write_text(json.dumps(out, indent=1))


def inference_baselines(sweep_dir: Path, config: dict, beta: float, budget_samples: int, seed: int, n_show: int = 8) -> None:
    """Best-of-n and importance resampling with the cells' sample budget; appended to results.jsonl as cells."""
    from tiltlm.algorithms.inference import best_of_n, importance_resample
    from tiltlm.metrics.divergences import kl_target_policy
    from tiltlm.metrics.diversity import distinct_n, self_bleu
    from tiltlm.policies import HFPolicy
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import target_from_config

    data = json.loads(json.dumps(config["base"]))
    data["target"]["beta"] = beta
    data["algorithm"] = "dpg"  # any name: only the prior and the target are built from this config
    cfg = parse_config(data)
    s = cfg.sampling
    target = target_from_config(cfg, HFPolicy.from_pretrained(cfg.prior, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p))
    contexts = list(cfg.sampling.contexts)
    per_context = max(2, budget_samples // len(contexts))
    records, texts = [], {}
    sir = importance_resample(target, None, contexts, per_context, 64, seed)
    bon = best_of_n(target.tilt.reward, target.prior, contexts, 4, max(2, per_context // 4), seed)
    prior_samples = target.prior.sample(contexts, 64, seed=seed + 7)
    texts["prior"] = prior_samples.texts[:n_show]
    for name, result in (("importance-sampling", sir), ("best-of-4", bon)):
        s = result.samples
        r = target.tilt.reward(s.texts)
        final = {"reward/mean": float(r.mean()), "diversity/distinct_1": distinct_n(s.texts, 1),
                 "diversity/distinct_2": distinct_n(s.texts, 2), "diversity/self_bleu": self_bleu(s.texts),
                 "samples/seen": result.n_proposals, **{f"inference/{k}": v for k, v in result.as_dict().items() if isinstance(v, (int, float))}}
        if name == "best-of-4":
            final["kl/prior_seq_bound"] = math.log(4) - 3 / 4  # KL(best-of-n || pi0) <= log n - (n-1)/n
        records.append({"cell": f"{name}_beta{beta:g}", "algorithm": name, "beta": beta, "seed": seed, "final": final})
        texts["posterior" if name == "importance-sampling" else name] = s.texts[:n_show]
    lp = prior_samples.logp.double()
    lt = target.log_score(prior_samples, prior_logp=lp)
    records[0]["final"]["kl/target_prior_is"] = kl_target_policy(lt, lp, lp).value
    with open(sweep_dir / "results.jsonl", "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    _add_samples(sweep_dir, texts)


def policy_samples(sweep_dir: Path, n_show: int = 8, seed: int = 0) -> None:
    """A few texts from each trained cell's final policy, for the side-by-side table."""
    from tiltlm.policies import HFPolicy

    texts = {}
    for done in sorted(sweep_dir.glob("cells/*/done.json")):
        cell = done.parent
        config = yaml.safe_load((cell / "config.yaml").read_text())
        policy = HFPolicy.from_pretrained(cell / "policy", max_new_tokens=config["sampling"]["max_new_tokens"])
        texts[cell.name] = policy.sample(list(config["sampling"]["contexts"])[:1], n_show, seed=seed).texts
    _add_samples(sweep_dir, texts)


def _add_samples(sweep_dir: Path, texts: dict) -> None:
    path = sweep_dir / "samples.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(texts)
    path.write_text(json.dumps(current, indent=1))


def exact_targets(sweep_dir: Path, prior: str, betas: list[float], max_new_tokens: int) -> None:
    """exact.json: p*'s exact numbers for each beta (log Z, reward, entropy, KL to the prior)."""
    from tiltlm.exact import enumerate_space, exact_report
    from tiltlm.policies import HFPolicy
    from tiltlm.targets import Prior, Tilt

    pi0 = HFPolicy.from_pretrained(prior, max_new_tokens=max_new_tokens)
    space = enumerate_space(pi0)
    reports = {f"{b:g}": exact_report(space, Prior(pi0) * Tilt("count:a", b)) for b in betas}
    (sweep_dir / "exact.json").write_text(json.dumps(reports, indent=1))


def run_main(
    out: str | Path,
    *,
    task: str = "quiz",
    prior: str = "default",
    reward: str | None = None,
    betas: tuple[float, ...] | None = None,
    main_beta: float = 0.2,
    budget: float = 1.0,
    seeds: tuple[int, ...] = (0,),
    overwrite: bool = False,
    interactive: bool = False,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The main job into ``out`` (atomically: a temporary directory renamed at the end).

    ``task`` "quiz" (default): the RLVR study (tiltlm.experiments.rlvr) on ``prior`` and its exact twin on a testbed;
    "letters": the exact twin alone;
    "reasoning-gym:<name>" or a prompt file: the same study on that task (``reward`` the verifier); "sentiment": the
    reward–KL comparison on the story prior and an exact testbed (``reward`` default sentiment, kl-pg at ``betas``,
    the rest at ``main_beta``). ``interactive`` adds the interactive part. ``budget`` scales every part's steps.
    ``workers``: training processes at once in the RLVR study (default: the usable cores)."""
    from tiltlm.experiments import rlvr

    out = check_file_destination(out, "--out", directory=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TiltlmError(f"output directory '{out}' is not empty; pass --overwrite or choose another --out")
    if overwrite and out.exists() and any(out.iterdir()) and not (out / "run.json").is_file():
        raise TiltlmError(f"'{out}' is not the results of a tiltlm run (no run.json), and --overwrite only replaces those; "
                          "choose another --out")
    if not (budget > 0 and math.isfinite(budget)):
        raise TiltlmError(f"--budget must be a positive number (got {budget}); 1.0 is the default run")
    if not seeds or len(set(seeds)) != len(seeds):
        raise TiltlmError(f"--seeds needs distinct seeds (got {list(seeds)}), e.g. --seeds 0 or --seeds 0,1,2")
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)).resolve()  # absolute: configs name paths in it
    parts: list[dict] = []

    def part(name: str, title: str, fn: Callable[[], None]) -> None:
        t = time.time()
        log(f"part {len(parts) + 1}: {title}")
        fn()
        parts.append({"dir": name, "title": title, "seconds": round(time.time() - t, 1)})
        log(f"  part {len(parts)} finished in {time.time() - t:.0f} s")

    try:
        if task == "sentiment":
            betas = betas or (0.05, 0.2, 1.0)
            if main_beta not in betas:
                raise TiltlmError(f"the main beta {main_beta} must be one of the betas {list(betas)}")
            with rlvr.one_thread():  # one thread: the same numbers on every machine (floats reduce in one order)
                part("lm", f"{prior} prior, reward {reward or 'sentiment'}: reward–KL at matched samples",
                     lambda: lm_part(work / "lm", prior, reward or "sentiment", betas, main_beta, budget, seeds[0], log))
                part("testbed", "exact testbed, reward count:a", lambda: testbed_part(work / "testbed", budget, seeds[0], log))
        elif task == "letters":
            betas = betas or (0.1, 1.0)
            exact_task = rlvr.letters_task(work / "exact", seeds[0])
            part("exact", "RLVR on an enumerable testbed (exact pass@k and KL to p*(·|x))",
                 lambda: rlvr.run_study(work / "exact", exact_task, betas=betas, steps=max(2, round(80 * budget)), seeds=seeds,
                                        log=log, workers=workers))
        else:
            betas = betas or (0.1, 1.0)
            steps = max(2, round(60 * budget))
            the_task = rlvr.quiz_task(work / "rlvr", prior) if task == "quiz" else rlvr.user_task(task, work / "rlvr", prior, reward)
            part("rlvr", f"RLVR on {the_task.name} with {prior}: reinforce, kl-pg β={','.join(f'{b:g}' for b in betas)}, dpg; "
                         f"{steps} steps, seeds {','.join(map(str, seeds))}",
                 lambda: rlvr.run_study(work / "rlvr", the_task, betas=betas, steps=steps, seeds=seeds, log=log, workers=workers))
            exact_task = rlvr.letters_task(work / "exact", seeds[0])
            part("exact", "the same study on an enumerable testbed (exact pass@k and KL to p*(·|x))",
                 lambda: rlvr.run_study(work / "exact", exact_task, betas=betas, steps=max(2, round(80 * budget)), seeds=seeds,
                                        log=log, workers=workers))
        if interactive:
            part("interactive", "the interactive case: tabular environments (exact) and twenty questions",
                 lambda: interactive_part(work / "interactive", prior, budget, seeds[0], log))
        summary = {"task": task, "prior": prior, "reward": reward, "betas": list(betas), "main_beta": main_beta,
                   "budget": budget, "seeds": list(seeds), "interactive": interactive, "parts": parts,
                   "seconds": round(time.time() - start, 1)}
        (work / "run.json").write_text(json.dumps(summary, indent=1))
        if out.exists() and any(out.iterdir()) and not (overwrite and (out / "run.json").is_file()):  # filled meanwhile: keep both
            kept = out.with_name(f"{out.name}.{os.getpid()}")
            relocate(work, kept)
            write_index(work, name=kept.name)
            work.rename(kept)
            raise TiltlmError(f"'{out}' was filled by another process while this run worked; this run's results are in "
                              f"'{kept}' (nothing was overwritten)")
        relocate(work, out)
        write_index(work, name=out.name)
        replace_dir(work, out)
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


def lm_part(root: Path, prior: str, reward: str, betas, main_beta: float, budget: float, seed: int, log) -> None:
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import run_sweep

    steps = max(2, round(60 * budget))
    cfg = lm_sweep(prior, reward, list(betas), main_beta, steps, seed)
    root.mkdir(parents=True)
    (root / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"  {steps} steps × 16 samples per cell")
    run_sweep(root / "sweep_config.yaml", root, on_cell=_cell_logger(log))
    inference_baselines(root, cfg, main_beta, steps * 16, seed)
    policy_samples(root, seed=seed)
    write_report(root)


def testbed_part(root: Path, budget: float, seed: int, log) -> None:
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import run_sweep
    from tiltlm.testbed import make_testbed

    steps = max(2, round(100 * budget))
    model = make_testbed(root / "model", vocab_size=5, n_layer=2, seed=seed, train_steps=100)
    betas = [1.0, 3.0]
    cfg = testbed_sweep(str(model), betas, 1.0, steps, seed)
    (root / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"  {steps} steps × 32 samples per cell")
    run_sweep(root / "sweep_config.yaml", root, on_cell=_cell_logger(log))
    exact_targets(root, str(model), betas, 4)
    policy_samples(root, seed=seed)
    write_report(root)


def _cell_logger(log):
    started = [time.time()]

    def on_cell(name: str) -> None:
        log(f"  finished {name} ({time.time() - started[0]:.0f} s)")
        started[0] = time.time()

    return on_cell


def interactive_part(root: Path, prior: str, budget: float, seed: int, log: Callable[[str], None]) -> None:
    """Part 3: the interactive case. Exact: DPG vs KL-PG on a stochastic and on a deterministic tabular env
    (each against the optimistic and the variational optimum). Text: twenty questions with the prior LM."""
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import run_sweep

    tab_steps, dlg_steps = max(2, round(300 * budget)), max(2, round(30 * budget))
    for name, stochasticity in (("tabular_stochastic", 1.0), ("tabular_deterministic", 0.0)):
        cfg = tabular_env_sweep(stochasticity, tab_steps, seed)
        (root / name).mkdir(parents=True)
        (root / name / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
        log(f"  tabular environment (stochasticity {stochasticity:g}), {tab_steps} steps × 64 episodes per cell")
        run_sweep(root / name / "sweep_config.yaml", root / name, on_cell=lambda n: log(f"  finished {n}"))
        exact_env_optima(root / name, cfg)
        write_report(root / name)
    cfg = dialogue_sweep(prior, dlg_steps, seed)
    (root / "dialogue").mkdir()
    (root / "dialogue" / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"  twenty questions with {prior}, {dlg_steps} steps × 32 episodes per cell")
    run_sweep(root / "dialogue" / "sweep_config.yaml", root / "dialogue", on_cell=lambda n: log(f"  finished {n}"))
    evaluate_env_cells(root / "dialogue", cfg, cfg["grid"]["betas"][0], episodes_per_task=32, seed=seed)
    write_report(root / "dialogue")


PART_LINKS = {
    "rlvr": "per-cell curves, the pass@k section and the samples of each trained policy",
    "exact": "the same comparison where pass@k and every divergence to p*(·|x) are exact",
    "lm": "reinforce vs kl-pg vs dpg/gdc++ vs inference baselines, estimated divergences",
    "testbed": "the same comparison where every divergence to p* is exact",
}


def write_index(run_dir: str | Path, name: str | None = None) -> Path:
    """The top-level report.html of a `tiltlm run` directory (from run.json and the parts' files; `tiltlm report DIR`
    rewrites it): for the RLVR study the pass@k figure and the computed verdict first, then the summary tables, the
    per-question numbers and links to each part's own report."""
    import html

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TiltlmError(f"'{run_dir}' has no readable run.json; pass the --out directory of a finished tiltlm run") from None
    body = []
    for p in summary.get("parts", []):
        if p["dir"] in ("rlvr", "exact"):
            body.append(_study_section(run_dir, p, headline=not body))
    if not body and summary.get("task", "sentiment") == "sentiment":
        body.append("<p>The reward–KL comparison: reinforce vs kl-pg at several β vs dpg/gdc++ vs inference baselines, at "
                    "matched samples (the parts' reports below have the frontier figures).</p>")
    links = "".join(f'<li><a href="{html.escape(p["dir"])}/report/report.html">Part {i}: {html.escape(p["title"])}</a> — '
                    f'{PART_LINKS.get(p["dir"], "")} ({p["seconds"]:.0f} s)</li>'
                    for i, p in enumerate(summary.get("parts", []), 1) if p["dir"] != "interactive")
    if summary.get("interactive"):
        links += _interactive_links()
    seeds = summary.get("seeds", [summary.get("seed", 0)])
    settings = (f"task <code>{html.escape(str(summary.get('task', 'sentiment')))}</code>, prior <code>{html.escape(str(summary['prior']))}</code>, "
                f"kl-pg β {', '.join(f'{b:g}' for b in summary['betas'])}, budget ×{summary['budget']:g}, seeds "
                f"{', '.join(map(str, seeds))}; {summary['seconds']:.0f} s in all")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tiltlm report: run {html.escape(name or run_dir.resolve().name)}</title>
<style>body{{font-family:sans-serif;max-width:64rem;margin:1.5rem auto;line-height:1.45;padding:0 1rem}}
table{{border-collapse:collapse;font-size:.9rem}}td,th{{border:1px solid #ccc;padding:.2rem .45rem}}td.num{{text-align:right}}
figure{{margin:.5rem 0}}img{{max-width:100%}}.verdict{{font-size:1.08rem;background:#f4f7fb;border-left:4px solid #1f77b4;padding:.5rem .8rem}}
.scroll{{overflow-x:auto}}</style></head><body>
<h1>tiltlm run: does RL with a verifier narrow the model?</h1>
{''.join(body)}
<h2>Details</h2>
<ul>{links}</ul>
<p>Settings: {settings}. Reproduce: <code>{html.escape(_command(summary))}</code></p>
</body></html>
"""
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def _command(summary: dict) -> str:
    parts = ["tiltlm run"]
    if summary.get("task", "quiz") != "quiz":
        parts.append(f"--task {summary['task']}")
    if summary.get("prior", "default") != "default":
        parts.append(f"--prior {summary['prior']}")
    if summary.get("budget", 1.0) != 1.0:
        parts.append(f"--budget {summary['budget']:g}")
    if summary.get("seeds", [0]) != [0]:
        parts.append(f"--seeds {','.join(map(str, summary['seeds']))}")
    if summary.get("interactive"):
        parts.append("--interactive")
    return " ".join(parts)


def _study_section(run_dir: Path, part: dict, *, headline: bool) -> str:
    """One RLVR study: figure (pass@k, best-of-n baseline included), verdict, table, per-question numbers."""
    import html

    from tiltlm.experiments import passk, rlvr
    from tiltlm.experiments.report import _fmt

    root = run_dir / part["dir"]
    pi0, trained, baselines = rlvr.study_lines(root)
    figure = f"report/{part['dir']}_pass_at_k.png"
    (run_dir / "report").mkdir(exist_ok=True)
    used = passk.figure(pi0, trained + baselines, run_dir / figure)
    sentences = rlvr.verdict(pi0, trained)
    headers, rows = passk.table(pi0, trained + baselines)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = []
    for line, values, cross in rows:
        tds = "".join(f'<td class="num" data-key="{k}" data-mean="{v!r}">{_fmt(v)}</td>' if v is not None else '<td class="num">—</td>'
                      for k, v in values)
        trs.append(f'<tr class="passk"><td>{html.escape(line.name)}</td><td class="num">{len(line.rows)}</td>{tds}'
                   f'<td class="num">{html.escape(cross)}</td></tr>')
    title = ("pass@k on held-out questions" if headline else "The same study, exact") + (
        ": an enumerable testbed" if part["dir"] == "exact" else "")
    caption = (f"{passk.caption(pi0, trained + baselines, used or '')} best-of-{rlvr.BEST_OF} trains nothing: it draws {rlvr.BEST_OF} π0 samples per answer and keeps a "
               f"correct one, so its pass@k is π0's pass@{rlvr.BEST_OF}k at {rlvr.BEST_OF}× the samples.")
    out = [f"<h2>{html.escape(title)}</h2>",
           f'<p class="verdict" id="verdict-{part["dir"]}">{html.escape(" ".join(sentences))}</p>']
    if used is not None:
        out.append(f'<figure><img src="{figure}" alt="pass@k against k, {html.escape(part["dir"])}"><figcaption>{html.escape(caption)}'
                   f"</figcaption></figure>")
    out.append(f'<div class="scroll"><table id="table-{part["dir"]}"><caption>π0 at step 0, each method\'s final policy (mean over seeds), '
               f"held-out questions; KL in nats per question</caption><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody>"
               "</table></div>")
    out.append(_per_question_html(root))
    return "\n".join(out)


def _per_question_html(root: Path, limit: int = 40) -> str:
    import html

    from tiltlm.experiments.report import _fmt

    path = root / "per_question.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    methods = list(data["methods"])
    big = f"pass@{data.get('n', 64)}"
    keys = [k for k in ("pass@1", big, "distinct_correct", "kl_target_exact") if any(k in r for r in data["methods"][methods[0]])]
    head = "<th>question</th>" + "".join(f"<th>{html.escape(m)}<br>{html.escape(k)}</th>" for k in keys for m in methods)
    trs = []
    for i, prompt in enumerate(data["prompts"][:limit]):
        tds = "".join(f'<td class="num">{_fmt(data["methods"][m][i].get(k), 3)}</td>' for k in keys for m in methods)
        trs.append(f"<tr><td>{html.escape(prompt)}</td>{tds}</tr>")
    more = f" (first {limit} of {len(data['prompts'])})" if len(data["prompts"]) > limit else ""
    return (f"<details><summary>Per question{more}: pass@1, {big}, distinct correct answers"
            f"{', exact KL(p*(·|x)‖π(·|x))' if 'kl_target_exact' in keys else ''} of each method (first seed)</summary>"
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(trs)}</tbody></table></div></details>')


def _interactive_links() -> str:
    return (
        '<li>Part 3: the interactive case — <a href="interactive/tabular_stochastic/report/report.html">stochastic tabular env</a> '
        '(DPG → optimistic posterior conditional, KL-PG → variational policy: exact KLs to both), '
        '<a href="interactive/tabular_deterministic/report/report.html">deterministic tabular env</a> (the two optima coincide), '
        '<a href="interactive/dialogue/report/report.html">twenty questions</a> (success rate, per-turn KL, distinct questions).</li>'
    )
