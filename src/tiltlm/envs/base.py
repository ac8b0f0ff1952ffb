"""The environment protocol, the episode record, and fault containment around every env call.

An environment family (``Env``) owns whatever episodes share — a search index, an HTTP tool server,
a knowledge table — and hands out one ``Episode`` per trajectory:

    env = get_env("search")                 # registry, did-you-mean on unknown names
    episode = env.episode(seed=7)           # one trajectory's state, seeded noise
    obs = episode.reset(task)               # first observation (environment tokens)
    obs, reward, done, info = episode.step(action_text)

The policy only ever writes actions; observations are environment tokens, conditioned on but never
trained on (docs/math.md §5: p_env is not ours to change, and it cancels from every importance ratio).

Every env call goes through ``guarded``: an exception, a hang past ``timeout_s``, or garbage (a
non-text observation, a non-finite reward) ends that episode as a recorded failure with its reason;
the run continues. Over-long or non-UTF-8 observations are capped/repaired and noted, not failed.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

from tiltlm.errors import TiltlmError
from tiltlm.registry import Registry, UserCodeError, load_user_object


@dataclass
class StepResult:
    """What ``Episode.step`` returns; a 4-tuple (observation, reward, done, info) is accepted too."""

    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)


class Episode(Protocol):
    def reset(self, task: str) -> str: ...

    def step(self, action: str) -> StepResult | tuple: ...


class Env:
    """An environment family. Subclasses set ``name`` and implement ``tasks`` and ``episode``.

    ``max_turns`` bounds the number of policy actions per episode; an episode still running after
    it is truncated (done, no failure). ``prompt`` is the text every trajectory starts from (the
    policy's context; '' = just BOS). Use as a context manager, or call ``close``, to release
    resources such as a server process.
    """

    name: ClassVar[str]
    max_turns: int = 4
    prompt: str = ""

    def tasks(self) -> list[str]:
        """Task ids: each episode plays one; episodes of one task form a group (shared baseline)."""
        raise NotImplementedError

    def episode(self, seed: int) -> Episode:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Trajectory:
    """The record of one episode: what was said, what came back, rewards, how it ended."""

    task: str
    observations: list[str] = field(default_factory=list)  # observations[0] is the reset observation
    actions: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # one per action
    infos: list[dict] = field(default_factory=list)
    done: bool = False
    truncated: bool = False  # ran out of turns (or of the model's window) before the env said done
    failure: str | None = None  # why the environment failed this episode (None = no fault)
    notes: list[str] = field(default_factory=list)  # repaired faults: capped output, invalid UTF-8

    @property
    def total_reward(self) -> float:
        """R(tau) = sum of per-turn rewards."""
        return float(sum(self.rewards))

    @property
    def turns(self) -> int:
        return len(self.actions)

    @property
    def success(self) -> bool:
        """The env's own success flag (info['success'] of the last step), else R(tau) > 0."""
        for info in reversed(self.infos):
            if "success" in info:
                return bool(info["success"])
        return self.failure is None and self.total_reward > 0

    def transcript(self) -> str:
        parts = [f"[env] {self.observations[0]}"] if self.observations else []
        for t, action in enumerate(self.actions):
            parts.append(f"[policy] {action}")
            if t + 1 < len(self.observations):
                parts.append(f"[env] {self.observations[t + 1]}")
        if self.failure:
            parts.append(f"[failure] {self.failure}")
        return "\n".join(parts)

    def to_json(self) -> dict:
        return {"task": self.task, "observations": self.observations, "actions": self.actions, "rewards": self.rewards,
                "done": self.done, "truncated": self.truncated, "failure": self.failure, "notes": self.notes,
                "success": self.success}


class EnvFault(Exception):
    """An environment call failed; the message is the recorded reason."""


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None) -> Any:
    """fn() in a daemon thread, waiting at most timeout_s; EnvFault on timeout or exception.

    A thread that hangs is abandoned (Python cannot kill it); being a daemon it never blocks exit.
    """
    if timeout_s is None:
        try:
            return fn()
        except KeyboardInterrupt:  # most likely the user's Ctrl-C
            raise
        except BaseException as e:  # noqa: BLE001 - any env exception (sys.exit() too) is a recorded episode failure
            raise EnvFault(f"raised {type(e).__name__}: {_first_line(e)}") from e
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="tiltlm-env-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise EnvFault(f"timed out after {timeout_s:g}s")
    if "error" in box:
        e = box["error"]
        raise EnvFault(f"raised {type(e).__name__}: {_first_line(e)}")
    return box.get("value")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def clean_observation(value: Any, max_chars: int, notes: list[str]) -> str:
    """A str observation, capped at ``max_chars``; bytes are decoded (invalid UTF-8 replaced, noted).
    Anything else is garbage (EnvFault)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            value = bytes(value).decode("utf-8", errors="replace")
            notes.append("invalid UTF-8 replaced")
    if not isinstance(value, str):
        raise EnvFault(f"returned an observation of type {type(value).__name__}, not text")
    if "\x00" in value:
        value = value.replace("\x00", "")
        notes.append("NUL bytes removed")
    if len(value) > max_chars:
        notes.append(f"observation of {len(value)} chars capped at {max_chars}")
        value = value[:max_chars]
    return value


def clean_step(result: Any, max_chars: int, notes: list[str]) -> StepResult:
    """Validate what ``step`` returned: (observation, reward, done[, info]) or a StepResult."""
    if isinstance(result, StepResult):
        obs, reward, done, info = result.observation, result.reward, result.done, result.info
    elif isinstance(result, tuple) and len(result) in (3, 4):
        obs, reward, done = result[:3]
        info = result[3] if len(result) == 4 else {}
    else:
        raise EnvFault(f"step returned {type(result).__name__}; return (observation, reward, done, info)")
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
        raise EnvFault(f"returned a reward of type {type(reward).__name__}, not a number")
    if not math.isfinite(float(reward)):
        raise EnvFault(f"returned a non-finite reward ({reward})")
    if not isinstance(info, dict):
        raise EnvFault(f"returned info of type {type(info).__name__}, not a dict")
    return StepResult(clean_observation(obs, max_chars, notes), float(reward), bool(done), info)


# ---- registry ------------------------------------------------------------------------------
_REGISTRY: Registry[type[Env]] = Registry("environment")


def register_env(cls: type[Env]) -> type[Env]:
    return _REGISTRY.register(cls.name, cls)


def available_envs() -> list[str]:
    _load_builtins()
    return _REGISTRY.names()


def env_class(name: str) -> type[Env]:
    """A registered environment, or user code named explicitly: ``package.module:Class`` / ``path/file.py:Class``."""
    _load_builtins()
    if name not in _REGISTRY and ":" in name:
        return _user_env(name)
    return _REGISTRY.get(name)


def get_env(name: str, **options) -> Env:
    """Build a registered environment; unknown options are named with the accepted ones."""
    cls = env_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in options if not takes_any else ():
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise TiltlmError(f"environment '{name}' has no option '{key}'; {hint}its options: {', '.join(accepted)}")
    try:
        return cls(**options)
    except TiltlmError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a user environment failing to start (sys.exit() too) is a one-line error
        raise TiltlmError(f"environment '{name}' failed to start: {type(e).__name__}: {_first_line(e)}; check its options") from None


def _user_env(spec: str) -> type[Env]:
    """Import the class a ``module:Class`` or ``file.py:Class`` spec names (only that module or file)."""
    target, _, attribute = spec.rpartition(":")
    try:
        cls = load_user_object(spec, "environment")
    except UserCodeError as e:
        if e.reason == "file-missing":
            raise TiltlmError(f"environment '{spec}': file '{target}' not found; give the path of an existing .py file") from None
        if e.reason != "attribute-missing" and isinstance(e.cause, TiltlmError):
            raise e.cause from None  # the user's module raised a one-line error of its own
        if e.reason != "attribute-missing":  # the module is missing or failed to import
            raise TiltlmError(f"environment '{spec}': importing '{target}' raised {type(e.cause).__name__}: {_first_line(e.cause)}; fix the module or the path") from None
        cls = None  # no such attribute: worded below
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise TiltlmError(f"environment '{spec}': '{attribute}' is not a tiltlm.envs.Env subclass in '{target}'; name an Env class")
    return cls


def _load_builtins() -> None:
    import tiltlm.envs  # noqa: F401 - importing the package registers the built-in environments
