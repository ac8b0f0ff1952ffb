"""`tiltlm run --task sentiment`: the reward–KL comparison of the sentiment tilt p* ∝ pi0·exp(r/beta).

Two parts, each a sweep directory with its own report: ``lm/`` (the embedded default LM, r = VADER sentiment or any
reward spec: reinforce, kl-pg at several beta, dpg at the main beta, then importance resampling and best-of-4
with the cells' sample budget) and ``testbed/`` (an enumerable 5-token testbed with r = count:a, where every divergence
to p* is exact, and exact.json holds p*'s exact numbers). Cells → the sweep (tiltlm.experiments.sweep) → inference
baselines and samples → the part's report (tiltlm.experiments.report).

The cells train with the library's default optimiser (minibatches of 16, linear decay) and its dpg (GDC++'s baseline),
each at the study's lr, once per seed of the run (``--seeds``, default 0,1,2; the inference baselines likewise): the
report's tables give the mean ± standard deviation over seeds. The testbed is made once, from the first seed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import yaml

from tiltlm.experiments.cells import add_samples


def lm_sweep(prior: str, reward: str, betas: list[float], main_beta: float, steps: int, seeds: list[int]) -> dict:
    return {
        "base": {"prior": prior, "target": {"reward": reward},
                 "sampling": {"contexts": [""], "n_per_context": 16, "max_new_tokens": 32},
                 "optim": {"steps": steps, "lr": 1e-4}, "checkpoint": {"every": 10}},
        "grid": {"betas": betas, "seeds": list(seeds), "algorithms": [
            {"name": "reinforce", "betas": [main_beta]},
            {"name": "kl-pg"},
            {"name": "dpg", "betas": [main_beta]},  # the library's dpg: GDC++'s baseline on
        ]},
    }


def testbed_sweep(prior: str, betas: list[float], main_beta: float, steps: int, seeds: list[int]) -> dict:
    return {
        "base": {"prior": prior, "target": {"reward": "count:a"},
                 "sampling": {"n_per_context": 32, "max_new_tokens": 4},
                 "optim": {"steps": steps, "lr": 3e-3}, "metrics": {"exact_every": max(1, steps // 10)},
                 "checkpoint": {"every": 20}},
        "grid": {"betas": betas, "seeds": list(seeds), "algorithms": [
            {"name": "reinforce", "betas": [main_beta]},
            {"name": "kl-pg"},
            {"name": "dpg", "betas": [main_beta]},  # the library's dpg: GDC++'s baseline on
        ]},
    }


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
        records.append({"cell": f"{name}_beta{beta:g}_seed{seed}", "algorithm": name, "beta": beta, "seed": seed, "final": final})
        texts["posterior" if name == "importance-sampling" else name] = s.texts[:n_show]
    lp = prior_samples.logp.double()
    lt = target.log_score(prior_samples, prior_logp=lp)
    records[0]["final"]["kl/target_prior_is"] = kl_target_policy(lt, lp, lp).value
    with open(sweep_dir / "results.jsonl", "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    if not (sweep_dir / "samples.json").exists() or "posterior" not in json.loads((sweep_dir / "samples.json").read_text()):
        add_samples(sweep_dir, texts)  # the first seed's texts are the ones shown


def policy_samples(sweep_dir: Path, n_show: int = 8, seed: int = 0) -> None:
    """A few texts from each trained cell's final policy, for the side-by-side table."""
    from tiltlm.policies import HFPolicy

    texts = {}
    for done in sorted(sweep_dir.glob("cells/*/done.json")):
        cell = done.parent
        config = yaml.safe_load((cell / "config.yaml").read_text())
        policy = HFPolicy.from_pretrained(cell / "policy", max_new_tokens=config["sampling"]["max_new_tokens"])
        texts[cell.name] = policy.sample(list(config["sampling"]["contexts"])[:1], n_show, seed=seed).texts
    add_samples(sweep_dir, texts)


def exact_targets(sweep_dir: Path, prior: str, betas: list[float], max_new_tokens: int) -> None:
    """exact.json: p*'s exact numbers for each beta (log Z, reward, entropy, KL to the prior)."""
    from tiltlm.exact import enumerate_space, exact_report
    from tiltlm.policies import HFPolicy
    from tiltlm.targets import Prior, Tilt

    pi0 = HFPolicy.from_pretrained(prior, max_new_tokens=max_new_tokens)
    space = enumerate_space(pi0)
    reports = {f"{b:g}": exact_report(space, Prior(pi0) * Tilt("count:a", b)) for b in betas}
    (sweep_dir / "exact.json").write_text(json.dumps(reports, indent=1))


def lm_part(root: Path, prior: str, reward: str, betas, main_beta: float, budget: float, seeds: list[int], log) -> None:
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import run_sweep

    steps = max(2, round(60 * budget))
    cfg = lm_sweep(prior, reward, list(betas), main_beta, steps, seeds)
    root.mkdir(parents=True)
    (root / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"  {steps} steps × 16 samples per cell, seeds {','.join(map(str, seeds))}")
    run_sweep(root / "sweep_config.yaml", root, on_cell=_cell_logger(log))
    for seed in seeds:
        inference_baselines(root, cfg, main_beta, steps * 16, seed)
    policy_samples(root, seed=seeds[0])
    write_report(root)


def testbed_part(root: Path, budget: float, seeds: list[int], log) -> None:
    from tiltlm.experiments.report import write_report
    from tiltlm.experiments.sweep import run_sweep
    from tiltlm.testbed import make_testbed

    steps = max(2, round(100 * budget))
    model = make_testbed(root / "model", vocab_size=5, n_layer=2, seed=seeds[0], train_steps=100)
    betas = [1.0, 3.0]
    cfg = testbed_sweep(str(model), betas, 1.0, steps, seeds)
    (root / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"  {steps} steps × 32 samples per cell, seeds {','.join(map(str, seeds))}")
    run_sweep(root / "sweep_config.yaml", root, on_cell=_cell_logger(log))
    exact_targets(root, str(model), betas, 4)
    policy_samples(root, seed=seeds[0])
    write_report(root)


def _cell_logger(log):
    started = [time.time()]

    def on_cell(name: str) -> None:
        log(f"  finished {name} ({time.time() - started[0]:.0f} s)")
        started[0] = time.time()

    return on_cell
