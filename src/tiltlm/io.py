"""Atomic writes: a reader (or a run resumed after kill -9) sees the old file or the new one, never half.

A file is written to a temporary name beside its destination (same directory, so the same file
system) and moved into place with ``os.replace``; a directory is written in full under a temporary
name and swapped in with ``replace_dir``. (The checkpoint's own swap, with its ``.old`` fallback and
digests, is in tiltlm.train.checkpoint.)

Also here: what an operating-system error means for the user (``describe_os_error``: the CLI prints every
``OSError`` as one line), ``os_errors`` (safetensors' I/O failures become ``OSError``) and ``path_component``
(a name from a config that becomes a file name must be exactly one path component).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from tiltlm.errors import TiltlmError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through ``.<name>.<pid>.tmp`` beside it and ``os.replace``; returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:  # name the file the user asked for, not the temporary one
        tmp.unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
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


# ---- operating-system errors ---------------------------------------------------------------------------------
_FIXES = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space or write to another disk",
    errno.EROFS: "write to a writable directory",
    errno.EACCES: "choose a path this user may write, or fix its permissions",
    errno.EPERM: "choose a path this user may write, or fix its permissions",
    errno.ENOTDIR: "a part of that path is a file: choose another path",
    errno.EISDIR: "give the path of a file",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EFBIG: "write to another disk or raise the limit (`ulimit -f`)",
    errno.EMFILE: "raise the limit (`ulimit -n`)",
    errno.ENFILE: "close other programs or raise the system's limit",
    errno.ENOENT: "check the path",
    errno.EIO: "check the disk",
    errno.EEXIST: "a file is in the way of a directory: choose another path",
}


def describe_os_error(e: OSError) -> str:
    """One line for the CLI: the path(s), what the system said and what to do (``'<path>': <reason>; <fix>``)."""
    where = " → ".join(f"'{f}'" for f in (e.filename, e.filename2) if f is not None) or "a file operation"
    reason = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    return f"{where}: {reason}; {_FIXES.get(e.errno, 'check the path and the disk')}"


@contextmanager
def os_errors(path: str | Path):
    """Re-raise safetensors' I/O failures (``SafetensorError: … (os error 28)``) as the ``OSError`` they are,
    naming ``path``; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        code = re.search(r"os error (\d+)", str(e))
        if isinstance(e, OSError) or code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from e


def check_file_destination(path: str | Path, flag: str, *, directory: bool = False) -> Path:
    """Say before any work that ``path`` cannot become a file (``directory``: a directory): it is a directory (a
    file), or a part of it is a file."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise TiltlmError(f"{flag} '{path}' is a file, not a directory; choose another {flag}")
    if not directory and path.is_dir():
        raise TiltlmError(f"{flag} '{path}' is a directory; give the path of a file, e.g. {path / 'out.jsonl'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TiltlmError(f"{flag} '{path}': '{parent}' is a file, not a directory; choose another path")
            break
    return path


def path_component(name: object, what: str) -> str:
    """``name`` (from a config: a label, a task name) if it is one safe file name, else a one-line error:
    no separators, not ``.``/``..``, no control characters, at most 200 bytes."""
    text = str(name) if isinstance(name, (str, int, float)) else None
    bad = (text is None or text in ("", ".", "..") or any(c in text for c in "/\\") or any(ord(c) < 32 for c in text)
           or len(text.encode("utf-8", "surrogateescape")) > 200)
    if bad:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "…"
        raise TiltlmError(f"{what} {shown} cannot name a directory; use a plain name (letters, digits, - _ . =, "
                          "no '/' or '\\', not '.' or '..', at most 200 bytes)")
    return text
