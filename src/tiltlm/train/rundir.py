"""The run directory: config.yaml, metrics.jsonl, checkpoint/ and finally policy/.

A run owns its directory: the writing process holds an exclusive lock on ``.tiltlm.lock`` inside it (an
fcntl record lock, released when the process ends, however it ends), so a second process training into the
same directory — a new run or a second ``--resume`` — stops with one line naming the holder's PID instead of
corrupting or deleting the first one's files. A new run that fails before its first checkpoint removes only
what it created itself (``abandon``).
A resume compares the config it is given with the run's config.yaml (both resolved: parsed and dumped again)
and refuses a different one with a short diff, unless ``accept_config``: then config.yaml is rewritten to the
new config, which runs from the checkpoint's step on, and the change is appended to ``config_changes.jsonl``
(one JSON line per accepted change: ``{"step": <checkpoint step>, "changes": {"<key>": [old, new]}}``), so
config.yaml always describes what runs now and config_changes.jsonl what ran before. Raising ``optim.steps``
to extend a run (``--steps N``) needs no flag when the learning rate does not depend on it (``optim.schedule:
constant``): the steps already taken are exactly those of a run started with N steps. With a linear or cosine
schedule ``optim.steps`` sets every step's learning rate, so it is a change like any other. Fewer steps than
the checkpoint's are refused either way (steps cannot be undone).
A run also knows what it was made of: inputs.json records the content digests of its inputs (data files, the
prior's and initial policy's weights, user reward / env files: tiltlm.reuse.input_digests), and a resume
compares them as it compares the config: a changed input is refused with the input and its old and new
SHA-256, unless ``accept_config``, which records ``"inputs.<name>": [old, new]`` in config_changes.jsonl. Every
checkpoint records the config it ran, so a resume whose config.yaml was deleted still compares with it, and a
checkpoint that cannot fit the trainer (another algorithm's state, tensors of another shape: a prior of another
vocabulary) is refused before anything is loaded or written.
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
from tiltlm.reuse import ABSENT, INPUTS, describe, describe_inputs, diff, input_changes, input_digests, recorded_inputs
from tiltlm.train.checkpoint import check_fits, load_checkpoint, save_checkpoint


LOCK = ".tiltlm.lock"


class RunDir:
    def __init__(self, path: str | Path, *, writes: bool = True):
        self.path = Path(path)
        self.writes = writes  # this rank writes files (data parallel: rank 0 only)
        self.checkpoint = self.path / "checkpoint"
        self._lock = None  # the open lock file while this process owns the directory
        self._fresh = self._created = False  # opened for a new run / the directory did not exist before
        self.changes: list[tuple] = []  # the config changes a resume accepted (key, old, new), from step changed_at on
        self.changed_at = 0
        self.config: dict | None = None  # the resolved config this process runs (recorded in every checkpoint)

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
        self._clear_leftovers()

    def _clear_leftovers(self) -> None:
        """Remove what a killed process left half-done (tiltlm.io's ``.<name>.<pid>.tmp`` files, and a
        ``.<name>.<pid>.old`` whose ``<name>`` is in place): this process owns the directory, so no one writes them."""
        for p in self.path.glob(".*.*"):
            parts = p.name[1:].rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) == os.getpid():
                continue
            if parts[2] == "tmp" or (parts[2] == "old" and (self.path / parts[0]).exists()):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def check_free(self) -> None:
        """Stop with one line if another process owns the directory now (nothing is created or changed)."""
        self._acquire(create=False)

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

    def open(self, config, *, resume: bool, accept_config: bool = False, module=None, algorithm=None) -> dict | None:
        """Start a fresh run (an empty or new directory gets config.yaml) or, with ``resume``, return the
        last checkpoint to continue from (None: the run was killed before its first checkpoint, start over).
        A resume with a config other than the run's is refused unless ``accept_config`` (module docstring), and
        with ``module`` and ``algorithm`` (the trainer's) a checkpoint that does not fit them is refused before
        anything is written (tiltlm.train.checkpoint.check_fits)."""
        out = self.path
        if not self.writes:  # every rank loads the same checkpoint; rank 0 alone checks and writes
            return load_checkpoint(self.checkpoint) if resume and self.has_checkpoint() else None
        if out.exists() and not out.is_dir():
            raise TiltlmError(f"--out '{out}' is a file, not a directory; choose another --out")
        if resume and not out.is_dir():
            raise TiltlmError(f"no checkpoint in '{out}' to resume; run without --resume")
        changes, inputs = self._resume_changes(config, accept_config) if resume else ([], None)
        if resume and module is not None and algorithm is not None and self.has_checkpoint():
            try:
                check_fits(self.checkpoint, module, algorithm)
            except TiltlmError:
                self._acquire(create=False)  # in use right now? say who holds it
                raise
        if not resume and out.is_dir() and self._others():  # said before anything is created there
            self._acquire(create=False)  # in use right now? say who holds it
            raise TiltlmError(f"output directory '{out}' is not empty; pass --resume to continue that run or choose another --out")
        self._created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self._acquire()
        self.config = json.loads(config.model_dump_json())
        if resume:
            had_config = (out / "config.yaml").is_file()
            if had_config or self.has_checkpoint():  # config.yaml and inputs.json describe what runs from now on
                if changes or not had_config or recorded_inputs(out) != inputs:
                    self._record(config, changes, inputs)
            if self.has_checkpoint():
                return load_checkpoint(self.checkpoint)
            if had_config:  # killed before its first checkpoint: restart from step 0
                self.truncate_metrics(-1)  # the step-0 evaluation of pi0 too (tiltlm.evaluate)
                return None
            raise TiltlmError(f"no checkpoint in '{out}' to resume; run without --resume")
        if self._others():  # another process wrote here between the check above and the lock
            self.close()
            raise TiltlmError(f"output directory '{out}' is not empty; pass --resume to continue that run or choose another --out")
        self._fresh = True
        try:
            atomic_write_text(out / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
            atomic_write_text(out / INPUTS, json.dumps(input_digests(config), indent=1))
        except BaseException:  # e.g. a full disk: leave --out as it was found
            self.abandon()
            raise
        return None

    def _step(self) -> int:
        """The step of the last checkpoint (0 without one)."""
        for directory in (self.checkpoint, self.checkpoint.with_name("checkpoint.old")):
            try:
                return int(json.loads((directory / "state.json").read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return 0

    def _ran_config(self) -> tuple[dict | None, str]:
        """The resolved config the run was trained with and where it was read: config.yaml, else (deleted) the one
        its checkpoint recorded; (None, "") for a checkpoint of an older tiltlm without config.yaml."""
        from tiltlm.train.config import load_config, parse_config

        if (self.path / "config.yaml").is_file():
            return json.loads(load_config(self.path / "config.yaml").model_dump_json()), f"'{self.path / 'config.yaml'}'"
        for directory in (self.checkpoint, self.checkpoint.with_name("checkpoint.old")):
            try:
                recorded = json.loads((directory / "state.json").read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            try:
                return json.loads(parse_config(recorded).model_dump_json()), f"as recorded in '{directory / 'state.json'}'"
            except TiltlmError:
                return recorded, f"as recorded in '{directory / 'state.json'}'"
        return None, ""

    def _resume_changes(self, config, accept: bool) -> tuple[list[tuple], dict]:
        """(what changed since the run was trained: config keys and ``inputs.<name>`` digests, the inputs' digests
        now); refuses (before anything is written) what may not change."""
        ran, where = self._ran_config()
        changes = self._config_changes(ran, where, config, accept) if ran is not None else []
        recorded = recorded_inputs(self.path)
        inputs = input_digests(config, known=recorded)
        moved = input_changes(recorded, inputs) if recorded is not None else []
        if moved and not accept:
            self._acquire(create=False)  # in use right now? say who holds it
            raise TiltlmError(f"the inputs of run '{self.path}' changed since it was trained: {describe_inputs(recorded, inputs, moved)}; "
                              f"restore them, pass --accept-config to continue it with these inputs from step {self._step()}, "
                              "or choose another --out")
        return changes + moved, inputs

    def _config_changes(self, ran: dict, where: str, config, accept: bool) -> list[tuple]:
        """How ``config`` differs from the run's (``ran``, read from ``where``); refuses what may not change."""
        changes = diff(ran, json.loads(config.model_dump_json()))
        if not changes:
            return []
        step, steps = self._step(), config.optim.steps
        if steps < step:
            self._acquire(create=False)
            raise TiltlmError(f"run '{self.path}' is at step {step} already and steps cannot be undone (optim.steps {steps}); "
                              f"resume with --steps {step} or more, or choose another --out")
        extends = [key for key, _, _ in changes] == ["optim.steps"] and config.optim.schedule == "constant"
        if not (accept or extends):
            self._acquire(create=False)  # in use right now? say who holds it
            why = (f" (with optim.schedule {config.optim.schedule} it sets every step's learning rate)"
                   if [key for key, _, _ in changes] == ["optim.steps"] else "")
            raise TiltlmError(f"the config given differs from the one run '{self.path}' was trained with: {describe(changes)}{why}; "
                              f"resume with the run's own config ({where}), pass --accept-config to "
                              f"continue it with this config from step {step}, or choose another --out")
        return changes

    def _record(self, config, changes: list[tuple], inputs: dict) -> None:
        """config.yaml and inputs.json become the config and inputs that run from now on; config_changes.jsonl keeps
        what they were (``inputs.<name>``: [old SHA-256, new SHA-256])."""
        plain = lambda v: None if v is ABSENT else v  # noqa: E731
        record = {"step": self._step(), "changes": {key: [plain(old), plain(new)] for key, old, new in changes}}
        if changes:
            log = self.path / "config_changes.jsonl"
            before = log.read_text() if log.is_file() else ""
            atomic_write_text(log, before + json.dumps(record) + "\n")
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
        atomic_write_text(self.path / INPUTS, json.dumps(inputs, indent=1))
        self.changes, self.changed_at = changes, record["step"]

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
            if self.config is not None:  # what ran, should config.yaml be lost (compared on --resume)
                contents = {**contents, "extra": {**contents.get("extra", {}), "config": self.config}}
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
