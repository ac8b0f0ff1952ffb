"""Sampling throughput of ``HFPolicy.sample`` against this machine's own matrix-multiply rate.

    python benchmarks/sampling.py [--threads 1] [--batches 16 32 64 128 256] [--tokens 32] [--smollm prior|config|off]
                                  [--samplers gumbel inverse-cdf] [--bound]

For each batch size B the policy draws B sequences of up to T new tokens after one context (seeded), and
in the same process, interleaved round by round (benchmarks/common.interleaved_min, the minimum kept),
torch multiplies a (B × d) by a (d × 4d) float32 matrix — the shape of a decoder's MLP at that batch size — as
many times as make GEMM_ROUND_FLOPS.
Each row is one sampler (``sampling.sampler``, tiltlm.policies.base.SAMPLERS: ``gumbel``, the default stream, and
``inverse-cdf``, one uniform per row and token); the samplers of one B take turns in the same rounds with the one
reference product, so their rows share its rate and compare directly. Reported per row:

- ``tokens_per_s``: generated tokens (EOS included, nothing after it) per second of ``sample``;
- ``gemm_gflops``: 2·B·d·4d / seconds of that matrix product, the rate this machine reaches on it now;
- ``ratio_steps``: the model FLOPs of the loop, 2 × parameters × B × decoding steps (every row of every step,
  finished rows included: the issue's measure), per second, over ``gemm_gflops``;
- ``ratio_tokens``: the same with the generated tokens instead of B × steps (only work that produced a token);
- with ``--bound``, ``matmul_s``: the self time of the model's own matrix products (aten::addmm, mm, bmm, addmv, mv)
  in one profiled ``sample`` (torch.profiler), and ``ratio_bound``: ``ratio_steps`` for a loop that spent no time on
  anything but those products — the ceiling of any exact loop that runs the model's layers as they are (the same
  kernels on the same shapes: the same bits), whatever its Python, sampler or cache costs; ``attention_s`` and
  ``ratio_bound_attention``: the same with the attention kernel's self time (aten::_scaled_dot_product_*) added — the
  ceiling of a loop that runs nothing but the model's matrix products and its attention over the KV cache, work the
  FLOPs measure does not count (2 × parameters leaves attention out); ``arithmetic_s`` and ``ratio_bound_model``: the
  same with the model's elementwise arithmetic and normalisations added too (MODEL_ARITHMETIC: GELU's or SiLU's
  operations, residual adds, layer or RMS norms, rotary embeddings, and the log-softmax the recorded log-probs need) —
  the ceiling of a loop that runs the model's own kernels and draws for free. Those operator names also count the
  loop's (B,)-sized position and sampler updates: 0.6 ms of a 0.19 s ``sample`` at B = 64, a negligible undercount of
  the ceiling.

Parameters are ``model.num_parameters()`` (a tied head counted once; its matrix product is real work, the
position table's lookup is not: a 2% overcount on the default model). The context is "" (BOS) for the default
model and the chat prompt of benchmarks/real_model.py for SmolLM2 (``--smollm prior``: the converted
SmolLM2-135M-Instruct, tiltlm.priors; ``config``: the same architecture with random weights, whose rows rarely
end early). Absolute numbers are of this machine at this moment; the ratios are the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, emit, interleaved_min, quiet_transformers, set_threads

from tiltlm.policies.base import SAMPLERS

SMOLLM_PROMPT = "Write a short poem about the sea."
SMOLLM_CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)


GEMM_ROUND_FLOPS = 2e9
"""The reference product is repeated to at least this many FLOPs a round (and at least 20 times)."""

TESTBED_PROMPT = "ab" * 8
"""The context when the prior is not installed: the Llama testbed's tokenizer knows only a few letters."""


def smollm_policy(kind: str, max_new_tokens: int):
    """(policy, context): SmolLM2-135M, the converted prior, or its architecture with random weights (seeded) and
    the prior's tokenizer when it is converted, else the tiny Llama testbed's (ids within the vocabulary either way)
    with TESTBED_PROMPT for a context."""
    from tiltlm.policies.hf import HFPolicy

    if kind == "prior":
        return HFPolicy.from_pretrained("smollm2-135m", max_new_tokens=max_new_tokens), SMOLLM_PROMPT
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM_CONFIG)).float()
    tokenizer, prompt = _any_tokenizer()
    return HFPolicy(model, tokenizer, max_new_tokens=max_new_tokens), prompt


def _any_tokenizer():
    """(tokenizer, context): the prior's with SMOLLM_PROMPT, else the Llama testbed's with TESTBED_PROMPT."""
    import tempfile

    from transformers import AutoTokenizer

    from tiltlm.testbed import make_testbed

    try:
        from tiltlm.priors import named_prior_dir

        return AutoTokenizer.from_pretrained(named_prior_dir("smollm2-135m"), local_files_only=True), SMOLLM_PROMPT
    except Exception:  # noqa: BLE001 - the prior is not installed: a testbed's chat tokenizer will do
        return AutoTokenizer.from_pretrained(make_testbed(tempfile.mkdtemp(), arch="llama"), local_files_only=True), TESTBED_PROMPT


def hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def measure(policy, context: str, b: int, repeats: int, samplers: list[str], seed: int = 0) -> list[dict]:
    """One row per sampler: sample B after ``context`` with each sampler and the (B × d)·(d × 4d) product, all
    interleaved round by round, min over rounds; every row of this B shares the one reference rate."""
    d = hidden_size(policy.model.config)
    x, w = torch.randn(b, d), torch.randn(d, 4 * d)
    # at least 2 GFLOP a round (~10 ms here): 20 products of a small B took ~1 ms, and the rate moved by a third from
    # one row to the next
    gemm_reps = max(20, round(GEMM_ROUND_FLOPS / (2 * b * d * 4 * d)))
    last = {}

    def sample(sampler: str):
        def run():
            policy.sampler = sampler
            last[sampler] = policy.sample([context], b, seed=seed)
        return run

    def gemm():
        for _ in range(gemm_reps):
            torch.mm(x, w)

    best = interleaved_min({"gemm": gemm, **{sampler: sample(sampler) for sampler in samplers}}, repeats)
    params = policy.model.num_parameters()
    gemm_rate = 2 * b * d * 4 * d * gemm_reps / best["gemm"]
    rows = []
    for sampler in samplers:
        s, seconds = last[sampler], best[sampler]
        steps, tokens = int(s.mask.shape[1]), int(s.mask.sum())
        rows.append({"sampler": sampler, "B": b, "T": policy.max_new_tokens, "steps": steps, "tokens": tokens, "sample_s": seconds,
                     "tokens_per_s": tokens / seconds, "gemm_gflops": gemm_rate / 1e9,
                     "ratio_steps": 2 * params * b * steps / seconds / gemm_rate,
                     "ratio_tokens": 2 * params * tokens / seconds / gemm_rate})
    return rows


MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::addmv", "aten::mv")


MODEL_ARITHMETIC = ("aten::mul", "aten::add", "aten::tanh", "aten::pow", "aten::native_layer_norm", "aten::_log_softmax",
                    "aten::silu", "aten::rsqrt", "aten::mean", "aten::neg")


def is_attention(key: str) -> bool:
    """The fused attention kernels (CPU flash attention, math fallback), not their dispatching wrapper."""
    return key.startswith("aten::_scaled_dot_product") or key == "aten::_efficient_attention_forward"


def kernel_seconds(policy, context: str, b: int, seed: int = 0) -> tuple[float, float, float]:
    """Self CPU seconds of (the matrix products, the attention kernels, MODEL_ARITHMETIC) in one ``sample`` of B rows
    (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    policy.sample([context], b, seed=seed)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        policy.sample([context], b, seed=seed)
    events = prof.key_averages()
    return (sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6,
            sum(e.self_cpu_time_total for e in events if is_attention(e.key)) / 1e6,
            sum(e.self_cpu_time_total for e in events if e.key in MODEL_ARITHMETIC) / 1e6)


def bound(row: dict, policy, context: str) -> dict:
    """``row`` with matmul_s, ratio_bound, attention_s, ratio_bound_attention, arithmetic_s and ratio_bound_model
    (module docstring), profiled with the row's sampler."""
    policy.sampler = row["sampler"]
    matmul, attention, arithmetic = kernel_seconds(policy, context, row["B"])
    work = row["ratio_steps"] * row["sample_s"]
    return {**row, "matmul_s": matmul, "ratio_bound": work / matmul, "attention_s": attention,
            "ratio_bound_attention": work / (matmul + attention), "arithmetic_s": arithmetic,
            "ratio_bound_model": work / (matmul + attention + arithmetic)}


def profile(policy, context: str, b: int, top: int = 25) -> None:
    """torch.profiler's table of one ``sample`` (self CPU time, top ``top`` operators)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    policy.sample([context], b, seed=0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        policy.sample([context], b, seed=0)
        wall = time.perf_counter() - t0
    print(f"profile of sample B={b}: {wall:.3f} s wall")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens of the default model")
    parser.add_argument("--smollm", choices=("prior", "config", "off"), default="prior")
    parser.add_argument("--smollm-batch", type=int, default=16)
    parser.add_argument("--smollm-tokens", type=int, default=64)
    parser.add_argument("--profile", type=int, default=None, metavar="B", help="also print a profile of one sample at B")
    parser.add_argument("--bound", action="store_true", help="also the matrix products' own time and the ratio they allow")
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS), help="one row per sampler (sampling.sampler)")
    args = parser.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    from tiltlm.policies.hf import HFPolicy

    repeats = args.repeats or (1 if args.quick else 3)
    batches = [4, 8] if args.quick else args.batches
    policy = HFPolicy.from_pretrained("default", max_new_tokens=4 if args.quick else args.tokens)
    models = {"default": (policy, "", batches)}  # name -> (policy, context, batch sizes)
    if args.smollm != "off" and not args.quick:
        big, prompt = smollm_policy(args.smollm, args.smollm_tokens)
        models[f"smollm2-135m ({args.smollm})"] = (big, prompt, [args.smollm_batch])
    rows = []
    for name, (lm, context, sizes) in models.items():
        for b in sizes:
            for row in measure(lm, context, b, repeats, args.samplers):
                rows.append({"model": name, **(bound(row, lm, context) if args.bound else row)})
    if args.profile:
        policy.sampler = args.samplers[0]
        profile(policy, "", args.profile)
    columns = ["model", "sampler", "B", "T", "steps", "tokens", "sample_s", "tokens_per_s", "gemm_gflops", "ratio_steps", "ratio_tokens",
               *(("matmul_s", "ratio_bound", "attention_s", "ratio_bound_attention", "arithmetic_s", "ratio_bound_model")
                 if args.bound else ())]
    return emit("sampling", rows, columns, args.json)


if __name__ == "__main__":
    main()
