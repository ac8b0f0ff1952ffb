"""HFPolicy sampling gives the same tokens and recorded log-probs as the implementation before the faster decoding
loop (tests/data/sampling_golden.pt, written by that implementation: `python tests/test_sampling_exact.py --write`).

The cases cover what the loop does: left-padded contexts of different lengths, several rows per context (the
prefill shared per context), temperature and top-p, a data-parallel shard of the rows (``rows=``), rows that end
early with EOS while others go on, ``generate`` with per-row seeded draws, a multi-turn DecodeSession, and the
tiny tied Llama testbed with a ChatML chat template (tiltlm.testbed.make_testbed(arch="llama")). Tokens, masks and
EOS flags are compared exactly; the recorded log-probs to within LOGP_ATOL nats. Not bit for bit: float32 matrix
kernels differ between CPUs in their last bits (the file was written on one machine and CI runs on others; they
differed by up to 9e-6 nats), while a changed token, temperature or mask moves a log-prob by far more than 5e-5.
"""

import sys
import tempfile
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "sampling_golden.pt"
LOGP_ATOL = 5e-5  # nats: five times the largest difference seen between two CPUs


def _policies(tmp: Path):
    from tiltlm.policies import HFPolicy
    from tiltlm.testbed import make_testbed

    default = HFPolicy.from_pretrained("default", max_new_tokens=32)
    llama_dir = make_testbed(tmp / "llama", arch="llama", vocab_size=12, n_layer=2, n_embd=32, n_head=4, seed=0)
    return default, llama_dir


def cases(tmp: Path) -> dict[str, dict[str, torch.Tensor]]:
    """name -> tensors of one sampling call (ids, token_logp, mask, …)."""
    from tiltlm.policies import HFPolicy

    default, llama_dir = _policies(tmp)
    out = {}

    def record(name, s):
        out[name] = {"ids": s.ids, "token_logp": s.token_logp, "mask": s.mask, "eos": s.eos, "attn": s.attn,
                     "context_ids": s.context_ids}

    torch.manual_seed(0)  # nothing here may depend on it; set so a dependence would show as a mismatch, not flakiness
    record("default_contexts", default.sample(["", "Once upon a time", "The dog"], 5, seed=3))
    record("default_b64", default.sample(["The cat"], 64, seed=11))
    record("default_shard", default.sample(["", "The dog"], 6, seed=5, rows=range(3, 9)))
    warm = HFPolicy.from_pretrained("default", max_new_tokens=20, temperature=0.7, top_p=0.9)
    record("default_temp_top_p", warm.sample(["Once", ""], 4, seed=1))
    ids, logp, mask = default.generate([[0, 5, 9], [0], [0, 7, 7, 7, 3]], max_new_tokens=12, seeds=[4, 5, 6])
    out["default_generate"] = {"ids": ids, "token_logp": logp, "mask": mask}
    session = default.session()
    first = session.generate(["a", "b"], [[0, 5], [0, 9, 9]], max_new_tokens=6, seeds=[1, 2])
    prefixes = [[0, 5, *first[0][0][first[2][0]].tolist(), 11, 12], [0, 9, 9, *first[0][1][first[2][1]].tolist(), 13]]
    second = session.generate(["a", "b"], prefixes, max_new_tokens=6, seeds=[3, 4])
    out["default_session"] = {f"{k}{i}": v for i, turn in enumerate((first, second)) for k, v in zip(("ids", "logp", "mask"), turn)}
    llama = HFPolicy.from_pretrained(llama_dir, max_new_tokens=10)
    record("llama_chat", llama.sample(["ab", "abcdab", ""], 6, seed=2))
    record("llama_chat_long", HFPolicy.from_pretrained(llama_dir, max_new_tokens=40).sample(["a"], 16, seed=9))
    return out


@pytest.fixture(scope="module")
def now_cases(tmp_path_factory):
    return cases(tmp_path_factory.mktemp("sampling"))


def test_golden_file_covers_early_eos():
    golden = torch.load(GOLDEN)
    # rows that end early while others go on: the case where finished rows are dropped or padded
    for name in ("llama_chat_long", "llama_chat", "default_b64"):
        lengths = golden[name]["mask"].sum(-1)
        assert golden[name]["eos"].any() and int(lengths.min()) < int(lengths.max()), name


@pytest.mark.parametrize("name", ["default_contexts", "default_b64", "default_shard", "default_temp_top_p", "default_generate",
                                  "default_session", "llama_chat", "llama_chat_long"])
def test_same_tokens_and_log_probs_as_before(name, now_cases):
    golden = torch.load(GOLDEN)[name]
    now = now_cases[name]
    assert set(now) == set(golden)
    for key, want in golden.items():
        got = now[key]
        assert got.dtype == want.dtype and got.shape == want.shape, (name, key, got.shape, want.shape)
        if want.dtype.is_floating_point:
            assert torch.allclose(got, want, rtol=0, atol=LOGP_ATOL), (name, key, float((got - want).abs().max()))
        else:
            assert torch.equal(got, want), (name, key, (got != want).nonzero()[:5])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        torch.save(cases(Path(d)), GOLDEN)
    print(f"wrote {GOLDEN}")
