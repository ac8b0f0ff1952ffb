"""Synthetic preferences of known quality (`tiltlm preferences`; docs/math.md §15): pairs from a prior, labelled by a gold reward.

    rows = synthesize(HFPolicy.from_pretrained("default"), [""], pairs=500, gold=get_reward("count:a"), tau=1.0, seed=0)
    write_preferences("prefs.jsonl", rows)    # TRL's explicit-prompt format, plus the gold's columns

For each prompt x, two completions a, b are drawn independently from the prior pi0(·|x), conditioned on a ≠ b and
both non-empty (a pair of one completion compares nothing, and an empty completion has no token for a reward model to
read; such draws are redrawn). The label follows the Bradley–Terry model of the gold reward g (Gao et al. 2022):

    P(a ≻ b | x) = σ((g(x, a) − g(x, b)) / tau)

``bernoulli`` labels draw it (a seeded uniform u per pair: a is chosen when u < P(a ≻ b)); ``argmax`` labels always
choose the one with the larger g (ties by a fair seeded coin) — the tau → 0 limit. Each row keeps
``gold_chosen``, ``gold_rejected`` and ``p_chosen`` = σ((g_chosen − g_rejected)/tau), so a proxy reward model trained on
the file can be compared with the gold. Pairs are spread over the prompts as evenly as possible (prompt i gets
⌊N/P⌋ or ⌈N/P⌉); the rows are grouped by prompt, in the prompts' order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from tiltlm.errors import TiltlmError
from tiltlm.io import atomic_write_text
from tiltlm.metrics.proportions import proportion_text

MAX_ROUNDS = 16  # sampling rounds before a prior that keeps repeating itself is reported


def _bernoulli(p: torch.Tensor, u: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    return u < p


def _argmax(p: torch.Tensor, u: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    return torch.where(gap == 0, u < 0.5, gap > 0)


LABELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {"bernoulli": _bernoulli, "argmax": _argmax}
"""How a pair is labelled: (P(a ≻ b), seeded uniforms, g(a) − g(b)) -> whether a is chosen, (N,) bool each."""


def check_options(*, pairs: int, tau: float, labels: str) -> None:
    """One line for each option that cannot work, before any model is loaded."""
    if pairs < 1:
        raise TiltlmError(f"--pairs must be >= 1 (got {pairs}); it counts the labelled pairs to write")
    if not (tau > 0 and tau < float("inf")):
        raise TiltlmError(f"--tau must be a finite number > 0 (got {tau}); P(a ≻ b) = σ((g(a) − g(b))/tau): small tau labels "
                          "by the gold's ordering, large tau by coin flips (--labels argmax is the tau → 0 limit)")
    if labels not in LABELS:
        raise TiltlmError(f"--labels must be one of: {', '.join(LABELS)} (got {labels!r})")


def spread(n: int, k: int) -> list[int]:
    """``n`` pairs over ``k`` prompts: ⌊n/k⌋ each and one more for the first n mod k."""
    return [n // k + (i < n % k) for i in range(k)]


def draw_pairs(policy, contexts: list[str], counts: list[int], *, seed: int, accept=None) -> list[list[tuple[str, str]]]:
    """For each context i, ``counts[i]`` pairs (a, b) of the policy's completions with a ≠ b, both non-empty (and, with
    ``accept(i, a, b) -> one bool per pair``, for lists a, b of candidates after context i, accepted by it).

    Round r samples 2·(the largest shortfall) + 2 completions after each context still short, with seed
    ``seed·1000003 + r``; consecutive samples (2j, 2j + 1) of a context form a candidate pair."""
    found: list[list[tuple[str, str]]] = [[] for _ in contexts]
    filtered, accept = accept is not None, accept or (lambda i, a, b: [True] * len(a))
    for r in range(MAX_ROUNDS):
        short = [i for i, c in enumerate(counts) if len(found[i]) < c]
        if not short:
            return found
        n = 2 * max(counts[i] - len(found[i]) for i in short) + 2
        texts = policy.sample([contexts[i] for i in short], n, seed=seed * 1_000_003 + r).texts  # (len(short)·n,) grouped by context
        for k, i in enumerate(short):
            mine = texts[k * n:(k + 1) * n]
            candidates = [(a, b) for a, b in zip(mine[0::2], mine[1::2]) if a != b and a and b]
            ok = accept(i, [a for a, _ in candidates], [b for _, b in candidates]) if candidates else []
            found[i] += [pair for pair, keep in zip(candidates, ok) if keep][:counts[i] - len(found[i])]
    short = [i for i, c in enumerate(counts) if len(found[i]) < c]
    if short:
        i = short[0]
        raise TiltlmError(f"after {MAX_ROUNDS} sampling rounds the prior gave only {len(found[i])} of {counts[i]} pairs of two "
                          f"different non-empty completions{' that the gold tells apart' if filtered else ''} after the context "
                          f"{contexts[i][:40]!r}: it repeats itself; raise --max-new-tokens or --temperature, or ask for fewer --pairs")
    return found


def label_pairs(prompts: list[str], a: list[str], b: list[str], gold, *, tau: float, seed: int, labels: str = "bernoulli",
                columns: dict[str, list] | None = None) -> list[dict]:
    """The labelled rows (module docstring) of the pairs (prompts[k], a[k], b[k]); ``columns``: the prompts' data
    columns, one value per pair, for a gold reward that reads them."""
    g_a = gold(a, prompts, columns)  # (N,) float64
    g_b = gold(b, prompts, columns)
    gap = g_a - g_b
    p = torch.sigmoid(gap / tau)  # P(a ≻ b)
    u = torch.rand(len(a), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    a_wins = LABELS[labels](p, u, gap).tolist()
    rows = []
    for k, win in enumerate(a_wins):
        chosen, rejected, g_c, g_r = (a[k], b[k], g_a[k], g_b[k]) if win else (b[k], a[k], g_b[k], g_a[k])
        rows.append({"prompt": prompts[k], "chosen": chosen, "rejected": rejected, "gold_chosen": float(g_c),
                     "gold_rejected": float(g_r), "p_chosen": float(torch.sigmoid((g_c - g_r) / tau))})
    return rows


def synthesize(policy, contexts: list[str], *, pairs: int, gold, tau: float, seed: int, labels: str = "bernoulli",
               columns: dict[str, list] | None = None, no_ties: bool = False) -> list[dict]:
    """``pairs`` labelled rows after ``contexts`` (module docstring); ``columns``: each context's data columns;
    ``no_ties``: draw only pairs with g(a) ≠ g(b) (pi0 ⊗ pi0 conditioned on that too)."""
    check_options(pairs=pairs, tau=tau, labels=labels)

    def differ(i: int, a: list[str], b: list[str]) -> list[bool]:
        cols = {name: [values[i]] * len(a) for name, values in (columns or {}).items()} or None
        return (gold(a, [contexts[i]] * len(a), cols) != gold(b, [contexts[i]] * len(b), cols)).tolist()

    counts = spread(pairs, len(contexts))
    found = draw_pairs(policy, contexts, counts, seed=seed, accept=differ if no_ties else None)
    index = [i for i, got in enumerate(found) for _ in got]
    flat = [pair for got in found for pair in got]
    cols = {name: [values[i] for i in index] for name, values in (columns or {}).items()} or None
    return label_pairs([contexts[i] for i in index], [x for x, _ in flat], [y for _, y in flat], gold, tau=tau, seed=seed,
                       labels=labels, columns=cols)


def agreement(rows: list[dict]) -> tuple[int, int, int]:
    """(pairs whose chosen has the larger gold reward, pairs the gold orders, ties g_chosen = g_rejected)."""
    ordered = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    agree = sum(r["gold_chosen"] > r["gold_rejected"] for r in ordered)
    return agree, len(ordered), len(rows) - len(ordered)


def summary(rows: list[dict], path: Path, *, tau: float, labels: str) -> str:
    """The one-line report: agreement with the gold ordering (Wilson 95%) and what BT(g/tau) expects of it."""
    agree, ordered, ties = agreement(rows)
    prompts = len(dict.fromkeys(r["prompt"] for r in rows))
    if not ordered:
        return (f"wrote {len(rows)} pairs over {prompts} prompts to {path}; the gold reward ties every pair (g(a) = g(b)), "
                "so the labels are coin flips: choose a gold reward that tells the completions apart")
    expected = sum(max(r["p_chosen"], 1 - r["p_chosen"]) for r in rows if r["gold_chosen"] != r["gold_rejected"]) / ordered
    expect = "1 (argmax labels)" if labels == "argmax" else f"{expected:.3f}"
    return (f"wrote {len(rows)} pairs over {prompts} prompts to {path}: labels agree with the gold ordering on "
            f"{proportion_text(agree, ordered)} of the pairs it orders (Wilson 95%; {ties} ties), expected {expect} "
            f"under σ(Δg/tau) with tau {tau:g}")


def write_preferences(path: str | Path, rows: list[dict]) -> Path:
    """The rows as JSON Lines, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_preferences(out: Path, *, gold: str, pairs: int, prior: str = "default", data: Path | None = None,
                    contexts: list[str] | None = None, prompt_column: str = "prompt", tau: float = 1.0, seed: int = 0,
                    labels: str = "bernoulli", max_new_tokens: int = 32, temperature: float = 1.0,
                    chat: bool | None = None, no_ties: bool = False) -> str:
    """`tiltlm preferences`: every option checked before the prior is loaded; writes ``out``, returns the summary line."""
    from tiltlm.policies import HFPolicy
    from tiltlm.rewards import get_reward

    check_options(pairs=pairs, tau=tau, labels=labels)
    if data is not None and contexts:
        raise TiltlmError("give --data (a prompt file) or --context (strings), not both")
    scorer = get_reward(gold)
    columns = None
    if data is not None:
        from tiltlm.data import load_prompts

        prompts = load_prompts(data, prompt_column=prompt_column)
        scorer.check_rows(prompts.columns, [f"{prompts.numbered_as} {i}" for i in prompts.numbers], prompts.source)
        contexts, columns = prompts.prompts, prompts.columns
    contexts = list(contexts) if contexts else [""]
    policy = HFPolicy.from_pretrained(prior, max_new_tokens=max_new_tokens, temperature=temperature, chat_template=chat)
    rows = synthesize(policy, contexts, pairs=pairs, gold=scorer, tau=tau, seed=seed, labels=labels, columns=columns, no_ties=no_ties)
    write_preferences(out, rows)
    return summary(rows, out, tau=tau, labels=labels)
