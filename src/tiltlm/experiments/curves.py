"""Training-curve figures of `tiltlm report`: the divergence to p* over samples seen (exact where available, one panel
per beta) and diversity over training (distinct-n over words, or over token ids where the texts have no words;
self-BLEU; entropy)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from tiltlm.experiments.cells import ENTROPY, KL_TARGET, Cell, num
from tiltlm.experiments.style import STYLES, fmt_beta, legend_label, new_figure, save_figure, style_of

def series(rows: list[dict], keys: tuple[str, ...]) -> tuple[list, list, bool] | None:
    """(x = samples seen, y, is_exact) of the first key with ≥ 2 finite points (else of any with 1);
    estimates, noisy per batch, are smoothed by a trailing mean over 5% of the run."""
    found = []
    for key in keys:
        pts = [(num(r, "samples/seen"), num(r, key)) for r in rows]
        pts = [(x, y) for x, y in pts if x is not None and y is not None and math.isfinite(y)]
        if pts:
            found.append((key, pts))
    key, pts = next((f for f in found if len(f[1]) >= 2), found[0] if found else (None, None))
    if key is None:
        return None
    exact, ys = key.endswith("exact"), [y for _, y in pts]
    if not exact:
        w = max(1, len(ys) // 20)
        ys = [statistics.fmean(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
    return [x for x, _ in pts], ys, exact


def divergence_figure(groups: dict, path: Path) -> str | None:
    """KL(p*||pi) over samples seen, one panel per beta, one line per cell (solid = exact, dashed = IS)."""
    by_beta: dict = {}
    for config, cells in groups.items():
        for c in cells:
            s = series(c.curve, KL_TARGET)
            if s:
                by_beta.setdefault(config.beta, []).append((config.algorithm, *s))
    if not by_beta:
        return None
    from matplotlib.lines import Line2D

    style = style_of(list(dict.fromkeys(a for lines in by_beta.values() for a, *_ in lines)))
    n = len(by_beta)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig = new_figure(max(8.0, 3.8 * ncols + 2), 3.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    positive = all(y > 0 for lines in by_beta.values() for *_, ys, _ in lines for y in ys)
    kinds = set()
    for ax, (beta, lines) in zip(axes, sorted(by_beta.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0))):
        for alg, xs, ys, exact in lines:
            kinds.add(exact)
            colour, marker = style[alg]
            ax.plot(xs, ys, color=colour, ls="-" if exact else "--", marker=marker if exact else None, ms=4, lw=1.2)
        ax.set_title(f"β = {fmt_beta(beta)}", fontsize=10)
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
        if positive:
            ax.set_yscale("log")
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].set_ylabel(r"KL($p^*\,\|\,\pi$)")
    handles = [Line2D([], [], color=c, marker=m, label=legend_label(a)) for a, (c, m) in style.items()]
    handles += [Line2D([], [], color="grey", ls="-", marker="o", label="exact")] if True in kinds else []
    handles += [Line2D([], [], color="grey", ls="--", label="IS estimate (smoothed)")] if False in kinds else []
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    kind = "exact" if kinds == {True} else "IS estimate" if kinds == {False} else "exact (solid) and IS estimate (dashed)"
    fig.suptitle(f"KL(p*‖π) over training: {kind}" + (", log scale" if positive else ""))
    save_figure(fig, path)
    styles = []
    if True in kinds:
        styles.append("solid lines with markers are exact (enumerated) values")
    if False in kinds:
        styles.append("dashed lines importance-sampling estimates, smoothed by a trailing mean over 5% of the run")
    betas = sorted(by_beta, key=lambda b: (b is None, b or 0.0))
    caption = (f"KL(p*‖π), the forward divergence to the target, against the number of samples drawn: one line per cell, "
               f"coloured by algorithm ({', '.join(style)}), one panel per β ({', '.join(fmt_beta(b) for b in betas)}); "
               f"{' and '.join(styles)}{'; log scale' if positive else ''}. A method that approximates p* drives it towards 0; "
               "a collapsing one makes it grow.")
    return f"y = {' / '.join(k for k, e in zip(KL_TARGET, (True, False)) if e in kinds)}", caption


def distinct_keys(cells: list[Cell]) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(distinct-1 keys, distinct-2 keys, "words" or "tokens"): word n-grams (diversity/distinct_n), unless every word
    distinct-2 value is 0 while token values exist — texts without word boundaries (a letter vocabulary decodes to one
    word per sample, so there are no word bigrams) — then token n-grams (diversity/distinct_n_tokens)."""
    rows = [r for c in cells for r in [c.final, *c.curve]]
    words = [v for r in rows if (v := num(r, "diversity/distinct_2")) is not None and math.isfinite(v)]
    tokens = [v for r in rows if (v := num(r, "diversity/distinct_2_tokens")) is not None and math.isfinite(v)]
    if tokens and not any(words):
        return ("diversity/distinct_1_tokens",), ("diversity/distinct_2_tokens",), "tokens"
    return ("diversity/distinct_1",), ("diversity/distinct_2",), "words"


def _diversity_panels(cells: list[Cell]) -> list[tuple[tuple[str, ...], str]]:
    d1, d2, unit = distinct_keys(cells)
    grams = "token" if unit == "tokens" else "word"
    return [(d1, f"distinct-1, {grams} n-grams (higher = more diverse)"), (d2, f"distinct-2, {grams} n-grams"),
            (("diversity/self_bleu",), "self-BLEU (lower = more diverse)"), (ENTROPY, "sequence entropy (nats)")]


def diversity_figure(groups: dict, path: Path) -> tuple[str, str] | None:
    """Distinct-1, distinct-2, self-BLEU and sequence entropy over training; colour = algorithm, line style = beta."""
    cells = [c for group in groups.values() for c in group]
    diversity = _diversity_panels(cells)
    panels = [[(c.algorithm, c.beta, s) for c in cells if (s := series(c.curve, keys))] for keys, _ in diversity]
    if not any(panels):
        return None
    from matplotlib.lines import Line2D

    style = style_of(list(dict.fromkeys(a for lines in panels for a, _, _ in lines)))
    betas = sorted({b for lines in panels for _, b, _ in lines}, key=lambda b: (b is None, b or 0.0))
    dash = {b: STYLES[i % len(STYLES)] for i, b in enumerate(betas)}
    fig = new_figure(11, 6.6)
    for ax, lines, (keys, title) in zip(fig.subplots(2, 2).ravel(), panels, diversity):
        for alg, beta, (xs, ys, exact) in lines:
            ax.plot(xs, ys, color=style[alg][0], ls=dash[beta], lw=1.2, marker=style[alg][1] if exact else None, ms=3)
        exact = {e for _, _, (_, _, e) in lines}
        ax.set_title(title + (" — exact" if exact == {True} else " — exact where available" if exact == {True, False} else ""),
                     fontsize=10)
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
        if not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    handles = [Line2D([], [], color=c, label=legend_label(a)) for a, (c, _) in style.items()]
    handles += [Line2D([], [], color="grey", ls=dash[b], label=f"β = {fmt_beta(b)}") for b in betas]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    fig.suptitle("Diversity over training (batch estimates smoothed over 5% of each run)")
    save_figure(fig, path)
    names = {"diversity/distinct_1": "distinct-1", "diversity/distinct_2": "distinct-2",
             "diversity/distinct_1_tokens": "distinct-1", "diversity/distinct_2_tokens": "distinct-2",
             "diversity/self_bleu": "self-BLEU (similarity between the samples of one batch)"}
    shown = [names.get(keys[0], "sequence entropy") for (keys, _), lines in zip(diversity, panels) if lines]
    empty = [names.get(keys[0], "sequence entropy").split(" (")[0] for (keys, _), lines in zip(diversity, panels) if not lines]
    unit = distinct_keys(cells)[2]
    caption = (f"{', '.join(shown)} against the number of samples drawn, per cell; colour is the algorithm"
               + (", line style the β" if len(betas) > 1 else "") + ".")
    if any(k.startswith("distinct") for k in shown):
        caption += (" Distinct-n is the fraction of unique n-grams in a batch, "
                    + ("over token ids: the sampled texts have no word boundaries (one word per sample), so word bigrams "
                       "do not exist." if unit == "tokens" else "over whitespace-separated words."))
    if empty:
        caption += f" No data for: {', '.join(empty)}."
    caption += " Collapse shows as falling distinct-n and entropy and rising self-BLEU."
    return ", ".join(" / ".join(keys) for (keys, _), lines in zip(diversity, panels) if lines), caption
