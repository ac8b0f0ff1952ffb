"""The smallest end-to-end experiment: the posterior p* of a prior tilted by a reward, by inference alone.

Two parts, written into one results directory:
1. the embedded default LM (or any prior) tilted by a reward: sample pi0, weight by exp(r/beta),
   estimate log Z and KL(p*||pi0) with intervals, and show posterior samples by importance
   resampling beside prior samples;
2. the same question on an enumerable testbed, where the exact answer is computed and shown beside
   the importance-sampling estimates at growing sample sizes.
The training algorithms (issue: one loop, every algorithm) build on exactly these pieces.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, exact_report
from tiltlm.metrics import kl_target_policy, log_z
from tiltlm.policies import HFPolicy, Samples
from tiltlm.targets import Prior, Target, Tilt
from tiltlm.testbed import make_testbed


def importance_resample(samples: Samples, log_weights: torch.Tensor, k: int, seed: int) -> Samples:
    """k draws with replacement from the samples with probability ∝ exp(log_weights)."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(log_weights.double(), 0)
    return samples.select(torch.multinomial(probs, k, replacement=True, generator=gen))


def posterior_summary(target: Target, samples: Samples, *, show: int, seed: int) -> dict:
    """IS estimates from samples of the prior itself (proposal = pi0), and prior vs posterior texts."""
    log_prior = samples.logp.double()
    log_target = target.log_score(samples, prior_logp=log_prior)
    rewards = target.tilt.reward(samples.texts, [samples.context_of(i) for i in range(len(samples))])
    log_w = log_target - log_prior
    lz = log_z(log_target, log_prior)
    kl = kl_target_policy(log_target, log_prior, log_prior)
    weights = torch.softmax(log_w, 0)
    posterior = importance_resample(samples, log_w, show, seed)
    return {
        "n_samples": len(samples),
        "log_z": lz.as_dict(),
        "kl_target_prior": kl.as_dict(),
        "reward_prior": float(rewards.mean()),
        "reward_target_snis": float((weights * rewards).sum()),
        "prior_texts": samples.texts[:show],
        "posterior_texts": posterior.texts,
    }


def testbed_comparison(out: Path, *, reward: str, beta: float, max_new_tokens: int, sizes: list[int], seed: int) -> dict:
    """Exact ground truth on a trained 2-layer testbed beside IS estimates with growing n."""
    directory = make_testbed(out / "testbed_model", vocab_size=6, n_layer=2, seed=seed, train_steps=150)
    prior = HFPolicy.from_pretrained(directory, max_new_tokens=max_new_tokens)
    target = Prior(prior) * Tilt(reward, beta)
    space = enumerate_space(prior)
    exact = exact_report(space, target)
    rows = []
    for i, n in enumerate(sizes):
        s = prior.sample([""], n, seed=seed + 1 + i)
        log_prior = s.logp.double()
        log_target = target.log_score(s, prior_logp=log_prior)
        rows.append({"n": n, "log_z": log_z(log_target, log_prior).as_dict(),
                     "kl_target_prior": kl_target_policy(log_target, log_prior, log_prior).as_dict()})
    return {"reward": reward, "beta": beta, "max_new_tokens": max_new_tokens, "exact": exact, "estimates": rows}


def run_posterior_experiment(
    out: str | Path,
    *,
    prior: str = "default",
    reward="sentiment",  # a spec string or any callable f(texts, **kwargs) -> list[float]
    beta: float = 0.2,
    context: str = "",
    n: int = 256,
    max_new_tokens: int = 48,
    seed: int = 0,
    testbed_reward: str = "count:a",
    overwrite: bool = False,
) -> dict:
    """Run both parts and write ``results.json`` + ``samples.jsonl`` + ``config.json`` into ``out`` atomically."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TiltlmError(f"output directory '{out}' is not empty; pass --overwrite or choose another --out")
    if n < 2:
        raise TiltlmError(f"need at least 2 samples (got {n}); raise --budget")
    start = time.time()
    tilt = Tilt(reward, beta)
    policy = HFPolicy.from_pretrained(prior, max_new_tokens=max_new_tokens)
    target = Prior(policy) * tilt
    config = {"prior": prior, "reward": tilt.reward.name, "beta": beta, "context": context, "n": n,
              "max_new_tokens": max_new_tokens, "seed": seed, "testbed_reward": testbed_reward}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        samples = policy.sample([context], n, seed=seed)
        lm = posterior_summary(target, samples, show=8, seed=seed)
        testbed = testbed_comparison(work, reward=testbed_reward, beta=1.0, max_new_tokens=6,
                                     sizes=[max(16, n // 16), max(64, n // 2), 4 * n], seed=seed)
        results = {"config": config, "lm": lm, "testbed": testbed, "seconds": time.time() - start}
        (work / "config.json").write_text(json.dumps(config, indent=2))
        (work / "results.json").write_text(json.dumps(results, indent=2))
        with open(work / "samples.jsonl", "w") as f:
            log_target = target.log_score(samples, prior_logp=samples.logp)
            for text, lp, lt in zip(samples.texts, samples.logp.tolist(), log_target.tolist()):
                f.write(json.dumps({"text": text, "log_prior": lp, "log_target_unnormalised": lt}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return results

