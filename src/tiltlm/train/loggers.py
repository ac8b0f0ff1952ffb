"""Optional experiment trackers beside metrics.jsonl (which is always written): TensorBoard,
Weights & Biases (offline unless the user configured it) and MLflow (a file store in the run dir).

Each is a small class with ``log(row)`` and ``close()``; ``make_loggers("tensorboard,wandb", …)``
builds them. Only numeric metrics are sent; nothing from the environment (API keys, tokens) is ever
written by tiltlm.
"""

from __future__ import annotations

import contextlib

import importlib.util
import os
from pathlib import Path

from tiltlm.errors import TiltlmError

AVAILABLE = ("jsonl", "tensorboard", "wandb", "mlflow")


def _numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _need(module: str, package: str, name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TiltlmError(f"--log {name} needs the package {package}; pip install {package} (or drop {name} from --log)")


class TensorBoardLogger:
    def __init__(self, out_dir: Path, config: dict):
        _need("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + str(config) + "\n```")

    def log(self, row: dict) -> None:
        for key, value in _numeric(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Offline mode (files under the run directory) unless WANDB_MODE or WANDB_API_KEY says otherwise."""

    def __init__(self, out_dir: Path, config: dict):
        _need("wandb", "wandb", "wandb")
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tiltlm"), dir=str(out_dir), config=config, mode=mode)

    def log(self, row: dict) -> None:
        self.run.log(_numeric(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """A local file store under the run directory unless MLFLOW_TRACKING_URI is set."""

    def __init__(self, out_dir: Path, config: dict):
        _need("mlflow", "mlflow", "mlflow")
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a file store needs no server or database; MLflow >= 3 asks for this explicit opt-in to use one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(out_dir).resolve() / "mlruns").as_uri())
        self.run = mlflow.start_run()
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in _numeric(row).items()}, step=int(row["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


def make_loggers(spec: str | None, out_dir: Path, config: dict) -> list:
    """Loggers for a comma-separated spec such as "tensorboard,wandb" ('jsonl' is always on)."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in AVAILABLE]
    if unknown:
        raise TiltlmError(f"unknown logger '{unknown[0]}'; available: {', '.join(AVAILABLE)}")
    return [_CLASSES[n](out_dir, config) for n in dict.fromkeys(names) if n in _CLASSES]


class LoggerGroup:
    """Fan one metrics row out to every logger (the Trainer's on_metrics callback)."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def __call__(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


@contextlib.contextmanager
def progress_bar(show: bool, name: str, total: int, done: int):
    """A rich progress bar over a run's steps (reward and KL(pi||pi0) of the last step); yields
    ``advance(step, row)``, which does nothing when ``show`` is False."""
    if not show:
        yield lambda step, row: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("reward {task.fields[reward]:.3f}  KL(pi||pi0) est. {task.fields[kl]:+.3f}")]
    with Progress(*columns) as bar:
        task = bar.add_task(name, total=total, completed=done, reward=float("nan"), kl=float("nan"))
        nan = float("nan")  # a step of preference pairs (dpo, ipo, cdpo) has neither: nothing was sampled
        yield lambda step, row: bar.update(task, completed=step, reward=row.get("reward/mean", nan), kl=row.get("kl/prior_seq", nan))
