"""A kl-pg step on a real 49k-vocabulary model (SmolLM2-135M), tiltlm vs TRL: samples/s, peak RSS, seconds by part.

    python benchmarks/real_model.py [--batch 16] [--length 64] [--steps 3] [--configs ...] [--quick] [--json out.json]

Each configuration runs in a fresh child process: tiltlm's kl-pg ``tiltlm-full``, ``tiltlm-lora``
(r=8), the same with ``checkpoint_layers`` (activation checkpointing of the decoder layers in the
scoring pass with grad: less memory, one more forward) ``tiltlm+ckpt-full``, ``tiltlm+ckpt-lora``, and TRL's ``GRPOTrainer`` / ``RLOOTrainer`` on the same work, ``trl-grpo-full``, ``trl-grpo-lora``,
``trl-rloo-full``, ``trl-rloo-lora`` (common.make_trl_trainer: the same model in fp32, the same chat
prompt through the tokenizer's chat template, B completions of it per step of at most T tokens,
temperature 1, beta = 1 (so the reference is scored), lr 1e-4, clipping at 1, one optimiser update
per generation batch, no vLLM; LoRA r=8 alpha 16 on peft's default modules, as tiltlm's ``lora:``).
TRL keeps its default gradient checkpointing (``--trl-gradient-checkpointing off`` turns it off).
Reported per configuration:

- ``rss_built_mb``: VmRSS after building the trainer (weights, optimiser);
- ``peak_step_mb``: VmHWM over the steps, the high-water mark reset after building
  (``/proc/self/clear_refs``), so it is the training step's own peak, not the loader's;
- ``step_s`` and its parts, the minimum over steps 2.. (step 1 warms up): ``sample_s`` (the KV-cache
  sampling loop), ``reference_s`` (log pi0 of the samples, no grad; with LoRA the same model with its
  adapters off), ``score_s`` (log pi with grad, the loss's forward), ``backward_s`` (backward, clipping
  and the optimiser step); what is left (reward, metrics) is in ``step_s`` only;
- ``samples_per_s``: B / ``step_s``; ``samples_per_cpu_s``: B / ``step_cpu_s``, the step's process CPU
  seconds (``time.process_time``), and each part's ``*_cpu_s``: on a shared machine a child that waits for
  a core loses wall time but not CPU time, so with one thread the CPU seconds compare the work of two
  configurations run minutes apart better than their wall seconds (both are reported);
- ``--rounds R``: the configurations run R times in turn (round by round), each row the round whose
  step had the fewest CPU seconds;
- ``mean_len``: mean generated tokens per completion over the timed steps (EOS included), ``prompt_len``:
  the prompt's tokens, to check that both tools sample the same lengths after the same prompt;
- TRL's parts: ``sample_s`` its ``_generate`` (HF ``generate``, tokenising and decoding included),
  ``reference_s`` every no-grad log-prob pass (``nograd_passes`` of them per step: GRPO 1, the reference;
  RLOO 2, the policy's "old" log-probs and the reference), ``score_s`` the log-prob pass with grad,
  ``backward_s`` ``accelerator.backward``, clipping and the optimiser step; a step is timed from the
  Trainer's on_step_begin to on_step_end;
- ``metrics`` (tiltlm): the rows of metrics.jsonl, to compare two versions of the code number for number.

``--quick``: a tiny tied Llama testbed instead of SmolLM2 (seconds), for tests/test_benchmarks.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, current_rss_mb, emit, make_trl_trainer, quiet_transformers, set_threads

PROMPT = "Write a short poem about the sea."
QUICK_PROMPT = "abc"
PARTS = ("sample_s", "reference_s", "score_s", "backward_s")
CONFIGS = ("tiltlm-full", "tiltlm-lora", "tiltlm+ckpt-full", "tiltlm+ckpt-lora", "trl-grpo-full", "trl-grpo-lora", "trl-rloo-full",
           "trl-rloo-lora")
BETA, LR, LORA_R, LETTER = 1.0, 1e-4, 8, "e"


def reward_fn(texts: list[str]) -> list[float]:
    """count:e, tiltlm's reward spec, for TRL."""
    return [float(t.count(LETTER)) for t in texts]


def _vm(key: str) -> float:
    """A /proc/self/status field in MiB (VmHWM: peak resident set since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _timed(times: dict, key: str, fn):
    """``fn`` adding its wall seconds to ``times[key]`` and its process CPU seconds to ``times[key + "_cpu"]``."""
    def wrapped(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
            times[key + "_cpu"] = times.get(key + "_cpu", 0.0) + time.process_time() - c0
    return wrapped


def _step_record(times: dict, wall: float, cpu: float) -> dict:
    return {"step_s": wall, "step_cpu_s": cpu, **{k: times.get(k, 0.0) for k in PARTS},
            **{k.replace("_s", "_cpu_s"): times.get(k + "_cpu", 0.0) for k in PARTS}}


def _child(prior: str, b: int, t: int, lora: bool, steps: int, threads: int, prompt: str, checkpoint_layers: bool = False) -> dict:
    """Runs in the child: build, reset the peak, step ``steps`` times with every part timed."""
    quiet_transformers()
    set_threads(threads)
    from tiltlm.train.build import build
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    config = parse_config({"prior": prior, "target": {"reward": f"count:{LETTER}", "beta": BETA}, "algorithm": {"name": "kl-pg"},
                           "sampling": {"contexts": [prompt], "n_per_context": b, "max_new_tokens": t},
                           "optim": {"steps": steps, "lr": LR}, "metrics": {"diversity": False}, "seed": 3,
                           **({"lora": {"r": LORA_R}} if lora else {})})
    policy, target = build(config)
    policy.checkpoint_layers = checkpoint_layers
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, policy=policy, target=target, out_dir=Path(tmp) / "run")
        built = current_rss_mb()
        times: dict = {}
        lengths: list[float] = []
        sample = _timed(times, "sample_s", policy.sample)

        def recorded(*args, **kwargs):
            samples = sample(*args, **kwargs)
            lengths.append(float(samples.mask.sum(-1).double().mean()))
            times["prompt_len"] = int(samples.context_attn[0].sum())
            return samples

        policy.sample = recorded
        target.prior.log_prob = _timed(times, "reference_s", target.prior.log_prob)
        trainer.strategy.token_logp = _timed(times, "score_s", trainer.strategy.token_logp)
        trainer._descend = _timed(times, "backward_s", trainer._descend)
        reset = _reset_peak()
        per_step = []
        for _ in range(steps):
            times.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step()
            per_step.append(_step_record(times, time.perf_counter() - t0, time.process_time() - c0))
        peak = _vm("VmHWM")
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    same = policy.model is target.prior.model
    return {**_summary(per_step, built, peak, reset, lengths, times.get("prompt_len", 0)),
            "prior_is_policy_model": same, "vocab": policy.vocab_size, "metrics": metrics}


def _summary(per_step: list[dict], built: float, peak: float, reset: bool, lengths: list[float], prompt_len: int) -> dict:
    timed = per_step[1:] or per_step
    best = {k: min(s[k] for s in timed) for k in timed[0]}
    lens = lengths[1:] or lengths
    return {"rss_built_mb": built, "peak_step_mb": peak if reset else float("nan"), "peak_is_step_only": reset,
            "steps_timed": len(timed), **best, "mean_len": sum(lens) / max(1, len(lens)), "prompt_len": prompt_len,
            "step_s_all": [s["step_s"] for s in per_step], "step_cpu_s_all": [s["step_cpu_s"] for s in per_step],
            "threads_used": torch_threads()}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _trl_child(kind: str, prior: str, b: int, t: int, lora: bool, steps: int, threads: int, prompt: str,
               gradient_checkpointing: bool | None) -> dict:
    """TRL's trainer ``kind`` (grpo, rloo) on the same work as _child, its parts timed the same way."""
    quiet_transformers()
    set_threads(threads)
    from transformers import AutoTokenizer, TrainerCallback

    from tiltlm.policies.hf import resolve_model_dir

    path = resolve_model_dir(prior)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    chat = bool(getattr(tokenizer, "chat_template", None))  # as tiltlm: the chat template when the tokenizer has one
    prompts = [[{"role": "user", "content": prompt}] if chat else prompt] * (steps + 2)
    times: dict = {}
    per_step: list[dict] = []
    lengths: list[float] = []
    info: dict = {"prompt_len": 0, "nograd_passes": 0, "grad_passes": 0, "optimizer_steps": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None and not getattr(optimizer, "_timed", False):
                optimizer.step = _counted(_timed(times, "backward_s", optimizer.step), info, "optimizer_steps")
                optimizer._timed = True
            times.clear()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(_step_record(times, time.perf_counter() - self.t0, time.process_time() - self.c0))

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trl_trainer(kind, str(path), tokenizer, prompts, b=b, t=t, steps=steps, out_dir=tmp, reward_fn=reward_fn,
                                   beta=BETA, lr=LR, callbacks=[Timer()], lora_r=LORA_R if lora else None,
                                   gradient_checkpointing=gradient_checkpointing)
        generate = _timed(times, "sample_s", trainer._generate)

        def recorded(*args, **kwargs):
            out = generate(*args, **kwargs)
            prompt_ids, completion_ids = out[0], out[1]
            lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
            info["prompt_len"] = len(prompt_ids[0])
            return out

        logps = trainer._get_per_token_logps_and_entropies

        def scored(*args, **kwargs):
            key = "score_s" if torch_grad_enabled() else "reference_s"
            info["grad_passes" if key == "score_s" else "nograd_passes"] += 1
            return _timed(times, key, logps)(*args, **kwargs)

        trainer._generate = recorded
        trainer._get_per_token_logps_and_entropies = scored
        trainer.accelerator.backward = _timed(times, "backward_s", trainer.accelerator.backward)
        trainer.accelerator.clip_grad_norm_ = _timed(times, "backward_s", trainer.accelerator.clip_grad_norm_)
        settings = {"beta": trainer.beta, "num_generations": trainer.num_generations, "max_completion_length": trainer.max_completion_length,
                    "use_vllm": bool(getattr(trainer, "use_vllm", False)), "has_ref_model": trainer.ref_model is not None,
                    "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
                    "steps_per_generation": trainer.args.steps_per_generation, "num_iterations": trainer.num_iterations,
                    "dtype": str(trainer.model.dtype), "max_new_tokens": trainer.generation_config.max_new_tokens}
        built = current_rss_mb()
        reset = _reset_peak()
        trainer.train()
        peak = _vm("VmHWM")
    n = max(1, len(per_step))
    return {**_summary(per_step, built, peak, reset, lengths, info["prompt_len"]), "trl": settings,
            "nograd_passes": info["nograd_passes"] / n, "grad_passes": info["grad_passes"] / n,
            "optimizer_steps": info["optimizer_steps"] / n}


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def _counted(fn, info: dict, key: str):
    def wrapped(*args, **kwargs):
        info[key] += 1
        return fn(*args, **kwargs)
    return wrapped


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--prior", default=None, help="model (default smollm2-135m; --quick: a tiny tied Llama testbed)")
    parser.add_argument("--batch", type=int, default=None, help="B completions of the one prompt (16)")
    parser.add_argument("--length", type=int, default=None, help="T, max new tokens (64)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration (3)")
    parser.add_argument("--configs", nargs="+", default=None, choices=CONFIGS,
                        help="default: all (the trl-* ones only when trl is installed)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the configurations' list this many times in turn, each row the round with the fastest step")
    parser.add_argument("--trl-gradient-checkpointing", choices=["default", "on", "off"], default="default",
                        help="TRL's gradient_checkpointing (default: TRL's own default, on)")
    parser.add_argument("--child", nargs=7, metavar=("TOOL", "PRIOR", "B", "T", "LORA", "STEPS", "PROMPT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ckpt = {"default": None, "on": True, "off": False}[args.trl_gradient_checkpointing]
    if args.child:
        tool, prior, b, t, lora, steps, prompt = args.child
        if tool.startswith("tiltlm"):
            info = _child(prior, int(b), int(t), lora == "1", int(steps), args.threads, prompt, checkpoint_layers=tool == "tiltlm+ckpt")
        else:
            info = _trl_child(tool.removeprefix("trl-"), prior, int(b), int(t), lora == "1", int(steps), args.threads, prompt, ckpt)
        print(json.dumps(info))
        return {}
    set_threads(args.threads)
    configs = args.configs
    if configs is None:
        try:
            import trl  # noqa: F401

            configs = list(CONFIGS)
        except ImportError:
            print("trl is not installed (pip install -e '.[bench]'): tiltlm rows only", file=sys.stderr)
            configs = [c for c in CONFIGS if c.startswith("tiltlm")]
    else:
        configs = [c for c in CONFIGS if c in configs]  # tiltlm rows first: the TRL rows are compared with them
    b = args.batch or (4 if args.quick else 16)
    t = args.length or (8 if args.quick else 64)
    steps = args.steps or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        prior = args.prior
        if prior is None and args.quick:
            from tiltlm.testbed import make_testbed

            prior = str(make_testbed(Path(tmp) / "llama", arch="llama", vocab_size=31, n_layer=2, n_embd=32, n_head=4, n_positions=128))
        prior = prior or "smollm2-135m"
        prompt = QUICK_PROMPT if args.quick and args.prior is None else PROMPT  # the testbed's tokenizer knows lowercase letters only
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        runs: dict[str, list[dict]] = {}
        for name in [c for _ in range(max(1, args.rounds)) for c in configs]:  # round by round, every configuration in turn
            tool, mode = name.rsplit("-", 1)
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--trl-gradient-checkpointing", args.trl_gradient_checkpointing,
                   "--child", tool, prior, str(b), str(t), str(int(mode == "lora")), str(steps), prompt]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()
                raise RuntimeError(f"{name}: child failed ({proc.returncode}): {err[-1] if err else ''}")
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault(name, []).append({"config": f"{tool} {mode} B={b} T={t}", "tool": tool, "mode": mode,
                                              "samples_per_s": b / info["step_s"], "samples_per_cpu_s": b / info["step_cpu_s"],
                                              "load_avg_1m_before": round(load, 2), **info})
        rows = []
        for name, tries in runs.items():
            row = dict(min(tries, key=lambda r: r["step_cpu_s"]))
            row.update(rounds=len(tries), step_s_rounds=[r["step_s"] for r in tries], step_cpu_s_rounds=[r["step_cpu_s"] for r in tries],
                       peak_step_mb_rounds=[r["peak_step_mb"] for r in tries])
            rows.append(row)
    for r in rows:  # each TRL row against each tiltlm row of its mode (tiltlm: default; tiltlm_ckpt: checkpoint_layers)
        for tool in ("tiltlm", "tiltlm+ckpt"):
            base = next((x for x in rows if x["tool"] == tool and x["mode"] == r["mode"]), None)
            if r["tool"].startswith("trl") and base is not None:
                key = tool.replace("+", "_")
                r[f"{key}_speedup"] = base["samples_per_s"] / r["samples_per_s"]
                r[f"{key}_speedup_cpu"] = base["samples_per_cpu_s"] / r["samples_per_cpu_s"]
                r[f"{key}_peak_ratio"] = base["peak_step_mb"] / r["peak_step_mb"]
    return emit("real_model", rows, ["config", "samples_per_s", "samples_per_cpu_s", "peak_step_mb", "step_s", "step_cpu_s",
                                     *(k.replace("_s", "_cpu_s") for k in PARTS), "mean_len", "tiltlm_speedup_cpu", "tiltlm_peak_ratio",
                                     "tiltlm_ckpt_speedup_cpu", "tiltlm_ckpt_peak_ratio"], args.json, threads=args.threads,
                prior=prior if args.prior or not args.quick else "testbed llama", prompt=prompt, batch=b, length=t, steps=steps,
                goals={"tiltlm_speedup_min": 1.5, "tiltlm_peak_ratio_max": 1.0})


if __name__ == "__main__":
    main()
