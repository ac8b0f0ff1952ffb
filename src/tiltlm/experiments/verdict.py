"""A verdict is a call per claim — yes / no / undetermined — decided by the intervals, with the interval in its sentence.

For each trained method against pi0 on the held-out questions (tiltlm.experiments.questions.compare; Δ = method − pi0,
each with its 95% interval [lo, hi]; K = the largest k evaluated; the rules are docs/math.md §13's):

- **narrowed** — "yes" where pi0 is ahead at some k with an interval excluding 0 (hi < 0): pi0 overtakes it there.
  "no" where the method gained at k = 1 (Δpass@1 lo > PASS_MARGIN: `gained`) and at no k can pi0 be ahead by more than PASS_MARGIN (lo ≥ −margin
  at every k). Otherwise "undetermined": a run that moved nothing measurable cannot say that RL does not narrow.
- **kept_breadth** — "yes" where the method gained at k = 1 (`gained`) and both deficits are bounded by the margins:
  Δpass@K lo ≥ −PASS_MARGIN and Δdistinct-correct lo ≥ −DISTINCT_MARGIN × pi0's distinct correct answers. "no" where a
  deficit beyond its margin is established (hi below −margin). Otherwise "undetermined".

The margins are what "the same breadth" means here: 0.02 of pass@K (two questions in a hundred) and 5% of pi0's
distinct correct answers. `verdict_json` is the study's verdict.json (its contract is in README.md, Results), and
`sentences` writes the report's sentences from that file alone, so a page rewritten later says what the file says.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiltlm.experiments.cells import groups_of, load_cells
from tiltlm.experiments.intervals import LEVEL, Interval
from tiltlm.experiments.questions import Comparison, Evaluations, compare, evaluations, is_exact
from tiltlm.io import atomic_write_text

PASS_MARGIN = 0.02
DISTINCT_MARGIN = 0.05
YES, NO, UNDETERMINED = "yes", "no", "undetermined"


def gained(cmp: Comparison) -> bool:
    """A measurable gain at k = 1: Δpass@1's lower bound above PASS_MARGIN — a policy within the margin of pi0 at k = 1
    is, by the margins' own definition, the same as pi0 there, and says nothing about what training does to breadth."""
    return 1 in cmp.pass_at_k and cmp.pass_at_k[1].lo > PASS_MARGIN


def narrowed(cmp: Comparison) -> str:
    """The narrowed call of one comparison (module docstring)."""
    if any(iv.below_zero for iv in cmp.pass_at_k.values()):
        return YES
    return NO if gained(cmp) and all(iv.lo >= -PASS_MARGIN for iv in cmp.pass_at_k.values()) else UNDETERMINED


def kept_breadth(cmp: Comparison, base_distinct: float) -> str:
    """The kept_breadth call of one comparison; ``base_distinct`` is pi0's mean distinct correct answers."""
    if not cmp.pass_at_k or "distinct_correct" not in cmp.other:
        return UNDETERMINED
    big = cmp.pass_at_k[max(cmp.pass_at_k)]
    distinct, margin = cmp.other["distinct_correct"], DISTINCT_MARGIN * base_distinct
    if big.hi < -PASS_MARGIN or distinct.hi < -margin:
        return NO
    return YES if gained(cmp) and big.lo >= -PASS_MARGIN and distinct.lo >= -margin else UNDETERMINED


def verdict_json(pi0: Evaluations, methods: list[Evaluations], *, seeds: list) -> dict:
    """verdict.json: every method's differences to pi0 (pass@k at every k, distinct correct answers, mean reward, KL)
    with their intervals and its two calls; pi0's own means (for the sentences); "pairs": dpg − reinforce where both
    exist. Exact per-question values where every policy has them."""
    exact = is_exact(pi0, methods)
    sfx = "_exact" if exact else ""
    out: dict = {"level": LEVEL, "seeds": list(seeds), "n_questions": len(pi0.prompts), "exact": exact,
                 "margins": {"pass_at_k": PASS_MARGIN, "distinct_correct_relative": DISTINCT_MARGIN},
                 "base": {"pass_at_k": {str(k): pi0.mean(f"pass@{k}{sfx}") for k in pi0.ks(exact)},
                          "distinct_correct": pi0.mean("distinct_correct" + sfx) if "distinct_correct" + sfx in pi0.values else None},
                 "methods": {}, "pairs": {}}
    base_distinct = out["base"]["distinct_correct"] or 0.0
    by_name = {}
    for m in methods:
        cmp = compare(m, pi0, exact=exact)
        by_name[m.name] = m
        out["methods"][m.name] = {**cmp.as_dict(), "narrowed": narrowed(cmp), "kept_breadth": kept_breadth(cmp, base_distinct),
                                  "seeds": list(m.seeds)}
    if "dpg" in by_name and "reinforce" in by_name:
        out["pairs"]["dpg − reinforce"] = compare(by_name["dpg"], by_name["reinforce"], exact=exact).as_dict()
    out["sentences"] = sentences(out)
    return out


def _iv(d: dict) -> Interval:
    return Interval(d["diff"], d["lo"], d["hi"])


def _narrowed_sentence(name: str, m: dict, big: int) -> str:
    passes = {int(k): _iv(v) for k, v in m["pass_at_k"].items()}
    one, top = passes.get(1), passes[big]
    if m["narrowed"] == YES:
        k = min(k for k, iv in passes.items() if iv.below_zero)
        lead = (f"it gained at k = 1 (Δpass@1 {one.text()}) but π0 overtakes it from k = {k}" if one is not None and one.lo > PASS_MARGIN
                else f"π0 is ahead of it from k = {k}")
        return (f"{name} narrowed the model: {lead} (Δpass@{k} {passes[k].text()}; Δpass@{big} {top.text()}; "
                f"Δdistinct correct {_iv(m['distinct_correct']).text(2)}).")
    if m["narrowed"] == NO:
        worst = min(passes, key=lambda k: passes[k].lo)
        return (f"{name} did not narrow the model: it gained at k = 1 (Δpass@1 {one.text()}) and π0 is ahead by more than "
                f"{PASS_MARGIN:g} at no k (the lowest bound is at k = {worst}: Δpass@{worst} {passes[worst].text()}).")
    why = (f"no gain beyond {PASS_MARGIN:g} at k = 1 is outside its interval" if one is None or one.lo <= PASS_MARGIN
           else "a deficit of more than " + f"{PASS_MARGIN:g} at some k is inside its interval")
    return (f"Whether {name} narrows the model cannot be told from this run: Δpass@1 {one.text() if one else '—'}, "
            f"Δpass@{big} {top.text()} ({why}); more seeds (--seeds), more held-out questions or a longer budget "
            "(--budget) would decide.")


def _breadth_sentence(name: str, m: dict, big: int, base_distinct: float | None) -> str:
    passes = {int(k): _iv(v) for k, v in m["pass_at_k"].items()}
    one, top = passes.get(1), passes[big]
    distinct = _iv(m["distinct_correct"]) if "distinct_correct" in m else None
    numbers = (f"Δpass@1 {one.text() if one else '—'}, Δpass@{big} {top.text()}, Δdistinct correct "
               f"{distinct.text(2) if distinct else '—'}" + (f" of π0's {base_distinct:.2f}" if base_distinct is not None else ""))
    margins = f"margins {PASS_MARGIN:g} of pass@{big} and {DISTINCT_MARGIN:.0%} of π0's distinct correct answers"
    if m["kept_breadth"] == YES:
        return f"{name} kept the breadth: it gained accuracy and both deficits are bounded by the {margins} ({numbers})."
    if m["kept_breadth"] == NO:
        return f"{name} did not keep the breadth: a deficit beyond the {margins} is outside its interval ({numbers})."
    return (f"Whether {name} keeps the breadth cannot be told from this run ({numbers}; {margins}); more seeds, more "
            "held-out questions or a longer budget would decide.")


def sentences(verdict: dict) -> list[str]:
    """The report's verdict sentences, from a verdict.json alone: RL (reinforce, else the smallest-beta kl-pg) on
    narrowing, the posterior (dpg) on breadth, then every method's two calls in one sentence."""
    methods = verdict.get("methods", {})
    if not methods:
        return ["No held-out evaluation to compare: the study has no π0 evaluation or no trained policy."]
    big = max(int(k) for m in methods.values() for k in m["pass_at_k"])
    names = list(methods)
    rl = next((n for n in names if n == "reinforce"), None) or next((n for n in names if n.startswith("kl-pg")), None)
    out = []
    if rl is not None:
        out.append(_narrowed_sentence(rl, methods[rl], big))
    if "dpg" in methods:
        out.append(_breadth_sentence("dpg", methods["dpg"], big, verdict.get("base", {}).get("distinct_correct")))
    calls = "; ".join(f"{n}: narrowed {m['narrowed']}, kept breadth {m['kept_breadth']}" for n, m in methods.items())
    seeds = verdict.get("seeds", [])
    out.append(f"Calls ({verdict.get('level', LEVEL):.0%} intervals over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} × "
               f"{verdict.get('n_questions')} held-out questions{', exact values' if verdict.get('exact') else ''}): {calls}.")
    return out


def write_verdict(root: Path) -> dict | None:
    """``root/verdict.json`` from the study's cells (their eval_per_prompt.jsonl); None (and no file) when the study has
    no pi0 evaluation or no trained policy evaluated on the same questions."""
    out = verdict_of(groups_of(load_cells(root)))
    if out is None:
        return None
    atomic_write_text(Path(root) / "verdict.json", json.dumps(out, indent=1))
    return out


def read_verdict(root: Path) -> dict | None:
    """A study's verdict.json, or None where there is none (or it cannot be read)."""
    path = Path(root) / "verdict.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("methods"), dict) else None


def verdict_of(groups: dict, *, seeds: list | None = None) -> dict | None:
    """`verdict_json` of a study's, sweep's or training run's seed groups (tiltlm.experiments.cells.groups_of); None
    without a pi0 evaluation or a trained policy evaluated on the same questions."""
    pi0, methods = evaluations(groups)
    if pi0 is None or not methods:
        return None
    if seeds is None:
        seeds = sorted({s for m in methods for s in m.seeds if s is not None}, key=lambda s: (type(s).__name__, s))
    return verdict_json(pi0, methods, seeds=seeds)


def deltas(verdict: dict | None) -> dict[str, dict[int, Interval]]:
    """Δpass@k with its interval per method and k, from a verdict (tiltlm.experiments.passk.Deltas)."""
    return {} if verdict is None else {name: {int(k): _iv(v) for k, v in m["pass_at_k"].items()}
                                       for name, m in verdict.get("methods", {}).items()}
