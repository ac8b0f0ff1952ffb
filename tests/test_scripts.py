"""The reference scripts (scripts/pure_rl.py, kl_pg.py, dpg.py) run end to end with a tiny budget,
and move the exact quantities the way their objectives predict (measured by enumeration, not sampled).

Each run builds its own 5-token testbed (the scripts' default, ~2 s on one thread), so the default
path is what CI exercises; 15 steps of 16 samples take a few seconds per script.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
KEYS = {"reward_policy", "entropy_policy", "kl_policy_target", "kl_target_policy"}


def run_script(name: str, *args: str) -> dict:
    """Run scripts/<name>.py with --json; returns its parsed stdout (one JSON object)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), "--json", "--seed", "0", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{name}.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout)
    for when in ("before", "after"):
        assert set(out[when]) >= KEYS
        assert all(math.isfinite(v) for v in out[when].values()), out
    return out


TINY = ("--steps", "15", "--batch", "16")


def test_pure_rl_raises_reward_and_collapses_entropy():
    # J = E_pi[r]: its optimum is a point mass on argmax r, so reward up, entropy down
    out = run_script("pure_rl", *TINY)
    before, after = out["before"], out["after"]
    assert after["reward_policy"] > before["reward_policy"] + 0.5, out
    assert after["entropy_policy"] < before["entropy_policy"] - 0.2, out


def test_kl_pg_lowers_reverse_kl_to_the_posterior():
    # E[r] - beta KL(pi||pi0) = -beta KL(pi||p*) + const: reverse KL to p* goes down
    out = run_script("kl_pg", *TINY)
    assert out["after"]["kl_policy_target"] < 0.5 * out["before"]["kl_policy_target"], out


def test_dpg_lowers_forward_kl_to_the_posterior():
    # CE = -E_p*[log pi] = KL(p*||pi) + const: forward KL to p* goes down; log Z_hat lands near the exact log Z
    out = run_script("dpg", *TINY)
    assert out["after"]["kl_target_policy"] < 0.5 * out["before"]["kl_target_policy"], out
    assert abs(out["log_z"]["estimate"] - out["log_z"]["exact"]) < 0.5, out

