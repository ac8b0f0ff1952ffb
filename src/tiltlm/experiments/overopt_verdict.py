"""The overoptimization study's numbers, read back from its files: the gold-optimal frontier, Gao et al.'s fits, the
verdict with intervals, the figure and the part's report (docs/math.md §16).

Both parts of the study use it: the exact twin (tiltlm.experiments.overopt, whose `write_outputs` re-enumerates the
testbed for the cells' final policies) and the LM part (tiltlm.experiments.overopt_lm, estimates, no frontier); each
rewrites its verdict.json and report/ from its files alone. Per seed s (one label draw, one proxy, one training run of
each method) every number of the exact twin is exact; the intervals are over the seeds (tiltlm.experiments.intervals.difference: the mean over seeds with its 95% bootstrap
interval). One seed gives a zero-width interval and says nothing about the next seed: every call is then
"undetermined" (the numbers stay, exact for that seed).

The calls, with GOLD_MARGIN the difference in E[g] that counts as "the same" (0.02: 3% of the frontier's whole gain
from pi0 to the best gold on this testbed):

- **early stopping** — each kl-pg beta's endpoint (KL k_s, gold G_s) against reinforce stopped the first time its
  KL reaches k_s (its trajectory interpolated linearly between evaluated steps): D = mean_s (G_s − R_s(k_s)). "more"
  where D's interval is above +margin (the KL penalty reaches gold early stopping does not: more than a hack), "less"
  where below −margin, "same" where inside ±margin (the penalty acts as early stopping, Gao et al.'s reading), else
  "undetermined". A seed whose reinforce never reached k_s is left out (and counted).
- **posterior** — each KL-regularised endpoint against its own target, the proxy's posterior pi0·exp(r̂/beta)/Z
  (DPO also against the gold posterior pi0·exp(g/beta)/Z, its population fixed point with BT labels on the gold:
  docs/math.md §14): Δgold with the same four calls ("same" = it reached its posterior's gold) and the exact
  KL(pi‖posterior).
- **frontier fraction** — (E_q[g] − E_pi0[g]) / (F(KL(q‖pi0)) − E_pi0[g]) for the proxy's posterior q at each beta
  and for each endpoint, F the gold-optimal frontier (`frontier_at`): 1 on the frontier, 0 no better than pi0.
- **with N** — each early-stopping difference at the largest N minus the smallest (seeds resampled independently).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import torch

from tiltlm.errors import TiltlmError
from tiltlm.experiments.intervals import LEVEL, Interval, difference
from tiltlm.io import atomic_write_text

GOLD_MARGIN = 0.02
MORE, LESS, SAME, UNDETERMINED = "more", "less", "same", "undetermined"


# ---- the frontier ----------------------------------------------------------------------------------------------------


def frontier_at(logp0: torch.Tensor, gold: torch.Tensor, kl_budget: float, *, tol: float = 1e-12) -> float:
    """F(k) = max { E_q[g] : KL(q‖pi0) ≤ k }, exactly: attained by q_λ ∝ pi0·exp(λ·g) at the λ ≥ 0 where KL(q_λ‖pi0) = k
    (KL grows with λ: dKL/dλ = λ·Var_q(g)), found by bisection; max g where k is at least KL of pi0 restricted to
    the argmax (docs/math.md §16.1)."""
    from tiltlm.exact import expectation, kl
    from tiltlm.exact.quantities import normalise

    logp0, gold = logp0.double(), gold.double()
    if not kl_budget > 0:
        return expectation(logp0, gold)
    top = gold >= gold[logp0 > -math.inf].max()
    if kl_budget >= kl(normalise(torch.where(top, logp0, -math.inf))[0], logp0) - tol:
        return float(gold[top].max())
    tilt = lambda lam: normalise(logp0 + lam * gold)[0]  # noqa: E731
    lo, hi = 0.0, 1.0
    while kl(tilt(hi), logp0) < kl_budget:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl(tilt(mid), logp0) < kl_budget else (lo, mid)
        if hi - lo < tol * max(1.0, hi):
            break
    return expectation(tilt(lo), gold)


# ---- Gao et al.'s functional forms ----------------------------------------------------------------------------------


def fit_form(d: np.ndarray, gain: np.ndarray, form: str) -> dict[str, float]:
    """Least squares of gain = d·(alpha − beta·d) ("bon") or d·(alpha − beta·log d) ("rl") over points with d > 0
    (Gao, Schulman & Hilton 2022, eqs. 1–2; d = sqrt(KL(pi‖pi0)), gain = E_pi[g] − E_pi0[g]): {alpha, beta, r2}."""
    d, gain = np.asarray(d, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    keep = d > 1e-9
    d, gain = d[keep], gain[keep]
    if len(d) < 2:
        raise TiltlmError(f"a {form} fit needs at least two points with KL > 0 (got {len(d)}); train longer (--budget)")
    second = d * d if form == "bon" else d * np.log(d)
    design = np.stack([d, -second], 1)
    (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
    resid = gain - design @ np.array([alpha, beta])
    total = float(((gain - gain.mean()) ** 2).sum())
    return {"alpha": float(alpha), "beta": float(beta), "r2": 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0}


def check_points(points: list[dict]) -> None:
    """Refuse a curves file with a non-finite number (a broken run): one line naming the point."""
    for p in points:
        for k in ("kl", "gold", "proxy"):
            if not isinstance(p.get(k), (int, float)) or not math.isfinite(p[k]):
                raise TiltlmError(f"curves.jsonl: {p.get('method')} (N={p.get('n_labels')}, seed {p.get('seed')}) has {k} = "
                                  f"{p.get(k)!r}; rerun tiltlm run --task overopt")


# ---- reading the study back ------------------------------------------------------------------------------------------


def read_points(root: Path) -> list[dict]:
    from tiltlm.experiments.cells import read_jsonl

    path = Path(root) / "curves.jsonl"
    if not path.is_file():
        raise TiltlmError(f"'{root}' has no curves.jsonl; pass the overopt_exact directory of a finished tiltlm run --task overopt")
    points = read_jsonl(path, strict=True)
    check_points(points)
    return points


def early_stopped(trajectory: list[dict], kl_value: float) -> float | None:
    """Gold of a trajectory (points in step order) the first time its KL reaches ``kl_value``, interpolated linearly
    between the two evaluated steps around it; None when it never does."""
    for a, b in zip(trajectory, trajectory[1:]):
        if a["kl"] <= kl_value <= b["kl"] or (a["kl"] >= kl_value and a is trajectory[0]):
            if b["kl"] == a["kl"]:
                return a["gold"]
            t = (kl_value - a["kl"]) / (b["kl"] - a["kl"])
            return a["gold"] + min(max(t, 0.0), 1.0) * (b["gold"] - a["gold"])
    return None


def mean_interval(values: list[float]) -> Interval:
    """The mean over seeds with its LEVEL bootstrap interval (intervals.difference against a zero baseline)."""
    v = np.asarray(values, dtype=np.float64)[:, None]
    return difference(v, np.zeros((1, 1)))


def call(iv: Interval, n_seeds: int, margin: float = GOLD_MARGIN) -> str:
    """more / less / same / undetermined (module docstring); undetermined with fewer than two seeds."""
    if n_seeds < 2:
        return UNDETERMINED
    if iv.lo > margin:
        return MORE
    if iv.hi < -margin:
        return LESS
    if iv.lo >= -margin and iv.hi <= margin:
        return SAME
    return UNDETERMINED


def _by(points: list[dict], **where) -> list[dict]:
    return [p for p in points if all(p.get(k) == v for k, v in where.items())]


def _label(method: str, beta: float | None) -> str:
    return method + (f" β={beta:g}" if beta is not None else "")


def verdict_of(points: list[dict], study: dict, finals: dict, frontier) -> dict:
    """verdict.json from the curves (module docstring). ``finals``: {(method, beta, n, seed): {"kl", "gold",
    "kl_to_posterior", "kl_to_gold_posterior", "gold_posterior"}} of each cell's final policy (exact); ``frontier``:
    kl -> F(kl)."""
    seeds, g0 = study["seeds"], study["gold_prior"]
    out: dict = {"level": LEVEL, "seeds": list(seeds), "exact": bool(study.get("exact", True)), "margin": GOLD_MARGIN, "gold_prior": g0,
                 "n_labels": study["n_labels"], "main_beta": study["main_beta"], "methods": {}, "posteriors": {},
                 "by_n": {}, "fits": {}, "peaks": {}}

    def fraction(kl_value: float, gold_value: float) -> float:
        room = frontier(kl_value) - g0
        return (gold_value - g0) / room if room > 1e-12 else 1.0

    def fractions(pairs: list[tuple[float, float]]) -> dict:  # none without the frontier (the LM part)
        return {} if frontier is None else {"frontier_fraction": mean_interval([fraction(k, g) for k, g in pairs]).as_dict()}

    for n in study["n_labels"]:
        # the proxy's posterior at each method beta (exact, per seed)
        for b in sorted({k[1] for k in finals if k[1] is not None}, reverse=True):
            by_seed = {k[3]: f["posterior"] for k, f in finals.items() if k[1] == b and k[2] == n}  # one per seed
            post = [by_seed[s] for s in seeds if s in by_seed]
            if post:
                out["posteriors"][f"β={b:g} N={n}"] = {
                    "beta": b, "n_labels": n, "kl": mean_interval([p["kl"] for p in post]).as_dict(),
                    "gold": mean_interval([p["gold"] for p in post]).as_dict(),
                    **fractions([(p["kl"], p["gold"]) for p in post])}
        for (method, beta, nn, _), _f in sorted(finals.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0))):
            if nn != n or method == "reinforce":
                continue
            name = f"{_label(method, beta)} N={n}"
            if name in out["methods"]:
                continue
            seeded = [(s, finals[(method, beta, n, s)]) for s in seeds if (method, beta, n, s) in finals]
            ends = [e for _, e in seeded]
            entry: dict = {"method": method, "beta": beta, "n_labels": n,
                           "kl": mean_interval([e["kl"] for e in ends]).as_dict(),
                           "gold": mean_interval([e["gold"] for e in ends]).as_dict(),
                           **fractions([(e["kl"], e["gold"]) for e in ends])}
            vs_post = mean_interval([e["gold"] - e["posterior"]["gold"] for e in ends])
            entry["vs_posterior"] = {**vs_post.as_dict(), "call": call(vs_post, len(ends)),
                                     "kl_to_posterior": float(np.mean([e["kl_to_posterior"] for e in ends]))}
            if method == "dpo" and all("gold_posterior" in e for e in ends):
                vs_gold = mean_interval([e["gold"] - e["gold_posterior"]["gold"] for e in ends])
                entry["vs_gold_posterior"] = {**vs_gold.as_dict(), "call": call(vs_gold, len(ends)),
                                              "kl_to_gold_posterior": float(np.mean([e["kl_to_gold_posterior"] for e in ends]))}
            if method == "kl-pg":
                entry["vs_reinforce_early_stopped"] = _vs_early_stopped(points, n, seeded)
            out["methods"][name] = entry
        _peaks_and_fits(out, points, seeds, n, g0)
    _by_n(out, study["n_labels"])
    out["sentences"] = sentences(out)
    return out


def _vs_early_stopped(points: list[dict], n: int, seeded: list[tuple[int, dict]]) -> dict:
    """A kl-pg endpoint per seed against that seed's reinforce stopped at the endpoint's KL (module docstring)."""
    diffs, missing = [], []
    for s, e in seeded:
        traj = sorted(_by(points, method="reinforce", n_labels=n, seed=s), key=lambda p: p["step"])
        r = early_stopped(traj, e["kl"])
        (missing.append(s) if r is None else diffs.append(e["gold"] - r))
    if not diffs:
        return {"call": UNDETERMINED, "seeds_left_out": missing, "per_seed": []}
    iv = mean_interval(diffs)
    return {**iv.as_dict(), "call": call(iv, len(diffs)), "seeds_left_out": missing, "per_seed": diffs}


def _peaks_and_fits(out: dict, points: list[dict], seeds: list[int], n: int, g0: float) -> None:
    """Each curve's peak gold and the KL there, and Gao et al.'s fit, per seed, into ``out["peaks"]``, ``out["fits"]``."""
    curves = {(p["method"], p["beta"]) for p in points if p["method"] not in ("gold-posterior", "proxy-posterior")}
    for method, beta in sorted(curves, key=lambda mb: (mb[0], -(mb[1] or 0))):
        peaks, kls, fits = [], [], []
        form = "bon" if method == "best-of-n" else "rl"
        for s in seeds:
            curve = _by(points, method=method, beta=beta, n_labels=n, seed=s)
            if not curve:
                continue
            best = max(curve, key=lambda p: p["gold"])
            peaks.append(best["gold"])
            kls.append(best["kl"])
            d = np.sqrt(np.maximum([p["kl"] for p in curve], 0.0))  # a k1 estimate can dip below 0 (the LM part)
            try:
                fits.append(fit_form(d, np.array([p["gold"] for p in curve]) - g0, form))
            except TiltlmError:
                pass
        if not peaks:
            continue
        name = f"{_label(method, beta)} N={n}"
        out["peaks"][name] = {"gold": mean_interval(peaks).as_dict(), "kl": mean_interval(kls).as_dict()}
        if fits:
            out["fits"][name] = {"form": form, **{k: mean_interval([f[k] for f in fits]).as_dict() for k in ("alpha", "beta")},
                                 "r2": float(np.mean([f["r2"] for f in fits]))}


def _by_n(out: dict, ns: list[int]) -> None:
    """Each early-stopping difference at the largest N minus the smallest, into ``out["by_n"]``."""
    if len(ns) < 2:
        return
    for name, entry in out["methods"].items():
        if entry["n_labels"] != ns[-1] or "vs_reinforce_early_stopped" not in entry:
            continue
        small = out["methods"].get(name.replace(f"N={ns[-1]}", f"N={ns[0]}"), {}).get("vs_reinforce_early_stopped", {})
        big = entry["vs_reinforce_early_stopped"]
        if big.get("per_seed") and small.get("per_seed"):
            iv = difference(np.asarray(big["per_seed"])[:, None], np.asarray(small["per_seed"])[:, None])
            n_seeds = min(len(big["per_seed"]), len(small["per_seed"]))
            out["by_n"][_label(entry["method"], entry["beta"])] = {**iv.as_dict(), "call": call(iv, n_seeds), "from": ns[0], "to": ns[-1]}


def _iv(d: dict, digits: int = 3) -> str:
    return Interval(d["diff"], d["lo"], d["hi"]).text(digits)


def sentences(v: dict) -> list[str]:
    """The verdict in words, from a verdict.json alone."""
    m, out = v.get("margin", GOLD_MARGIN), []
    words = {MORE: "more than early stopping: the KL-regularised endpoint has more gold than reinforce stopped at the same KL",
             LESS: "worse than early stopping: reinforce stopped at the same KL has more gold",
             SAME: f"the same as early stopping (within ±{m:g} gold)",
             UNDETERMINED: "cannot be told from early stopping with these seeds"}
    for name, e in v.get("methods", {}).items():
        es = e.get("vs_reinforce_early_stopped")
        if es is None:
            continue
        if "diff" not in es:
            out.append(f"{name}: reinforce never reached its KL ({_iv(e['kl'])}), so early stopping cannot be compared.")
            continue
        left = f" ({len(es['seeds_left_out'])} seed(s) whose reinforce never reached that KL left out)" if es["seeds_left_out"] else ""
        out.append(f"{name} (KL {_iv(e['kl'])}): {words[es['call']]}; Δgold {_iv(es)}{left}.")
    for name, p in v.get("posteriors", {}).items():
        if "frontier_fraction" in p:
            out.append(f"The proxy's posterior at {name} reaches {_iv(p['frontier_fraction'], 2)} of the gold-optimal frontier's "
                       f"gain at its KL ({_iv(p['kl'])}; gold {_iv(p['gold'])}).")
        else:
            out.append(f"The proxy's posterior at {name} (importance-sampled from pi0's pool) has gold {_iv(p['gold'])} at KL "
                       f"{_iv(p['kl'])}.")
    reach = {SAME: "reached its posterior's gold", MORE: "has more gold than its posterior",
             LESS: "has less gold than its posterior", UNDETERMINED: "cannot be told from its posterior's gold"}
    for name, e in v.get("methods", {}).items():
        post = e["vs_posterior"]
        text = f"{name} {reach[post['call']]} (Δgold {_iv(post)}, KL(π‖posterior) {post['kl_to_posterior']:.3f})"
        if "vs_gold_posterior" in e:
            gp = e["vs_gold_posterior"]
            text += f"; against the gold posterior pi0·exp(g/β) Δgold {_iv(gp)} ({gp['call']})"
        out.append(text + ".")
    for name, b in v.get("by_n", {}).items():
        change = {MORE: "grows", LESS: "shrinks", SAME: "does not move", UNDETERMINED: "moves by an amount these seeds cannot tell"}[b["call"]]
        out.append(f"From N = {b['from']} to N = {b['to']} labels, {name}'s gold over early-stopped reinforce {change} "
                   f"(change {_iv(b)}).")
    seeds = v.get("seeds", [])
    if len(seeds) < 2:
        out.append(f"One seed: every number is {'exact' if v.get('exact', True) else 'an estimate'} for it, but nothing says how "
                   "the next label draw, proxy and run would move it, so no call is made (run with --seeds 0,1,2).")
    each = "each seed's numbers are exact" if v.get("exact", True) else "each seed's numbers are estimates from its samples"
    out.append(f"({v.get('level', LEVEL):.0%} intervals over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}: label draws, "
               f"proxies and training runs; {each}; margin ±{m:g} gold.)")
    return out


# ---- the outputs -----------------------------------------------------------------------------------------------------


COLOURS = {"reinforce": "#d62728", "kl-pg": "#1f77b4", "dpg": "#2ca02c", "dpo": "#9467bd", "best-of-n": "#ff7f0e",
           "proxy-posterior": "#7f7f7f", "gold-posterior": "#000000"}


def figure(points: list[dict], study: dict, path: Path) -> None:
    """Gold against d = sqrt(KL(pi‖pi0)), one panel per N: the frontier, the proxy posterior (first seed), best-of-n
    and every trained method's trajectory (every seed, faint) with its endpoints."""
    from tiltlm.experiments.style import new_figure, save_figure

    ns = study["n_labels"]
    fig = new_figure(4.2 * len(ns), 3.8)
    axes = fig.subplots(1, len(ns), sharey=True, squeeze=False)[0]
    first = study["seeds"][0]
    for ax, n in zip(axes, ns):
        def line(method, seed, beta=None, **kw):
            curve = [p for p in points if p["method"] == method and p["n_labels"] == n and p["seed"] == seed
                     and (beta is None or p["beta"] == beta)]
            key = (lambda p: p["kl"]) if method.endswith("posterior") else (lambda p: p.get("step", p.get("n")) or 0)
            curve.sort(key=key)
            ax.plot([math.sqrt(max(p["kl"], 0.0)) for p in curve], [p["gold"] for p in curve], color=COLOURS[method], **kw)
        if any(p["method"] == "gold-posterior" for p in points):
            line("gold-posterior", first, lw=2, label="gold-optimal frontier π0·exp(g/β)")
            top = max(p["gold"] for p in points if p["method"] == "gold-posterior")  # F(k) = max g beyond the argmax's KL
            edge = max(p["kl"] for p in points if p["method"] == "gold-posterior" and p["n_labels"] == n)
            ax.plot([math.sqrt(edge), math.sqrt(max(p["kl"] for p in points if p["n_labels"] == n))], [top, top],
                    color=COLOURS["gold-posterior"], lw=2)
        line("proxy-posterior", first, ls="--", lw=1.5, label="proxy posterior π0·exp(r̂/β)")
        line("best-of-n", first, marker="o", ms=3, lw=1, label="best-of-n (r̂), n = 1…256")
        for s in study["seeds"]:
            for method in ("reinforce", "kl-pg", "dpg", "dpo"):
                betas = sorted({p["beta"] for p in points if p["method"] == method}, key=lambda b: -(b or 0))
                for beta, ls in zip(betas, ("-", ":", "-.")):
                    line(method, s, beta, lw=1, ls=ls, alpha=0.5, label=_label(method, beta) if s == first else None)
        ax.axhline(study["gold_prior"], color="#bbbbbb", lw=0.8)
        ax.set_title(f"N = {n} labels")
        ax.set_xlabel("d = √KL(π‖π0)")
    axes[0].set_ylabel("gold reward E_π[g]" + (" (exact)" if study.get("exact", True) else " (estimated from samples)"))
    axes[-1].legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def write_report(root: Path, points: list[dict], study: dict, verdict: dict) -> Path:
    """report/report.html: the figure, the verdict, the peak and fit tables."""
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    figure(points, study, out / "gold_vs_kl.png")
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{_iv(p['gold'])}</td><td>{_iv(p['kl'])}</td>"
                   + (f"<td>{_iv(verdict['fits'][name]['alpha'])}</td><td>{_iv(verdict['fits'][name]['beta'])}</td>"
                      f"<td>{verdict['fits'][name]['r2']:.3f}</td>" if name in verdict["fits"] else "<td colspan=3>–</td>")
                   + "</tr>" for name, p in verdict["peaks"].items())
    heading = ("Proxy vs gold on an enumerable testbed (every number exact per seed)" if study.get("exact", True) else
               f"Proxy vs gold on the default LM, gold = {html.escape(str(study.get('gold')))} (estimates from samples)")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tiltlm: overoptimization</title>
<style>body{{font-family:sans-serif;max-width:70rem;margin:1.5rem auto;line-height:1.45;padding:0 1rem}}td,th{{padding:.15rem .5rem;text-align:left}}</style></head><body>
<h1>{heading}</h1>
<figure><img src="gold_vs_kl.png" alt="gold reward against sqrt KL"></figure>
<ul>{''.join(f'<li>{html.escape(s)}</li>' for s in verdict['sentences'])}</ul>
<h2>Peak gold, KL at the peak, and Gao et al.'s fits</h2>
<p>Mean over seeds [95% interval]. Fits: best-of-n gain = d(α − β·d), trained policies gain = d(α − β·log d), d = √KL,
gain = E[g] − E_π0[g] = E[g] − {study['gold_prior']:.3f}.</p>
<table><tr><th>curve</th><th>peak gold</th><th>KL at peak</th><th>α</th><th>β</th><th>R²</th></tr>{rows}</table>
</body></html>"""
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
