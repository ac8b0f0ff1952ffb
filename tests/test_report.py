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
from tiltlm.experiments import cells as cells_module
from tiltlm.experiments import curves as curves_module
from tiltlm.experiments import frontier as frontier_module
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
    from tiltlm.experiments.cells import config_of

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
    prior, cell, posterior = text.index("π0 (prior)</h3>"), text.index("reinforce β=1 seed 0</h3>"), text.index("p* (importance resampling)</h3>")
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
    with pytest.raises(TiltlmError, match="has no results.jsonl, no config.yaml [+] metrics.jsonl and no run.json .it is empty.; "
                                          "tiltlm report accepts a tiltlm sweep directory"):
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


# ---- pass@k: held-out evaluations (eval/… rows) ----------------------------------------------------------------
PASSK = "pass_at_k.png"
KS = (1, 2, 4, 8)


def run_cli(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    """`tiltlm ARGV` in-process, on a wide console: (exit code, stdout, stderr)."""
    import sys

    from tiltlm.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(sys, "argv", ["tiltlm", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_drawn_png(path: Path) -> None:
    """A valid PNG with real content: curves in several colours, not a blank canvas."""
    from PIL import Image

    assert_valid_png(path)
    with Image.open(path) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, path
    assert path.stat().st_size > 15_000


def passk_rows(page: Path) -> dict[str, dict]:
    """The pass@k table: method -> {"runs": int, key: data-mean, ..., "crossover": text}."""
    out = {}
    for cls, cells in parse(page).rows:
        if cls == "passk":
            row = {"runs": int(cells[1][1]), "crossover": cells[-1][1]}
            row |= {attrs["data-key"]: float(attrs["data-mean"]) for attrs, _ in cells[2:-1] if "data-key" in attrs}
            out[cells[0][1]] = row
    return out


def eval_row(pass_at, exact=None, **extra) -> dict:
    row = {f"eval/pass@{k}": v for k, v in zip(KS, pass_at)}
    row |= {f"eval/pass@{k}_exact": v for k, v in zip(KS, exact or [])}
    return row | {"eval/reward": pass_at[0], **extra}


def synthetic_eval_sweep(root: Path) -> Path:
    """Two configurations × two seeds with held-out evaluations at steps 0, 2 and 4. pi0: pass@k = 1 - 0.8^k.
    reinforce is ahead at k = 1, 2 and behind from k = 4 (exact curves for both: the crossover is read from them);
    kl-pg, estimates only, stays ahead up to k = 8."""
    results = []
    for alg in ("reinforce", "kl-pg"):
        for seed in (0, 1):
            w = 0.01 * (seed + 1)
            pi0 = [1 - 0.8 ** k + w for k in KS]
            rows = [{"step": 0, **eval_row(pi0, [1 - 0.8 ** k for k in KS], **{"eval/distinct_correct": 1.5 + w, "eval/kl_prior": 0.0})}]
            for step in range(1, 5):
                row = {"step": step, "samples/seen": 8 * step, "reward/mean": 0.1 * step, "kl/prior_seq": 0.2 * step}
                if step % 2 == 0:
                    t = step / 4
                    if alg == "reinforce":
                        curve, exact = [0.45 + w + 0.02 * i * t for i in range(4)], [0.44 + 0.02 * i * t for i in range(4)]
                    else:
                        curve, exact = [1 - (0.7 - 0.1 * t) ** k - w for k in KS], None
                    row |= eval_row(curve, exact, **{"eval/distinct_correct": 1.2 - 0.3 * t + w, "eval/kl_prior": t + w,
                                                     **({"eval/kl_target_exact": 0.3 + w} if exact else {})})
                rows.append(row)
            cell = f"{alg}_beta1_seed{seed}"
            write_jsonl(root / "cells" / cell / "metrics.jsonl", rows)
            results.append({"cell": cell, "algorithm": alg, "beta": 1.0, "seed": seed, "final": rows[-1]})
    write_jsonl(root / "results.jsonl", results)
    return root


def test_pass_at_k_figure_and_table_of_a_sweep(tmp_path, monkeypatch, capsys):
    """The table's numbers are the means over seeds of the metrics files' rows (pi0: step 0; a policy: its last
    evaluation), the crossover is where pi0 overtakes, and `tiltlm report` prints the same table."""
    run = synthetic_eval_sweep(tmp_path / "sweep")
    page = write_report(run)
    assert sorted(p.name for p in page.parent.iterdir()) == ["frontier.png", PASSK, "report.html"]  # no KL(p*‖π) or diversity curves
    assert_drawn_png(page.parent / PASSK)
    assert [i["src"] for i in parse(page).images] == ["frontier.png", PASSK]
    assert "eval/pass@k / eval/pass@k_exact" in page.read_text(encoding="utf-8")
    table = passk_rows(page)
    assert list(table) == ["π0 (step 0)", "reinforce β=1", "kl-pg β=1"]
    curves = {c: [json.loads(line) for line in (run / "cells" / c / "metrics.jsonl").read_text().splitlines()]
              for c in (p.name for p in (run / "cells").iterdir())}
    groups = {"π0 (step 0)": [rows[0] for rows in curves.values()],
              "reinforce β=1": [curves[f"reinforce_beta1_seed{s}"][-1] for s in (0, 1)],
              "kl-pg β=1": [curves[f"kl-pg_beta1_seed{s}"][-1] for s in (0, 1)]}
    checked = 0
    for name, rows in groups.items():
        assert table[name]["runs"] == len(rows)
        for key in ("eval/pass@1", "eval/pass@8", "eval/distinct_correct", "eval/kl_prior", "eval/pass@1_exact", "eval/pass@8_exact",
                    "eval/kl_target_exact"):
            if all(key in r for r in rows):
                assert table[name][key] == pytest.approx(statistics.fmean(r[key] for r in rows), rel=1e-12), (name, key)
                checked += 1
            else:
                assert key not in table[name], (name, key)
    assert checked == 6 + 7 + 4  # pi0 has no KL to p*; kl-pg no exact values
    # no per-question evaluations (eval_per_prompt.jsonl) in this directory: no interval, so no "π0 ahead" claim
    assert table["reinforce β=1"]["crossover"] == "— (no per-question data)"
    assert table["kl-pg β=1"]["crossover"] == "— (no per-question data)" and table["π0 (step 0)"]["crossover"] == "—"
    code, out, err = run_cli(["report", str(run)], monkeypatch, capsys)
    assert code == 0, err
    assert "pass@k on held-out prompts" in out and "π0 ahead from k" in out
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in out.splitlines()
             if line.count("│") > 3 and "method" not in line}
    assert set(lines) == set(table)
    for name, cells in lines.items():  # the console's numbers are the page's, to the 4 digits shown
        assert cells[-1] == table[name]["crossover"]
        assert numbers(cells[1])[0] == pytest.approx(table[name]["eval/pass@1"], rel=1e-3)
        assert numbers(cells[2])[0] == pytest.approx(table[name]["eval/pass@8"], rel=1e-3)


def test_a_sweep_without_held_out_evaluations_has_no_pass_at_k_section(tmp_path, monkeypatch, capsys):
    run = synthetic_sweep(tmp_path / "sweep", algorithms=("kl-pg",), betas=(1.0,), seeds=(0,))
    text = write_report(run).read_text(encoding="utf-8")
    assert "pass@k" not in text and not (run / "report" / PASSK).exists()
    code, out, _ = run_cli(["report", str(run)], monkeypatch, capsys)
    assert code == 0 and "pass@k" not in out


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """`tiltlm train` on a tiny enumerable GPT-2 testbed with a prompt dataset and held-out evaluation (exact too)."""
    import yaml

    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("trainrun")
    testbed = make_testbed(root / "testbed", vocab_size=5, n_layer=1, n_embd=16, n_head=2, seed=0)
    (root / "verifier.py").write_text("def contains_answer(completions, answer, **kwargs):\n"
                                      "    return [float(a in c) for c, a in zip(completions, answer)]\n")
    prompts = [("ab", "a"), ("ba", "b"), ("c", "ca"), ("dd", "d"), ("a", "ab"), ("bc", "c"), ("cd", "dc"), ("b", "bb")]
    write_jsonl(root / "p.jsonl", [{"prompt": p, "answer": a} for p, a in prompts])
    config = {"prior": str(testbed), "target": {"reward": f"{root}/verifier.py:contains_answer", "beta": 0.2},
              "algorithm": {"name": "kl-pg"}, "sampling": {"n_per_context": 4, "max_new_tokens": 3},
              "optim": {"steps": 4, "lr": 0.05}, "metrics": {"exact_every": 2, "diversity": False},
              "data": {"path": str(root / "p.jsonl"), "prompts_per_step": 3, "eval_size": 3}, "eval": {"n": 8, "every": 2}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    return root, root / "cfg.yaml"


def test_report_on_a_training_run_directory(train_run, monkeypatch, capsys):
    root, cfg = train_run
    run = root / "run"
    code, _, err = run_cli(["train", str(cfg), "--out", str(run)], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["report", str(run)], monkeypatch, capsys)
    assert code == 0, err
    page = run / "report" / "report.html"
    assert f"report: {page}" in out.replace("\n", "")
    assert sorted(p.name for p in page.parent.iterdir()) == sorted(FIGURES + [PASSK, "report.html"])
    assert_drawn_png(page.parent / PASSK)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 4 and "eval/pass@8_exact" in last
    table = passk_rows(page)
    assert list(table) == ["π0 (step 0)", "kl-pg β=0.2"]
    for name, row in (("π0 (step 0)", first), ("kl-pg β=0.2", last)):
        shown = {k: v for k, v in table[name].items() if k.startswith("eval/")}
        assert set(shown) == {"eval/pass@1", "eval/pass@8", "eval/distinct_correct", "eval/kl_prior", "eval/reward",
                              "eval/pass@1_exact", "eval/pass@8_exact", "eval/distinct_correct_exact", "eval/kl_prior_exact",
                              "eval/kl_target_exact", "eval/kl_policy_target_exact"}
        assert shown == {k: row[k] for k in shown}  # exactly the numbers of metrics.jsonl
    # "π0 ahead from k": its Δ is the per-question file's mean exact difference at that k, its interval below 0
    evals = [json.loads(line) for line in (run / "eval_per_prompt.jsonl").read_text().splitlines()]
    start, end = evals[0]["prompts"], evals[-1]["prompts"]
    m = re.fullmatch(r"(\d+): Δ ([-+][\d.]+) \[([-+][\d.]+), ([-+][\d.]+)\]", table["kl-pg β=0.2"]["crossover"])
    if m is not None:
        k, d, lo, hi = int(m.group(1)), *map(float, m.groups()[1:])
        want = sum(e[f"pass@{k}_exact"] - s[f"pass@{k}_exact"] for s, e in zip(start, end)) / len(start)
        assert d == pytest.approx(want, abs=6e-4) and lo <= d <= hi < 0
    else:
        assert table["kl-pg β=0.2"]["crossover"] == "at no k ≤ 8"
    lines = [line for line in out.splitlines() if line.count("│") > 3 and "method" not in line]
    assert [line.split("│")[1].strip() for line in lines] == ["π0 (step 0)", "kl-pg β=0.2"]
    assert numbers(lines[1].split("│")[3])[0] == pytest.approx(last["eval/pass@1"], rel=1e-3, abs=1e-9)
    # the training curve and the final row feed the other figures as a one-cell sweep
    text = page.read_text(encoding="utf-8")
    assert "No figure" not in text and "metrics.jsonl" in text


def test_report_directories_that_are_neither_are_one_line_errors(tmp_path, monkeypatch, capsys):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("algorithm: {name: kl-pg}\n")
    only_metrics = tmp_path / "only_metrics"
    write_jsonl(only_metrics / "metrics.jsonl", [{"step": 1}])
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, needle in ((half, "has config.yaml but no metrics.jsonl"), (only_metrics, "has metrics.jsonl but no config.yaml"),
                         (empty, "has no results.jsonl, no config.yaml + metrics.jsonl and no run.json (it is empty); tiltlm report "
                                 "accepts a tiltlm sweep directory"),
                         (tmp_path / "nope", "does not exist")):
        code, out, err = run_cli(["report", str(path)], monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    (half / "metrics.jsonl").write_text("")
    with pytest.raises(TiltlmError, match="has no rows yet"):
        write_report(half)


def test_tiltlm_sweep_prints_the_pass_at_k_table(train_run, monkeypatch, capsys):
    """After `tiltlm sweep`, the table: pi0 (one step-0 row per cell, averaged) and each cell's last evaluation."""
    import yaml

    root, cfg = train_run
    base = yaml.safe_load(cfg.read_text())
    del base["algorithm"]
    base["optim"]["steps"] = 2
    (root / "sweep.yaml").write_text(yaml.safe_dump({"base": base, "grid": {"algorithms": ["kl-pg", "reinforce"], "betas": [0.2],
                                                                             "seeds": [0]}}))
    out = root / "sweep"
    code, stdout, err = run_cli(["sweep", str(root / "sweep.yaml"), "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in stdout.splitlines()
             if line.count("│") > 3 and "method" not in line}
    assert list(lines) == ["π0 (step 0)", "kl-pg β=0.2", "reinforce β=0.2"]
    firsts, lasts = [], {}
    for cell in ("kl-pg_beta0.2_seed0", "reinforce_beta0.2_seed0"):
        rows = [json.loads(line) for line in (out / "cells" / cell / "metrics.jsonl").read_text().splitlines()]
        firsts.append(rows[0])
        lasts[cell.split("_")[0] + " β=0.2"] = rows[-1]
    assert lines["π0 (step 0)"][0] == "2"
    assert numbers(lines["π0 (step 0)"][1])[0] == pytest.approx(statistics.fmean(r["eval/pass@1"] for r in firsts), rel=1e-3, abs=1e-9)
    for name, row in lasts.items():
        assert numbers(lines[name][1])[0] == pytest.approx(row["eval/pass@1"], rel=1e-3, abs=1e-9)
        assert numbers(lines[name][2])[0] == pytest.approx(row["eval/pass@8"], rel=1e-3, abs=1e-9)
    assert_drawn_png(out / "report" / PASSK)


# ---- the issues a new user reported: frontier, diversity, captions, footer, samples, directories --------------------
def lm_like_sweep(root: Path) -> Path:
    """The shape `tiltlm run` writes for its LM part: reinforce far out, kl-pg at three betas and dpg/gdc++ close to pi0,
    and the inference baselines (importance sampling carries kl/target_prior_is, best-of-4 a KL bound); no exact.json."""
    results = [{"cell": "reinforce_beta0.2_seed0", "algorithm": "reinforce", "beta": 0.2, "seed": 0,
                "final": {"reward/mean": 0.99, "kl/prior_seq": 40.0}}]
    for beta, kl, r in ((0.05, 3.1, 0.95), (0.2, 0.35, 0.7), (1.0, 0.02, 0.42)):
        results.append({"cell": f"kl-pg_beta{beta:g}_seed0", "algorithm": "kl-pg", "beta": beta, "seed": 0,
                        "final": {"reward/mean": r, "kl/prior_seq": kl}})
    for alg, kl, r in (("dpg", 0.3, 0.66), ("gdc++", 0.31, 0.67)):  # almost on top of each other
        results.append({"cell": f"{alg}_beta0.2_seed0", "algorithm": alg, "beta": 0.2, "seed": 0, "final": {"reward/mean": r, "kl/prior_seq": kl}})
    results.append({"cell": "importance-sampling_beta0.2", "algorithm": "importance-sampling", "beta": 0.2, "seed": 0,
                    "final": {"reward/mean": 0.72, "kl/target_prior_is": 0.41, "diversity/distinct_2": 0.8}})
    results.append({"cell": "best-of-4_beta0.2", "algorithm": "best-of-4", "beta": 0.2, "seed": 0,
                    "final": {"reward/mean": 0.6, "kl/prior_seq_bound": math.log(4) - 0.75, "diversity/distinct_2": 0.7}})
    write_jsonl(root / "results.jsonl", results)
    return root


def captured_figures(monkeypatch) -> dict:
    """Figures as written, by file name (each figure module's save_figure is wrapped)."""
    from tiltlm.experiments import curves, frontier, passk, style

    saved = {}
    real = style.save_figure

    def keep(fig, path):
        saved[Path(path).name] = fig
        real(fig, path)

    for module in (curves, frontier, passk):
        monkeypatch.setattr(module, "save_figure", keep)
    return saved


def figcaption(text: str, image: str) -> str:
    return re.search(rf'<img src="{re.escape(image)}"[^>]*><figcaption>(.*?)</figcaption>', text, re.S).group(1)


def test_frontier_spreads_kl_on_a_log_axis_and_plots_estimated_p_star_and_baselines(tmp_path, monkeypatch):
    run = lm_like_sweep(tmp_path / "lm")
    saved = captured_figures(monkeypatch)
    text = write_report(run).read_text(encoding="utf-8")
    fig = saved["frontier.png"]
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"  # no zero KL here: 0.02 .. 40 spread over the axis
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "p* (estimated: importance sampling)" in legend and "best-of-4 (KL upper bound)" in legend
    assert "importance-sampling" not in legend  # the IS cell is p*'s estimate, drawn as the star
    data = frontier_module.frontier_data(cells_module.groups_of(cells_module.load_cells(run)), [])
    assert [s[1:] for s in data["stars"]] == [(0.41, 0.72, True)]
    bound = next(p for p in data["points"] if p.bound)
    assert bound.x == pytest.approx(math.log(4) - 0.75) and bound.y == 0.6
    caption = figcaption(text, "frontier.png")
    assert "estimated" in caption and "kl/target_prior_is" in caption and "upper bound" in caption and "logarithmic" in caption
    assert "Black star" not in caption and "exact.json" not in caption and "π0" not in caption.split("Final")[0]
    assert 'data-key="kl/prior_seq_bound"' in text and 'data-key="kl/target_prior_is"' in text  # and in the table
    # labels sit beside the markers, not on them, and not on each other
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    r = 5.0 * fig.dpi / 72
    centres = [ax.transData.transform((p.x, p.y)) for p in data["points"]] + [ax.transData.transform((s[1], s[2])) for s in data["stars"]]
    labels = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in labels) == sorted(["β=0.2"] * 5 + ["β=0.05", "β=1", "p* β=0.2 (est.)"])  # reinforce, kl-pg ×3, dpg, gdc++, best-of-4
    boxes = [t.get_window_extent(renderer) for t in labels]
    for box, t in zip(boxes, labels):
        for cx, cy in centres:
            assert not (box.x0 < cx + r and box.x1 > cx - r and box.y0 < cy + r and box.y1 > cy - r), (t.get_text(), box, cx, cy)
    for i, a in enumerate(boxes):
        assert not any(frontier_module.overlap(a, b) > 0 for b in boxes[i + 1:]), labels[i].get_text()


def test_frontier_with_exact_targets_and_pi0_uses_symlog_and_exact_stars(tmp_path, monkeypatch):
    run = synthetic_sweep(tmp_path / "sweep")
    saved = captured_figures(monkeypatch)
    text = write_report(run).read_text(encoding="utf-8")
    ax = saved["frontier.png"].axes[0]
    assert ax.get_xscale() == "symlog"  # pi0 sits at KL 0
    caption = figcaption(text, "frontier.png")
    assert "Black stars: the target p* at β=0.5, β=1, exact" in caption and "Hollow star" not in caption
    assert "open circle at KL 0 is the prior" in caption and "symmetric-logarithmic" in caption
    # an exact p* wins over an estimate at the same beta
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    rows.append({"cell": "importance-sampling_beta1", "algorithm": "importance-sampling", "beta": 1.0, "seed": 0,
                 "final": {"reward/mean": 0.9, "kl/target_prior_is": 0.25}})
    write_jsonl(run / "results.jsonl", rows)
    text = write_report(run).read_text(encoding="utf-8")
    assert "Hollow star" not in figcaption(text, "frontier.png")


def test_diversity_reads_token_ngrams_when_texts_have_no_word_boundaries(tmp_path, monkeypatch):
    """On a letter vocabulary each sample decodes to one word: word distinct-2 is 0 by construction, the token
    distinct-2 the console prints is what the panel and the table must show."""
    run = synthetic_sweep(tmp_path / "sweep", algorithms=("kl-pg",), betas=(1.0,), seeds=(0,))
    cell = run / "cells" / "kl-pg_beta1_seed0" / "metrics.jsonl"
    rows = [json.loads(line) for line in cell.read_text().splitlines()]
    for i, row in enumerate(rows):
        row |= {"diversity/distinct_1": 0.9, "diversity/distinct_2": 0.0, "diversity/distinct_1_tokens": 0.05,
                "diversity/distinct_2_tokens": 0.16 - 0.01 * i}
    write_jsonl(cell, rows)
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    results[0]["final"] = rows[-1]
    write_jsonl(run / "results.jsonl", results)
    saved = captured_figures(monkeypatch)
    page = write_report(run)
    text = page.read_text(encoding="utf-8")
    panel = next(a for a in saved["diversity.png"].axes if a.get_title().startswith("distinct-2"))
    ys = panel.lines[0].get_ydata()
    assert max(ys) > 0.1 and "token" in panel.get_title()
    assert "diversity/distinct_2_tokens" in text and "over token ids" in figcaption(text, "diversity.png")
    cells = {attrs["data-key"]: float(attrs["data-mean"]) for cls, row in parse(page).rows if cls is None
             for attrs, _ in row if "data-key" in attrs and attrs["data-mean"] != "None"}
    assert cells["diversity/distinct_2_tokens"] == pytest.approx(rows[-1]["diversity/distinct_2_tokens"])
    assert "diversity/distinct_2" not in cells
    # texts with words keep word n-grams
    assert curves_module.distinct_keys(cells_module.load_cells(synthetic_sweep(tmp_path / "words")))[2] == "words"


def test_captions_and_intros_describe_only_what_is_there(tmp_path):
    run = tmp_path / "plain"
    rows = [{"step": s, "samples/seen": 8 * s, "reward/mean": 0.1 * s, "kl/prior_seq": 0.05 * s, "kl/target_is": 1 / s} for s in (1, 2, 3)]
    write_jsonl(run / "cells" / "kl-pg_beta1_seed0" / "metrics.jsonl", rows)
    write_jsonl(run / "results.jsonl", [{"cell": "kl-pg_beta1_seed0", "algorithm": "kl-pg", "beta": 1.0, "seed": 0, "final": rows[-1]}])
    text = write_report(run).read_text(encoding="utf-8")
    frontier, divergence = figcaption(text, "frontier.png"), figcaption(text, "divergence.png")
    assert "star" not in frontier and "p* (the stars)" not in frontier and "error bars one" not in frontier and "one seed each" in frontier
    assert "Solid lines" not in divergence and "exact" not in divergence and "dashed lines importance-sampling estimates" in divergence
    assert "Italic rows" not in text and "exact (enumerated)" not in text and "Entropies" not in text
    assert "mean ± standard deviation" not in text  # one seed
    # with exact keys, pi0/p* rows and several seeds every part is described
    text = write_report(synthetic_sweep(tmp_path / "full")).read_text(encoding="utf-8")
    assert "Italic rows are the exact numbers of p* and π0" in text and "exact (enumerated) values" in text
    assert "solid lines with markers are exact" in figcaption(text, "divergence.png")


def test_footer_names_no_absolute_or_temporary_path(tmp_path):
    """`tiltlm run` writes reports inside a temporary directory that is renamed at the end."""
    work = tmp_path / ".run.tmp123" / "lm"
    synthetic_sweep(work)
    write_report(work)
    final = tmp_path / "run"
    (tmp_path / ".run.tmp123").rename(final)
    text = (final / "lm" / "report" / "report.html").read_text(encoding="utf-8")
    assert str(tmp_path) not in text and ".run.tmp123" not in text
    assert "Generated by tiltlm report from <code>../results.jsonl</code>" in text
    assert (final / "lm" / "report" / "../results.jsonl").resolve().is_file()


def test_samples_section_shows_and_describes_exactly_the_columns_of_samples_json(tmp_path):
    run = lm_like_sweep(tmp_path / "lm")
    (run / "samples.json").write_text(json.dumps({"prior": ["a"], "best-of-4": ["b"], "posterior": ["c"],
                                                  "kl-pg_beta0.2_seed0": ["d"], "dialogue (eval)": ["e"]}))
    text = write_report(run).read_text(encoding="utf-8")
    section = text[text.index("<h2>Samples</h2>"):]
    headings = re.findall(r"<h3[^>]*>(.*?)</h3>", section)
    assert headings == ["π0 (prior)", "kl-pg β=0.2 seed 0", "p* (importance resampling)", "best-of-4", "dialogue (eval)"]
    intro = re.search(r"<p>(Texts from samples.json.*?)</p>", section).group(1)
    assert "5 columns" in intro and "highest-reward text of 4 samples" in intro and "resampled" in intro
    # a testbed part has only the trained cells' samples: no pi0 or p* promised
    (run / "samples.json").write_text(json.dumps({"kl-pg_beta0.2_seed0": ["d"]}))
    section = write_report(run).read_text(encoding="utf-8").split("<h2>Samples</h2>")[1]
    assert "π0" not in section and "p*" not in section and "1 column side by side" in section


def test_report_explains_directories_it_cannot_read_and_reads_running_sweeps(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "runs"
    synthetic_sweep(parent / "lm", algorithms=("kl-pg",), betas=(1.0,), seeds=(0,))
    (parent / "notes.txt").write_text("x")
    code, out, err = run_cli(["report", str(parent)], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "its subdirectories lm are: pass one of those" in err and "(it has lm, notes.txt)" in err and "accepts" in err
    # a sweep still running: no results.jsonl yet, its finished cells' done.json are read
    sweep = tmp_path / "running"
    synthetic_sweep(sweep, algorithms=("kl-pg",), betas=(1.0,), seeds=(0, 1))
    for r in (json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()):
        (sweep / "cells" / r["cell"]).mkdir(parents=True, exist_ok=True)
        (sweep / "cells" / r["cell"] / "done.json").write_text(json.dumps(r))
    (sweep / "results.jsonl").unlink()
    text = write_report(sweep).read_text(encoding="utf-8")
    assert "cells/*/done.json" in text and "5 cells" in text


def test_report_on_a_run_directory_calls_run_write_index(tmp_path, monkeypatch, capsys):
    from tiltlm.experiments import page as run_module

    top = tmp_path / "run"
    synthetic_sweep(top / "lm", algorithms=("kl-pg",), betas=(1.0,), seeds=(0,))
    (top / "run.json").write_text("{}")  # not a run summary this version writes
    code, out, err = run_cli(["report", str(top)], monkeypatch, capsys)
    assert code == 2 and "is a tiltlm run directory (run.json)" in err and "pass one of its parts instead (lm)" in err
    calls = []

    def write_index(run_dir):
        calls.append(Path(run_dir))
        (Path(run_dir) / "report.html").write_text("<html></html>")
        return Path(run_dir) / "report.html"

    monkeypatch.setattr(run_module, "write_index", write_index, raising=False)
    code, out, err = run_cli(["report", str(top)], monkeypatch, capsys)
    assert code == 0, err
    assert calls == [top] and f"report: {top / 'report.html'}" in out.replace("\n", "")


@pytest.mark.filterwarnings("error:constrained_layout not applied")  # a long label must not squeeze a figure's axes away
def test_console_tables_never_cut_cells(tmp_path, monkeypatch, capsys):
    """Piped (not a terminal) and without COLUMNS, rich used to cut tables at 80 columns ("kl-pg-with-a-lo…"); a
    narrow terminal folds long cells onto more lines instead of dropping their ends."""
    import io
    import sys

    from tiltlm import cli

    run = synthetic_eval_sweep(tmp_path / "sweep")
    long = "kl-pg-" + "-".join(f"option{i}=value{i}" for i in range(12))
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r["algorithm"] = long if r["algorithm"] == "kl-pg" else r["algorithm"]
    write_jsonl(run / "results.jsonl", rows)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "argv", ["tiltlm", "report", str(run)])
    try:  # main() returns on success, or exits with 0
        code = cli.main()
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if long in line)  # the whole name, on one line
    assert row.count("│") > 5 and "…" not in out
    # a narrow terminal: folded, every character kept
    buffer = io.StringIO()
    narrow = cli.WideConsole(file=buffer, force_terminal=True, width=40, color_system=None)
    table = cli.Table("method", "pass@1")
    table.add_row(long, "0.5")
    narrow.print(table)
    text = buffer.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 40
    assert "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") == 3).startswith(long)


def test_pass_at_k_caption_names_only_what_is_drawn(tmp_path):
    run = synthetic_eval_sweep(tmp_path / "sweep")
    text = write_report(run).read_text(encoding="utf-8")
    caption = figcaption(text, PASSK)
    assert "dashed: exact values" in caption and "π0 is the step-0" in caption
    assert "cross marks" not in caption and "Δpass@k" not in caption  # no per-question data: no band, no crossover drawn
    # estimates only (no exact curves): no dashed lines are promised
    for cell in (run / "cells").iterdir():
        rows = [{k: v for k, v in json.loads(line).items() if not k.endswith("_exact")}
                for line in (cell / "metrics.jsonl").read_text().splitlines()]
        write_jsonl(cell / "metrics.jsonl", rows)
    caption = figcaption(write_report(run).read_text(encoding="utf-8"), PASSK)
    assert "exact" not in caption and "Solid lines with markers: the unbiased estimate" in caption
