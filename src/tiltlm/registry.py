"""Name -> object registries (algorithms, environments, rewards) and the loader for user code.

    _ALGORITHMS = Registry("algorithm")
    _ALGORITHMS.register("kl-pg", KLPG)
    _ALGORITHMS.get("kl-pgg")   # TiltlmError: unknown algorithm 'kl-pgg' (did you mean 'kl-pg'?); available: ...

``load_user_object("pkg.module:name")`` / ``load_user_object("path/to/file.py:name")`` imports the
object a user names; each caller turns a `UserCodeError` into its own one-line message.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any, Generic, Iterable, Iterator, TypeVar

from tiltlm.errors import TiltlmError

T = TypeVar("T")

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Registry(Generic[T]):
    """Objects of one ``kind`` ("algorithm", "environment", "reward") by name; any object can be held."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name`` and return it; ValueError if the name is taken."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice: it is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: Any) -> T:
        """The object registered as ``name``, or a TiltlmError with a did-you-mean hint and the names available."""
        if name not in self:
            close = self.suggest(name)
            hint = f" (did you mean '{close}'?)" if close else ""
            raise TiltlmError(f"unknown {self.kind} '{name}'{hint}; available: {', '.join(self.names())}")
        return self._entries[name]

    def suggest(self, name: Any) -> str | None:
        """The registered name closest to ``name`` (difflib), or None."""
        close = difflib.get_close_matches(name, list(self._entries), n=1) if isinstance(name, str) else []
        return close[0] if close else None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs sorted by name."""
        return sorted(self._entries.items(), key=lambda item: item[0])

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (tests register into a copy)."""
        new = Registry(self.kind)
        new._entries = dict(self._entries)
        return new

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """Import every module of ``package`` (its ``__path__``) so that the classes they register are found:
    a new algorithm or environment is one new file. Modules starting with '_' and those in ``skip`` are
    left alone. Returns the names imported."""
    skip = set(skip)
    names = [m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_") and m.name not in skip]
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


class UserCodeError(TiltlmError):
    """`load_user_object` failed. ``reason`` says where, for callers that word the message themselves:

    - ``"file-missing"``: the ``.py`` file does not exist (``path`` is the expanded path);
    - ``"module-missing"``: the module itself is not importable (not one of its own imports);
    - ``"import-failed"``: importing the module or running the file raised ``cause``;
    - ``"attribute-missing"``: ``module`` has no ``attribute``.

    ``cause`` is the exception behind it (None for a missing file).
    """

    def __init__(self, message: str, *, reason: str, spec: str, target: str, attribute: str,
                 path: Path | None = None, module: Any = None, cause: BaseException | None = None):
        super().__init__(message)
        self.reason, self.spec, self.target, self.attribute = reason, spec, target, attribute
        self.path, self.module, self.cause = path, module, cause


def load_user_object(spec: str, kind: str) -> Any:
    """The object ``spec`` names: ``package.module:name`` (imported) or ``path/to/file.py:name`` (only that
    file runs; its folder is not added to ``sys.path``). ``name`` may be dotted (``Class.attr``).

    Raises `UserCodeError` (a TiltlmError, one line, worded for ``kind``) with a ``reason`` on failure.
    """
    target, _, attribute = spec.rpartition(":")  # rpartition: a Windows path has a ':' too
    where_args = {"spec": spec, "target": target, "attribute": attribute}
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserCodeError(f"{kind} {spec!r}: file {str(path)!r} not found; give the path to an existing .py file",
                                reason="file-missing", path=path, **where_args)
        resolved = path.resolve()
        digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
        module_name = re.sub(r"\W", "_", f"_tiltlm_{kind}_{resolved.stem}_{digest}")
        module_spec = importlib.util.spec_from_file_location(module_name, resolved)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickle look a module up while it runs
        try:
            module_spec.loader.exec_module(module)
        except KeyboardInterrupt:
            sys.modules.pop(module_name, None)
            raise
        except BaseException as e:  # noqa: BLE001 - sys.exit() in the file too: a failed import, never a quiet exit
            sys.modules.pop(module_name, None)
            raise UserCodeError(f"{kind} {spec!r}: running {str(path)!r} raised {describe(e)}; fix the file",
                                reason="import-failed", path=path, cause=e, **where_args) from e
        where = f"file {str(path)!r}"
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
                # The module itself is missing (not one of its imports): a typo, or not on the path.
                raise UserCodeError(
                    f"{kind} {spec!r}: no module {target!r} on the path; add its folder to PYTHONPATH "
                    f"or write path/to/{target.split('.')[-1]}.py:{attribute}",
                    reason="module-missing", cause=e, **where_args) from e
            raise UserCodeError(f"{kind} {spec!r}: importing {target!r} raised {describe(e)}; fix the module",
                                reason="import-failed", cause=e, **where_args) from e
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - the user's module failed to import (sys.exit() in it too)
            raise UserCodeError(f"{kind} {spec!r}: importing {target!r} raised {describe(e)}; fix the module",
                                reason="import-failed", cause=e, **where_args) from e
        where = f"module {target!r}"
    obj = module
    try:
        if not _DOTTED.fullmatch(attribute):
            raise AttributeError(attribute)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise UserCodeError(f"{kind} {spec!r}: {where} has no attribute {attribute!r}; define it or fix the name",
                            reason="attribute-missing", module=module, cause=e,
                            path=Path(target).expanduser() if target.endswith(".py") else None,
                            **where_args) from e
    return obj


def describe(e: BaseException) -> str:
    """``ValueError: message`` on one line, shortened: error messages must stay one line."""
    message = " ".join(str(e).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(e).__name__}: {message}" if message else type(e).__name__
