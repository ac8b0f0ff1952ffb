"""Built-in text rewards: substring counts, regular expressions, lengths, and verifiers.

Each is a factory registered under its spec name: it receives the spec's argument and returns a
scorer texts -> list[float]. They are deterministic and cheap, so they double as the rewards whose
values (and hence whose tilted targets) can be worked out by hand in tests and toy experiments.

The verifiers (``exact_match``, ``numeric_match``, ``math_verify``, ``reasoning_gym``, ``quiz``) score 1.0 or 0.0
against a column of the prompt data's rows (``answer`` unless the spec names another; ``check`` for ``quiz``), so
they need samples drawn after a dataset's prompts (tiltlm.data).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from tiltlm.errors import TiltlmError
from tiltlm.rewards.base import RowScorer, Scorer, register_reward


@register_reward("count", takes_argument=True, help="number of non-overlapping occurrences of <text> (case-sensitive)")
def count(text: str) -> Scorer:
    """r(x) = number of non-overlapping occurrences of `text` in x, scanning left to right."""
    return lambda texts: [float(t.count(text)) for t in texts]


@register_reward("contains", takes_argument=True, help="1 if <text> occurs (case-sensitive), else 0")
def contains(text: str) -> Scorer:
    """r(x) = 1[text is a substring of x]; as a constraint b(x) it gives p(x) ∝ pi0(x) b(x)."""
    return lambda texts: [float(text in t) for t in texts]


REGEX_TIMEOUT_S = 1.0
"""Seconds one ``regex:`` search may take on one text; a pattern that backtracks exponentially stops here."""


@register_reward("regex", takes_argument=True, metavar="pattern", help="1 if re.search(<pattern>, x) matches, else 0")
def regex(pattern: str) -> Scorer:
    """r(x) = 1[re.search(pattern, x)]: the pattern may match anywhere; anchor it with ^ or $.

    Searched with the ``regex`` package (Python re syntax) under a time limit of `REGEX_TIMEOUT_S` per text:
    ``(\\w+)+!`` on forty letters without a '!' backtracks 2^40 ways, and re would hold the interpreter until done.
    """
    import regex as regex_package

    spec = "regex:" + pattern
    try:
        compiled = regex_package.compile(pattern)
    except (regex_package.error, re.error) as e:
        raise TiltlmError(
            f"reward {spec!r} has an invalid pattern {pattern!r} ({e}); fix the regular expression (Python re syntax)"
        ) from e

    def search(text: str) -> float:
        try:
            return float(compiled.search(text, timeout=REGEX_TIMEOUT_S) is not None)
        except TimeoutError:
            raise TiltlmError(
                f"reward {spec!r} took more than {REGEX_TIMEOUT_S:g} s to search one text of {len(text):,} characters "
                "(the pattern backtracks exponentially); simplify the pattern, e.g. (\\w+)+ -> \\w+"
            ) from None

    return lambda texts: [search(t) for t in texts]


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


# ---- verifiers: compare a completion's final answer with a column of its prompt's row -----------------


def final_answer(text: str) -> str:
    """The answer a completion ends with: the last ``\\boxed{…}``, else the last ``<answer>…</answer>``, else what
    follows the last ``####`` (GSM8K) or ``answer is`` / ``answer:``, else the last non-empty line; stripped of
    spaces, ``$`` and a final period."""
    text = str(text)
    boxed = last_boxed(text)
    if boxed is not None:
        found = boxed
    elif (tags := re.findall(r"<answer>(.*?)</answer>", text, re.S)):
        found = tags[-1]
    elif "####" in text:
        found = text.rsplit("####", 1)[1]
    elif (said := re.findall(r"answer(?: is|:)\s*(.+)", text, re.I)):
        found = said[-1]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        found = lines[-1] if lines else ""
    return found.strip().strip("$").strip().rstrip(".").strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (the ``\\boxed{}`` content when there is one): integers, decimals, ``1,234``,
    ``3/4``, ``1e-3``; None when there is none."""
    text = str(text)
    boxed = last_boxed(text)
    found = _NUMBER.findall(boxed if boxed is not None else text)
    if not found:
        return None
    number = found[-1].replace(",", "").replace(" ", "")
    try:
        return float(Fraction(number)) if "/" in number and "e" not in number.lower() else float(number)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise(answer: str) -> str:
    return " ".join(str(answer).split()).casefold()


def _column(spec: str, columns: dict, name: str) -> list:
    if name not in columns:
        have = f"the samples' data columns are: {', '.join(columns)}" if columns else "the samples carry no data columns"
        raise TiltlmError(f"reward {spec!r} compares with the column {name!r}, but {have}; add that column to the prompt data "
                          f"or write {spec.split(':')[0]}:<column>")
    return columns[name]


@register_reward("exact_match", takes_argument="optional", metavar="column", row=True,
                 help="1 if the completion's final answer (\\boxed{}, <answer>, ####, last line) equals the row's <column> (default answer), else 0")
def exact_match(column: str = "answer") -> RowScorer:
    """r = 1[final_answer(x) == final_answer(row[column])], compared after collapsing whitespace and case."""
    spec = f"exact_match:{column}"
    return lambda texts, prompts, columns: [
        float(_normalise(final_answer(t)) == _normalise(final_answer(a))) for t, a in zip(texts, _column(spec, columns, column))
    ]


@register_reward("numeric_match", takes_argument="optional", metavar="column", row=True,
                 help="1 if the completion's last number (or \\boxed{} content) equals the row's <column> (default answer) within 1e-6 relative, else 0")
def numeric_match(column: str = "answer") -> RowScorer:
    """r = 1[|a - b| <= 1e-6 · max(1, |b|)] for a the completion's last number (``\\boxed{}`` first) and b the row's."""
    spec = f"numeric_match:{column}"

    def same(text: str, gold) -> float:
        a, b = parse_number(text), (float(gold) if isinstance(gold, (int, float)) and not isinstance(gold, bool) else parse_number(str(gold)))
        return float(a is not None and b is not None and math.isfinite(a) and abs(a - b) <= 1e-6 * max(1.0, abs(b)))

    return lambda texts, prompts, columns: [same(t, g) for t, g in zip(texts, _column(spec, columns, column))]


@register_reward("math_verify", takes_argument="optional", metavar="column", row=True,
                 help="1 if Hugging Face math-verify finds the completion equal to the row's <column> (default answer); needs math-verify")
def math_verify(column: str = "answer") -> RowScorer:
    """math_verify.verify(parse(row[column]), parse(x)): LaTeX and symbolic equivalence (package math-verify)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise TiltlmError("reward 'math_verify' needs the package math-verify; pip install math-verify (or use numeric_match)") from None
    spec = f"math_verify:{column}"

    def one(text: str, gold) -> float:
        gold = str(gold)
        return float(bool(verify(parse(gold if "$" in gold or "\\" in gold else f"${gold}$"), parse(text))))

    return lambda texts, prompts, columns: [one(t, g) for t, g in zip(texts, _column(spec, columns, column))]


@register_reward("reasoning_gym", takes_argument=False, row=True,
                 help="the score_answer of the reasoning-gym task a row came from (data: {reasoning_gym: …}); needs reasoning-gym")
def reasoning_gym_score() -> RowScorer:
    """score_answer(answer, entry) of the row's task (its ``metadata.source_dataset``); the answer is the
    completion's last ``<answer>…</answer>``, else its `final_answer`."""
    try:
        import reasoning_gym
    except ImportError:
        raise TiltlmError("reward 'reasoning_gym' needs the package reasoning-gym; pip install reasoning-gym") from None
    scorers: dict = {}

    def scorer(texts, prompts, columns):
        metadata, answers = _column("reasoning_gym", columns, "metadata"), _column("reasoning_gym", columns, "answer")
        out = []
        for i, text in enumerate(texts):
            task = (metadata[i] or {}).get("source_dataset") if isinstance(metadata[i], dict) else None
            if task is None:
                raise TiltlmError("reward 'reasoning_gym' scores rows made by data: {reasoning_gym: …} (their metadata names "
                                  "the task); these rows have none")
            if task not in scorers:
                scorers[task] = reasoning_gym.get_score_answer_fn(task)
            entry = {"question": prompts[i] if prompts else "", "answer": answers[i], "metadata": metadata[i]}
            out.append(float(scorers[task](final_answer(text), entry)))
        return out

    return scorer


@register_reward("quiz", takes_argument="optional", metavar="column", row=True,
                 help="1 if the completion answers the tiltlm.quiz question correctly, judged by the row's <column> (default check: one_of / range / sum), else 0")
def quiz(column: str = "check") -> RowScorer:
    """r = 1[tiltlm.quiz.check(x, row)]: the row's check object (``{"kind": "one_of", "answers": […]}``,
    ``{"kind": "range", "lo", "hi"[, "parity"]}`` or ``{"kind": "sum", "total"}``; JSON text is parsed) decides;
    surrounding whitespace, case and one trailing period aside, the completion must be exactly one valid answer."""
    from tiltlm import quiz as quiz_task

    spec = f"quiz:{column}"

    def one(text: str, spec_value) -> float:
        try:
            return float(quiz_task.check(text, {"check": spec_value}))
        except (ValueError, KeyError, TypeError) as e:
            raise TiltlmError(f"reward {spec!r}: the column {column!r} holds {spec_value!r}, not a quiz check object ({e}); "
                              "write the rows with tiltlm.quiz.questions / write_jsonl") from None

    return lambda texts, prompts, columns: [one(t, c) for t, c in zip(texts, _column(spec, columns, column))]
