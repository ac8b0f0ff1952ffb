"""No silent reuse: a command that writes into an existing directory first compares what it would write
with what is there.

A config or parameter set is compared after resolving it (parsed and dumped again), so a comment, key order
or a default spelled out is not a difference. ``diff`` lists the dotted keys whose values differ and
``describe`` shows the first few in one line (``target.reward: 'contains:a' → 'contains:b'``, "and N more").

``model_dir`` is the rule for a model directory (`tiltlm testbed`, `tiltlm pretrain`): absent or empty, it is
written; the same parameters in its record file, it is left as it is; other parameters, it is refused unless
``overwrite``; a non-empty directory tiltlm did not write (no record file) is never overwritten.
``publish`` then swaps the fully written directory into place (tiltlm.io.replace_dir).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from tiltlm.errors import TiltlmError
from tiltlm.io import os_errors, replace_dir

ABSENT = object()  # a key one side does not have


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; a list is one value (shown whole)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; ABSENT where one side lacks the key."""
    a, b = _flat(old), _flat(new)
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys if a.get(k, ABSENT) != b.get(k, ABSENT)]


def show(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value)


def describe(changes: list[tuple[str, Any, Any]], limit: int = 3) -> str:
    """``key: old → new, …`` for the first ``limit`` changes, then "and N more"."""
    shown = ", ".join(f"{k}: {show(a)} → {show(b)}" for k, a, b in changes[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def model_dir(out: Path, record: str, wanted: dict, *, overwrite: bool, what: str) -> bool:
    """May ``what`` (e.g. "testbed") with parameters ``wanted`` be written to ``out``? True: ``out`` already
    holds it (``out/record`` has the same parameters), leave it as it is; False: write it (``out`` absent or
    empty, or another ``what`` and ``overwrite``). Raises a one-line TiltlmError otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TiltlmError(f"'{out}' is a file, not a directory; choose another path")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    try:
        there = json.loads((out / record).read_text())
    except (OSError, ValueError):
        there = None
    if not isinstance(there, dict):
        raise TiltlmError(f"'{out}' is not empty and is not a {what} tiltlm wrote (no readable {record}); choose another path "
                          "(a directory tiltlm did not write is never overwritten)")
    changes = diff({k: there.get(k, ABSENT) for k in wanted}, wanted)
    if not changes:
        return True
    if overwrite:
        return False
    raise TiltlmError(f"'{out}' holds a {what} with other parameters ({describe(changes)}); pass --overwrite to replace it, "
                      "or choose another path")


def publish(tmp: Path, out: Path, *, overwrite: bool, what: str) -> Path:
    """Swap the fully written ``tmp`` in as ``out``; refuse (and remove ``tmp``) if another process filled
    ``out`` meanwhile and ``overwrite`` is off."""
    if not overwrite and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise TiltlmError(f"'{out}' was filled by another process while this {what} was written; nothing was overwritten, "
                          "choose another path")
    return replace_dir(tmp, out)


# ---- content identity: what a run is made of -------------------------------------------------------------------
INPUTS = "inputs.json"
"""The file in a run directory that records `input_digests` of its config (tiltlm.train.rundir)."""

_MEMO: dict[tuple, str] = {}  # (path, stat identity) -> sha256, within this process (a sweep's cells share a prior)


def _identity(stat) -> list[int]:
    """What the kernel changes whenever a file's bytes change: a write sets size/mtime and always ctime (which no
    user call can set back; ``cp -p`` and ``touch -d`` set mtime only), a replacement by rename gives another inode."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _file_digest(path: Path, known: dict | None) -> dict:
    """{"bytes", "stat", "sha256"} of one file; the SHA-256 of ``known`` (an earlier record of this file) is reused
    when the stat identity is unchanged, else the whole file is read (SHA-256 at about 1.5 GB/s: docs/reliability.md,
    "What a run is made of")."""
    stat = path.stat()
    ident = _identity(stat)
    if known is not None and known.get("stat") == ident and isinstance(known.get("sha256"), str):
        return {"bytes": stat.st_size, "stat": ident, "sha256": known["sha256"]}
    key = (str(path.resolve()), *ident)
    if key not in _MEMO:
        with open(path, "rb") as f:
            _MEMO[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": stat.st_size, "stat": ident, "sha256": _MEMO[key]}


def path_digest(path: str | Path, known: dict | None = None) -> dict:
    """The content digest of a file or a directory (every file under it, by relative path; ``__pycache__`` aside):
    ``{"path", "sha256", "files": {name: {"bytes", "stat", "sha256"}}}``; ``known``: an earlier digest of the same
    path, whose per-file SHA-256s are reused for files whose stat identity is unchanged (module section)."""
    path = Path(path).expanduser()
    if path.is_file():
        names = {path.name: path}
    else:
        names = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
                 if p.is_file() and "__pycache__" not in p.relative_to(path).parts}
    before = (known or {}).get("files") or {}
    with os_errors(path):
        files = {name: _file_digest(p, before.get(name)) for name, p in names.items()}
    whole = hashlib.sha256("".join(f"{name}\0{d['sha256']}\n" for name, d in files.items()).encode()).hexdigest()
    return {"path": str(path.resolve()), "sha256": whole, "files": files}


def _spec_paths(spec: str | None, builtins: set[str]) -> list[Path]:
    """The files a reward / env spec reads: for a built-in (``builtins``), an argument that names an existing
    directory or a path with a separator (a reward model, ``name:<dir>``); for user code, the file of
    ``file.py:name`` or the source file of ``module:name``."""
    if not spec or not isinstance(spec, str):
        return []
    head, colon, argument = spec.partition(":")
    if head in builtins:
        path = Path(argument).expanduser()
        return [path] if argument and path.exists() and (path.is_dir() or "/" in argument) else []
    target, colon, _ = spec.rpartition(":")  # rpartition: a Windows path has a ':' too
    if not colon or not target:
        return []
    if Path(target).expanduser().is_file():
        return [Path(target).expanduser()]
    try:
        origin = getattr(importlib.util.find_spec(target), "origin", None)
    except (ImportError, ValueError, AttributeError):  # the reward's loader says what is wrong with it
        origin = None
    return [Path(origin)] if origin and Path(origin).is_file() else []


def _option_paths(prefix: str, options: dict) -> dict[str, Path]:
    """String options (env.options, algorithm options) that name an existing file or directory."""
    out = {}
    for key, value in _flat(options).items():
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[f"{prefix}.{key}"] = Path(value).expanduser()
    return out


def _config_paths(config) -> dict[str, Path]:
    """{input name: path} of every file or directory the training ``config`` reads."""
    from tiltlm.envs import available_envs
    from tiltlm.policies.hf import resolve_model_dir
    from tiltlm.rewards import available_rewards

    out: dict[str, Path] = {}
    tabular = config.env is not None and config.env.name == "tabular"  # its prior is the environment's own table
    for name in ("prior", "policy"):
        value = getattr(config, name, None)
        if value is not None and not tabular:
            try:
                out[name] = resolve_model_dir(value)  # a named prior ('default', 'smollm2-135m') is its directory
            except TiltlmError:
                pass  # the loader says what is wrong with it
    if config.data is not None:
        for name in ("path", "eval_path"):
            value = getattr(config.data, name)
            if value is not None and Path(value).expanduser().exists():
                out[f"data.{name}"] = Path(value).expanduser()
    rewards = {form.split(":")[0].split("[")[0] for form in available_rewards() if not form.startswith("<")}
    specs = [("target.reward", config.target.reward, rewards)]
    specs += [(f"target.constraints.{i}", c, rewards) for i, c in enumerate(config.target.constraints)]
    if config.env is not None:
        specs.append(("env.name", config.env.name, set(available_envs())))
        out.update(_option_paths("env.options", dict(config.env.options)))
    for name, spec, builtins in specs:
        for i, path in enumerate(_spec_paths(spec, builtins)):
            out[name if i == 0 else f"{name}.{i}"] = path
    options = {k: v for k, v in json.loads(config.algorithm.model_dump_json()).items() if k != "name"}
    out.update(_option_paths("algorithm", options))
    return out


def input_digests(config, known: dict | None = None) -> dict[str, dict]:
    """Content digests of everything a training config (a TrainConfig or its dict) is made of besides the config
    itself: the prior's and the initial policy's weights (a named prior is its directory), the data file and its
    eval_path, user reward / constraint / environment files (``file.py:f``, a module's source file) and reward
    models or other options that name a path. ``{input name: path_digest}``; ``known``: an earlier result (e.g. a
    run's inputs.json), whose file digests are reused where a file's stat identity is unchanged."""
    if isinstance(config, dict):
        from tiltlm.train.config import parse_config

        config = parse_config(config)
    known = known or {}
    return {name: path_digest(path, known.get(name)) for name, path in _config_paths(config).items()}


def input_changes(recorded: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(``inputs.<name>``, old SHA-256, new SHA-256) for every input whose content differs; ABSENT where one side
    has no such input (a config change that adds or drops an input shows in the config diff too)."""
    names = list(recorded) + [k for k in current if k not in recorded]
    sha = lambda side, k: side[k]["sha256"] if k in side else ABSENT  # noqa: E731
    return [(f"inputs.{k}", sha(recorded, k), sha(current, k)) for k in names if sha(recorded, k) != sha(current, k)]


def describe_inputs(recorded: dict, current: dict, changes: list[tuple[str, Any, Any]], limit: int = 2) -> str:
    """``data.path '/d/prompts.jsonl': sha256 1a2b3c4d5e6f → 9f8e7d6c5b4a``, for a directory with the first file
    that differs (``prior '/m' (model.safetensors): …``), for the first ``limit`` changes."""
    short = lambda v: "(absent)" if v is ABSENT else v[:12]  # noqa: E731
    parts = []
    for key, old, new in changes[:limit]:
        name = key[len("inputs."):]
        entry = current.get(name) or recorded.get(name)
        a, b = (recorded.get(name) or {}).get("files", {}), (current.get(name) or {}).get("files", {})
        differ = [f for f in list(a) + [f for f in b if f not in a] if (a.get(f) or {}).get("sha256") != (b.get(f) or {}).get("sha256")]
        inside = f" ({differ[0]}{' and more' if len(differ) > 1 else ''})" if len(a) + len(b) > 2 and differ else ""
        parts.append(f"{name} '{entry['path']}'{inside}: sha256 {short(old)} → {short(new)}")
    return ", ".join(parts) + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def recorded_inputs(directory: str | Path) -> dict | None:
    """The input digests a run directory recorded (its inputs.json), or None when it has none (an older run)."""
    try:
        data = json.loads((Path(directory) / INPUTS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
