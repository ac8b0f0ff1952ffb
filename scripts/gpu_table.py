"""The GPU check's printed table (scripts/gpu_check.py): one row per measurement, from the summary JSON's parts."""

from __future__ import annotations


def f(x, spec: str = ".3g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def mb(x) -> str:
    return "n/a (CPU)" if x is None else f"{x:.0f} MB"


def _hf(r: dict) -> list[tuple[str, str]]:
    lp, draws = r["bf16_vs_float32_logprobs"], r["bf16_vs_float32_draws"]
    rows = [("hf log-probs", f"bf16 autocast vs float32 on float32's {lp['tokens_compared']} tokens: |diff| per token max "
                             f"{f(lp['token_max_abs_diff'])} mean {f(lp['token_mean_abs_diff'])}, per sequence max "
                             f"{f(lp['seq_max_abs_diff'])}; same seed: {f(100 * draws['same_rows'], '.0f')}% rows, "
                             f"{f(100 * draws['same_tokens'], '.0f')}% tokens identical; float32 recorded vs recomputed max "
                             f"{f(r['recorded_vs_recomputed_float32']['token_max_abs_diff'])}")]
    for name in ("float32", "bf16"):
        t, s = r["train"][name], r["sampling"][name]
        rows.append((f"hf {name}", f"sampling {f(s['samples_per_s'])} samples/s ({r['rows']} rows); kl-pg {t['steps']} steps: "
                                   f"{f(t['samples_per_s'])} samples/s (step {f(t['step_s_median'])} s, first {f(t['first_step_s'])} s), "
                                   f"peak {mb(t['peak_mb'])}, losses finite: {t['all_finite']}"))
    return rows


def _grpo(name: str, r: dict) -> list[tuple[str, str]]:
    extra = f", trl {r['trl']}, loss_type {r['loss_type']}" if "trl" in r else ""
    return [(name, f"{r['steps']} steps: {f(r['samples_per_s'])} samples/s (step {f(r['step_s_median'])} s), "
                   f"peak {mb(r['peak_mb'])}, mean length {f(r.get('mean_length'))} tokens{extra}")]


def _dist(r: dict) -> list[tuple[str, str]]:
    runs = r["runs"]
    return [("dist", f"backend {r['backend']}, nccl {r['nccl_version']}, all_reduce {'ok' if r['all_reduce_ok'] else 'WRONG'}; "
                     f"max |w - w_one process| after {len(runs['single']['losses'])} steps: replicate "
                     f"{f(runs['replicate']['max_abs_weight_diff_vs_single'])}, fsdp {f(runs['fsdp']['max_abs_weight_diff_vs_single'])}")]


def _vllm(name: str, r: dict) -> list[tuple[str, str]]:
    if "logprobs" in r:
        lp = r["logprobs"]
        return [(name, f"engine {r['vllm_engine_dtype']}: |log p diff| per token max {f(lp.get('token_max_abs_diff'))}; samples/s "
                       f"HF {f(r['hf_samples_per_s'])}, vLLM {f(r['vllm_samples_per_s'])}")]
    return [(name, f"{r['steps']} steps: {f(r['samples_per_s'])} samples/s")]


ROWS = {"hf": _hf, "grpo-tiltlm": lambda r: _grpo("grpo tiltlm", r), "grpo-trl": lambda r: _grpo("grpo TRL", r), "dist": _dist,
        "train-vllm": lambda r: _vllm("train-vllm", r), "sampler:auto": lambda r: _vllm("sampler:auto", r)}


def table(report: dict) -> str:
    e, m = report["environment"], report.get("model", {})
    rows = [("machine", f"{e.get('gpu')} | torch {e.get('torch')} (CUDA {e.get('cuda')}) | transformers {e.get('transformers')} | "
                        f"trl {e.get('trl')} | tiltlm {e.get('tiltlm_commit') or e.get('tiltlm')} from {e.get('tiltlm_from')}"),
            ("model", f"{m.get('model')}: {f(m.get('parameters'))} parameters, random weights" if m.get("parameters") else str(m.get("dir")))]
    for part, r in report["parts"].items():
        if r["ok"] is None:
            rows.append((part, r["status"]))
        elif not r["ok"]:
            rows.append((part, f"FAILED ({r.get('returncode')}) after {f(r['seconds'])} s: {r.get('error')}"))
        else:
            rows += ROWS[part](r)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
