"""The RLVR study (tiltlm.experiments.rlvr) and `tiltlm run`'s page: the exact testbed task end to end with a small
budget, the verdict against hand-made numbers, and the report's numbers against the metrics files."""

import json

import pytest
from browser import needs_chromium, render_in_chromium
from test_report import parse

from tiltlm.errors import TiltlmError
from tiltlm.experiments import rlvr
from tiltlm.experiments.page import write_index
from tiltlm.experiments.passk import Line, best_of_n_line
from tiltlm.experiments.run import run_main

SEEDS = (0, 1, 2)  # run_main's default
METHODS = ("dpg", "kl-pg_beta0.1", "kl-pg_beta1", "reinforce")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("rlvr") / "run"
    messages = []
    here = os.getcwd()
    os.chdir(out.parent)
    try:
        run_main("run", task="letters", budget=0.25, log=messages.append)  # a relative --out, as the CLI's default
    finally:
        os.chdir(here)
    (out / "log.txt").write_text("\n".join(messages))
    return out


def _last(metrics_path, step0=False):
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return rows[0] if step0 else rows[-1]


def test_study_trains_every_method_and_logs_progress_per_cell(run_dir):
    names = sorted(p.name for p in (run_dir / "exact" / "cells").iterdir())
    assert names == sorted(f"{m}_seed{s}" for m in METHODS for s in SEEDS)  # three seeds by default
    log = (run_dir / "log.txt").read_text()
    assert log.count("done in") == 12 and "part 1:" in log and "[12/12]" in log
    first = _last(run_dir / "exact" / "cells" / "reinforce_seed0" / "metrics.jsonl", step0=True)
    assert first["step"] == 0 and "eval/pass@64_exact" in first  # pi0's evaluation, exact on this space
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")], "no temporary directory left behind"
    config = (run_dir / "exact" / "cells" / "dpg_seed0" / "config.yaml").read_text()
    assert f"prior: {run_dir.resolve()}/exact/model" in config and ".run." not in config  # paths name the final directory


def _seed_mean(cells, method):
    rows = [_last(cells / f"{method}_seed{s}" / "metrics.jsonl") for s in SEEDS]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}


def test_index_numbers_equal_the_metrics_files(run_dir):
    """Every number of the first table: pi0's is the step-0 evaluation row, each method's the mean of its seeds' last rows."""
    doc = parse(run_dir / "report.html")
    cells = run_dir / "exact" / "cells"
    source = {"π0 (step 0)": _last(cells / "reinforce_seed0" / "metrics.jsonl", step0=True),
              "reinforce": _seed_mean(cells, "reinforce"), "dpg": _seed_mean(cells, "dpg"),
              "kl-pg β=0.1": _seed_mean(cells, "kl-pg_beta0.1"), "kl-pg β=1": _seed_mean(cells, "kl-pg_beta1")}
    checked = set()
    for cls, row in doc.rows:
        if cls == "passk" and row[0][1] in source:
            for attrs, _ in row[2:]:
                if "data-key" in attrs:
                    assert float(attrs["data-mean"]) == pytest.approx(source[row[0][1]][attrs["data-key"]], rel=1e-12, abs=1e-12)
                    checked.add((row[0][1], attrs["data-key"]))
    assert {name for name, _ in checked} == set(source)
    assert {"eval/pass@1", "eval/pass@64", "eval/pass@64_exact", "eval/kl_target_exact"} <= {k for _, k in checked}
    # best-of-4 is pi0's pass@(4k)
    bon = next(row for cls, row in doc.rows if cls == "passk" and row[0][1].startswith("best-of-4"))
    values = {a["data-key"]: float(a["data-mean"]) for a, _ in bon[2:] if "data-key" in a}
    assert values["eval/pass@1"] == pytest.approx(source["π0 (step 0)"]["eval/pass@4"], rel=1e-12)


def test_per_question_means_are_the_metrics_values(run_dir):
    """per_question.json holds each evaluation's per-prompt numbers: their means are the metrics' eval/ values."""
    data = json.loads((run_dir / "exact" / "per_question.json").read_text())
    assert len(data["prompts"]) == 12 and set(data["methods"]) == {"π0", "reinforce", "kl-pg β=0.1", "kl-pg β=1", "dpg"}
    final = _last(run_dir / "exact" / "cells" / "dpg_seed0" / "metrics.jsonl")
    rows = data["methods"]["dpg"]
    for key, metric in (("pass@1", "eval/pass@1"), ("pass@64", "eval/pass@64"), ("distinct_correct", "eval/distinct_correct"),
                        ("pass@1_exact", "eval/pass@1_exact"), ("kl_target_exact", "eval/kl_target_exact")):
        assert sum(r[key] for r in rows) / len(rows) == pytest.approx(final[metric], rel=1e-12, abs=1e-15), key
    first = _last(run_dir / "exact" / "cells" / "reinforce_seed0" / "metrics.jsonl", step0=True)
    assert sum(r["pass@64"] for r in data["methods"]["π0"]) / 12 == pytest.approx(first["eval/pass@64"], rel=1e-12)


def test_the_page_leads_with_the_figure_and_the_computed_verdict(run_dir):
    page = (run_dir / "report.html").read_text()
    verdict = json.loads((run_dir / "exact" / "verdict.json").read_text())
    text = " ".join(verdict["sentences"])
    assert text and text.replace("'", "&#x27;") in page
    assert page.index('id="verdict-exact"') < page.index("<img") < page.index("<table")
    assert (run_dir / "report" / "exact_pass_at_k.png").stat().st_size > 20_000
    assert "Reproduce: <code>tiltlm run --task letters --budget 0.25</code>" in page  # the default seeds: no --seeds


def test_verdict_json_is_the_contract_and_from_the_per_question_files(run_dir):
    """verdict.json: every method's differences to π0 with intervals and its calls; the differences are the means over
    seeds and questions of the cells' per-question exact values."""
    verdict = json.loads((run_dir / "exact" / "verdict.json").read_text())
    assert verdict["level"] == 0.95 and verdict["seeds"] == list(SEEDS) and verdict["n_questions"] == 12 and verdict["exact"]
    assert set(verdict["methods"]) == {"reinforce", "kl-pg β=0.1", "kl-pg β=1", "dpg"}
    cells = run_dir / "exact" / "cells"
    pi0 = _last(cells / "reinforce_seed0" / "metrics.jsonl", step0=True)
    for name, cell in (("dpg", "dpg"), ("reinforce", "reinforce")):
        m, mean = verdict["methods"][name], _seed_mean(cells, cell)
        assert m["narrowed"] in ("yes", "no", "undetermined") and m["kept_breadth"] in ("yes", "no", "undetermined")
        assert [int(k) for k in m["pass_at_k"]] == [1, 2, 4, 8, 16, 32, 64]
        for k, iv in m["pass_at_k"].items():
            assert iv["lo"] <= iv["diff"] <= iv["hi"]
            assert iv["diff"] == pytest.approx(mean[f"eval/pass@{k}_exact"] - pi0[f"eval/pass@{k}_exact"], abs=1e-12)
        d = m["distinct_correct"]
        assert d["diff"] == pytest.approx(mean["eval/distinct_correct_exact"] - pi0["eval/distinct_correct_exact"], abs=1e-9)


def test_the_tables_show_the_intervals_of_verdict_json(run_dir):
    """The page's Δ columns are verdict.json's intervals, as written."""
    doc = parse(run_dir / "report.html")
    verdict = json.loads((run_dir / "exact" / "verdict.json").read_text())
    shown = 0
    for cls, row in doc.rows:
        if cls == "passk" and row[0][1] in verdict["methods"]:
            iv = verdict["methods"][row[0][1]]["pass_at_k"]["64"]
            assert f"{iv['diff']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]" in [text for _, text in row]
            shown += 1
    assert shown >= 4  # the headline table (and the per-part report's)


def test_best_of_n_is_pi0_at_n_times_k():
    pi0 = Line("π0", None, [{f"eval/pass@{k}": 1 - 0.9 ** k for k in (1, 2, 4, 8, 16, 32, 64)}])
    bon = best_of_n_line(pi0, 4).curve()
    assert list(bon) == [1, 2, 4, 8, 16] and bon[2] == pytest.approx(1 - 0.9 ** 8)


def test_index_is_rewritten_from_the_directory_and_refuses_others(run_dir, tmp_path):
    before = (run_dir / "report.html").read_text()
    write_index(run_dir)
    assert (run_dir / "report.html").read_text() == before
    with pytest.raises(TiltlmError, match="no readable run.json"):
        write_index(tmp_path)


def test_unknown_task_is_one_line(tmp_path):
    with pytest.raises(TiltlmError, match="neither quiz, letters, sentiment, overopt, reasoning-gym:<task> nor an existing prompt file"):
        run_main(tmp_path / "out", task="nosuch", log=lambda m: None)
    assert not list(tmp_path.iterdir())
    with pytest.raises(TiltlmError, match="needs distinct seeds"):
        run_main(tmp_path / "out", task="letters", seeds=(0, 0), log=lambda m: None)
    assert not list(tmp_path.iterdir())


def test_a_second_process_filling_out_meanwhile_loses_nothing(tmp_path):
    """Two runs on one --out: the one that finishes second keeps its results beside, with one line."""
    out = tmp_path / "run"

    def other_process_writes(message):
        if message.startswith("part 1"):
            out.mkdir(exist_ok=True)
            (out / "theirs.txt").write_text("kept")

    with pytest.raises(TiltlmError, match="was filled by another process while this run worked"):
        run_main(out, task="letters", budget=0.03, seeds=(0,), log=other_process_writes)
    assert (out / "theirs.txt").read_text() == "kept"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(kept) == 1 and (kept[0] / "report.html").is_file() and (kept[0] / "run.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@needs_chromium
def test_the_first_screen_shows_the_verdict_and_the_figure(run_dir, tmp_path):
    def first_screen(driver):
        top = driver.execute_script("return [document.querySelector('.verdict').getBoundingClientRect().bottom, "
                                    "document.images[0].getBoundingClientRect().top]")
        assert top[0] < 900 and top[1] < 900, top  # both start within the 1280×900 window

    render_in_chromium(run_dir / "report.html", tmp_path, ["report/exact_pass_at_k.png"], on_page=first_screen)


def test_numbers_do_not_depend_on_cores_or_workers(tmp_path):
    """Each cell trains on one thread, so one process on 2 threads and two worker processes write the same bytes."""
    import torch

    outs = []
    for workers, threads in ((1, 2), (2, 1)):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            root = tmp_path / f"w{workers}"
            task = rlvr.letters_task(root, seed=1)
            rlvr.run_study(root, task, betas=(1.0,), steps=3, seeds=(0,), log=lambda m: None, workers=workers)
        finally:
            torch.set_num_threads(before)
        outs.append({p.parent.name: p.read_bytes() for p in sorted((root / "cells").glob("*/metrics.jsonl"))})
    assert len(outs[0]) == 3 and outs[0] == outs[1]


def test_a_prompt_file_task_on_another_prior(tmp_path, testbed_dir):
    """--task FILE --prior DIR: the study on the user's prompts (20% held out, exact_match on `answer`), then the exact part."""
    rows = [{"prompt": a + b, "answer": c} for a in "abc" for b in "abc" for c in "ab"]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_main(tmp_path / "run", task=str(tmp_path / "qa.jsonl"), prior=str(testbed_dir), budget=0.05, seeds=(0,),
                   log=lambda m: None)
    summary = json.loads((out / "run.json").read_text())
    assert [p["dir"] for p in summary["parts"]] == ["rlvr", "exact"]
    final = json.loads((out / "rlvr" / "cells" / "dpg_seed0" / "done.json").read_text())["final"]
    assert (out / "rlvr" / "verdict.json").is_file() and (out / "exact" / "verdict.json").is_file()
    assert "eval/pass@16" in final and "eval/pass@32" not in final  # 16 completions per held-out prompt
    data = json.loads((out / "rlvr" / "per_question.json").read_text())
    assert len(data["prompts"]) == round(0.2 * len(rows)) and data["n"] == 16
    page = (out / "report.html").read_text()
    assert page.index('id="verdict-rlvr"') < page.index('id="verdict-exact"') and "--task " in page
