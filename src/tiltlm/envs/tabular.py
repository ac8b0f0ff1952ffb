"""Small stochastic decision trees whose optimal policies tiltlm computes exactly.

A ``TabularEnv`` of depth D: at each of D turns the policy picks one of A actions (one token each),
the environment answers with one of O observations drawn from p_env(o | h, a) and pays r(h, a, o).
Histories h = ((a_1, o_1), ..., (a_t, o_t)) are the nodes; ``stochasticity`` s mixes a seeded
deterministic answer with a seeded random distribution, p_env = (1-s)·onehot + s·Dirichlet(1), so
s = 0 is a deterministic environment (where forward- and reverse-KL optima coincide, docs/math.md §5)
and s = 1 a fully random one. ``preset="lottery"`` is docs/math.md §5's example: A pays 0, B pays +10
or -10 with probability 1/2 each.

Its matching exact policy is ``tiltlm.policies.tabular_env.TabularEnvPolicy`` (``make_prior`` builds pi0).
"""

from __future__ import annotations

import math
import random

import torch

from tiltlm.envs.base import Env, StepResult, register_env
from tiltlm.errors import TiltlmError
from tiltlm.policies.tabular_env import TabularEnvPolicy

History = tuple[tuple[int, int], ...]  # ((action index, observation index), ...)


@register_env
class TabularEnv(Env):
    """A depth-D tree MDP with explicit outcome tables ``outcomes[(h, a)] = [(o, prob, reward), ...]``."""

    name = "tabular"

    def __init__(
        self,
        *,
        depth: int = 2,
        n_actions: int = 2,
        n_observations: int = 2,
        stochasticity: float = 1.0,
        reward_scale: float = 1.0,
        final_reward: bool = False,
        seed: int = 0,
        prior_scale: float = 1.0,
        prior_seed: int | None = None,
        preset: str | None = None,
    ):
        if preset not in (None, "lottery"):
            raise TiltlmError(f"unknown tabular preset '{preset}'; available: lottery")
        if not (0.0 <= stochasticity <= 1.0):
            raise TiltlmError(f"stochasticity must be in [0, 1] (got {stochasticity}); 0 is deterministic, 1 fully random")
        if depth < 1 or n_actions < 1 or n_observations < 1:
            raise TiltlmError("a tabular environment needs depth, n_actions and n_observations >= 1")
        if (n_actions * n_observations) ** depth > 200_000:
            raise TiltlmError(f"(n_actions·n_observations)^depth = {(n_actions * n_observations) ** depth} trajectories is too many to solve exactly; lower depth")
        self.options = dict(depth=depth, n_actions=n_actions, n_observations=n_observations, stochasticity=stochasticity,
                            reward_scale=reward_scale, final_reward=final_reward, seed=seed, prior_scale=prior_scale,
                            prior_seed=prior_seed, preset=preset)
        self.prior_scale, self.prior_seed = float(prior_scale), prior_seed
        if preset == "lottery":
            self.actions, self.observations, self.depth = ["A", "B"], ["zero", "win", "lose"], 1
            self.outcomes = {((), 0): [(0, 1.0, 0.0)], ((), 1): [(1, 0.5, 10.0), (2, 0.5, -10.0)]}
            self.prior_scale = 0.0  # docs/math.md §5.4's example has a uniform prior
        else:
            self.actions = [f"a{i}" for i in range(n_actions)]
            self.observations = [f"o{i}" for i in range(n_observations)]
            self.depth = depth
            self.outcomes = {}
            for h in self._histories_by_depth():
                for a in range(n_actions):
                    rng = random.Random(f"tabular:{seed}:{h}:{a}")
                    fixed = rng.randrange(n_observations)
                    noise = [rng.gammavariate(1.0, 1.0) for _ in range(n_observations)]
                    probs = [(1 - stochasticity) * (o == fixed) + stochasticity * noise[o] / sum(noise) for o in range(n_observations)]
                    last = len(h) == depth - 1
                    self.outcomes[(h, a)] = [
                        (o, p, rng.gauss(0.0, reward_scale) if (last or not final_reward) else 0.0)
                        for o, p in enumerate(probs) if p > 0
                    ]
        self.max_turns = self.depth
        self.histories = self._histories_by_depth()  # non-terminal histories, shallow first
        self.node = {h: i for i, h in enumerate(self.histories)}
        self.vocab = ["<start>", *self.actions, *self.observations]

    def _histories_by_depth(self) -> list[History]:
        """Every history of fewer than ``depth`` turns (including unreachable ones of zero probability)."""
        layer: list[History] = [()]
        out: list[History] = []
        for _ in range(self.depth):
            out += layer
            layer = [h + ((a, o),) for h in layer for a in range(len(self.actions)) for o in range(len(self.observations))]
        return out

    @property
    def deterministic(self) -> bool:
        return all(len(v) == 1 for v in self.outcomes.values())

    def tasks(self) -> list[str]:
        return ["start"]

    def episode(self, seed: int) -> "_TabularEpisode":
        return _TabularEpisode(self, random.Random(seed))

    def make_prior(self) -> TabularEnvPolicy:
        """pi0: logits N(0, prior_scale²) from ``prior_seed`` (default seed + 1); uniform when prior_scale = 0."""
        gen = torch.Generator().manual_seed(self.prior_seed if self.prior_seed is not None else self.options["seed"] + 1)
        logits = torch.randn((len(self.histories), len(self.actions)), generator=gen) * self.prior_scale
        return TabularEnvPolicy(self, logits)


class _TabularEpisode:
    def __init__(self, env: TabularEnv, rng: random.Random):
        self.env, self.rng, self.history = env, rng, ()

    def reset(self, task: str) -> str:
        self.history = ()
        return "<start>"

    def step(self, action: str) -> StepResult:
        env = self.env
        if action not in env.actions:
            raise ValueError(f"unknown action {action!r}; actions: {env.actions}")
        a = env.actions.index(action)
        outcomes = env.outcomes[(self.history, a)]
        u, acc = self.rng.random(), 0.0
        o, _, reward = outcomes[-1]
        for o_, p, r in outcomes:
            acc += p
            if u < acc:
                o, reward = o_, r
                break
        self.history = self.history + ((a, o),)
        return StepResult(env.observations[o], float(reward), len(self.history) == env.depth, {})


def lottery_q_values(beta: float = 1.0) -> dict[str, float]:
    """Closed form of docs/math.md §5's lottery: optimistic Q_B = beta·log(½e^{10/β} + ½e^{-10/β}) in reward units, variational Q_B = 0."""
    x = 10.0 / beta
    return {"optimistic": beta * (x + math.log1p(math.exp(-2 * x)) - math.log(2)), "variational": 0.0}
