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

import json
import shutil
from pathlib import Path
from typing import Any

from tiltlm.errors import TiltlmError
from tiltlm.io import replace_dir

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
