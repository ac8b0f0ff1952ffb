"""Goal 1: one full training step of tiltlm vs a bare-torch floor vs TRL's RLOOTrainer (CPU, default GPT-2).

    python benchmarks/step_throughput.py --threads 1 [--sizes 16x32 64x32] [--algorithms kl-pg dpg] [--no-trl]

A step = sample B sequences of up to T new tokens (one context), score reward and target (one
forward of the frozen reference), one forward+backward of the loss, one clipped Adam step.

- tiltlm: ``Trainer.train_step`` exactly as a run calls it, metrics included (diversity on).
- floor:  the same work written directly: ``model.generate`` (KV cache, top_k=0), one no-grad
          forward of the reference, one forward+backward of the algorithm's loss, clip, Adam.
          No metrics, no checks: what the hardware needs for this step.
- TRL:    ``trl.RLOOTrainer`` (beta > 0, so it scores the reference too) with num_generations = B
          completions of one prompt per step; a step is timed from on_step_begin to on_step_end
          (generation, scoring, loss, backward, optimiser; its logging falls outside). TRL has no
          DPG: the TRL column of the dpg rows is the same RLOO step (same samples, same work shape).

All three run interleaved in one process (the floor and tiltlm steps run between TRL's steps) and
the minimum over rounds is kept; ratios are tiltlm/floor (<= 1.3 wanted) and tiltlm/TRL samples/s
(>= 2 wanted). Reward: r(x) = count of "e" in the text, a pure-Python string reward for all three.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_common_args,
    emit,
    interleaved_min,
    make_trl_trainer,
    quiet_transformers,
    set_threads,
)

REWARD_SPEC, LETTER, BETA, LR = "count:e", "e", 1.0, 1e-4


def reward_fn(texts: list[str]) -> list[float]:
    return [float(t.count(LETTER)) for t in texts]


def make_trainer(algorithm: str, b: int, t: int, *, diversity: bool = True, seed: int = 0):
    """A tiltlm Trainer for the default model, one context, n_per_context = b, max_new_tokens = t."""
    from tiltlm.train.build import build
    from tiltlm.train.config import parse_config
    from tiltlm.train.loop import Trainer

    config = parse_config({
        "prior": "default", "target": {"reward": REWARD_SPEC, "beta": BETA}, "algorithm": {"name": algorithm},
        "sampling": {"contexts": [""], "n_per_context": b, "max_new_tokens": t},
        "optim": {"steps": 10**6, "lr": LR}, "metrics": {"diversity": diversity}, "seed": seed,
    })
    policy, target = build(config)
    return Trainer(config, policy=policy, target=target)


class Floor:
    """The step written directly against transformers and torch (the cost the hardware sets)."""

    def __init__(self, algorithm: str, b: int, t: int, seed: int = 0):
        from tiltlm.policies.hf import load_model_and_tokenizer

        self.algorithm, self.b, self.t = algorithm, b, t
        self.model, self.tokenizer = load_model_and_tokenizer("default")
        self.ref, _ = load_model_and_tokenizer("default")
        self.ref.requires_grad_(False)
        self.model.eval(), self.ref.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=LR)
        self.eos = int(self.tokenizer.eos_token_id)
        self.bos = int(self.tokenizer.bos_token_id)
        self.log_w_sum, self.n_seen = -math.inf, 0  # dpg's running log Z
        self.gen = dict(do_sample=True, max_new_tokens=t, top_k=0, top_p=1.0, temperature=1.0,
                        pad_token_id=self.eos, eos_token_id=self.eos, use_cache=True)
        torch.manual_seed(seed)

    @staticmethod
    def _token_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)

    def step(self) -> None:
        b = self.b
        prompt = torch.full((b, 1), self.bos, dtype=torch.long)
        with torch.no_grad():
            out = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **self.gen)  # (B, 1+t)
        gen = out[:, 1:]
        is_eos = (gen == self.eos).long()
        mask = (is_eos.cumsum(-1) - is_eos) == 0  # up to and including the first EOS
        texts = self.tokenizer.batch_decode([row[m & (row != self.eos)].tolist() for row, m in zip(gen, mask)])
        reward = torch.tensor(reward_fn(texts), dtype=torch.float64)
        attn = torch.cat([torch.ones_like(prompt, dtype=torch.bool), mask], 1).long()
        with torch.no_grad():
            ref_logp = (self._token_logp(self.ref(input_ids=out, attention_mask=attn).logits[:, :-1], gen) * mask).sum(-1).double()
        logp = (self._token_logp(self.model(input_ids=out, attention_mask=attn).logits[:, :-1], gen) * mask).sum(-1)
        logq = logp.detach().double()
        if self.algorithm == "kl-pg":  # RLOO on r - beta (log pi - log pi0)
            shaped = reward - BETA * (logq - ref_logp)
            adv = shaped - (shaped.sum() - shaped) / (b - 1)
            loss = -(adv.float() * logp).mean()
        else:  # dpg: -mean(P/(Z q) log pi) with the running IS estimate of Z
            log_w = ref_logp + reward / BETA - logq
            self.log_w_sum = float(torch.logaddexp(torch.tensor(self.log_w_sum, dtype=torch.float64), torch.logsumexp(log_w, 0)))
            self.n_seen += b
            weight = torch.exp((log_w - (self.log_w_sum - math.log(self.n_seen))).clamp(max=80))
            loss = -(weight.float() * logp).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()


def make_trl(b: int, t: int, steps: int, out_dir: str, on_step_end):
    """An RLOOTrainer on the default model (common.make_trl_trainer); ``on_step_end`` runs between its steps (untimed)."""
    from transformers import AutoTokenizer, TrainerCallback

    from tiltlm.policies.hf import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)
            on_step_end()

    trainer = make_trl_trainer("rloo", str(DEFAULT_MODEL_DIR), tokenizer, [tokenizer.bos_token] * (steps + 4), b=b, t=t, steps=steps,
                               out_dir=out_dir, reward_fn=reward_fn, beta=BETA, lr=LR, callbacks=[Timer()])
    return trainer, times


def measure(b: int, t: int, algorithms: list[str], repeats: int, use_trl: bool) -> list[dict]:
    """Rows for one (B, T): each algorithm's tiltlm and floor step, plus TRL's RLOO step, interleaved."""
    fns = {}
    for algo in algorithms:
        trainer, floor = make_trainer(algo, b, t), Floor(algo, b, t)
        fns[f"tiltlm/{algo}"] = trainer.train_step
        fns[f"floor/{algo}"] = floor.step
    trl_error = None
    if use_trl:
        best = {name: math.inf for name in fns}
        rounds = {"n": 0}

        def between():  # one round of floor + tiltlm steps between two TRL steps
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if rounds["n"] > 0:  # the first round is a warm-up
                    best[name] = min(best[name], time.perf_counter() - t0)
            rounds["n"] += 1

        try:
            with tempfile.TemporaryDirectory() as tmp:
                trainer, times = make_trl(b, t, repeats + 1, tmp, between)
                trainer.train()
            trl_s = min(times[1:]) if len(times) > 1 else math.inf
        except Exception as e:  # noqa: BLE001 - report exactly what failed and keep the other columns
            trl_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            trl_s = math.nan
            best = interleaved_min(fns, repeats)
        if rounds["n"] and any(math.isinf(v) for v in best.values()):
            best.update({k: v for k, v in interleaved_min(fns, repeats).items() if math.isinf(best[k])})
    else:
        best, trl_s = interleaved_min(fns, repeats), math.nan
    rows = []
    for algo in algorithms:
        tl, fl = best[f"tiltlm/{algo}"], best[f"floor/{algo}"]
        row = {"algorithm": algo, "B": b, "T": t, "tiltlm_s": tl, "floor_s": fl, "trl_s": trl_s,
               "tiltlm_samples_per_s": b / tl, "floor_samples_per_s": b / fl, "trl_samples_per_s": b / trl_s if trl_s else math.nan,
               "ratio_vs_floor": tl / fl, "speedup_vs_trl": trl_s / tl, "threads": torch.get_num_threads(), "repeats": repeats}
        if trl_error:
            row["trl_error"] = trl_error
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--sizes", nargs="+", default=None, help="BxT pairs, e.g. 16x32 64x32")
    parser.add_argument("--algorithms", nargs="+", default=["kl-pg", "dpg"])
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL column (it needs `pip install -e .[bench]`)")
    args = parser.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    sizes = args.sizes or (["4x8"] if args.quick else ["16x32", "64x32"])
    repeats = args.repeats or (2 if args.quick else 7)
    use_trl = not args.no_trl
    if use_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed (pip install -e '.[bench]'): skipping the TRL column", file=sys.stderr)
            use_trl = False
    rows = []
    for size in sizes:
        b, t = (int(v) for v in size.lower().split("x"))
        rows += measure(b, t, args.algorithms, repeats, use_trl)
    columns = ["algorithm", "B", "T", "threads", "floor_s", "tiltlm_s", "trl_s", "ratio_vs_floor", "tiltlm_samples_per_s",
               "trl_samples_per_s", "speedup_vs_trl"]
    return emit("step_throughput", rows, columns, args.json, goals={"ratio_vs_floor_max": 1.3, "speedup_vs_trl_min": 2.0})


if __name__ == "__main__":
    main()
