"""`tiltlm run --interactive`: the interactive case. Exactly, DPG (forward KL) against KL-PG (reverse KL) on a
stochastic and on a deterministic tabular environment, each against the optimistic posterior conditional and the
variational KL-RL policy (docs/math.md §5, tiltlm.exact.mdp); on text, twenty questions with the prior LM and a
simulated human (tiltlm.envs.dialogue), every policy evaluated afterwards on the same episodes. Both train with
STUDY_OPTIM (tiltlm.experiments.grid says why), on the run's first seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from tiltlm.experiments.cells import add_samples
from tiltlm.experiments.grid import STUDY_OPTIM

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
    add_samples(sweep_dir, texts)


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
