"""The one training loop, its config schema and checkpoints."""

from tiltlm.train.config import TrainConfig, load_config, parse_config
from tiltlm.train.build import fit, target_from_config, train
from tiltlm.train.loop import Trainer

__all__ = ["TrainConfig", "Trainer", "fit", "load_config", "parse_config", "target_from_config", "train"]
