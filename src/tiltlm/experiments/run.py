"""`tiltlm run`: does fine-tuning toward a reward collapse the model, and does the KL keep it a
generative model — at what reward cost? Answered at matched sample budget, in two parts:

1. ``lm/``: the embedded default prior tilted by a reward (sentiment by default). reinforce (pure
   RL), kl-pg at several beta, dpg and gdc++ toward the main beta's p*, plus inference baselines
   that train nothing (best-of-n, importance resampling) with the same number of samples.
2. ``testbed/``: the same algorithms on a small-vocabulary GPT-2 whose sample space is enumerated,
   so every divergence to p* is exact and sits beside its estimate.
Each part is a sweep directory (see tiltlm.experiments.sweep) with its own report; ``report.html``
at the top links both. ``--budget`` scales the number of steps.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from tiltlm.errors import TiltlmError
from tiltlm.io import replace_dir


def lm_sweep(prior: str, reward: str, betas: list[float], main_beta: float, steps: int, seed: int) -> dict:
    return {
        "base": {"prior": prior, "target": {"reward": reward},
                 "sampling": {"contexts": [""], "n_per_context": 16, "max_new_tokens": 32},
                 "optim": {"steps": steps, "lr": 1e-4}, "checkpoint": {"every": 10}},
        "grid": {"betas": betas, "seeds": [seed], "algorithms": [
            {"name": "reinforce", "betas": [main_beta]},
            {"name": "kl-pg"},
            {"name": "dpg", "betas": [main_beta]},
            {"name": "gdc++", "betas": [main_beta]},
        ]},
    }


def testbed_sweep(prior: str, betas: list[float], main_beta: float, steps: int, seed: int) -> dict:
    return {
        "base": {"prior": prior, "target": {"reward": "count:a"},
                 "sampling": {"n_per_context": 32, "max_new_tokens": 4},
                 "optim": {"steps": steps, "lr": 3e-3}, "metrics": {"exact_every": max(1, steps // 10)},
                 "checkpoint": {"every": 20}},
        "grid": {"betas": betas, "seeds": [seed], "algorithms": [
            {"name": "reinforce", "betas": [main_beta]},
            {"name": "kl-pg"},
            {"name": "dpg", "betas": [main_beta]},
            {"name": "gdc++", "betas": [main_beta]},
        ]},
    }


def tabular_env_sweep(stochasticity: float, steps: int, seed: int) -> dict:
    """DPG (forward KL) vs KL-PG (reverse KL) on a depth-2 tabular env, exact metrics against both optima."""
    return {
        "base": {"env": {"name": "tabular", "options": {"depth": 2, "seed": 3, "reward_scale": 2.0, "stochasticity": stochasticity},
                         "timeout_s": None},
                 "sampling": {"n_per_context": 64}, "optim": {"steps": steps, "lr": 0.05, "schedule": "linear"},
                 "metrics": {"exact_every": max(1, steps // 10), "diversity": False}, "checkpoint": {"every": 100}},
        "grid": {"betas": [1.0], "seeds": [seed], "algorithms": ["dpg", "kl-pg", {"name": "reinforce"}]},
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
                 "sampling": {"n_per_context": 8}, "optim": {"steps": steps, "lr": 2e-4}, "checkpoint": {"every": 10},
                 "metrics": {"diversity": False}},
        "grid": {"betas": [beta], "seeds": [seed], "algorithms": ["kl-pg", "dpg", "reinforce"]},
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
    prior: str = "default",
    reward: str = "sentiment",
    betas: tuple[float, ...] = (0.05, 0.2, 1.0),
    main_beta: float = 0.2,
    budget: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    interactive: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run both parts (and with ``interactive`` the third) into ``out`` (atomically: a temporary directory renamed at the end)."""
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import run_sweep
    from tiltlm.testbed import make_testbed

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TiltlmError(f"output directory '{out}' is not empty; pass --overwrite or choose another --out")
    if main_beta not in betas:
        raise TiltlmError(f"the main beta {main_beta} must be one of the betas {list(betas)}")
    if budget <= 0:
        raise TiltlmError(f"--budget must be > 0 (got {budget}); 1.0 is the default run")
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lm_steps, tb_steps = max(2, round(60 * budget)), max(2, round(100 * budget))
        lm_cfg = lm_sweep(prior, reward, list(betas), main_beta, lm_steps, seed)
        (work / "lm").mkdir()
        (work / "lm" / "sweep_config.yaml").write_text(yaml.safe_dump(lm_cfg))
        log(f"part 1: {prior} prior, reward {reward}, {lm_steps} steps × 16 samples per cell")
        run_sweep(work / "lm" / "sweep_config.yaml", work / "lm", on_cell=lambda n: log(f"  finished {n}"))
        inference_baselines(work / "lm", lm_cfg, main_beta, lm_steps * 16, seed)
        policy_samples(work / "lm", seed=seed)
        write_report(work / "lm")

        log(f"part 2: exact testbed, {tb_steps} steps × 32 samples per cell")
        testbed_dir = make_testbed(work / "testbed_model", vocab_size=5, n_layer=2, seed=seed, train_steps=100)
        tb_betas = [1.0, 3.0]
        tb_cfg = testbed_sweep(str(testbed_dir), tb_betas, 1.0, tb_steps, seed)
        (work / "testbed").mkdir()
        (work / "testbed" / "sweep_config.yaml").write_text(yaml.safe_dump(tb_cfg))
        run_sweep(work / "testbed" / "sweep_config.yaml", work / "testbed", on_cell=lambda n: log(f"  finished {n}"))
        exact_targets(work / "testbed", str(testbed_dir), tb_betas, 4)
        policy_samples(work / "testbed", seed=seed)
        write_report(work / "testbed")

        if interactive:
            interactive_part(work / "interactive", prior, budget, seed, log)
        summary = {"prior": prior, "reward": reward, "betas": list(betas), "main_beta": main_beta, "budget": budget,
                   "seed": seed, "interactive": interactive, "seconds": time.time() - start}
        (work / "run.json").write_text(json.dumps(summary, indent=1))
        (work / "report.html").write_text(_index(summary))
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


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
        log(f"part 3: tabular environment (stochasticity {stochasticity:g}), {tab_steps} steps × 64 episodes per cell")
        run_sweep(root / name / "sweep_config.yaml", root / name, on_cell=lambda n: log(f"  finished {n}"))
        exact_env_optima(root / name, cfg)
        write_report(root / name)
    cfg = dialogue_sweep(prior, dlg_steps, seed)
    (root / "dialogue").mkdir()
    (root / "dialogue" / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"part 3: twenty questions with {prior}, {dlg_steps} steps × 32 episodes per cell")
    run_sweep(root / "dialogue" / "sweep_config.yaml", root / "dialogue", on_cell=lambda n: log(f"  finished {n}"))
    evaluate_env_cells(root / "dialogue", cfg, cfg["grid"]["betas"][0], episodes_per_task=32, seed=seed)
    write_report(root / "dialogue")


def _index(summary: dict) -> str:
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tiltlm run</title>
<style>body{{font-family:sans-serif;max-width:52rem;margin:2rem auto;line-height:1.5}}</style></head><body>
<h1>tiltlm run</h1>
<p>Prior <code>{summary['prior']}</code>, reward <code>{summary['reward']}</code>, betas {summary['betas']}
(main {summary['main_beta']}), budget ×{summary['budget']}, seed {summary['seed']}; {summary['seconds']:.0f} s.</p>
<ul>
<li><a href="lm/report/report.html">Part 1: the language model</a> — reinforce vs kl-pg vs dpg/gdc++ vs inference baselines, estimated divergences.</li>
<li><a href="testbed/report/report.html">Part 2: the exact testbed</a> — the same comparison where every divergence to p* is exact.</li>
{_interactive_links() if summary.get("interactive") else ""}</ul></body></html>
"""


def _interactive_links() -> str:
    return (
        '<li>Part 3: the interactive case — <a href="interactive/tabular_stochastic/report/report.html">stochastic tabular env</a> '
        '(DPG → optimistic posterior conditional, KL-PG → variational policy: exact KLs to both), '
        '<a href="interactive/tabular_deterministic/report/report.html">deterministic tabular env</a> (the two optima coincide), '
        '<a href="interactive/dialogue/report/report.html">twenty questions</a> (success rate, per-turn KL, distinct questions).</li>'
    )
