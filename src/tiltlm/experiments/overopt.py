"""`tiltlm run --task overopt`: is the KL penalty an optimisation hack (early stopping) or the posterior we wanted?

The proxy-vs-gold measurement of Gao, Schulman & Hilton (2022, "Scaling Laws for Reward Model Overoptimization") on an
enumerable testbed, where every number is exact (docs/math.md §16). Read top to bottom: the space, the labels, the
proxies, the training-free curves, the cells, the curves file, the verdict.

1. **The space**: a 5-token GPT-2 testbed (tiltlm.testbed: letters a–d and EOS) fitted to a seeded Markov chain,
   sampled unconditionally (context ""), at most MAX_NEW_TOKENS tokens: 1,365 sequences, all enumerated once.
2. **The gold reward** g(y) = n_d(3 − n_d)/2 with n_d the count of "d" in y (`gold`): 0, 1, 1, 0, −2, −5 for 0…5 d's —
   "one or two d's, not more". pi0 rarely writes three d's or more, so a reward model learned from pi0's samples sees
   little of where g turns down: the proxy's error is largest where optimisation goes.
3. **The labels**: for each N in ``n_labels`` and each seed, N + N/4 pairs (y, y') drawn i.i.d. from pi0 (redrawn
   while y = y'), each labelled once by Bradley–Terry on the gold, y ≻ y' with probability σ(g(y) − g(y')).
4. **The proxy** r̂: a BT reward model (tiltlm.rmtrain, `tiltlm reward-model train`) on the testbed's body, trained on
   the N pairs (the N/4 others held out for its accuracy); `rm:DIR` scores with it. Its exact pairwise accuracy
   against the gold over pi0 × pi0 is recorded.
5. **Training-free curves, exact**: the gold-optimal frontier pi0·exp(g/beta)/Z (no policy passes its gold at its
   KL: docs/math.md §16.1), the proxy's posterior pi0·exp(r̂/beta)/Z (what every KL-regularised method on r̂ aims
   at) over a beta grid, and best-of-n under r̂ for n = 1 … 256 (its exact distribution,
   tiltlm.algorithms.inference.best_of_n_exact_distribution).
6. **Cells** (one training run each, the library's default optimiser, metrics.gold = the gold, exact metrics every
   few steps): reinforce on r̂ (its whole trajectory), kl-pg at each beta, dpg toward pi0·exp(r̂/beta) at the main
   beta, and DPO at the main beta on the same N labelled pairs the proxy was trained on.
7. ``curves.jsonl`` (the contract below), ``study.json``, ``verdict.json`` (tiltlm.experiments.overopt_verdict) and
   ``report/`` with the figure.

Contract: ``curves.jsonl`` has one object per evaluated point {"method", "n_labels", "beta" (or null), "seed",
"step" (or "n" for best-of-n; null for the tilts), "kl": KL(pi‖pi0), "gold": E_pi[g], "proxy": E_pi[r̂]}, all exact;
methods "reinforce", "kl-pg", "dpg", "dpo" (step 0 is pi0), "best-of-n", "proxy-posterior" and "gold-posterior" (the
frontier, listed with every (n_labels, seed) so that each point has that proxy's value). ``study.json`` names the
testbed's directory (relative to the study's parent, the --out directory), the gold (a reward spec `tiltlm exact
--reward` accepts) and max_new_tokens.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tiltlm.errors import TiltlmError
from tiltlm.io import atomic_write_text

GOLD = "tiltlm.experiments.overopt:gold"
MAX_NEW_TOKENS = 5
N_LABELS = (32, 128, 512)
BETAS = (1.0, 0.25)  # kl-pg's betas; dpg and DPO train at MAIN_BETA
MAIN_BETA = 0.25
BON_NS = tuple(2**i for i in range(9))  # 1 … 256
TILT_BETAS = (math.inf, *(8.0 * 0.75**i for i in range(33)))  # pi0, 8 … ~0.0008: the posteriors' curves towards the argmax
N_PER_STEP = 32
LR = 1e-3
EXACT_EVERY = 2


def gold(completions: list[str], **kwargs) -> list[float]:
    """The testbed's gold reward: n_d(3 − n_d)/2 for n_d the count of "d" (module docstring)."""
    return [c.count("d") * (3 - c.count("d")) / 2 for c in completions]


@dataclass
class Space:
    """The enumerated testbed: every sequence's text, log pi0 and gold value (float64)."""

    texts: list[str]
    logp0: torch.Tensor
    gold: torch.Tensor
    enumerated: object  # the SequenceSpace: log-probs of other policies (log_prob)

    def point(self, log_q: torch.Tensor, proxy: torch.Tensor) -> dict[str, float]:
        """kl, gold, proxy of the distribution log_q, exactly."""
        from tiltlm.exact import expectation, kl

        return {"kl": kl(log_q, self.logp0), "gold": expectation(log_q, self.gold), "proxy": expectation(log_q, proxy)}


def space_of(model_dir: Path) -> Space:
    from tiltlm.exact import enumerate_space
    from tiltlm.policies import HFPolicy
    from tiltlm.rewards import get_reward

    prior = HFPolicy.from_pretrained(str(model_dir), max_new_tokens=MAX_NEW_TOKENS)
    space = enumerate_space(prior, context="", max_new_tokens=MAX_NEW_TOKENS)
    return Space(space.samples.texts, space.logp.double(), get_reward(GOLD)(space.samples.texts), space)


def draw_labels(space: Space, n: int, seed: int) -> list[tuple[int, int]]:
    """n (chosen, rejected) index pairs: y, y' ~ pi0 i.i.d. (redrawn while equal), y ≻ y' w.p. σ(g(y) − g(y'))."""
    gen = torch.Generator().manual_seed(seed)
    p0, out = space.logp0.exp(), []
    while len(out) < n:
        x, y = torch.multinomial(p0, 2, replacement=True, generator=gen).tolist()
        if x == y:
            continue
        wins = bool(torch.rand((), generator=gen, dtype=torch.float64) < torch.sigmoid(space.gold[x] - space.gold[y]))
        out.append((x, y) if wins else (y, x))
    return out


def write_pairs(path: Path, space: Space, pairs: list[tuple[int, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"prompt": "", "chosen": space.texts[w], "rejected": space.texts[l]}) + "\n"
                                    for w, l in pairs))
    return path


def train_proxy(root: Path, model_dir: Path, space: Space, n: int, seed: int) -> tuple[Path, Path, dict]:
    """(the proxy's directory, the DPO pairs file = the proxy's N training pairs, the proxy's record): labels drawn with
    the seed (module docstring), a BT reward model trained on N of them (N/4 held out by the one seeded split,
    tiltlm.data.split_indices, so DPO reads exactly the proxy's training pairs)."""
    from tiltlm.data import split_indices
    from tiltlm.rmtrain import parse_rm_config, train_reward_model

    held = max(1, n // 4)
    pairs = draw_labels(space, n + held, seed=1_000 * n + seed)
    labels = write_pairs(root / "labels.jsonl", space, pairs)
    train, _ = split_indices(len(pairs), held, None, seed, "labels", "pairs", "pairs")
    dpo_pairs = write_pairs(root / "train_pairs.jsonl", space, [pairs[i] for i in train])
    config = parse_rm_config({"base": str(model_dir), "data": {"path": str(labels), "eval_size": held}, "seed": seed,
                              "lr": 3e-3, "epochs": 10, "batch_size": 16})
    record = train_reward_model(config, root / "rm", overwrite=True)
    proxy = proxy_values(space, root / "rm")
    # exact pairwise accuracy against the gold, over pairs of pi0 × pi0 whose gold differs
    p0 = space.logp0.exp()
    sign = torch.sign(space.gold[:, None] - space.gold[None, :])
    w = p0[:, None] * p0[None, :] * (sign != 0)
    agree = (torch.sign(proxy[:, None] - proxy[None, :]) == sign).double()
    info = {"n_labels": n, "seed": seed, "held_out_accuracy": record["metrics"].get("eval/accuracy"),
            "gold_order_accuracy_exact": float((w * agree).sum() / w.sum())}
    return root / "rm", dpo_pairs, info


def proxy_values(space: Space, rm_dir: Path) -> torch.Tensor:
    from tiltlm.rewards import get_reward

    return get_reward(f"rm:{rm_dir}")(space.texts, [""] * len(space.texts))


def tilt_points(space: Space, values: torch.Tensor, proxy: torch.Tensor, betas=TILT_BETAS) -> list[dict]:
    """The exact (beta, kl, gold, proxy) of pi0·exp(values/beta)/Z at each beta; beta = inf is pi0 (written null)."""
    from tiltlm.exact.quantities import normalise

    out = []
    for b in betas:
        log_q = space.logp0 if math.isinf(b) else normalise(space.logp0 + values / b)[0]
        out.append({"beta": None if math.isinf(b) else b, **space.point(log_q, proxy)})
    return out


def best_of_n_points(space: Space, proxy: torch.Tensor, ns=BON_NS) -> list[dict]:
    from tiltlm.algorithms.inference import best_of_n_exact_distribution

    return [{"n": n, **space.point(best_of_n_exact_distribution(space.logp0, proxy, n), proxy)} for n in ns]


# ---- cells -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    beta: float | None  # the kl-pg / dpg / DPO beta; None for reinforce (its exact target is the main beta's posterior)

    def cell(self, n: int, seed: int) -> str:
        return f"{self.name}_N{n}" + (f"_beta{self.beta:g}" if self.beta is not None else "") + f"_seed{seed}"


def check_seeds(seeds: tuple[int, ...]) -> None:
    """One line for a seed the study cannot use: its label draws, pools and runs seed torch with the seed plus offsets
    below 10**6 (times 1,000,003 for tiltlm.preferences' rounds), and reward-model training takes seeds ≥ 0."""
    from tiltlm.train.config import MAX_SEED

    for s in seeds:
        if not 0 <= s <= MAX_SEED - 10**6:
            raise TiltlmError(f"--seeds {s}: the overoptimization study takes seeds from 0 to {MAX_SEED - 10**6:,} (its draws "
                              "add offsets to them); pick a smaller seed, e.g. --seeds 0,1,2")


def methods(betas: tuple[float, ...] = BETAS, main_beta: float = MAIN_BETA) -> list[Method]:
    return [Method("reinforce", None), *[Method("kl-pg", b) for b in betas], Method("dpg", main_beta), Method("dpo", main_beta)]


def cell_config(method: Method, model_dir: Path, rm_dir: Path, pairs: Path, *, seed: int, steps: int) -> dict:
    """One cell's training config: the proxy as the target's reward (kl/policy_target_exact is then KL to the proxy's
    posterior at the cell's beta), the gold as metrics.gold (gold/exact), exact metrics every EXACT_EVERY steps."""
    beta = method.beta if method.beta is not None else MAIN_BETA
    config = {"prior": str(model_dir), "seed": seed, "target": {"reward": f"rm:{rm_dir}", "beta": beta},
              "algorithm": {"name": method.name}, "sampling": {"n_per_context": N_PER_STEP, "max_new_tokens": MAX_NEW_TOKENS},
              "optim": {"steps": steps, "lr": LR}, "checkpoint": {"every": 0},
              "metrics": {"exact_every": EXACT_EVERY, "gold": GOLD, "diversity": False}}
    if method.name == "dpo":  # the proxy's own N training pairs, 16 a step
        config["data"] = {"path": str(pairs), "prompts_per_step": 16}
    return config


def trajectory(cell_dir: Path, method: Method, n: int, seed: int, start: dict) -> list[dict]:
    """The cell's exact points: step 0 (pi0, ``start``) and every row with exact metrics."""
    from tiltlm.experiments.cells import read_jsonl

    rows = read_jsonl(cell_dir / "metrics.jsonl", strict=True)
    head = {"method": method.name, "n_labels": n, "beta": method.beta, "seed": seed}
    out = [{**head, "step": 0, **start}]
    for r in rows:
        if "gold/exact" in r:
            out.append({**head, "step": r["step"], "kl": r["kl/prior_exact"], "gold": r["gold/exact"], "proxy": r["reward/exact"]})
    return out


# ---- the study -------------------------------------------------------------------------------------------------------


def run_exact(root: Path, *, budget: float = 1.0, seeds: tuple[int, ...] = (0, 1, 2), n_labels: tuple[int, ...] = N_LABELS,
              betas: tuple[float, ...] = BETAS, workers: int | None = None, log: Callable[[str], None] = print) -> Path:
    """The exact twin into ``root`` (module docstring): curves.jsonl, study.json, proxies.json, verdict.json, report/."""
    from tiltlm.experiments.grid import one_thread, train_cells
    from tiltlm.testbed import make_testbed
    from tiltlm.threads import available_cores
    from tiltlm.train.config import parse_config

    check_seeds(seeds)
    root = Path(root)
    steps = max(4, round(100 * budget))
    with one_thread():  # the testbed's fit, the reward models and every exact number: the same floats on any machine
        model_dir = make_testbed(root / "model", vocab_size=5, n_layer=2, seed=0, train_steps=100)
        space = space_of(model_dir)
        points: list[dict] = []
        proxies, jobs, cells = [], [], {}
        t = time.time()
        for n in n_labels:
            for s in seeds:
                rm_dir, pairs, info = train_proxy(root / "proxies" / f"N{n}_seed{s}", model_dir, space, n, s)
                proxy = proxy_values(space, rm_dir)
                proxies.append(info)
                head = {"n_labels": n, "seed": s, "step": None}
                points += [{"method": "gold-posterior", **head, **p} for p in tilt_points(space, space.gold, proxy)]
                points += [{"method": "proxy-posterior", **head, **p} for p in tilt_points(space, proxy, proxy)]
                points += [{"method": "best-of-n", "n_labels": n, "beta": None, "seed": s, **p} for p in best_of_n_points(space, proxy)]
                start = space.point(space.logp0, proxy)
                for m in methods(betas):
                    raw = cell_config(m, model_dir, rm_dir, pairs, seed=s, steps=steps)
                    parse_config(raw)  # every config is checked before anything trains
                    jobs.append((m.cell(n, s), raw, str(root / "cells" / m.cell(n, s))))
                    cells[m.cell(n, s)] = (m, n, s, start)
        accuracy = ", ".join(f"N={p['n_labels']}: {p['gold_order_accuracy_exact']:.3f}" for p in proxies[::len(seeds)])
        log(f"  {len(proxies)} proxy reward models in {time.time() - t:.0f} s (exact gold-order accuracy {accuracy}, seed {seeds[0]})")
    workers = max(1, min(len(jobs), workers or available_cores()))
    log(f"  {len(jobs)} runs of {steps} steps × {N_PER_STEP} samples, {workers} at a time, one thread each")
    for i, (name, final, seconds) in enumerate(train_cells(jobs, workers), 1):
        log(f"  [{i}/{len(jobs)}] {name} done in {seconds:.0f} s: KL {final.get('kl/prior_exact', math.nan):.3f}, "
            f"gold {final.get('gold/exact', math.nan):.3f}, proxy {final.get('reward/exact', math.nan):.3f}")
    for name, (m, n, s, start) in cells.items():
        points += trajectory(root / "cells" / name, m, n, s, start)
    study = {"testbed": str((root / "model").relative_to(root.parent)), "gold": GOLD, "max_new_tokens": MAX_NEW_TOKENS,
             "context": "", "n_labels": list(n_labels), "seeds": list(seeds), "betas": list(betas), "main_beta": MAIN_BETA,
             "steps": steps, "samples_per_step": N_PER_STEP, "lr": LR, "best_of_n": list(BON_NS), "exact": True,
             "n_sequences": len(space.texts), "gold_prior": float((space.logp0.exp() * space.gold).sum())}
    atomic_write_text(root / "proxies.json", json.dumps(proxies, indent=1))
    atomic_write_text(root / "curves.jsonl", "".join(json.dumps(p) + "\n" for p in points))
    atomic_write_text(root / "study.json", json.dumps(study, indent=1))
    write_outputs(root)
    return root


def finals_of(root: Path, study: dict, space) -> dict:
    """Each cell's final policy, exactly: its KL, gold, the proxy's posterior at its beta (and the gold posterior)."""
    from tiltlm.exact import expectation, kl
    from tiltlm.exact.quantities import normalise
    from tiltlm.policies import HFPolicy

    out, main = {}, study["main_beta"]
    for n in study["n_labels"]:
        for s in study["seeds"]:
            proxy = proxy_values(space, root / "proxies" / f"N{n}_seed{s}" / "rm")
            for m in methods(tuple(study["betas"]), main):
                policy_dir = root / "cells" / m.cell(n, s) / "policy"
                if not policy_dir.is_dir():
                    continue
                log_pi = space.enumerated.log_prob(HFPolicy.from_pretrained(str(policy_dir), max_new_tokens=study["max_new_tokens"]))
                beta = m.beta if m.beta is not None else main
                post, gold_post = normalise(space.logp0 + proxy / beta)[0], normalise(space.logp0 + space.gold / beta)[0]
                out[(m.name, m.beta, n, s)] = {
                    "kl": kl(log_pi, space.logp0), "gold": expectation(log_pi, space.gold),
                    "kl_to_posterior": kl(log_pi, post), "kl_to_gold_posterior": kl(log_pi, gold_post),
                    "posterior": {"kl": kl(post, space.logp0), "gold": expectation(post, space.gold)},
                    "gold_posterior": {"kl": kl(gold_post, space.logp0), "gold": expectation(gold_post, space.gold)}}
    return out


def write_outputs(root: Path) -> dict:
    """verdict.json and report/ (figure + page) of an exact overopt study, from its files."""
    from tiltlm.experiments.grid import one_thread
    from tiltlm.experiments.overopt_verdict import frontier_at, read_points, verdict_of, write_report

    root = Path(root)
    study = json.loads((root / "study.json").read_text())
    points = read_points(root)
    with one_thread():
        space = space_of(root.parent / study["testbed"])
        finals = finals_of(root, study, space)
        frontier = functools.lru_cache(maxsize=None)(lambda k: frontier_at(space.logp0, space.gold, k))  # a KL asked twice: once
        verdict = verdict_of(points, study, finals, frontier)
    atomic_write_text(root / "verdict.json", json.dumps(verdict, indent=1))
    write_report(root, points, study, verdict)
    return verdict
