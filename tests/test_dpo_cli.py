"""The DPO contract through the CLI: `tiltlm train` on a preference file (no target.reward), policy/ scored by
`tiltlm exact --policy`, and every bad preference input one `error:` line with exit 2 and no run directory."""

from __future__ import annotations

import json

import pytest
import yaml

from test_bad_inputs import tiltlm  # in-process `tiltlm ARGV`: (exit code, what it printed)




PAIRS = [{"prompt": "", "chosen": "ab", "rejected": "b"}, {"prompt": "", "chosen": "a", "rejected": "bb"},
         {"prompt": "", "chosen": "aa", "rejected": "ba"}]


def config(testbed_dir, path, algorithm="dpo") -> dict:
    return {"prior": str(testbed_dir), "data": {"path": str(path)}, "target": {"beta": 0.5}, "algorithm": {"name": algorithm},
            "sampling": {"max_new_tokens": 3}, "optim": {"steps": 3, "lr": 0.01}}


def write(path, rows=None, text=None):
    path.write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("algorithm", ["dpo", "ipo"])
def test_the_contract_config_trains_and_exact_scores_the_policy(testbed_dir, tmp_path, monkeypatch, capsys, algorithm):
    prefs = write(tmp_path / "prefs.jsonl", PAIRS)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(testbed_dir, prefs, algorithm)))
    code, printed = tiltlm(["train", str(cfg), "--out", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 0, printed
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(r["pairs/count"] == 3 for r in steps)
    assert {"reward/margin", "reward/accuracy", "logp/chosen_vs_prior", "logp/rejected_vs_prior"} <= set(steps[-1])
    assert steps[0]["reward/margin"] == pytest.approx(0.0, abs=1e-6)  # step 1 starts at pi_theta = pi0
    assert (tmp_path / "run" / "policy").is_dir()
    code, printed = tiltlm(["exact", "--prior", str(testbed_dir), "--policy", str(tmp_path / "run" / "policy"), "--reward",
                            "count:a", "--beta", "0.5", "--max-new-tokens", "3", "--json"], monkeypatch, capsys)
    assert code == 0, printed
    report = json.loads(printed.strip().splitlines()[-1])
    assert report["policy_mass"] == pytest.approx(1.0, abs=1e-5) and report["kl_policy_prior"] > 0  # the policy moved off pi0


BAD = {
    "missing-column": ([{"prompt": "", "chosen": "a"}], None, ["no column 'rejected'", "its columns: prompt, chosen"]),
    "chosen-equals-rejected": (PAIRS + [{"prompt": "", "chosen": "ab", "rejected": "ab"}], None, ["line 4", "the same completion"]),
    "chosen-not-text": ([{"prompt": "", "chosen": 3, "rejected": "a"}], None, ["line 1", "'chosen' is int, not text"]),
    "empty-file": (None, "", ["has no rows; add pairs"]),
    "malformed-line": (None, json.dumps(PAIRS[0]) + "\n{\"prompt\": \n", ["line 2 is not valid JSON", "fix that line"]),
    "prompt-only-data": ([{"prompt": "ab"}], None, ["algorithm dpo trains on preference pairs", "'chosen' or 'rejected'",
                                                    "prompt/chosen/rejected columns"]),
    "text-outside-vocabulary": ([{"prompt": "", "chosen": "a!", "rejected": "b"}], None, ["cannot encode the text 'a!'"]),
}


@pytest.mark.parametrize("row", list(BAD))
def test_bad_preference_input_is_one_line_and_exit_2(row, testbed_dir, tmp_path, monkeypatch, capsys):
    rows, text, needles = BAD[row]
    prefs = write(tmp_path / "prefs.jsonl", rows, text)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(testbed_dir, prefs)))
    code, printed = tiltlm(["train", str(cfg), "--out", str(tmp_path / "run")], monkeypatch, capsys)
    lines = printed.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), printed
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "run").exists()


def test_offline_dpo_without_data_is_one_line(testbed_dir, tmp_path, monkeypatch, capsys):
    cfg = config(testbed_dir, "x")
    del cfg["data"]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, printed = tiltlm(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")], monkeypatch, capsys)
    lines = printed.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "give data: {path: prefs.jsonl}" in lines[0], printed


def test_pair_rows_are_the_enumerated_sequences_of_the_same_text(testbed_policy):
    """A completion's text becomes the very sequence of the sample space (tokens, EOS when shorter than the limit, none
    at the limit): its log pi0 equals the enumerated one for every sequence of a testbed (HF) and a tabular policy."""
    from tiltlm.exact import enumerate_space
    from tiltlm.policies import TabularPolicy
    from tiltlm.train.pairs import pair_samples

    tabular = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0)
    for policy in (testbed_policy, tabular):
        space = enumerate_space(policy)
        texts = space.samples.texts
        rows = pair_samples(policy, [""] * len(texts), texts)
        assert rows.texts == texts
        got = policy.log_prob(rows).double()
        want = space.logp.double()
        assert float((got - want).abs().max()) < 1e-4
        assert rows.eos.tolist() == space.samples.eos.tolist()
