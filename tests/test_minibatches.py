"""optim.minibatch_size: several optimiser updates per sampled batch (tiltlm.train.loop.minibatches).

Each minibatch's loss is the whole batch's loss with the minibatch's rows at the current weights (gradient scaled by
B/b) and the other rows at the step's start; a later minibatch's rows were drawn by the step's starting policy, so the
score-function losses weight them by pi/pi_start (Batch.stale_weight). Checked: the partition, that at unchanged
weights the minibatch gradients average to the full-batch gradient, the weights by hand, and the fixed point.
"""

import dataclasses
import math

import pytest
import torch

from tiltlm.algorithms.kl_pg import kl_pg_loss
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer, minibatches
from tiltlm.train.minibatch import token_logp as minibatch_token_logp

from test_algorithms import BETA, setup


@pytest.mark.parametrize("group,size,expected", [
    ([0] * 64, 16, [16, 16, 16, 16]),  # one context: its group cut into equal parts
    ([0] * 64, None, None),  # null: one update
    ([0] * 16, 16, None),  # fits: one update
    ([0] * 8 + [1] * 8 + [2] * 8 + [3] * 8, 16, [16, 16]),  # whole groups packed two by two
    ([0] * 20 + [1] * 4, 16, [10, 14]),  # 20 > 16: two parts of 10; the small group joins the second
    ([0] * 5 + [1] * 5 + [2] * 5, 8, [5, 5, 5]),  # a group that fits is never cut
])
def test_minibatches_partition_the_batch(group, size, expected):
    parts = minibatches(torch.tensor(group), size)
    if expected is None:
        assert parts == [None]
        return
    assert [len(p) for p in parts] == expected
    assert sorted(torch.cat(parts).tolist()) == list(range(len(group)))  # every row once


def trainer(n=64, size=16, steps=1, name="kl-pg"):
    prior, policy, target = setup()
    config = parse_config({
        "algorithm": {"name": name}, "target": {"reward": "count:a", "beta": BETA},
        "sampling": {"n_per_context": n, "max_new_tokens": 3}, "seed": 0,
        "optim": {"steps": steps, "lr": 0.05, "minibatch_size": size}, "metrics": {"diversity": False},
    })
    return Trainer(config, policy=policy, target=target), policy


@pytest.mark.parametrize("name", ["kl-pg", "reinforce", "dpg", "grpo"])
def test_minibatch_gradients_average_to_the_full_batch_gradient(name):
    t, policy = trainer(name=name)
    batch = t.make_batch(0)

    def grad(b, rows, before):
        policy.logits.grad = None
        token_logp = minibatch_token_logp(t.strategy, t.policy, b, rows, before)
        loss, _ = t.algorithm.loss(b, token_logp.sum(-1), token_logp)
        loss.backward()
        return policy.logits.grad.clone()

    full = grad(batch, None, None)
    with torch.no_grad():
        before = t.strategy.token_logp(policy, batch).detach()
    stale = dataclasses.replace(batch, logp_start=before.sum(-1).double())
    parts = minibatches(batch.group, 16)
    mean = sum(grad(stale, rows, before) for rows in parts) / len(parts)
    torch.testing.assert_close(mean, full, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grad(stale, parts[0], before), full)  # one minibatch alone is another estimate


def test_stale_rows_are_weighted_by_pi_over_pi_start_and_use_the_current_kl():
    """kl_pg_loss with logp_start: d loss / d log pi_i = -w_i (R_i - b_i) / B, R at the current weights, by hand."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    start = torch.tensor([-1.2, -1.9, -0.5], dtype=torch.float64)
    logq = start.clone()  # temperature 1: the sampler's log-prob is pi_start's
    prior = torch.tensor([-1.5, -1.5, -1.0], dtype=torch.float64)
    reward = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    loss, adv = kl_pg_loss(logp, logq, prior, reward, torch.zeros(3, dtype=torch.long), beta=0.5, logp_start=start)
    loss.backward()
    now = logp.detach().double()
    pseudo = reward - 0.5 * (now - prior)
    expected_adv = [pseudo[i] - (pseudo.sum() - pseudo[i]) / 2 for i in range(3)]
    w = torch.exp(now - start)
    for i in range(3):
        assert adv[i].item() == pytest.approx(expected_adv[i].item())
        assert logp.grad[i].item() == pytest.approx(-(w[i] * expected_adv[i]).item() / 3, rel=1e-6)


def test_a_step_makes_one_update_per_minibatch():
    t, _ = trainer(n=64, size=16)
    row = t.train_step()
    assert row["optim/updates"] == 4 and 0.0 <= row["grad/clipped"] <= 1.0
    assert next(iter(t.optimizer.state.values()))["step"] == 4
    t, _ = trainer(n=64, size=None)
    row = t.train_step()
    assert "optim/updates" not in row and next(iter(t.optimizer.state.values()))["step"] == 1


@pytest.mark.parametrize("algorithm", [{"name": "kl-pg"}, {"name": "reinforce", "entropy_coef": 0.0}])
def test_minibatches_keep_the_fixed_point(algorithm):
    """kl-pg with 4 updates of 16 per 64-sample step still ends at p* (exact KL), as with one update."""
    from test_algorithms import run

    if algorithm["name"] == "reinforce":  # reinforce's fixed point is the collapse: reward -> max (3 a's)
        last, _, _ = run(algorithm, 150, lr=0.05)
        assert last["reward/mean"] > 2.9, last
        return
    last, _, _ = run(algorithm, 150, lr=0.02)
    assert last["kl/policy_target_exact"] < 0.01, last
    assert math.isfinite(last["loss"])
