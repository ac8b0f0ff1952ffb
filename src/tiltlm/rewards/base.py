"""Rewards: a name plus a batched scoring function whose every result is checked.

A reward r(x) scores generated texts; a target tilts the prior by it, p*(x) ∝ pi0(x) exp(r(x)/beta)
(docs/math.md §1). Anything that can score a batch of texts becomes a `Reward` through `get_reward`:

- a spec naming a built-in, ``"name"`` or ``"name:argument"`` (``"contains:dog"``, ``"sentiment"``),
  looked up in the registry that `register_reward` fills (lm-eval style, no if/elif chain);
- ``"package.module:function"`` or ``"path/to/file.py:function"`` naming a user function;
- any Python callable ``f(texts, **kwargs) -> list[float]``, including TRL reward functions
  ``f(completions, **kwargs)`` and ``f(prompts, completions, **kwargs)`` unchanged.

exp(r/beta) multiplies probabilities, so a single NaN or a result of the wrong length would quietly
corrupt a whole run. That is why `Reward.__call__` checks every result and raises a one-line
`TiltlmError` that names the reward and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiltlm.errors import TiltlmError

Scorer = Callable[[list[str]], Sequence[float]]
"""What a built-in factory returns: texts -> one number per text (checked by `Reward`)."""

_CALLABLE_FORMS = ("<module>:<function>", "<file.py>:<function>")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True, eq=False)
class Reward:
    """A named batched reward r(x). Calling it returns a checked float64 tensor of shape (B,).

    Build one with `get_reward`. ``fn(texts, contexts)`` is the unchecked scorer; contexts are the
    prompts the texts continue, or None for unconditional samples.
    """

    name: str
    """The spec string (``"contains:dog"``) or the callable's qualified name (``"mymod:f"``)."""
    fn: Callable[[list[str], list[str] | None], Any] = field(repr=False)
    """Unchecked scorer: (texts, contexts or None) -> one number per text, in any sequence type."""

    def __call__(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> torch.Tensor:
        """Score `texts` (B,) given their prompts `contexts` (B,) or None; returns float64 (B,)."""
        texts = _as_str_list(texts, "texts")
        if contexts is not None:
            contexts = _as_str_list(contexts, "contexts")
            if len(contexts) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(contexts)} contexts")
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        try:
            values = self.fn(texts, contexts)
        except TiltlmError:
            raise
        except Exception as e:
            raise TiltlmError(
                f"reward {self.name!r} raised {_describe(e)}; fix the reward function"
            ) from e
        return _to_tensor(self.name, values, len(texts))


# --- checking results ---------------------------------------------------------------------------


def _to_tensor(name: str, values: Any, n: int) -> torch.Tensor:
    """One finite float per text as float64 (n,), or a TiltlmError naming the reward and the fix."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise TiltlmError(
                f"reward {name!r} returned an array of shape {tuple(values.shape)} for {n} texts; "
                f"return one float per text, shape ({n},)"
            )
        values = values.tolist()
    elif values is None or isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TiltlmError(
            f"reward {name!r} returned {type(values).__name__} instead of a list; "
            "return one float per text"
        )
    values = list(values)
    if len(values) != n:
        raise TiltlmError(
            f"reward {name!r} returned {len(values)} values for {n} texts; return one float per text"
        )
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0:
            v = v.item()
        if v is None:
            # TRL lets a reward return None to skip a sample; a tilt exp(r/beta) needs a number.
            raise TiltlmError(
                f"reward {name!r} returned None at index {i}; make it return a float for every text"
            )
        if not isinstance(v, (numbers.Real, np.bool_)):
            raise TiltlmError(
                f"reward {name!r} returned {type(v).__name__} at index {i}; "
                "make it return finite floats (one per text)"
            )
        v = float(v)
        if not math.isfinite(v):
            raise TiltlmError(
                f"reward {name!r} returned {v!r} at index {i}; make it return finite floats (one per text)"
            )
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def _as_str_list(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{what} must be a list of strings")
    return list(texts)


def _describe(e: BaseException) -> str:
    """``ValueError: message`` on one line, shortened: error messages must stay one line."""
    message = " ".join(str(e).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


# --- callables ----------------------------------------------------------------------------------


def _callable_name(fn: Callable) -> str:
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}:{qualname}" if module else qualname


def _adapt(fn: Callable, name: str) -> Callable[[list[str], list[str] | None], Any]:
    """Call `fn` the way its signature asks: TRL style by keyword, otherwise texts positionally.

    TRL calls ``reward_func(prompts=..., completions=..., **kwargs)``, so a function with a parameter
    named ``completions`` gets the texts as ``completions=``; any other function gets them as its
    first positional argument. ``prompts=`` is passed only when the function accepts it (by name or
    through ``**kwargs``); an unconditional sample's prompt is the empty string, so TRL functions that
    zip prompts with completions work unchanged.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some C callables have no signature: just pass the texts
        return lambda texts, contexts: fn(texts)
    params = signature.parameters
    by_name = {p.name for p in params.values() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    takes_prompts = "prompts" in by_name or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    trl_style = "completions" in by_name

    def arguments(texts: list[str], contexts: list[str] | None) -> tuple[tuple, dict]:
        kwargs: dict[str, Any] = {}
        if takes_prompts:
            kwargs["prompts"] = contexts if contexts is not None else [""] * len(texts)
        if trl_style:
            return (), {"completions": texts, **kwargs}
        return (texts,), kwargs

    args, kwargs = arguments([""], None)
    try:  # fail when the reward is built, not in the middle of a run
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TiltlmError(
            f"reward {name!r} cannot be called with a list of texts ({e}); "
            "write it as def f(texts, **kwargs) -> list[float] or TRL-style def f(completions, **kwargs)"
        ) from e

    def call(texts: list[str], contexts: list[str] | None) -> Any:
        args, kwargs = arguments(texts, contexts)
        return fn(*args, **kwargs)

    return call


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    takes_argument: bool
    help: str
    metavar: str
    factory: Callable[..., Scorer]

    @property
    def usage(self) -> str:
        return f"{self.name}:<{self.metavar}>" if self.takes_argument else self.name


_REGISTRY: dict[str, _Entry] = {}


def register_reward(
    name: str, takes_argument: bool, help: str, *, metavar: str = "text"
) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator adding a built-in reward to the registry under `name`.

    The decorated factory receives the spec's argument (``"dog"`` in ``"contains:dog"``) when
    `takes_argument`, nothing otherwise, and returns a `Scorer` (texts -> one float per text). It
    runs when the reward is built, so it should reject a bad argument with a `TiltlmError` and leave
    loading models to the first call. `metavar` names the argument in `available_rewards`.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"reward name {name!r} must be lower-case letters, digits, '_' or '-'")

    def decorator(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = _Entry(name, takes_argument, help, metavar, factory)
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Every accepted spec form, e.g. ``["contains:<text>", ..., "<module>:<function>", ...]``."""
    return [e.usage for _, e in sorted(_REGISTRY.items())] + list(_CALLABLE_FORMS)


def reward_help() -> dict[str, str]:
    """Spec form -> one-line description, for listings such as ``tiltlm rewards``."""
    described = {e.usage: e.help for _, e in sorted(_REGISTRY.items())}
    described["<module>:<function>"] = "a function f(texts, **kwargs) -> list[float] in an importable module"
    described["<file.py>:<function>"] = "a function f(texts, **kwargs) -> list[float] in that Python file"
    return described


# --- specs --------------------------------------------------------------------------------------


def get_reward(spec: str | Callable | Reward) -> Reward:
    """The `Reward` that `spec` names: a `Reward`, a spec string, or any callable.

    A string is ``name`` or ``name:argument`` for a built-in (the argument may contain ':'), else
    ``module.path:function`` or ``path/to/file.py:function``. Only the named file is loaded; its
    folder is not added to ``sys.path``.
    """
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, str):
        return _from_spec(spec)
    if callable(spec):
        name = _callable_name(spec)
        return Reward(name, _adapt(spec, name))
    raise TiltlmError(
        f"a reward must be a spec string or a callable, got {type(spec).__name__}; "
        "use e.g. 'contains:dog' or a function f(texts) -> list[float]"
    )


def _from_spec(spec: str) -> Reward:
    head, colon, argument = spec.partition(":")
    entry = _REGISTRY.get(head)
    if entry is not None:
        return _from_entry(entry, spec, colon, argument)
    target, colon, attribute = spec.rpartition(":")  # rpartition: a Windows path has a ':' too
    if colon and target.endswith(".py"):
        return _from_file(spec, Path(target), attribute)
    if colon and _DOTTED.fullmatch(target):
        return _from_module(spec, target, attribute)
    raise TiltlmError(_unknown(spec, head))


def _from_entry(entry: _Entry, spec: str, colon: str, argument: str) -> Reward:
    if entry.takes_argument and not argument:
        raise TiltlmError(f"reward {spec!r} needs an argument; write {entry.usage} ({entry.help})")
    if not entry.takes_argument and colon:
        raise TiltlmError(f"reward {entry.name!r} takes no argument, got {spec!r}; write {entry.name}")
    scorer = entry.factory(argument) if entry.takes_argument else entry.factory()
    return Reward(spec, lambda texts, contexts: scorer(texts))


def _unknown(spec: str, head: str, note: str = "") -> str:
    close = difflib.get_close_matches(head, list(_REGISTRY), n=1)
    notes = ([f"did you mean {close[0]!r}?"] if close else []) + ([note] if note else [])
    hint = f" ({'; '.join(notes)})" if notes else ""
    return f"unknown reward {spec!r}{hint}; available: {', '.join(available_rewards())}"


def _from_module(spec: str, module_name: str, attribute: str) -> Reward:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            # The module itself is missing (not one of its imports): a typo, or not on the path.
            note = (
                f"no module {module_name!r} on the path either: add its folder to PYTHONPATH "
                f"or write path/to/{module_name.split('.')[-1]}.py:{attribute}"
            )
            raise TiltlmError(_unknown(spec, spec.partition(":")[0], note)) from e
        raise TiltlmError(f"reward {spec!r}: importing {module_name!r} raised {_describe(e)}; fix the module") from e
    except Exception as e:
        raise TiltlmError(f"reward {spec!r}: importing {module_name!r} raised {_describe(e)}; fix the module") from e
    return _from_object(spec, module, attribute, f"module {module_name!r}")


def _from_file(spec: str, path: Path, attribute: str) -> Reward:
    path = path.expanduser()
    if not path.is_file():
        raise TiltlmError(f"reward {spec!r}: file {str(path)!r} not found; give the path to an existing .py file")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"_tiltlm_reward_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickle look a module up while it runs
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise TiltlmError(f"reward {spec!r}: running {str(path)!r} raised {_describe(e)}; fix the file") from e
    return _from_object(spec, module, attribute, f"file {str(path)!r}")


def _from_object(spec: str, module: Any, attribute: str, where: str) -> Reward:
    obj = module
    try:
        if not _DOTTED.fullmatch(attribute):
            raise AttributeError(attribute)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        functions = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        raise TiltlmError(
            f"reward {spec!r}: {where} has no function {attribute!r}; "
            f"define it or use one of: {', '.join(functions) or '(no functions defined there)'}"
        ) from e
    if isinstance(obj, Reward):
        return Reward(spec, obj.fn)
    if not callable(obj):
        raise TiltlmError(
            f"reward {spec!r}: {attribute!r} in {where} is a {type(obj).__name__}, not a function; "
            "name a function f(texts) -> list[float]"
        )
    return Reward(spec, _adapt(obj, spec))
