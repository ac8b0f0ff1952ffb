"""Property-based tests (hypothesis): the config schema and the target algebra.

Config: every valid config survives YAML -> parse_config -> model_dump -> YAML unchanged, and no
input, however malformed, raises anything but a one-line TiltlmError.
Targets (on an enumerated tabular space, with hand-written rewards): log-scores of products add,
products associate and commute, Tilt with beta -> inf is the prior, a shift of r leaves p* unchanged,
and a Constraint's log-potential is 0 or -inf, never NaN.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space, normalise
from tiltlm.policies import TabularPolicy
from tiltlm.targets import Constraint, Prior, Tilt
from tiltlm.train.config import load_config, parse_config

SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---- the config schema ------------------------------------------------------------------------------

positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
betas = st.floats(min_value=1e-3, max_value=1e3)

algorithms = st.one_of(
    st.fixed_dictionaries({"name": st.just("kl-pg")}, optional={"estimator": st.sampled_from(["k1", "k2", "k3"]),
                                                                "kl_in": st.sampled_from(["reward", "loss"])}),
    st.fixed_dictionaries({"name": st.just("ppo-kl")}, optional={"epochs": st.integers(1, 8), "clip": st.none() | positive}),
    st.fixed_dictionaries({"name": st.sampled_from(["dpg", "gdc++"])}, optional={"off_policy": st.booleans(),
                                                                                 "proposal_check_every": st.integers(0, 10)}),
    st.fixed_dictionaries({"name": st.just("f-dpg")}, optional={"divergence": st.sampled_from(["rkl", "fkl", "js", "tv"])}),
    st.fixed_dictionaries({"name": st.just("reinforce")}, optional={"entropy_coef": st.floats(0, 10),
                                                                    "set_reward": st.sampled_from(["none", "max", "any", "distinct"])}),
)
valid_configs = st.fixed_dictionaries(
    {"algorithm": algorithms},
    optional={
        "target": st.fixed_dictionaries({}, optional={
            "reward": st.sampled_from(["count:a", "contains:dog", "length", "words", "regex:^a+$"]),
            "beta": betas,
            "constraints": st.lists(st.sampled_from(["contains:a", "regex:b", "count:c"]), max_size=2)}),
        "sampling": st.fixed_dictionaries({}, optional={
            "contexts": st.lists(st.text(max_size=20), min_size=1, max_size=3),
            "n_per_context": st.integers(2, 256), "max_new_tokens": st.integers(1, 512),
            "temperature": st.floats(0.01, 10), "top_p": st.floats(0.01, 1.0)}),
        "optim": st.fixed_dictionaries({}, optional={
            "steps": st.integers(1, 10**6), "lr": positive, "optimizer": st.sampled_from(["adam", "sgd"]),
            "grad_clip": st.none() | positive, "weight_decay": st.floats(0, 1),
            "schedule": st.sampled_from(["constant", "linear", "cosine"]), "warmup_steps": st.integers(0, 100)}),
        "metrics": st.fixed_dictionaries({}, optional={"exact_every": st.integers(0, 100), "diversity": st.booleans(),
                                                       "kl_estimator": st.sampled_from(["k1", "k2", "k3"])}),
        "checkpoint": st.fixed_dictionaries({}, optional={"every": st.integers(0, 1000)}),
        "lora": st.none() | st.fixed_dictionaries({}, optional={"r": st.integers(1, 64), "alpha": st.integers(1, 64)}),
        "seed": st.integers(-(2**31), 2**31),
    },
)


@SETTINGS
@given(data=valid_configs)
def test_valid_configs_round_trip_through_yaml(data, tmp_path):
    cfg = parse_config(data)
    dumped = json.loads(cfg.model_dump_json())  # exactly what a run writes as config.yaml
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(dumped, sort_keys=False))
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    # what the user wrote is what was parsed
    for section, values in data.items():
        if isinstance(values, dict) and section != "algorithm":
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert (tuple(value) if isinstance(value, list) else value) == got
    assert cfg.algorithm.name == data["algorithm"]["name"]
    assert "beta" not in type(cfg.algorithm).model_fields  # one beta per run: the target's
    # an algorithm.beta (older configs) is accepted only when it is the target's, and then changes nothing
    with_beta = {**data, "algorithm": {**data["algorithm"], "beta": cfg.target.beta}}
    assert parse_config(with_beta) == cfg
    with pytest.raises(TiltlmError, match="differs from target.beta"):
        parse_config({**data, "algorithm": {**data["algorithm"], "beta": cfg.target.beta * 2}})


junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(), st.text(max_size=12),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
PATHS = ["algorithm", "algorithm.name", "algorithm.beta", "algorithm.estimator", "algorithm.epochs", "target", "target.reward",
         "target.beta", "target.constraints", "sampling", "sampling.contexts", "sampling.n_per_context", "sampling.top_p",
         "optim", "optim.lr", "optim.steps", "optim.grad_clip", "optim.schedule", "metrics.kl_estimator", "checkpoint.every",
         "lora", "lora.r", "seed", "prior", "unknown_key", "sampling.unknown_key"]


@SETTINGS
@given(data=valid_configs, path=st.sampled_from(PATHS), value=junk)
def test_any_bad_value_is_a_one_line_tiltlm_error(data, path, value):
    """Replace one entry of a valid config by junk: either still valid, or a TiltlmError; never another exception."""
    data = json.loads(json.dumps(data))
    *parents, last = path.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {} if p != "algorithm" else {"name": "kl-pg"}
        node = node[p]
    node[last] = value
    try:
        cfg = parse_config(data)
    except TiltlmError as e:
        assert "\n" not in str(e) and str(e).strip()
    else:
        assert isinstance(cfg.optim.lr, float) and cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)
        assert cfg.target.beta > 0 and math.isfinite(cfg.target.beta)


json_like = st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=8) | st.integers(),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                         max_leaves=10)


@SETTINGS
@given(data=json_like, algorithm=junk)
def test_arbitrary_data_is_a_tiltlm_error(data, algorithm):
    """Any JSON-like document (with or without a junk ``algorithm``): a TiltlmError, never another exception."""
    for document in (data, {**data, "algorithm": algorithm} if isinstance(data, dict) else [data, algorithm]):
        with pytest.raises(TiltlmError):
            parse_config(document)


# ---- the target algebra -------------------------------------------------------------------------------

coefficient = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


def linear_reward(c_a: float, c_b: float, c_len: float):
    """r(x) = c_a #a + c_b #b + c_len |x| for texts over {a, b}: |r| <= 3·sum|c|."""
    return lambda texts: [c_a * t.count("a") + c_b * t.count("b") + c_len * len(t) for t in texts]


@pytest.fixture(scope="module")
def spaces():
    """Enumerated spaces (15 sequences each) of three random tabular priors over {a, b, <eos}, L = 3."""
    out = []
    for seed in range(3):
        prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=seed, scale=2.0)
        out.append((prior, enumerate_space(prior).samples))
    return out


@SETTINGS
@given(k=st.integers(0, 2), a=st.tuples(coefficient, coefficient, coefficient), b=st.tuples(coefficient, coefficient, coefficient),
       beta_a=betas, beta_b=betas)
def test_log_score_of_a_product_is_the_sum(spaces, k, a, b, beta_a, beta_b):
    prior, samples = spaces[k]
    A, B = Tilt(linear_reward(*a), beta_a), Tilt(linear_reward(*b), beta_b)
    both = (Prior(prior) * A * B).log_score(samples)
    scale = 1 + float(both.abs().max())
    torch.testing.assert_close(both, (Prior(prior) * A).log_score(samples) + B.log_potential(samples), rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(both, prior.log_prob(samples).double() + A.log_potential(samples) + B.log_potential(samples),
                               rtol=0, atol=1e-12 * scale)
    # commutes; Tilt(r, b1) * Tilt(r, b2) = Tilt(r, 1/(1/b1 + 1/b2))
    torch.testing.assert_close(both, (Prior(prior) * B * A).log_score(samples), rtol=0, atol=1e-12 * scale)
    same = Prior(prior) * Tilt(linear_reward(*a), beta_a) * Tilt(linear_reward(*a), beta_b)
    torch.testing.assert_close(same.log_score(samples), (Prior(prior) * Tilt(linear_reward(*a), 1 / (1 / beta_a + 1 / beta_b))).log_score(samples),
                               rtol=1e-9, atol=1e-9 * scale)


@SETTINGS
@given(k=st.integers(0, 2), coeffs=st.lists(st.tuples(coefficient, coefficient, coefficient), min_size=3, max_size=3),
       beta=betas)
def test_products_associate(spaces, k, coeffs, beta):
    prior, samples = spaces[k]
    A, B, C = (Tilt(linear_reward(*c), beta) for c in coeffs)
    left = ((Prior(prior) * A) * B) * C
    right = Prior(prior) * (A * (B * C))
    middle = (Prior(prior) * A) * (B * C)
    assert [f for f in left.factors] == [f for f in right.factors] == [f for f in middle.factors] == [A, B, C]
    assert torch.equal(left.log_score(samples), right.log_score(samples))
    assert torch.equal(left.log_score(samples), middle.log_score(samples))


@SETTINGS
@given(k=st.integers(0, 2), a=st.tuples(coefficient, coefficient, coefficient), big=st.floats(1e8, 1e15))
def test_tilt_with_beta_to_infinity_is_the_prior(spaces, k, a, big):
    prior, samples = spaces[k]
    r = torch.tensor(linear_reward(*a)(samples.texts), dtype=torch.float64)
    log_prior = prior.log_prob(samples).double()
    log_p, log_z = normalise((Prior(prior) * Tilt(linear_reward(*a), big)).log_score(samples))
    log_pi0, log_z0 = normalise(log_prior)  # the float32 table sums to 1 within ~1e-7: compare normalised
    bound = 2 * float(r.abs().max()) / big  # |log p*(x) - log pi0(x)| <= (max r - min r)/beta
    assert float((log_p - log_pi0).abs().max()) <= bound + 1e-12
    assert abs(log_z - log_z0) <= bound / 2 + 1e-12
    assert torch.equal((Prior(prior) * Tilt(linear_reward(*a), math.inf)).log_score(samples), log_prior)


@SETTINGS
@given(k=st.integers(0, 2), a=st.tuples(coefficient, coefficient, coefficient), shift=coefficient, beta=betas)
def test_shifting_the_reward_leaves_p_star_unchanged(spaces, k, a, shift, beta):
    """p* ∝ pi0 exp((r + c)/beta) = p*: only log Z moves, by c/beta (logsumexp keeps both finite)."""
    prior, samples = spaces[k]
    log_p, log_z = normalise((Prior(prior) * Tilt(linear_reward(*a), beta)).log_score(samples))
    def shifted(texts):
        return [v + shift for v in linear_reward(*a)(texts)]
    log_p2, log_z2 = normalise((Prior(prior) * Tilt(shifted, beta)).log_score(samples))
    assert math.isfinite(log_z) and math.isfinite(log_z2)
    assert log_z2 - log_z == pytest.approx(shift / beta, rel=1e-9, abs=1e-6 * (1 + abs(log_z)))
    torch.testing.assert_close(log_p.exp(), log_p2.exp(), rtol=0, atol=1e-9)


predicate_values = st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=15, max_size=15)


@SETTINGS
@given(k=st.integers(0, 2), values=predicate_values, a=st.tuples(coefficient, coefficient, coefficient), beta=betas)
def test_a_constraint_is_zero_or_minus_infinity_never_nan(spaces, k, values, a, beta):
    prior, samples = spaces[k]
    by_text = dict(zip(samples.texts, values))
    constraint = Constraint(lambda texts: [by_text[t] for t in texts])
    log_phi = constraint.log_potential(samples)
    expected = torch.tensor([0.0 if by_text[t] > 0 else -math.inf for t in samples.texts], dtype=torch.float64)
    assert torch.equal(log_phi, expected)
    score = (Prior(prior) * Tilt(linear_reward(*a), beta) * constraint).log_score(samples)
    assert not bool(torch.isnan(score).any())
    assert torch.equal(torch.isneginf(score), torch.isneginf(expected))
    if any(v > 0 for v in values):  # p* is p restricted to the satisfying sequences, renormalised
        log_p, _ = normalise(score)
        assert float(log_p.exp()[torch.isneginf(expected)].sum()) == 0.0
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    else:
        with pytest.raises(TiltlmError, match="zero"):
            normalise(score)


@SETTINGS
@given(bad=st.sampled_from([math.nan, math.inf, -math.inf]), k=st.integers(0, 2))
def test_a_constraint_predicate_returning_nan_or_inf_is_an_error_not_a_nan(spaces, bad, k):
    _, samples = spaces[k]
    constraint = Constraint(lambda texts: [bad] * len(texts))
    with pytest.raises(TiltlmError, match="finite floats"):
        constraint.log_potential(samples)
