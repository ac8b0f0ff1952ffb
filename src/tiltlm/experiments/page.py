"""The top-level report.html of a `tiltlm run` directory: for each RLVR study part its pass@k figure and verdict
first, then its tables, the per-question numbers and links to each part's own report. It reads only files the parts
wrote (run.json, each part's cells, verdict.json and per_question.json), so `tiltlm report RUN_DIR` rewrites it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from tiltlm.errors import TiltlmError
from tiltlm.experiments import passk
from tiltlm.experiments.cells import groups_of, load_cells
from tiltlm.experiments.grid import SEEDS
from tiltlm.experiments.style import fmt
from tiltlm.experiments.verdict import deltas, read_verdict, write_verdict
from tiltlm.io import atomic_write_text

BEST_OF = 4  # the training-free baseline's n: best-of-4 with the verifier

PART_LINKS = {
    "rlvr": "per-cell curves, the pass@k section and the samples of each trained policy",
    "exact": "the same comparison where pass@k and every divergence to p*(·|x) are exact",
    "lm": "reinforce vs kl-pg vs dpg vs inference baselines, estimated divergences",
    "testbed": "the same comparison where every divergence to p* is exact",
    "overopt_exact": "proxy vs gold on an enumerable testbed: the peak and fit tables",
    "overopt_lm": "proxy vs gold on the default LM (sentiment): the peak and fit tables",
}


def write_index(run_dir: str | Path, name: str | None = None) -> Path:
    """The top-level report.html of a `tiltlm run` directory (from run.json and the parts' files; `tiltlm report DIR`
    rewrites it): for the RLVR study the pass@k figure and the computed verdict first, then the summary tables, the
    per-question numbers and links to each part's own report."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TiltlmError(f"'{run_dir}' has no readable run.json; pass the --out directory of a finished tiltlm run") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("parts"), list) or "prior" not in summary:
        parts = ", ".join(p.name for p in sorted(run_dir.iterdir()) if (p / "results.jsonl").is_file()) or "lm, testbed"
        raise TiltlmError(f"'{run_dir}' is a tiltlm run directory (run.json), whose index this version of tiltlm cannot "
                          f"rewrite; pass one of its parts instead ({parts}), e.g. tiltlm report {run_dir / parts.split(', ')[0]}")
    body = []
    for p in summary.get("parts", []):
        if p["dir"] in ("rlvr", "exact"):
            body.append(_study_section(run_dir, p, headline=not body))
        elif p["dir"].startswith("overopt"):
            body.append(_overopt_section(run_dir, p))
    if not body and summary.get("task", "sentiment") == "sentiment":
        body.append("<p>The reward–KL comparison: reinforce vs kl-pg at several β vs dpg vs inference baselines, at "
                    "matched samples (the parts' reports below have the frontier figures).</p>")
    links = "".join(f'<li><a href="{html.escape(p["dir"])}/report/report.html">Part {i}: {html.escape(p["title"])}</a> — '
                    f'{PART_LINKS.get(p["dir"], "")} ({p["seconds"]:.0f} s)</li>'
                    for i, p in enumerate(summary.get("parts", []), 1) if p["dir"] != "interactive")
    if summary.get("interactive"):
        links += _interactive_links()
    seeds = summary.get("seeds", [summary.get("seed", 0)])
    settings = (f"task <code>{html.escape(str(summary.get('task', 'sentiment')))}</code>, prior <code>{html.escape(str(summary['prior']))}</code>, "
                f"kl-pg β {', '.join(f'{b:g}' for b in summary['betas'])}, budget ×{summary['budget']:g}, seeds "
                f"{', '.join(map(str, seeds))}; {summary['seconds']:.0f} s in all")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tiltlm report: run {html.escape(name or run_dir.resolve().name)}</title>
<style>body{{font-family:sans-serif;max-width:64rem;margin:1.5rem auto;line-height:1.45;padding:0 1rem}}
table{{border-collapse:collapse;font-size:.9rem}}td,th{{border:1px solid #ccc;padding:.2rem .45rem}}td.num{{text-align:right}}
figure{{margin:.5rem 0}}img{{max-width:100%}}.verdict{{font-size:1.08rem;background:#f4f7fb;border-left:4px solid #1f77b4;padding:.5rem .8rem}}
.scroll{{overflow-x:auto}}</style></head><body>
<h1>tiltlm run: does RL with a verifier narrow the model?</h1>
{''.join(body)}
<h2>Details</h2>
<ul>{links}</ul>
<p>Settings: {settings}. Reproduce: <code>{html.escape(_command(summary))}</code></p>
</body></html>
"""
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def _command(summary: dict) -> str:
    parts = ["tiltlm run"]
    if summary.get("task", "quiz") != "quiz":
        parts.append(f"--task {summary['task']}")
    if summary.get("prior", "default") != "default":
        parts.append(f"--prior {summary['prior']}")
    if summary.get("budget", 1.0) != 1.0:
        parts.append(f"--budget {summary['budget']:g}")
    if summary.get("seeds", list(SEEDS)) != list(SEEDS):
        parts.append(f"--seeds {','.join(map(str, summary['seeds']))}")
    if summary.get("interactive"):
        parts.append("--interactive")
    return " ".join(parts)


def study_lines(root: Path) -> tuple:
    """(pi0, [trained lines], [best-of-n line]) of a study directory (tiltlm.experiments.passk.Line)."""
    pi0, trained = passk.lines(groups_of(load_cells(root)))
    return pi0, trained, ([passk.best_of_n_line(pi0, BEST_OF)] if pi0 is not None else [])


def console_study(root: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """(headers, rows, verdict sentences) that `tiltlm run` prints for one study part: pass@1, pass@K, distinct correct,
    KL (exact values beside where enumerated), Δpass@1 and Δpass@K with their intervals, and where π0 is ahead."""
    pi0, trained, baselines = study_lines(root)
    found = read_verdict(root)  # just written by the study
    d = deltas(found)
    headers, rows = passk.table(pi0, trained + baselines, d)
    keep = [i for i, (k, _) in enumerate(passk.columns(pi0, trained + baselines)) if k in CONSOLE_KEYS or
            (k.startswith("eval/pass@") and k.removesuffix("_exact").removeprefix("eval/pass@").isdigit())]
    names = [headers[0]] + [headers[2 + i] for i in keep] + headers[2 + len(passk.columns(pi0, trained + baselines)):]
    text = [[line.name, *[fmt(values[i][1], 3) for i in keep], *diffs, ahead] for line, values, diffs, ahead in rows]
    return names, text, (found or {}).get("sentences", ["No verdict: the study has no verdict.json."])


CONSOLE_KEYS = ("eval/distinct_correct", "eval/distinct_correct_exact", "eval/kl_prior", "eval/kl_target_exact")


def _study_section(run_dir: Path, part: dict, *, headline: bool) -> str:
    """One RLVR study: the figure (pass@k with best-of-n; Δpass@k with intervals), the verdict, the table, the
    per-question numbers — every number read from the part's files (cells, verdict.json, per_question.json)."""
    root = run_dir / part["dir"]
    pi0, trained, baselines = study_lines(root)
    found = write_verdict(root)  # from the part's cells, as its report
    d = deltas(found)
    figure = f"report/{part['dir']}_pass_at_k.png"
    (run_dir / "report").mkdir(exist_ok=True)
    used = passk.figure(pi0, trained + baselines, run_dir / figure, d)
    sentences = (found or {}).get("sentences", ["No verdict: the study has no verdict.json (no π0 evaluation or no trained policy)."])
    title = ("pass@k on held-out questions" if headline else "The same study, exact") + (
        ": an enumerable testbed" if part["dir"] == "exact" else "")
    caption = (f"{passk.caption(pi0, trained + baselines, used or '')} best-of-{BEST_OF} trains nothing: it draws {BEST_OF} π0 "
               f"samples per answer and keeps a correct one, so its pass@k is π0's pass@{BEST_OF}k at {BEST_OF}× the samples.")
    out = [f"<h2>{html.escape(title)}</h2>",
           f'<p class="verdict" id="verdict-{part["dir"]}">{html.escape(" ".join(sentences))}</p>']
    if used is not None:
        out.append(f'<figure><img src="{figure}" alt="pass@k against k, {html.escape(part["dir"])}"><figcaption>{html.escape(caption)}'
                   f"</figcaption></figure>")
    table = passk.section_html(pi0, trained + baselines, None, d).split("\n", 1)[1]  # the table without its heading
    out.append(table.replace("<table>", f'<table id="table-{part["dir"]}">', 1))
    out.append(_per_question_html(root))
    return "\n".join(out)


def _overopt_section(run_dir: Path, part: dict) -> str:
    """The overoptimization study (tiltlm.experiments.overopt): its figure and verdict, read from its files."""
    found = read_verdict(run_dir / part["dir"])
    sentences = (found or {}).get("sentences", ["No verdict: the study has no verdict.json."])
    figure = f"{part['dir']}/report/gold_vs_kl.png"
    caption = ("exact: the gold-optimal frontier, the proxy's posterior" if part["dir"] == "overopt_exact" else
               "estimated from samples: the proxy's posterior (importance-sampled)")
    img = (f'<figure><img src="{html.escape(figure)}" alt="gold reward against sqrt KL"><figcaption>Gold reward against '
           f"d = √KL(π‖π0), {caption}, best-of-n under the proxy and every trained method's trajectory (every seed)."
           "</figcaption></figure>") if (run_dir / figure).is_file() else ""
    items = "".join(f"<li>{html.escape(s)}</li>" for s in sentences)
    return f'<h2>{html.escape(part["title"])}</h2>\n{img}\n<ul class="verdict" id="verdict-{html.escape(part["dir"])}">{items}</ul>'


def _per_question_html(root: Path, limit: int = 40) -> str:
    path = root / "per_question.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    methods = list(data["methods"])
    big = f"pass@{data.get('n', 64)}"
    keys = [k for k in ("pass@1", big, "distinct_correct", "kl_target_exact") if any(k in r for r in data["methods"][methods[0]])]
    head = "<th>question</th>" + "".join(f"<th>{html.escape(m)}<br>{html.escape(k)}</th>" for k in keys for m in methods)
    trs = []
    for i, prompt in enumerate(data["prompts"][:limit]):
        tds = "".join(f'<td class="num">{fmt(data["methods"][m][i].get(k), 3)}</td>' for k in keys for m in methods)
        trs.append(f"<tr><td>{html.escape(prompt)}</td>{tds}</tr>")
    more = f" (first {limit} of {len(data['prompts'])})" if len(data["prompts"]) > limit else ""
    return (f"<details><summary>Per question{more}: pass@1, {big}, distinct correct answers"
            f"{', exact KL(p*(·|x)‖π(·|x))' if 'kl_target_exact' in keys else ''} of each method (first seed)</summary>"
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(trs)}</tbody></table></div></details>')


def _interactive_links() -> str:
    return (
        '<li>Part 3: the interactive case — <a href="interactive/tabular_stochastic/report/report.html">stochastic tabular env</a> '
        '(DPG → optimistic posterior conditional, KL-PG → variational policy: exact KLs to both), '
        '<a href="interactive/tabular_deterministic/report/report.html">deterministic tabular env</a> (the two optima coincide), '
        '<a href="interactive/dialogue/report/report.html">twenty questions</a> (success rate, per-turn KL, distinct questions).</li>'
    )
