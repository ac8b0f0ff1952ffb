"""The GPU check stays runnable on a lent GPU machine that can fetch nothing, tested here without a GPU: the shell scripts
parse, gpu_check.sh installs only with --no-index (carried wheels, then tiltlm from the tree), gpu_wheels.sh refuses a
folder over its size limit, the pins agree, --dry-run builds and validates every part's configs with stand-ins (also
through gpu_check.sh, its installs included), and each part's code runs on the CPU on the stand-in model (gloo for
nccl, a stand-in for vLLM), so the one run on a GPU machine is not spent on a typo."""

import importlib.metadata as md
import importlib.util
import json
import os
import py_compile
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SCRIPT, SHELL, WHEELS_SH = SCRIPTS / "gpu_check.py", SCRIPTS / "gpu_check.sh", SCRIPTS / "gpu_wheels.sh"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
HAS_TRL = importlib.util.find_spec("trl") is not None


def _load(name: str):
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gc():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def gp():
    return _load("gpu_parts")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return _load("gpu_model").write_model(tmp_path_factory.mktemp("model"), "stand-in")


@pytest.fixture(scope="module")
def tiny(stand_in, tmp_path_factory):
    """Options that run the parts on the stand-in model in seconds: the empty context, 4 tokens, CPU."""
    return ["--prior", str(stand_in), "--contexts", "", "--reward", "count:a", "--beta", "1", "--steps", "2",
            "--n-per-context", "4", "--max-new-tokens", "4", "--dist-steps", "2", "--grpo-batch", "4", "--grpo-steps", "2",
            "--sampler-n", "4", "--repeats", "1", "--device", "cpu", "--work", str(tmp_path_factory.mktemp("work"))]


def test_shell_scripts_parse_and_python_parts_compile():
    for sh in (SHELL, WHEELS_SH):
        subprocess.run(["bash", "-n", str(sh)], check=True)
    for py in SCRIPTS.glob("gpu_*.py"):
        py_compile.compile(str(py), doraise=True)


def network_uses(script: str) -> list[str]:
    """The lines of a shell script (comments dropped) that could reach an index or the network."""
    code = [line.split("#", 1)[0] for line in script.splitlines()]
    bad = [ln for ln in code if re.search(r"\b(curl|wget|venv|pip download|https?://)", ln)]
    installs = [ln for ln in code if re.search(r"pip\s+install", ln)]
    return bad + [ln for ln in installs if "--no-index" not in ln or "--no-deps" not in ln]


def test_gpu_check_sh_installs_without_network():
    assert network_uses(SHELL.read_text()) == []
    assert "--target" in SHELL.read_text() and "venv" not in SHELL.read_text().replace("no venv", "")
    # the checker itself finds what it is for
    assert network_uses('python -m pip install vllm==0.33\npython3 -m venv .v\n# pip install x (a comment)\n') != []
    assert len(network_uses("pip install --no-deps x\npip install --no-index --no-deps y\n")) == 1


def _wheels_check(folder: Path, limit: str):
    return subprocess.run(["bash", str(WHEELS_SH), "--check"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WHEELS_DIR": str(folder), "LIMIT_MIB": limit})


def test_wheels_script_refuses_over_its_limit(tmp_path):
    for name in ("a-1-py3-none-any.whl", "b-1-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"\0" * (600 * 1024))  # 1.17 MiB together
    over = _wheels_check(tmp_path, "1")
    assert over.returncode == 2 and over.stdout == ""
    assert over.stderr.count("\n") == 1 and "1.17 MiB, over the 1 MiB" in over.stderr and "NO_TRL=1" in over.stderr
    under = _wheels_check(tmp_path, "2")
    assert under.returncode == 0 and "2 wheels, 1.17 MiB" in under.stdout


def pins() -> dict[str, str]:
    lines = [ln.split("#", 1)[0].strip() for ln in (SCRIPTS / "gpu_wheels.txt").read_text().splitlines()]
    pairs = [ln.split("==") for ln in lines if ln]
    names = [re.sub(r"[-_.]+", "-", n).lower() for n, _ in pairs]
    assert len(names) == len(set(names)), "one version of each: two stop the whole install"
    return dict(zip(names, (v for _, v in pairs)))


def test_pins_cover_what_the_gpu_image_lacks():
    pinned = pins()
    # tiltlm's dependencies that the image lacks (the device tool's KINDS.md), and trl's and datasets' likewise
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "vadersentiment", "trl", "datasets", "dill",
            "multiprocess"} <= set(pinned)
    if md.version("pydantic") == pinned["pydantic"]:  # pydantic pins its core exactly: the pinned pair must agree
        needs = [r for r in md.requires("pydantic") if "extra ==" not in r]
        assert f"pydantic-core=={pinned['pydantic-core']}" in [r.replace(" ", "").replace("_", "-") for r in needs]


def test_smollm2_config_and_the_stand_in(stand_in):
    gm = _load("gpu_model")
    assert gm.parameter_count("smollm2-135m-config") == 134_515_008  # SmolLM2-135M's count (tied embeddings)
    text = (ROOT / "benchmarks" / "sampling.py").read_text()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert f"{key}={gm.SMOLLM2[key]}" in text  # the same sizes as benchmarks/sampling.py's SMOLLM_CONFIG
    tok = gm.tokenizer_of(gm.SMOLLM2["vocab_size"])
    assert len(tok) == 49152
    ids = tok("sea, rain!", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10 and tok.decode(ids) == "sea, rain!"
    facts = json.loads((stand_in / gm.MARKER).read_text())
    assert facts["parameters"] == gm.parameter_count("stand-in") and facts["config"]["vocab_size"] == 160


def test_dry_run_builds_and_validates_every_part(gc, tmp_path, capsys):
    assert gc.main(["--dry-run", "--work", str(tmp_path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["model"] == "stand-in" and plan["smollm2_parameters"] == 134_515_008
    assert set(plan["built"]) == {"hf", "grpo-tiltlm", "dist-fsdp"} | ({"grpo-trl"} if HAS_TRL else set())
    cfg = plan["configs"]
    assert set(cfg) == {"hf", "grpo-tiltlm", "train-vllm", "dist-replicate", "dist-fsdp"}
    assert cfg["hf"]["algorithm"]["name"] == "kl-pg" and cfg["hf"]["target"] == {**cfg["hf"]["target"], "reward": "sentiment", "beta": 0.1}
    assert cfg["grpo-tiltlm"]["algorithm"]["name"] == "grpo" and cfg["grpo-tiltlm"]["sampling"]["n_per_context"] == 16
    assert cfg["dist-fsdp"]["distributed"]["strategy"] == "fsdp" and cfg["train-vllm"]["rollout"]["generation"] == "vllm"
    parts = plan["parts"]
    assert list(parts) == ["hf", "grpo-tiltlm", "grpo-trl", "dist", "train-vllm", "sampler:auto"]
    assert "torch.distributed.run --nproc_per_node 1" in parts["dist"] and "--part dist" in parts["dist"]
    assert parts["train-vllm"] == parts["sampler:auto"] == "ready, not run here (its wheel cannot travel)"
    assert ("--part grpo-trl" in parts["grpo-trl"]) if HAS_TRL else parts["grpo-trl"].startswith("not run: trl")


def probe_wheel(folder: Path) -> None:
    """A minimal pure wheel (gpu_probe 1.0: one module), as gpu_wheels.sh leaves them."""
    import zipfile

    info = "gpu_probe-1.0.dist-info"
    files = {"gpu_probe.py": "VALUE = 42\n", f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-probe\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / "gpu_probe-1.0-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_dry_run_through_the_shell_script_installs_offline(tmp_path):
    """gpu_check.sh as on the GPU machine: the carried wheels (a probe here: this python has pydantic) and tiltlm built
    from the tree installed into SITE with --no-index, imported from there, then the dry run."""
    site, wheels = tmp_path / "site", tmp_path / "wheels"
    wheels.mkdir()
    probe_wheel(wheels)
    out = subprocess.run(["bash", str(SHELL), "--dry-run", "--parts", "dist", "--work", str(tmp_path / "work")], capture_output=True,
                         text=True, timeout=300, env={**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
                                                      "SITE": str(site), "WHEELS": str(wheels)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(json.loads(out.stdout)["parts"]) == ["dist", "train-vllm", "sampler:auto"]
    assert f"installed 1 carried wheels into {site}" in out.stderr and f"tiltlm from {site}" in out.stderr, out.stderr
    assert (site / "gpu_probe.py").read_text() == "VALUE = 42\n"
    assert (site / "tiltlm" / "assets" / "default" / "config.json").is_file()


def test_bad_setting_is_one_line(gc, tmp_path, capsys):
    assert gc.main(["--dry-run", "--n-per-context", "1", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "n_per_context" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_cuda_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no CUDA device" in out.stderr and "--dry-run" in out.stderr


def test_logprob_error_and_draws_agreement(gp):
    ref = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]])
    lp = torch.tensor([[-1.1, -2.0, 5.0], [-0.5, -0.2, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    r = gp.logprob_error(ref, lp, mask)
    assert r["tokens_compared"] == 5 and r["token_max_abs_diff"] == pytest.approx(0.3) and r["token_mean_abs_diff"] == pytest.approx(0.08)
    assert r["seq_max_abs_diff"] == pytest.approx(0.3)  # row 0's off-mask 5.0 is not counted
    a = SimpleNamespace(ids=torch.tensor([[3, 1, 0], [2, 2, 0]]), mask=mask)
    b = SimpleNamespace(ids=torch.tensor([[3, 1], [2, 4]]), mask=torch.tensor([[True, True], [True, True]]))
    d = gp.draws_agreement(a, b)  # row 0 equal (its third position is padding in both), row 1 not
    assert d["same_rows"] == 0.5 and d["same_tokens"] == pytest.approx(3 / 4)


def test_hf_part_on_cpu(gp, gc, tiny):
    """fp32 and bf16 autocast (CPU autocast here, CUDA's there): the comparison's numbers and both precisions' steps."""
    r = gp.part_hf(gc.parse_args(tiny))
    assert r["rows"] == 4 and r["recorded_vs_recomputed_float32"]["token_max_abs_diff"] < 1e-4
    err = r["bf16_vs_float32_logprobs"]
    assert err["tokens_compared"] == r["tokens"] and 0 < err["token_mean_abs_diff"] <= err["token_max_abs_diff"] < 1.0
    assert 0 <= r["bf16_vs_float32_draws"]["same_rows"] <= 1
    for name in ("float32", "bf16"):
        t = r["train"][name]
        assert t["steps"] == 2 and t["all_finite"] and t["samples_per_s"] > 0 and t["peak_mb"] is None and t["mean_length"] <= 4
        assert r["sampling"][name]["samples_per_s"] > 0


def test_grpo_parts_on_cpu(gp, gc, tiny):
    args = gc.parse_args(tiny)
    r = gp.part_grpo_tiltlm(args)
    assert r["steps"] == 2 and r["all_finite"] and r["algorithm"]["name"] == "grpo" and r["algorithm"]["scale_std"]
    if not HAS_TRL:
        pytest.skip("trl is not installed here (the GPU check carries it as a wheel)")
    t = gp.part_grpo_trl(args)
    assert t["steps"] == 2 and t["samples_per_s"] > 0 and t["loss_type"] == "grpo" and t["num_generations"] == 4
    assert t["beta"] == 1.0 and not t["gradient_checkpointing"]


def test_dist_part_under_torchrun_on_gloo(gc, tiny, tmp_path):
    """The dist part's code under torchrun with one process, on gloo and the CPU (nccl and cuda on the GPU machine)."""
    runner = tmp_path / "run_dist.py"
    runner.write_text(f"import json, sys\nsys.path.insert(0, {str(SCRIPTS)!r})\nimport gpu_check, gpu_dist\n"
                      f"print('RESULT', json.dumps(gpu_dist.part_dist(gpu_check.parse_args({tiny!r}))))\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                          str(gc.free_port()), str(runner)], capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.split("RESULT", 1)[1])
    assert r["all_reduce_ok"] and r["backend"] == "gloo" and r["world_size"] == 1
    runs = r["runs"]
    assert [runs[k]["strategy"] for k in ("single", "replicate", "fsdp")] == ["Single", "Replicate", "Fsdp"]
    for k in ("replicate", "fsdp"):
        assert runs[k]["same_tensors"]
        # Replicate runs the one process's code: the same weights (0.0 seen). Fsdp's ranks score pi0 on whole sequences in
        # lockstep where one process shares the contexts (log-probs 1.4e-6 apart seen), and Adam turns that into
        # differences of up to lr·(a few) in weights whose gradient is near 0 (1.4e-6 on one machine, 1.18e-5 on
        # another, of a 3.0e-4 largest change): bounded against how far training moved the weights, 10% of it — a
        # mis-sharded or skipped update differs by the whole change or more
        assert runs[k]["max_abs_weight_diff_vs_single"] < (1e-5 if k == "replicate" else 0.1 * runs[k]["max_abs_weight_change_single"])
        assert runs[k]["losses"] == pytest.approx(runs["single"]["losses"], abs=1e-5)


def test_table_of_every_kind_of_part(gc):
    gt = _load("gpu_table")
    train = {"steps": 8, "samples_per_s": 90.0, "step_s_median": 0.35, "first_step_s": 2.0, "peak_mb": 2100.0, "all_finite": True}
    hf = {"ok": True, "rows": 32, "tokens": 1536, "recorded_vs_recomputed_float32": {"token_max_abs_diff": 1e-6},
          "bf16_vs_float32_logprobs": {"tokens_compared": 1536, "token_max_abs_diff": 0.4, "token_mean_abs_diff": 0.02, "seq_max_abs_diff": 1.5},
          "bf16_vs_float32_draws": {"same_rows": 0.5, "same_tokens": 0.9},
          "sampling": {"float32": {"samples_per_s": 300.0}, "bf16": {"samples_per_s": 400.0}}, "train": {"float32": train, "bf16": train}}
    grpo = {"ok": True, "steps": 6, "samples_per_s": 50.0, "step_s_median": 0.3, "peak_mb": 1800.0, "mean_length": 48.0}
    dist = {"ok": True, "backend": "cpu:gloo,cuda:nccl", "nccl_version": "2.27.3", "all_reduce_ok": True,
            "runs": {"single": {"losses": [1, 2, 3]}, "replicate": {"max_abs_weight_diff_vs_single": 0.0},
                     "fsdp": {"max_abs_weight_diff_vs_single": 1e-7}}}
    report = {"environment": gc.environment(), "model": {"model": "smollm2-135m-config", "parameters": 134515008},
              "parts": {"hf": hf, "grpo-tiltlm": grpo, "grpo-trl": {**grpo, "trl": "1.13.0", "loss_type": "grpo"}, "dist": dist,
                        "train-vllm": {"ok": None, "status": "ready, not run here (its wheel cannot travel)"},
                        "sampler:auto": {"ok": False, "returncode": 1, "seconds": 3.0, "error": "RuntimeError: boom"}}}
    lines = gt.table(report).splitlines()
    assert len(lines) == 10 and "1.35e+08 parameters" in lines[1] and "per token max 0.4" in lines[2] and "50% rows" in lines[2]
    assert "hf bf16" in lines[4] and "peak 2100 MB" in lines[4] and "trl 1.13.0" in lines[6] and "nccl 2.27.3" in lines[7]
    assert "not run here" in lines[8] and "FAILED (1)" in lines[9]


def test_orchestration_on_cpu(gc, tiny, tmp_path, capsys):
    """The whole run as the GPU machine does it (a subprocess per part, torchrun for dist, JSON, table, logs), on the CPU."""
    out = tmp_path / "out"
    rc = gc.main(["--cpu-smoke", "--parts", "grpo-tiltlm", "grpo-trl", "dist", "--out", str(out), *tiny])
    report = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0 and report["all_ok"], {k: v.get("error") for k, v in report["parts"].items()}
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.txt", "parts.log"]  # <= 8 files come back
    parts = report["parts"]
    assert parts["dist"]["backend"] == "gloo" and parts["grpo-tiltlm"]["ok"] and (parts["grpo-trl"]["ok"] is None) == (not HAS_TRL)
    assert parts["train-vllm"]["status"] == "ready, not run here (its wheel cannot travel)"
    text = capsys.readouterr().out
    assert "grpo tiltlm" in text and "every part run passed" in text and text.strip() == (out / "gpu_check.txt").read_text().strip()
