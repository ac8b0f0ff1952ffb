"""DPO, cDPO, IPO and online DPO against their exact fixed points (tiltlm.exact.preferences, docs/math.md §14).

The space: tokens {a, b, <eos>}, at most 3 new tokens (15 sequences), a random tabular prior. Full-coverage
preference data is built so that its label frequencies are exactly Bradley–Terry: with m(x) = 1 + count_a(x) and
r = log m, the pair {x, y} appears m(x) times as x ≻ y and m(y) times as y ≻ x, so P(x ≻ y) = m(x)/(m(x) + m(y))
= σ(r(x) - r(y)) exactly, with pair weight W = m(x) + m(y).
"""

import itertools
import json
import math

import pytest
import torch

from tiltlm.algorithms import get_algorithm
from tiltlm.algorithms.dpo import dpo_loss, ipo_loss
from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, kl
from tiltlm.exact.preferences import (bt_probabilities, coverage_report, dpo_population_optimum, ipo_population_optimum,
                                      preference_fixed_point)
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

BETA = 1.0


def tabular(seed: int = 0):
    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=seed)
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    return prior, policy


def full_coverage(tmp_path, texts):
    m = {t: 1 + t.count("a") for t in texts}
    rows = []
    for x, y in itertools.combinations(texts, 2):
        rows += [{"prompt": "", "chosen": x, "rejected": y}] * m[x] + [{"prompt": "", "chosen": y, "rejected": x}] * m[y]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mm = torch.tensor([m[t] for t in texts], dtype=torch.float64)
    W = (mm[:, None] + mm[None, :]).fill_diagonal_(0)
    return path, torch.log(mm), W


def train(path, algorithm: dict, prior, policy, *, steps: int = 150, lr: float = 0.1, target=None):
    config = parse_config({"data": {"path": str(path)}, "target": {"beta": BETA}, "algorithm": algorithm,
                           "sampling": {"max_new_tokens": 3}, "optim": {"steps": steps, "lr": lr, "schedule": "constant",
                                                                        "minibatch_size": None}})
    return Trainer(config, policy=policy, target=target or Prior(prior)).run()


# ---- the losses ----------------------------------------------------------------------------------


def test_losses_at_known_points():
    h = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    assert dpo_loss(h, 1.0)[0] == pytest.approx(math.log(2))
    assert dpo_loss(h, 0.5)[1] == pytest.approx(math.log1p(math.exp(-1.0)))
    eps = 0.2  # cDPO = the expected DPO loss when the label is flipped with probability eps
    assert torch.allclose(dpo_loss(h, 1.0, eps), (1 - eps) * dpo_loss(h, 1.0) + eps * dpo_loss(-h, 1.0))
    assert torch.allclose(ipo_loss(h, 0.5), (h - 1.0) ** 2)
    # cDPO's minimiser in h: σ(beta·h) = 1 - eps
    hh = torch.linspace(-5, 5, 20001, dtype=torch.float64)
    best = hh[dpo_loss(hh, 2.0, eps).argmin()]
    assert float(best) == pytest.approx(math.log((1 - eps) / eps) / 2.0, abs=1e-3)


# ---- exact fixed points (closed form vs the convex minimiser) ------------------------------------


def test_dpo_bt_fixed_point_is_the_posterior_for_any_connecting_weights():
    prior, _ = tabular()
    space = enumerate_space(prior)
    logp0 = space.logp.double()
    r = torch.tensor([t.count("a") - 0.5 * t.count("b") for t in space.samples.texts], dtype=torch.float64)
    P = bt_probabilities(r)
    for W in (torch.outer(logp0.exp(), logp0.exp()), torch.rand(15, 15, generator=torch.Generator().manual_seed(1))):
        W = ((W + W.T) / 2).fill_diagonal_(0)
        got = preference_fixed_point(logp0, W, P, 0.5)
        assert kl(dpo_population_optimum(logp0, r, 0.5), got) < 1e-9


def test_ipo_fixed_point_is_the_win_rate_tilt():
    prior, _ = tabular()
    space = enumerate_space(prior)
    logp0 = space.logp.double()
    r = torch.tensor([float(t.count("a")) for t in space.samples.texts], dtype=torch.float64)
    P = bt_probabilities(r)
    W = torch.outer(logp0.exp(), logp0.exp()).fill_diagonal_(0)
    for beta in (0.1, 1.0):
        closed = ipo_population_optimum(logp0, P, beta)
        assert kl(closed, preference_fixed_point(logp0, W, P, beta, kind="ipo")) < 1e-9
        # regularised: the tilt is by a win rate in [0, 1], so log(pi/pi0) spans at most 1/beta, unlike r/beta
        u = closed - logp0
        assert float(u.max() - u.min()) <= 1 / beta + 1e-9
    posterior = dpo_population_optimum(logp0, r, 0.1)
    assert kl(posterior, ipo_population_optimum(logp0, P, 0.1)) > 0.05  # IPO aims elsewhere than p*


def test_cdpo_fixed_point_shrinks_the_margins():
    prior, _ = tabular()
    space = enumerate_space(prior)
    logp0 = space.logp.double()
    r = torch.tensor([2.0 * t.count("a") for t in space.samples.texts], dtype=torch.float64)
    P, W = bt_probabilities(r), torch.outer(logp0.exp(), logp0.exp()).fill_diagonal_(0)
    dpo = preference_fixed_point(logp0, W, P, 1.0) - logp0
    cdpo = preference_fixed_point(logp0, W, P, 1.0, eps=0.1) - logp0
    assert float(cdpo.max() - cdpo.min()) < float(dpo.max() - dpo.min())
    assert float(dpo.max() - dpo.min()) == pytest.approx(float(r.max() - r.min()), abs=1e-6)
    with pytest.raises(TiltlmError, match="no DPO minimiser"):
        preference_fixed_point(logp0, W, (P > 0.5).double(), 1.0)
    with pytest.raises(TiltlmError, match="do not connect"):
        preference_fixed_point(logp0, torch.zeros_like(W), P, 1.0)


# ---- on the loop ---------------------------------------------------------------------------------


def test_dpo_on_the_loop_reaches_the_posterior_within_0_01_nats(tmp_path):
    prior, policy = tabular()
    space = enumerate_space(prior)
    path, r, _ = full_coverage(tmp_path, space.samples.texts)
    rows = train(path, {"name": "dpo"}, prior, policy)
    p_star = dpo_population_optimum(space.logp, r, BETA)
    assert kl(space.log_prob(policy).double(), p_star) <= 0.01
    assert kl(p_star, space.log_prob(policy).double()) <= 0.01
    last = rows[-1]
    assert 0 < last["reward/accuracy"] < 1 and last["pairs/count"] == len(path.read_text().splitlines())
    assert {"loss", "reward/margin", "logp/chosen_vs_prior", "logp/rejected_vs_prior"} <= set(last)


@pytest.mark.parametrize("algorithm", [{"name": "ipo"}, {"name": "cdpo", "label_smoothing": 0.2}])
def test_ipo_and_cdpo_on_the_loop_reach_their_fixed_points(tmp_path, algorithm):
    prior, policy = tabular()
    space = enumerate_space(prior)
    path, r, W = full_coverage(tmp_path, space.samples.texts)
    train(path, algorithm, prior, policy, steps=200)
    kind = "ipo" if algorithm["name"] == "ipo" else "dpo"
    fixed = preference_fixed_point(space.logp, W, bt_probabilities(r), BETA, kind=kind, eps=algorithm.get("label_smoothing", 0.0))
    assert kl(space.log_prob(policy).double(), fixed) <= 0.01
    assert kl(fixed, dpo_population_optimum(space.logp, r, BETA)) > 0.01  # and that is not the posterior


def test_finite_pairs_chosen_log_prob_falls_while_the_margin_grows(tmp_path):
    """A chain of two certain pairs, aa ≻ a and ab ≻ aa: no finite minimiser (both margins grow without bound); 'aa'
    is pushed up by one pair and down by the other and ends lower than under pi0, so the chosen completions' mean
    log-prob change is negative while every margin grows; the mass outside the pairs is not what p* puts there."""
    prior, policy = tabular()
    space = enumerate_space(prior)
    texts = space.samples.texts
    pairs = [("aa", "a"), ("ab", "aa")]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": "", "chosen": w, "rejected": l}) + "\n" for w, l in pairs))
    rows = train(path, {"name": "dpo"}, prior, policy, steps=100, lr=0.1)
    logp = space.log_prob(policy).double()
    r = torch.tensor([float(t.count("a")) for t in texts], dtype=torch.float64)
    report = coverage_report(space.logp, logp, space.logp.double() + r / BETA, [texts.index(w) for w, _ in pairs],
                             [texts.index(l) for _, l in pairs])
    assert report["margin"] > 4 and rows[-1]["reward/accuracy"] == 1.0
    assert report["chosen_logp_change"] < -0.1 and report["rejected_logp_change"] < report["chosen_logp_change"]
    assert rows[-1]["reward/margin"] > rows[len(rows) // 2]["reward/margin"] > rows[0]["reward/margin"]
    assert abs(report["unseen_mass_policy"] - report["unseen_mass_target"]) > 0.1 and report["kl_policy_target"] > 0.1
    assert report["unseen_mass_prior"] == pytest.approx(float(space.logp.exp()[[t not in ("a", "aa", "ab") for t in texts]].sum()))


def test_online_dpo_with_bt_labels_approaches_the_posterior():
    prior, policy = tabular()
    target = Prior(prior) * Tilt("count:a", BETA)
    config = parse_config({"target": {"reward": "count:a", "beta": BETA}, "algorithm": {"name": "online-dpo"},
                           "sampling": {"n_per_context": 64, "max_new_tokens": 3},
                           "optim": {"steps": 250, "lr": 0.05, "minibatch_size": None}, "metrics": {"exact_every": 250}})
    rows = Trainer(config, policy=policy, target=target).run()
    assert rows[0]["pairs/count"] == 32
    assert rows[-1]["kl/policy_target_exact"] < 0.05, rows[-1]["kl/policy_target_exact"]


def test_online_dpo_labels_and_refusals():
    algo = get_algorithm("online-dpo", label="argmax")
    assert algo.on_policy and not algo.offline_pairs
    assert get_algorithm("dpo").offline_pairs and get_algorithm("ipo").offline_pairs and get_algorithm("cdpo").config.label_smoothing == 0.1
    with pytest.raises(TiltlmError, match="label_smoothing"):
        get_algorithm("cdpo", label_smoothing=0.0)


def test_offline_dpo_without_preference_data_is_one_line(tmp_path):
    prior, policy = tabular()
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"prompt": ""}) + "\n")
    for data, needle in ((None, "give data: {path: prefs.jsonl}"), ({"path": str(prompts)}, "has no column 'chosen' or 'rejected'")):
        config = parse_config({"target": {"beta": BETA}, "algorithm": {"name": "dpo"}, "sampling": {"max_new_tokens": 3},
                               **({"data": data} if data else {})})
        with pytest.raises(TiltlmError, match=needle.replace("{", r"\{").replace("}", r"\}")) as e:
            Trainer(config, policy=policy, target=Prior(prior))
        assert "\n" not in str(e.value)


def test_the_progress_bar_takes_a_row_of_preference_pairs():
    """A pair step's row has no reward/mean or kl/prior_seq (nothing sampled): the terminal's progress bar shows nan."""
    from tiltlm.train.loggers import progress_bar

    with progress_bar(True, "dpo", 2, 0) as advance:
        advance(1, {"step": 1, "loss": 0.69, "reward/margin": 0.0, "reward/accuracy": 0.0})


@pytest.mark.parametrize("algorithm", [{"name": "dpo"}, {"name": "online-dpo"}])
def test_a_resumed_run_draws_the_same_pairs_and_ends_bit_for_bit_the_same(tmp_path, algorithm):
    """Pairs per step drawn by the step's seed (offline) and the bt labels' step counter (online, checkpointed):
    a run cut after 3 steps and resumed equals the uninterrupted one, metrics and weights."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": "", "chosen": w, "rejected": l}) + "\n"
                            for w, l in [("aa", "b"), ("a", "bb"), ("ab", "ba"), ("aaa", ""), ("", "bbb")]))
    offline = algorithm["name"] == "dpo"
    cfg = parse_config({**({"data": {"path": str(path), "prompts_per_step": 2}} if offline else {}),
                        "target": {"beta": BETA, **({} if offline else {"reward": "count:a"})}, "algorithm": algorithm,
                        "sampling": {"max_new_tokens": 3, "n_per_context": 8}, "optim": {"steps": 6, "lr": 0.1},
                        "checkpoint": {"every": 1}})

    def parts():
        prior, policy = tabular()
        return {"policy": policy, "target": Prior(prior) if offline else Prior(prior) * Tilt("count:a", BETA)}

    full = parts()
    Trainer(cfg, **full, out_dir=tmp_path / "full").run()
    cut = Trainer(cfg, **parts(), out_dir=tmp_path / "cut")
    for _ in range(3):
        cut.train_step()
    resumed = parts()
    trainer = Trainer(cfg, **resumed, out_dir=tmp_path / "cut", resume=True)
    assert trainer.step == 3
    trainer.run()
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read("cut") == read("full")
    torch.testing.assert_close(resumed["policy"].logits, full["policy"].logits, atol=0, rtol=0)
