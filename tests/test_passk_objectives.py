"""pass@k objectives with a verifier: PKPO's pass@k credits (reinforce/kl-pg ``set_reward: any`` + ``k``) and MaxRL.

Known answers first: the credits by hand and by brute force over k-subsets, the expected gradients by
enumerating every n-tuple of samples of a tiny policy, then the fixed points of docs/math.md §7 on an
exact verifier testbed: tokens {a, b, <eos>}, at most 3 new tokens (15 sequences), correct = exactly 3
tokens (8 sequences, pi0 mass 0.117 … 0.001, pass rate Z0 = 0.297), so p* = pi0·1[c]/Z0.
"""

import itertools
import math

import pytest
import torch

from tiltlm.algorithms import get_algorithm
from tiltlm.algorithms.maxrl import maxrl_weights
from tiltlm.algorithms.reinforce import set_credit, subset_max_credit
from tiltlm.errors import TiltlmError
from tiltlm.exact import enumerate_space
from tiltlm.policies import TabularPolicy
from tiltlm.rewards import get_reward
from tiltlm.targets import Constraint, Prior, Tilt
from tiltlm.train.config import parse_config
from tiltlm.train.loop import Trainer

VERIFIER = "regex:^...$"  # correct: exactly three tokens


# ---- the credits by hand and by brute force ------------------------------------------------------------
def _brute_force_credit(f: list[float], k: int, baseline: str) -> list[float]:
    """s_i from the definition: (1/C(n,k)) sum over k-subsets I containing i of max_I f, minus b_i built
    by enumerating the others' subsets (k-1 of them for loo-1, k for loo; max over nothing = 0)."""
    n = len(f)
    out = []
    for i in range(n):
        with_i = sum(max(f[j] for j in s) for s in itertools.combinations(range(n), k) if i in s) / math.comb(n, k)
        others = [j for j in range(n) if j != i]
        b = 0.0
        if baseline == "loo-1":
            subsets = list(itertools.combinations(others, k - 1))
            b = k / n * sum(max((f[j] for j in s), default=0.0) for s in subsets) / len(subsets)
        elif baseline == "loo":
            subsets = list(itertools.combinations(others, k))
            b = k / n * sum(max(f[j] for j in s) for s in subsets) / len(subsets)
        out.append(with_i - b)
    return out


def test_pass_at_k_credit_by_hand():
    """n = 5, c = 2 correct, k = 3. Unbiased pass@3 = 1 - C(3,3)/C(5,3) = 0.9.
    No baseline (the paper's r_i): correct k/n = 0.6; incorrect (k/n)·rho(n-1=4, c=2, k-1=2) = 0.6·(1 - C(2,2)/C(4,2)) = 0.5.
    loo-1: correct (k/n)·C(n-c, k-1)/C(n-1, k-1) = 0.6·C(3,2)/C(4,2) = 0.3; incorrect 0.
    loo: minus (k/n)·rho(others, 3): a correct one's others have 1 correct of 4 -> rho = 1 - C(3,3)/C(4,3) = 0.75,
    credit 0.6 - 0.45 = 0.15; an incorrect one's others have 2 of 4 -> rho = 1, credit 0.5 - 0.6 = -0.1."""
    f = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(subset_max_credit(f, 3, "none"), torch.tensor([0.6, 0.5, 0.5, 0.6, 0.5], dtype=torch.float64))
    torch.testing.assert_close(subset_max_credit(f, 3, "loo-1"), torch.tensor([0.3, 0, 0, 0.3, 0], dtype=torch.float64))
    torch.testing.assert_close(subset_max_credit(f, 3, "loo"), torch.tensor([0.15, -0.1, -0.1, 0.15, -0.1], dtype=torch.float64))
    # the mean over the group of the no-baseline credits, times n/k, is the unbiased pass@k estimate
    assert float(subset_max_credit(f, 3, "none").mean()) * 5 / 3 == pytest.approx(0.6 * 2 / 5 * 5 / 3 + 0.5 * 3 / 5 * 5 / 3)
    # k = 1 with loo is RLOO / n: (f_i - mean of the others) / 5
    torch.testing.assert_close(subset_max_credit(f, 1, "loo"), (f.double() - (f.sum() - f.double()) / 4) / 5)


@pytest.mark.parametrize("baseline", ["none", "loo-1", "loo"])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_subset_credit_matches_brute_force(k, baseline):
    f = [0.3, 1.0, 0.0, 0.7, 0.7, 0.2]  # continuous, with a tie (max@k); and the 0/1 pass@k case
    for values in (f, [float(v >= 0.5) for v in f]):
        if baseline == "loo" and k >= len(values):
            with pytest.raises(TiltlmError, match="needs n_per_context > k"):
                subset_max_credit(torch.tensor(values, dtype=torch.float64), k, baseline)
            continue
        got = subset_max_credit(torch.tensor(values, dtype=torch.float64), k, baseline).tolist()
        assert got == pytest.approx(_brute_force_credit(values, k, baseline), abs=1e-12)


def test_k_equal_n_is_the_set_credit():
    """k unset (= n) and loo-1 is the marginal R(S) - R(S minus x_i): the existing any/max credits, unchanged."""
    texts = ["x", "y", "x", "z", "w", "v"]
    reward = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.9, 0.3], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    assert set_credit(texts, reward, group, "max", 0.5).tolist() == pytest.approx([0.3, 0, 0, 0, 0.6, 0])
    assert set_credit(texts, reward, group, "any", 0.5).tolist() == [0, 0, 0, 0, 1, 0]  # two correct in group 0
    assert set_credit(texts[:4], reward[:4], group[:4], "max", 0.5, k=4).tolist() == pytest.approx([0.3, 0, 0, 0])  # k = n …
    with pytest.raises(TiltlmError, match="needs n_per_context >= k"):  # … but group 1 has only 2 samples
        set_credit(texts, reward, group, "any", 0.5, k=3)


def test_k_is_refused_without_a_subset_reward():
    with pytest.raises(TiltlmError, match="k = 4 is the subset size of set_reward any"):
        get_algorithm("reinforce", k=4)
    with pytest.raises(TiltlmError, match="k = 2 is the subset size"):
        get_algorithm("kl-pg", set_reward="distinct", k=2)
    assert get_algorithm("kl-pg", set_reward="any", k=4).config.k == 4


# ---- expected gradients, exactly: every n-tuple of a 3-outcome softmax ------------------------------------
def _expected_estimate(theta: torch.Tensor, correct: torch.Tensor, n: int, weights) -> torch.Tensor:
    """E over all n-tuples y of sum_i w_i(y) grad log pi(y_i) / n for pi = softmax(theta): (3,) exact."""
    pi = theta.softmax(0)
    score = torch.eye(3, dtype=torch.float64) - pi  # grad_theta log pi(y) = e_y - pi, row y
    total = torch.zeros(3, dtype=torch.float64)
    for ys in itertools.product(range(3), repeat=n):
        prob = math.prod(float(pi[y]) for y in ys)
        w = weights(correct[list(ys)])
        total += prob * sum(float(w[i]) * score[y] for i, y in enumerate(ys)) / n
    return total


def test_estimators_are_unbiased_for_their_objectives():
    """The loss averages over the group, so the expectation of mean_i w_i grad log pi(y_i) is computed.
    PKPO credits (sum_i s_i grad log pi unbiased for grad pass@k): E = grad pass@k / n, for every baseline.
    MaxRL weights n·1[c]/c: E = grad J_n, J_n = -sum_{k<=n} (1-p)^k/k; with the baseline: grad J_{n-1}."""
    theta = torch.tensor([0.3, -0.4, 0.9], dtype=torch.float64, requires_grad=True)
    correct = torch.tensor([True, True, False])  # two correct outcomes, one wrong
    n = 4
    p = theta.softmax(0)[:2].sum()
    exact = {}
    for name, value in {"pass@1": p, "pass@2": 1 - (1 - p) ** 2, "pass@3": 1 - (1 - p) ** 3,
                        "J4": -sum((1 - p) ** j / j for j in range(1, 5)), "J3": -sum((1 - p) ** j / j for j in range(1, 4))}.items():
        exact[name] = torch.autograd.grad(value, theta, retain_graph=True)[0]
    th = theta.detach()
    group = torch.zeros(n, dtype=torch.long)
    for k in (1, 2, 3):
        for baseline in ("none", "loo-1", "loo"):
            if baseline == "loo" and k >= n:
                continue
            est = _expected_estimate(th, correct, n, lambda c, k=k, b=baseline: subset_max_credit(c.double(), k, b))
            torch.testing.assert_close(est, exact[f"pass@{k}"] / n, atol=1e-12, rtol=0)
    est = _expected_estimate(th, correct, n, lambda c: maxrl_weights(c, group, baseline=False))
    torch.testing.assert_close(est, exact["J4"], atol=1e-12, rtol=0)
    est = _expected_estimate(th, correct, n, lambda c: maxrl_weights(c, group, baseline=True))
    torch.testing.assert_close(est, exact["J3"], atol=1e-12, rtol=0)
    grad_log_p = torch.autograd.grad(p.log(), theta)[0]
    assert not torch.allclose(exact["J4"], grad_log_p, atol=1e-3)  # biased for log p at n = 4 …
    # … by exactly the factor 1 - (1-p)^n, every pass@k gradient being a multiple of grad p
    torch.testing.assert_close(exact["J4"], (1 - (1 - p.detach()) ** 4) * grad_log_p, atol=1e-12, rtol=0)


def test_maxrl_weights_by_hand():
    correct = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1]).bool()
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    # group 0: n = 4, c = 2 -> 4/2 on the correct; group 1: none correct -> 0; group 2: n = 2, c = 1 -> 2
    assert maxrl_weights(correct, group, baseline=False).tolist() == [2, 0, 0, 2, 0, 0, 0, 2]
    assert maxrl_weights(correct, group, baseline=True).tolist() == [1, -1, -1, 1, 0, 0, -1, 1]
