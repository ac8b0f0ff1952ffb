"""Generation through vLLM (optional extra, CUDA only): fast sampling, the trainer's model for log-probs.

    generator = VLLMGenerator(policy)          # a vLLM engine on a copy of policy's weights
    samples = generator.sample(contexts, n, seed=step_seed)
    ...optimiser step...
    generator.sync()                           # push the updated weights into the engine

Why the log-probs are recomputed: every importance ratio and KL in tiltlm needs log q(x) of the
distribution that drew x, as the trainer's own model computes it. vLLM's kernels (and its bf16/fp16
weights) give slightly different numbers, and its logprobs are those of the raw logits, not of the
temperature/top-p distribution. So ``Samples.token_logp`` here is always ``policy.log_prob`` of the
tokens vLLM drew. The consequence: vLLM must sample from the *same* transformed distribution the
policy scores — ``temperature`` and ``top_p`` are taken from the policy (never set them separately),
and top-k / min-p / repetition penalties are off. With temperature != 1 or top_p < 1 the trained
quantity is the transformed policy (the same caveat as HFPolicy.sample). Tokens vLLM draws that the
policy's top-p nucleus excludes would get log-prob -inf; rounding at the nucleus boundary can do
this rarely, so ``sample`` reports the count in ``self.outside_nucleus``.

Rows are independent requests, row i seeded from (seed, i): a data-parallel rank can draw its shard
(``rows=``) and get the rows the whole batch would have had, up to vLLM's own batch-dependent
numerics (not bit-exact as HFPolicy.sample is). Not installed by default: pip install "tiltlm[vllm]".
Not exercised on a GPU in tiltlm's CI (no GPU there); the test skips without CUDA and vllm.
"""

from __future__ import annotations

import tempfile

import torch

from tiltlm.envs.rollout import episode_seed
from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Samples, batch_rows


def _vllm():
    try:
        import vllm
    except ImportError:
        raise TiltlmError('vLLM generation needs the package vllm and a CUDA GPU; pip install "tiltlm[vllm]", '
                          "or sample with the policy itself (drop rollout.generation: vllm)") from None
    if not torch.cuda.is_available():
        raise TiltlmError("vLLM generation needs a CUDA GPU and none is visible; sample with the policy itself (drop rollout.generation: vllm)")
    return vllm


def _load_weights_in_worker(worker, state):  # runs inside a vLLM worker (LLM.collective_rpc)
    worker.model_runner.model.load_weights(weights=list(state.items()))


class VLLMGenerator:
    """Samples for ``policy`` (an HFPolicy) drawn by a vLLM engine that holds a copy of its weights."""

    def __init__(self, policy, *, gpu_memory_utilization: float = 0.3, dtype: str = "auto", **engine_options):
        vllm = _vllm()
        if hasattr(policy.model, "merge_and_unload"):
            raise TiltlmError("vLLM generation of a LoRA policy is not supported; train full weights or drop rollout.generation: vllm")
        self.policy, self.vllm = policy, vllm
        self._dir = tempfile.TemporaryDirectory(prefix="tiltlm-vllm-")
        policy.save(self._dir.name)  # the engine starts from the policy's current weights
        self.llm = vllm.LLM(model=self._dir.name, tokenizer=self._dir.name, gpu_memory_utilization=gpu_memory_utilization,
                            dtype=dtype, seed=0, **engine_options)
        self.outside_nucleus = 0
        # the Policy attributes the loop reads of a sampler
        self.vocab_size, self.eos_id, self.max_new_tokens = policy.vocab_size, policy.eos_id, policy.max_new_tokens
        self.pad_id = policy.pad_id

    def sync(self) -> None:
        """Copy the policy's current weights into the engine (after every optimiser step)."""
        state = {k: v.detach() for k, v in self.policy.model.state_dict().items()}
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        model = getattr(getattr(getattr(executor, "driver_worker", None), "model_runner", None), "model", None)
        if model is not None:  # vLLM's V0 engine: the model lives in this process
            model.load_weights(weights=list(state.items()))
        else:  # V1 engine: load inside each worker
            self.llm.collective_rpc(_load_weights_in_worker, args=(state,))

    @torch.no_grad()
    def sample(self, contexts: list[str], n: int, *, seed: int | None = None, rows: range | None = None) -> Samples:
        """Like HFPolicy.sample; token_logp is recomputed by the policy (module docstring)."""
        p = self.policy
        seed = int(seed if seed is not None else torch.seed() % 2**31)
        group, rows = batch_rows(len(contexts), n, rows)
        prompts, params = [], []
        for i, g in zip(rows, group.tolist()):
            prompts.append({"prompt_token_ids": p.encode_context(contexts[g])})
            params.append(self.vllm.SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, top_k=-1, min_p=0.0,
                                                   max_tokens=p.max_new_tokens, seed=episode_seed(seed, i) % 2**31,
                                                   stop_token_ids=[p.eos_id], ignore_eos=False, detokenize=False))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        b, width = len(prompts), 1
        rows_ids = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)[: p.max_new_tokens]
            if out.outputs[0].finish_reason == "stop" and (not ids or ids[-1] != p.eos_id) and len(ids) < p.max_new_tokens:
                ids.append(p.eos_id)  # the EOS that ended the row is part of x (policies/base.py)
            rows_ids.append(ids)
            width = max(width, len(ids))
        ids = torch.full((b, width), p.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.bool)
        for k, row in enumerate(rows_ids):
            ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[k, : len(row)] = True
        context_ids, context_attn = p.contexts_tensor(contexts, group)
        samples = Samples(contexts=list(contexts), group=group, context_ids=context_ids, context_attn=context_attn,
                          ids=ids, attn=mask.clone(), mask=mask, token_logp=torch.zeros((b, width)),
                          texts=p.texts_of(ids, mask), eos=((ids == p.eos_id) & mask).any(-1))
        samples.token_logp = p.log_prob(samples, per_token=True).float().cpu()  # the trainer's model, not vLLM's numbers
        self.outside_nucleus += int(torch.isinf(samples.token_logp).any(-1).sum())
        return samples

    def log_prob(self, samples: Samples, *, grad: bool = False, per_token: bool = False) -> torch.Tensor:
        return self.policy.log_prob(samples, grad=grad, per_token=per_token)

    def close(self) -> None:
        self._dir.cleanup()
