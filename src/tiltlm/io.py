"""Atomic writes: a reader (or a run resumed after kill -9) sees the old file or the new one, never half.

A file is written to a temporary name beside its destination (same directory, so the same file
system) and moved into place with ``os.replace``; a directory is written in full under a temporary
name and swapped in with ``replace_dir``. (The checkpoint's own swap, with its ``.old`` fallback and
digests, is in tiltlm.train.checkpoint.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through ``.<name>.<pid>.tmp`` beside it and ``os.replace``; returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp: Path, final: Path) -> Path:
    """Put the fully written directory ``tmp`` at ``final``, replacing an older ``final``; returns ``final``.

    The older one is first renamed aside (``.<name>.<pid>.old``), then ``tmp`` is renamed to ``final``
    and the old one removed; if that rename fails the old one is put back.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final
