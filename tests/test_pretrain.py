"""The story grammar, the pretraining recipe, and the shipped default prior."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiltlm.pretrain import ModelShape, OptimConfig, generate_stories, pretrain

DEFAULT = Path(__file__).resolve().parents[1] / "src" / "tiltlm" / "assets" / "default"
EOT = "<|endoftext|>"


def _sentences(story: str) -> list[str]:
    return re.split(r'(?<=[.!?])"?\s+(?=["A-Z])', story)


def test_grammar_is_deterministic_per_seed():
    assert generate_stories(50, seed=3) == generate_stories(50, seed=3)
    assert generate_stories(50, seed=3) != generate_stories(50, seed=4)
    assert generate_stories(0, seed=3) == []


def test_grammar_leaves_global_random_state_alone():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_stories(20, seed=0)
    assert random.random() == expected


def test_grammar_is_varied_and_readable():
    stories = generate_stories(200, seed=0)
    firsts = {_sentences(s)[0] for s in stories}
    words = {w for s in stories for w in re.findall(r"[a-z']+", s.lower())}
    assert len(firsts) > 150
    assert len(words) > 200
    for story in stories:
        assert story[0].isupper() and story.rstrip('"')[-1] in ".!?"
        assert "{" not in story and "[" not in story and "  " not in story
        assert 3 <= len(_sentences(story)) <= 9  # 3-7 sentences; a quoted question adds one


def test_grammar_gives_sentiment_words_varied_frequency():
    stories = generate_stories(1000, seed=1)

    def share(word: str) -> float:
        return sum(word in re.findall(r"[a-z]+", s.lower()) for s in stories) / len(stories)

    for word in ("dog", "cat", "happy", "sad"):
        assert 0.02 < share(word) < 0.6, word
    assert share("scared") + share("afraid") + share("screamed") > 0.05


def test_tiny_pretrain_writes_a_loadable_model(tmp_path: Path):
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    record = pretrain(
        tmp_path,
        n_stories=30,
        steps=3,
        seed=0,
        model_shape=ModelShape(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=128),
        optim=OptimConfig(batch_size=2, block_size=128, log_every=0, bf16_autocast=False),
        log=None,
    )
    assert torch.rand(1) == before  # pretrain restores the global torch RNG
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.bos_token == tok.eos_token == tok.pad_token == EOT
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == model.config.eos_token_id
    assert (tmp_path / "model.safetensors").exists()
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved == record
    assert saved["steps"] == 3 and saved["corpus_source"] == "tiltlm story grammar, seed 0"
    assert saved["parameters"] == sum(p.numel() for p in model.parameters())


def test_pretrain_names_the_fix_for_a_block_longer_than_the_model():
    with pytest.raises(ValueError, match="block_size"):
        pretrain(Path("unused"), n_stories=10, steps=1,
                 model_shape=ModelShape(n_positions=64), optim=OptimConfig(block_size=128))


@pytest.mark.skipif(not (DEFAULT / "model.safetensors").exists(), reason="default prior not built")
def test_shipped_default_prior_loads_and_round_trips():
    model = AutoModelForCausalLM.from_pretrained(DEFAULT)
    tok = AutoTokenizer.from_pretrained(DEFAULT)
    assert sum(p.numel() for p in model.parameters()) <= 10_000_000
    assert tok.bos_token == tok.eos_token == tok.pad_token == EOT
    text = 'Once upon a time, there was a little dog named Max. "Let\'s go!" said Tom.'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token_id not in ids  # the tokenizer adds no special tokens by itself
    # The prior puts most of its next-token mass on a sensible continuation.
    context = tok("Once upon a", add_special_tokens=False)["input_ids"]
    prefix = torch.tensor([[tok.bos_token_id] + context])  # (1, T): BOS + context
    with torch.no_grad():
        logits = model(prefix).logits[0, -1]
    assert tok.decode(int(logits.argmax())) == " time"


def test_quiz_documents_are_packed_with_their_first_token_not_a_target():
    from tiltlm.pretrain.train import pack_stories, train_tokenizer

    docs = ["Once upon a time, there was a dog.", "Q: Name a color. A: red", "The end came."]
    tok = train_tokenizer(docs * 5, vocab_size=300, max_length=64)
    blocks = pack_stories(docs, tok, 64, mask_first=[False, True, False])
    ids, labels = blocks.input_ids[0].tolist(), blocks.labels[0].tolist()
    q = tok("Q", add_special_tokens=False)["input_ids"][0]
    start = ids.index(q)
    assert ids[start - 1] == tok.bos_token_id and labels[start] == -100  # "Q" after BOS: not a target
    assert all(label != -100 for label in labels[start + 1: start + 5])  # the rest of the quiz is
    assert labels[1] == ids[1]  # a story's first token stays a target
    unmasked = pack_stories(docs, tok, 64)
    assert (unmasked.labels != -100).sum() == (blocks.labels != -100).sum() + 1


def test_tiny_pretrain_with_quiz_records_the_mix(tmp_path: Path):
    record = pretrain(
        tmp_path, n_stories=30, n_quiz=20, steps=2, seed=0,
        model_shape=ModelShape(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=128),
        optim=OptimConfig(batch_size=2, block_size=128, log_every=0, bf16_autocast=False), log=None,
    )
    assert record["n_quiz"] == 20 and "tiltlm.quiz" in record["corpus_source"]
    assert record["quiz_heldout_loss"] > 0
    assert json.loads((tmp_path / "training.json").read_text()) == record
    with pytest.raises(ValueError, match="n_quiz"):
        pretrain(tmp_path, n_stories=30, n_quiz=-1, steps=1)
