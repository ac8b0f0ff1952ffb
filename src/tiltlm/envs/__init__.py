"""Environments: the interactive case, where the policy acts over several turns and sees observations.

Importing this package registers the built-in environments (every module of the package is imported).
"""

from tiltlm.envs.base import Env, Episode, StepResult, Trajectory, available_envs, get_env, register_env
from tiltlm.envs.rollout import rollout
from tiltlm.registry import import_submodules

# built-in environments: every module here is imported (each registers itself), so a new environment is
# one new file. Not the scripts: api_server runs as its own process, make_search_collection builds an asset.
import_submodules(__name__, __path__, skip=("api_server", "make_search_collection"))

__all__ = ["Env", "Episode", "StepResult", "Trajectory", "available_envs", "get_env", "register_env", "rollout"]
