"""Rewards: a name plus a batched scoring function whose every result is checked.

A reward r(x) scores generated texts; a target tilts the prior by it, p*(x) ∝ pi0(x) exp(r(x)/beta)
(docs/math.md §1). Anything that can score a batch of texts becomes a `Reward` through `get_reward`:

- a spec naming a built-in, ``"name"`` or ``"name:argument"`` (``"contains:dog"``, ``"sentiment"``),
  looked up in the registry that `register_reward` fills (lm-eval style, no if/elif chain);
- ``"package.module:function"`` or ``"path/to/file.py:function"`` naming a user function;
- any Python callable ``f(texts, **kwargs) -> list[float]``, including TRL reward functions
  ``f(completions, **kwargs)`` and ``f(prompts, completions, **kwargs)`` unchanged.

Samples drawn after the prompts of a dataset (tiltlm.data) carry the rows' other columns; a reward is then
called with them as keyword lists, one value per text, TRL's convention ``f(prompts, completions, **columns)``
(``def accuracy(completions, answer, **kwargs)`` gets the ``answer`` column).

exp(r/beta) multiplies probabilities, so a single NaN or a result of the wrong length would quietly
corrupt a whole run. That is why `Reward.__call__` checks every result and raises a one-line
`TiltlmError` that names the reward and the fix.

A reward is user code, so nothing it does may end the program as if it had succeeded, or hang it:
whatever it raises, ``SystemExit`` (``sys.exit(0)`` in a reward) and other BaseExceptions included, is a
`TiltlmError`; and a reward with a time limit (``Reward.limited``; training sets ``target.reward_timeout_s``)
runs in a daemon thread that is abandoned, its result unused, when a call overruns. A KeyboardInterrupt is
the one exception let through when the reward runs in the caller's thread (without a limit), since it is
then most likely the user's Ctrl-C; in the reward's own thread only the reward can raise it (a real Ctrl-C
interrupts the waiting caller), so there it is an error like any other.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiltlm.errors import TiltlmError
from tiltlm.registry import Registry, UserCodeError, load_user_object
from tiltlm.registry import describe as _describe

Scorer = Callable[[list[str]], Sequence[float]]
"""What a built-in factory returns: texts -> one number per text (checked by `Reward`)."""
RowScorer = Callable[[list[str], "list[str] | None", "dict[str, list]"], Sequence[float]]
"""What a built-in registered with ``row=True`` returns: (texts, prompts, the rows' columns) -> one number per text."""
_RESERVED = ("prompts", "completions")  # keywords a reward gets from tiltlm itself, never from a data column

_CALLABLE_FORMS = ("<module>:<function>", "<file.py>:<function>")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True, eq=False)
class Reward:
    """A named batched reward r(x). Calling it returns a checked float64 tensor of shape (B,).

    Build one with `get_reward`. ``fn(texts, contexts, **columns)`` is the unchecked scorer; contexts are
    the prompts the texts continue, or None for unconditional samples; columns (only when the samples
    carry data rows) are the rows' other columns, one value per text.
    """

    name: str
    """The spec string (``"contains:dog"``) or the callable's qualified name (``"mymod:f"``)."""
    fn: Callable[..., Any] = field(repr=False)
    """Unchecked scorer: (texts, contexts or None, **columns) -> one number per text, in any sequence type."""
    timeout_s: float | None = None
    """Seconds one call may take before it is abandoned with a TiltlmError; None: no limit (runs in the caller's thread)."""
    needs: tuple[str, ...] = ()
    """The data columns every row must have (not missing, not null): a user function's required parameters
    other than the texts and prompts, a verifier's column (``exact_match`` reads ``answer``). See `check_rows`."""

    def limited(self, timeout_s: float | None) -> "Reward":
        """This reward with at most ``timeout_s`` seconds per call (None: no limit)."""
        return replace(self, timeout_s=timeout_s)

    def __call__(self, texts: Sequence[str], contexts: Sequence[str] | None = None,
                 columns: Mapping[str, Sequence] | None = None) -> torch.Tensor:
        """Score `texts` (B,) given their prompts `contexts` (B,) or None and their data rows' other
        `columns` (name -> B values) or None; returns float64 (B,)."""
        texts = _as_str_list(texts, "texts")
        if contexts is not None:
            contexts = _as_str_list(contexts, "contexts")
            if len(contexts) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(contexts)} contexts")
        columns = {k: list(v) for k, v in (columns or {}).items()}
        for k, v in columns.items():
            if len(v) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(v)} values of column {k!r}")
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        n = len(texts)  # counted now: the reward gets lists of its own, and may change them (empty them, even)
        keywords = columns if columns and _takes_keywords(self.fn) else {}
        values = _call_user_code(lambda: _materialise(self.fn(texts, contexts, **keywords)), self.name, self.timeout_s, n)
        return _to_tensor(self.name, values, n)


    def check_rows(self, columns: Mapping[str, Sequence], numbers: Sequence, where: str) -> None:
        """Before any sampling: every row (``numbers``: where each is in ``where``, e.g. "line 3") has each column
        this reward needs, else a one-line TiltlmError naming the first row that lacks it and the column."""
        for column in self.needs:
            values = columns.get(column)
            if values is None:
                have = f"its columns are: {', '.join(columns)}" if columns else "it has no columns besides the prompt"
                raise TiltlmError(f"reward {self.name!r} needs the column {column!r}, but {where} has none ({have}); add that "
                                  "column to the prompt data, or use a reward that reads another")
            for number, value in zip(numbers, values):
                if value is None:
                    raise TiltlmError(f"reward {self.name!r} needs the column {column!r}, but {where} {number} has none "
                                      "(missing or null); give that row a value, or remove the row")


def _call_user_code(score: Callable[[], Any], name: str, timeout_s: float | None, n: int) -> Any:
    """score(), with whatever it raises (KeyboardInterrupt aside, in this thread) as a TiltlmError naming the
    reward; with ``timeout_s`` it runs in a daemon thread, abandoned after that many seconds."""
    if timeout_s is None:
        try:
            return score()
        except (TiltlmError, KeyboardInterrupt):  # ours, or most likely the user's Ctrl-C
            raise
        except BaseException as e:  # noqa: BLE001 - SystemExit, GeneratorExit, …: the reward failed, the run did not succeed
            raise _raised(name, e) from e
    box: dict[str, Any] = {}  # the thread's result; once abandoned nothing reads it
    grad = torch.is_grad_enabled()  # grad mode is per thread

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = score()
        except BaseException as e:  # noqa: BLE001 - here even a KeyboardInterrupt was raised by the reward itself
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"tiltlm-reward-{name}"[:60])
    thread.start()
    thread.join(timeout_s)  # a real Ctrl-C interrupts this wait and stops the program
    if thread.is_alive():
        raise TiltlmError(
            f"reward {name!r} did not return within {timeout_s:g} s on {n} texts (the call is abandoned); make it faster, "
            "or allow it more time: target.reward_timeout_s in a config, --reward-timeout on the command line"
        )
    if "error" in box:
        e = box["error"]
        if isinstance(e, TiltlmError):
            raise e
        raise _raised(name, e) from e
    return box["value"]


def _materialise(values: Any) -> Any:
    """A generator's values, drawn where the reward runs (under its guard and limit), not later by the checks."""
    return list(values) if isinstance(values, Iterator) else values


def _raised(name: str, e: BaseException) -> TiltlmError:
    ending = "" if isinstance(e, Exception) else " (a reward returns its scores; it must not end the program)"
    return TiltlmError(f"reward {name!r} raised {_describe(e)}{ending}; fix the reward function")


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
        try:
            v = float(v)
        except OverflowError:  # an int (or Fraction) beyond float range, ~1.8e308: no tilt exp(r/beta) can use it
            size = f"an integer of {v.bit_length():,} bits" if isinstance(v, int) else f"{type(v).__name__} too large for a float"
            raise TiltlmError(f"reward {name!r} returned {size} at index {i}; make it return finite floats "
                              "(one per text, below about 1.8e308)") from None
        if not math.isfinite(v):
            raise TiltlmError(
                f"reward {name!r} returned {v!r} at index {i}; make it return finite floats (one per text)"
            )
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def _takes_keywords(fn: Callable) -> bool:
    """Whether a scorer accepts the rows' columns (``**columns``); a Reward built by hand as fn(texts, contexts) does not."""
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def _as_str_list(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{what} must be a list of strings")
    return list(texts)


# --- callables ----------------------------------------------------------------------------------


def _callable_name(fn: Callable) -> str:
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}:{qualname}" if module else qualname


def _adapt(fn: Callable, name: str) -> Callable[..., Any]:
    """Call `fn` the way its signature asks: TRL style by keyword, otherwise texts positionally.

    TRL calls ``reward_func(prompts=..., completions=..., **kwargs)``, so a function with a parameter
    named ``completions`` gets the texts as ``completions=``; any other function gets them as its
    first positional argument. ``prompts=`` is passed only when the function accepts it (by name or
    through ``**kwargs``); an unconditional sample's prompt is the empty string, so TRL functions that
    zip prompts with completions work unchanged. A data row's other columns (``answer=[...]``) are
    passed by keyword to a function that names them or takes ``**kwargs``; a required parameter that
    is neither the texts nor ``prompts`` is a column the samples must carry.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some C callables have no signature: just pass the texts
        return lambda texts, contexts, **columns: fn(texts)
    params = signature.parameters
    by_name = {p.name for p in params.values() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes_prompts = "prompts" in by_name or var_keyword
    trl_style = "completions" in by_name

    def arguments(texts: list[str], contexts: list[str] | None, columns: dict) -> tuple[tuple, dict]:
        kwargs: dict[str, Any] = {k: v for k, v in columns.items() if k not in _RESERVED and (var_keyword or k in by_name)}
        if takes_prompts:
            kwargs["prompts"] = contexts if contexts is not None else [""] * len(texts)
        if trl_style:
            return (), {**kwargs, "completions": texts}
        return (texts,), kwargs

    args, kwargs = arguments([""], None, {})
    try:  # fail when the reward is built, not in the middle of a run
        bound = signature.bind_partial(*args, **kwargs)
        required = [p.name for p in params.values() if p.name not in bound.arguments and p.default is inspect.Parameter.empty
                    and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        signature.bind(*args, **kwargs, **dict.fromkeys(required))  # the rest must be columns the data brings
    except TypeError as e:
        raise TiltlmError(
            f"reward {name!r} cannot be called with a list of texts ({e}); "
            "write it as def f(texts, **kwargs) -> list[float] or TRL-style def f(completions, **kwargs)"
        ) from e

    def call(texts: list[str], contexts: list[str] | None, **columns) -> Any:
        missing = [c for c in required if c not in columns]
        if missing:
            have = f"the samples' data columns are: {', '.join(columns)}" if columns else "the samples carry no data columns"
            raise TiltlmError(f"reward {name!r} takes {', '.join(map(repr, missing))}, but {have}; add that column to the "
                              "prompt data (data: in the config, --data for tiltlm eval) or give the parameter a default")
        args, kwargs = arguments(texts, contexts, columns)
        return fn(*args, **kwargs)

    call.columns = tuple(required)  # the columns every row must carry (Reward.needs)
    return call


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    takes_argument: bool | str  # True, False or "optional"
    help: str
    metavar: str
    factory: Callable[..., Scorer]
    row: bool = False  # the factory returns a RowScorer: it reads the data rows' columns

    @property
    def usage(self) -> str:
        if self.takes_argument == "optional":
            return f"{self.name}[:<{self.metavar}>]"
        return f"{self.name}:<{self.metavar}>" if self.takes_argument else self.name


_REGISTRY: Registry[_Entry] = Registry("reward")


def register_reward(
    name: str, takes_argument: bool | str, help: str, *, metavar: str = "text", row: bool = False
) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator adding a built-in reward to the registry under `name`.

    The decorated factory receives the spec's argument (``"dog"`` in ``"contains:dog"``) when
    `takes_argument`, nothing otherwise (``"optional"``: the argument when the spec has one), and
    returns a `Scorer` (texts -> one float per text), or with ``row=True`` a `RowScorer` (texts,
    prompts, the data rows' columns -> one float per text: a verifier comparing with an ``answer``
    column). It runs when the reward is built, so it should reject a bad argument with a `TiltlmError`
    and leave loading models to the first call. `metavar` names the argument in `available_rewards`.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"reward name {name!r} must be lower-case letters, digits, '_' or '-'")

    def decorator(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        _REGISTRY.register(name, _Entry(name, takes_argument, help, metavar, factory, row))
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Every accepted spec form, e.g. ``["contains:<text>", ..., "<module>:<function>", ...]``."""
    return [e.usage for _, e in _REGISTRY.items()] + list(_CALLABLE_FORMS)


def reward_help() -> dict[str, str]:
    """Spec form -> one-line description, for listings such as ``tiltlm rewards``."""
    described = {e.usage: e.help for _, e in _REGISTRY.items()}
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
        fn = _adapt(spec, name)
        return Reward(name, fn, needs=getattr(fn, "columns", ()))
    raise TiltlmError(
        f"a reward must be a spec string or a callable, got {type(spec).__name__}; "
        "use e.g. 'contains:dog' or a function f(texts) -> list[float]"
    )


def _from_spec(spec: str) -> Reward:
    head, colon, argument = spec.partition(":")
    if head in _REGISTRY:
        return _from_entry(_REGISTRY.get(head), spec, colon, argument)
    target, colon, attribute = spec.rpartition(":")  # rpartition: a Windows path has a ':' too
    if colon and (target.endswith(".py") or _DOTTED.fullmatch(target)):
        return _from_user_code(spec)
    raise TiltlmError(_unknown(spec, head))


def _from_entry(entry: _Entry, spec: str, colon: str, argument: str) -> Reward:
    if entry.takes_argument and not argument and (colon or entry.takes_argument is True):
        raise TiltlmError(f"reward {spec!r} needs an argument; write {entry.usage} ({entry.help})")
    if not entry.takes_argument and colon:
        raise TiltlmError(f"reward {entry.name!r} takes no argument, got {spec!r}; write {entry.name}")
    scorer = entry.factory(argument) if entry.takes_argument and argument else entry.factory()
    if entry.row:
        return Reward(spec, lambda texts, contexts, **columns: scorer(texts, contexts, columns), needs=_row_columns(entry, argument))
    return Reward(spec, lambda texts, contexts, **columns: scorer(texts))


def _row_columns(entry: _Entry, argument: str) -> tuple[str, ...]:
    """The column a verifier compares with: its argument, else its factory's default (``answer``); none for
    row rewards without a column argument (their rows are made by tiltlm, e.g. ``reasoning_gym``; ``rm:DIR``'s
    argument is a directory, and it reads only the prompts)."""
    if not entry.takes_argument or entry.metavar != "column":
        return ()
    if argument:
        return (argument,)
    defaults = [p.default for p in inspect.signature(entry.factory).parameters.values() if isinstance(p.default, str)]
    return tuple(defaults[:1])


def _unknown(spec: str, head: str, note: str = "") -> str:
    close = _REGISTRY.suggest(head)
    notes = ([f"did you mean {close!r}?"] if close else []) + ([note] if note else [])
    hint = f" ({'; '.join(notes)})" if notes else ""
    return f"unknown reward {spec!r}{hint}; available: {', '.join(available_rewards())}"


def _from_user_code(spec: str) -> Reward:
    """A ``module:function`` or ``file.py:function`` spec: `load_user_object` imports it; the messages are ours."""
    target, _, attribute = spec.rpartition(":")
    path = str(Path(target).expanduser()) if target.endswith(".py") else None
    where = f"file {path!r}" if path is not None else f"module {target!r}"
    try:
        obj = load_user_object(spec, "reward")
    except UserCodeError as e:
        if e.reason == "file-missing":
            raise TiltlmError(f"reward {spec!r}: file {path!r} not found; give the path to an existing .py file") from None
        if e.reason == "module-missing":
            note = (
                f"no module {target!r} on the path either: add its folder to PYTHONPATH "
                f"or write path/to/{target.split('.')[-1]}.py:{attribute}"
            )
            raise TiltlmError(_unknown(spec, spec.partition(":")[0], note)) from e.cause
        if e.reason == "import-failed" and path is not None:
            raise TiltlmError(f"reward {spec!r}: running {path!r} raised {_describe(e.cause)}; fix the file") from e.cause
        if e.reason == "import-failed":
            raise TiltlmError(f"reward {spec!r}: importing {target!r} raised {_describe(e.cause)}; fix the module") from e.cause
        functions = sorted(  # attribute-missing
            n for n, v in vars(e.module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == e.module.__name__
        )
        raise TiltlmError(
            f"reward {spec!r}: {where} has no function {attribute!r}; "
            f"define it or use one of: {', '.join(functions) or '(no functions defined there)'}"
        ) from e.cause
    if isinstance(obj, Reward):
        return Reward(spec, obj.fn)
    if not callable(obj):
        raise TiltlmError(
            f"reward {spec!r}: {attribute!r} in {where} is a {type(obj).__name__}, not a function; "
            "name a function f(texts) -> list[float]"
        )
    fn = _adapt(obj, spec)
    return Reward(spec, fn, needs=getattr(fn, "columns", ()))
