"""The benchmarks stay runnable: each one's --quick mode on tiny sizes returns the documented keys with
finite numbers. Nothing here asserts a timing (timings belong to benchmarks/, measured as ratios)."""

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _finite(row: dict, keys: list[str]) -> None:
    for k in keys:
        assert k in row, f"missing {k} in {row}"
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]), f"{k} = {row[k]!r}"


def _payload(payload: dict, name: str) -> list[dict]:
    assert payload["benchmark"] == name
    assert payload["environment"]["torch_threads"] >= 1
    assert payload["rows"]
    return payload["rows"]


def test_step_throughput_quick(bench, tmp_path):
    out = tmp_path / "step.json"
    payload = bench("step_throughput").main(["--quick", "--no-trl", "--sizes", "2x4", "--repeats", "1", "--json", str(out)])
    rows = _payload(payload, "step_throughput")
    assert {r["algorithm"] for r in rows} == {"kl-pg", "dpg"} and out.is_file()
    for r in rows:
        _finite(r, ["B", "T", "tiltlm_s", "floor_s", "ratio_vs_floor", "tiltlm_samples_per_s", "floor_samples_per_s"])


def test_step_throughput_against_trl(bench):
    pytest.importorskip("trl")
    payload = bench("step_throughput").main(["--quick", "--sizes", "2x4", "--repeats", "1", "--algorithms", "kl-pg"])
    (row,) = _payload(payload, "step_throughput")
    assert "trl_error" not in row, row.get("trl_error")
    _finite(row, ["trl_s", "trl_samples_per_s", "speedup_vs_trl"])


def test_scaling_quick(bench):
    rows = _payload(bench("scaling").main(["--quick", "--batches", "2", "3", "--lengths", "2", "4", "--turns", "1", "2"]), "scaling")
    kinds = {r["kind"] for r in rows}
    assert {"step vs B", "step vs T", "rollout (session)", "rollout (reencode)"} <= kinds
    for r in rows:
        if r["kind"] != "rollout reencode/session":
            _finite(r, ["seconds", "per_unit_ms", "exponent"])


def test_exact_enumeration_quick(bench):
    (row,) = _payload(bench("exact_enumeration").main(["--quick", "--vocab", "4", "--lengths", "3"]), "exact_enumeration")
    _finite(row, ["n_sequences", "enumerate_s", "sequences_per_s", "report_s", "walk_s", "prior_mass"])
    assert row["n_sequences"] == 1 + 3 + 9 + 27 and abs(row["prior_mass"] - 1) < 1e-5


def test_memory_quick(bench):
    rows = _payload(bench("memory").main(["--quick", "--batch", "2"]), "memory")
    assert len(rows) == 2
    for r in rows:
        _finite(r, ["peak_rss_mb", "rss_built_mb", "weight_copies"])
    full, lora = rows
    assert full["weight_copies"] == pytest.approx(2.0, abs=0.01)  # the frozen prior is its own copy
    assert lora["prior_is_policy_model"] and lora["weight_copies"] < 1.2  # LoRA: one model + adapters


def test_sharding_quick(bench):
    """2 gloo ranks: FSDP holds half of replicate's weights, gradients and Adam moments per rank."""
    replicate, fsdp, keep = _payload(bench("sharding").main(["--quick", "--ranks", "2"]), "sharding")
    for r in (replicate, fsdp, keep):
        _finite(r, ["weights_mb", "grads_mb", "adam_mb", "state_mb", "peak_rss_mb", "step_s"])
    assert replicate["adam_mb"] == pytest.approx(2 * replicate["grads_mb"])  # two moments per trained weight
    assert fsdp["state_mb_vs_replicate"] == pytest.approx(0.5, abs=0.01)


def test_threads_quick(bench):
    result = bench("threads").main(["--quick", "--json"])
    assert result["cores"] >= 1 and len(result["seconds"]) == 6
    _finite(result["seconds"], list(result["seconds"]))
    _finite(result["slowdown_beside_busy"], list(result["slowdown_beside_busy"]))


def test_sample_efficiency_quick(bench, tmp_path):
    """Two steps of each tiltlm default, scored by enumeration: finite exact KLs that the training moved."""
    out = tmp_path / "se.json"
    payload = bench("sample_efficiency").main(["--quick", "--no-trl", "--methods", "kl-pg", "dpg@schedule=linear",
                                               "--json", str(out)])
    rows = _payload(payload, "sample_efficiency")
    assert {r["method"] for r in rows} == {"kl-pg", "dpg@schedule=linear"} and out.is_file()
    for r in rows:
        _finite(r, ["budget", "kl_policy_target", "kl_target_policy", "seconds", "clip_fraction", "grad_norm_median"])
        assert r["kl_policy_target_min"] <= r["kl_policy_target"] <= r["kl_policy_target_max"]
    testbed = payload["testbed"]
    assert testbed["n_sequences"] == 1 + 4 + 16 + 64 + 256 and testbed["kl_target_prior"] > 0


def test_sample_efficiency_against_trl(bench):
    pytest.importorskip("trl")
    payload = bench("sample_efficiency").main(["--quick", "--methods", "kl-pg"])
    rows = _payload(payload, "sample_efficiency")
    for kind in ("rloo", "grpo"):  # each trainer's lr tuned on the grid, then run
        (trl_row,) = [r for r in rows if r["method"].startswith(f"trl-{kind}@lr=")]
        _finite(trl_row, ["kl_policy_target", "kl_target_policy", "seconds"])
        assert payload["trl_lr"][kind] in payload["trl_grid"]


def test_real_model_quick(bench):
    """The SmolLM2 step benchmark on a tiny tied Llama: parts timed, the step's own peak, metrics rows."""
    rows = _payload(bench("real_model").main(["--quick", "--configs", "tiltlm-full", "tiltlm-lora", "tiltlm+ckpt-full"]), "real_model")
    assert [r["config"].split()[1] for r in rows] == ["full", "lora", "full"]
    for r in rows:
        _finite(r, ["rss_built_mb", "peak_step_mb", "step_s", "sample_s", "reference_s", "score_s", "backward_s", "samples_per_s",
                    "step_cpu_s", "samples_per_cpu_s", "mean_len"])
        assert len(r["metrics"]) == 2 and r["metrics"][-1]["step"] == 2
        assert 0 < r["mean_len"] <= 8
    assert rows[1]["prior_is_policy_model"] and not rows[0]["prior_is_policy_model"]
    for plain, ckpt in zip(rows[0]["metrics"], rows[2]["metrics"]):  # checkpointed layers: the same run, to float rounding
        assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-6)
        assert ckpt["grad/norm"] == pytest.approx(plain["grad/norm"], rel=1e-4, abs=1e-6)


def test_real_model_against_trl(bench):
    """The TRL rows (GRPOTrainer, RLOOTrainer; full and LoRA) on the tiny testbed: the same work as tiltlm's
    kl-pg step — T tokens at most, the reference scored (beta > 0), one optimiser step per generation, no vLLM."""
    pytest.importorskip("trl")
    configs = ["tiltlm-full", "tiltlm-lora", "trl-grpo-full", "trl-grpo-lora", "trl-rloo-full", "trl-rloo-lora"]
    rows = _payload(bench("real_model").main(["--quick", "--configs", *configs]), "real_model")
    assert [r["tool"] + "-" + r["mode"] for r in rows] == configs
    tiltlm, trl_rows = rows[0], rows[2:]
    for r in trl_rows:
        _finite(r, ["rss_built_mb", "peak_step_mb", "step_s", "sample_s", "reference_s", "score_s", "backward_s", "samples_per_s",
                    "tiltlm_speedup", "tiltlm_speedup_cpu", "tiltlm_peak_ratio", "mean_len"])
        settings = r["trl"]
        assert settings["beta"] == 1.0 and settings["max_completion_length"] == settings["max_new_tokens"] == 8
        assert settings["num_generations"] == 4 and not settings["use_vllm"] and settings["num_iterations"] == 1
        assert settings["has_ref_model"] == (r["mode"] == "full")  # LoRA: the reference is the model with its adapters off
        assert r["optimizer_steps"] == 1 and r["grad_passes"] == 1
        assert r["nograd_passes"] == (2 if r["tool"] == "trl-rloo" else 1)  # the reference (RLOO: and its "old" log-probs)
        assert r["prompt_len"] == tiltlm["prompt_len"] and 0 < r["mean_len"] <= 8


def test_sampling_quick(bench):
    rows = _payload(bench("sampling").main(["--quick", "--smollm", "off"]), "sampling")
    assert [(r["B"], r["sampler"]) for r in rows] == [(4, "gumbel"), (4, "inverse-cdf"), (8, "gumbel"), (8, "inverse-cdf")]
    for r in rows:
        _finite(r, ["tokens_per_s", "gemm_gflops", "ratio_steps", "ratio_tokens"])
        assert 0 < r["tokens"] <= r["B"] * r["steps"] and r["steps"] <= r["T"] == 4
        assert 0 < r["ratio_tokens"] <= r["ratio_steps"]  # generated tokens never exceed rows × steps
    (r,) = _payload(bench("sampling").main(["--quick", "--smollm", "off", "--bound", "--samplers", "inverse-cdf"]), "sampling")[1:]
    _finite(r, ["matmul_s", "ratio_bound", "attention_s", "ratio_bound_attention", "arithmetic_s", "ratio_bound_model"])
    assert r["sampler"] == "inverse-cdf"
    assert 0 < r["matmul_s"] < 1.5 * r["sample_s"]  # the products are a part of sampling (1.5: the profiled run's noise)
    assert 0 < r["attention_s"] < 1.5 * r["sample_s"]  # the default model runs SDPA: its kernel is found
    assert 0 < r["arithmetic_s"] < 1.5 * r["sample_s"]  # GELU, residual adds, layer norms, log-softmax
    assert r["ratio_bound"] > r["ratio_bound_attention"] > r["ratio_bound_model"] > r["ratio_steps"] / 1.5


def test_scoring_quick(bench):
    """pi0 scoring both ways on 3 quiz questions x 4 rows: the same log-probs, a finite ratio (not asserted: a timing)."""
    (row,) = _payload(bench("scoring").main(["--quick"]), "scoring")
    _finite(row, ["full_s", "shared_s", "ratio", "max_abs_diff", "mean_len"])
    assert row["rows"] == row["contexts"] * row["n"] == 12 and row["T"] <= 8
    assert row["max_abs_diff"] <= 1e-5  # tests/test_shared_context.py's tolerance


def test_digests_quick(bench):
    """The content-identity cost on the embedded default: first digest, the stat-reused one, the load beside it."""
    (row,) = _payload(bench("digests").main(["--quick", "--priors", "default"]), "digests")
    _finite(row, ["MB", "first_s", "again_s", "load_s", "hash_GB_per_s", "first_over_load", "again_over_load"])
    assert row["prior"] == "default" and row["files"] >= 2 and row["MB"] > 1


def test_dpo_finite_data_quick(bench):
    """The finite-data table's quick mode: every row's exact quantities; the population DPO row is p* itself."""
    rows = _payload(bench("dpo_finite_data").main(["--quick", "--ns", "4", "--steps", "3"]), "dpo_finite_data")
    assert [(r["method"], r["N"]) for r in rows] == [(m, n) for m in ("dpo", "cdpo", "ipo") for n in (4, "population")]
    for r in rows:
        _finite(r, ["kl_policy_target", "kl_target_policy", "unseen_mass_policy", "unseen_mass_prior", "distinct_seen"])
        assert 0 <= r["unseen_mass_policy"] <= 1 and r["distinct_seen"] <= 40
    trained = rows[0]
    _finite(trained, ["chosen_logp_change", "rejected_logp_change", "margin"])
    assert trained["margin"] > 0 and 2 <= trained["distinct_seen"] <= 8 and trained["unseen_mass_prior"] > 0
    assert rows[1]["kl_policy_target"] < 1e-9 and rows[5]["kl_policy_target"] > 0.01  # DPO's fixed point is p*, IPO's is not


def test_rm_accuracy_quick(bench):
    rows = _payload(bench("rm_accuracy").main(["--quick", "--settings", "testbed", "--threads", "1"]), "rm_accuracy")
    (row,) = rows
    _finite(row, ["acc_gold", "acc_gold_low", "acc_gold_high", "acc_labels", "acc_start", "seconds"])
    assert row["acc_gold_low"] <= row["acc_gold"] <= row["acc_gold_high"] and row["eval_pairs"] == 20
