"""Environments: the interactive case, where the policy acts over several turns and sees observations.

Importing this package registers the built-in environments (one import line each below).
"""

from tiltlm.envs.base import Env, Episode, StepResult, Trajectory, available_envs, get_env, register_env
from tiltlm.envs.rollout import rollout

# built-in environments (each module registers itself)
# -- registration imports --
from tiltlm.envs import api  # noqa: F401,E402
from tiltlm.envs import dialogue  # noqa: F401,E402
from tiltlm.envs import search  # noqa: F401,E402
from tiltlm.envs import tabular  # noqa: F401,E402

__all__ = ["Env", "Episode", "StepResult", "Trajectory", "available_envs", "get_env", "register_env", "rollout"]
