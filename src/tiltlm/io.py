"""Files in and out: atomic writes, and YAML read from users with bounded work.

Atomic writes: a reader (or a run resumed after kill -9) sees the old file or the new one, never half.

A file is written to a temporary name beside its destination (same directory, so the same file
system) and moved into place with ``os.replace``; a directory is written in full under a temporary
name and swapped in with ``replace_dir``. (The checkpoint's own swap, with its ``.old`` fallback and
digests, is in tiltlm.train.checkpoint.)

Also here: what an operating-system error means for the user (``describe_os_error``: the CLI prints every
``OSError`` as one line), ``os_errors`` (safetensors' I/O failures become ``OSError``) and ``path_component``
(a name from a config that becomes a file name must be exactly one path component).

YAML a user wrote (configs, sweeps) is read by `load_yaml`: safe tags only, one-line errors, and a bound
on how far aliases may expand, so that no file of a few lines can take the process's memory.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

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

# --- reading YAML a user wrote ------------------------------------------------------------------

YAML_MAX_ALIAS_EXPANSION = 100_000
"""Values that aliases (``*name``) may add to a YAML document once expanded (beyond the file's own)."""


def load_yaml(path: str | Path, what: str) -> Any:
    """The data of the YAML file ``path`` (plain YAML: the safe tags only), every problem a one-line TiltlmError
    that starts with ``what`` (e.g. ``"config 'train.yaml'"``). See `parse_yaml`."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TiltlmError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    return parse_yaml(text, what)


def parse_yaml(text: str, what: str) -> Any:
    """The data of the YAML document ``text`` (None when empty), read with yaml.SafeLoader.

    Before anything is built the composed node graph is measured: aliases share nodes, so a few lines of
    anchors nested ten deep stand for a billion values (the "billion laughs"), which a config's later
    copies, validation and dumps would expand. The expanded size is counted once per distinct node, so
    counting costs what composing cost; a document whose aliases add more than `YAML_MAX_ALIAS_EXPANSION`
    values, or an alias inside its own anchor, is refused, as are a mapping with the same key twice (YAML keeps
    the last one silently: two ``optim:`` sections would drop the first), malformed YAML (with its line and
    column), tags such as ``!!python/object`` (never constructed) and nesting too deep to compose.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        distinct, expanded = _expanded_size(node)
        if expanded is None:
            raise TiltlmError(f"{what} has a YAML alias (*name) inside its own anchor (&name), a structure without end; "
                              "remove that alias")
        if expanded - distinct > YAML_MAX_ALIAS_EXPANSION:
            raise TiltlmError(f"{what} has YAML aliases (*name) that expand to {expanded:,} values, more than "
                              f"{YAML_MAX_ALIAS_EXPANSION:,} beyond the file's own {distinct:,}; alias smaller anchors or fewer times")
        _refuse_duplicate_keys(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(e, yaml.constructor.ConstructorError):  # e.g. !!python/object: never constructed
            raise TiltlmError(f"{what} is not valid YAML{where}: {getattr(e, 'problem', '')}; "
                              "a config is plain YAML, remove the tag") from None
        raise TiltlmError(f"{what} is not valid YAML{where}; fix its syntax") from None
    except RecursionError:
        raise TiltlmError(f"{what} nests its values too deeply to read; flatten it") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: yaml.Node, what: str) -> None:
    """One line naming a key that a mapping of the document has twice, with both lines (merge keys ``<<`` aside:
    a key written beside a merge overrides the merged one, as YAML means it to)."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple, yaml.Node] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                ident = (key.tag, key.value)
                if ident in first:
                    raise TiltlmError(f"{what} has the key '{key.value}' twice in one mapping (line {first[ident].start_mark.line + 1} "
                                      f"and line {key.start_mark.line + 1}); keep one of them (YAML would silently use the last)")
                first[ident] = key
        stack.extend(_children(node))


def _expanded_size(root: yaml.Node) -> tuple[int, int | None]:
    """(distinct nodes, nodes once every alias is expanded; None when an alias is inside its own anchor).

    Depth-first without recursion; a node's size is memoised by identity, and the nodes whose subtree is
    being counted are the current path, so meeting one of them again is a cycle."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in _children(node))
        elif key in on_path:
            return len(size), None
        elif key not in size:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    return len(size), size[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []
