"""The overoptimization study on the embedded default LM (``overopt_lm/``): the exact twin's questions
(tiltlm.experiments.overopt) where nothing can be enumerated, so every number is an estimate from samples.

1. **The gold**: VADER sentiment of a story (``sentiment``, in [−1, 1]), sampled unconditionally (context "",
   MAX_NEW_TOKENS tokens).
2. **The labels**, per seed: N + N/4 pairs of pi0's stories (two different non-empty stories, tiltlm.preferences)
   labelled once each by Bradley–Terry on the gold at temperature TAU, P(a ≻ b) = σ((g(a) − g(b))/TAU); the smaller N
   take the first rows of the largest N's draw.
3. **The proxy** r̂ per (N, seed): a BT reward model on the default LM's body (`tiltlm reward-model train`, full
   fine-tuning, RM_EPOCHS epochs and at least RM_STEPS steps), N/4 pairs held out for its accuracy (Wilson interval,
   docs/math.md §15.4). Seeds' draws, then the (N, seed) proxies, run in parallel processes.
4. **A pool** of POOL fresh stories from pi0 per seed, never shown to the reward model, scored by the gold and every
   proxy: pi0's gold and proxy, best-of-n under r̂ for n = 1 … 256 (the unbiased order-statistic estimate
   E[g(best of n)] = Σ_i g_(i)·C(i − 1, n − 1)/C(M, n) over the pool sorted by r̂; its KL is the analytic
   log n − (n − 1)/n of Gao et al., an upper bound), and the proxy's posterior pi0·exp(r̂/beta)/Z by self-normalised
   importance sampling on the pool (weights ∝ exp(r̂/beta); KL(q‖pi0) ≈ E_w[r̂/beta] − log mean exp(r̂/beta); its
   effective sample size is recorded beside each point).
5. **Cells**: reinforce, kl-pg at each beta, dpg at the main beta (on r̂), DPO at the main beta on the proxy's N
   training pairs; the library's default optimiser; metrics.gold = the gold. A trained policy's point at a step is the
   mean over WINDOW consecutive steps of its own batches' estimates (kl/prior_seq: the k1 estimate of KL(pi‖pi0),
   reward/mean: r̂, gold/mean: g), N_PER_STEP samples each; the endpoint is the last window (the learning rate decays
   linearly to 0, so those steps' policies barely differ). DPO trains on pairs and samples nothing: its endpoint is
   FINAL_SAMPLES stories of its final policy.
6. ``curves.jsonl`` (the exact twin's fields; "exact": false in study.json; best-of-n and posterior points add "ess"
   where it applies), ``study.json``, ``proxies.json``, ``verdict.json`` (the same calls, tiltlm.experiments.overopt_verdict,
   without the frontier, which needs the whole space) and ``report/``.

The intervals are over the seeds (each seed: its labels, proxy, pool and runs); they cover the sampling noise of each
seed's estimates as far as three seeds can measure any spread.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from tiltlm.experiments.overopt import BON_NS, Method, check_seeds, methods
from tiltlm.io import atomic_write_text

GOLD = "sentiment"
MAX_NEW_TOKENS = 32
N_LABELS = (128, 512)
TAU = 0.1  # the labels' BT temperature: 90% of pi0's pairs labelled as the gold orders them (README, "Reward models")
BETAS = (2.0, 0.5)  # on the proxy's scale (its std over pi0's stories ≈ 2.5 with N = 512)
MAIN_BETA = 0.5
TILT_BETAS = (math.inf, 8.0, 4.0, 2.0, 1.0, 0.7, 0.5, 0.35, 0.25)
POOL = 1024
N_PER_STEP = 16
LR = 1e-4
STEPS = 20  # training steps at budget 1
WINDOW = 4
FINAL_SAMPLES = 256
RM_LR, RM_BATCH, RM_EPOCHS, RM_STEPS = 3e-4, 16, 4, 64  # the proxy's training: lr, pairs per step, epochs, at least steps


# ---- per seed: labels, proxies, pool ----------------------------------------------------------------------------------


def draw_seed(job: tuple[str, int, int]) -> None:
    """One seed's labelled pairs (the largest N's draw, ``labels.jsonl``) and its pool (``pool.json``: texts and gold)
    into ``root/seed<s>/``, on one thread. A job is (root, seed, number of pairs)."""
    from tiltlm.experiments.grid import one_thread
    from tiltlm.policies import HFPolicy
    from tiltlm.preferences import synthesize, write_preferences
    from tiltlm.rewards import get_reward

    root, seed, pairs = job
    out = Path(root) / f"seed{seed}"
    with one_thread():
        pi0 = HFPolicy.from_pretrained("default", max_new_tokens=MAX_NEW_TOKENS)
        gold = get_reward(GOLD)
        write_preferences(out / "labels.jsonl", synthesize(pi0, [""], pairs=pairs, gold=gold, tau=TAU, seed=10_000 + seed))
        pool = pi0.sample([""], POOL, seed=20_000 + seed).texts
        atomic_write_text(out / "pool.json", json.dumps({"texts": pool, "gold": gold(pool).tolist()}))


def train_proxy(job: tuple[str, int, int]) -> dict:
    """The proxy of (N, seed): a BT reward model on the first N + N/4 labelled pairs (N/4 held out by the one seeded
    split, tiltlm.data.split_indices; ``train_pairs.jsonl`` = its training pairs, DPO's data), trained for RM_STEPS or
    more; then the seed's pool scored by it (``pool_N<N>.json``). Its record. A job is (root, seed, N)."""
    from tiltlm.data import split_indices
    from tiltlm.experiments.cells import read_jsonl
    from tiltlm.experiments.grid import one_thread
    from tiltlm.preferences import write_preferences
    from tiltlm.rewards import get_reward
    from tiltlm.rmtrain import parse_rm_config, train_reward_model

    root, seed, n = job
    out = Path(root) / f"seed{seed}" / f"N{n}"
    held = max(1, n // 4)
    with one_thread():
        mine = read_jsonl(Path(root) / f"seed{seed}" / "labels.jsonl", strict=True)[:n + held]
        labels = write_preferences(out / "labels.jsonl", mine)
        train, _ = split_indices(len(mine), held, None, seed, "labels", "pairs", "pairs")
        write_preferences(out / "train_pairs.jsonl", [mine[i] for i in train])
        steps = max(RM_STEPS, RM_EPOCHS * -(-len(train) // RM_BATCH))
        config = parse_rm_config({"base": "default", "data": {"path": str(labels), "eval_size": held}, "seed": seed,
                                  "lr": RM_LR, "steps": steps, "batch_size": RM_BATCH})
        record = train_reward_model(config, out / "rm", overwrite=True)
        pool = json.loads((Path(root) / f"seed{seed}" / "pool.json").read_text())
        proxy = get_reward(f"rm:{out / 'rm'}")(pool["texts"], [""] * len(pool["texts"]))
        atomic_write_text(out / "pool_proxy.json", json.dumps(proxy.tolist()))
    g = torch.tensor(pool["gold"], dtype=torch.float64)
    return {"n_labels": n, "seed": seed, "steps": steps, **{k: record["metrics"].get(k) for k in (
        "eval/accuracy", "eval/accuracy_low", "eval/accuracy_high", "eval/accuracy_start", "train/accuracy")},
            "pool_correlation_with_gold": float(torch.corrcoef(torch.stack([proxy.double(), g]))[0, 1])}


def in_processes(fn, jobs: list, workers: int):
    """fn over jobs, in ``workers`` spawned processes (in this one with one worker), results in job order."""
    if workers == 1 or len(jobs) == 1:
        return [fn(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


# ---- training-free curves on the pool --------------------------------------------------------------------------------


def best_of_n_points(gold: torch.Tensor, proxy: torch.Tensor, ns=BON_NS) -> list[dict]:
    """Best-of-n under the proxy from a pool of M draws of pi0: the unbiased U-statistic of E[g(best of n)] and of
    E[r̂(best of n)] (pool sorted by r̂, rank i of M weighted C(i − 1, n − 1)/C(M, n)); KL = log n − (n − 1)/n."""
    order = torch.argsort(proxy, stable=True)
    g, r, m = gold[order].double(), proxy[order].double(), len(proxy)
    out = []
    for n in ns:
        if n > m:
            break
        i = torch.arange(1, m + 1, dtype=torch.float64)
        log_w = torch.where(i >= n, torch.lgamma(i) - torch.lgamma(i - n + 1) - (torch.lgamma(torch.tensor(m + 1.0)) -
                                                                                 torch.lgamma(torch.tensor(m - n + 1.0))), -math.inf)
        w = torch.exp(log_w + math.log(n))  # C(i−1, n−1)/C(M, n) = n·(i−1)!/(i−n)! · (M−n)!/M!
        w = w / w.sum()
        out.append({"n": n, "kl": math.log(n) - (n - 1) / n, "gold": float((w * g).sum()), "proxy": float((w * r).sum())})
    return out


def posterior_point(gold: torch.Tensor, proxy: torch.Tensor, beta: float) -> dict:
    """The proxy posterior pi0·exp(r̂/beta)/Z by self-normalised IS on a pool of pi0's draws: kl, gold, proxy, ess, log_z."""
    r = proxy.double()
    if math.isinf(beta):
        return {"kl": 0.0, "gold": float(gold.double().mean()), "proxy": float(r.mean()), "ess": float(len(r)), "log_z": 0.0}
    w = torch.softmax(r / beta, 0)
    log_z = float(torch.logsumexp(r / beta, 0) - math.log(len(r)))
    return {"kl": max(0.0, float((w * r).sum()) / beta - log_z), "gold": float((w * gold.double()).sum()),
            "proxy": float((w * r).sum()), "ess": 1.0 / float((w * w).sum()), "log_z": log_z}


# ---- cells -----------------------------------------------------------------------------------------------------------


def cell_config(method: Method, rm_dir: Path, pairs: Path, *, seed: int, steps: int, main_beta: float = MAIN_BETA) -> dict:
    beta = method.beta if method.beta is not None else main_beta
    config = {"prior": "default", "seed": seed, "target": {"reward": f"rm:{rm_dir}", "beta": beta},
              "algorithm": {"name": method.name},
              "sampling": {"contexts": [""], "n_per_context": N_PER_STEP, "max_new_tokens": MAX_NEW_TOKENS},
              "optim": {"steps": steps, "lr": LR}, "checkpoint": {"every": 0},
              "metrics": {"gold": GOLD, "diversity": False}}
    if method.name == "dpo":
        config["data"] = {"path": str(pairs), "prompts_per_step": N_PER_STEP}
    return config


def windows(rows: list[dict], width: int = WINDOW) -> list[dict]:
    """A run's points: the means of kl/prior_seq, gold/mean and reward/mean over consecutive blocks of ``width`` steps
    (the last block ends at the last step), each at its block's last step."""
    rows = [r for r in rows if "gold/mean" in r]
    out = []
    for end in range(len(rows), 0, -width):
        block = rows[max(0, end - width):end]
        out.append({"step": block[-1]["step"], "kl": sum(r["kl/prior_seq"] for r in block) / len(block),
                    "gold": sum(r["gold/mean"] for r in block) / len(block),
                    "proxy": sum(r["reward/mean"] for r in block) / len(block), "samples": len(block) * N_PER_STEP})
    return out[::-1]


def sample_point(policy_dir: Path, rm_dir: Path, prior, *, seed: int) -> dict:
    """FINAL_SAMPLES stories of a saved policy: the k1 estimate of KL(pi‖pi0) (log pi − log pi0 of each story under
    ``prior``, pi0), gold and proxy means."""
    from tiltlm.policies import HFPolicy
    from tiltlm.rewards import get_reward

    policy = HFPolicy.from_pretrained(str(policy_dir), max_new_tokens=MAX_NEW_TOKENS)
    s = policy.sample([""], FINAL_SAMPLES, seed=30_000 + seed)
    log_ratio = policy.log_prob(s).double() - prior.log_prob(s).double()
    return {"kl": float(log_ratio.mean()), "gold": float(get_reward(GOLD)(s.texts).mean()),
            "proxy": float(get_reward(f"rm:{rm_dir}")(s.texts, [""] * len(s.texts)).mean()), "samples": FINAL_SAMPLES}


# ---- the study -------------------------------------------------------------------------------------------------------


def run_lm(root: Path, *, budget: float = 1.0, seeds: tuple[int, ...] = (0, 1, 2), n_labels: tuple[int, ...] = N_LABELS,
           betas: tuple[float, ...] = BETAS, workers: int | None = None, log: Callable[[str], None] = print) -> Path:
    """The LM part into ``root`` (module docstring)."""
    from tiltlm.experiments.cells import read_jsonl
    from tiltlm.experiments.grid import one_thread, train_cells
    from tiltlm.policies import HFPolicy
    from tiltlm.threads import available_cores
    from tiltlm.train.config import parse_config

    check_seeds(seeds)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    steps = max(2 * WINDOW, round(STEPS * budget))
    workers = max(1, workers or available_cores())
    t = time.time()
    largest = max(n_labels)
    in_processes(draw_seed, [(str(root), s, largest + largest // 4) for s in seeds], min(workers, len(seeds)))
    proxies = in_processes(train_proxy, [(str(root), s, n) for s in seeds for n in sorted(n_labels, reverse=True)],
                           min(workers, len(seeds) * len(n_labels)))
    proxies.sort(key=lambda p: (p["n_labels"], p["seed"]))
    log(f"  {len(proxies)} proxy reward models and {len(seeds)} pools of {POOL} stories in {time.time() - t:.0f} s (held-out "
        "accuracy " + ", ".join(f"N={p['n_labels']}: {p['eval/accuracy']:.3f}" for p in proxies if p["seed"] == seeds[0]) + f", seed {seeds[0]})")
    points, jobs, cells, pools = [], [], {}, {}
    for s in seeds:
        pools[s] = json.loads((root / f"seed{s}" / "pool.json").read_text())
        g = torch.tensor(pools[s]["gold"], dtype=torch.float64)
        for n in n_labels:
            pools[s][f"proxy_N{n}"] = json.loads((root / f"seed{s}" / f"N{n}" / "pool_proxy.json").read_text())
            r = torch.tensor(pools[s][f"proxy_N{n}"], dtype=torch.float64)
            head = {"n_labels": n, "seed": s}
            points += [{"method": "proxy-posterior", **head, "step": None, "beta": None if math.isinf(b) else b,
                        **posterior_point(g, r, b)} for b in TILT_BETAS]
            points += [{"method": "best-of-n", **head, "beta": None, **p} for p in best_of_n_points(g, r)]
            for m in methods(betas, MAIN_BETA):
                rm_dir, pairs = root / f"seed{s}" / f"N{n}" / "rm", root / f"seed{s}" / f"N{n}" / "train_pairs.jsonl"
                raw = cell_config(m, rm_dir, pairs, seed=s, steps=steps)
                parse_config(raw)
                jobs.append((m.cell(n, s), raw, str(root / "cells" / m.cell(n, s))))
                cells[m.cell(n, s)] = (m, n, s)
    log(f"  {len(jobs)} runs of {steps} steps × {N_PER_STEP} stories, {min(workers, len(jobs))} at a time, one thread each")
    for i, (name, final, seconds) in enumerate(train_cells(jobs, min(workers, len(jobs))), 1):
        said = (f"KL {final['kl/prior_seq']:.3f} (estimate), gold {final['gold/mean']:.3f}, proxy {final['reward/mean']:.3f}"
                if "gold/mean" in final else "trained on pairs (its stories are sampled below)")
        log(f"  [{i}/{len(jobs)}] {name} done in {seconds:.0f} s: {said}")
    finals, prior = {}, None
    for name, (m, n, s) in cells.items():
        g = torch.tensor(pools[s]["gold"], dtype=torch.float64)
        r = torch.tensor(pools[s][f"proxy_N{n}"], dtype=torch.float64)
        head = {"method": m.name, "n_labels": n, "beta": m.beta, "seed": s}
        start = {"step": 0, "kl": 0.0, "gold": float(g.mean()), "proxy": float(r.mean()), "samples": POOL}
        if m.name == "dpo":
            with one_thread():
                prior = prior or HFPolicy.from_pretrained("default", max_new_tokens=MAX_NEW_TOKENS)
                end = {"step": steps, **sample_point(root / "cells" / name / "policy", root / f"seed{s}" / f"N{n}" / "rm", prior,
                                                     seed=s)}
            curve = [start, end]
        else:
            curve = [start, *windows(read_jsonl(root / "cells" / name / "metrics.jsonl", strict=True))]
        points += [{**head, **p} for p in curve]
        beta = m.beta if m.beta is not None else MAIN_BETA
        post = posterior_point(g, r, beta)
        end = curve[-1]
        finals[(m.name, m.beta, n, s)] = {"kl": end["kl"], "gold": end["gold"], "posterior": post,
                                          "kl_to_posterior": end["kl"] - end["proxy"] / beta + post["log_z"]}
    study = {"gold": GOLD, "max_new_tokens": MAX_NEW_TOKENS, "context": "", "prior": "default", "n_labels": list(n_labels),
             "seeds": list(seeds), "betas": list(betas), "main_beta": MAIN_BETA, "steps": steps, "samples_per_step": N_PER_STEP,
             "lr": LR, "window": WINDOW, "pool": POOL, "tau": TAU, "best_of_n": list(BON_NS), "exact": False,
             "gold_prior": float(sum(sum(p["gold"]) / len(p["gold"]) for p in pools.values()) / len(pools))}
    atomic_write_text(root / "proxies.json", json.dumps(proxies, indent=1))
    atomic_write_text(root / "curves.jsonl", "".join(json.dumps(p) + "\n" for p in points))
    atomic_write_text(root / "finals.json", json.dumps([{"method": k[0], "beta": k[1], "n_labels": k[2], "seed": k[3], **v}
                                                        for k, v in finals.items()], indent=1))
    atomic_write_text(root / "study.json", json.dumps(study, indent=1))
    write_outputs(root)
    return root


def write_outputs(root: Path) -> dict:
    """verdict.json and report/ of the LM part, from its files (curves.jsonl, finals.json, study.json)."""
    from tiltlm.experiments.overopt_verdict import read_points, verdict_of, write_report

    root = Path(root)
    study = json.loads((root / "study.json").read_text())
    points = read_points(root)
    finals = {(f["method"], f["beta"], f["n_labels"], f["seed"]): f for f in json.loads((root / "finals.json").read_text())}
    verdict = verdict_of(points, study, finals, None)
    atomic_write_text(root / "verdict.json", json.dumps(verdict, indent=1))
    write_report(root, points, study, verdict)
    return verdict
