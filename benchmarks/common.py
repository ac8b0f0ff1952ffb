"""Shared helpers of the benchmarks: thread settings, interleaved min-of-repeats timing, RSS, tables, JSON.

Timings on a shared machine are noisy: every benchmark interleaves the runs it compares (floor,
tiltlm, TRL, ...) round by round and keeps the *minimum* over rounds, and reports ratios measured
in the same process. Absolute seconds are of this machine at this moment; ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (reported with the results)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration (min is reported)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (< 60 s): a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def set_threads(n: int) -> None:
    """Pin torch's intra-op (and inter-op) threads; every row reports the setting it ran with."""
    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (it may only be set once per process)
        pass


def environment() -> dict:
    """What the numbers depend on: threads, cores, load of the machine when the run started."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg_1m": round(load[0], 2),
            "torch": torch.__version__, "python": sys.version.split()[0]}


def interleaved_min(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Run every fn once per round, ``repeats`` rounds after ``warmup`` untimed ones; min seconds per fn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x: y ~ x^k (k = 1 is linear scaling)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of ``columns`` (missing values print as '-')."""
    cells = [[_fmt(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def emit(name: str, rows: list[dict], columns: list[str], json_path: Path | None = None, **extra) -> dict:
    """Print the table, then one JSON document {benchmark, environment, rows, ...}; optionally write it."""
    payload = {"benchmark": name, "environment": environment(), **extra, "rows": rows}
    print_table(rows, columns)
    print(json.dumps(payload))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(payload, indent=1))
    return payload


def quiet_transformers() -> None:
    """No progress bars or advisory warnings in the middle of a table."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def make_trl_trainer(kind: str, model: str, tokenizer, prompts: list, *, b: int, t: int, steps: int, out_dir: str,
                     reward_fn: Callable[[list[str]], list[float]], beta: float, lr: float, callbacks: list = (),
                     lora_r: int | None = None, lora_alpha: int = 16, gradient_checkpointing: bool | None = None, seed: int = 0,
                     use_cpu: bool = True, extra: dict | None = None):
    """A TRL ``GRPOTrainer`` (kind "grpo") or ``RLOOTrainer`` ("rloo") doing what a tiltlm kl-pg step does.

    One prompt per step with ``num_generations = per_device_train_batch_size = b`` completions of at most
    ``t`` tokens (``steps_per_generation`` 1, ``num_iterations`` 1: one optimiser update per generation
    batch), temperature 1, top_p 1, no top-k, ``beta`` > 0 (TRL scores the reference: a copy of the model,
    or with LoRA the same model with its adapters off), fp32 (bf16 off), on the CPU, no vLLM, clipping at 1.
    ``prompts``: one entry per step (a string, or a chat: a list of messages, which TRL renders with the
    tokenizer's chat template). ``lora_r``: a peft ``LoraConfig`` of that rank (peft's default modules for
    the architecture, like tiltlm's ``lora:``). ``gradient_checkpointing``: None keeps TRL's default (on).
    ``use_cpu`` False: accelerate's device (the GPU check, scripts/gpu_parts.py); ``extra``: more config options.
    Returns the trainer; ``trainer.train()`` runs ``steps`` steps.
    """
    import torch
    from datasets import Dataset

    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as TrainerClass
    elif kind == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as TrainerClass
    else:
        raise ValueError(f"unknown TRL trainer {kind!r} (grpo, rloo)")

    def trl_reward(completions, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # chat completions: the reply
        return reward_fn(texts)

    options = dict(
        output_dir=out_dir, per_device_train_batch_size=b, num_generations=b, max_completion_length=t, beta=beta,
        learning_rate=lr, max_steps=steps, use_cpu=use_cpu, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, seed=seed, max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0,
        dataloader_num_workers=0, steps_per_generation=1, num_iterations=1, use_vllm=False,
        model_init_kwargs={"dtype": torch.float32},
    )
    if gradient_checkpointing is not None:
        options["gradient_checkpointing"] = bool(gradient_checkpointing)
    options.update(extra or {})
    config = Config(**options)
    peft_config = None
    if lora_r is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"prompt": list(prompts)})
    return TrainerClass(model=model, reward_funcs=trl_reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=list(callbacks), peft_config=peft_config)
