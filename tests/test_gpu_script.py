"""scripts/gpu_check.sh + scripts/gpu_check.py stay runnable without a GPU: the shell script parses, the Python part
compiles, --dry-run builds and validates every config through tiltlm's parse_config, no CUDA is one line and exit 2,
and the parts' own code runs on the CPU (a train part and the dist part on a testbed, the sampler part against a
stand-in for vLLM), so the one run on a GPU machine is not spent on a typo."""

import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT, SHELL = ROOT / "scripts" / "gpu_check.py", ROOT / "scripts" / "gpu_check.sh"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(testbed_dir):
    """Options that run the parts on the testbed in a second: BOS as the context, 4 tokens, CPU."""
    return ["--prior", str(testbed_dir), "--contexts", "", "--reward", "count:a", "--beta", "1", "--steps", "2",
            "--n-per-context", "4", "--max-new-tokens", "4", "--dist-steps", "2", "--sampler-n", "4", "--repeats", "1",
            "--device", "cpu"]


def test_shell_script_parses_and_python_part_compiles():
    subprocess.run(["bash", "-n", str(SHELL)], check=True)
    py_compile.compile(str(SCRIPT), doraise=True)


def test_dry_run_validates_every_config(gc, tmp_path, capsys):
    assert gc.main(["--dry-run", "--out", str(tmp_path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg = plan["configs"]
    assert set(cfg) == {"train-hf", "train-vllm", "sampler", "dist-replicate", "dist-fsdp"}
    assert cfg["train-vllm"]["rollout"]["generation"] == "vllm" and cfg["train-hf"]["rollout"]["generation"] == "policy"
    assert cfg["dist-fsdp"]["distributed"]["strategy"] == "fsdp"
    for c in cfg.values():
        assert c["prior"] == "smollm2-135m" and c["algorithm"]["name"] == "kl-pg" and c["target"]["beta"] == 0.1
    # the optimiser is left to the library's defaults
    from tiltlm.train.config import OptimConfig

    assert cfg["train-hf"]["optim"] == {**json.loads(OptimConfig().model_dump_json()), "steps": 10}
    parts = plan["parts"]
    assert list(parts) == ["train-hf", "train-vllm", "sampler:auto", "sampler:float32", "dist"]
    assert "torch.distributed.run --nproc_per_node 1" in parts["dist"] and "--part dist" in parts["dist"]


def test_dry_run_through_the_shell_script(tmp_path):
    out = subprocess.run(["bash", str(SHELL), "--dry-run", "--parts", "dist"], capture_output=True, text=True, timeout=120,
                         env={**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert list(json.loads(out.stdout)["parts"]) == ["dist"]


def test_bad_setting_is_one_line(gc, capsys):
    assert gc.main(["--dry-run", "--n-per-context", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "n_per_context" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_cuda_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no CUDA device" in out.stderr and "--dry-run" in out.stderr


def test_logprob_agreement(gc):
    ids = torch.tensor([[3, 1, 0], [2, 2, 0]])
    samples = SimpleNamespace(ids=ids, mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
                              token_logp=torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]]))

    def out(tokens, lps):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=[{t: SimpleNamespace(logprob=v)} for t, v in zip(tokens, lps)])])

    r = gc.logprob_agreement([out([3, 1], [-1.1, -2.0]), out([2, 2, 0], [-0.5, -0.7, -1.0])], samples)
    assert r["rows_compared"] == 2 and r["tokens_compared"] == 5 and r["rows_with_other_tokens"] == 0
    assert r["token_max_abs_diff"] == pytest.approx(0.2) and r["token_mean_abs_diff"] == pytest.approx(0.3 / 5)
    assert r["seq_max_abs_diff"] == pytest.approx(0.2)
    r = gc.logprob_agreement([out([1, 1], [-1.0, -2.0])], samples)  # other tokens than the samples' row: not compared
    assert r["rows_with_other_tokens"] == 1 and r["tokens_compared"] == 0


def test_train_part_on_cpu(gc, tiny):
    r = gc.part_train(gc.parse_args(tiny), "train-hf")
    assert r["steps"] == 2 and r["device"] == "cpu" and r["all_finite"] and r["train_samples_per_s"] > 0
    assert r["generation"] == "policy" and r["reward_last"] is not None and r["kl_prior_last"] is not None


def test_dist_part_under_torchrun_on_gloo(gc, tiny, tmp_path):
    """The dist part's code under torchrun with one process, on gloo and the CPU (nccl and cuda on the GPU machine)."""
    runner = tmp_path / "run_dist.py"
    runner.write_text(f"import importlib.util, json, sys\nspec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
                      "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                      f"print('RESULT', json.dumps(m.part_dist(m.parse_args({tiny!r}))))\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                          str(gc._free_port()), str(runner)], capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.split("RESULT", 1)[1])
    assert r["all_reduce_ok"] and r["backend"] == "gloo" and r["world_size"] == 1
    runs = r["runs"]
    assert [runs[k]["strategy"] for k in ("single", "replicate", "fsdp")] == ["Single", "Replicate", "Fsdp"]
    for k in ("replicate", "fsdp"):
        assert runs[k]["same_tensors"] and runs[k]["max_abs_weight_diff_vs_single"] < 1e-5
        assert runs[k]["losses"] == pytest.approx(runs["single"]["losses"], abs=1e-6)


class _FakeLLM:
    """Stands in for vllm.LLM: draws random non-EOS tokens per request seed, reports log-prob -1 for each."""

    def __init__(self, model, tokenizer, gpu_memory_utilization, dtype, seed, **options):
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=dtype))
        self.synced = 0

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for p in params:
            assert p.logprobs == 0  # the check asks vLLM for the drawn token's log-prob
            g = torch.Generator().manual_seed(p.seed)
            eos = p.stop_token_ids[0]
            free = [t for t in range(5) if t != eos]
            ids = [free[int(i)] for i in torch.randint(0, len(free), (p.max_tokens,), generator=g)]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="length",
                                                                 logprobs=[{t: SimpleNamespace(logprob=-1.0)} for t in ids])]))
        return outs

    def collective_rpc(self, fn, args=()):
        self.synced += 1


def test_sampler_part_against_a_stand_in_for_vllm(gc, tiny, monkeypatch):
    fake = SimpleNamespace(LLM=_FakeLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # VLLMGenerator's guard; nothing here touches CUDA
    r = gc.part_sampler(gc.parse_args(tiny), "float32")
    lp = r["logprobs"]
    assert r["vllm_engine_dtype"] == "float32" and r["rows"] == 4
    assert lp["rows_compared"] == 4 and lp["tokens_compared"] == 16 and lp["rows_with_other_tokens"] == 0
    assert 0 <= lp["token_mean_abs_diff"] <= lp["token_max_abs_diff"]
    for key in ("hf_samples_per_s", "vllm_samples_per_s", "vllm_generate_only_samples_per_s", "sync_s"):
        assert r[key] > 0


def test_summary_of_every_kind_of_part(gc, tiny):
    args = gc.parse_args(tiny)
    train = {"ok": True, "env": {}, **gc.part_train(args, "train-hf")}
    sampler = {"ok": True, "env": {}, "vllm_dtype_requested": "auto", "vllm_engine_dtype": "torch.bfloat16", "policy_dtype": "torch.float32",
               "logprobs": {"tokens_compared": 10, "token_max_abs_diff": 0.1, "token_mean_abs_diff": 0.01, "seq_max_abs_diff": 0.2,
                            "rows_with_other_tokens": 0}, "hf_samples_per_s": 100.0, "vllm_samples_per_s": 900.0,
               "vllm_generate_only_samples_per_s": 2000.0, "sync_s": 0.05}
    dist = {"ok": True, "env": {}, "backend": "cpu:gloo,cuda:nccl", "nccl_version": "2.27.3", "all_reduce_ok": True,
            "runs": {"replicate": {"max_abs_weight_diff_vs_single": 0.0}, "fsdp": {"max_abs_weight_diff_vs_single": 1e-7}}}
    failed = {"ok": False, "env": gc.RETRY_ENV, "returncode": 1, "error": "RuntimeError: boom",
              "first_attempt": {"ok": False, "error": "TypeError: cannot pickle"}}
    retried = {**sampler, "env": gc.RETRY_ENV, "first_attempt": {"ok": False, "error": "TypeError: cannot pickle"}}
    text = gc.summary({"environment": gc.environment(), "parts": {"train-hf": train, "train-vllm": failed, "sampler:auto": sampler,
                                                                  "sampler:float32": retried, "dist": dist}})
    lines = text.splitlines()
    assert len(lines) == 6 and "FAILED" in lines[2] and "passed only with" in lines[4] and "nccl 2.27.3" in lines[5]


def test_orchestration_on_cpu(gc, tiny, tmp_path, capsys):
    """The whole run as the GPU machine does it (subprocess per part, torchrun for dist, JSON, summary), on the CPU."""
    out = tmp_path / "out"
    rc = gc.main(["--cpu-smoke", "--parts", "train-hf", "dist", "--out", str(out), *tiny])
    report = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0 and report["all_ok"], {k: v.get("error") for k, v in report["parts"].items()}
    assert set(report["parts"]) == {"train-hf", "dist"} and report["parts"]["dist"]["backend"] == "gloo"
    text = capsys.readouterr().out
    assert "train-hf" in text and "all parts passed" in text
