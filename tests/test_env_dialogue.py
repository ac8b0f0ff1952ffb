"""The dialogue environment (twenty questions with a simulated human) and `tiltlm chat`."""

import json

import pytest
from typer.testing import CliRunner

from tiltlm.envs import get_env, rollout
from tiltlm.envs.dialogue import (
    ATTRIBUTES, NO, OPENING, THINGS, UNKNOWN, YES, DialogueEnv, append_jsonl, find_attribute, find_guess, has,
    load_human_answers, normalise_question, table_answer,
)
from tiltlm.envs.rollout import episode_seed
from tiltlm.errors import TiltlmError


@pytest.fixture(scope="module")
def story_lm():
    from tiltlm.policies.hf import HFPolicy

    return HFPolicy.from_pretrained("default")


def write_chats(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- the knowledge table and the simulated human -------------------------------------------------
@pytest.mark.parametrize("secret, question, answer", [
    ("dog", "Does it have fur?", YES),
    ("bird", "Does it have fur?", NO),
    ("bird", "Can it fly?", YES),
    ("owl", "Is it awake at night?", YES),
    ("turtle", "Is it slow?", YES),
    ("turtle", "Does it have a shell?", YES),
    ("lion", "Is it a small one?", NO),
    ("mouse", "Is it tiny?", YES),
    ("pig", "Does it live on a farm?", YES),
    ("fox", "Does it live in the forest?", YES),
    ("duck", "Does it like water?", YES),
    ("fox", "Is it red?", YES),
    ("duck", "Does it have feathers or fur?", YES),  # the first attribute word decides
    ("dog", "What is your name?", UNKNOWN),
    ("cat", "Does it like to catch balls?", UNKNOWN),  # 'catch' is neither a guess nor an attribute
])
def test_table_answers_hand_questions(secret, question, answer):
    assert find_guess(question) is None
    assert table_answer(secret, question) == answer


def test_every_attribute_word_answers_from_the_table():
    for thing in THINGS:
        for attribute, (words, _) in ATTRIBUTES.items():
            for word in words:
                assert table_answer(thing, f"Is it {word}?") == (YES if has(thing, attribute) else NO), (thing, word)
    assert find_attribute("Does it have WINGS?") == "wings"


@pytest.mark.parametrize("text, thing", [
    ("Is it a cat?", "cat"), ("I think cats!", "cat"), ("two little kittens", "cat"), ("A big DOG.", "dog"),
    ("puppies", "dog"), ("the mice ran", "mouse"), ("wolves howl", "wolf"), ("Ducks, ducks.", "duck"),
    ("bird's nest", "bird"), ("a cat and a dog", "cat"),  # the first name is the guess
    ("catch the ball", None), ("category", None), ("scattered leaves", None), ("dogged", None), ("bearing", None),
    ("", None),
])
def test_guess_detection_whole_words_and_plurals(text, thing):
    assert find_guess(text) == thing


def test_guesses_rewards_and_done():
    env = get_env("dialogue", max_turns=3)
    assert env.tasks() == list(THINGS) and env.max_turns == 3
    episode = env.episode(seed=0)
    assert episode.reset("dog") == OPENING
    wrong = episode.step("Is it a little cat?")
    assert (wrong.observation, wrong.reward, wrong.done, wrong.info["success"]) == (" No, it is not a cat.", 0.0, False, False)
    question = episode.step("Does it have a tail?")
    assert (question.observation, question.reward, question.done) == (" Yes.", 0.0, False)
    owl = episode.step("an owl")
    assert owl.observation == " No, it is not an owl."
    right = episode.step("Is it a puppy?")
    assert (right.observation, right.reward, right.done, right.info["success"]) == (" Yes, it is a dog!", 1.0, True, True)


def test_answers_are_a_pure_function_of_secret_question_and_seed():
    env = DialogueEnv(noise=0.3)
    questions = ["Does it have fur?", "Can it fly?", "Is it big?", "Does it swim?", "Is it brown?"]
    for seed in range(20):
        a, b = env.episode(seed), env.episode(seed)
        a.reset("bear"), b.reset("bear")
        forward = [a.answer(q) for q in questions]
        backward = [b.answer(q) for q in reversed(questions)][::-1]  # asked in another order
        assert forward == backward == [a.answer(q) for q in questions]  # and asked again


@pytest.mark.parametrize("noise, low, high", [(0.0, 0.0, 0.0), (0.5, 0.42, 0.58), (1.0, 1.0, 1.0)])
def test_seeded_noise_flips_at_its_rate(noise, low, high):
    env = DialogueEnv(noise=noise)
    flips = total = 0
    for seed in range(200):
        episode = env.episode(seed)
        episode.reset("cat")
        for question in ("Does it have fur?", "Can it fly?"):
            flips += episode.answer(question) != table_answer("cat", question)
            total += 1
        assert episode.answer("Hello there") == UNKNOWN  # nothing to flip
    assert low <= flips / total <= high


# ---- recorded human answers ------------------------------------------------------------------
def test_human_answers_override_the_table(tmp_path):
    path = write_chats(tmp_path / "chats.jsonl", [
        {"secret": "dog", "turns": [{"question": "Is it  FURRY??", "reply": "nope"}, {"question": "Is it big?", "reply": "only sometimes"}],
         "success": False, "rating": 3},
        {"secret": "kitten", "turns": [{"question": "Can it fly?", "reply": "yes"}]},  # secrets are canonical: cat
    ])
    assert load_human_answers(path)[("dog", "is it furry")] == NO
    env = get_env("dialogue", human_answers=str(path), noise=1.0)
    dog = env.episode(seed=1)
    dog.reset("dog")
    assert dog.step("is it furry").observation == " No."  # the person, not the table (and never flipped)
    assert dog.answer("Is it big?") == "only sometimes"
    assert dog.answer("Does it have fur?") == NO  # not recorded: the table, flipped by noise=1
    cat = env.episode(seed=1)
    cat.reset("cat")
    assert cat.answer("Can it fly?") == YES
    assert cat.answer("is it furry") == NO  # recorded for dog only: the table (Yes), flipped


def test_missing_or_corrupt_human_answers_is_one_line_error(tmp_path):
    with pytest.raises(TiltlmError, match="not found; record one with `tiltlm chat") as e:
        DialogueEnv(human_answers=str(tmp_path / "absent.jsonl"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"secret": "dog", "turns": []}) + "\n{\"secret\": \"dog\", \"tur\n")
    with pytest.raises(TiltlmError, match="line 2 is not valid JSON") as e:
        get_env("dialogue", human_answers=str(bad))
    assert "\n" not in str(e.value)
    write_chats(bad, [{"secret": "dog", "turns": [{"question": "Is it big?"}]}])
    with pytest.raises(TiltlmError, match="line 1 lacks secret/turns"):
        DialogueEnv(human_answers=str(bad))


def test_bad_options_name_the_fix():
    with pytest.raises(TiltlmError, match="did you mean 'rabbit'"):
        DialogueEnv(things=["rabit"])
    with pytest.raises(TiltlmError, match=r"noise must be a probability in \[0, 1\]"):
        DialogueEnv(noise=1.5)
    with pytest.raises(TiltlmError, match="max_turns must be an integer >= 1"):
        DialogueEnv(max_turns=0)
    assert DialogueEnv(things=["owl", "dog", "owl"]).tasks() == ["owl", "dog"]


# ---- `tiltlm chat`: a real person on the other side ------------------------------------------
def test_chat_appends_one_valid_json_line_per_game(tmp_path):
    from tiltlm.cli import app

    out = tmp_path / "chats.jsonl"
    runner = CliRunner()
    args = ["chat", "--out", str(out), "--max-turns", "1", "--seed", "0"]
    result = runner.invoke(app, args + ["--secret", "puppy"], input="no it is not\ny\n9\n4\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, args + ["--episodes", "2"], input="elephant\nowl\nyes\nn\n2\nfox\n\nn\n5\n")
    assert result.exit_code == 0, result.output
    assert "'elephant' is not one of the animals listed" in result.output
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["secret"] for r in records] == ["dog", "owl", "fox"]
    assert [(r["success"], r["rating"]) for r in records] == [(True, 4), (False, 2), (False, 5)]
    assert [[t["reply"] for t in r["turns"]] for r in records] == [["no it is not"], ["yes"], [""]]
    for r in records:
        assert set(r) >= {"secret", "turns", "success", "rating", "timestamp"} and len(r["turns"]) == 1
        assert isinstance(r["turns"][0]["question"], str)
    # what was recorded now answers the simulator (an empty reply records nothing)
    answers = load_human_answers(out)
    assert answers[("owl", normalise_question(records[1]["turns"][0]["question"]))] == YES
    assert answers[("dog", normalise_question(records[0]["turns"][0]["question"]))] == NO
    assert ("fox", normalise_question(records[2]["turns"][0]["question"])) not in answers

    result = runner.invoke(app, ["chat", "--out", str(out), "--secret", "unicorn"])
    assert isinstance(result.exception, TiltlmError) and "choose from: dog, cat" in str(result.exception)


def test_append_jsonl_never_leaves_half_a_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"secret": "dog", "turns": []}\n{"secret": "c')  # a crash elsewhere cut a line
    append_jsonl(path, {"secret": "cat", "turns": []})
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1]) == {"secret": "cat", "turns": []} and len(lines) == 3


# ---- end to end: the story LM plays the game ---------------------------------------------------
def test_rollout_with_the_default_lm(story_lm):
    env = DialogueEnv(max_turns=3, things=["dog", "cat", "owl"])
    samples = rollout(story_lm, env, env.tasks(), 2, seed=0, max_action_tokens=12)
    assert len(samples.trajectories) == 6
    for k, traj in enumerate(samples.trajectories):
        assert traj.failure is None and traj.observations[0] == OPENING
        episode = env.episode(seed=episode_seed(0, k))
        episode.reset(traj.task)
        for t, action in enumerate(traj.actions):  # every later observation is the human's answer to that action
            assert traj.observations[t + 1] == episode.step(action).observation
        assert traj.observations[-1].strip() in (YES, NO, UNKNOWN) or traj.observations[-1].startswith((" No, it is not", " Yes, it is"))
        added = traj.observations[: len(traj.actions)]  # the last observation ends the episode: no tokens
        observed_tokens = sum(len(story_lm.encode_text(o)) for o in added)
        env_tokens = samples.attn[k] & ~samples.mask[k]
        assert int(env_tokens.sum()) == observed_tokens
        assert story_lm.decode([samples.ids[k][env_tokens].tolist()])[0] == "".join(added)
        assert traj.success == (traj.total_reward == 1.0)
