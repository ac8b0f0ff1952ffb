"""Episodes played on Ray actors equal episodes played in this process (same seeds, same trajectories).

The trainer's process generates every action; actors only reset and step their copy of the
environment, so ids, masks, token log-probs, rewards and transcripts must match a local rollout
exactly — with a stochastic tabular MDP and with twenty questions (noisy answers) played by the
embedded story LM.
"""

import json
from functools import partial

import pytest
import torch

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install "tiltlm[ray]"')

from tiltlm.distributed.ray_rollout import RayEpisodes, ray_reward  # noqa: E402
from tiltlm.envs import get_env, rollout  # noqa: E402
from tiltlm.rewards import get_reward  # noqa: E402
from tiltlm.train.build import build  # noqa: E402
from tiltlm.train.config import parse_config  # noqa: E402
from tiltlm.train.loop import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def assert_same_rollout(a, b):
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask) and torch.equal(a.attn, b.attn)
    assert torch.equal(a.turn, b.turn) and torch.equal(a.group, b.group) and torch.equal(a.eos, b.eos)
    torch.testing.assert_close(a.token_logp, b.token_logp, atol=0, rtol=0)
    assert a.texts == b.texts
    assert [t.to_json() for t in a.trajectories] == [t.to_json() for t in b.trajectories]


def test_tabular_and_text_rollouts_on_ray_equal_local_ones(local_ray):
    env = get_env("tabular", depth=3, n_actions=2, n_observations=3, seed=2)  # stochastic: seeds decide the observations
    policy = env.make_prior()
    local = rollout(policy, env, ["start"], 24, seed=11, timeout_s=None)
    with RayEpisodes(partial(get_env, "tabular", depth=3, n_actions=2, n_observations=3, seed=2), num_workers=2) as workers:
        remote = rollout(policy, env, ["start"], 24, seed=11, timeout_s=None, runner=workers)
        again = rollout(policy, env, ["start"], 24, seed=12, timeout_s=None, runner=workers)  # the actors start afresh
    assert_same_rollout(remote, local)
    assert len({tuple(t.observations) for t in local.trajectories}) > 3  # the episodes really differ
    assert_same_rollout(again, rollout(policy, env, ["start"], 24, seed=12, timeout_s=None))

    from tiltlm.policies import HFPolicy

    lm = HFPolicy.from_pretrained("default", max_new_tokens=8)
    options = {"max_turns": 2, "noise": 0.3}
    text_env = get_env("dialogue", **options)
    tasks = text_env.tasks()[:3]
    local = rollout(lm, text_env, tasks, 2, seed=5, max_action_tokens=8)
    with RayEpisodes(partial(get_env, "dialogue", **options), num_workers=2) as workers:
        remote = rollout(lm, text_env, tasks, 2, seed=5, max_action_tokens=8, runner=workers)
    assert_same_rollout(remote, local)
    assert any(not m for m in local.mask[0].tolist()) and any(local.mask[0].tolist())  # env tokens and policy tokens


def test_training_with_the_ray_backend_logs_what_the_local_backend_logs(local_ray, tmp_path):
    config = {"algorithm": {"name": "kl-pg"}, "target": {"beta": 1.0}, "sampling": {"n_per_context": 8},
              "env": {"name": "tabular", "options": {"depth": 2, "seed": 3}, "timeout_s": None},
              "optim": {"steps": 2, "lr": 0.1}, "metrics": {"diversity": False}, "seed": 0}
    rows = {}
    for backend in ("local", "ray"):
        cfg = parse_config({**config, "rollout": {"backend": backend, "num_workers": 2}})
        policy, target = build(cfg)
        Trainer(cfg, policy=policy, target=target, out_dir=tmp_path / backend).run()
        rows[backend] = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
    assert rows["ray"] == rows["local"]


def test_a_reward_on_ray_actors_scores_as_in_this_process(local_ray):
    texts = ["a dog and a dog", "cat", "", "dog dog dog", "the dog"]
    remote = ray_reward("count:dog", num_workers=2)
    assert remote.name == "count:dog"
    torch.testing.assert_close(remote(texts), get_reward("count:dog")(texts), atol=0, rtol=0)
    assert remote(texts).tolist() == [2.0, 0.0, 0.0, 3.0, 1.0]
