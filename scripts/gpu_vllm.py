"""The GPU check's vLLM parts: ready, not run on the lent machines (vLLM's wheel, with its own CUDA torch, cannot travel
in the 64 MiB a device call carries, and nothing can be fetched there). scripts/gpu_check.py runs them only with
``--parts vllm`` where ``import vllm`` works:

  train-vllm      kl-pg with ``rollout.generation: vllm`` (tiltlm.train.build.build_generator): per-step seconds,
                  samples/s, reward and KL, ``outside_nucleus``
  sampler:auto    one VLLMGenerator (dtype auto = what training uses): the log-probs vLLM reports for the tokens it drew
                  vs the trainer's recomputed ``Samples.token_logp`` (max and mean |diff| per token and per sequence),
                  the drawn tokens' identity, samples/s of HF sampling vs vLLM sampling, the seconds of one weight sync

A part that fails with a serialisation error is run once more with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (vLLM's V1
engine may refuse to pickle the function VLLMGenerator.sync sends to its workers without it).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from types import SimpleNamespace

from gpu_parts import timed, validated

NOT_RUN = "ready, not run here (its wheel cannot travel)"
RETRY_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
PARTS = ("train-vllm", "sampler:auto")


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


def part_train_vllm(args) -> dict:
    from gpu_parts import run_steps

    return run_steps(validated(args)["train-vllm"], args.device, False)


def part_sampler(args, dtype: str) -> dict:
    import vllm

    from tiltlm.distributed.vllm_backend import VLLMGenerator
    from tiltlm.train.build import build_policies

    policy, _ = build_policies(validated(args)["hf"])
    policy.model.to(args.device)
    gen = VLLMGenerator(policy, **({} if dtype == "auto" else {"dtype": dtype}))
    try:
        engine_dtype = str(getattr(getattr(gen.llm.llm_engine, "model_config", None), "dtype", "unknown"))
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
        agreement = {**logprob_agreement(captured, samples), "outside_nucleus": gen.outside_nucleus}
        policy.sample(contexts, n, seed=10**6)  # warm-up of the HF loop at this batch size
        hf_s, vllm_s, gen_s = [], [], []
        for r in range(args.repeats):  # alternating rounds, min kept
            hf_s.append(timed(lambda: policy.sample(contexts, n, seed=r)))
            clock["generate_s"] = 0.0
            vllm_s.append(timed(lambda: gen.sample(contexts, n, seed=r)))
            gen_s.append(clock["generate_s"])
        rows = len(contexts) * n
        sync_s = timed(gen.sync)
    finally:
        gen.close()
    return {"vllm_dtype_requested": dtype, "vllm_engine_dtype": engine_dtype, "policy_dtype": str(next(policy.model.parameters()).dtype),
            "logprobs": agreement, "rows": rows, "hf_samples_per_s": rows / min(hf_s), "vllm_samples_per_s": rows / min(vllm_s),
            "vllm_generate_only_samples_per_s": rows / min(gen_s), "speedup_vllm_vs_hf": min(hf_s) / min(vllm_s), "sync_s": sync_s}
