"""`tiltlm report DIR`: one self-contained HTML page and PNG figures for a sweep or a training run directory.

Input (what `tiltlm sweep` writes; or the --out directory of `tiltlm train`, config.yaml + metrics.jsonl, read as
one cell named after the directory, its algorithm, beta and seed from config.yaml, its final row metrics.jsonl's last):
  DIR/results.jsonl               one object per finished cell: cell, algorithm, beta, seed, final {metric key: value}
  DIR/cells/<cell>/metrics.jsonl  the cell's training curve (keys of tiltlm/metrics/batch.py); none for inference baselines
  DIR/samples.json                optional: {"prior": [texts], "posterior": [texts], "<cell>": [texts], ...}
  DIR/exact.json                  optional, p*'s exact numbers (keys of `tiltlm exact --json`): one object,
                                  or {"<beta>": object, ...}, or a list of objects each with a "beta"
A sweep still running (no results.jsonl yet) is read from its cells/<cell>/done.json; a top-level `tiltlm run`
directory (run.json) is handed to tiltlm.experiments.run.write_index. Inference baselines in results.jsonl are
drawn on the frontier: a cell with kl/target_prior_is (importance sampling) is p*'s estimate (a hollow star, where
exact.json has no exact p* for its beta), a cell with only kl/prior_seq_bound (best-of-n) sits at that bound.
Output, replaced atomically (written into a temp directory beside it, then renamed):
  DIR/report/report.html, frontier.png, divergence.png, diversity.png, and where metrics.jsonl has held-out
  evaluations (eval/pass@k rows) pass_at_k.png with a pass@k table (tiltlm.experiments.passk).

Exact keys win over estimates wherever a cell has them; every caption is written from what its figure or table
drew and names the keys it plotted; the page names its inputs relative to itself (a report written inside a
temporary directory that is renamed later stays right). Distinct-n is over words unless the texts have none
(every word distinct-2 is 0 while token values exist: a letter vocabulary), then over token ids.
Means and standard deviations (n - 1) are over the seeds of one configuration: algorithm, beta and the
rest of the cell's name once its "_"-separated algorithm, beta<b> and seed<s> parts are removed, so that
"best-of-n_n4_seed0" and "best-of-n_n16_seed0" stay apart and "kl-pg_beta1_seed0/1/2" are averaged. A
half-written last line (a run still writing) is ignored; a figure without data is said so on the page.
"""


from __future__ import annotations

import html
import json
import re
import shutil
import tempfile
from pathlib import Path

from tiltlm.experiments import page as run_page
from tiltlm.experiments import passk, verdict
from tiltlm.experiments.cells import (ENTROPY, KL_POLICY_TARGET, KL_PRIOR, KL_TARGET, REWARD, TV, Cell, groups_of, is_run_index,
                                      load_cells, load_optional, mean_std, num, sortable, source_of, targets_of)
from tiltlm.experiments.curves import distinct_keys, divergence_figure, diversity_figure
from tiltlm.experiments.frontier import frontier_figure
from tiltlm.experiments.style import fmt, fmt_beta
from tiltlm.io import replace_dir

COLUMNS = [  # table columns: (keys, exact first; header)
    (REWARD, "E[r]"), (KL_PRIOR, "KL(π‖π0)"),
    # inference baselines: best-of-n's bound on its KL to pi0, and p*'s own KL to pi0 estimated by importance sampling
    (("kl/prior_seq_bound",), "KL(π‖π0) bound"), (("kl/target_prior_is",), "KL(p*‖π0) est."),
    (KL_TARGET, "KL(p*‖π)"), (KL_POLICY_TARGET, "KL(π‖p*)"), (TV, "TV(π, p*)"),
    (ENTROPY, "entropy"), (("diversity/distinct_1",), "distinct-1"), (("diversity/distinct_2",), "distinct-2"),
    (("diversity/self_bleu",), "self-BLEU"),
    # the interactive case
    (("env/success_rate",), "success"), (("env/turns_mean",), "turns"),
    *[((f"kl/prior_turn_{t}",), f"KL turn {t}") for t in range(1, 5)],
    (("diversity/distinct_first_action",), "distinct 1st actions"),
    (("kl/optimistic_exact",), "KL(q_opt‖π)"), (("kl/variational_exact",), "KL(π‖q_var)"),
]


# p* and pi0 as table rows, from exact.json: (exact key, estimated key) -> exact.json key, or a constant
REFERENCE_ROWS = {
    "p* (target)": {REWARD: "reward_target", KL_PRIOR: "kl_target_prior", KL_TARGET: 0.0, KL_POLICY_TARGET: 0.0, TV: 0.0,
                    ENTROPY: "entropy_target"},
    "π0 (prior)": {REWARD: "reward_prior", KL_PRIOR: 0.0, KL_TARGET: "kl_target_prior", KL_POLICY_TARGET: "kl_prior_target",
                   TV: "tv_prior_target", ENTROPY: "entropy_prior"},
}


def pass_at_k_table(run_dir: Path) -> tuple[list[str], list[list[str]], list[str]] | None:
    """(headers, rows, verdict sentences) of the report's pass@k table for the console (None when no cell has held-out
    evaluations; no sentences without per-question evaluations)."""
    if is_run_index(Path(run_dir)):
        return None  # the parts have their own reports and tables
    groups = groups_of(load_cells(Path(run_dir)))
    pi0, others = passk.lines(groups)
    if pi0 is None and not others:
        return None
    found = verdict.verdict_of(groups)
    headers, rows = passk.console_rows(pi0, others, verdict.deltas(found))
    return headers, rows, [] if found is None else found["sentences"]


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1280px;padding:0 1rem;
  color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666} .note{background:#fff6e0;border-left:4px solid #e6a700;padding:.4rem .8rem} .missing{color:#a33;font-style:italic}
figure{margin:1rem 0} figure img{max-width:100%;height:auto;border:1px solid #eee} figcaption{color:#444;font-size:.92rem}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.88em}
.scroll{overflow-x:auto} table{border-collapse:collapse;font-size:.88rem}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e3e3e3;white-space:nowrap} th{background:#f5f5f5;text-align:center}
td.num{text-align:right;font-variant-numeric:tabular-nums} caption{text-align:left;padding:.3rem 0;color:#444}
.verdict{background:#f4f7fb;border-left:4px solid #1f77b4;padding:.5rem .8rem}
.est{color:#888} .sd{font-size:.82em;color:#666} tr.ref td{background:#f7fbff;font-style:italic}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(15rem,1fr));gap:.8rem}
.samples section{border:1px solid #ddd;border-radius:6px;padding:.5rem .7rem} .samples h3{font-size:.95rem;margin:.1rem 0 .4rem}
.samples ol{margin:0;padding-left:1.4rem}
.samples li{white-space:pre-wrap;word-break:break-word;font-size:.86rem;margin:.15rem 0}
.empty{color:#999}
"""


FIGURE_TITLES = {
    "frontier.png": "Reward against divergence from the prior",
    "divergence.png": "Divergence to the target over training",
    "diversity.png": "Diversity over training",
}


MISSING = {
    "frontier.png": "no cell's final metrics have both a reward (reward/exact or reward/mean) and a KL to the prior "
                    "(kl/prior_exact, kl/prior_seq or the bound kl/prior_seq_bound), and exact.json gives no p*.",
    "divergence.png": "no cell has a training curve (cells/<cell>/metrics.jsonl) with samples/seen and kl/target_exact or "
                      "kl/target_is.",
    "diversity.png": "no cell has a training curve with distinct-n, self-BLEU or entropy values.",
}


def _figure_html(name: str, drawn: tuple[str, str] | None, why_missing: str) -> str:
    """The figure with its caption (written from what the figure function drew), or why there is none."""
    title = FIGURE_TITLES[name]
    if drawn is None:
        return f'<h2>{title}</h2>\n<p class="missing">No figure: {html.escape(why_missing)}</p>'
    used, caption = drawn
    alt = html.escape(f"{title}: {caption.split('. ')[0]}")
    return (f'<h2>{title}</h2>\n<figure><img src="{name}" alt="{alt}">'
            f"<figcaption>{html.escape(caption)} Plotted keys: <code>{html.escape(used)}</code>.</figcaption></figure>")


def _columns(cells: list[Cell]) -> list[tuple[tuple[str, ...], str]]:
    """COLUMNS with distinct-n over the n-grams the diversity figure uses (see distinct_keys)."""
    d1, d2, unit = distinct_keys(cells)
    suffix = " (tokens)" if unit == "tokens" else ""
    swap = {("diversity/distinct_1",): (d1, "distinct-1" + suffix), ("diversity/distinct_2",): (d2, "distinct-2" + suffix)}
    return [swap.get(keys, (keys, head)) for keys, head in COLUMNS]


def _table_html(cells: list[Cell], groups: dict, targets: list) -> tuple[str, str]:
    """(table, the paragraph introducing it): one row per configuration, one column per quantity, the exact key where
    every seed has it, else the estimate."""
    columns = [(keys, head) for keys, head in _columns(cells) if any(num(c.final, k) is not None for c in cells for k in keys)]
    if not columns:
        return '<p class="missing">No table: the cells\' final metrics have none of the known keys.</p>', ""
    estimates = references = False
    head = "".join(f'<th title="{" / ".join(keys)}">{html.escape(h)}</th>' for keys, h in columns)
    rows = []
    for config, group in groups.items():
        tds = []
        for keys, _ in columns:
            has = [k for k in keys if any(num(c.final, k) is not None for c in group)]
            k = next((k for k in has if all(num(c.final, k) is not None for c in group)), has[0] if has else keys[-1])
            mean, std = mean_std([v for v in (num(c.final, k) for c in group) if v is not None])
            text = fmt(mean) + ("" if std is None else f' <span class="sd">± {fmt(std, 2)}</span>')
            est = " est" if len(keys) == 2 and k == keys[1] and mean is not None else ""  # where an exact value could exist
            estimates |= bool(est)
            tds.append(f'<td class="num{est}" data-key="{k}" data-mean="{mean!r}" title="{k}">{text}</td>')
        rows.append(f'<tr><td>{html.escape(config.name)}</td><td class="num">{fmt_beta(config.beta)}</td>'
                    f'<td class="num">{len(group)}</td>{"".join(tds)}</tr>')
    for label, spec in REFERENCE_ROWS.items():
        for beta, t in targets:
            values = {keys: (v if isinstance(v, float) else num(t, v)) for keys, v in spec.items()}
            if values[REWARD] is None and values[ENTROPY] is None:
                continue
            prior = label.startswith("π0")  # pi0 does not depend on beta: one row
            tds = "".join(f'<td class="num">{fmt(values.get(keys))}</td>' for keys, _ in columns)
            beta_text = "—" if prior else fmt_beta(beta)
            references = True
            rows.append(f'<tr class="ref"><td>{label}</td><td class="num">{beta_text}</td><td class="num">exact</td>{tds}</tr>')
            if prior:
                break
    several = any(len(g) > 1 for g in groups.values())
    caption = ("Final metrics per configuration: " + ("mean ± standard deviation over seeds" if several else "one seed each")
               + ("; <span class=\"est\">grey</span> = estimate from the last batch where no exact value was computed"
                  if estimates else ""))
    keys = [k for k, _ in columns_used(cells, columns)]
    kinds = [kind for kind, present in (("exact (enumerated) values", any(not _is_estimate(k) for k in keys)),
                                        ("estimates from the last batch", any(_is_estimate(k) for k in keys))) if present]
    intro = ("The last metrics row of each cell" + (": " + " and ".join(kinds) if kinds else "")
             + " (hover a number for its metric key)."
             + (" Entropies are in nats." if any(keys == ENTROPY for keys, _ in columns) else "")
             + (" Italic rows are the exact numbers of p* and π0 from exact.json." if references else ""))
    return (f'<div class="scroll"><table><caption>{caption}</caption>'
            f"<thead><tr><th>algorithm</th><th>β</th><th>seeds</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"), intro


def _is_estimate(key: str) -> bool:
    return not key.endswith("_exact")


def columns_used(cells: list[Cell], columns) -> list[tuple[str, str]]:
    """(key, header) of every column value some cell has."""
    return [(k, h) for keys, h in columns for k in keys if any(num(c.final, k) is not None for c in cells)]


def _sample_column(name: str, cell: Cell | None) -> tuple[str, str]:
    """(heading, what the texts are) of one samples.json key."""
    if cell is not None:
        title = " ".join([cell.algorithm, cell.config.label] + ([] if cell.seed is None else [f"seed {cell.seed}"]))
        return title, f"{title}: the final policy of cell {name}"
    if name == "prior":
        return "π0 (prior)", "π0 (prior): samples from the prior"
    if name == "posterior":
        return ("p* (importance resampling)", "p* (importance resampling): π0's samples resampled in proportion to exp(r/β), "
                "approximate samples from the target")
    if m := re.fullmatch(r"best-of-(\d+)", name):
        return name, f"{name}: the highest-reward text of {m.group(1)} samples from π0, drawn anew for each text"
    if name.endswith(" (eval)"):
        return name, f"{name}: transcripts of evaluation episodes of {name.removesuffix(' (eval)')}"
    return name, name


def _samples_html(samples, groups: dict, limit: int = 8) -> tuple[str, str]:
    """(the columns of samples.json side by side, the paragraph describing exactly those columns)."""
    if not isinstance(samples, dict) or not samples:
        return '<p class="missing">No samples: the directory has no samples.json.</p>', ""
    by_name = {c.name: c for cs in groups.values() for c in cs}
    order = ["prior"] + [c.name for cs in groups.values() for c in cs] + ["posterior"]
    names = [n for n in order if n in samples] + [n for n in samples if n not in order]
    boxes, described = [], []
    for name in names:
        texts = samples[name] if isinstance(samples[name], list) else [samples[name]]
        title, description = _sample_column(name, by_name.get(name))
        described.append(description)
        items = "".join(f"<li>{html.escape(str(t))}</li>" if str(t) else '<li class="empty">(empty sequence)</li>'
                        for t in texts[:limit])
        more = f'<p class="meta">{limit} of {len(texts)} shown</p>' if len(texts) > limit else ""
        boxes.append(f'<section><h3 title="{html.escape(name)}">{html.escape(title)}</h3><ol>{items}</ol>{more}</section>')
    intro = (f"Texts from samples.json, {len(names)} column{'s' if len(names) != 1 else ''} side by side: "
             + "; ".join(described) + ".")
    return f'<div class="samples">{"".join(boxes)}</div>', intro


def _evaluation_html(run_dir: Path, groups: dict, tmp: Path) -> list[str]:
    """The held-out pass@k section (where metrics.jsonl has eval/ rows), with Δpass@k intervals and the calls where the
    cells' per-question evaluations allow, computed from the cells (deterministic: the same numbers as the study's
    verdict.json, which is rewritten from them when the directory has one)."""
    pi0, evaluated = passk.lines(groups)
    if pi0 is None and not evaluated:
        return []
    found = verdict.verdict_of(groups)
    if found is not None and (run_dir / "verdict.json").is_file():  # a study part: its verdict.json follows its cells
        verdict.write_verdict(run_dir)
    d = verdict.deltas(found)
    out = [passk.section_html(pi0, evaluated, passk.figure(pi0, evaluated, tmp / passk.FIGURE, d), d)]
    if found is not None:
        out.append(f'<p class="verdict">{html.escape(" ".join(found["sentences"]))}</p>')
    return out


def write_report(run_dir: Path) -> Path:
    """Write DIR/report/ (report.html + PNG figures) for a sweep or training run directory; returns the path of report.html."""
    run_dir = Path(run_dir)
    if is_run_index(run_dir):
        return run_page.write_index(run_dir)
    if (run_dir / "study.json").is_file() and (run_dir / "curves.jsonl").is_file():  # a part of tiltlm run --task overopt
        from tiltlm.experiments import overopt, overopt_lm

        exact = json.loads((run_dir / "study.json").read_text()).get("exact", True)
        (overopt if exact else overopt_lm).write_outputs(run_dir)
        return run_dir / "report" / "report.html"
    cells = load_cells(run_dir)
    source = "../" + source_of(run_dir)
    groups = groups_of(cells)
    notes: list[str] = []
    targets = targets_of(load_optional(run_dir / "exact.json", notes))
    samples = load_optional(run_dir / "samples.json", notes)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    try:
        tmp.chmod(0o755)
        used = {"frontier.png": frontier_figure(groups, targets, tmp / "frontier.png"),
                "divergence.png": divergence_figure(groups, tmp / "divergence.png"),
                "diversity.png": diversity_figure(groups, tmp / "diversity.png")}
        evaluations = _evaluation_html(run_dir, groups, tmp)
        table, table_intro = _table_html(cells, groups, targets)
        samples_html, samples_intro = _samples_html(samples, groups)
        algorithms = ", ".join(dict.fromkeys(c.algorithm for c in cells))
        betas = ", ".join(f"{b:g}" for b in sorted({c.beta for c in cells if c.beta is not None})) or "—"
        seeds = ", ".join(str(s) for s in sorted({c.seed for c in cells if c.seed is not None}, key=sortable)) or "—"
        lines = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>tiltlm report: {html.escape(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>",
            f"<h1>tiltlm report: {html.escape(run_dir.resolve().name)}</h1>",
            f'<p class="meta">{len(cells)} cells; algorithms: {html.escape(algorithms)}; β: {betas}; seeds: {html.escape(seeds)}.</p>',
            ("<p>Each algorithm fine-tunes the prior π0 toward the target p*(x) ∝ π0(x)·exp(r(x)/β). Treating the LM as a policy "
            "(maximise reward) collapses onto the highest-reward outputs; treating it as a generative model approximates p* "
            "and keeps its diversity. The figures and table below show which happened.</p>"),
            *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
            *(_figure_html(name, used[name], MISSING[name]) for name in used),
            *evaluations,
            "<h2>Final metrics</h2>",
            *([f"<p>{html.escape(table_intro)}</p>"] if table_intro else []),
            table,
            "<h2>Samples</h2>",
            *([f"<p>{html.escape(samples_intro)}</p>"] if samples_intro else []),
            samples_html,
            f'<p class="meta">Generated by tiltlm report from <code>{html.escape(source)}</code> (relative to this page).</p>',
            "</body></html>",
        ]
        (tmp / "report.html").write_text("\n".join(lines) + "\n", encoding="utf-8")
        replace_dir(tmp, run_dir / "report")  # readers see the old report or the new one, never half
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / "report" / "report.html"
