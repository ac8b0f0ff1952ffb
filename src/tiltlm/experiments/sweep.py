"""The matched-compute harness: a grid of algorithms × beta × seeds on one prior and reward.

    base:   {prior: default, target: {reward: sentiment}, sampling: {...}, optim: {...}, metrics: {...}}
            (or a training config file: `base: kl_pg_default.yaml`, relative to the sweep file; its
            algorithm, target.beta and seed are replaced by each cell's)
    grid:   {algorithms: [reinforce, kl-pg, {name: dpg, off_policy: true}], betas: [0.1, 1.0], seeds: [0, 1]}

An example: configs/sweep_example.yaml.

Every cell trains with the same sampling budget (steps × contexts × n_per_context samples), so the
reward–KL frontier compares methods at matched compute. ``reinforce`` ignores beta in its loss; its
cells differ only in which p* they are measured against. The run is resumable: a cell with
``done.json`` is never re-run, a cell with a checkpoint continues from it, and ``results.jsonl`` /
``summary.csv`` are rebuilt from the cells at the end.

A re-run also compares the content of each started cell's inputs (its data, prior weights and reward files:
tiltlm.reuse.input_digests, recorded in the cell's inputs.json) with what they are now: a cell whose inputs
changed is refused the same way, and deleted and run again with ``overwrite``.

A re-run first compares its config with the ``sweep.yaml`` there (both resolved), so that sweep.yaml always
describes what ran: the same config, or a grown grid (more algorithms, betas or seeds over the same base),
reuses the cells there; a config under which a started cell would have another training config, or would no
longer be part of the grid, is refused with the differing keys, unless ``overwrite``: then exactly those
cells (directories sweep.yaml names under ``cells/``, nothing else) are deleted and run again.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tiltlm.errors import TiltlmError
from tiltlm.io import atomic_write_text, load_yaml, path_component
from tiltlm.reuse import describe, describe_inputs, diff, input_changes, input_digests, recorded_inputs
from tiltlm.train.config import parse_config


class Grid(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithms: tuple[Any, ...] = Field(..., min_length=1, description="algorithm names or {name, label?, betas?, …options} mappings")
    betas: tuple[float, ...] = Field(..., min_length=1, description="target temperatures (also the KL coefficient of kl-pg / ppo-kl)")
    seeds: tuple[int, ...] = Field((0,), min_length=1)


class SweepConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base: dict = Field(default_factory=dict, description="a training config without `algorithm` (see docs/config.md), "
                       "or the path of a training config file relative to the sweep file")
    grid: Grid


def load_sweep(path: Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise TiltlmError(f"sweep config '{path}' not found; pass the path of a YAML sweep config")
    data = load_yaml(path, f"sweep config '{path}'") or {}
    if isinstance(data, dict) and isinstance(data.get("base"), str):
        data = {**data, "base": _base_file(path, data["base"])}
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise TiltlmError(f"sweep config '{'.'.join(map(str, err['loc']))}': {err['msg']}; the keys are base (a training config "
                          "or its path) and grid {algorithms, betas, seeds}") from None


def _base_file(sweep_path: Path, base: str) -> dict:
    """``base: train.yaml``: a training config file, relative to the sweep file; its algorithm is left to the grid."""
    path = (sweep_path.parent / base).expanduser() if not Path(base).expanduser().is_absolute() else Path(base).expanduser()
    if not path.is_file():
        raise TiltlmError(f"sweep config '{sweep_path}': base '{base}' is not a file ({path} not found); give the path of a "
                          "training config relative to the sweep file, or write the training config under base:")
    data = load_yaml(path, f"sweep config '{sweep_path}': base '{path}'") or {}
    if not isinstance(data, dict):
        raise TiltlmError(f"sweep config '{sweep_path}': base '{path}' must be a training config (a YAML mapping), "
                          f"not {type(data).__name__}")
    data.pop("algorithm", None)  # each cell's algorithm comes from grid.algorithms
    try:
        parse_config({**data, "algorithm": {"name": "dpg"}})  # any algorithm: the rest of the config is checked here
    except TiltlmError as e:
        raise TiltlmError(f"sweep config '{sweep_path}': base '{path}' is not a valid training config: {e}") from None
    return data


def cells(sweep: SweepConfig) -> list[tuple[str, dict]]:
    """(cell name, training config dict) for every grid point, validated up front."""
    out = []
    for algorithm in sweep.grid.algorithms:
        algo = {"name": algorithm} if isinstance(algorithm, str) else dict(algorithm)
        betas = tuple(algo.pop("betas", sweep.grid.betas))  # an algorithm may run at its own betas
        label = algo.pop("label", None)
        if label is None:  # from the name and options; a separator in an option's value (a path) must not nest directories
            label = re.sub(r"[/\\\x00-\x1f]", "_", algo["name"] + "".join(f"-{k}={v}" for k, v in sorted(algo.items()) if k != "name"))
        label = path_component(label, "sweep label")  # every cell's directory stays inside --out/cells
        for beta in betas:
            for seed in sweep.grid.seeds:
                data = json.loads(json.dumps(sweep.base))
                if "algorithm" in data:
                    raise TiltlmError("sweep base must not set `algorithm`; list algorithms under grid.algorithms")
                data.setdefault("target", {})["beta"] = beta
                data["algorithm"] = dict(algo)
                data["seed"] = seed
                parse_config(data)  # fail before anything runs
                out.append((f"{label}_beta{beta:g}_seed{seed}", {"label": label, "beta": beta, "seed": seed, "config": data}))
    names = [c for c, _ in out]
    if len(set(names)) != len(names):
        raise TiltlmError("two grid algorithms get the same cell name; give them distinct `label`s")
    return out


def run_sweep(config_path: Path, out: Path, *, progress: bool = False, on_cell=None, log: str | None = None,
              overwrite: bool = False) -> Path:
    """Run every unfinished cell, then rebuild results.jsonl and summary.csv. Returns ``out``.

    ``log``: extra trackers per cell ("tensorboard,wandb,mlflow"; metrics.jsonl is always written).
    ``overwrite``: delete and re-run the cells the sweep.yaml there describes differently (module docstring).
    """
    import shutil

    from tiltlm.train.build import fit
    from tiltlm.train.rundir import RunDir

    sweep = load_sweep(config_path)
    grid = cells(sweep)
    out = Path(out)
    stale = _stale_cells(out, sweep, grid, overwrite=overwrite)
    stale += [name for name in _moved_cells(out, grid, overwrite=overwrite) if name not in stale]
    for name in stale:
        RunDir(out / "cells" / name).check_free()
    for name in stale:
        shutil.rmtree(out / "cells" / name)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(json.loads(sweep.model_dump_json()), sort_keys=False))
    for name, cell in grid:
        cell_dir = out / "cells" / name
        if (cell_dir / "done.json").is_file():
            continue
        config = parse_config(cell["config"])
        # a started cell continues (from its checkpoint, or from step 0 when it was killed before the first one); its
        # run directory is locked while a process trains it, so two sweeps over one --out never share a cell
        resume = any((cell_dir / name).exists() for name in ("checkpoint", "checkpoint.old", "config.yaml"))
        _, rows = fit(config, cell_dir, resume=resume, log=log, progress=progress)
        final = rows[-1] if rows else _last_row(cell_dir)
        record = {"cell": name, "algorithm": cell["label"], "beta": cell["beta"], "seed": cell["seed"], "final": final}
        atomic_write_text(cell_dir / "done.json", json.dumps(record))
        if on_cell is not None:
            on_cell(name)
    collect(out, [name for name, _ in grid])
    return out


def _stale_cells(out: Path, sweep: SweepConfig, grid: list[tuple[str, dict]], *, overwrite: bool) -> list[str]:
    """The started cells in ``out`` that ``sweep`` would describe differently (another training config, or no longer
    in the grid): refused unless ``overwrite``, then returned for deletion."""
    stored = out / "sweep.yaml"
    if not stored.is_file():
        if (out / "cells").is_dir() and any((out / "cells").iterdir()):
            raise TiltlmError(f"'{out}' holds cells/ but no sweep.yaml, so which sweep made them is unknown; choose another --out")
        return []
    try:
        old = SweepConfig.model_validate(yaml.safe_load(stored.read_text()))
        before = dict(cells(old))
    except (yaml.YAMLError, ValidationError, TiltlmError, AttributeError, TypeError, ValueError):
        raise TiltlmError(f"'{stored}' is not a sweep config this tiltlm can read, so its cells cannot be compared; "
                          "choose another --out") from None
    now = dict(grid)
    stale = [name for name in before if (out / "cells" / name).exists()
             and (name not in now or _resolved(now[name]) != _resolved(before[name]))]
    if stale and not overwrite:
        changes = diff(json.loads(old.model_dump_json()), json.loads(sweep.model_dump_json()))
        raise TiltlmError(f"sweep directory '{out}' was run with another sweep config ({describe(changes)}) and {len(stale)} of its "
                          f"cells would not be what it describes (e.g. {stale[0]}); choose another --out, or pass --overwrite to "
                          "delete those cells and run them with this config")
    return stale


def _moved_cells(out: Path, grid: list[tuple[str, dict]], *, overwrite: bool) -> list[str]:
    """The started cells in ``out`` whose inputs (data, prior weights, reward files: tiltlm.reuse.input_digests)
    differ from what they recorded when they ran: refused unless ``overwrite``, then returned for deletion."""
    moved, first = [], ""
    for name, cell in grid:
        recorded = recorded_inputs(out / "cells" / name)
        if recorded is None:  # not started, or by an older tiltlm
            continue
        current = input_digests(parse_config(cell["config"]), known=recorded)
        if changes := input_changes(recorded, current):
            moved.append(name)
            first = first or describe_inputs(recorded, current, changes)
    if moved and not overwrite:
        raise TiltlmError(f"sweep directory '{out}': the inputs of {len(moved)} of its cells changed since they ran (e.g. "
                          f"{moved[0]}: {first}); restore them, pass --overwrite to delete those cells and run them with "
                          "these inputs, or choose another --out")
    return moved


def _resolved(cell: dict) -> tuple:
    """A cell as it would train: its label and its training config, parsed and dumped."""
    return cell["label"], json.loads(parse_config(cell["config"]).model_dump_json())


def _last_row(cell_dir: Path) -> dict:
    lines = (cell_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def collect(out: Path, names: list[str]) -> None:
    """results.jsonl (one row per finished cell) and summary.csv (mean and std over seeds)."""
    records = [json.loads((out / "cells" / n / "done.json").read_text()) for n in names if (out / "cells" / n / "done.json").is_file()]
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["algorithm"], r["beta"]), []).append(r["final"])
    keys = sorted({k for r in records for k, v in r["final"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algorithm", "beta", "seeds"] + [f"{k} {s}" for k in keys for s in ("mean", "std")])
        for (algorithm, beta), finals in sorted(groups.items()):
            row: list = [algorithm, beta, len(finals)]
            for k in keys:
                values = [x[k] for x in finals if k in x and isinstance(x[k], (int, float))]
                mean = sum(values) / len(values) if values else math.nan
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                row += [mean, std]
            writer.writerow(row)
        atomic_write_text(out / "summary.csv", f.getvalue())
