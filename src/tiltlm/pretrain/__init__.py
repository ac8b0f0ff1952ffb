"""The embedded default prior: a story grammar (`generate_stories`) and the recipe that trains a
small GPT-2 on it from scratch (`pretrain`).

The trained model ships in ``tiltlm/assets/default`` (see docs/default_model.md).
"""

from tiltlm.pretrain.corpus import generate_stories
from tiltlm.pretrain.train import ModelShape, OptimConfig, pretrain

__all__ = ["generate_stories", "pretrain", "ModelShape", "OptimConfig"]
