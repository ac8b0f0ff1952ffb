"""pass@k in `tiltlm report`: the held-out evaluation rows (eval/… keys, tiltlm.evaluate) as a figure and a table.

pi0 is the step-0 evaluation row (``eval.at_start``), averaged over every cell that has one (one prior; the
estimates of different seeds are averaged, the exact values are equal); each configuration (the report's seed
groups) is its last evaluation row after step 0, averaged over its seeds. A curve is pass@k against k on a
log-2 axis: solid = the unbiased estimate eval/pass@k, dashed = eval/pass@k_exact where the space was enumerated.
Beside the curves, where the cells' per-question evaluations allow (tiltlm.experiments.questions), a second panel
draws Δpass@k = policy − pi0 against k with its 95% band over seeds × questions (tiltlm.experiments.intervals) and
the zero line; "π0 ahead from k" is the smallest k whose whole interval is below 0 — the point where sampling the base
model more often beats the fine-tuned one, claimed only where the interval says so.
"""

from __future__ import annotations

import html
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from tiltlm.experiments.cells import num as _num
from tiltlm.experiments.intervals import Interval
from tiltlm.experiments.style import COLOURS, MARKERS, fmt, legend_label, new_figure, save_figure

PASS = re.compile(r"^eval/pass@(\d+)(_exact)?$")
FIGURE = "pass_at_k.png"
# table columns after pass@1 / pass@K: (key, header)
OTHER_COLUMNS = [("eval/distinct_correct", "distinct correct"), ("eval/kl_prior", "KL(π‖π0)"), ("eval/reward", "mean reward")]
EXACT_COLUMNS = [("eval/distinct_correct_exact", "distinct correct exact"), ("eval/kl_prior_exact", "KL(π‖π0) exact"),
                 ("eval/kl_target_exact", "KL(p*‖π) exact"), ("eval/kl_policy_target_exact", "KL(π‖p*) exact")]


@dataclass
class Line:
    """One curve and table row: the mean over ``rows`` (one evaluation row per seed) of every eval/ key they all have."""

    name: str
    beta: float | None
    rows: list[dict]

    @property
    def values(self) -> dict[str, float]:
        keys = [k for k in self.rows[0] if k.startswith("eval/") and all(_num(r, k) is not None for r in self.rows)]
        return {k: statistics.fmean([_num(r, k) for r in self.rows]) for k in keys}

    def curve(self, exact: bool = False) -> dict[int, float]:
        """k -> pass@k (the exact values with ``exact``), by increasing k."""
        out = {}
        for key, v in self.values.items():
            m = PASS.match(key)
            if m and bool(m.group(2)) == exact and math.isfinite(v):
                out[int(m.group(1))] = v
        return dict(sorted(out.items()))


def _is_eval(row: dict) -> bool:
    return _num(row, "eval/pass@1") is not None


def lines(groups: dict) -> tuple[Line | None, list[Line]]:
    """(pi0, one Line per configuration with an evaluation after step 0) from the report's seed groups."""
    starts, out = [], []
    for config, cells in groups.items():
        last = []
        for c in cells:
            evals = [r for r in c.curve if _is_eval(r)]
            starts += [r for r in evals if r.get("step") == 0][:1]
            after = [r for r in evals if r.get("step") != 0] or ([c.final] if _is_eval(c.final) and c.final.get("step") != 0 else [])
            last += after[-1:]
        if last:
            label = config.name + (f" β={config.beta:g}" if config.beta is not None else "")
            out.append(Line(label, config.beta, last))
    return (Line("π0 (step 0)", None, starts) if starts else None), out


Deltas = dict[str, dict[int, Interval]]  # configuration name -> k -> Δpass@k = policy − pi0 with its interval


def ahead_from(deltas: dict[int, Interval] | None) -> int | None:
    """The smallest k at which pi0 is ahead of the policy with an interval excluding 0 (None: at no k, or no intervals)."""
    return min((k for k, iv in (deltas or {}).items() if iv.below_zero), default=None)


def ahead_text(deltas: dict[int, Interval] | None) -> str:
    if not deltas:
        return "— (no per-question data)"
    k = ahead_from(deltas)
    return f"{k}: Δ {deltas[k].text()}" if k is not None else f"at no k ≤ {max(deltas)}"


def best_of_n_line(pi0: Line, n: int) -> Line:
    """Best-of-n with the verifier from pi0's own evaluation: pass@k(BoN_n) = pass@(n·k)(pi0) (one correct among n·k
    pi0 samples), for the k with n·k evaluated."""
    values = pi0.values
    row = {f"eval/pass@{k}{sfx}": values[f"eval/pass@{n * k}{sfx}"] for sfx in ("", "_exact")
           for k in (1, 2, 4, 8, 16, 32, 64) if f"eval/pass@{n * k}{sfx}" in values}
    return Line(f"best-of-{n} (verifier, {n}× samples)", None, [row])


def _curves(ax, drawn: list) -> set:
    """pass@k curves of every drawn line; returns the k drawn."""
    ks = set()
    for line, colour, marker in drawn:
        for exact in (False, True):
            c = line.curve(exact)
            if c:
                ks |= set(c)
                ax.plot(list(c), list(c.values()), color=colour, ls="--" if exact else "-", marker=None if exact else marker,
                        lw=1.4 if line.name.startswith("π0") else 1.2, label=legend_label(line.name + (", exact" if exact else "")))
    return ks


def _delta_panel(ax, drawn: list, deltas: Deltas) -> None:
    """Δpass@k = policy − pi0 against k with the 95% band, the zero line, and a cross where pi0 is ahead."""
    ax.axhline(0.0, color="black", lw=1.0)
    for line, colour, marker in drawn:
        d = deltas.get(line.name)
        if not d:
            continue
        ks = sorted(d)
        ax.fill_between(ks, [d[k].lo for k in ks], [d[k].hi for k in ks], color=colour, alpha=0.18, lw=0)
        ax.plot(ks, [d[k].diff for k in ks], color=colour, marker=marker, lw=1.2)
        k = ahead_from(d)
        if k is not None:
            ax.plot([k], [d[k].diff], "X", color=colour, ms=11, mec="black", zorder=5)
            ax.annotate(f"π0 ahead from k={k}", (k, d[k].diff), textcoords="offset points", xytext=(6, -12), fontsize=8, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (log scale)")
    ax.set_ylabel("Δpass@k = policy − π0 (95% band)")
    ax.set_title("Difference to π0, seeds × questions")
    ax.grid(alpha=0.3)


def figure(pi0: Line | None, others: list[Line], path: Path, deltas: Deltas | None = None) -> str | None:
    """Write the pass@k figure (with ``deltas``, a Δpass@k panel beside it); returns the keys plotted (None without data)."""
    drawn = [(pi0, "black", "o")] if pi0 is not None else []
    drawn += [(line, COLOURS[i % len(COLOURS)], MARKERS[(i + 1) % len(MARKERS)]) for i, line in enumerate(others)]
    if not any(line.curve() or line.curve(True) for line, _, _ in drawn):
        return None
    panel = bool(deltas) and any(line.name in deltas for line in others)
    fig = new_figure(13 if panel else 8, 5.2)
    ax = fig.add_subplot(1, 2, 1) if panel else fig.add_subplot()
    ks = _curves(ax, drawn)
    kinds = {exact for line, _, _ in drawn for exact in (False, True) if line.curve(exact)}
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.set_xlabel("k (log scale)")
    ax.set_ylabel("pass@k (held-out prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("pass@k: π0 against the trained policies")
    ax.grid(alpha=0.3)
    if panel:
        right = fig.add_subplot(1, 2, 2)
        _delta_panel(right, drawn[1 if pi0 is not None else 0:], deltas)
        right.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    fig.legend(loc="outside right upper", fontsize=9)
    save_figure(fig, path)
    used = " / ".join(k for k, e in (("eval/pass@k", False), ("eval/pass@k_exact", True)) if e in kinds)
    return used + (" / Δpass@k intervals" if panel else "")


def columns(pi0: Line | None, others: list[Line]) -> list[tuple[str, str]]:
    """(key, header) of the table: pass@1, pass@K (K the largest k evaluated), the others that some row has."""
    every = ([pi0] if pi0 is not None else []) + others
    big = max((k for line in every for k in line.curve()), default=1)
    wanted = [("eval/pass@1", "pass@1"), (f"eval/pass@{big}", f"pass@{big}"), *OTHER_COLUMNS,
              ("eval/pass@1_exact", "pass@1 exact"), (f"eval/pass@{big}_exact", f"pass@{big} exact"), *EXACT_COLUMNS]
    wanted = list(dict.fromkeys(wanted))  # K = 1: one pass column
    return [(k, h) for k, h in wanted if any(k in line.values for line in every)]


def delta_columns(deltas: Deltas | None) -> list[int]:
    """The k whose Δpass@k the table shows: 1 and the largest."""
    ks = sorted({k for d in (deltas or {}).values() for k in d})
    return list(dict.fromkeys([ks[0], ks[-1]])) if ks else []


def table(pi0: Line | None, others: list[Line], deltas: Deltas | None = None):
    """(headers, [(line, [(key, mean or None)], [Δ texts], ahead text)]) with pi0 first: what the HTML and the console
    show ("runs": the evaluation rows averaged, one per seed; pi0's one per cell)."""
    cols, dks = columns(pi0, others), delta_columns(deltas)
    rows = []
    for line in ([pi0] if pi0 is not None else []) + others:
        values = line.values
        d = (deltas or {}).get(line.name)
        diffs = ["—" if line is pi0 or not d or k not in d else d[k].text() for k in dks]
        ahead = "—" if line is pi0 or pi0 is None else ahead_text(d)
        rows.append((line, [(k, values.get(k)) for k, _ in cols], diffs, ahead))
    return ["method", "runs", *[h for _, h in cols], *[f"Δpass@{k} [95%]" for k in dks], "π0 ahead from k"], rows


def caption(pi0: Line | None, others: list[Line], used: str) -> str:
    """The figure's caption, naming only what ``figure`` drew (``used``: its plotted keys)."""
    parts = ["pass@k on the held-out prompts against k (log scale): the probability that at least one of k completions is "
             "correct, mean over prompts."]
    who = (["π0 is the step-0 evaluation (black)"] if pi0 is not None else []) + (
        [f"{'each' if len(others) > 1 else 'the'} configuration its last evaluation (mean over seeds)"] if others else [])
    if who:
        parts.append(", ".join(who) + ".")
    kinds = used.split(" / ")
    if "eval/pass@k" in kinds:
        parts.append("Solid lines with markers: the unbiased estimate from n completions per prompt" +
                     (";" if "eval/pass@k_exact" in kinds else "."))
    if "eval/pass@k_exact" in kinds:
        parts.append(("dashed" if "eval/pass@k" in kinds else "Dashed lines") + ": exact values on an enumerable space.")
    if "Δpass@k intervals" in kinds:
        parts.append("Right: Δpass@k = policy − π0 with its 95% bootstrap band over seeds × questions and the zero line; a "
                     "cross marks the smallest k whose whole interval is below 0 (π0 ahead from there).")
    return " ".join(parts)


def section_html(pi0: Line | None, others: list[Line], used: str | None, deltas: Deltas | None = None,
                 figure_name: str = FIGURE) -> str:
    """The pass@k section: the figure and the table (each number's key and exact mean in data- attributes)."""
    headers, rows = table(pi0, others, deltas)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for line, values, diffs, ahead in rows:
        tds = "".join(f'<td class="num" data-key="{k}" data-mean="{v!r}" title="{k}">{fmt(v)}</td>' if v is not None
                      else '<td class="num">—</td>' for k, v in values)
        tds += "".join(f'<td class="num">{html.escape(d)}</td>' for d in diffs)
        body.append(f'<tr class="passk"><td>{html.escape(line.name)}</td><td class="num">{len(line.rows)}</td>{tds}'
                    f'<td class="num">{html.escape(ahead)}</td></tr>')
    parts = ["<h2>pass@k on held-out prompts</h2>"]
    if used is not None:
        parts.append(f'<figure><img src="{figure_name}" alt="pass@k against k for π0 and each policy">'
                     f"<figcaption>{html.escape(caption(pi0, others, used))} Plotted keys: <code>{html.escape(used)}</code>.</figcaption></figure>")
    parts.append('<div class="scroll"><table><caption>Held-out evaluation: π0 at step 0 and each configuration\'s last '
                 "evaluation, mean over seeds (distinct correct: per prompt; KL per prompt, nats); Δ = policy − π0 with its "
                 "95% interval over seeds × questions</caption>"
                 f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    return "\n".join(parts)


def console_rows(pi0: Line | None, others: list[Line], deltas: Deltas | None = None) -> tuple[list[str], list[list[str]]]:
    """The same table as text cells (for the CLI)."""
    headers, rows = table(pi0, others, deltas)
    return headers, [[line.name, str(len(line.rows)), *[fmt(v) for _, v in values], *diffs, ahead]
                     for line, values, diffs, ahead in rows]
