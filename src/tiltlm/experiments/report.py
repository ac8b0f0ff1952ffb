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
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS, STYLES = "osD^vPX*<>", ["-", "--", ":", "-."]
DPI = 110


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


ACCEPTED = ("a tiltlm sweep directory (results.jsonl, or cells/<cell>/done.json while it runs), "
            "lm/ or testbed/ of a tiltlm run, a tiltlm run directory (run.json), or the --out of tiltlm train "
            "(config.yaml and metrics.jsonl)")


def _source(run_dir: Path) -> str:
    """The file the cells are read from, relative to ``run_dir``."""
    if (run_dir / "results.jsonl").is_file():
        return "results.jsonl"
    if (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file():
        return "metrics.jsonl"
    return "cells/*/done.json"


def _is_run_index(run_dir: Path) -> bool:
    """A top-level `tiltlm run` directory: run.json and no cells of its own."""
    return (run_dir / "run.json").is_file() and not (run_dir / "results.jsonl").is_file() and not (run_dir / "cells").is_dir()


def _write_run_index(run_dir: Path) -> Path:
    """Hand a `tiltlm run` directory to tiltlm.experiments.run.write_index (its index page links the parts' reports)."""
    from tiltlm.experiments import run as run_module

    write_index = getattr(run_module, "write_index", None)
    if write_index is None:
        parts = ", ".join(p.name for p in sorted(run_dir.iterdir()) if (p / "results.jsonl").is_file()) or "lm, testbed"
        raise TiltlmError(f"'{run_dir}' is a tiltlm run directory (run.json), whose index this version of tiltlm cannot "
                          f"rewrite; pass one of its parts instead ({parts}), e.g. tiltlm report {run_dir / 'lm'}")
    written = write_index(run_dir)
    return Path(written) if isinstance(written, (str, Path)) else run_dir / "report.html"


def _missing_message(run_dir: Path) -> str:
    """What ``run_dir`` lacks, what is accepted, and the nearest directories that would do."""
    has = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    parts = [p.name for p in sorted(run_dir.iterdir()) if p.is_dir() and ((p / "results.jsonl").is_file() or (p / "run.json").is_file()
                                                                        or (p / "metrics.jsonl").is_file())]
    hint = f"; its subdirectories {', '.join(parts)} are: pass one of those" if parts else ""
    if (run_dir / "cells").is_dir():
        hint += "; it has cells/ but no finished cell yet (no cells/<cell>/done.json): wait until one finishes"
    found = f" (it has {', '.join(has[:8])}{', …' if len(has) > 8 else ''})" if has else " (it is empty)"
    return (f"'{run_dir}' has no results.jsonl, no config.yaml + metrics.jsonl and no run.json{found}; tiltlm report "
            f"accepts {ACCEPTED}{hint}")


def load_cells(run_dir: Path) -> list[Cell]:
    """The finished cells of a sweep directory with their curves (a cell listed twice keeps its last entry); a
    `tiltlm train` directory is one cell; a sweep still running (no results.jsonl yet) is read from its done.json files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise TiltlmError(f"report directory '{run_dir}' {what}; pass {ACCEPTED}")
    path = run_dir / "results.jsonl"
    if not path.is_file():
        if (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file():
            return [_run_cell(run_dir)]
        done = sorted(run_dir.glob("cells/*/done.json"))
        if not done:
            raise TiltlmError(_missing_message(run_dir))
        rows = []
        for d in done:
            try:
                rows.append(json.loads(d.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TiltlmError(f"'{d}' is not valid JSON; delete it to rerun that cell with tiltlm sweep") from None
        return _cells_of(run_dir, rows, d.parent.parent)
    return _cells_of(run_dir, _read_jsonl(path, strict=True), path)


def _cells_of(run_dir: Path, rows: list, path: Path) -> list[Cell]:
    cells: dict[str, Cell] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("cell"), str) or not isinstance(row.get("final", {}), dict):
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
    from tiltlm.io import load_yaml

    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise TiltlmError(f"'{run_dir}' has config.yaml but no metrics.jsonl: a training run before its first step; wait for it "
                          "(or pass a sweep directory)")
    if not config_path.is_file():
        raise TiltlmError(f"'{run_dir}' has metrics.jsonl but no config.yaml; pass the --out directory of tiltlm train as it was written")
    try:
        config = load_yaml(config_path, f"'{config_path}'")
    except TiltlmError as e:
        raise TiltlmError(f"{str(e).rsplit('; ', 1)[0]}; restore the config.yaml tiltlm train wrote") from None
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

    if _is_run_index(Path(run_dir)):
        return None  # the parts have their own reports and tables
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


def legend_label(text: str, width: int = 32) -> str:
    """A legend entry wrapped onto lines of ``width`` characters: a long algorithm label must not squeeze the axes away."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=True)) or text


def _style(algorithms: list[str]) -> dict[str, tuple[str, str]]:
    return {a: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, a in enumerate(algorithms)}


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
        est = [(_num(c.final, "kl/target_prior_is"), _pick(c.final, REWARD)) for c in cells]
        est = [(x, y) for x, y in est if x is not None and y and math.isfinite(x) and math.isfinite(y[1])]
        if est:
            used |= {"kl/target_prior_is", *(y[0] for _, y in est)}
            estimated.append((config.beta, _mean_std([x for x, _ in est])[0], _mean_std([y[1] for _, y in est])[0]))
            continue
        for keys, bound in ((KL_PRIOR, False), (("kl/prior_seq_bound",), True)):
            xy = [(_pick(c.final, keys), _pick(c.final, REWARD)) for c in cells]
            xy = [(x, y) for x, y in xy if x and y and math.isfinite(x[1]) and math.isfinite(y[1])]
            if xy:
                used |= {x[0] for x, _ in xy} | {y[0] for _, y in xy}
                (x, x_sd), (y, y_sd) = _mean_std([x[1] for x, _ in xy]), _mean_std([y[1] for _, y in xy])
                group = config.name + (" (KL upper bound)" if bound else "")
                points.append(FrontierPoint(group, config.label, x, x_sd, y, y_sd, bound))
                break
    stars = []
    exact_betas = []
    for beta, t in targets:
        x, y = _num(t, "kl_target_prior"), _num(t, "reward_target")
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            stars.append((beta, x, y, False))
            exact_betas.append(beta)
    for beta, x, y in estimated:
        if not any(b == beta or (b is not None and beta is not None and math.isclose(b, beta)) for b in exact_betas):
            stars.append((beta, x, y, True))
    priors = [_num(t, "reward_prior") for _, t in targets if _num(t, "reward_prior") is not None]
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
            cost = sum(_overlap(box, b) for b in marks + placed) + (0 if frame.contains(box.x0, box.y0) and
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


def _overlap(a, b) -> float:
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
    fig = _figure(8, 5.2)
    ax = fig.add_subplot()
    if scale == "log":
        ax.set_xscale("log", nonpositive="clip")
    elif scale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
    by_group: dict[str, list[FrontierPoint]] = {}
    for p in points:
        by_group.setdefault(p.group, []).append(p)
    style = _style(list(dict.fromkeys(p.group.removesuffix(" (KL upper bound)") for p in points)))
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
    _save(fig, path)
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
    handles = [Line2D([], [], color=c, marker=m, label=legend_label(a)) for a, (c, m) in style.items()]
    handles += [Line2D([], [], color="grey", ls="-", marker="o", label="exact")] if True in kinds else []
    handles += [Line2D([], [], color="grey", ls="--", label="IS estimate (smoothed)")] if False in kinds else []
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    kind = "exact" if kinds == {True} else "IS estimate" if kinds == {False} else "exact (solid) and IS estimate (dashed)"
    fig.suptitle(f"KL(p*‖π) over training: {kind}" + (", log scale" if positive else ""))
    _save(fig, path)
    styles = []
    if True in kinds:
        styles.append("solid lines with markers are exact (enumerated) values")
    if False in kinds:
        styles.append("dashed lines importance-sampling estimates, smoothed by a trailing mean over 5% of the run")
    betas = sorted(by_beta, key=lambda b: (b is None, b or 0.0))
    caption = (f"KL(p*‖π), the forward divergence to the target, against the number of samples drawn: one line per cell, "
               f"coloured by algorithm ({', '.join(style)}), one panel per β ({', '.join(_fmt_beta(b) for b in betas)}); "
               f"{' and '.join(styles)}{'; log scale' if positive else ''}. A method that approximates p* drives it towards 0; "
               "a collapsing one makes it grow.")
    return f"y = {' / '.join(k for k, e in zip(KL_TARGET, (True, False)) if e in kinds)}", caption


def distinct_keys(cells: list[Cell]) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(distinct-1 keys, distinct-2 keys, "words" or "tokens"): word n-grams (diversity/distinct_n), unless every word
    distinct-2 value is 0 while token values exist — texts without word boundaries (a letter vocabulary decodes to one
    word per sample, so there are no word bigrams) — then token n-grams (diversity/distinct_n_tokens)."""
    rows = [r for c in cells for r in [c.final, *c.curve]]
    words = [v for r in rows if (v := _num(r, "diversity/distinct_2")) is not None and math.isfinite(v)]
    tokens = [v for r in rows if (v := _num(r, "diversity/distinct_2_tokens")) is not None and math.isfinite(v)]
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
    panels = [[(c.algorithm, c.beta, s) for c in cells if (s := _series(c.curve, keys))] for keys, _ in diversity]
    if not any(panels):
        return None
    from matplotlib.lines import Line2D

    style = _style(list(dict.fromkeys(a for lines in panels for a, _, _ in lines)))
    betas = sorted({b for lines in panels for _, b, _ in lines}, key=lambda b: (b is None, b or 0.0))
    dash = {b: STYLES[i % len(STYLES)] for i, b in enumerate(betas)}
    fig = _figure(11, 6.6)
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
    handles += [Line2D([], [], color="grey", ls=dash[b], label=f"β = {_fmt_beta(b)}") for b in betas]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    fig.suptitle("Diversity over training (batch estimates smoothed over 5% of each run)")
    _save(fig, path)
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
    columns = [(keys, head) for keys, head in _columns(cells) if any(_num(c.final, k) is not None for c in cells for k in keys)]
    if not columns:
        return '<p class="missing">No table: the cells\' final metrics have none of the known keys.</p>', ""
    estimates = references = False
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
            estimates |= bool(est)
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
    return [(k, h) for keys, h in columns for k in keys if any(_num(c.final, k) is not None for c in cells)]


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


def write_report(run_dir: Path) -> Path:
    """Write DIR/report/ (report.html + PNG figures) for a sweep or training run directory; returns the path of report.html."""
    from tiltlm.experiments import passk

    run_dir = Path(run_dir)
    if _is_run_index(run_dir):
        return _write_run_index(run_dir)
    cells = load_cells(run_dir)
    source = "../" + _source(run_dir)
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
        table, table_intro = _table_html(cells, groups, targets)
        samples_html, samples_intro = _samples_html(samples, groups)
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
            *([f"<p>{html.escape(table_intro)}</p>"] if table_intro else []),
            table,
            "<h2>Samples</h2>",
            *([f"<p>{html.escape(samples_intro)}</p>"] if samples_intro else []),
            samples_html,
            f'<p class="meta">Generated by tiltlm report from <code>{html.escape(source)}</code> (relative to this page).</p>',
            "</body></html>",
        ]
        (tmp / "report.html").write_text("\n".join(page) + "\n", encoding="utf-8")
        replace_dir(tmp, run_dir / "report")  # readers see the old report or the new one, never half
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / "report" / "report.html"
