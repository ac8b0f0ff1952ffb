"""A proportion k/n with its Wilson score interval (Wilson 1927): pairwise accuracies, label agreement.

    wilson(45, 50)      # (0.786…, 0.957…): the 95% interval of 45 successes in 50 independent trials

The interval is {p : |k/n − p| ≤ z·sqrt(p(1 − p)/n)}, solved for p:

    centre = (p̂ + z²/2n) / (1 + z²/n),   half = z/(1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)

Unlike the normal (Wald) interval p̂ ± z·sqrt(p̂(1 − p̂)/n) it stays inside [0, 1] and does not collapse to a point
at k = 0 or k = n (0 of 10 gives [0, 0.278]), which is where small held-out sets of a good reward model land.
"""

from __future__ import annotations

import math

from tiltlm.metrics.divergences import Z95


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of ``successes`` out of ``n`` (z = 1.96: 95%); n = 0 gives (0, 1)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n] (got {successes} of {n})")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends (rounding aside)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion_text(successes: int, n: int) -> str:
    """``0.900 [0.786, 0.957] (45/50)``: the proportion, its Wilson 95% interval and the counts."""
    low, high = wilson(successes, n)
    value = successes / n if n else float("nan")
    return f"{value:.3f} [{low:.3f}, {high:.3f}] ({successes}/{n})"
