"""docs/extending.md runs as written: its algorithm file, dropped into tiltlm.algorithms' path, is found
by the package's own discovery and trains a tabular policy toward p* (exact KL down, baseline -> beta·log Z,
resume exact); its environment file, named by path in its YAML config, plays by its rules with environment
tokens masked and trains the embedded story model; and every module of the two packages is auto-imported."""

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tiltlm.algorithms
import tiltlm.envs
from tiltlm.algorithms import base as algorithm_base
from tiltlm.envs import base as env_base
from tiltlm.envs import rollout
from tiltlm.registry import import_submodules
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer, target_from_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "extending.md"
ALGORITHM_FILE = "src/tiltlm/algorithms/kl_pg_ema.py"
ENV_FILE = "my_envs/guess_who.py"


def blocks() -> dict[str, str]:
    """The doc's fenced blocks that name a file: ```lang title="path"``` -> {path: code}."""
    found = re.findall(r'^```\w+ title="([^"]+)"\n(.*?)^```', DOC.read_text(), re.S | re.M)
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), names
    return dict(found)


def test_the_doc_has_the_files_it_promises():
    b = blocks()
    assert {ALGORITHM_FILE, ENV_FILE, "try_kl_pg_ema.py", "configs/kl_pg_ema_default.yaml", "configs/guess_who.yaml"} <= set(b)
    # each config block is a config tiltlm accepts (the algorithm it names is registered below)
    for name in ("configs/kl_pg_ema_default.yaml", "configs/guess_who.yaml"):
        assert yaml.safe_load(b[name])["algorithm"]["name"] == "kl-pg-ema"


# ---- the algorithm ----------------------------------------------------------------------------------------


@pytest.fixture
def kl_pg_ema(tmp_path, monkeypatch):
    """The doc's algorithm file saved where a newcomer saves it (a folder on tiltlm.algorithms' path) and picked
    up by the package's own discovery, registered into a copy of the registry; removed afterwards."""
    module = "tiltlm.algorithms.kl_pg_ema"
    if module in sys.modules:  # the file exists in src/ for real: test that one
        pytest.skip("src/tiltlm/algorithms/kl_pg_ema.py exists; its own test covers it")
    folder = tmp_path / "algorithms"
    folder.mkdir()
    (folder / "kl_pg_ema.py").write_text(blocks()[ALGORITHM_FILE])
    monkeypatch.setattr(algorithm_base, "_REGISTRY", algorithm_base._REGISTRY.copy())
    monkeypatch.setattr(tiltlm.algorithms, "__path__", [*tiltlm.algorithms.__path__, str(folder)])
    assert "kl-pg-ema" not in algorithm_base.available_algorithms()
    try:
        imported = import_submodules("tiltlm.algorithms", tiltlm.algorithms.__path__)
        assert "kl_pg_ema" in imported
        assert "kl-pg-ema" in algorithm_base.available_algorithms()
        yield sys.modules[module]
    finally:
        sys.modules.pop(module, None)
        importlib.invalidate_caches()


def _tabular_namespace() -> dict:
    namespace: dict = {"__name__": "try_kl_pg_ema"}
    exec(compile(blocks()["try_kl_pg_ema.py"], "docs/extending.md:try_kl_pg_ema.py", "exec"), namespace)  # noqa: S102
    return namespace


def test_new_algorithm_trains_a_tabular_policy_toward_p_star(kl_pg_ema, capsys):
    torch.set_num_threads(1)
    ns = _tabular_namespace()  # the doc's own script: 40 steps on the 15-sequence space, exact metrics
    trainer, before, after = ns["trainer"], ns["before"], ns["after"]
    assert type(trainer.algorithm).__name__ == "KlPgEma" and trainer.algorithm.config.decay == 0.9
    # reverse KL to p* (what this method minimises) falls from 0.269 to ~0.003
    assert before["kl/policy_target_exact"] == pytest.approx(0.269, abs=1e-3)
    assert after["kl/policy_target_exact"] < 0.02
    assert after["kl/policy_target_exact"] < before["kl/policy_target_exact"] / 10
    assert after["kl/target_exact"] < before["kl/target_exact"] / 5  # and p* is covered too
    # E_pi[R] = beta·(log Z - KL(pi||p*)): the running baseline ends near beta·log Z (beta = 1), away from its start
    log_z = after["log_z/exact"]
    assert after["baseline/mean"] == pytest.approx(log_z, abs=0.1)
    rows = ns["rows"]
    assert rows[0]["baseline/mean"] == pytest.approx(log_z - before["kl/policy_target_exact"], abs=0.2)
    # what the doc says it prints is what it prints (to the printed precision, give or take float noise)
    text = " ".join(DOC.read_text().split())
    stated = re.search(r"This prints `KL\(pi\|\|p\*\) ([\d.]+) -> ([\d.]+)`\. The baseline ends at ([\d.]+) against beta·log Z = ([\d.]+)", text)
    printed = re.search(r"KL\(pi\|\|p\*\) ([\d.]+) -> ([\d.]+)\nbaseline ([\d.]+), beta·log Z = ([\d.]+)", capsys.readouterr().out)
    assert stated and printed
    assert [float(x) for x in printed.groups()] == pytest.approx([float(x) for x in stated.groups()], abs=2e-3)


def _tabular_trainer(out_dir, steps=6, **kwargs):
    from tiltlm.policies import TabularPolicy
    from tiltlm.targets import Prior, Tilt

    prior = TabularPolicy.random(list("ab") + ["<eos>"], max_new_tokens=3, seed=0)
    prior.logits.requires_grad_(False)
    policy = prior.copy()
    policy.logits.requires_grad_(True)
    cfg = parse_config({"algorithm": {"name": "kl-pg-ema", "decay": 0.5}, "target": {"reward": "count:a", "beta": 1.0},
                        "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": steps, "lr": 0.1},
                        "metrics": {"diversity": False}, "checkpoint": {"every": 1}})
    return Trainer(cfg, policy=policy, target=Prior(prior) * Tilt("count:a", 1.0), out_dir=out_dir, **kwargs)


def test_new_algorithm_state_is_checkpointed(kl_pg_ema, tmp_path, monkeypatch):
    """Resuming restores the running baseline: resumed == uninterrupted; forgetting the state changes the run."""
    torch.set_num_threads(1)
    full = _tabular_trainer(tmp_path / "full")
    full_rows = full.run()
    cut = _tabular_trainer(tmp_path / "cut")
    for _ in range(3):
        cut.train_step()
    resumed = _tabular_trainer(tmp_path / "cut", resume=True)
    assert resumed.step == 3 and resumed.algorithm.updates == {"": 3}
    assert resumed.algorithm.state_dict() == cut.algorithm.state_dict()
    assert resumed.run() == full_rows[3:]
    assert resumed.algorithm.state_dict() == full.algorithm.state_dict()
    # the state matters: a resume that drops it computes other advantages
    monkeypatch.setattr(kl_pg_ema.KlPgEma, "load_state_dict", lambda self, state: None)
    forgetful = _tabular_trainer(tmp_path / "cut", resume=True)
    assert forgetful.algorithm.updates == {}
    assert forgetful.train_step()["loss/advantage_abs"] != full_rows[3]["loss/advantage_abs"]


def test_new_algorithm_options_are_validated(kl_pg_ema):
    from tiltlm.errors import TiltlmError

    with pytest.raises(TiltlmError, match="has no option 'decai'; did you mean 'decay'"):
        parse_config({"algorithm": {"name": "kl-pg-ema", "decai": 0.9}})
    with pytest.raises(TiltlmError, match="option 'decay'"):
        parse_config({"algorithm": {"name": "kl-pg-ema", "decay": 1.0}})
    assert parse_config(yaml.safe_load(blocks()["configs/kl_pg_ema_default.yaml"])).algorithm.decay == 0.9


# ---- the environment --------------------------------------------------------------------------------------


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / ENV_FILE
    path.parent.mkdir(parents=True)
    path.write_text(blocks()[ENV_FILE])
    return path


def rules_return(actions: list[str], culprit: str, names: tuple[str, ...]) -> tuple[float, list[str]]:
    """The game's rules written out again: (return, observations after each action)."""
    observations = []
    for action in actions:
        guess = next((w for w in re.findall(r"[A-Z][a-z]+", action) if w in names), None)
        if guess == culprit:
            return 1.0, observations + [" Yes!"]
        observations.append(" Say a name. It was" if guess is None else f" No, not {guess}. It was")
    return 0.0, observations


def test_new_environment_plays_by_its_rules(env_file):
    cls = env_base.env_class(f"{env_file}:GuessWho")  # exactly how `env: {name: path:Class}` loads it
    env = env_base.get_env(f"{env_file}:GuessWho")
    assert issubclass(cls, env_base.Env) and env.tasks() == ["Lucy", "Tom", "Jack", "Mia"] and env.max_turns == 3
    assert env.prompt == "Lucy, Tom, Jack and Mia were at the party."
    episode = env.episode(seed=0)
    assert episode.reset("Jack") == " Who ate the cake? It was"
    script = [("a big dog", " Say a name. It was", 0.0, False), ("Tom and Jack", " No, not Tom. It was", 0.0, False),
              ("my friend Jack", " Yes!", 1.0, True)]
    for action, observation, reward, done in script:
        r = episode.step(action)
        assert (r.observation, r.reward, r.done, r.info["success"]) == (observation, reward, done, done)
    from tiltlm.errors import TiltlmError

    with pytest.raises(TiltlmError, match="has no option 'nmes'; did you mean 'names'"):
        env_base.get_env(f"{env_file}:GuessWho", nmes=["Ann"])


@pytest.fixture(scope="module")
def lm():
    from tiltlm.policies.hf import HFPolicy

    return HFPolicy.from_pretrained("default")


def test_new_environment_rollouts_mask_env_tokens_and_return_the_rules(env_file, lm):
    torch.set_num_threads(1)
    env = env_base.get_env(f"{env_file}:GuessWho")
    samples = rollout(lm, env, env.tasks(), 6, seed=0, max_action_tokens=4)
    assert len(samples) == 24 and samples.context_ids[0].tolist() == lm.encode_context(env.prompt)
    returns = []
    for i, t in enumerate(samples.trajectories):
        assert t.failure is None and 1 <= t.turns <= 3
        expected, observations = rules_return(t.actions, t.task, env.names)
        assert t.total_reward == expected and t.observations[1:] == observations
        assert t.success == (expected == 1.0) and t.truncated == (expected == 0.0)
        returns.append(expected)
        # the history: reset obs, a_1, o_1, …, a_K — environment tokens exactly the observations before each action
        real, mask = samples.attn[i], samples.mask[i]
        env_ids = samples.ids[i][real & ~mask].tolist()
        assert env_ids == [tok for o in t.observations[: t.turns] for tok in lm.encode_text(o)]
        assert (samples.token_logp[i][~mask] == 0).all() and (samples.token_logp[i][mask] <= 0).all()
        for k, action in enumerate(t.actions, 1):  # the policy tokens of turn k are action k (and its EOS, if it ended there)
            ids = samples.ids[i][mask & (samples.turn[i] == k)].tolist()
            assert lm.decode([ids[:-1] if ids[-1] == lm.eos_id else ids])[0] == action
    # the story model already names the culprit sometimes, and sometimes not: the rules were exercised both ways
    assert 0 < sum(returns) < len(returns)
    assert any(o.startswith(" No, not") for t in samples.trajectories for o in t.observations)
    # log pi(tau) rescored by the policy equals the sum over its own tokens recorded while sampling
    assert torch.allclose(lm.log_prob(samples), samples.logp, atol=1e-4)


def test_the_doc_config_trains_the_new_algorithm_in_the_new_environment(kl_pg_ema, env_file, lm, tmp_path):
    torch.set_num_threads(1)
    data = yaml.safe_load(blocks()["configs/guess_who.yaml"])
    assert data["env"]["name"] == f"{ENV_FILE}:GuessWho"
    data["env"]["name"] = f"{env_file}:GuessWho"
    data["optim"]["steps"] = 2
    data["sampling"]["n_per_context"] = 4
    cfg = parse_config(data)
    assert cfg.target.reward == "env" and cfg.algorithm.name == "kl-pg-ema"
    trainer = Trainer(cfg, policy=lm.copy(), target=target_from_config(cfg, lm))
    rows = trainer.run()
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["env/failure_rate"] == 0 and 1 <= row["env/turns_mean"] <= 3
        assert 0 <= row["env/return_mean"] == row["env/success_rate"] <= 1  # return 1 iff solved
        assert sum(row[f"kl/prior_turn_{t}"] for t in (1, 2, 3) if f"kl/prior_turn_{t}" in row) == pytest.approx(row["kl/prior_seq"], abs=1e-5)
    # one running baseline per task (the episodes' context), updated once per step
    assert trainer.algorithm.updates == {name: 2 for name in ("Lucy", "Tom", "Jack", "Mia")}
    assert rows[0]["loss"] != 0


# ---- auto-discovery ---------------------------------------------------------------------------------------

SKIPPED = {"envs": {"api_server", "make_search_collection"}}  # scripts, not environments (tiltlm/envs/__init__.py)


@pytest.mark.parametrize("package", ["algorithms", "envs"])
def test_every_module_of_the_package_is_imported(package):
    folder = ROOT / "src" / "tiltlm" / package
    files = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    skipped = SKIPPED.get(package, set())
    assert skipped <= files  # the skip list names real files
    importlib.import_module(f"tiltlm.{package}")
    missing = sorted(f"tiltlm.{package}.{name}" for name in files - skipped if f"tiltlm.{package}.{name}" not in sys.modules)
    assert not missing, f"not imported by `import tiltlm.{package}`: {missing}"
    assert len(files - skipped) >= 6  # the glob sees the package
