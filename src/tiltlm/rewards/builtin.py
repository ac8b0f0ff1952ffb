"""Built-in text rewards: substring counts, regular expressions, lengths.

Each is a factory registered under its spec name: it receives the spec's argument and returns a
scorer texts -> list[float]. They are deterministic and cheap, so they double as the rewards whose
values (and hence whose tilted targets) can be worked out by hand in tests and toy experiments.
"""

from __future__ import annotations

import re

from tiltlm.errors import TiltlmError
from tiltlm.rewards.base import Scorer, register_reward


@register_reward("count", takes_argument=True, help="number of non-overlapping occurrences of <text> (case-sensitive)")
def count(text: str) -> Scorer:
    """r(x) = number of non-overlapping occurrences of `text` in x, scanning left to right."""
    return lambda texts: [float(t.count(text)) for t in texts]


@register_reward("contains", takes_argument=True, help="1 if <text> occurs (case-sensitive), else 0")
def contains(text: str) -> Scorer:
    """r(x) = 1[text is a substring of x]; as a constraint b(x) it gives p(x) ∝ pi0(x) b(x)."""
    return lambda texts: [float(text in t) for t in texts]


@register_reward("regex", takes_argument=True, metavar="pattern", help="1 if re.search(<pattern>, x) matches, else 0")
def regex(pattern: str) -> Scorer:
    """r(x) = 1[re.search(pattern, x)]: the pattern may match anywhere; anchor it with ^ or $."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise TiltlmError(
            f"reward {'regex:' + pattern!r} has an invalid pattern {pattern!r} ({e}); "
            "fix the regular expression (Python re syntax)"
        ) from e
    return lambda texts: [float(compiled.search(t) is not None) for t in texts]


@register_reward("length", takes_argument=False, help="number of characters")
def length() -> Scorer:
    """r(x) = len(x) in characters (Unicode code points), not tokens."""
    return lambda texts: [float(len(t)) for t in texts]


@register_reward("words", takes_argument=False, help="number of whitespace-separated words")
def words() -> Scorer:
    """r(x) = len(x.split()): runs of whitespace separate words; leading/trailing space counts for nothing."""
    return lambda texts: [float(len(t.split())) for t in texts]


@register_reward("env", takes_argument=False, help="R(tau), the sum of an environment's per-turn rewards (needs an env: section)")
def env_return() -> Scorer:
    """The return of an environment rollout. Targets read it from the samples' trajectories
    (tiltlm.targets.base.rewards_of); scoring plain texts with it is a configuration error."""

    def scorer(texts):
        raise TiltlmError("reward 'env' reads environment returns, but these samples are plain texts; add an env: section or pick a text reward")

    return scorer
