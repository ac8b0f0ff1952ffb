"""The GPU check's parts (scripts/gpu_check.py runs each in its own process), on the model gpu_model.py writes.

  hf           kl-pg toward pi0·exp(reward/beta), ``rollout.generation: policy`` (the HF KV-cache sampling loop), in
               float32 and under bf16 autocast: the same seed's draws in both (share of identical rows and tokens),
               the bf16 log-probs of the float32 draws against float32's (max and mean |diff| per token, per sequence),
               samples/s of sampling alone and of whole training steps, peak GPU memory of each precision
  grpo-tiltlm  tiltlm's GRPO (``algorithm: grpo``, TRL's defaults: std-scaled group advantages, clip 0.2, beta·k3
               per token) on one prompt, G = --grpo-batch completions per step: samples/s and peak GPU memory
  grpo-trl     TRL's GRPOTrainer on the same work (benchmarks/common.make_trl_trainer: the same model in float32,
               the same chat prompt, G completions of at most T tokens, one update per generation batch,
               loss_type grpo, no gradient checkpointing, no vLLM), timed from its on_step_begin to on_step_end
  dist         (part_dist, scripts/gpu_dist.py) under torchrun --nproc_per_node 1: nccl, Replicate and Fsdp vs one process

Every step time is the median over steps 2.. (step 1 warms up); peak memory is torch.cuda.max_memory_allocated over
the steps, reset after building (None on the CPU, where the tests run the same code).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRPO_LR = 1e-4


def train_config(args, generation: str = "policy", strategy: str = "replicate", steps: int | None = None) -> dict:
    """kl-pg on the prior toward pi0·exp(reward/beta); lr, schedule and clipping are the library's defaults."""
    return {"prior": args.prior, "target": {"reward": args.reward, "beta": args.beta}, "algorithm": {"name": "kl-pg"},
            "sampling": {"contexts": list(args.contexts), "n_per_context": args.n_per_context, "max_new_tokens": args.max_new_tokens},
            "optim": {"steps": steps or args.steps}, "rollout": {"generation": generation}, "metrics": {"diversity": False},
            "distributed": {"strategy": strategy}, "seed": args.seed}


def grpo_config(args) -> dict:
    """tiltlm's GRPO on the TRL part's work: one prompt, G completions, one update per batch, clipping at 1."""
    return {"prior": args.prior, "target": {"reward": args.reward, "beta": args.beta}, "algorithm": {"name": "grpo"},
            "sampling": {"contexts": [args.contexts[0]], "n_per_context": args.grpo_batch, "max_new_tokens": args.max_new_tokens},
            "optim": {"steps": args.grpo_steps, "lr": GRPO_LR, "schedule": "constant", "minibatch_size": None},
            "metrics": {"diversity": False}, "seed": args.seed}


def configs(args) -> dict[str, dict]:
    return {"hf": train_config(args), "grpo-tiltlm": grpo_config(args), "train-vllm": train_config(args, "vllm"),
            "dist-replicate": train_config(args, "policy", "replicate", args.dist_steps),
            "dist-fsdp": train_config(args, "policy", "fsdp", args.dist_steps)}


def validated(args) -> dict:
    """Every config through tiltlm's own parse_config (a TiltlmError names the bad key)."""
    from tiltlm.train.config import parse_config

    return {name: parse_config(data) for name, data in configs(args).items()}


# ---- helpers ----------------------------------------------------------------------------------------------------

def sync_device() -> None:
    import torch

    if torch.cuda.is_initialized():  # something runs on the GPU: wait for it
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync_device()
    t0 = time.perf_counter()
    fn()
    sync_device()
    return time.perf_counter() - t0


def reset_peak() -> None:
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


def placed(config, device: str):
    """(policy, target) built as tiltlm.train.build.build does, the policy's and the prior's models moved to ``device``."""
    from tiltlm.train.build import build

    policy, target = build(config)
    for model in {id(p.model): p.model for p in (policy, target.prior)}.values():
        model.to(device)
    return policy, target


def steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] or seconds)


def autocast(device: str, on: bool):
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=on)


def run_steps(config, device: str, bf16: bool) -> dict:
    """``config.optim.steps`` training steps of a fresh (policy, target) on ``device``, under bf16 autocast or not."""
    from tiltlm.train.loop import Trainer

    policy, target = placed(config, device)
    trainer = Trainer(config, policy=policy, target=target)
    rows, seconds, lengths = [], [], []
    sample = policy.sample

    def recorded(*a, **k):  # the completions' mean length: the same work as TRL's?
        samples = sample(*a, **k)
        lengths.append(float(samples.mask.sum(-1).double().mean()))
        return samples

    policy.sample = recorded
    reset_peak()
    try:
        while trainer.step < config.optim.steps:
            out: dict = {}
            with autocast(device, bf16):
                seconds.append(timed(lambda: out.update(trainer.train_step())))
            rows.append(out)
    finally:
        trainer.close()
    batch = len(config.sampling.contexts) * config.sampling.n_per_context
    return {"steps": len(rows), "first_step_s": seconds[0], "step_s_median": steady(seconds), "samples_per_s": batch / steady(seconds),
            "peak_mb": peak_mb(), "mean_length": statistics.fmean(lengths) if lengths else None, "reward_first": rows[0].get("reward/mean"), "reward_last": rows[-1].get("reward/mean"),
            "kl_prior_last": rows[-1].get("kl/prior_seq"), "losses": [r.get("loss") for r in rows],
            "all_finite": all(math.isfinite(r.get("loss", math.nan)) for r in rows), "device": str(policy.device)}


def logprob_error(lp_ref, lp, mask) -> dict:
    """|lp − lp_ref| over the mask's tokens (max, mean) and of the per-sequence sums (max): (B, T) tensors, mask bool."""
    diff = (lp.double() - lp_ref.double()).abs()
    seq = ((lp.double() - lp_ref.double()) * mask).sum(-1).abs()
    return {"token_max_abs_diff": float(diff[mask].max()), "token_mean_abs_diff": float(diff[mask].mean()),
            "seq_max_abs_diff": float(seq.max()), "tokens_compared": int(mask.sum())}


def draws_agreement(a, b) -> dict:
    """Share of rows drawn identically (tokens and mask), and of token positions equal where both rows have a token."""
    import torch.nn.functional as F

    width = max(a.ids.shape[1], b.ids.shape[1])  # the widths differ where one batch's rows all stopped earlier
    ids_a, ids_b = (F.pad(x.ids.cpu(), (0, width - x.ids.shape[1]), value=-1) for x in (a, b))
    mask_a, mask_b = (F.pad(x.mask.cpu(), (0, width - x.mask.shape[1]), value=False) for x in (a, b))
    same_rows = ((ids_a == ids_b) | ~(mask_a | mask_b)).all(-1) & (mask_a == mask_b).all(-1)
    both = mask_a & mask_b
    return {"same_rows": float(same_rows.double().mean()), "same_tokens": float((ids_a == ids_b)[both].double().mean())}


# ---- the parts --------------------------------------------------------------------------------------------------

def precision_check(args, config) -> dict:
    """The same seed's draws in float32 and under bf16 autocast, log-probs of the float32 draws in both, sampling speed."""
    import torch

    policy, _ = placed(config, args.device)
    contexts, n = list(config.sampling.contexts), config.sampling.n_per_context
    with torch.no_grad():
        s32 = policy.sample(contexts, n, seed=args.seed)
        with autocast(args.device, True):
            s16 = policy.sample(contexts, n, seed=args.seed)
        lp32 = policy.log_prob(s32, per_token=True)
        with autocast(args.device, True):
            lp16 = policy.log_prob(s32, per_token=True)
        sampling = {}
        for name, bf16 in (("float32", False), ("bf16", True)):
            with autocast(args.device, bf16):
                policy.sample(contexts, n, seed=10**6)  # warm-up at this batch size
                best = min(timed(lambda: policy.sample(contexts, n, seed=r)) for r in range(args.repeats))
            sampling[name] = {"sample_s": best, "samples_per_s": len(s32) / best}
    mask = s32.mask.to(lp32.device)
    out = {"rows": len(s32), "tokens": int(s32.mask.sum()), "vocab": policy.vocab_size,
           "recorded_vs_recomputed_float32": logprob_error(lp32, s32.token_logp.to(lp32.device), mask),
           "bf16_vs_float32_logprobs": logprob_error(lp32, lp16, mask), "bf16_vs_float32_draws": draws_agreement(s32, s16),
           "sampling": sampling}
    return out


def part_hf(args) -> dict:
    import torch

    config = validated(args)["hf"]
    out = precision_check(args, config)
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the check's model is gone: each precision's peak below is its own run's
    out["train"] = {name: run_steps(config, args.device, bf16) for name, bf16 in (("float32", False), ("bf16", True))}
    return out


def part_grpo_tiltlm(args) -> dict:
    config = validated(args)["grpo-tiltlm"]
    return {**run_steps(config, args.device, False), "algorithm": json.loads(config.algorithm.model_dump_json())}


def trl_reward_fn(spec: str):
    """tiltlm's reward ``spec`` as TRL calls a reward: texts -> list of floats."""
    from tiltlm.rewards.base import get_reward

    reward = get_reward(spec)
    return lambda texts: [float(x) for x in reward(list(texts))]


def trl_trainer(args, steps: int, out_dir: str, callbacks: list):
    """TRL's GRPOTrainer on the grpo-tiltlm part's work (benchmarks/common.make_trl_trainer, on ``args.device``)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import make_trl_trainer

    tokenizer = AutoTokenizer.from_pretrained(args.prior, local_files_only=True)
    prompts = [[{"role": "user", "content": args.contexts[0]}]] * (steps + 2)  # the chat template, as tiltlm renders it
    return make_trl_trainer("grpo", str(args.prior), tokenizer, prompts, b=args.grpo_batch, t=args.max_new_tokens, steps=steps,
                            out_dir=out_dir, reward_fn=trl_reward_fn(args.reward), beta=args.beta, lr=GRPO_LR, callbacks=callbacks,
                            gradient_checkpointing=False, seed=args.seed, use_cpu=not args.device.startswith("cuda"),
                            extra={"loss_type": "grpo", "lr_scheduler_type": "constant"})


def part_grpo_trl(args) -> dict:
    from transformers import TrainerCallback

    seconds: list[float] = []
    logged: dict = {}

    class Timer(TrainerCallback):
        def on_log(self, *a, logs=None, **k):
            logged.update(logs or {})

        def on_step_begin(self, *a, **k):
            sync_device()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync_device()
            seconds.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(args, args.grpo_steps, tmp, [Timer()])
        reset_peak()
        trainer.train()
    import trl

    return {"steps": len(seconds), "first_step_s": seconds[0], "step_s_median": steady(seconds),
            "samples_per_s": args.grpo_batch / steady(seconds), "peak_mb": peak_mb(), "trl": trl.__version__,
            "mean_length": float(logged["completions/mean_length"]) if "completions/mean_length" in logged else None,
            "device": str(trainer.model.device), "loss_type": trainer.args.loss_type, "beta": trainer.beta,
            "num_generations": trainer.num_generations, "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}
