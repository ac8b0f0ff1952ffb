"""The records of a step: generic select / concat over the declared fields (tiltlm.records)."""

import dataclasses

import pytest
import torch

from tiltlm.errors import TiltlmError
from tiltlm.policies import TabularPolicy
from tiltlm.records import Batch, Samples, concat
from tiltlm.targets import Prior, Tilt


def _batch(samples, target):
    scores = target.score(samples)
    return Batch(samples=samples, logq=samples.logp.double(), token_logq=samples.token_logp, logp_prior=scores.logp_prior,
                 log_target=scores.log_target, reward=scores.reward, beta=target.beta)


def _assert_same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif dataclasses.is_dataclass(x):
            _assert_same(x, y)
        else:
            assert x == y, f.name


def test_every_field_declares_how_it_joins():
    for record in (Samples, Batch):
        assert all(f.metadata.get("kind") in ("shared", "rows", "tokens") for f in dataclasses.fields(record))


def test_shards_concatenated_equal_the_whole_batch():
    """Rows drawn in three shards (sequences of different lengths, so token fields need padding) and
    concatenated are the batch one call draws: samples and their scores, field by field."""
    policy = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=4, seed=3, contexts=["x", "y"])
    target = Prior(policy) * Tilt("count:a", 0.5)
    whole = policy.sample(["x", "y"], 6, seed=7)
    shards = [policy.sample(["x", "y"], 6, seed=7, rows=r) for r in (range(0, 5), range(5, 6), range(6, 12))]
    assert len({s.ids.shape[1] for s in shards}) > 1  # the padding is really exercised
    _assert_same(concat(shards, policy.pad_id), whole)
    _assert_same(concat([_batch(s, target) for s in shards], policy.pad_id), _batch(whole, target))
    assert concat([_batch(s, target) for s in shards], policy.pad_id).beta == 0.5  # shared: kept once


def test_select_picks_rows_of_every_field():
    policy = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0)
    target = Prior(policy) * Tilt("count:a", 1.0)
    batch = _batch(policy.sample([""], 8, seed=1), target)
    index = [5, 0, 5, 2]
    part = batch.select(index)
    assert part.samples.texts == [batch.samples.texts[i] for i in index]
    assert torch.equal(part.reward, batch.reward[index]) and torch.equal(part.samples.ids, batch.samples.ids[index])
    assert part.beta == batch.beta and part.samples.contexts == batch.samples.contexts
    _assert_same(batch.select(range(len(batch))), batch)


def test_parts_with_different_context_widths_are_refused():
    policy = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=2, seed=0)
    a, b = policy.sample([""], 2, seed=0), policy.sample([""], 2, seed=1)
    b = dataclasses.replace(b, context_ids=torch.zeros((2, 3), dtype=torch.long), context_attn=torch.ones((2, 3), dtype=torch.bool))
    with pytest.raises(TiltlmError, match="'context_ids' of different widths"):
        concat([a, b], policy.pad_id)
