"""No silent reuse: `--resume`, a sweep re-run and `testbed` / `pretrain` / `run` into an existing directory compare
what they would produce with what is there.

A refusal is one line ``error: …``, exit code 2, no traceback, and the directory byte-identical; the flag paths
(``--accept-config``, ``--overwrite``) work and leave config.yaml / sweep.yaml describing what ran; an identical
re-run still resumes or skips.
"""

from __future__ import annotations

import json

import pytest
import yaml
from test_bad_inputs import snapshot, tiltlm

from tiltlm.testbed import make_testbed


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    return make_testbed(tmp_path_factory.mktemp("reuse") / "tb", vocab_size=4, n_layer=1, n_embd=16, seed=0)


def config(tb, **edits) -> dict:
    cfg = {"prior": str(tb), "target": {"reward": "contains:a", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
           "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 2, "lr": 0.01, "schedule": "constant"}}
    for key, value in edits.items():
        *parents, last = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write(path, data: dict, text_before: str = ""):
    path.write_text(text_before + yaml.safe_dump(data))
    return str(path)


def refused(argv, path, monkeypatch, capsys, *needles) -> str:
    """Run `tiltlm ARGV`: one line, exit 2, no traceback, ``path`` byte-identical; returns the line."""
    before = snapshot(path)
    code, printed = tiltlm(argv, monkeypatch, capsys)
    lines = printed.strip().splitlines()
    assert code == 2, printed
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in printed, printed
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(path) == before
    with capsys.disabled():
        print(lines[0])  # the catalogue's message column (pytest -s)
    return lines[0]


def ok(argv, monkeypatch, capsys) -> str:
    code, printed = tiltlm(argv, monkeypatch, capsys)
    assert code == 0, printed
    return printed


def steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run(tb, tmp_path, monkeypatch, capsys):
    """A finished 2-step run in tmp_path/r from tmp_path/a.yaml."""
    ok(["train", write(tmp_path / "a.yaml", config(tb)), "--out", str(tmp_path / "r")], monkeypatch, capsys)
    return tmp_path / "r"


# ---- tiltlm train --resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["resume-changed-reward", "resume-seed-override", "resume-steps-cosine", "resume-fewer-steps",
                                  "accept-config-without-resume"])
def test_resume_with_another_config_is_refused(case, run, tb, tmp_path, monkeypatch, capsys):
    a = str(tmp_path / "a.yaml")
    if case == "resume-changed-reward":
        b = write(tmp_path / "b.yaml", config(tb, target__reward="contains:b"))
        refused(["train", b, "--out", str(run), "--resume"], run, monkeypatch, capsys,
                "target.reward: 'contains:a' → 'contains:b'", "resume with the run's own config", "--accept-config")
    elif case == "resume-seed-override":
        refused(["train", a, "--out", str(run), "--resume", "--seed", "7"], run, monkeypatch, capsys, "seed: 0 → 7", "--accept-config")
    elif case == "resume-steps-cosine":  # with a decaying lr, optim.steps sets every step's lr: a real change
        c = write(tmp_path / "c.yaml", config(tb, optim__schedule="cosine"))
        ok(["train", c, "--out", str(tmp_path / "rc")], monkeypatch, capsys)
        refused(["train", c, "--out", str(tmp_path / "rc"), "--resume", "--steps", "4"], tmp_path / "rc", monkeypatch, capsys,
                "optim.steps: 2 → 4", "optim.schedule cosine", "--accept-config")
    elif case == "resume-fewer-steps":
        refused(["train", a, "--out", str(run), "--resume", "--steps", "1"], run, monkeypatch, capsys,
                "is at step 2 already", "--steps 2 or more")
    else:
        refused(["train", a, "--out", str(run), "--accept-config"], run, monkeypatch, capsys, "add --resume")


def test_resume_with_the_same_resolved_config_continues(run, tb, tmp_path, monkeypatch, capsys):
    """A comment, another key order or a default spelled out is not a change; a finished run says so."""
    same = config(tb, seed=0, optim__optimizer="adam")
    same = dict(reversed(list(same.items())))
    before = snapshot(run)
    printed = ok(["train", write(tmp_path / "same.yaml", same, "# the same run\n"), "--out", str(run), "--resume"], monkeypatch, capsys)
    assert "already at step 2" in printed and "nan" not in printed
    assert steps(run) == [1, 2] and not (run / "config_changes.jsonl").exists()
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("policy")} == {k: v for k, v in before.items() if not k.startswith("policy")}
    ok(["train", str(run / "config.yaml"), "--out", str(run), "--resume"], monkeypatch, capsys)  # the run's own file


def test_more_steps_with_a_constant_lr_extend_the_run_like_an_uninterrupted_one(run, tmp_path, monkeypatch, capsys):
    printed = ok(["train", str(tmp_path / "a.yaml"), "--out", str(run), "--resume", "--steps", "4"], monkeypatch, capsys)
    assert "optim.steps: 2 → 4" in printed
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["steps"] == 4
    assert [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()] == [
        {"step": 2, "changes": {"optim.steps": [2, 4]}}]
    ok(["train", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "ref"), "--steps", "4"], monkeypatch, capsys)
    rows, ref = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (run, tmp_path / "ref"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [(r["loss"], r["reward/mean"]) for r in rows] == [(r["loss"], r["reward/mean"]) for r in ref]
    assert yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())


def test_accept_config_continues_with_the_new_config_and_records_the_change(run, tb, tmp_path, monkeypatch, capsys):
    b = write(tmp_path / "b.yaml", config(tb, target__reward="contains:b"))
    printed = ok(["train", b, "--out", str(run), "--resume", "--steps", "3", "--accept-config"], monkeypatch, capsys)
    assert "config changed from step 2: target.reward: 'contains:a' → 'contains:b', optim.steps: 2 → 3" in printed
    assert "done: 3 steps" in printed
    ran = yaml.safe_load((run / "config.yaml").read_text())
    assert ran["target"]["reward"] == "contains:b" and ran["optim"]["steps"] == 3
    assert json.loads((run / "config_changes.jsonl").read_text()) == {
        "step": 2, "changes": {"target.reward": ["contains:a", "contains:b"], "optim.steps": [2, 3]}}
    assert steps(run) == [1, 2, 3]
    ok(["train", b, "--out", str(run), "--resume", "--steps", "3"], monkeypatch, capsys)  # now b is the run's config


# ---- tiltlm sweep ------------------------------------------------------------------------------------------

def sweep_file(path, tb, reward="count:a", seeds=(0,), betas=(1.0,)):
    data = {"base": {"prior": str(tb), "target": {"reward": reward}, "sampling": {"n_per_context": 4, "max_new_tokens": 3},
                     "optim": {"steps": 2, "lr": 0.01, "schedule": "constant"}, "metrics": {"diversity": False}},
            "grid": {"algorithms": ["kl-pg"], "betas": list(betas), "seeds": list(seeds)}}
    return write(path, data)


def finished(out) -> list[str]:
    return sorted(p.parent.name for p in out.glob("cells/*/done.json"))


@pytest.fixture
def swept(tb, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sw"
    ok(["sweep", sweep_file(tmp_path / "s.yaml", tb), "--out", str(out)], monkeypatch, capsys)
    return out


def test_sweep_rerun_with_another_base_is_refused_then_overwritten(swept, tb, tmp_path, monkeypatch, capsys):
    foreign = swept / "cells" / "notes.txt"
    foreign.write_text("mine")
    changed = sweep_file(tmp_path / "s2.yaml", tb, reward="count:b")
    refused(["sweep", changed, "--out", str(swept)], swept, monkeypatch, capsys,
            "base.target.reward: 'count:a' → 'count:b'", "kl-pg_beta1_seed0", "--overwrite")
    old = (swept / "cells" / "kl-pg_beta1_seed0" / "metrics.jsonl").read_text()
    printed = ok(["sweep", changed, "--out", str(swept), "--overwrite"], monkeypatch, capsys)
    assert "finished kl-pg_beta1_seed0" in printed
    assert yaml.safe_load((swept / "sweep.yaml").read_text())["base"]["target"]["reward"] == "count:b"
    cell = yaml.safe_load((swept / "cells" / "kl-pg_beta1_seed0" / "config.yaml").read_text())
    assert cell["target"]["reward"] == "count:b"
    assert (swept / "cells" / "kl-pg_beta1_seed0" / "metrics.jsonl").read_text() != old
    assert foreign.read_text() == "mine"  # only the cells sweep.yaml names are deleted


def test_sweep_rerun_that_drops_started_cells_is_refused(swept, tb, tmp_path, monkeypatch, capsys):
    grown = sweep_file(tmp_path / "s2.yaml", tb, seeds=(0, 1))
    ok(["sweep", grown, "--out", str(swept)], monkeypatch, capsys)
    refused(["sweep", sweep_file(tmp_path / "s3.yaml", tb, seeds=(1,)), "--out", str(swept)], swept, monkeypatch, capsys,
            "grid.seeds: [0, 1] → [1]", "--overwrite")


def test_sweep_rerun_same_or_grown_reuses_the_cells(swept, tb, tmp_path, monkeypatch, capsys):
    before = snapshot(swept / "cells")
    printed = ok(["sweep", str(tmp_path / "s.yaml"), "--out", str(swept)], monkeypatch, capsys)
    assert "finished" not in printed and snapshot(swept / "cells") == before  # identical: every cell skipped
    printed = ok(["sweep", sweep_file(tmp_path / "s2.yaml", tb, seeds=(0, 1), betas=(1.0, 0.5)), "--out", str(swept)], monkeypatch, capsys)
    assert printed.count("finished ") == 3 and "finished kl-pg_beta1_seed0" not in printed  # only the new cells run
    assert {k: v for k, v in snapshot(swept / "cells").items() if k in before} == before
    assert yaml.safe_load((swept / "sweep.yaml").read_text())["grid"]["seeds"] == [0, 1]
    assert finished(swept) == ["kl-pg_beta0.5_seed0", "kl-pg_beta0.5_seed1", "kl-pg_beta1_seed0", "kl-pg_beta1_seed1"]


# ---- tiltlm testbed / pretrain / run into an existing directory --------------------------------------------

def test_testbed_same_parameters_is_left_other_refused_or_overwritten(tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    args = ["testbed", str(out), "--vocab-size", "4", "--layers", "1", "--embd", "16"]
    ok(args, monkeypatch, capsys)
    before = snapshot(out)
    printed = ok(args, monkeypatch, capsys)
    assert printed.strip().count("\n") == 0 and "already holds this testbed" in printed and snapshot(out) == before
    refused([*args, "--seed", "1"], out, monkeypatch, capsys, "holds a testbed with other parameters (seed: 0 → 1)", "--overwrite")
    ok([*args, "--seed", "1", "--overwrite"], monkeypatch, capsys)
    assert json.loads((out / "testbed.json").read_text())["seed"] == 1 and snapshot(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left beside it


def test_testbed_into_a_directory_tiltlm_did_not_write_is_refused_even_with_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        refused(["testbed", str(out), "--vocab-size", "4", *extra], out, monkeypatch, capsys,
                "is not empty and is not a testbed tiltlm wrote", "never overwritten")


def test_pretrain_into_an_existing_model_is_refused(tmp_path, monkeypatch, capsys):
    from tiltlm.pretrain import ModelShape, OptimConfig, pretrain

    out = tmp_path / "pre"
    shape, optim = ModelShape(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=300), OptimConfig(batch_size=2, block_size=64, log_every=0, bf16_autocast=False)
    record = pretrain(out, n_stories=40, steps=1, model_shape=shape, optim=optim, log=None)
    before = snapshot(out)
    assert pretrain(out, n_stories=40, steps=1, model_shape=shape, optim=optim, log=None) == record  # same: left as it was
    assert snapshot(out) == before
    refused(["pretrain", "--out", str(out), "--steps", "1", "--n-stories", "40"], out, monkeypatch, capsys,
            "holds a pretrained model with other parameters (model_shape.", "--overwrite")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    refused(["pretrain", "--out", str(tmp_path / "mine"), "--overwrite"], tmp_path / "mine", monkeypatch, capsys,
            "is not a pretrained model tiltlm wrote")


def test_run_overwrite_replaces_only_a_run_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["run", "--out", str(out), "--task", "letters", "--overwrite"], out, monkeypatch, capsys,
            "is not the results of a tiltlm run (no run.json)", "choose another --out")
