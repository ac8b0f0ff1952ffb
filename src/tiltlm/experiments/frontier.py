"""The reward–KL frontier figure of `tiltlm report`: each configuration's mean (± std over seeds) E[r] against
KL(pi‖pi0), exact keys where the cells have them, p* as stars (exact from exact.json, or estimated by importance
sampling), best-of-n at its KL bound, labels placed off the markers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from tiltlm.experiments.cells import KL_PRIOR, REWARD, mean_std, num, pick
from tiltlm.experiments.style import legend_label, new_figure, save_figure, style_of

def _kind(keys: tuple[str, str], used: set, estimate: str) -> str:
    exact, est = keys[0] in used, keys[1] in used
    return " (exact where available)" if exact and est else " (exact)" if exact else f" ({estimate})"


class FrontierPoint(NamedTuple):
    """One marker of the frontier: mean and std over seeds of KL(pi||pi0) (x) and E[r] (y)."""

    group: str  # legend entry: the algorithm (with " (KL upper bound)" for a bound)
    label: str  # the text beside the marker ("β=0.2", "n4")
    x: float
    x_sd: float | None
    y: float
    y_sd: float | None
    bound: bool = False  # x is an upper bound on the KL (best-of-n: log n - (n-1)/n)


def frontier_data(groups: dict, targets: list) -> dict:
    """What the frontier figure plots, from the cells and exact.json:
    points: FrontierPoint per configuration; stars: [(beta, x, y, estimated)] for p*, exact from exact.json and,
    where there is none for that beta, estimated from a cell whose final row has kl/target_prior_is (the
    importance-sampling cell: its reward is p*'s estimated reward); prior: pi0's reward (at KL 0) or None; used: keys."""
    points: list[FrontierPoint] = []
    estimated: list[tuple[float | None, float, float]] = []
    used: set = set()
    for config, cells in groups.items():
        # p* estimated by importance sampling: plotted as p* (a star), not as a policy
        est = [(num(c.final, "kl/target_prior_is"), pick(c.final, REWARD)) for c in cells]
        est = [(x, y) for x, y in est if x is not None and y and math.isfinite(x) and math.isfinite(y[1])]
        if est:
            used |= {"kl/target_prior_is", *(y[0] for _, y in est)}
            estimated.append((config.beta, mean_std([x for x, _ in est])[0], mean_std([y[1] for _, y in est])[0]))
            continue
        for keys, bound in ((KL_PRIOR, False), (("kl/prior_seq_bound",), True)):
            xy = [(pick(c.final, keys), pick(c.final, REWARD)) for c in cells]
            xy = [(x, y) for x, y in xy if x and y and math.isfinite(x[1]) and math.isfinite(y[1])]
            if xy:
                used |= {x[0] for x, _ in xy} | {y[0] for _, y in xy}
                (x, x_sd), (y, y_sd) = mean_std([x[1] for x, _ in xy]), mean_std([y[1] for _, y in xy])
                group = config.name + (" (KL upper bound)" if bound else "")
                points.append(FrontierPoint(group, config.label, x, x_sd, y, y_sd, bound))
                break
    stars = []
    exact_betas = []
    for beta, t in targets:
        x, y = num(t, "kl_target_prior"), num(t, "reward_target")
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            stars.append((beta, x, y, False))
            exact_betas.append(beta)
    for beta, x, y in estimated:
        if not any(b == beta or (b is not None and beta is not None and math.isclose(b, beta)) for b in exact_betas):
            stars.append((beta, x, y, True))
    priors = [num(t, "reward_prior") for _, t in targets if num(t, "reward_prior") is not None]
    return {"points": points, "stars": stars, "prior": priors[0] if priors else None, "used": used}


def _x_scale(xs: list[float]) -> tuple[str, float | None]:
    """'log' when every KL is > 0, 'symlog' (linear within linthresh of 0) when zeros or negative estimates occur,
    'linear' when nothing is positive."""
    positive = [x for x in xs if x > 0]
    if not positive:
        return "linear", None
    if len(positive) == len(xs):
        return "log", None
    return "symlog", 10 ** math.floor(math.log10(min(positive)))


def _place_labels(fig, ax, items: list[tuple[str, float, float, str]], obstacles: list[tuple[float, float]], radius_pt: float = 6.0):
    """Annotate each (text, x, y, colour) beside its marker, at the first offset where the label covers no marker,
    no earlier label and stays inside the axes (else where it overlaps least)."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # the final layout (labels are kept out of it: in_layout False)
    renderer = fig.canvas.get_renderer()
    r = radius_pt * fig.dpi / 72
    to_px = ax.transData.transform
    marks = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in (to_px((x, y)) for x, y in obstacles)]
    frame = ax.get_window_extent(renderer)
    offsets = [(7, 5), (7, -13), (-7, 5), (-7, -13), (0, 9), (0, -17), (10, -4), (-10, -4),
               (12, 12), (12, -20), (-12, 12), (-12, -20), (0, 18), (0, -26)]
    placed: list = []
    for text, x, y, colour in items:
        best = None
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color=colour,
                              ha="left" if dx > 0 else "right" if dx < 0 else "center", va="bottom",
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer)
            cost = sum(overlap(box, b) for b in marks + placed) + (0 if frame.contains(box.x0, box.y0) and
                                                                   frame.contains(box.x1, box.y1) else box.width * box.height)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])


def overlap(a, b) -> float:
    w, h = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def frontier_figure(groups: dict, targets: list, path: Path) -> tuple[str, str] | None:
    """Reward vs KL(pi||pi0) per configuration, mean ± std over seeds; p* (exact or estimated) and pi0 as references.
    Returns (plotted keys, caption) or None when there is nothing to plot."""
    data = frontier_data(groups, targets)
    points, stars, prior, used = data["points"], data["stars"], data["prior"], data["used"]
    if not points and not stars:
        return None
    xs = [p.x for p in points] + [s[1] for s in stars] + ([0.0] if prior is not None else [])
    scale, linthresh = _x_scale(xs)
    fig = new_figure(8, 5.2)
    ax = fig.add_subplot()
    if scale == "log":
        ax.set_xscale("log", nonpositive="clip")
    elif scale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
    by_group: dict[str, list[FrontierPoint]] = {}
    for p in points:
        by_group.setdefault(p.group, []).append(p)
    style = style_of(list(dict.fromkeys(p.group.removesuffix(" (KL upper bound)") for p in points)))
    labels = []
    for group, pts in by_group.items():
        colour, marker = style[group.removesuffix(" (KL upper bound)")]
        pts = sorted(pts, key=lambda p: p.x)
        bound = pts[0].bound
        ax.errorbar([p.x for p in pts], [p.y for p in pts], xerr=None if bound else [p.x_sd or 0 for p in pts],
                    yerr=[p.y_sd or 0 for p in pts], color=colour, marker=marker, ms=7, lw=0 if bound else 1, capsize=3,
                    mfc="white" if bound else colour, label=legend_label(group), zorder=3)
        for p in pts:
            if bound:  # the true KL is smaller: an arrow pointing to lower KL
                ax.annotate("", (p.x * 0.55 if scale != "linear" else p.x * 0.8, p.y), (p.x, p.y),
                            arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.2}).set_in_layout(False)
            if p.label:
                labels.append((p.label, p.x, p.y, colour))
    for beta, x, y, est in stars:
        ax.plot([x], [y], "*", ms=15, color="black" if not est else "white", mec="black", zorder=4,
                label=("p* (estimated: importance sampling)" if est else "p* (exact)"))
        labels.append(("p*" + ("" if beta is None else f" β={beta:g}") + (" (est.)" if est else ""), x, y, "black"))
    if prior is not None:
        ax.plot([0.0], [prior], "o", mfc="white", mec="black", ms=8, label="π0 (prior)", zorder=4)
    ax.set_xlabel(r"KL($\pi\,\|\,\pi_0$)" + _kind(KL_PRIOR, used, "estimated")
                  + {"log": ", log scale", "symlog": ", symmetric log scale", "linear": ""}[scale])
    ax.set_ylabel("E[r]" + _kind(REWARD, used, "batch mean"))
    ax.set_title("Reward vs divergence from the prior")
    ax.margins(0.12)  # room for the point labels
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))  # one entry per p* kind
    fig.legend(list(unique.values()), list(unique), loc="outside right upper", fontsize=9)
    _place_labels(fig, ax, labels, [(p.x, p.y) for p in points] + [(s[1], s[2]) for s in stars]
                  + ([(0.0, prior)] if prior is not None else []))
    save_figure(fig, path)
    keys = [k for k in (*KL_PRIOR, "kl/prior_seq_bound", "kl/target_prior_is") if k in used]
    ykeys = [k for k in REWARD if k in used]
    return f"x = {' / '.join(keys)}, y = {' / '.join(ykeys)}", _frontier_caption(data, scale, linthresh)


def _betas_text(betas) -> str:
    return ", ".join(f"β={b:g}" for b in betas if b is not None) or "its β"


def _frontier_caption(data: dict, scale: str, linthresh: float | None) -> str:
    points, stars = data["points"], data["stars"]
    parts = []
    if points:
        groups = list(dict.fromkeys(p.group for p in points))
        several = any(p.x_sd is not None or p.y_sd is not None for p in points)
        parts.append(f"Final E[r] against KL(π‖π0) for {', '.join(groups)}: mean over seeds"
                     + (", error bars one standard deviation" if several else " (one seed each, no error bars)")
                     + "; each point is labelled with its β or variant.")
    bounds = [p for p in points if p.bound]
    if bounds:
        parts.append(f"{', '.join(dict.fromkeys(p.group.removesuffix(' (KL upper bound)') for p in bounds))} "
                     "(hollow, arrow) is drawn at the upper bound log n − (n−1)/n on its KL to π0; its true KL is smaller.")
    exact = [s[0] for s in stars if not s[3]]
    est = [s[0] for s in stars if s[3]]
    if exact:
        parts.append(f"Black star{'s' if len(exact) > 1 else ''}: the target p* at {_betas_text(exact)}, exact "
                     "(exact.json: reward_target, kl_target_prior).")
    if est:
        parts.append(f"Hollow star{'s' if len(est) > 1 else ''}: p* at {_betas_text(est)}, estimated — the reward of π0's samples resampled by importance "
                     "sampling, at the importance-sampling estimate of KL(p*‖π0) (kl/target_prior_is).")
    if data["prior"] is not None:
        parts.append("The open circle at KL 0 is the prior π0.")
    if scale == "log":
        parts.append("The KL axis is logarithmic.")
    elif scale == "symlog":
        parts.append(f"The KL axis is symmetric-logarithmic: linear below {linthresh:g}, logarithmic above.")
    parts.append("Reward maximisation buys reward with ever larger KL"
                 + ("; KL-regularised and distribution-matching methods should sit near p* (the stars), the best reward "
                    "attainable at its KL." if stars else "."))
    return " ".join(parts)
