"""Checkpoints: safetensors for every tensor (weights, optimiser moments, RNG), JSON for the rest.

A checkpoint is a directory written beside its final place and renamed into it, so a crash never
leaves a half-written checkpoint that loads: either the old one or the new one is there.
No pickle is read back (tensors come only from safetensors files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tiltlm.errors import TiltlmError


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        meta["state"][str(idx)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
                meta["state"][str(idx)][name] = "tensor"
            else:
                meta["state"][str(idx)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, slots in meta["state"].items():
        state[int(idx)] = {name: (tensors[f"{idx}.{name}"] if v == "tensor" else v) for name, v in slots.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(module: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the module's trainable tensors (or of those ``names``), by state_dict name. Tied
    weights (an LM head sharing the input embeddings) appear once, under the name named_parameters gives."""
    names = trainable_names(module) if names is None else names
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items() if k in names}


def trainable_names(module: torch.nn.Module) -> set[str]:
    """state_dict names of the weights training changes."""
    return {n for n, p in module.named_parameters() if p.requires_grad}


def restore_proposal(policy, tensors: dict[str, torch.Tensor], names: set[str]):
    """An off-policy proposal from its checkpointed tensors: a copy of ``policy`` with the tensors training
    changes (``names``) loaded (older checkpoints hold the whole state_dict; either loads). None when they
    do not fit this policy."""
    proposal = policy.copy()
    module = proposal if isinstance(proposal, torch.nn.Module) else proposal.model
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    return None if unexpected or set(missing) & names else proposal


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU contiguous tensors, each with storage of its own: safetensors refuses tensors that share memory
    (tied weights in a full state_dict), so a tensor sharing an earlier one's storage is cloned. Loading
    the file with load_state_dict copies both names into the one tied parameter: the tie survives."""
    out, seen = {}, set()
    for name, value in tensors.items():
        value = value.detach().contiguous().cpu()
        key = (value.untyped_storage().data_ptr(), value.device.type) if value.numel() else None
        if key in seen:
            value = value.clone()
        elif key is not None:
            seen.add(key)
        out[name] = value
    return out


def save_checkpoint(
    directory: Path, *, step: int, weights: dict[str, torch.Tensor], optimizer: dict,
    extra: dict[str, Any], proposal: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``directory`` atomically for ``step``: the trainable ``weights`` (``trainable_state``), the
    ``optimizer``'s state_dict, the RNG state, a proposal's weights (its state_dict, or just the tensors
    training changes) and JSON state. Tensors that share memory (tied weights) are stored once each."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(_own_storage(weights), str(tmp / "policy.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(_own_storage(opt_tensors), str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.random.get_rng_state()}, str(tmp / "rng.safetensors"))
        if proposal is not None:
            save_file(_own_storage(proposal), str(tmp / "proposal.safetensors"))
        # state.json is written last and lists each tensor file's size and SHA-256, so a torn or altered file never loads
        files = {f.name: _digest(f) for f in sorted(tmp.iterdir())}
        state = {"step": step, "optimizer": opt_meta, **extra, "has_proposal": proposal is not None, "files": files}
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:  # nothing half-written stays behind; the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def _digest(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (falls back to ``.old`` if a crash hit the swap).

    Every file is checked against the sizes and hashes in state.json: a truncated or corrupted
    checkpoint raises a one-line TiltlmError (or, when ``.old`` is intact, that one is read).
    """
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not (directory / "state.json").is_file():
        if (old / "state.json").is_file():
            directory = old
        else:
            raise TiltlmError(f"no checkpoint in '{directory}'; train without --resume or point at a run directory")
    try:
        return _read(directory)
    except TiltlmError:
        if directory != old and (old / "state.json").is_file():
            return _read(old)
        raise


def _read(directory: Path) -> dict[str, Any]:
    try:
        state = json.loads((directory / "state.json").read_text())
        for name, expected in state.get("files", {}).items():
            if _digest(directory / name) != expected:
                raise ValueError(f"{name} does not match its recorded size and hash")
        out = {
            "state": state,
            "policy": load_file(str(directory / "policy.safetensors")),
            "optimizer": _unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), state["optimizer"]),
            "rng": load_file(str(directory / "rng.safetensors"))["torch"],
        }
        if state.get("has_proposal"):
            out["proposal"] = load_file(str(directory / "proposal.safetensors"))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise TiltlmError(f"checkpoint '{directory}' is unreadable ({why}); delete it and --resume restarts the run from step 0") from None


def check_fits(directory: Path, module: torch.nn.Module, algorithm) -> None:
    """Before a resume loads anything: the checkpoint in ``directory`` (or its ``.old``) must hold the state of
    ``algorithm`` (the same state keys) and tensors of this ``module``'s trainable names and shapes (a prior of
    another vocabulary or size has other shapes); else a one-line TiltlmError. An unreadable checkpoint is left
    to load_checkpoint, which says so."""
    directory = Path(directory)
    if not (directory / "state.json").is_file():
        directory = directory.with_name(directory.name + ".old")
    try:
        state = json.loads((directory / "state.json").read_text())
        with safe_open(str(directory / "policy.safetensors"), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (OSError, ValueError, TypeError, SafetensorError):
        return
    ran = (state.get("config") or {}).get("algorithm", {}).get("name", "another algorithm")
    have, want = set(state.get("algorithm") or {}), set(algorithm.state_dict())
    if have != want:
        raise TiltlmError(f"checkpoint '{directory}' holds the state of {ran} ({', '.join(sorted(have)) or 'none'}), not of "
                          f"{getattr(algorithm, 'name', type(algorithm).__name__)} ({', '.join(sorted(want)) or 'none'}); "
                          "resume with the algorithm it was trained with, or choose another --out")
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if k in trainable_names(module)}
    if set(stored) != set(shapes):
        raise TiltlmError(f"checkpoint '{directory}' does not match this policy ({len(set(stored) ^ set(shapes))} tensors differ); "
                          "resume with the prior (and lora:) it was trained with, or choose another --out")
    for name, shape in shapes.items():
        if stored[name] != shape:
            raise TiltlmError(f"checkpoint '{directory}' has {name} of shape {list(stored[name])} but this policy's is {list(shape)} "
                              "(a prior of another vocabulary or size); resume with the prior it was trained with, or choose another --out")
