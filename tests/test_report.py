"""tiltlm report: PNG figures and one self-contained HTML page for a sweep directory.

Synthetic directories check the numbers (the table's means are recomputed from results.jsonl),
escaping, graceful degradation and atomic replacement; a real directory comes from two tabular
trainings; a headless Chromium loads the page, when one is installed.
"""

import json
import math
import os
import re
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import needs_chromium, render_in_chromium

from tiltlm.errors import TiltlmError
from tiltlm.experiments import report as report_module
from tiltlm.experiments.report import write_report

FIGURES = ["frontier.png", "divergence.png", "diversity.png"]
SCRIPT = "<script>alert('x')</script>"


# ---- helpers --------------------------------------------------------------------------------
def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def synthetic_sweep(root: Path, *, algorithms=("reinforce", "kl-pg"), betas=(0.5, 1.0), seeds=(0, 1, 2), steps=12) -> Path:
    """A sweep directory of the documented shape with made-up but deterministic numbers."""
    results = []
    for a, alg in enumerate(algorithms):
        for beta in betas:
            for seed in seeds:
                cell = f"{alg}_beta{beta:g}_seed{seed}"
                rows = []
                for step in range(1, steps + 1):
                    t, wiggle = step / steps, 0.01 * ((seed * 7 + step * 3) % 5)
                    row = {"step": step, "samples/seen": 16 * step, "reward/mean": (1 + a) * t / beta + wiggle,
                           "kl/prior_seq": (2 - a) * t + wiggle, "kl/target_is": 0.4 * (1 - t) + 0.02 + wiggle,
                           "entropy/seq": 1.7 - a * t + wiggle, "diversity/distinct_1": 0.9 - 0.3 * t,
                           "diversity/distinct_2": 0.8 - 0.3 * t + wiggle, "diversity/self_bleu": 0.2 + 0.3 * t}
                    if step % 4 == 0 and alg != "kl-pg":  # exact keys only every 4 steps, and not for every cell
                        row |= {"kl/target_exact": 0.3 * (1 - t) + 0.01 + wiggle, "kl/prior_exact": 2 * t + wiggle,
                                "reward/exact": t / beta + wiggle, "entropy/exact": 1.6 - t + wiggle}
                    rows.append(row)
                write_jsonl(root / "cells" / cell / "metrics.jsonl", rows)
                results.append({"cell": cell, "algorithm": alg, "beta": beta, "seed": seed, "final": rows[-1]})
    for n, seed in ((4, 0), (4, 1), (16, 0)):  # baselines: final numbers only; cells of one n are seeds of one row
        results.append({"cell": f"best-of-n_n{n}_seed{seed}", "algorithm": "best-of-n", "beta": None, "seed": seed, "wall_s": seed + n,
                        "final": {"reward/exact": 2.5 + n / 10 + seed, "kl/prior_exact": 0.7 + n / 10, "entropy/exact": 1.0}})
    write_jsonl(root / "results.jsonl", results)
    (root / "exact.json").write_text(json.dumps({str(b): {"log_z": 0.1, "reward_target": 1 / b, "kl_target_prior": 0.3 / b,
                                                          "entropy_target": 2.2, "reward_prior": 0.4, "entropy_prior": 1.7} for b in betas}))
    (root / "samples.json").write_text(json.dumps({"prior": ["a b", "", SCRIPT], "posterior": ["a a"],
                                                   f"{algorithms[0]}_beta1_seed0": ["a a a", "x & y"]}))
    return root


class Table(HTMLParser):
    """Rows of the report's table: [(td attrs, td text), ...] per <tr>, with the row's class."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.title = [], [], ""
        self._cell = self._row = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self._row = (attrs.get("class"), [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = (attrs, [])
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)
        if self._in_title:
            self.title += data


def parse(page: Path) -> Table:
    t = Table()
    t.feed(page.read_text(encoding="utf-8"))
    return t


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def assert_valid_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200, (path, im.size)


# ---- synthetic directories -----------------------------------------------------------------
def test_report_writes_every_figure_and_a_self_contained_page(tmp_path):
    run = synthetic_sweep(tmp_path / "sweep")
    page = write_report(run)
    assert page == run / "report" / "report.html"
    assert sorted(p.name for p in page.parent.iterdir()) == sorted(FIGURES + ["report.html"])
    for name in FIGURES:
        assert_valid_png(page.parent / name)
    doc = parse(page)
    assert doc.title.startswith("tiltlm report")
    assert [i["src"] for i in doc.images] == FIGURES  # relative paths
    assert all(len(i.get("alt", "")) > 10 for i in doc.images)
    text = page.read_text(encoding="utf-8")
    assert "<style>" in text and "<script" not in text.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", text) and "@import" not in text and "url(" not in text
    assert "No figure" not in text
    assert not [p for p in run.iterdir() if p.name.startswith(".report")]  # no temp dir left behind


def test_table_numbers_are_the_means_over_seeds_of_results(tmp_path):
    run = synthetic_sweep(tmp_path / "sweep")
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    doc = parse(write_report(run))
    body = [cells for cls, cells in doc.rows if cls is None and any("data-key" in attrs for attrs, _ in cells)]
    assert len(body) == 2 * 2 + 2  # (algorithm, beta) groups + best-of-n with n = 4 and 16
    checked = 0
    for cells in body:
        name, beta = cells[0][1], cells[1][1]
        group = [r for r in results if r["algorithm"] == name.split(" (")[0] and name.split(" (")[-1].strip(")") in r["cell"]
                 and (r["beta"] is None if beta == "—" else r["beta"] == float(beta))]
        assert int(cells[2][1]) == len(group)
        for attrs, text in cells[3:]:
            key = attrs["data-key"]
            values = [r["final"][key] for r in group if key in r["final"]]
            if not values:
                assert text == "—"
                continue
            mean = statistics.fmean(values)
            assert float(attrs["data-mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15)
            shown = numbers(text)
            assert shown[0] == pytest.approx(mean, rel=2e-3, abs=1e-9), (key, text)
            if len(values) > 1:
                assert shown[1] == pytest.approx(statistics.stdev(values), rel=0.06, abs=1e-9), (key, text)
            checked += 1
    assert checked > 30
    # exact values are shown where every seed has them, else the estimate (greyed)
    kl_pg = next(cells for cells in body if cells[0][1] == "kl-pg")
    reinforce = next(cells for cells in body if cells[0][1] == "reinforce")
    assert kl_pg[3][0]["data-key"] == "reward/mean" and "est" in kl_pg[3][0]["class"]
    assert reinforce[3][0]["data-key"] == "reward/exact" and "est" not in reinforce[3][0]["class"]
    assert any(cells[0][1] == "best-of-n (n4)" for cells in body)
    refs = [cells for cls, cells in doc.rows if cls == "ref"]
    assert [c[0][1] for c in refs] == ["p* (target)", "p* (target)", "π0 (prior)"]
    assert numbers(refs[0][3][1]) == [pytest.approx(2.0)]  # reward_target at beta 0.5


def test_seeds_are_grouped_by_cell_name_without_the_seed():
    from tiltlm.experiments.report import config_of

    def config(cell, algorithm, beta, seed):
        return config_of({"cell": cell, "algorithm": algorithm, "beta": beta, "seed": seed})

    assert config("kl-pg_beta0.5_seed0", "kl-pg", 0.5, 0) == config("kl-pg_beta0.5_seed7", "kl-pg", 0.5, 7) == ("kl-pg", 0.5, "")
    assert config("f-dpg_js_beta1_seed0", "f-dpg_js", 1.0, 0) == ("f-dpg_js", 1.0, "")
    assert config("best-of-n_n4_seed1", "best-of-n", None, 1).label == "n4"
    assert config("importance-sampling_beta0.2", "importance-sampling", 0.2, 0).name == "importance-sampling"


def test_sample_texts_are_escaped_and_side_by_side(tmp_path):
    run = synthetic_sweep(tmp_path / "sweep")
    text = write_report(run).read_text(encoding="utf-8")
    assert SCRIPT not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "x &amp; y" in text and "(empty sequence)" in text
    prior, cell, posterior = text.index("π0 (prior)</h3>"), text.index("reinforce β=1 seed 0</h3>"), text.index("p* (posterior")
    assert prior < cell < posterior


def test_missing_inputs_degrade_to_a_note(tmp_path):
    run = tmp_path / "bare"
    write_jsonl(run / "results.jsonl", [
        {"cell": "a_s0", "algorithm": "best-of-n", "beta": 1.0, "seed": 0, "final": {"reward/mean": 1.0, "kl/prior_seq": 0.5}},
        {"cell": "b_s0", "algorithm": "kl-pg", "beta": 1.0, "seed": 0, "final": {"reward/mean": math.inf, "kl/prior_seq": 0.2}},
    ])
    (run / "exact.json").write_text("{not json")
    page = write_report(run)
    names = sorted(p.name for p in page.parent.iterdir())
    assert names == ["frontier.png", "report.html"]
    text = page.read_text(encoding="utf-8")
    assert text.count("No figure") == 2 and "No samples" in text and "exact.json could not be read" in text
    assert "∞" in text  # a non-finite final value is shown, not plotted
    # a sweep whose cells have no usable metric at all still gets a page
    write_jsonl(run / "results.jsonl", [{"cell": "c", "algorithm": "x", "final": {}}])
    text = write_report(run).read_text(encoding="utf-8")
    assert text.count("No figure") == 3 and "No table" in text


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(TiltlmError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(TiltlmError, match="no results.jsonl; pass a directory written by tiltlm sweep"):
        write_report(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"cell": "a"\n{"cell": "b", "algorithm": "x", "final": {}}\n')
    with pytest.raises(TiltlmError, match="line 1 is not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(TiltlmError, match="no finished cell"):
        write_report(tmp_path)
    # a half-written last line (a sweep still writing) is ignored
    (tmp_path / "results.jsonl").write_text('{"cell": "b", "algorithm": "x", "final": {"reward/mean": 1, "kl/prior_seq": 0}}\n{"cell": "c", "alg')
    assert write_report(tmp_path).exists()


def test_rewrite_replaces_the_report_atomically(tmp_path, monkeypatch):
    run = synthetic_sweep(tmp_path / "sweep", algorithms=("kl-pg",), betas=(1.0,), seeds=(0,))
    first = write_report(run).read_text(encoding="utf-8")
    (run / "report" / "stale.png").write_bytes(b"old")
    write_report(run)
    assert not (run / "report" / "stale.png").exists()  # replaced as a whole, not merged

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "diversity_figure", boom)
    with pytest.raises(RuntimeError):
        write_report(run)
    assert (run / "report" / "report.html").read_text(encoding="utf-8") == first  # the old report is intact
    assert sorted(p.name for p in run.iterdir()) == ["cells", "exact.json", "report", "results.jsonl", "samples.json"]


# ---- a real directory: two tabular trainings --------------------------------------------------
@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    from tiltlm.exact import enumerate_space, exact_report
    from tiltlm.policies import TabularPolicy
    from tiltlm.targets import Prior, Tilt
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    run = tmp_path_factory.mktemp("real")
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0)
    prior.logits.requires_grad_(False)
    target = Prior(prior) * Tilt("count:a", 1.0)
    results, samples = [], {"prior": prior.sample([""], 6, seed=1).texts}
    for algorithm in ("reinforce", "kl-pg"):
        cell = f"{algorithm}_beta1_seed0"
        policy = prior.copy()
        policy.logits.requires_grad_(True)
        config = parse_config({"algorithm": algorithm, "target": {"reward": "count:a", "beta": 1.0},
                               "sampling": {"n_per_context": 16, "max_new_tokens": 3},
                               "optim": {"steps": 30, "lr": 0.1}, "metrics": {"exact_every": 5}})
        rows = Trainer(config, policy=policy, target=target, out_dir=run / "cells" / cell).run()
        results.append({"cell": cell, "algorithm": algorithm, "beta": 1.0, "seed": 0, "final": rows[-1]})
        samples[cell] = policy.sample([""], 6, seed=1).texts
    write_jsonl(run / "results.jsonl", results)
    (run / "exact.json").write_text(json.dumps(exact_report(enumerate_space(prior), target)))
    (run / "samples.json").write_text(json.dumps(samples))
    return run, results


def test_report_on_real_tabular_runs(real_sweep):
    run, results = real_sweep
    page = write_report(run)
    for name in FIGURES:
        assert_valid_png(page.parent / name)
    text = page.read_text(encoding="utf-8")
    # exact keys exist in these runs, so the figures use them
    assert "x = kl/prior_exact, y = reward/exact" in text and "y = kl/target_exact" in text
    rows = {cells[0][1]: cells for cls, cells in parse(page).rows if cls is None and any("data-key" in a for a, _ in cells)}
    for r in results:
        cells = {attrs["data-key"]: float(attrs["data-mean"]) for attrs, _ in rows[r["algorithm"]][3:] if "data-key" in attrs}
        assert cells["reward/exact"] == pytest.approx(r["final"]["reward/exact"], rel=1e-12)
        assert cells["kl/target_exact"] == pytest.approx(r["final"]["kl/target_exact"], rel=1e-12)


# ---- a real browser ----------------------------------------------------------------------------
@needs_chromium
def test_page_renders_in_headless_chromium(real_sweep, tmp_path):
    run, _ = real_sweep
    path = render_in_chromium(write_report(run), tmp_path, FIGURES)
    if os.environ.get("TILTLM_REPORT_SCREENSHOT"):  # keep it to look at: TILTLM_REPORT_SCREENSHOT=shot.png pytest ...
        shutil.copy(path, os.environ["TILTLM_REPORT_SCREENSHOT"])
