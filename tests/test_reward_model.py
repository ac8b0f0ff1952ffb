"""``rm:DIR`` (tiltlm.rewards.reward_model) against plain transformers, row by row: tiny GPT-2 and Llama
sequence classifiers made and saved here, left and right padding, the CLI's contract, and the bad inputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from test_bad_inputs import one_line, tiltlm

from tiltlm.errors import TiltlmError
from tiltlm.rewards import get_reward
from tiltlm.testbed import make_chat_tokenizer, make_testbed, make_tokenizer

LETTERS = list("abcdefgh ")
TEXTS = ["ab", "a", "hhhh gg", "b a b", "cab", "<eos>ab"]  # the last holds the pad token: a pad-id pooling would misread it
PROMPTS = ["", "c", "dd", "", "h ", "a"]


def make_rm(path: Path, arch: str = "gpt2", *, num_labels: int = 1, chat: bool = False, seed: int = 0, trl_files: bool = False) -> Path:
    """A tiny AutoModelForSequenceClassification (num_labels outputs) with a character tokenizer, saved to ``path``."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if arch == "gpt2":
        tok = make_tokenizer(LETTERS)
        config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=2, n_head=2, num_labels=num_labels,
                            pad_token_id=tok.pad_token_id, bos_token_id=0, eos_token_id=0)
        model = GPT2ForSequenceClassification(config)
    else:
        tok = make_chat_tokenizer(LETTERS, chat_template=chat)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=128, num_labels=num_labels,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores of order 1, so differences between rows are visible
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if trl_files:  # what TRL's RewardTrainer.save_model writes beside the model: its arguments, pickled (never read)
        (path / "training_args.bin").write_bytes(pickle.dumps({"output_dir": str(path), "max_length": 1024}))
        config = json.loads((path / "config.json").read_text())
        config.update(architectures=[type(model).__name__], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        (path / "config.json").write_text(json.dumps(config))
    return path


def plain_scores(path: Path, strings: list[str]) -> list[float]:
    """transformers alone, one unpadded row at a time: logits[0, 0] of tokenizer(string)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [float(model(**tok(s, return_tensors="pt")).logits[0, 0]) for s in strings]


def set_padding_side(path: Path, side: str) -> None:
    config = path / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["padding_side"] = side
    config.write_text(json.dumps(data))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_equal_plain_transformers_row_by_row(tmp_path, arch, side):
    path = make_rm(tmp_path / "rm", arch)
    set_padding_side(path, side)
    from tiltlm.rewards import reward_model

    reward_model.load_reward_model.cache_clear()
    pad = {"gpt2": "<eos>", "llama": "<|im_end|>"}[arch]
    texts = [t.replace("<eos>", pad) for t in TEXTS]
    got = get_reward(f"rm:{path}")(texts, PROMPTS)
    want = plain_scores(path, [p + t for p, t in zip(PROMPTS, texts)])
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-5), (got, want)
    assert got.std() > 0.05  # the rows differ: the comparison is not between constants
    assert len(set(len(p + t) for p, t in zip(PROMPTS, TEXTS))) > 1  # rows of different lengths: padding is exercised


def test_batched_right_padded_transformers_agree_when_no_text_holds_the_pad_token(tmp_path):
    """transformers' own batched pooling (rightmost non-pad token) gives the same numbers on texts without the pad token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_rm(tmp_path / "rm", "llama")
    strings = ["ab", "a", "hhhh gg", "b a b"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        want = model(**tok(strings, return_tensors="pt", padding=True)).logits[:, 0].double()
    assert torch.allclose(get_reward(f"rm:{path}")(strings), want, atol=1e-5)


def test_frozen_and_without_grad(tmp_path):
    from tiltlm.rewards.reward_model import load_reward_model

    path = make_rm(tmp_path / "rm")
    values = get_reward(f"rm:{path}")(["ab"])
    model, _ = load_reward_model(str(path))
    assert not values.requires_grad and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_chat_template_renders_prompt_and_completion_as_turns(tmp_path):
    from transformers import AutoTokenizer

    path = make_rm(tmp_path / "rm", "llama", chat=True)
    tok = AutoTokenizer.from_pretrained(path)
    rendered = [tok.apply_chat_template([{"role": "user", "content": "dd"}, {"role": "assistant", "content": "ab"}], tokenize=False), "ab"]
    got = get_reward(f"rm:{path}")(["ab", "ab"], ["dd", ""])  # an empty prompt (unconditional sample): the text alone
    assert torch.allclose(got, torch.tensor(plain_scores(path, rendered), dtype=torch.float64), atol=1e-5)


def test_a_directory_in_trl_reward_trainer_layout_scores_as_transformers(tmp_path):
    """TRL is not installed here: the directory has the files its RewardTrainer.save_model writes (config with
    the classifier's architecture and one label, tokenizer, safetensors, a pickled training_args.bin)."""
    path = make_rm(tmp_path / "rm", "gpt2", trl_files=True)
    got = get_reward(f"rm:{path}")(TEXTS[:4], PROMPTS[:4])
    want = plain_scores(path, [p + t for p, t in zip(PROMPTS[:4], TEXTS[:4])])
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-5)


def test_cli_sample_contract(tmp_path, monkeypatch, capsys):
    """`tiltlm sample --reward rm:DIR --out F` writes context, text and reward = the RM's logit of context + text."""
    prior = make_testbed(tmp_path / "prior", vocab_size=6, seed=1)
    path = make_rm(tmp_path / "rm", "gpt2")
    out = tmp_path / "s.jsonl"
    code, printed = tiltlm(["sample", "--model", str(prior), "-n", "5", "--context", "ab", "--max-new-tokens", "4",
                            "--reward", f"rm:{path}", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["context"] == "ab" for r in rows)
    want = plain_scores(path, [r["context"] + r["text"] for r in rows])
    assert [r["reward"] for r in rows] == pytest.approx(want, abs=1e-5)


# ---- bad inputs: one line each ----------------------------------------------------------------------


def test_a_causal_lm_has_no_score_head(tmp_path, monkeypatch, capsys):
    prior = make_testbed(tmp_path / "prior", vocab_size=6)
    code, printed = tiltlm(["sample", "--model", str(prior), "-n", "2", "--reward", f"rm:{prior}"], monkeypatch, capsys)
    one_line(code, printed, ["no score head", "num_labels=1"])


def test_more_than_one_label_is_refused(tmp_path):
    path = make_rm(tmp_path / "rm", num_labels=3)
    with pytest.raises(TiltlmError, match="3 labels.*num_labels=1"):
        get_reward(f"rm:{path}")


def test_missing_directory(tmp_path):
    with pytest.raises(TiltlmError, match="not found"):
        get_reward(f"rm:{tmp_path / 'nope'}")


def test_a_tokenizer_that_cannot_encode_the_texts(tmp_path):
    path = make_rm(tmp_path / "rm")
    with pytest.raises(TiltlmError, match="cannot encode the texts"):
        get_reward(f"rm:{path}")(["a dog!"])  # 'o' and '!' are not in the character vocabulary


def test_a_model_too_big_for_memory_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    path = make_rm(tmp_path / "rm")
    monkeypatch.setenv("TILTLM_MEMORY_BYTES", "1000")
    with pytest.raises(TiltlmError, match="needs at least .* of memory"):
        get_reward(f"rm:{path}")


def test_a_text_past_the_window(tmp_path):
    path = make_rm(tmp_path / "rm")
    with pytest.raises(TiltlmError, match="exceeds its window of 64"):
        get_reward(f"rm:{path}")(["a" * 100])


def test_an_empty_text_is_read_at_the_bos_token(tmp_path):
    """A sequence that ended at once, sampled without a prompt, is the empty string: it is scored at BOS (the
    character tokenizer's <eos>, id 0), as transformers scores the one-token input [BOS], and not refused."""
    from transformers import AutoModelForSequenceClassification

    path = make_rm(tmp_path / "rm")
    got = get_reward(f"rm:{path}")(["", "ab"], ["", ""])
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        at_bos = float(model(input_ids=torch.tensor([[0]])).logits[0, 0])
    assert abs(float(got[0]) - at_bos) < 1e-5 and abs(float(got[1]) - plain_scores(path, ["ab"])[0]) < 1e-5


def test_rm_reads_no_data_column(tmp_path):
    """rm:DIR's argument is a directory, not a column: prompt data without a column of that name is accepted
    (it was refused as "needs the column '<DIR>'"), and the rows' columns do not change the score."""
    path = make_rm(tmp_path / "rm")
    reward = get_reward(f"rm:{path}")
    assert reward.needs == ()
    reward.check_rows({"answer": ["x"]}, [1], "data file")  # no error
    with_rows = reward(["ab"], ["dd"], {"answer": ["x"]})
    assert torch.equal(with_rows, reward(["ab"], ["dd"]))
    assert get_reward("exact_match:label").needs == ("label",) and get_reward("exact_match").needs == ("answer",)


def test_an_empty_text_without_a_bos_token_names_its_preference_row(tmp_path):
    """Training a reward model: a pair whose completion encodes to no tokens, with a tokenizer that has no BOS, is
    refused in one line naming the file's row and the side (not the reward model the directory will become)."""
    from transformers import AutoTokenizer

    from tiltlm.preference_data import load_preferences
    from tiltlm.rmtrain.fit import PairEncoder

    tokenizer = AutoTokenizer.from_pretrained(make_testbed(tmp_path / "tb", vocab_size=4, n_layer=1, n_embd=16, seed=0))
    tokenizer.bos_token = None
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "", "chosen": "ab", "rejected": "b"}\n{"prompt": "", "chosen": "a", "rejected": ""}\n')
    data = load_preferences(pairs)
    with pytest.raises(TiltlmError, match=r"line 2: prompt \+ rejected: the text '' encodes to no tokens") as e:
        PairEncoder("base").pairs(data, tokenizer, 64)
    assert "reward model" not in str(e.value)
    tokenizer.bos_token = tokenizer.eos_token  # with a BOS, the empty text is read there
    kept, left_out = PairEncoder("base").pairs(data, tokenizer, 64)
    assert left_out == 0 and kept[1][1] == [tokenizer.bos_token_id]
