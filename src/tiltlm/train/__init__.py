"""The one training loop, its config schema and checkpoints."""

from tiltlm.train.config import TrainConfig, load_config, parse_config
from tiltlm.train.loop import Trainer, target_from_config, train

__all__ = ["TrainConfig", "Trainer", "load_config", "parse_config", "target_from_config", "train"]
