"""HFPolicy.log_prob without grad encodes each distinct context once (HFPolicy._shared_context_logp) and gives the
log-probs of the whole-sequence pass (``share_contexts=False``, the route with grad) to within ATOL nats.

Both routes are also checked against an independent reference: the model's full (B, C+T, V) logits of each row's
whole sequence, through the sampling transform, gathered at the sampled tokens. Cases: left-padded contexts of
different lengths ("" is BOS alone), rows ending early with EOS, temperature and top-p, the tiny tied Llama testbed
with its ChatML template, rows of one context not adjacent, environment tokens inside a completion (attended, not
scored), row chunks that split a context's rows, a LoRA prior (adapters off). Where no two rows share a context the
whole-sequence pass runs itself (bit for bit); with grad the values and gradients are those of
``share_contexts=False`` bit for bit (the same route).
"""

from __future__ import annotations

import pytest
import torch

from tiltlm.policies import HFPolicy
from tiltlm.policies.base import transform_logits

ATOL = 1e-5  # nats; the two routes differ by float32 rounding only (seen: up to 5e-6)


@pytest.fixture(scope="module")
def default():
    return HFPolicy.from_pretrained("default", max_new_tokens=16)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    path = make_testbed(tmp_path_factory.mktemp("llama") / "llama", arch="llama", vocab_size=12, n_layer=2, n_embd=32, n_head=4,
                        n_kv_head=2, seed=0)
    return HFPolicy.from_pretrained(path, max_new_tokens=10)


def reference(policy, s) -> torch.Tensor:
    """(B, T) log pi of each policy token from the model's whole logits (no chunks, no cache, no head patching)."""
    ids = torch.cat([s.context_ids, s.ids], dim=1)
    attn = torch.cat([s.context_attn, s.attn], dim=1).long()
    with torch.no_grad(), policy._adapters():
        logits = policy.model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    c = s.context_ids.shape[1]
    logp = transform_logits(logits[:, c - 1 : -1], policy.temperature, policy.top_p).gather(-1, s.ids[..., None]).squeeze(-1)
    return torch.where(s.mask, logp, 0.0)


def routes(policy, s, monkeypatch=None):
    """(shared, whole-sequence) per-token log-probs; with ``monkeypatch``, the shared one must not fall back."""
    policy.share_contexts = False
    whole = policy.log_prob(s, per_token=True)
    policy.share_contexts = True
    if monkeypatch is not None:
        with monkeypatch.context() as m:
            m.setattr(HFPolicy, "_sequence_logp", lambda *a: pytest.fail("fell back to the whole-sequence pass"))
            return policy.log_prob(s, per_token=True), whole
    return policy.log_prob(s, per_token=True), whole


def check(policy, s, monkeypatch):
    shared, whole = routes(policy, s, monkeypatch)
    ref = reference(policy, s)
    assert shared.shape == whole.shape == s.ids.shape
    assert not shared[~s.mask].any() and not whole[~s.mask].any()  # zeros off the mask (on it, top-p can give log 1 = 0)
    assert (shared - whole).abs().max() <= ATOL
    assert (whole - ref).abs().max() <= ATOL and (shared - ref).abs().max() <= ATOL
    assert (policy.log_prob(s) - whole.sum(-1)).abs().max() <= 16 * ATOL  # the (B,) sums too


def test_left_padded_contexts_and_early_eos(default, monkeypatch):
    s = default.sample(["", "Once upon a time", "The dog", "Q: Name an animal that can fly. A:"], 8, seed=3)
    lengths = s.mask.sum(-1)
    assert s.context_attn.sum(-1).unique().numel() == 4 and bool(s.eos.any())  # padded contexts, rows that stopped
    assert int(lengths.min()) < s.ids.shape[1] and int(lengths.max()) == s.ids.shape[1]
    check(default, s, monkeypatch)


def test_temperature_and_top_p(monkeypatch):
    warm = HFPolicy.from_pretrained("default", max_new_tokens=12, temperature=0.7, top_p=0.9)
    s = warm.sample(["Once", "", "The cat sat"], 6, seed=1)
    check(warm, s, monkeypatch)
    assert (warm.log_prob(s, per_token=True) - s.token_logp).abs().max() <= 5e-5  # the recorded log-probs of sampling


def test_tied_llama_chat_template(llama, monkeypatch):
    assert llama.chat_template
    check(llama, llama.sample(["ab", "abcdab", ""], 6, seed=2), monkeypatch)


def test_rows_not_adjacent_and_chunks(default, monkeypatch):
    s = default.sample(["The dog", "Once upon a time"], 6, seed=5)
    s = s.select(torch.tensor([3, 7, 0, 11, 5, 8, 1, 2]))  # both contexts' rows interleaved
    check(default, s, monkeypatch)
    small = default.copy()
    small.chunk_size = 3  # chunks of 3 rows: every chunk still shares a context
    s = default.sample(["The dog", "Once"], 6, seed=6)
    check(small, s, monkeypatch)


def test_environment_tokens_inside_a_completion(default, monkeypatch):
    """Tokens with attn on and mask off (an environment's) condition the later policy tokens and are not scored."""
    s = default.sample(["The dog", "Once"], 4, seed=7)
    s.mask = s.mask.clone()
    s.mask[:, 2:4] = False  # tokens 2, 3 become the environment's wherever the row went on
    s.mask[0] = False  # a row without policy tokens
    assert bool(s.attn[:, 2:4].any())
    check(default, s, monkeypatch)


def test_lora_prior_adapters_off(default, monkeypatch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(default.copy().model, peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    prior = HFPolicy(model, default.tokenizer, max_new_tokens=8, disable_adapters=True)
    s = prior.sample(["The dog", ""], 4, seed=8)
    check(prior, s, monkeypatch)
    plain = HFPolicy(model, default.tokenizer, max_new_tokens=8)  # adapters on: another distribution
    assert (plain.log_prob(s) - prior.log_prob(s)).abs().max() > 1e-3


def test_no_shared_context_is_the_whole_sequence_pass(default):
    s = default.sample(["", "The dog", "Once upon a time"], 1, seed=4)
    shared, whole = routes(default, s)
    assert torch.equal(shared, whole)


def test_grad_path_unchanged(default):
    """With grad the route is the whole-sequence pass whatever share_contexts says: equal values and gradients."""
    s = default.sample(["The dog", "Once"], 4, seed=9)
    policy = default.copy()
    out = {}
    for share in (False, True):
        policy.share_contexts = share
        policy.model.zero_grad()
        logp = policy.log_prob(s, grad=True)
        logp.sum().backward()
        out[share] = (logp.detach(), [p.grad.clone() for p in policy.model.parameters()])
    assert torch.equal(out[True][0], out[False][0])
    assert all(torch.equal(a, b) for a, b in zip(out[True][1], out[False][1]))
    assert (out[True][0] - reference(policy, s).sum(-1)).abs().max() <= 16 * ATOL
    assert any(float(g.abs().sum()) > 0 for g in out[True][1])


def test_length_groups():
    mask = torch.zeros(7, 16, dtype=torch.bool)
    for row, n in enumerate([16, 1, 12, 0, 5, 2, 9]):
        mask[row, :n] = True
    mask[3, 6] = True  # a row whose only policy token is token 6 (environment tokens before it): width 7
    groups = HFPolicy._length_groups(mask)
    widths = {int(r): w for rows, w in groups for r in rows}
    assert sorted(widths) == [0, 2, 3, 4, 5, 6]  # row 1 (token 0 only) needs no fed position; every other row once
    assert sum(len(rows) for rows, _ in groups) == 6
    need = {0: 16, 2: 12, 3: 7, 4: 5, 5: 2, 6: 9}
    for row, w in widths.items():
        assert need[row] <= w and need[row] >= 0.75 * w  # fed up to its last policy token, at most 1/4 padding
    assert [w for _, w in groups] == sorted((w for _, w in groups), reverse=True)
