"""pass@k in `tiltlm report`: the held-out evaluation rows (eval/… keys, tiltlm.evaluate) as a figure and a table.

pi0 is the step-0 evaluation row (``eval.at_start``), averaged over every cell that has one (one prior; the
estimates of different seeds are averaged, the exact values are equal); each configuration (the report's seed
groups) is its last evaluation row after step 0, averaged over its seeds. A curve is pass@k against k on a
log-2 axis: solid = the unbiased estimate eval/pass@k, dashed = eval/pass@k_exact where the space was enumerated.
The crossover of a configuration is the smallest k at which pi0's pass@k rises above the policy's when the policy
was at least as good at k = 1 (exact curves when both have them), the point where sampling the base model more
often beats the fine-tuned one.
"""

from __future__ import annotations

import html
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

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


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


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


def crossover(pi0: Line, line: Line) -> tuple[int | None, str]:
    """(k, which curves) of the smallest k where pi0's pass@k exceeds the policy's, the policy being at least as good at
    the smallest k; (None, why) otherwise."""
    exact = bool(pi0.curve(True)) and bool(line.curve(True))
    a, b = pi0.curve(exact), line.curve(exact)
    ks = [k for k in a if k in b]
    kind = "exact" if exact else "estimate"
    if not ks:
        return None, "no common k"
    if a[ks[0]] > b[ks[0]]:
        return None, f"π0 ahead from k={ks[0]}"
    k = next((k for k in ks if a[k] > b[k]), None)
    return (k, kind) if k is not None else (None, f"none up to k={ks[-1]}")


def figure(pi0: Line | None, others: list[Line], path: Path) -> str | None:
    """Write pass_at_k.png; returns the keys plotted (None without data)."""
    from tiltlm.experiments.report import COLOURS, MARKERS, _figure, _save, legend_label

    drawn = [(pi0, "black", "o")] if pi0 is not None else []
    drawn += [(line, COLOURS[i % len(COLOURS)], MARKERS[(i + 1) % len(MARKERS)]) for i, line in enumerate(others)]
    if not any(line.curve() or line.curve(True) for line, _, _ in drawn):
        return None
    fig = _figure(8, 5.2)
    ax = fig.add_subplot()
    ks, kinds = set(), set()
    for line, colour, marker in drawn:
        for exact in (False, True):
            c = line.curve(exact)
            if c:
                ks |= set(c)
                kinds.add(exact)
                ax.plot(list(c), list(c.values()), color=colour, ls="--" if exact else "-", marker=None if exact else marker,
                        lw=1.4 if line is pi0 else 1.2, label=legend_label(line.name + (", exact" if exact else "")))
    if pi0 is not None:
        for line, colour, _ in drawn[1:]:
            k, kind = crossover(pi0, line)
            if k is not None:
                y = pi0.curve(kind == "exact")[k]
                ax.plot([k], [y], "X", color=colour, ms=11, mec="black", zorder=5)
                ax.annotate(f"π0 overtakes at k={k}", (k, y), textcoords="offset points", xytext=(6, -12), fontsize=8, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.set_xlabel("k (log scale)")
    ax.set_ylabel("pass@k (held-out prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("pass@k: π0 against the trained policies")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9)
    _save(fig, path)
    return " / ".join(k for k, e in (("eval/pass@k", False), ("eval/pass@k_exact", True)) if e in kinds)


def columns(pi0: Line | None, others: list[Line]) -> list[tuple[str, str]]:
    """(key, header) of the table: pass@1, pass@K (K the largest k evaluated), the others that some row has."""
    every = ([pi0] if pi0 is not None else []) + others
    big = max((k for line in every for k in line.curve()), default=1)
    wanted = [("eval/pass@1", "pass@1"), (f"eval/pass@{big}", f"pass@{big}"), *OTHER_COLUMNS,
              ("eval/pass@1_exact", "pass@1 exact"), (f"eval/pass@{big}_exact", f"pass@{big} exact"), *EXACT_COLUMNS]
    wanted = list(dict.fromkeys(wanted))  # K = 1: one pass column
    return [(k, h) for k, h in wanted if any(k in line.values for line in every)]


def table(pi0: Line | None, others: list[Line]) -> tuple[list[str], list[tuple[Line, list[tuple[str, float | None]], str]]]:
    """(headers, [(line, [(key, mean or None)], crossover text)]) with pi0 first: what the HTML and the console show
    ("runs": the evaluation rows averaged, one per seed; pi0's one per cell)."""
    cols = columns(pi0, others)
    rows = []
    for line in ([pi0] if pi0 is not None else []) + others:
        values = line.values
        cross = "—" if line is pi0 or pi0 is None else _crossover_text(*crossover(pi0, line))
        rows.append((line, [(k, values.get(k)) for k, _ in cols], cross))
    return ["method", "runs", *[h for _, h in cols], "crossover k"], rows


def _crossover_text(k: int | None, note: str) -> str:
    return f"{k} ({note})" if k is not None else note


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
        parts.append("Solid lines with markers: the unbiased estimate from n completions per prompt" + (";" if len(kinds) > 1 else "."))
    if "eval/pass@k_exact" in kinds:
        parts.append(("dashed" if len(kinds) > 1 else "Dashed lines") + ": exact values on an enumerable space.")
    if pi0 is not None and any(crossover(pi0, line)[0] is not None for line in others):
        parts.append("A cross marks the crossover, the smallest k where π0 overtakes that policy.")
    return " ".join(parts)


def section_html(pi0: Line | None, others: list[Line], used: str | None) -> str:
    """The report's pass@k section: the figure and the table (each number's key and exact mean in data- attributes)."""
    from tiltlm.experiments.report import _fmt

    headers, rows = table(pi0, others)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for line, values, cross in rows:
        tds = "".join(f'<td class="num" data-key="{k}" data-mean="{v!r}" title="{k}">{_fmt(v)}</td>' for k, v in values)
        body.append(f'<tr class="passk"><td>{html.escape(line.name)}</td><td class="num">{len(line.rows)}</td>{tds}'
                    f'<td class="num">{html.escape(cross)}</td></tr>')
    parts = ["<h2>pass@k on held-out prompts</h2>"]
    if used is not None:
        parts.append(f'<figure><img src="{FIGURE}" alt="pass@k against k for π0 and each policy">'
                     f"<figcaption>{html.escape(caption(pi0, others, used))} Plotted keys: <code>{html.escape(used)}</code>.</figcaption></figure>")
    parts.append('<div class="scroll"><table><caption>Held-out evaluation: π0 at step 0 and each configuration\'s last '
                 "evaluation, mean over seeds (distinct correct: per prompt; KL per prompt, nats)</caption>"
                 f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    return "\n".join(parts)


def console_rows(pi0: Line | None, others: list[Line]) -> tuple[list[str], list[list[str]]]:
    """The same table as text cells (for the CLI)."""
    from tiltlm.experiments.report import _fmt

    headers, rows = table(pi0, others)
    return headers, [[line.name, str(len(line.rows)), *[_fmt(v) for _, v in values], cross] for line, values, cross in rows]
