"""Sample efficiency: exact KL to p* after a budget of samples, tiltlm's algorithms vs TRL's RLOOTrainer (CPU).

    python benchmarks/sample_efficiency.py --budgets 2048 8192 32768 --seeds 0 1 2 \\
        --methods kl-pg dpg gdc++ "dpg@schedule=linear,lr=1e-3" --json benchmarks/results/sample_efficiency.json

Testbed: a small GPT-2 (``tiltlm.testbed.make_testbed``: 4 letters + EOS, fitted to a random Markov
chain so pi0 is not uniform), one context (just BOS), sequences of at most 4 new tokens (341 in all),
target p* ∝ pi0·exp(count:a / 1). Each run spends ``budget`` samples at 64 per step.

- tiltlm: ``tiltlm.train.fit`` (the path `tiltlm train` takes) with the algorithm's and the optimiser's
  **defaults**; the config sets only the prior, the target, the context, 64 samples per step, the
  4-token length, optim.steps = budget / 64 and the seed. A method ``algo@key=value,...`` overrides
  options: keys of ``optim`` (lr, schedule, grad_clip, warmup_steps, optimizer, minibatch_size) go there, the rest
  are the algorithm's (e.g. ``dpg@log_z=global``); ``grad_clip=null`` disables clipping.
- TRL: ``trl.RLOOTrainer`` (and ``trl.GRPOTrainer``, its defaults: std-scaled advantages, k3 in the loss) on the same model, prompt (BOS), reward, beta and 64 completions per step
  (KL in the reward, leave-one-out baseline: the objective of kl-pg), TRL's other defaults (AdamW,
  linear decay, max_grad_norm 1). Its lr is tuned on the smallest budget over ``--trl-grid`` (lowest
  mean KL(pi||p*) over the seeds) and then kept for every budget.

Every saved policy is then scored by enumeration (``tiltlm.exact``, as `tiltlm exact --policy`):
KL(pi||p*) (kl-pg's and RLOO's objective) and KL(p*||pi) (DPG's). Rows report the mean and the
min–max over seeds, the training wall-clock, and for tiltlm runs the pre-clip gradient norm
(median, and the fraction of steps where clipping bound). ``--resume`` keeps the rows already in
``--json`` and runs only the missing (method, budget, seed) cells.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, quiet_transformers, set_threads

TESTBED = {"vocab_size": 5, "n_layer": 2, "n_embd": 32, "n_head": 2, "seed": 0, "train_steps": 200}
QUICK_TESTBED = {**TESTBED, "train_steps": 20}
MAX_NEW_TOKENS, REWARD_SPEC, LETTER, BETA, PER_STEP = 4, "count:a", "a", 1.0, 64
OPTIM_KEYS = {"lr", "schedule", "grad_clip", "warmup_steps", "optimizer", "weight_decay", "minibatch_size"}
TRL_GRID = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]


def parse_method(spec: str) -> tuple[str, dict, dict]:
    """``algo@k=v,k=v`` -> (algorithm, optim overrides, algorithm options); values are YAML scalars."""
    name, _, rest = spec.partition("@")
    optim, options = {}, {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"method '{spec}': option '{item}' needs a value (key=value)")
        (optim if key in OPTIM_KEYS else options)[key] = yaml.safe_load(value)
    return name, optim, options


def tiltlm_config(spec: str, prior: Path, steps: int, seed: int, per_step: int):
    """The TrainConfig of a method spec on the testbed: prior, target, context, samples per step, length, steps and
    seed; everything else (lr, schedule, clipping, ...) is the library's default unless the spec overrides it."""
    from tiltlm.train.config import parse_config

    name, optim, options = parse_method(spec)
    return parse_config({
        "prior": str(prior), "target": {"reward": REWARD_SPEC, "beta": BETA}, "algorithm": {"name": name, **options},
        "sampling": {"contexts": [""], "n_per_context": per_step, "max_new_tokens": MAX_NEW_TOKENS},
        "optim": {"steps": steps, **optim}, "seed": seed,
    })


def tiltlm_run(spec: str, prior: Path, budget: int, seed: int, per_step: int, out: Path) -> dict:
    """Train through tiltlm.train.fit; returns the policy directory, seconds and gradient-norm statistics."""
    from tiltlm.train.build import fit

    config = tiltlm_config(spec, prior, budget // per_step, seed, per_step)
    t0 = time.perf_counter()
    _, rows = fit(config, out)
    seconds = time.perf_counter() - t0
    norms = [r["grad/norm"] for r in rows if "grad/norm" in r]
    clip = config.optim.grad_clip
    stats = {"seconds": seconds, "policy": out / "policy"}
    if norms:
        stats.update(grad_norm_median=statistics.median(norms), grad_norm_last=norms[-1],
                     clip_fraction=sum(n > clip for n in norms) / len(norms) if clip else 0.0)
    return stats


def trl_trainer(lr: float, prior: Path, steps: int, seed: int, per_step: int, out: Path, callbacks=None, kind: str = "rloo"):
    """TRL's RLOOTrainer (``kind`` rloo) or GRPOTrainer (grpo) with ``per_step`` completions of BOS per step, beta = the
    tilt's, ``lr``, ``steps`` steps; everything else TRL's defaults (GRPO: std-scaled group advantages, k3 in the loss)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    Config, Trainer = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)

    tokenizer = AutoTokenizer.from_pretrained(prior)

    def reward(completions, **kwargs):
        return [float(c.count(LETTER)) for c in completions]

    args = Config(
        output_dir=str(out), per_device_train_batch_size=per_step, num_generations=per_step, max_completion_length=MAX_NEW_TOKENS,
        beta=BETA, learning_rate=lr, max_steps=steps, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, seed=seed, temperature=1.0, top_p=1.0, top_k=0, dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"prompt": [tokenizer.bos_token] * (steps + 4)})
    return Trainer(model=str(prior), reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer,
                   callbacks=callbacks)


def trl_run(lr: float, prior: Path, budget: int, seed: int, per_step: int, out: Path, kind: str = "rloo") -> dict:
    """trl_trainer trained for ``budget`` samples; the policy saved to out/policy."""
    trainer = trl_trainer(lr, prior, budget // per_step, seed, per_step, out, kind=kind)
    tokenizer, args = trainer.processing_class, trainer.args
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.model.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    return {"seconds": seconds, "policy": out / "policy", "lr_schedule": args.lr_scheduler_type.value
            if hasattr(args.lr_scheduler_type, "value") else str(args.lr_scheduler_type)}


class ExactScorer:
    """The enumerated space of the testbed and p* on it; scores a saved policy exactly."""

    def __init__(self, prior: Path):
        from tiltlm.exact import enumerate_space, exact_report
        from tiltlm.policies import HFPolicy
        from tiltlm.rewards import get_reward
        from tiltlm.targets import Prior, Tilt

        self._report, self._load = exact_report, lambda d: HFPolicy.from_pretrained(d, max_new_tokens=MAX_NEW_TOKENS)
        pi0 = self._load(prior)
        self.space = enumerate_space(pi0, context="")
        self.target = Prior(pi0) * Tilt(get_reward(REWARD_SPEC), BETA)
        self.prior_report = exact_report(self.space, self.target)

    def __call__(self, policy_dir: Path) -> dict:
        return self.score(self._load(policy_dir))

    def live(self, model, tokenizer) -> dict:
        """Score a model being trained, as it is now (eval mode and no grad for the enumeration, then its mode back)."""
        import torch

        from tiltlm.policies import HFPolicy

        was_training = model.training
        model.train(False)
        try:
            with torch.no_grad():
                return self.score(HFPolicy(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS))
        finally:
            model.train(was_training)

    def score(self, policy) -> dict:
        """KL(pi||p*), KL(p*||pi) and E_pi[reward] of a policy (an HFPolicy, or anything tiltlm.exact enumerates)."""
        r = self._report(self.space, self.target, policy)
        return {"kl_policy_target": r["kl_policy_target"], "kl_target_policy": r["kl_target_policy"],
                "reward_policy": r["reward_policy"]}


def one_cell(method: str, budget: int, seed: int, prior: Path, score: ExactScorer, per_step: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if method.startswith(("trl-rloo@lr=", "trl-grpo@lr=")):
            kind = method[4:8]
            stats = trl_run(float(method.split("=", 1)[1]), prior, budget, seed, per_step, Path(tmp) / "run", kind=kind)
        else:
            stats = tiltlm_run(method, prior, budget, seed, per_step, Path(tmp) / "run")
        row = {"method": method, "budget": budget, "seed": seed, **score(stats.pop("policy")), **stats}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (method, budget): mean and min–max over seeds of each KL, mean seconds."""
    out = {}
    for r in rows:
        out.setdefault((r["method"], r["budget"]), []).append(r)
    table = []
    for (method, budget), group in out.items():
        row = {"method": method, "budget": budget, "seeds": len(group)}
        for key in ("kl_policy_target", "kl_target_policy", "seconds", "clip_fraction", "grad_norm_median"):
            values = [g[key] for g in group if key in g]
            if values:
                row[key] = statistics.fmean(values)
                if key.startswith("kl"):
                    row[key + "_min"], row[key + "_max"] = min(values), max(values)
        table.append(row)
    return sorted(table, key=lambda r: (r["budget"], r["method"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two steps per run, one seed, a barely fitted testbed (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (and read them with --resume)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json; run only the missing cells")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="samples per run (multiples of --per-step)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--per-step", type=int, default=PER_STEP)
    parser.add_argument("--methods", nargs="+", default=["kl-pg", "dpg", "gdc++"], help="tiltlm methods: algo[@k=v,...]")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--trl-grid", type=float, nargs="+", default=None, help="TRL lrs tried at the smallest budget")
    parser.add_argument("--trl-lr", type=float, default=None, help="skip the tuning: TRL RLOO's lr")
    parser.add_argument("--trl-grpo-lr", type=float, default=None, help="skip the tuning: TRL GRPO's lr")
    parser.add_argument("--trl-trainers", nargs="+", default=["rloo", "grpo"], choices=["rloo", "grpo"])
    parser.add_argument("--testbed-dir", type=Path, default=None, help="where the testbed model is kept (default: a temp dir)")
    args = parser.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    budgets = sorted(args.budgets or ([2 * args.per_step] if args.quick else [2048, 8192, 32768]))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    use_trl = not args.no_trl
    if use_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed (pip install -e '.[bench]'): skipping the TRL rows", file=sys.stderr)
            use_trl = False
    rows: list[dict] = []
    if args.resume and args.json is not None and args.json.is_file():
        rows = json.loads(args.json.read_text()).get("runs", [])
    done = {(r["method"], r["budget"], r["seed"]) for r in rows}

    from tiltlm.testbed import make_testbed

    with tempfile.TemporaryDirectory() as tmp:
        spec = QUICK_TESTBED if args.quick else TESTBED
        prior = make_testbed(args.testbed_dir or Path(tmp) / "testbed", **spec)
        score = ExactScorer(prior)

        def run(method: str, budget: int, seed: int) -> None:
            if (method, budget, seed) not in done:
                rows.append(one_cell(method, budget, seed, prior, score, args.per_step))
                done.add((method, budget, seed))
                if args.json is not None:  # after every cell: a long run can be resumed
                    args.json.write_text(json.dumps({"runs": rows}, indent=1))

        for budget in budgets:
            for method in args.methods:
                for seed in seeds:
                    run(method, budget, seed)
        trl_lr, grid = {"rloo": args.trl_lr, "grpo": args.trl_grpo_lr}, None
        for kind in args.trl_trainers if use_trl else ():
            if trl_lr[kind] is None:  # tuned on the smallest budget, then kept
                grid = args.trl_grid or (TRL_GRID[2:3] if args.quick else TRL_GRID)
                for lr in grid:
                    for seed in seeds:
                        run(f"trl-{kind}@lr={lr:g}", budgets[0], seed)
                mean_kl = {lr: statistics.fmean(r["kl_policy_target"] for r in rows if r["method"] == f"trl-{kind}@lr={lr:g}"
                                                and r["budget"] == budgets[0]) for lr in grid}
                trl_lr[kind] = min(mean_kl, key=mean_kl.get)
            for budget in budgets:
                for seed in seeds:
                    run(f"trl-{kind}@lr={trl_lr[kind]:g}", budget, seed)
        prior_report = {k: score.prior_report[k] for k in ("n_sequences", "log_z", "kl_target_prior", "kl_prior_target",
                                                            "reward_prior", "reward_target")}
    table = summarise(rows)
    columns = ["budget", "method", "kl_policy_target", "kl_policy_target_min", "kl_policy_target_max", "kl_target_policy",
               "kl_target_policy_min", "kl_target_policy_max", "seconds", "clip_fraction", "grad_norm_median"]
    payload = emit("sample_efficiency", table, columns, None, testbed={**spec, "max_new_tokens": MAX_NEW_TOKENS,
                   "reward": REWARD_SPEC, "beta": BETA, **prior_report}, per_step=args.per_step, trl_lr=trl_lr, trl_grid=grid,
                   runs=rows)
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
