"""Policies against the sample-space definition: probabilities sum to 1, sampling matches scoring."""

from collections import Counter

import pytest
import torch

from tiltlm.errors import TiltlmError
from tiltlm.exact import count_sequences, enumerate_space
from tiltlm.policies import HFPolicy, TabularPolicy, transform_logits


def empirical_tv(texts, space) -> float:
    """TV between the empirical distribution of sampled texts and the exact one (texts are unique in these spaces)."""
    counts = Counter(texts)
    exact = dict(zip(space.samples.texts, space.logp.exp().tolist()))
    assert len(exact) == len(space), "texts must identify sequences for this check"
    n = len(texts)
    return 0.5 * sum(abs(counts.get(t, 0) / n - p) for t, p in exact.items())


def test_tabular_probabilities_sum_to_one():
    policy = TabularPolicy.random(list("abc") + ["<eos>"], max_new_tokens=4, seed=3, scale=2.0)
    space = enumerate_space(policy)
    assert len(space) == count_sequences(4, 4) == 1 + 3 + 9 + 27 + 81
    assert space.logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_tabular_hand_computed_sequence_probabilities():
    # root: P(a)=0.6, P(eos)=0.4; after 'a': P(a)=0.3, P(eos)=0.7; L=2 so 'aa' ends with no EOS factor
    logits = torch.log(torch.tensor([[[0.6, 0.4], [0.3, 0.7]]]))
    policy = TabularPolicy(["a", "<eos>"], max_new_tokens=2, logits=logits)
    space = enumerate_space(policy)
    probs = dict(zip(space.samples.texts, space.logp.exp().tolist()))
    assert probs == pytest.approx({"": 0.4, "a": 0.6 * 0.7, "aa": 0.6 * 0.3})
    assert space.samples.eos.tolist() == [True, True, False]


def test_tabular_sampling_matches_exact_and_log_prob():
    policy = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0, scale=1.5)
    s = policy.sample([""], 20000, seed=1)
    torch.testing.assert_close(s.logp, policy.log_prob(s))
    assert empirical_tv(s.texts, enumerate_space(policy)) < 0.02


def test_tabular_contexts_have_their_own_tables():
    policy = TabularPolicy.random(["x", "<eos>"], max_new_tokens=2, contexts=("c1", "c2"), seed=0, scale=3.0)
    s = policy.sample(["c1", "c2"], 4, seed=0)
    assert s.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    space1 = enumerate_space(policy, context="c1")
    space2 = enumerate_space(policy, context="c2")
    assert not torch.allclose(space1.logp, space2.logp)
    with pytest.raises(TiltlmError, match="not one of"):
        policy.sample(["c3"], 1)


def test_tabular_log_prob_has_gradient():
    policy = TabularPolicy(list("ab") + ["<eos>"], max_new_tokens=2)
    s = policy.sample([""], 8, seed=0)
    policy.log_prob(s, grad=True).sum().backward()
    assert policy.logits.grad is not None and policy.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_hf_probabilities_sum_to_one(testbed_dir, temperature, top_p):
    policy = HFPolicy.from_pretrained(testbed_dir, max_new_tokens=4, temperature=temperature, top_p=top_p)
    space = enumerate_space(policy)
    assert len(space) == count_sequences(5, 4)
    assert space.logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # enumeration (one forward per depth) and scoring (one forward per sequence) agree
    torch.testing.assert_close(policy.log_prob(space.samples).double(), space.logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["gumbel", "inverse-cdf"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (1.3, 0.8)])
def test_hf_sampling_matches_exact_distribution(testbed_dir, temperature, top_p, sampler):
    policy = HFPolicy.from_pretrained(testbed_dir, max_new_tokens=3, temperature=temperature, top_p=top_p, sampler=sampler)
    s = policy.sample([""], 20000, seed=0)
    space = enumerate_space(policy)
    assert empirical_tv(s.texts, space) < 0.03
    outside = set(space.samples.texts[i] for i in (space.logp == float("-inf")).nonzero().flatten().tolist())
    assert top_p == 1.0 or (outside and not outside & set(s.texts))  # the nucleus drops sequences; none is drawn
    torch.testing.assert_close(s.logp, policy.log_prob(s), atol=1e-4, rtol=0)


def test_inverse_cdf_by_hand():
    """The token whose CDF interval (F_{v-1}, F_v] holds u·F_V: probability-0 tokens (first, inner, last) never."""
    from tiltlm.policies.base import inverse_cdf

    p = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])  # F = 0, .25, .25, .75, 1, 1
    logp = p.log().expand(7, -1)
    u = torch.tensor([0.0, 0.1, 0.2499, 0.2501, 0.74, 0.76, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf(logp, u).tolist() == [1, 1, 1, 3, 3, 4, 4]


def test_inverse_cdf_sampler_frequencies_and_shards():
    """row_draw's inverse-cdf sampler draws token v with probability p_v (200,000 draws: every frequency within 4.5
    standard errors), one uniform per row and step, and a shard's rows get the whole batch's tokens."""
    from tiltlm.policies.base import row_draw

    p = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01, 0.0])
    n = 200_000
    logp = p.log().expand(n, -1)
    gen = torch.Generator().manual_seed(0)
    tokens = row_draw(gen, n, range(n), "inverse-cdf")(logp)
    freq = torch.bincount(tokens, minlength=6).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 4.5 * se + 1e-12).all(), freq
    # the stream: n float64 uniforms per call, whatever the shard (so the next call starts at the same place)
    whole, part = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draw_whole, draw_part = row_draw(whole, 10, range(10), "inverse-cdf"), row_draw(part, 10, range(4, 7), "inverse-cdf")
    logp10 = torch.log_softmax(torch.randn(10, 6, generator=torch.Generator().manual_seed(1)), -1)
    for _ in range(3):
        assert torch.equal(draw_whole(logp10)[4:7], draw_part(logp10[4:7]))
    assert torch.equal(whole.get_state(), part.get_state())
    with pytest.raises(TiltlmError, match="unknown sampler 'gumble'; use one of gumbel, inverse-cdf"):
        row_draw(whole, 10, range(10), "gumble")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_inverse_cdf_sampler_records_exact_log_probs_and_its_own_stream(kind, testbed_dir, tied_llama_dir):
    """HFPolicy(sampler="inverse-cdf"): recorded log-probs equal log_prob's, a seed gives the same samples again and
    other samples than the gumbel stream, a rows= shard is drawn as in the whole batch, copy() keeps the sampler."""
    from tiltlm.records import concat

    (fast,) = _policies(kind, testbed_dir, tied_llama_dir, max_new_tokens=6, sampler="inverse-cdf")
    (slow,) = _policies(kind, testbed_dir, tied_llama_dir, max_new_tokens=6)
    assert slow.sampler == "gumbel" and fast.copy().sampler == "inverse-cdf"
    contexts = ["", "abcd"]
    s = fast.sample(contexts, 8, seed=4)
    torch.testing.assert_close(s.token_logp, fast.log_prob(s, per_token=True), atol=1e-5, rtol=0)
    assert fast.sample(contexts, 8, seed=4).texts == s.texts
    assert slow.sample(contexts, 8, seed=4).texts != s.texts
    joined = concat([fast.sample(contexts, 8, seed=4, rows=r) for r in (range(0, 5), range(5, 16))], fast.pad_id)
    assert joined.texts == s.texts and torch.equal(joined.mask, s.mask)
    with pytest.raises(TiltlmError, match="unknown sampler 'fast'"):
        HFPolicy.from_pretrained(testbed_dir, sampler="fast")


def test_hf_batched_contexts_of_different_lengths(testbed_policy):
    """Left-padded contexts: each row's log-prob equals scoring that context alone."""
    p = testbed_policy
    s = p.sample(["", "abcd", "b"], 6, seed=0)
    assert s.group.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    torch.testing.assert_close(s.logp, p.log_prob(s), atol=1e-4, rtol=0)
    for k, ctx in enumerate(["", "abcd", "b"]):
        alone = p.sample([ctx], 1, seed=0)
        rows = s.select([i for i in range(len(s)) if s.group[i] == k])
        rows.context_ids, rows.context_attn = alone.context_ids.expand(len(rows), -1), alone.context_attn.expand(len(rows), -1)
        torch.testing.assert_close(p.log_prob(rows), s.logp[s.group == k], atol=1e-4, rtol=0)


def test_hf_eos_and_padding(testbed_policy):
    s = testbed_policy.sample([""], 200, seed=0)
    eos = testbed_policy.eos_id
    for row, m, ended, text in zip(s.ids.tolist(), s.mask.tolist(), s.eos.tolist(), s.texts):
        k = sum(m)
        assert all(m[:k]) and not any(m[k:])
        assert (row[k - 1] == eos) == ended
        assert ended or k == testbed_policy.max_new_tokens
        assert eos not in row[: k - 1]
        assert "<eos>" not in text and len(text) == k - int(ended)
    assert s.eos.any() and (~s.eos).any()


def test_hf_log_prob_gradient(testbed_dir):
    policy = HFPolicy.from_pretrained(testbed_dir, max_new_tokens=3)
    s = policy.sample([""], 4, seed=0)
    policy.log_prob(s, grad=True).sum().backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert not policy.log_prob(s).requires_grad


def test_transform_logits_top_p_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    lp = transform_logits(logits, top_p=0.8)  # nucleus {0.5, 0.3}: 0.5 < 0.8 so the 0.3 token is needed
    assert lp.exp().tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    lp = transform_logits(logits, top_p=0.81)
    assert lp.exp().tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    assert transform_logits(logits, temperature=0.5).exp().tolist() == pytest.approx(
        [v**2 / sum(u**2 for u in [0.5, 0.3, 0.15, 0.05]) for v in [0.5, 0.3, 0.15, 0.05]]
    )


def test_bad_options_and_dirs(tmp_path, testbed_dir):
    with pytest.raises(TiltlmError, match="temperature must be > 0"):
        HFPolicy.from_pretrained(testbed_dir, temperature=0.0)
    with pytest.raises(TiltlmError, match="top_p"):
        HFPolicy.from_pretrained(testbed_dir, top_p=1.5)
    with pytest.raises(TiltlmError, match="not found"):
        HFPolicy.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TiltlmError, match="no config.json"):
        HFPolicy.from_pretrained(tmp_path / "empty")
    with pytest.raises(TiltlmError, match="window"):
        HFPolicy.from_pretrained(testbed_dir, max_new_tokens=60).sample(["abcdabcd"], 1)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    return make_testbed(tmp_path_factory.mktemp("llama"), arch="llama", vocab_size=12, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                        seed=0, train_steps=20)


def _full_logits_token_logp(policy: HFPolicy, s) -> torch.Tensor:
    """The direct route: the model's (B, T, V) logits, the sampling transform, the tokens' entries. (B, T)"""
    c = s.context_ids.shape[1]
    ids = torch.cat([s.context_ids, s.ids], dim=1)
    attn = torch.cat([s.context_attn, s.attn], dim=1).long()
    logits = policy._forward(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits[:, c - 1 : -1]
    tok = transform_logits(logits, policy.temperature, policy.top_p).gather(-1, s.ids[..., None]).squeeze(-1)
    return torch.where(s.mask, tok, torch.zeros(()))


def _policies(kind: str, testbed_dir, tied_llama_dir, **options) -> list[HFPolicy]:
    """The policies to check: GPT-2; a tied GQA Llama; LoRA on it (adapters on, and off as the prior)."""
    if kind == "gpt2":
        return [HFPolicy.from_pretrained(testbed_dir, **options)]
    if kind == "llama":
        return [HFPolicy.from_pretrained(tied_llama_dir, **options)]
    from peft import LoraConfig, get_peft_model

    from tiltlm.policies.hf import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tied_llama_dir)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM"))
    with torch.no_grad():  # adapters that change the outputs (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return [HFPolicy(model, tokenizer, **options), HFPolicy(model, tokenizer, disable_adapters=True, **options)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "lora"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (1.3, 0.8)])
def test_blockwise_log_prob_and_gradient_equal_the_full_logits_route(kind, temperature, top_p, testbed_dir, tied_llama_dir):
    """Scoring through final hidden states in blocks of 3 rows (checkpointed under grad) gives the token
    log-probs and the gradients of the (B, T, V) logits route, to float rounding."""
    pytest.importorskip("peft") if kind == "lora" else None
    for policy in _policies(kind, testbed_dir, tied_llama_dir, max_new_tokens=5, temperature=temperature, top_p=top_p):
        policy.logits_chunk = 3 * policy.vocab_size
        s = policy.sample(["", "ab"], 4, seed=1)
        assert s.mask.sum() > 3 * 2  # several blocks
        weights = torch.randn(s.ids.shape, generator=torch.Generator().manual_seed(0))
        if policy.disable_adapters:  # the LoRA prior: nothing of it trains, its values only
            assert (policy.log_prob(s, per_token=True) - _full_logits_token_logp(policy, s)).abs().max() <= 1e-6
            continue
        grads = []
        for route in (lambda: policy.log_prob(s, grad=True, per_token=True), lambda: _full_logits_token_logp(policy, s)):
            policy.model.zero_grad(set_to_none=True)
            token_logp = route()
            (weights * token_logp.masked_fill(~s.mask, 0)).sum().backward()
            named = [(n, p.grad.clone()) for n, p in policy.model.named_parameters() if p.grad is not None]
            grads.append((token_logp.detach(), dict(named)))
        (mine, g_mine), (ref, g_ref) = grads
        assert (mine - ref).abs().max() <= 1e-6
        assert g_mine.keys() == g_ref.keys() and g_ref
        diff = torch.cat([(g_mine[n] - g_ref[n]).flatten() for n in g_ref]).norm()
        assert diff <= 1e-6 * torch.cat([g.flatten() for g in g_ref.values()]).norm()  # the whole gradient, relative
        for name in g_ref:  # each tensor (a small one, e.g. position embeddings, sums fewer terms: float32 rounding shows)
            assert (g_mine[name] - g_ref[name]).norm() <= 1e-5 * g_ref[name].norm() + 1e-12, name
        print(f"{kind} T={temperature} p={top_p}: token {float((mine - ref).abs().max()):.2e}, grad {float(diff / torch.cat([g.flatten() for g in g_ref.values()]).norm()):.2e}, "
              f"worst tensor {max(float((g_mine[n] - g_ref[n]).norm() / g_ref[n].norm().clamp(min=1e-30)) for n in g_ref):.2e}")
        with torch.no_grad():
            assert (policy.log_prob(s, per_token=True) - ref).abs().max() <= 1e-6
    if kind == "lora":  # the prior (adapters off) scores like the plain model, with no second copy of the weights
        on, off = _policies(kind, testbed_dir, tied_llama_dir, max_new_tokens=5)
        plain = HFPolicy.from_pretrained(tied_llama_dir, max_new_tokens=5)
        s = on.sample(["ab"], 4, seed=2)
        assert (off.log_prob(s) - plain.log_prob(s)).abs().max() <= 1e-5 and (on.log_prob(s) - off.log_prob(s)).abs().max() > 1e-3
        assert on.model is off.model


def test_a_model_whose_logits_are_post_processed_is_refused(testbed_dir):
    """The final hidden states route checks once that head(hidden) is the model's logits."""
    policy = HFPolicy.from_pretrained(testbed_dir, max_new_tokens=3)
    s = policy.sample([""], 2, seed=0)
    forward = policy.model.forward

    def soft_capped(*args, **kwargs):  # like Gemma 2: logits = cap * tanh(head(hidden) / cap)
        out = forward(*args, **kwargs)
        out["logits"] = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    policy.model.forward = soft_capped
    with pytest.raises(TiltlmError, match="post-processes"):
        policy.log_prob(s)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "lora"])
def test_each_context_is_encoded_once_for_its_n_samples(kind, testbed_dir, tied_llama_dir):
    """sample() runs the contexts' forward pass on one row per context and repeats its KV cache for the n
    samples: the same tokens and the same token log-probs (to float rounding) as encoding every row."""
    pytest.importorskip("peft") if kind == "lora" else None
    from tiltlm.policies.base import batch_rows, row_draw

    for policy in _policies(kind, testbed_dir, tied_llama_dir, max_new_tokens=6):
        contexts = ["", "abcd", "b"]  # different lengths: left padding in the shared rows too
        group, rows = batch_rows(len(contexts), 4, None)
        ids, attn = policy.contexts_tensor(contexts, group)
        runs = []
        for same_as in (None, group):
            seen = []
            hook = policy.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True)
            try:
                gen = torch.Generator().manual_seed(5)
                runs.append(policy._decode(ids, attn, 6, row_draw(gen, len(group), rows), same_as=same_as))
            finally:
                hook.remove()
            assert seen[0] == ((12 if same_as is None else 3), ids.shape[1])  # the contexts' pass: every row, or one per context
            assert all(shape == (12, 1) for shape in seen[1:])  # then one token per row and step
        (a_ids, a_logp, a_mask), (b_ids, b_logp, b_mask) = runs
        assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
        assert (a_logp - b_logp).abs().max() <= 1e-6
        s = policy.sample(contexts, 4, seed=3)  # and sample() scores like log_prob, row by row
        torch.testing.assert_close(s.token_logp, policy.log_prob(s, per_token=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "lora"])
def test_checkpointed_layers_give_the_same_log_probs_and_gradients(kind, testbed_dir, tied_llama_dir):
    """checkpoint_layers: log_prob with grad runs each decoder layer under torch.utils.checkpoint (backward
    recomputes it): the same token log-probs and gradients as keeping every activation, and fewer tensors
    saved for backward."""
    pytest.importorskip("peft") if kind == "lora" else None
    policy, prior = _policies(kind, testbed_dir, tied_llama_dir, max_new_tokens=5) if kind == "lora" else \
        (_policies(kind, testbed_dir, tied_llama_dir, max_new_tokens=5)[0], None)
    s = policy.sample(["", "ab"], 4, seed=1)
    weights = torch.randn(s.ids.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for on in (False, True):
        policy.checkpoint_layers = on
        policy.model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            token_logp = policy.log_prob(s, grad=True, per_token=True)
        (weights * token_logp).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        results.append((token_logp.detach(), grads, sum(saved)))
        assert not any("forward" in vars(m) for m in policy.model.modules())  # the layers are restored after the call
    (plain, g_plain, saved_plain), (ckpt, g_ckpt, saved_ckpt) = results
    assert (plain - ckpt).abs().max() <= 1e-6
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for name in g_plain:
        assert (g_plain[name] - g_ckpt[name]).norm() <= 1e-6 * g_plain[name].norm() + 1e-12, name
    assert saved_ckpt < saved_plain  # the layers' activations are not kept
    policy.checkpoint_layers = False
    if prior is not None:  # the LoRA prior (adapters off, no grad): the option changes nothing
        before = prior.log_prob(s)
        prior.checkpoint_layers = True
        assert torch.equal(prior.log_prob(s), before)
    assert policy.copy().checkpoint_layers is False
    policy.checkpoint_layers = True
    assert policy.copy().checkpoint_layers is True
    policy.checkpoint_layers = False
