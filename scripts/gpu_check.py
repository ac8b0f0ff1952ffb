"""The GPU check (README "Performance", 6): vLLM generation and the nccl distributed path on one NVIDIA GPU.

    bash scripts/gpu_check.sh                      # venv + CUDA torch + vLLM + tiltlm, then this script
    python scripts/gpu_check.py --out gpu_check_out    # in an environment that already has them
    python scripts/gpu_check.py --dry-run          # anywhere: build and validate the configs, print the plan

Parts, each in its own subprocess (a crash, a hang past --part-timeout or a vLLM engine that keeps its GPU
memory stays in that part; the others still run), all on ``prior: smollm2-135m`` (SmolLM2-135M-Instruct,
chat template, kl-pg toward pi0·exp(sentiment/0.1), the optimiser's defaults):

  train-hf        kl-pg, ``rollout.generation: policy``: the policy samples (HF generate loop, KV cache)
  train-vllm      the same config with ``rollout.generation: vllm`` (tiltlm.train.build.build_generator):
                  per-step seconds, samples/s, reward and KL against train-hf, the engine's start time,
                  ``outside_nucleus``
  sampler:DTYPE   one VLLMGenerator (dtype auto = what training uses; float32 also by default): the log-probs
                  vLLM reports for the tokens it drew vs the trainer's recomputed ``Samples.token_logp``
                  (max and mean |diff| per token and per sequence), the drawn tokens' identity, then samples/s
                  of HF sampling vs vLLM sampling (with and without the log-prob recomputation), and the
                  seconds of one weight sync
  dist            under ``torchrun --nproc_per_node 1``: a process group with the nccl backend for CUDA
                  tensors (cpu:gloo,cuda:nccl, as tiltlm.distributed.dist.init_from_env makes it for W > 1),
                  an nccl all_reduce, then --dist-steps kl-pg steps with the Replicate and the Fsdp strategy
                  (FSDP2 gathers and reduce-scatters over nccl even with one rank) against the same steps in
                  one process on the GPU: max |weight difference| and the losses

Placement: a one-process run moves CPU models to cuda:LOCAL_RANK when CUDA is available (the one-process
strategy's prepare); the train and sampler parts also place the policy and the prior themselves (``--device``),
as the vLLM test does, so they check the same thing either way. With W = 1,
``make_strategy`` gives the one-process strategy, so the dist part builds Replicate / Fsdp itself.

A vLLM part that fails with a serialisation error is run once more with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (vLLM's
V1 engine may refuse to pickle the function VLLMGenerator.sync sends to its workers without it); both outcomes are
reported.
Output: a summary on stdout, OUT/gpu_check.json (or --json), each part's log in OUT/PART.log. Exit status 0
when every part passed, 1 otherwise, 2 when there is no CUDA device (one line on stderr).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

CONTEXTS = ("Write one sentence about the sea.", "Describe a rainy morning in one sentence.")
VLLM_PARTS = ("train-vllm", "sampler")
RETRY_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
NO_CUDA = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with an NVIDIA "
           "GPU and a CUDA build of torch (scripts/gpu_check.sh installs one), or pass --dry-run to only build and validate the configs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder of the parts' JSON and logs")
    p.add_argument("--json", type=Path, default=None, help="the summary JSON (default OUT/gpu_check.json)")
    p.add_argument("--dry-run", action="store_true", help="build and validate every config, print the plan; run nothing")
    p.add_argument("--parts", nargs="+", default=["train-hf", "train-vllm", "sampler", "dist"],
                   choices=["train-hf", "train-vllm", "sampler", "dist"])
    p.add_argument("--prior", default="smollm2-135m", help="prior: a named prior or a save_pretrained directory")
    p.add_argument("--reward", default="sentiment")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10, help="kl-pg steps of each train part")
    p.add_argument("--contexts", nargs="+", default=list(CONTEXTS), help="the prompts (user turns of SmolLM2's chat template)")
    p.add_argument("--n-per-context", type=int, default=16, help="samples per context per step")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler-n", type=int, default=128, help="samples per context in the sampler part")
    p.add_argument("--sampler-dtypes", nargs="+", default=["auto", "float32"], help="vLLM dtype of each sampler part")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the samples/s comparison (min is kept)")
    p.add_argument("--dist-steps", type=int, default=3)
    p.add_argument("--device", default="cuda", help="where the train and sampler parts put the policy and the prior")
    p.add_argument("--part-timeout", type=int, default=900, help="seconds one part may run")
    p.add_argument("--no-retry", action="store_true", help=f"do not rerun a failed vLLM part with {RETRY_ENV}")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # tests: run without CUDA (with --device cpu)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run this one part here
    p.add_argument("--part-json", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- configs ---------------------------------------------------------------------------------------------------

def train_config(args, generation: str = "policy", strategy: str = "replicate", steps: int | None = None) -> dict:
    """kl-pg on the prior toward pi0·exp(reward/beta): only what the check needs is set (lr, schedule and
    clipping are the library's defaults)."""
    return {"prior": args.prior, "target": {"reward": args.reward, "beta": args.beta}, "algorithm": {"name": "kl-pg"},
            "sampling": {"contexts": list(args.contexts), "n_per_context": args.n_per_context, "max_new_tokens": args.max_new_tokens},
            "optim": {"steps": steps or args.steps}, "rollout": {"generation": generation},
            "distributed": {"strategy": strategy}, "seed": args.seed}


def configs(args) -> dict[str, dict]:
    return {"train-hf": train_config(args, "policy"), "train-vllm": train_config(args, "vllm"),
            "sampler": train_config(args, "policy"),
            "dist-replicate": train_config(args, "policy", "replicate", args.dist_steps),
            "dist-fsdp": train_config(args, "policy", "fsdp", args.dist_steps)}


def validated(args) -> dict:
    """Every config through tiltlm's own parse_config (a TiltlmError names the bad key)."""
    from tiltlm.train.config import parse_config

    return {name: parse_config(data) for name, data in configs(args).items()}


def part_names(args) -> list[str]:
    out = []
    for part in args.parts:
        out += [f"sampler:{d}" for d in args.sampler_dtypes] if part == "sampler" else [part]
    return out


def common_argv(args) -> list[str]:
    return ["--prior", args.prior, "--contexts", *args.contexts, "--reward", args.reward, "--beta", repr(args.beta), "--steps", str(args.steps),
            "--n-per-context", str(args.n_per_context), "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
            "--sampler-n", str(args.sampler_n), "--repeats", str(args.repeats), "--dist-steps", str(args.dist_steps),
            "--device", args.device] + (["--cpu-smoke"] if args.cpu_smoke else [])


def part_command(args, part: str, json_path: Path) -> list[str]:
    """The command of one part: this script with --part; the dist part under torchrun with one process."""
    me = str(Path(__file__).resolve())
    tail = [me, "--part", part, "--part-json", str(json_path), *common_argv(args)]
    if part == "dist":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()), *tail]
    return [sys.executable, *tail]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- helpers used by the parts (CPU-testable) --------------------------------------------------------------------

def _logprob_of(entry, token: int) -> float:
    """vLLM's log-prob of ``token`` in one position's entry ({token id: Logprob}, or a bare float)."""
    value = entry[token] if hasattr(entry, "__getitem__") and not isinstance(entry, float) else entry
    return float(getattr(value, "logprob", value))


def logprob_agreement(outputs, samples) -> dict:
    """vLLM's reported log-probs of the tokens it drew vs ``samples.token_logp`` (the trainer's recomputation), row k of
    the samples being outputs[k]; positions where either is not finite are counted, not compared."""
    tok, seq, mismatched_ids, skipped, rows = [], [], 0, 0, 0
    for k, out in enumerate(outputs):
        o = out.outputs[0]
        ids, lps = list(o.token_ids), o.logprobs
        if lps is None:
            continue
        m = min(len(ids), len(lps), int(samples.mask[k].sum()))
        if [int(i) for i in samples.ids[k, :m].tolist()] != ids[:m]:
            mismatched_ids += 1
            continue
        ours = [float(x) for x in samples.token_logp[k, :m].tolist()]
        theirs = [_logprob_of(lps[j], ids[j]) for j in range(m)]
        pairs = [(a, b) for a, b in zip(theirs, ours) if math.isfinite(a) and math.isfinite(b)]
        skipped += m - len(pairs)
        tok += [abs(a - b) for a, b in pairs]
        seq.append(abs(sum(a for a, _ in pairs) - sum(b for _, b in pairs)))
        rows += 1
    if not tok:
        return {"rows_compared": rows, "tokens_compared": 0, "rows_with_other_tokens": mismatched_ids, "not_finite": skipped}
    return {"rows_compared": rows, "tokens_compared": len(tok), "token_max_abs_diff": max(tok), "token_mean_abs_diff": statistics.fmean(tok),
            "seq_max_abs_diff": max(seq), "seq_mean_abs_diff": statistics.fmean(seq), "rows_with_other_tokens": mismatched_ids,
            "not_finite": skipped}


def _sync_device() -> None:
    import torch

    if torch.cuda.is_initialized():  # something runs on the GPU: wait for it
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync_device()
    t0 = time.perf_counter()
    fn()
    _sync_device()
    return time.perf_counter() - t0


def _placed(config, device: str):
    """(policy, target) built as tiltlm.train.build.build does, the policy's and the prior's models moved to ``device``."""
    from tiltlm.train.build import build

    policy, target = build(config)
    for model in {id(p.model): p.model for p in (policy, target.prior)}.values():
        model.to(device)
    return policy, target


def _run_steps(trainer, steps: int) -> tuple[list[dict], list[float]]:
    rows, seconds = [], []
    while trainer.step < steps:
        out = {}
        seconds.append(_timed(lambda: out.update(trainer.train_step())))
        rows.append(out)
    return rows, seconds


# ---- the parts (need CUDA) ---------------------------------------------------------------------------------------

def part_train(args, name: str) -> dict:
    from tiltlm.train.loop import Trainer

    config = validated(args)[name]
    t0 = time.perf_counter()
    policy, target = _placed(config, args.device)
    t1 = time.perf_counter()
    trainer = Trainer(config, policy=policy, target=target)  # train-vllm: the engine starts here (build_generator)
    built_s, engine_s = t1 - t0, time.perf_counter() - t1
    try:
        rows, seconds = _run_steps(trainer, config.optim.steps)
        outside = getattr(trainer.generator, "outside_nucleus", None)
    finally:
        trainer.close()
    batch = len(config.sampling.contexts) * config.sampling.n_per_context
    steady = statistics.median(seconds[1:] or seconds)
    return {"generation": config.rollout.generation, "device": str(policy.device), "optim": json.loads(config.optim.model_dump_json()),
            "build_s": built_s, "trainer_init_s": engine_s, "steps": len(rows), "first_step_s": seconds[0], "step_s_median": steady,
            "train_samples_per_s": batch / steady, "reward_first": rows[0].get("reward/mean"), "reward_last": rows[-1].get("reward/mean"),
            "kl_prior_last": rows[-1].get("kl/prior_seq"), "losses": [r.get("loss") for r in rows],
            "all_finite": all(math.isfinite(r.get("loss", math.nan)) for r in rows), "outside_nucleus": outside}


def part_sampler(args, dtype: str) -> dict:
    import vllm

    from tiltlm.distributed.vllm_backend import VLLMGenerator
    from tiltlm.train.build import build_policies

    config = validated(args)["sampler"]
    policy, _ = build_policies(config)
    policy.model.to(args.device)
    t0 = time.perf_counter()
    gen = VLLMGenerator(policy, **({} if dtype == "auto" else {"dtype": dtype}))
    engine_s = time.perf_counter() - t0
    try:
        model_config = getattr(gen.llm.llm_engine, "model_config", None)
        engine_dtype = str(getattr(model_config, "dtype", "unknown"))
        captured, clock = [], {"generate_s": 0.0}
        generate = gen.llm.generate

        def recording_generate(*a, **k):  # the outputs (with vLLM's log-probs) and vLLM's own time
            t = time.perf_counter()
            outs = generate(*a, **k)
            clock["generate_s"] += time.perf_counter() - t
            captured[:] = outs
            return outs

        gen.llm.generate = recording_generate
        # the generator's own SamplingParams plus logprobs=0: vLLM also reports the drawn token's log-prob
        gen.vllm = SimpleNamespace(SamplingParams=functools.partial(vllm.SamplingParams, logprobs=0))
        contexts, n = list(args.contexts), args.sampler_n
        samples = gen.sample(contexts, n, seed=args.seed)
        agreement = logprob_agreement(captured, samples)
        agreement["outside_nucleus"] = gen.outside_nucleus

        hf_s, vllm_s, vllm_gen_s = [], [], []
        policy.sample(contexts, n, seed=10**6)  # warm-up of the HF loop at this batch size
        for r in range(args.repeats):  # alternating rounds, min kept
            hf_s.append(_timed(lambda: policy.sample(contexts, n, seed=r)))
            clock["generate_s"] = 0.0
            vllm_s.append(_timed(lambda: gen.sample(contexts, n, seed=r)))
            vllm_gen_s.append(clock["generate_s"])
        rows = len(contexts) * n
        tokens = int(samples.mask.sum())
        sync_s = _timed(gen.sync)
    finally:
        gen.close()
    return {"vllm_dtype_requested": dtype, "vllm_engine_dtype": engine_dtype, "policy_dtype": str(next(policy.model.parameters()).dtype),
            "engine_start_s": engine_s, "logprobs": agreement, "rows": rows, "tokens_first_batch": tokens,
            "hf_s": min(hf_s), "vllm_s": min(vllm_s), "vllm_generate_only_s": min(vllm_gen_s),
            "hf_samples_per_s": rows / min(hf_s), "vllm_samples_per_s": rows / min(vllm_s),
            "vllm_generate_only_samples_per_s": rows / min(vllm_gen_s), "speedup_vllm_vs_hf": min(hf_s) / min(vllm_s),
            "sync_s": sync_s}


def part_dist(args) -> dict:
    import torch
    import torch.distributed as dist

    from tiltlm.distributed.dist import World
    from tiltlm.distributed.strategy import Fsdp, Replicate, Single
    from tiltlm.train.build import build
    from tiltlm.train.loop import Trainer

    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("gpu_check: the dist part runs under torchrun (python -m torch.distributed.run --nproc_per_node 1 ...)")
    local = int(os.environ["LOCAL_RANK"])
    cuda = args.device.startswith("cuda")  # --device cpu: the same path on gloo (how the tests run it without a GPU)
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")  # what init_from_env does for W > 1
    world = World(dist.get_rank(), dist.get_world_size())
    t = torch.full((4,), 2.0, device=device)
    dist.all_reduce(t)
    nccl = torch.cuda.nccl.version() if cuda else None
    out = {"world_size": world.size, "backend": str(dist.get_backend()), "device": device,
           "nccl_version": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
           "all_reduce_ok": bool(torch.equal(t.cpu(), torch.full((4,), 2.0 * world.size)))}
    cfgs = validated(args)
    weights, runs = {}, {}
    for name in ("single", "replicate", "fsdp"):
        config = cfgs["dist-fsdp" if name == "fsdp" else "dist-replicate"]
        if name == "single":
            policy, target = _placed(config, device)
            strategy = Single(world)
        else:
            policy, target = build(config)  # the strategy places them on cuda:LOCAL_RANK (and shards them)
            strategy = Replicate(world) if name == "replicate" else Fsdp(world, config.distributed)
        trainer = Trainer(config, policy=policy, target=target, strategy=strategy)
        try:
            rows, seconds = _run_steps(trainer, config.optim.steps)
            state, _ = strategy.full_state(trainer.module, trainer.optimizer)
            weights[name] = {k: v.detach().float().cpu() for k, v in state.items()}
            runs[name] = {"device": str(next(trainer.module.parameters()).device), "losses": [r.get("loss") for r in rows],
                          "step_s": seconds, "strategy": type(strategy).__name__}
        finally:
            trainer.close()
        del trainer, policy, target
        if cuda:
            torch.cuda.empty_cache()
    for name in ("replicate", "fsdp"):
        common = set(weights[name]) & set(weights["single"])
        runs[name]["max_abs_weight_diff_vs_single"] = max((float((weights[name][k] - weights["single"][k]).abs().max())
                                                           for k in common), default=None)
        runs[name]["same_tensors"] = set(weights[name]) == set(weights["single"])
    dist.destroy_process_group()
    return {**out, "runs": runs}


def run_part(args) -> int:
    """Worker: run args.part here and write its JSON."""
    if args.part.startswith("sampler:"):
        result = part_sampler(args, args.part.split(":", 1)[1])
    elif args.part == "dist":
        result = part_dist(args)
    else:
        result = part_train(args, args.part)
    if int(os.environ.get("RANK", "0")) == 0:
        args.part_json.write_text(json.dumps(result, indent=1, default=str))
    return 0


# ---- orchestration ----------------------------------------------------------------------------------------------

def environment() -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("vllm", "transformers", "tiltlm"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    try:
        env["tiltlm_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["tiltlm_commit"] = None
    return env


def _attempt(args, part: str, extra_env: dict) -> dict:
    json_path = args.out / f"{part.replace(':', '-')}.json"
    json_path.unlink(missing_ok=True)
    cmd = part_command(args, part, json_path)
    log = args.out / f"{part.replace(':', '-')}{'.retry' if extra_env else ''}.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=args.part_timeout, env={**os.environ, **extra_env})
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.perf_counter() - t0
    if rc == 0 and json_path.is_file():
        return {"ok": True, "seconds": seconds, "env": extra_env, **json.loads(json_path.read_text())}
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return {"ok": False, "seconds": seconds, "env": extra_env, "returncode": rc, "log": str(log),
            "error": (errors or lines or ["(no output)"])[-1][:500],
            "serialization": any(w in text for w in ("INSECURE_SERIALIZATION", "pickle", "serializ"))}


def orchestrate(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "configs": configs(args), "parts": {}}
    for part in part_names(args):
        print(f"gpu_check: running {part} ...", file=sys.stderr, flush=True)
        result = _attempt(args, part, {})
        if not result["ok"] and part.split(":")[0] in VLLM_PARTS and not args.no_retry and result.get("serialization") and \
                not all(os.environ.get(k) == v for k, v in RETRY_ENV.items()):
            retry = _attempt(args, part, RETRY_ENV)
            retry["first_attempt"] = result
            result = retry
        report["parts"][part] = result
    report["all_ok"] = all(r["ok"] for r in report["parts"].values())
    path = args.json or args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(summary(report))
    print(f"gpu_check: {'all parts passed' if report['all_ok'] else 'some parts FAILED'}; details in {path}")
    return 0 if report["all_ok"] else 1


def _f(x, spec=".3g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and x is not None else str(x)


def summary(report: dict) -> str:
    e = report["environment"]
    lines = [f"{e.get('gpu')} | torch {e.get('torch')} (CUDA {e.get('cuda')}) | vllm {e.get('vllm')} | transformers "
             f"{e.get('transformers')} | tiltlm {e.get('tiltlm_commit') or e.get('tiltlm')}"]
    for part, r in report["parts"].items():
        if not r["ok"]:
            first = r.get("first_attempt")
            lines.append(f"{part:16s} FAILED ({r.get('returncode')}): {r.get('error')}"
                         + (f" [also failed without {list(RETRY_ENV)}]" if first else ""))
            continue
        note = f" [passed only with {r['env']}; without: {r['first_attempt']['error']}]" if r.get("first_attempt") else ""
        if part.startswith("train"):
            lines.append(f"{part:16s} ok  {r['steps']} steps on {r['device']}: step {_f(r['step_s_median'])} s (first {_f(r['first_step_s'])} s), "
                         f"{_f(r['train_samples_per_s'])} samples/s, reward {_f(r['reward_first'])} -> {_f(r['reward_last'])}, "
                         f"KL(pi||pi0) {_f(r['kl_prior_last'])}, init {_f(r['trainer_init_s'])} s"
                         + (f", outside nucleus {r['outside_nucleus']}" if r.get("outside_nucleus") is not None else "") + note)
        elif part.startswith("sampler"):
            lp = r["logprobs"]
            lines.append(f"{part:16s} ok  engine {r['vllm_engine_dtype']} vs policy {r['policy_dtype']}: |log p diff| per token max "
                         f"{_f(lp.get('token_max_abs_diff'))} mean {_f(lp.get('token_mean_abs_diff'))}, per sequence max "
                         f"{_f(lp.get('seq_max_abs_diff'))} ({lp['tokens_compared']} tokens, {lp['rows_with_other_tokens']} rows differ in "
                         f"tokens); samples/s HF {_f(r['hf_samples_per_s'])}, vLLM {_f(r['vllm_samples_per_s'])} (generate only "
                         f"{_f(r['vllm_generate_only_samples_per_s'])}), sync {_f(r['sync_s'])} s" + note)
        elif part == "dist":
            runs = r["runs"]
            lines.append(f"{part:16s} ok  backend {r['backend']}, nccl {r['nccl_version']}, all_reduce "
                         f"{'ok' if r['all_reduce_ok'] else 'WRONG'}; max |w - w_single|: replicate "
                         f"{_f(runs['replicate']['max_abs_weight_diff_vs_single'])}, fsdp {_f(runs['fsdp']['max_abs_weight_diff_vs_single'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        from tiltlm.errors import TiltlmError

        try:
            parsed = validated(args)
        except TiltlmError as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            return 2
        plan = {"configs": {k: json.loads(v.model_dump_json()) for k, v in parsed.items()},
                "parts": {p: shlex.join(part_command(args, p, args.out / f"{p.replace(':', '-')}.json")) for p in part_names(args)}}
        print(json.dumps(plan, indent=1))
        print(f"gpu_check: dry run: {len(parsed)} configs valid, {len(plan['parts'])} parts planned", file=sys.stderr)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.part is not None:
        return run_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
