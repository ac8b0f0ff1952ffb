"""Environment episodes and reward models on Ray actors (``rollout: {backend: ray, num_workers: N}``).

Design: the policy generates in the trainer's process, batched as always (one call per turn for
every live episode, on the trainer's GPU); only the environment's ``reset``/``step`` calls go to the
actors. Each actor owns one copy of the environment (a search index, a tool server, a simulator) and
the episodes assigned to it (episode k of a rollout lives on actor k mod N). Episode i is still seeded
``episode_seed(seed, i)`` and every action is drawn by the trainer exactly as in a local rollout, so
the trajectories — ids, masks, token log-probs, rewards — are identical to ``rollout`` without Ray.
Shipping policy weights to the actors instead would put generation on CPUs, cost a weight sync per
step, and make the token log-probs depend on the hardware that drew them.

Faults stay contained per episode: each actor wraps its env calls in the same timeout/garbage checks
as a local rollout and returns the failure reason. Without ``address``, a local Ray is started
(``ray.init``); with it, the trainer joins that cluster. Ray is an optional extra: pip install "tiltlm[ray]".
"""

from __future__ import annotations

from typing import Any, Callable

from tiltlm.envs.rollout import Outcome, reset_episode, step_episode
from tiltlm.errors import TiltlmError


def _ray():
    try:
        import ray
    except ImportError:
        raise TiltlmError('rollout.backend ray needs the package ray; pip install "tiltlm[ray]" (or set rollout.backend: local)') from None
    return ray


def ensure_ray(address: str | None = None):
    """The ray module, connected: to ``address`` when given, else to a Ray already initialised in this
    process, else to a new local instance. Returns (ray, started) where started says we called init."""
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    options = {"address": address} if address else {}  # no address: start a local instance
    ray.init(include_dashboard=False, log_to_driver=False, **options)
    return ray, True


class _EpisodeWorker:
    """A Ray actor: one environment instance and the live episodes of the current rollout."""

    def __init__(self, make_env: Callable[[], Any]):
        self.env = make_env()
        self.live: dict[int, Any] = {}

    def reset(self, items, timeout_s, max_chars) -> list[Outcome]:
        self.live = {}
        return [reset_episode(self.env, self.live, i, s, task, timeout_s, max_chars) for i, s, task in items]

    def step(self, items, turn, timeout_s, max_chars) -> list[Outcome]:
        return [step_episode(self.live, i, action, turn, timeout_s, max_chars) for i, action in items]

    def close(self) -> None:
        self.env.close()


class RayEpisodes:
    """The runner of ``tiltlm.envs.rollout`` that plays episodes on ``num_workers`` Ray actors.

    ``make_env`` builds the environment inside each actor (e.g. ``functools.partial(get_env, "search")``;
    Ray pickles it, so it must be importable there). Use as a context manager or call ``close``.
    """

    def __init__(self, make_env: Callable[[], Any], *, num_workers: int = 2, address: str | None = None, cpus_per_worker: float = 1.0):
        if num_workers < 1:
            raise TiltlmError(f"rollout.num_workers must be >= 1 (got {num_workers})")
        self.ray, self._started = ensure_ray(address)
        actor = self.ray.remote(num_cpus=cpus_per_worker)(_EpisodeWorker)
        self.workers = [actor.remote(make_env) for _ in range(num_workers)]

    def _scatter(self, items: list, call: Callable) -> list:
        """Send items k to worker k mod N (in parallel) and return the outcomes in the items' order."""
        n = len(self.workers)
        shares = [[] for _ in range(n)]
        for item in items:
            shares[item[0] % n].append(item)
        refs = {w: call(self.workers[w], share) for w, share in enumerate(shares) if share}
        try:
            results = {w: iter(r) for w, r in zip(refs, self.ray.get(list(refs.values())))}
        except self.ray.exceptions.RayError as e:
            raise TiltlmError(f"a Ray rollout worker died ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                              "check the environment can be built on the workers, or use rollout.backend: local") from None
        return [next(results[item[0] % n]) for item in items]

    def reset(self, items, *, timeout_s, max_chars) -> list[Outcome]:
        return self._scatter(items, lambda w, share: w.reset.remote(share, timeout_s, max_chars))

    def step(self, items, turn, *, timeout_s, max_chars) -> list[Outcome]:
        return self._scatter(items, lambda w, share: w.step.remote(share, turn, timeout_s, max_chars))

    def close(self) -> None:
        """Close each actor's environment and end the actors (and a Ray this object started)."""
        if not self.workers:
            return
        try:
            self.ray.get([w.close.remote() for w in self.workers])
        except self.ray.exceptions.RayError:
            pass
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
        if self._started:
            self.ray.shutdown()

    def __enter__(self) -> "RayEpisodes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RewardWorker:
    def __init__(self, spec):
        from tiltlm.rewards import get_reward

        self.reward = get_reward(spec)

    def score(self, texts, contexts, columns=None):
        return self.reward(texts, contexts, columns)


def ray_reward(spec, *, num_workers: int = 2, address: str | None = None, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0):
    """The reward ``spec`` computed on ``num_workers`` Ray actors, each holding its own copy (e.g. a
    reward model on its own GPU); a batch is cut into contiguous chunks, one per actor. The values
    are those of the reward in this process (a batched model may differ at float rounding)."""
    from tiltlm.rewards.base import Reward, get_reward

    name = get_reward(spec).name if not isinstance(spec, str) else spec
    ray, _ = ensure_ray(address)
    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_RewardWorker)
    workers = [actor.remote(spec) for _ in range(num_workers)]

    def score(texts: list[str], contexts: list[str] | None, **columns):
        n = len(texts)
        cuts = [k * n // len(workers) for k in range(len(workers) + 1)]
        refs = [w.score.remote(texts[a:b], None if contexts is None else contexts[a:b], {k: v[a:b] for k, v in columns.items()})
                for w, a, b in zip(workers, cuts, cuts[1:]) if b > a]
        return [float(v) for part in ray.get(refs) for v in part.tolist()]

    return Reward(name, score)
