"""The GPU check (README "Performance", 6): tiltlm on one NVIDIA GPU, within one 10-minute device call, offline.

    bash scripts/gpu_check.sh                       # on the GPU machine: installs the carried wheels, then this script
    python scripts/gpu_check.py --out DIR           # where tiltlm, pydantic and (for the TRL part) trl import
    python scripts/gpu_check.py --dry-run           # anywhere, no GPU: builds and validates every part's configs

The model is SmolLM2-135M's architecture with random weights (scripts/gpu_model.py; no weights download), written
once into --work; the parts (scripts/gpu_parts.py, gpu_dist.py) run each in its own subprocess, so a crash or a hang
past its time stays in that part: ``hf`` (kl-pg with HF generation in float32 and bf16 autocast: the log-prob error of
bf16 against float32 and samples/s), ``grpo-tiltlm`` and ``grpo-trl`` (tiltlm's GRPO and TRL's GRPOTrainer on the same
work: samples/s and peak GPU memory; "not run" where trl does not import), ``dist`` (torchrun --nproc_per_node 1 over
nccl: Replicate and Fsdp against one process). vLLM: "ready, not run here (its wheel cannot travel)" (gpu_vllm.py;
``--parts vllm`` runs it where vllm imports). A part starts only while --budget-s seconds are not spent.

Output: a table on stdout and in OUT/gpu_check.txt, the summary OUT/gpu_check.json (or --json), the parts' logs in
OUT/parts.log (three files: the device tool brings back at most 8). Exit status 0 when every part that ran passed, 1
otherwise, 2 when there is no CUDA device or a config is invalid (one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_model  # noqa: E402
import gpu_parts  # noqa: E402
import gpu_vllm  # noqa: E402

CONTEXTS = ("Write one sentence about the sea.", "Describe a rainy morning in one sentence.")
PARTS = ("hf", "grpo-tiltlm", "grpo-trl", "dist")
NO_TRL = "not run: trl is not importable here (scripts/gpu_wheels.sh carries it, with datasets, dill and multiprocess)"
NO_CUDA = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with an NVIDIA "
           "GPU and a CUDA build of torch, or pass --dry-run to only build and validate the configs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"), help="table, JSON and logs")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tiltlm-gpu-check", help="the model, the parts' files")
    p.add_argument("--json", type=Path, default=None, help="the summary JSON (default OUT/gpu_check.json)")
    p.add_argument("--dry-run", action="store_true", help="build and validate every part's configs on the CPU; run nothing")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=[*PARTS, "vllm"])
    p.add_argument("--model", default=None, choices=sorted(gpu_model.SIZES),
                   help="the random model written into --work (default smollm2-135m-config; the dry run: stand-in)")
    p.add_argument("--prior", default=None, help="a save_pretrained directory instead of --model's")
    p.add_argument("--reward", default="sentiment")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=8, help="kl-pg steps of the hf part, each precision")
    p.add_argument("--contexts", nargs="+", default=list(CONTEXTS), help="the prompts (user turns of the chat template)")
    p.add_argument("--n-per-context", type=int, default=16, help="samples per context per step")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of sampling speed (min is kept)")
    p.add_argument("--grpo-batch", type=int, default=16, help="G: completions of the one prompt per GRPO step")
    p.add_argument("--grpo-steps", type=int, default=6)
    p.add_argument("--dist-steps", type=int, default=3)
    p.add_argument("--sampler-n", type=int, default=64, help="samples per context of the vLLM sampler part")
    p.add_argument("--device", default="cuda", help="where the parts put the models")
    p.add_argument("--part-timeout", type=int, default=240, help="seconds one part may run")
    p.add_argument("--budget-s", type=int, default=480, help="no part starts once this many seconds are spent")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # tests: run without CUDA (with --device cpu)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run this one part here
    p.add_argument("--part-json", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def forwarded(args) -> list[str]:
    """The options a part's process gets (the prior resolved)."""
    return ["--prior", str(args.prior), "--contexts", *args.contexts, "--reward", args.reward, "--beta", repr(args.beta),
            "--steps", str(args.steps), "--n-per-context", str(args.n_per_context), "--max-new-tokens", str(args.max_new_tokens),
            "--seed", str(args.seed), "--repeats", str(args.repeats), "--grpo-batch", str(args.grpo_batch), "--grpo-steps",
            str(args.grpo_steps), "--dist-steps", str(args.dist_steps), "--sampler-n", str(args.sampler_n), "--device", args.device,
            "--work", str(args.work)] + (["--cpu-smoke"] if args.cpu_smoke else [])


def part_command(args, part: str, json_path: Path) -> list[str]:
    """This script with --part; the dist part under torchrun with one process."""
    tail = [str(Path(__file__).resolve()), "--part", part, "--part-json", str(json_path), *forwarded(args)]
    if part == "dist":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()), *tail]
    return [sys.executable, *tail]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers() -> dict:
    from gpu_dist import part_dist

    return {"hf": gpu_parts.part_hf, "grpo-tiltlm": gpu_parts.part_grpo_tiltlm, "grpo-trl": gpu_parts.part_grpo_trl,
            "dist": part_dist, "train-vllm": gpu_vllm.part_train_vllm, "sampler:auto": lambda a: gpu_vllm.part_sampler(a, "auto")}


def run_part(args) -> int:
    """Worker: run args.part here and write its JSON (rank 0)."""
    result = workers()[args.part](args)
    if int(os.environ.get("RANK", "0")) == 0:
        args.part_json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def plan(args) -> dict[str, str | None]:
    """part -> None (to run) or why it is not run."""
    out: dict[str, str | None] = {p: None for p in args.parts if p != "vllm"}
    if "grpo-trl" in out and not available("trl"):
        out["grpo-trl"] = NO_TRL
    for p in gpu_vllm.PARTS:
        out[p] = None if "vllm" in args.parts and available("vllm") else gpu_vllm.NOT_RUN
    return out


def resolve_prior(args, default_model: str) -> dict:
    """Write the random model unless --prior names one; facts about the model."""
    if args.prior is None:
        name = args.model or default_model
        args.prior = str(gpu_model.write_model(args.work / "model", name, seed=args.seed))
        return {"model": name, "config": gpu_model.SIZES[name], "parameters": gpu_model.parameter_count(name), "dir": args.prior}
    return {"model": "prior", "dir": str(args.prior)}


def environment() -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("transformers", "trl", "vllm", "pydantic", "tiltlm"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    import tiltlm

    env["tiltlm_from"] = str(Path(tiltlm.__file__).parent)
    try:
        env["tiltlm_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["tiltlm_commit"] = None
    return env


def attempt(args, part: str, timeout: float, extra_env: dict) -> dict:
    files = args.work / "parts"
    files.mkdir(parents=True, exist_ok=True)
    stem = part.replace(":", "-") + (".retry" if extra_env else "")
    json_path, log = files / f"{stem}.json", files / f"{stem}.log"
    json_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as fh:
            rc = subprocess.run(part_command(args, part, json_path), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **extra_env}).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace") if log.is_file() else ""
    if rc == 0 and json_path.is_file():
        return {"ok": True, "seconds": seconds, "env": extra_env, "log": text, **json.loads(json_path.read_text())}
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return {"ok": False, "seconds": seconds, "env": extra_env, "returncode": rc, "log": text,
            "error": (errors or lines or ["(no output)"])[-1][:500],
            "serialization": any(w in text for w in ("INSECURE_SERIALIZATION", "pickle", "serializ"))}


def run_all(args, todo: dict) -> dict:
    start, parts = time.perf_counter(), {}
    for part, reason in todo.items():
        left = args.budget_s - (time.perf_counter() - start)
        if reason is None and left < 10:
            reason = f"not run: the {args.budget_s} s budget was spent"
        if reason is not None:
            parts[part] = {"ok": None, "status": reason}
            continue
        print(f"gpu_check: running {part} ...", file=sys.stderr, flush=True)
        result = attempt(args, part, min(args.part_timeout, left), {})
        if not result["ok"] and part in gpu_vllm.PARTS and result.get("serialization"):
            result = {**attempt(args, part, min(args.part_timeout, left), gpu_vllm.RETRY_ENV), "first_attempt": result}
        parts[part] = result
    return parts


def orchestrate(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "model": resolve_prior(args, "smollm2-135m-config")}
    report["configs"] = gpu_parts.configs(args)
    report["parts"] = run_all(args, plan(args))
    logs = "".join(f"===== {part}\n{r.pop('log', '')}\n" for part, r in report["parts"].items())
    for r in report["parts"].values():
        r.get("first_attempt", {}).pop("log", None)
    report["all_ok"] = all(r["ok"] is not False for r in report["parts"].values())
    path = args.json or args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    (args.out / "parts.log").write_text(logs)
    from gpu_table import table

    text = table(report) + f"\ngpu_check: {'every part run passed' if report['all_ok'] else 'some parts FAILED'}; details in {path}"
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    return 0 if report["all_ok"] else 1


def dry_run(args) -> int:
    """Every part's configs built and validated on the CPU with stand-ins: the stand-in model, tiltlm's (policy, target)
    of each config, TRL's trainer where trl imports, SmolLM2's config on the meta device."""
    from tiltlm.errors import TiltlmError
    from tiltlm.train.build import build

    args.device = "cpu"
    model = resolve_prior(args, "stand-in")
    try:
        parsed = gpu_parts.validated(args)
    except TiltlmError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    built = {name: type(build(parsed[name])[0]).__name__ for name in ("hf", "grpo-tiltlm", "dist-fsdp")}
    todo = plan(args)
    if todo.get("grpo-trl", "") is None:
        with tempfile.TemporaryDirectory() as tmp:
            built["grpo-trl"] = type(gpu_parts.trl_trainer(args, 1, tmp, [])).__name__
    out = {"model": model, "smollm2_parameters": gpu_model.parameter_count("smollm2-135m-config"), "built": built,
           "configs": {k: json.loads(v.model_dump_json()) for k, v in parsed.items()},
           "parts": {p: why or shlex.join(part_command(args, p, args.work / "parts" / f"{p}.json")) for p, why in todo.items()}}
    print(json.dumps(out, indent=1))
    print(f"gpu_check: dry run: {len(parsed)} configs valid, built {', '.join(built)}; "
          f"{sum(w is None for w in todo.values())} parts planned", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.part is not None:
        return run_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
