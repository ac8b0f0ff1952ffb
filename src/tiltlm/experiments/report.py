"""`tiltlm report DIR`: one self-contained HTML page and PNG figures for a sweep or a training run directory.

Input (what `tiltlm sweep` writes; or the --out directory of `tiltlm train`, config.yaml + metrics.jsonl, read as
one cell named after the directory, its algorithm, beta and seed from config.yaml, its final row metrics.jsonl's last):
  DIR/results.jsonl               one object per finished cell: cell, algorithm, beta, seed, final {metric key: value}
  DIR/cells/<cell>/metrics.jsonl  the cell's training curve (keys of tiltlm/metrics/batch.py); none for inference baselines
  DIR/samples.json                optional: {"prior": [texts], "posterior": [texts], "<cell>": [texts], ...}
  DIR/exact.json                  optional, p*'s exact numbers (keys of `tiltlm exact --json`): one object,
                                  or {"<beta>": object, ...}, or a list of objects each with a "beta"
Output, replaced atomically (written into a temp directory beside it, then renamed):
  DIR/report/report.html, frontier.png, divergence.png, diversity.png, and where metrics.jsonl has held-out
  evaluations (eval/pass@k rows) pass_at_k.png with a pass@k table (tiltlm.experiments.passk).

Exact keys win over estimates wherever a cell has them; every caption names the keys it plotted.
Means and standard deviations (n - 1) are over the seeds of one configuration: algorithm, beta and the
rest of the cell's name once its "_"-separated algorithm, beta<b> and seed<s> parts are removed, so that
"best-of-n_n4_seed0" and "best-of-n_n16_seed0" stay apart and "kl-pg_beta1_seed0/1/2" are averaged. A
half-written last line (a run still writing) is ignored; a figure without data is said so on the page.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tiltlm.errors import TiltlmError
from tiltlm.io import replace_dir

# (exact key, estimated key): the exact one is used wherever a cell has it.
REWARD, KL_PRIOR = ("reward/exact", "reward/mean"), ("kl/prior_exact", "kl/prior_seq")
KL_TARGET, KL_POLICY_TARGET = ("kl/target_exact", "kl/target_is"), ("kl/policy_target_exact", "kl/policy_target_is")
TV, ENTROPY = ("tv/target_exact", "tv/target_is"), ("entropy/exact", "entropy/seq")
COLUMNS = [  # table columns: (keys, exact first; header)
    (REWARD, "E[r]"), (KL_PRIOR, "KL(π‖π0)"), (KL_TARGET, "KL(p*‖π)"), (KL_POLICY_TARGET, "KL(π‖p*)"), (TV, "TV(π, p*)"),
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
DIVERSITY = [(("diversity/distinct_1",), "distinct-1 (higher = more diverse)"), (("diversity/distinct_2",), "distinct-2"),
             (("diversity/self_bleu",), "self-BLEU (lower = more diverse)"), (ENTROPY, "sequence entropy (nats)")]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS, STYLES = "osD^vPX*<>", ["-", "--", ":", "-."]
DPI = 110
LABEL_OFFSETS = [(6, 5), (-6, 5), (6, -11), (-6, -11)]


class Config(NamedTuple):
    """What the seeds of one group share: algorithm, beta and the rest of the cell name ("n4" in "best-of-n_n4_seed0")."""

    algorithm: str
    beta: float | None
    variant: str = ""

    @property
    def label(self) -> str:
        """'β=1', 'n4', ... (without the algorithm)."""
        return " ".join(([] if self.beta is None else [f"β={self.beta:g}"]) + ([self.variant] if self.variant else []))

    @property
    def name(self) -> str:
        return self.algorithm + (f" ({self.variant})" if self.variant else "")


def config_of(row: dict) -> Config:
    """The configuration of a results entry; seeds of one configuration share it (see the module docstring)."""
    algorithm, beta, seed, name = str(row.get("algorithm", row["cell"])), _num(row, "beta"), row.get("seed"), row["cell"]
    drop = {"", f"seed{seed}"} | (set() if beta is None else {f"beta{beta:g}", f"beta{beta}"})
    rest = name.removeprefix(algorithm)
    return Config(algorithm, beta, "_".join(t for t in rest.split("_") if t not in drop))


@dataclass
class Cell:
    name: str
    config: Config
    seed: int | None
    final: dict
    curve: list[dict] = field(default_factory=list)

    @property
    def algorithm(self) -> str:
        return self.config.algorithm

    @property
    def beta(self) -> float | None:
        return self.config.beta


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sortable(v) -> tuple:
    """Numbers before None-s and strings, numbers by value."""
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _natural(text: str) -> list:
    """Sort key putting 'n4' before 'n16'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _pick(d: dict, keys: tuple[str, ...]) -> tuple[str, float] | None:
    """The first of ``keys`` that ``d`` has (exact before estimated)."""
    return next(((k, _num(d, k)) for k in keys if _num(d, k) is not None), None)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if math.isnan(x) or math.isinf(x):
        return "NaN" if math.isnan(x) else ("∞" if x > 0 else "-∞")
    return "0" if x == 0 else f"{x:.{digits - 2}e}" if abs(x) < 1e-3 else f"{x:#.{digits}g}".rstrip(".")


def _fmt_beta(beta: float | None) -> str:
    return "—" if beta is None else f"{beta:g}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    if not all(math.isfinite(v) for v in values):
        return (math.nan if any(math.isnan(v) for v in values) else sum(values)), None  # +-inf, or NaN when mixed
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _read_jsonl(path: Path, *, strict: bool) -> list[dict]:
    """Rows of a JSON-lines file; a half-written last line is dropped, other bad lines raise when ``strict``."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            if strict and i < len(lines):
                raise TiltlmError(f"'{path}' line {i} is not valid JSON; fix or delete that line and rerun tiltlm report") from None
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_cells(run_dir: Path) -> list[Cell]:
    """The finished cells of a sweep directory with their curves (a cell listed twice keeps its last entry)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TiltlmError(f"report directory '{run_dir}' does not exist; pass the --out directory of tiltlm sweep or tiltlm run")
    path = run_dir / "results.jsonl"
    if not path.is_file():
        if (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file():
            return [_run_cell(run_dir)]
        raise TiltlmError(f"'{run_dir}' has no results.jsonl; pass a directory written by tiltlm sweep or tiltlm run, or the --out "
                          "of tiltlm train (config.yaml and metrics.jsonl), or wait until its first cell finishes")
    cells: dict[str, Cell] = {}
    for i, row in enumerate(_read_jsonl(path, strict=True), 1):
        if not isinstance(row.get("cell"), str) or not isinstance(row.get("final", {}), dict):
            raise TiltlmError(f"'{path}' entry {i} lacks a 'cell' name or has a non-object 'final'; fix or delete that line")
        name = row["cell"]
        curve_path = run_dir / "cells" / name / "metrics.jsonl"
        curve = _read_jsonl(curve_path, strict=False) if Path(name).name == name and curve_path.is_file() else []
        cells.pop(name, None)
        cells[name] = Cell(name, config_of(row), row.get("seed"), row.get("final", {}), curve)
    if not cells:
        raise TiltlmError(f"'{path}' lists no finished cell; rerun tiltlm sweep (or wait until a cell finishes)")
    return list(cells.values())


def _run_cell(run_dir: Path) -> Cell:
    """A `tiltlm train` directory as one cell: its name, config.yaml's algorithm, beta and seed, metrics.jsonl's rows."""
    import yaml

    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise TiltlmError(f"'{run_dir}' has config.yaml but no metrics.jsonl: a training run before its first step; wait for it "
                          "(or pass a sweep directory)")
    if not config_path.is_file():
        raise TiltlmError(f"'{run_dir}' has metrics.jsonl but no config.yaml; pass the --out directory of tiltlm train as it was written")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError:
        raise TiltlmError(f"'{config_path}' is not valid YAML; restore the config.yaml tiltlm train wrote") from None
    config = config if isinstance(config, dict) else {}
    rows = _read_jsonl(metrics_path, strict=True)
    if not rows:
        raise TiltlmError(f"'{metrics_path}' has no rows yet; wait until the run logs its first step")
    algorithm = config.get("algorithm")
    algorithm = str(algorithm.get("name") if isinstance(algorithm, dict) else algorithm or run_dir.resolve().name)
    target = config.get("target") if isinstance(config.get("target"), dict) else {}
    beta = _num(target, "beta") if target.get("reward") is not None else None
    return Cell(run_dir.resolve().name, Config(algorithm, beta), config.get("seed"), rows[-1], rows)


def pass_at_k_table(run_dir: Path) -> tuple[list[str], list[list[str]]] | None:
    """(headers, rows) of the report's pass@k table for the console (None when no cell has held-out evaluations)."""
    from tiltlm.experiments import passk

    pi0, others = passk.lines(_groups(load_cells(Path(run_dir))))
    return passk.console_rows(pi0, others) if pi0 is not None or others else None


def _groups(cells: list[Cell]) -> dict[Config, list[Cell]]:
    """Cells by configuration: algorithms in order of first appearance, then by beta and the other fields."""
    order = {a: i for i, a in reversed(list(enumerate(c.algorithm for c in cells)))}
    out: dict = {}
    for c in sorted(cells, key=lambda c: (order[c.algorithm], _sortable(c.beta), _natural(c.config.variant), _sortable(c.seed))):
        out.setdefault(c.config, []).append(c)
    return out


def _load_optional(path: Path, notes: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path.name} could not be read ({e}); it was left out.")
        return None


def _targets(exact) -> list[tuple[float | None, dict]]:
    """(beta, p*'s numbers) from exact.json: one object, {beta: object} or a list of objects with "beta"."""
    if isinstance(exact, dict) and any(isinstance(v, (int, float)) for v in exact.values()):
        return [(_num(exact, "beta"), exact)]
    if isinstance(exact, dict):
        return [(_float(k) if _num(v, "beta") is None else _num(v, "beta"), v) for k, v in exact.items() if isinstance(v, dict)]
    return [(_num(d, "beta"), d) for d in exact if isinstance(d, dict)] if isinstance(exact, list) else []


# ---- figures ----------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend state
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})


def _style(algorithms: list[str]) -> dict[str, tuple[str, str]]:
    return {a: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, a in enumerate(algorithms)}


def _kind(keys: tuple[str, str], used: set, estimate: str) -> str:
    exact, est = keys[0] in used, keys[1] in used
    return " (exact where available)" if exact and est else " (exact)" if exact else f" ({estimate})"


def frontier_figure(groups: dict, targets: list, path: Path) -> str | None:
    """Reward vs KL(pi||pi0) per (algorithm, beta), mean ± std over seeds; p* (and pi0) as references."""
    points: dict = {}
    used: set = set()
    for config, cells in groups.items():
        xy = [(_pick(c.final, KL_PRIOR), _pick(c.final, REWARD)) for c in cells]
        xy = [(x, y) for x, y in xy if x and y and math.isfinite(x[1]) and math.isfinite(y[1])]
        if xy:
            used |= {x[0] for x, _ in xy} | {y[0] for _, y in xy}
            mean_std = _mean_std([x[1] for x, _ in xy]) + _mean_std([y[1] for _, y in xy])
            points.setdefault(config.algorithm, []).append((config.label, *mean_std))
    if not points:
        return None
    fig = _figure(8, 5.2)
    ax = fig.add_subplot()
    for i, (alg, (colour, marker)) in enumerate(_style(list(points)).items()):
        pts = sorted(points[alg], key=lambda p: p[1])
        ax.errorbar([p[1] for p in pts], [p[3] for p in pts], xerr=[p[2] or 0 for p in pts], yerr=[p[4] or 0 for p in pts],
                    color=colour, marker=marker, ms=7, lw=1, capsize=3, label=alg)
        for label, x, _, y, _ in pts:  # labels of different algorithms go to different corners
            ax.annotate(label, (x, y), textcoords="offset points", xytext=LABEL_OFFSETS[i % 4], fontsize=8, color=colour,
                        ha="left" if LABEL_OFFSETS[i % 4][0] > 0 else "right")
    for i, (beta, t) in enumerate(targets):
        x, y = _num(t, "kl_target_prior"), _num(t, "reward_target")
        if x is not None and y is not None:
            ax.plot([x], [y], "k*", ms=13, label="p* (exact)" if i == 0 else None)
            label = "p*" + ("" if beta is None else f" β={beta:g}")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    priors = [_num(t, "reward_prior") for _, t in targets if _num(t, "reward_prior") is not None]
    if priors:
        ax.plot([0.0], [priors[0]], "o", mfc="white", mec="black", ms=8, label="π0 (prior)")
    ax.set_xlabel(r"KL($\pi\,\|\,\pi_0$)" + _kind(KL_PRIOR, used, "estimated"))
    ax.set_ylabel("E[r]" + _kind(REWARD, used, "batch mean"))
    ax.set_title("Reward vs divergence from the prior")
    ax.margins(0.1)  # room for the point labels
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9)
    _save(fig, path)
    return f"x = {' / '.join(k for k in KL_PRIOR if k in used)}, y = {' / '.join(k for k in REWARD if k in used)}"


def _series(rows: list[dict], keys: tuple[str, ...]) -> tuple[list, list, bool] | None:
    """(x = samples seen, y, is_exact) of the first key with ≥ 2 finite points (else of any with 1);
    estimates, noisy per batch, are smoothed by a trailing mean over 5% of the run."""
    found = []
    for key in keys:
        pts = [(_num(r, "samples/seen"), _num(r, key)) for r in rows]
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
            s = _series(c.curve, KL_TARGET)
            if s:
                by_beta.setdefault(config.beta, []).append((config.algorithm, *s))
    if not by_beta:
        return None
    from matplotlib.lines import Line2D

    style = _style(list(dict.fromkeys(a for lines in by_beta.values() for a, *_ in lines)))
    n = len(by_beta)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig = _figure(max(8.0, 3.8 * ncols + 2), 3.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    positive = all(y > 0 for lines in by_beta.values() for *_, ys, _ in lines for y in ys)
    kinds = set()
    for ax, (beta, lines) in zip(axes, sorted(by_beta.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0))):
        for alg, xs, ys, exact in lines:
            kinds.add(exact)
            colour, marker = style[alg]
            ax.plot(xs, ys, color=colour, ls="-" if exact else "--", marker=marker if exact else None, ms=4, lw=1.2)
        ax.set_title(f"β = {_fmt_beta(beta)}", fontsize=10)
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
        if positive:
            ax.set_yscale("log")
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].set_ylabel(r"KL($p^*\,\|\,\pi$)")
    handles = [Line2D([], [], color=c, marker=m, label=a) for a, (c, m) in style.items()]
    handles += [Line2D([], [], color="grey", ls="-", marker="o", label="exact")] if True in kinds else []
    handles += [Line2D([], [], color="grey", ls="--", label="IS estimate (smoothed)")] if False in kinds else []
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    kind = "exact" if kinds == {True} else "IS estimate" if kinds == {False} else "exact (solid) and IS estimate (dashed)"
    fig.suptitle(f"KL(p*‖π) over training: {kind}" + (", log scale" if positive else ""))
    _save(fig, path)
    return f"y = {' / '.join(k for k, e in zip(KL_TARGET, (True, False)) if e in kinds)}"


def diversity_figure(groups: dict, path: Path) -> str | None:
    """Distinct-1, distinct-2, self-BLEU and sequence entropy over training; colour = algorithm, line style = beta."""
    cells = [c for group in groups.values() for c in group]
    panels = [[(c.algorithm, c.beta, s) for c in cells if (s := _series(c.curve, keys))] for keys, _ in DIVERSITY]
    if not any(panels):
        return None
    from matplotlib.lines import Line2D

    style = _style(list(dict.fromkeys(a for lines in panels for a, _, _ in lines)))
    betas = sorted({b for lines in panels for _, b, _ in lines}, key=lambda b: (b is None, b or 0.0))
    dash = {b: STYLES[i % len(STYLES)] for i, b in enumerate(betas)}
    fig = _figure(11, 6.6)
    for ax, lines, (keys, title) in zip(fig.subplots(2, 2).ravel(), panels, DIVERSITY):
        for alg, beta, (xs, ys, exact) in lines:
            ax.plot(xs, ys, color=style[alg][0], ls=dash[beta], lw=1.2, marker=style[alg][1] if exact else None, ms=3)
        exact = {e for _, _, (_, _, e) in lines}
        ax.set_title(title + (" — exact" if exact == {True} else " — exact where available" if exact == {True, False} else ""),
                     fontsize=10)
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
        if not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    handles = [Line2D([], [], color=c, label=a) for a, (c, _) in style.items()]
    handles += [Line2D([], [], color="grey", ls=dash[b], label=f"β = {_fmt_beta(b)}") for b in betas]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    fig.suptitle("Diversity over training (batch estimates smoothed over 5% of each run)")
    _save(fig, path)
    return ", ".join(" / ".join(keys) for (keys, _), lines in zip(DIVERSITY, panels) if lines)


# ---- HTML ---------------------------------------------------------------------------------------
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
.est{color:#888} .sd{font-size:.82em;color:#666} tr.ref td{background:#f7fbff;font-style:italic}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(15rem,1fr));gap:.8rem}
.samples section{border:1px solid #ddd;border-radius:6px;padding:.5rem .7rem} .samples h3{font-size:.95rem;margin:.1rem 0 .4rem}
.samples ol{margin:0;padding-left:1.4rem}
.samples li{white-space:pre-wrap;word-break:break-word;font-size:.86rem;margin:.15rem 0}
.empty{color:#999}
"""
FIGURE_TEXT = {
    "frontier.png": ("Reward against divergence from the prior",
                     ("Final E[r] against KL(π‖π0) for each (algorithm, β): mean over seeds, error bars one standard deviation, "
                     "each point labelled with its β. Reward maximisation (the hardmax limit) buys reward with ever larger KL and "
                     "collapses; KL-regularised and distribution-matching methods should sit on the target p* (stars), which is "
                     "the best reward attainable at its KL.")),
    "divergence.png": ("Divergence to the target over training",
                       ("KL(p*‖π), the forward divergence to the target, against the number of samples drawn, one line per cell "
                       "and one panel per β. Solid lines with markers are exact (enumerated) values, dashed lines "
                       "importance-sampling estimates. A method that approximates p* drives it towards 0; a collapsing one makes "
                       "it grow.")),
    "diversity.png": ("Diversity over training",
                      ("Distinct-1 and distinct-2 (fraction of unique uni/bigrams), self-BLEU (similarity between samples of one "
                      "batch) and sequence entropy, per cell; colour is the algorithm, line style the β. Collapse shows as "
                      "falling distinct-n and entropy and rising self-BLEU.")),
}


MISSING = {
    "frontier.png": "no cell's final metrics have both a reward (reward/exact or reward/mean) and a KL to the prior "
                    "(kl/prior_exact or kl/prior_seq).",
    "divergence.png": "no cell has a training curve (cells/<cell>/metrics.jsonl) with samples/seen and kl/target_exact or "
                      "kl/target_is.",
    "diversity.png": "no cell has a training curve with distinct-n, self-BLEU or entropy values.",
}


def _figure_html(name: str, used: str | None, why_missing: str) -> str:
    title, text = FIGURE_TEXT[name]
    if used is None:
        return f'<h2>{title}</h2>\n<p class="missing">No figure: {html.escape(why_missing)}</p>'
    alt = html.escape(f"{title}: {text.split('.')[0]}")
    return (f'<h2>{title}</h2>\n<figure><img src="{name}" alt="{alt}">'
            f"<figcaption>{html.escape(text)} Plotted keys: <code>{html.escape(used)}</code>.</figcaption></figure>")


def _table_html(cells: list[Cell], groups: dict, targets: list) -> str:
    """One row per configuration, one column per quantity: the exact key where every seed has it, else the estimate."""
    columns = [(keys, head) for keys, head in COLUMNS if any(_num(c.final, k) is not None for c in cells for k in keys)]
    if not columns:
        return '<p class="missing">No table: the cells\' final metrics have none of the known keys.</p>'
    head = "".join(f'<th title="{" / ".join(keys)}">{html.escape(h)}</th>' for keys, h in columns)
    rows = []
    for config, group in groups.items():
        tds = []
        for keys, _ in columns:
            has = [k for k in keys if any(_num(c.final, k) is not None for c in group)]
            k = next((k for k in has if all(_num(c.final, k) is not None for c in group)), has[0] if has else keys[-1])
            mean, std = _mean_std([v for v in (_num(c.final, k) for c in group) if v is not None])
            text = _fmt(mean) + ("" if std is None else f' <span class="sd">± {_fmt(std, 2)}</span>')
            est = " est" if len(keys) == 2 and k == keys[1] and mean is not None else ""  # where an exact value could exist
            tds.append(f'<td class="num{est}" data-key="{k}" data-mean="{mean!r}" title="{k}">{text}</td>')
        rows.append(f'<tr><td>{html.escape(config.name)}</td><td class="num">{_fmt_beta(config.beta)}</td>'
                    f'<td class="num">{len(group)}</td>{"".join(tds)}</tr>')
    for label, spec in REFERENCE_ROWS.items():
        for beta, t in targets:
            values = {keys: (v if isinstance(v, float) else _num(t, v)) for keys, v in spec.items()}
            if values[REWARD] is None and values[ENTROPY] is None:
                continue
            prior = label.startswith("π0")  # pi0 does not depend on beta: one row
            tds = "".join(f'<td class="num">{_fmt(values.get(keys))}</td>' for keys, _ in columns)
            beta_text = "—" if prior else _fmt_beta(beta)
            rows.append(f'<tr class="ref"><td>{label}</td><td class="num">{beta_text}</td><td class="num">exact</td>{tds}</tr>')
            if prior:
                break
    return (f'<div class="scroll"><table><caption>Final metrics per configuration: mean ± standard deviation over seeds; '
            f'<span class="est">grey</span> = estimate from the last batch where no exact value was computed</caption>'
            f"<thead><tr><th>algorithm</th><th>β</th><th>seeds</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _samples_html(samples, groups: dict, limit: int = 8) -> str:
    if not isinstance(samples, dict) or not samples:
        return '<p class="missing">No samples: the directory has no samples.json.</p>'
    by_name = {c.name: c for cs in groups.values() for c in cs}
    order = ["prior"] + [c.name for cs in groups.values() for c in cs] + ["posterior"]
    names = [n for n in order if n in samples] + [n for n in samples if n not in order]
    boxes = []
    for name in names:
        texts = samples[name] if isinstance(samples[name], list) else [samples[name]]
        c = by_name.get(name)
        title = {"prior": "π0 (prior)", "posterior": "p* (posterior, importance resampling)"}.get(name, name)
        if c is not None:
            title = " ".join([c.algorithm, c.config.label] + ([] if c.seed is None else [f"seed {c.seed}"]))
        items = "".join(f"<li>{html.escape(str(t))}</li>" if str(t) else '<li class="empty">(empty sequence)</li>'
                        for t in texts[:limit])
        more = f'<p class="meta">{limit} of {len(texts)} shown</p>' if len(texts) > limit else ""
        boxes.append(f'<section><h3 title="{html.escape(name)}">{html.escape(title)}</h3><ol>{items}</ol>{more}</section>')
    return f'<div class="samples">{"".join(boxes)}</div>'


def write_report(run_dir: Path) -> Path:
    """Write DIR/report/ (report.html + PNG figures) for a sweep or training run directory; returns the path of report.html."""
    from tiltlm.experiments import passk

    run_dir = Path(run_dir)
    cells = load_cells(run_dir)
    source = "results.jsonl" if (run_dir / "results.jsonl").is_file() else "metrics.jsonl"
    groups = _groups(cells)
    notes: list[str] = []
    targets = _targets(_load_optional(run_dir / "exact.json", notes))
    samples = _load_optional(run_dir / "samples.json", notes)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    try:
        tmp.chmod(0o755)
        used = {"frontier.png": frontier_figure(groups, targets, tmp / "frontier.png"),
                "divergence.png": divergence_figure(groups, tmp / "divergence.png"),
                "diversity.png": diversity_figure(groups, tmp / "diversity.png")}
        pi0, evaluated = passk.lines(groups)  # held-out pass@k, where metrics.jsonl has eval/ rows
        evaluations = ([passk.section_html(pi0, evaluated, passk.figure(pi0, evaluated, tmp / passk.FIGURE))]
                       if pi0 is not None or evaluated else [])
        algorithms = ", ".join(dict.fromkeys(c.algorithm for c in cells))
        betas = ", ".join(f"{b:g}" for b in sorted({c.beta for c in cells if c.beta is not None})) or "—"
        seeds = ", ".join(str(s) for s in sorted({c.seed for c in cells if c.seed is not None}, key=_sortable)) or "—"
        page = [
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
            ("<p>The last metrics row of each cell: exact (enumerated) values where the space was small enough, estimates "
            "from the last training batch otherwise (hover a number for its metric key). Entropies are in nats. "
            "Italic rows are the exact numbers of p* and π0 from exact.json.</p>"),
            _table_html(cells, groups, targets),
            "<h2>Samples</h2>", "<p>Texts drawn from the prior, each trained policy and the posterior, side by side.</p>",
            _samples_html(samples, groups),
            f'<p class="meta">Generated by tiltlm report from <code>{html.escape(str(run_dir / source))}</code>.</p>',
            "</body></html>",
        ]
        (tmp / "report.html").write_text("\n".join(page) + "\n", encoding="utf-8")
        replace_dir(tmp, run_dir / "report")  # readers see the old report or the new one, never half
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / "report" / "report.html"
