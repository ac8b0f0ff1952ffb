"""Rewards r(x) that score generated texts; a target tilts the prior by exp(r(x)/beta).

    reward = get_reward("contains:dog")   # or "sentiment", "mymod:f", "rewards.py:f", any callable
    reward(["a dog", "a cat"])            # tensor([1., 0.], dtype=torch.float64)

Built-ins live in a registry (`register_reward`); `available_rewards()` lists every spec form.
"""

from tiltlm.rewards.base import Reward, Scorer, available_rewards, get_reward, register_reward, reward_help
from tiltlm.rewards import builtin, models, reward_model  # noqa: E402,F401  (importing them fills the registry)

__all__ = ["Reward", "Scorer", "available_rewards", "get_reward", "register_reward", "reward_help"]
