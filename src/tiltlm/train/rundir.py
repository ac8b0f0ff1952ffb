"""The run directory: config.yaml, metrics.jsonl, checkpoint/ and finally policy/.

A run owns its directory: the writing process holds an exclusive lock on ``.tiltlm.lock`` inside it (an
fcntl record lock, released when the process ends, however it ends), so a second process training into the
same directory — a new run or a second ``--resume`` — stops with one line naming the holder's PID instead of
corrupting or deleting the first one's files. A new run that fails before its first checkpoint removes only
what it created itself (``abandon``).
Only the writing rank (rank 0) touches files; with sharded weights every rank reads the checkpoint.
Every file is replaced atomically (a kill leaves the old file or the new one, never half of one), and
metrics.jsonl is cut back to the checkpoint's step on resume, so a resumed run's metrics equal the
uninterrupted run's.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import yaml

from tiltlm.errors import TiltlmError
from tiltlm.io import atomic_write_text, os_errors, replace_dir
from tiltlm.train.checkpoint import load_checkpoint, save_checkpoint


LOCK = ".tiltlm.lock"


class RunDir:
    def __init__(self, path: str | Path, *, writes: bool = True):
        self.path = Path(path)
        self.writes = writes  # this rank writes files (data parallel: rank 0 only)
        self.checkpoint = self.path / "checkpoint"
        self._lock = None  # the open lock file while this process owns the directory
        self._fresh = self._created = False  # opened for a new run / the directory did not exist before

    def _acquire(self, *, create: bool = True) -> None:
        """Own the directory or stop: one line naming the process that owns it. ``create=False`` only checks
        an existing lock file (and releases it again), so a refusal leaves no file behind."""
        if not create and not (self.path / LOCK).is_file():
            return
        fd = open(self.path / LOCK, "a+")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fd.seek(0)
            holder = fd.read().strip() or "unknown"
            fd.close()
            raise TiltlmError(f"run directory '{self.path}' is in use by another tiltlm process (PID {holder}); "
                              "wait for it to finish, or choose another --out") from None
        if not create:
            fd.close()
            return
        fd.seek(0)
        fd.truncate()
        fd.write(str(os.getpid()))
        fd.flush()
        self._lock = fd

    def close(self) -> None:
        """Give the directory up (the lock is also released when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def abandon(self) -> None:
        """A new run failed before its first checkpoint: remove what it created, leave --out as it was found."""
        if not (self.writes and self._fresh and self._lock is not None) or self.has_checkpoint():
            return
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:  # it was empty when this run took it
            for entry in self.path.iterdir():
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        self.close()

    def _others(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name != LOCK]

    def has_checkpoint(self) -> bool:
        return self.checkpoint.exists() or self.checkpoint.with_name("checkpoint.old").exists()

    def open(self, config, *, resume: bool) -> dict | None:
        """Start a fresh run (an empty or new directory gets config.yaml) or, with ``resume``, return the
        last checkpoint to continue from (None: the run was killed before its first checkpoint, start over)."""
        out = self.path
        if not self.writes:  # every rank loads the same checkpoint; rank 0 alone checks and writes
            return load_checkpoint(self.checkpoint) if resume and self.has_checkpoint() else None
        if out.exists() and not out.is_dir():
            raise TiltlmError(f"--out '{out}' is a file, not a directory; choose another --out")
        if resume and not out.is_dir():
            raise TiltlmError(f"no checkpoint in '{out}' to resume; run without --resume")
        if not resume and out.is_dir() and self._others():  # said before anything is created there
            self._acquire(create=False)  # in use right now? say who holds it
            raise TiltlmError(f"output directory '{out}' is not empty; pass --resume to continue that run or choose another --out")
        self._created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self._acquire()
        if resume:
            if self.has_checkpoint():
                return load_checkpoint(self.checkpoint)
            if (out / "config.yaml").is_file():  # killed before its first checkpoint: restart from step 0
                self.truncate_metrics(-1)  # the step-0 evaluation of pi0 too (tiltlm.evaluate)
                return None
            raise TiltlmError(f"no checkpoint in '{out}' to resume; run without --resume")
        if self._others():  # another process wrote here between the check above and the lock
            self.close()
            raise TiltlmError(f"output directory '{out}' is not empty; pass --resume to continue that run or choose another --out")
        self._fresh = True
        try:
            atomic_write_text(out / "config.yaml", yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
        except BaseException:  # e.g. a full disk: leave --out as it was found
            self.abandon()
            raise
        return None

    def truncate_metrics(self, step: int) -> None:
        """Keep only complete lines of steps <= the checkpoint's (a crash may have left more, or half a line)."""
        path = self.path / "metrics.jsonl"
        if not path.exists() or not self.writes:
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def append_metrics(self, row: dict) -> None:
        if self.writes:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_checkpoint(self, **contents) -> None:
        """checkpoint/ (tiltlm.train.checkpoint.save_checkpoint's arguments)."""
        if self.writes:
            with os_errors(self.checkpoint):
                save_checkpoint(self.checkpoint, **contents)

    def save_policy(self, policy) -> Path | None:
        """policy/, written whole beside it and then moved into place (HF save_pretrained, or the tabular table)."""
        if not self.writes:
            return None
        tmp = self.path / "policy.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's half-written one
        try:
            with os_errors(tmp):
                policy.save(tmp)
        except BaseException:  # a full disk: no half-written policy.tmp stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return replace_dir(tmp, self.path / "policy")
