"""The GPU check's vLLM parts (scripts/gpu_vllm.py: ready, not run on the lent machines, whose calls cannot carry vLLM's
wheel): vLLM's reported log-probs against the trainer's, and the sampler part against a stand-in for vLLM on the CPU."""

import sys
from types import SimpleNamespace

import pytest
import torch

from test_gpu_script import _load


@pytest.fixture(scope="module")
def gc():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _load("gpu_model").write_model(tmp_path_factory.mktemp("model"), "stand-in")
    return ["--prior", str(model), "--contexts", "", "--reward", "count:a", "--beta", "1", "--n-per-context", "4",
            "--max-new-tokens", "4", "--sampler-n", "4", "--repeats", "1", "--device", "cpu"]


def test_vllm_logprob_agreement():
    gv = _load("gpu_vllm")
    ids = torch.tensor([[3, 1, 0], [2, 2, 0]])
    samples = SimpleNamespace(ids=ids, mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
                              token_logp=torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]]))

    def out(tokens, lps):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=[{t: SimpleNamespace(logprob=v)} for t, v in zip(tokens, lps)])])

    r = gv.logprob_agreement([out([3, 1], [-1.1, -2.0]), out([2, 2, 0], [-0.5, -0.7, -1.0])], samples)
    assert r["rows_compared"] == 2 and r["tokens_compared"] == 5 and r["rows_with_other_tokens"] == 0
    assert r["token_max_abs_diff"] == pytest.approx(0.2) and r["token_mean_abs_diff"] == pytest.approx(0.3 / 5)
    r = gv.logprob_agreement([out([1, 1], [-1.0, -2.0])], samples)  # other tokens than the samples' row: not compared
    assert r["rows_with_other_tokens"] == 1 and r["tokens_compared"] == 0


class _FakeLLM:
    """Stands in for vllm.LLM: draws random non-EOS tokens per request seed, reports log-prob -1 for each."""

    def __init__(self, model, tokenizer, gpu_memory_utilization, dtype, seed, **options):
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=dtype))

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for p in params:
            assert p.logprobs == 0  # the check asks vLLM for the drawn token's log-prob
            g = torch.Generator().manual_seed(p.seed)
            free = [t for t in range(5, 20) if t != p.stop_token_ids[0]]
            ids = [free[int(i)] for i in torch.randint(0, len(free), (p.max_tokens,), generator=g)]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="length",
                                                                 logprobs=[{t: SimpleNamespace(logprob=-1.0)} for t in ids])]))
        return outs

    def collective_rpc(self, fn, args=()):  # VLLMGenerator.sync
        pass


def test_vllm_sampler_part_against_a_stand_in(gc, tiny, monkeypatch):
    gv = _load("gpu_vllm")
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=_FakeLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # VLLMGenerator's guard; nothing here touches CUDA
    r = gv.part_sampler(gc.parse_args(tiny), "float32")
    lp = r["logprobs"]
    assert r["vllm_engine_dtype"] == "float32" and r["rows"] == 4
    assert lp["rows_compared"] == 4 and lp["tokens_compared"] == 16 and lp["rows_with_other_tokens"] == 0
    for key in ("hf_samples_per_s", "vllm_samples_per_s", "vllm_generate_only_samples_per_s", "sync_s"):
        assert r[key] > 0
