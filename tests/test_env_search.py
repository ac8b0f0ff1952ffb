"""The `search` environment: a BM25 engine with known rankings, hostile queries, rewards, a real rollout."""

import json
import threading

import pytest
import torch

from tiltlm.envs import get_env, rollout
from tiltlm.envs.make_search_collection import make_collection
from tiltlm.envs.search import SearchEnv, answer_matches, fts_query
from tiltlm.errors import TiltlmError

DOCS = [
    {"id": "a", "title": "Lily the cat", "text": "Lily is a curious cat who lives in a house by the sea. Lily has a red kite."},
    {"id": "b", "title": "Tom the dog", "text": "Tom is a brave dog who lives on a farm. Tom likes to eat apples."},
    {"id": "c", "title": "Mia the owl", "text": "Mia is a sleepy owl who lives under an old oak tree. Mia has a blue drum."},
]
QUESTIONS = [{"id": "q1", "question": "What does Lily have?", "answer": "kite", "doc": "a"},
             {"id": "q2", "question": "What does Tom eat?", "answer": "apples", "aliases": ["apple"], "doc": "b"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def small_env(tmp_path):
    env = get_env("search", collection=_jsonl(tmp_path / "docs.jsonl", DOCS), questions=_jsonl(tmp_path / "q.jsonl", QUESTIONS))
    yield env
    env.close()


# ---- the engine: known rankings -------------------------------------------------------------
@pytest.mark.parametrize("query, first", [("kite", "a"), ("farm apples", "b"), ("owl drum", "c"), ("Where is the OAK tree?", "c"),
                                          ("Lily", "a"), ("brave dog", "b")])
def test_the_document_with_the_query_terms_ranks_first(small_env, query, first):
    hits = small_env.search(query)
    assert hits[0]["id"] == first
    assert len(hits) <= small_env.top_k


def test_bm25_prefers_more_matching_terms_and_respects_k(small_env):
    # "lives" is in all three documents (idf ~ 0); "sea" only in a, "farm" only in b
    assert [d["id"] for d in small_env.search("lives sea", k=1)] == ["a"]
    assert {d["id"] for d in small_env.search("sea farm drum")} == {"a", "b", "c"}
    assert len(small_env.search("lives", k=2)) == 2


@pytest.mark.parametrize("query", ['"', '"unterminated', "kite AND", "OR OR OR", "NEAR(kite drum, 2)", "kite*", "*", "(((", ")",
                                   "^kite", "title:kite", "-kite", "NOT", "", "   ", "\n\t", "!!!", "日本語 ねこ", "café ☕ 🐱",
                                   "kite\x00drum", "'; DROP TABLE docs; --", "a" * 5000, " ".join(["kite"] * 500)])
def test_fts_syntax_in_a_query_never_raises(small_env, query):
    hits = small_env.search(query)
    assert isinstance(hits, list)
    if "kite" in query.lower() and "drum" not in query:
        assert hits and hits[0]["id"] == "a"  # syntax characters are dropped, the words still count


def test_fts_query_is_quoted_words_or_empty():
    assert fts_query('Lily "kite" AND (drum*)') == '"lily" OR "kite" OR "and" OR "drum"'
    assert fts_query("?!* ()") == ""
    assert fts_query("the the THE") == '"the"'


def test_no_words_or_no_match_is_a_no_results_observation(small_env):
    for query in ("", "?!", "zebra"):
        ep = small_env.episode(seed=0)
        ep.reset("q1")
        result = ep.step(query)
        assert "No results." in result.observation and result.observation.endswith("Answer:")
        assert result.done is False and result.info["hits"] == []


def test_the_shared_index_is_safe_across_threads(small_env):
    errors, results = [], []

    def worker():
        try:
            for _ in range(50):
                results.append(small_env.search("red kite")[0]["id"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(results) == {"a"}


# ---- rewards ----------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, gold, mode, ok", [
    ("kite", "kite", "exact", True), (" The Kite.", "kite", "exact", True), ("a red kite", "kite", "exact", False),
    ("a red kite", "kite", "contains", True), ("kites", "kite", "contains", False), ("Kite!", "kite", "contains", True),
    ("the town square", "town square", "exact", True), ("to the town square today", "town square", "contains", True),
    ("square town", "town square", "contains", False), ("", "kite", "contains", False), ("anything", "", "contains", False),
])
def test_answer_matching_on_hand_cases(answer, gold, mode, ok):
    assert answer_matches(answer, gold, mode) is ok


def test_an_episode_rewards_the_answer_and_reports_success(small_env):
    ep = small_env.episode(seed=3)
    first = ep.reset("q1")
    assert first == "Question: What does Lily have?\nSearch:"
    result = ep.step("Lily kite")
    assert result.reward == 0.0 and not result.done and result.info["hits"][0] == "a"
    assert "1. Lily is a curious cat" in result.observation and result.observation.endswith("\nAnswer:")
    final = ep.step(" a red kite")
    assert (final.reward, final.done, final.info["success"], final.info["retrieved"]) == (1.0, True, True, True)

    ep.reset("q2")
    ep.step("Lily")  # retrieves the wrong document
    final = ep.step("apple")  # an alias
    assert (final.reward, final.info["success"], final.info["retrieved"]) == (1.0, True, False)


def test_exact_reward_and_wrong_answers(tmp_path):
    with get_env("search", collection=_jsonl(tmp_path / "d.jsonl", DOCS), questions=_jsonl(tmp_path / "q.jsonl", QUESTIONS),
                 reward="exact") as env:
        for answer, reward in (("kite", 1.0), ("a red kite", 0.0), ("drum", 0.0)):
            ep = env.episode(seed=0)
            ep.reset("q1")
            ep.step("kite")
            assert ep.step(answer).reward == reward


def test_more_search_turns(small_env, tmp_path):
    with get_env("search", collection=_jsonl(tmp_path / "d.jsonl", DOCS), questions=_jsonl(tmp_path / "q.jsonl", QUESTIONS),
                 searches=2, top_k=1) as env:
        assert env.max_turns == 3
        ep = env.episode(seed=0)
        ep.reset("q1")
        assert ep.step("drum").observation.endswith("\nSearch:")
        assert ep.step("kite").observation.endswith("\nAnswer:")
        assert ep.step("kite").info["success"]


# ---- user errors ------------------------------------------------------------------------------
def test_user_errors_name_the_problem_and_the_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    with pytest.raises(TiltlmError, match="not found"):
        get_env("search", collection=str(tmp_path / "missing.jsonl"))
    bad.write_text('{"id": "a", "text": "ok"}\n{not json\n')
    with pytest.raises(TiltlmError, match="line 2 .* not valid JSON"):
        get_env("search", collection=str(bad))
    bad.write_text('{"id": "a"}\n')
    with pytest.raises(TiltlmError, match="no text field 'text'"):
        get_env("search", collection=str(bad))
    bad.write_text('[1, 2]\n')
    with pytest.raises(TiltlmError, match="not an object"):
        get_env("search", collection=str(bad))
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(TiltlmError, match="repeats id"):
        get_env("search", collection=str(bad))
    bad.write_text("\n")
    with pytest.raises(TiltlmError, match="empty"):
        get_env("search", collection=str(bad))
    with pytest.raises(TiltlmError, match="reward 'fuzzy'"):
        get_env("search", reward="fuzzy")
    with pytest.raises(TiltlmError, match="no option 'topk'"):
        get_env("search", topk=3)
    with SearchEnv(collection=_jsonl(tmp_path / "d.jsonl", DOCS)) as env:  # no questions: search works, no tasks
        assert env.search("kite")[0]["id"] == "a"
        with pytest.raises(TiltlmError, match="no questions"):
            env.tasks()


def test_closed_env_and_unknown_task_fail_the_episode(small_env):
    ep = small_env.episode(seed=0)
    with pytest.raises(TiltlmError, match="unknown search question"):
        ep.reset("nope")
    ep.reset("q1")
    small_env.close()
    with pytest.raises(TiltlmError, match="closed"):
        ep.step("kite")


# ---- the shipped collection ---------------------------------------------------------------------
def test_the_shipped_collection_is_the_generator_output_and_answerable():
    docs, questions = make_collection()
    with get_env("search") as env:
        assert list(env.documents.values()) == docs and list(env.questions.values()) == questions
        assert 50 <= len(env.tasks()) <= 100 and 200 <= len(env.documents) <= 500
        for q in questions:  # the gold document states the answer, and the question itself finds it
            assert answer_matches(env.documents[q["doc"]]["text"], q["answer"])
            assert q["doc"] in [d["id"] for d in env.search(q["question"], k=5)], q


# ---- a real rollout with the embedded default LM -------------------------------------------------
def test_rollout_with_the_default_lm():
    """64 episodes (16 questions x 4) of pi0 = the embedded story LM on the shipped questions.

    pi0's success rate (reward="contains", max_action_tokens=16, seed 0, 80 questions x 4 = 320
    episodes): 4.4% with the shipped answer cues (eat 17%, kind 4%, color 4%, place 2%, have 0%,
    friend 0%), 0.6% with cues=False. pi0 rarely names the question's character in its query (the
    gold document is shown in ~1% of episodes) and does not copy from the results when it is shown.
    """
    from tiltlm.policies.hf import HFPolicy

    policy = HFPolicy.from_pretrained("default")
    with get_env("search") as env:
        tasks = env.tasks()[:16]
        samples = rollout(policy, env, tasks, 4, seed=0, max_action_tokens=16)
    assert len(samples) == 64
    for t in samples.trajectories:
        assert t.failure is None and t.done and not t.truncated
        assert t.turns == 2 and len(t.rewards) == 2 and t.rewards[0] == 0.0
        assert t.observations[0].startswith("Question: ") and t.observations[0].endswith("Search:")
        assert t.observations[1].startswith("\nResults:\n")
        assert t.observations[1].endswith("\nAnswer: " + env.questions[t.task]["cue"])
        assert "1. " in t.observations[1] or "No results." in t.observations[1]
        assert "success" in t.infos[-1] and t.rewards[1] == float(t.infos[-1]["success"])
    # observation tokens (turn 0 and the results after action 1) are never policy tokens
    real = samples.attn
    observation = real & ~samples.mask
    assert observation.any() and not (samples.mask & ~real).any()
    for i, t in enumerate(samples.trajectories):
        turns = samples.turn[i][real[i]]
        mask = samples.mask[i][real[i]]
        # layout: o_0 (turn 0) a_1 (turn 1) o_1 (turn 1) a_2 (turn 2)
        assert not mask[turns == 0].any()
        n_obs = len(policy.encode_text(t.observations[0])) + len(policy.encode_text(t.observations[1]))
        assert int((~mask).sum()) == n_obs
        assert mask[turns == 2].all()
    torch.testing.assert_close(policy.log_prob(samples), samples.logp, atol=1e-4, rtol=0)
    rate = sum(t.success for t in samples.trajectories) / len(samples)
    print(f"pi0 success on {len(samples)} episodes: {rate:.3f}")
