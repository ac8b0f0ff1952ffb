"""A learned reward: any local sequence-classification model with one output, ``rm:DIR`` (docs/math.md §15.1: the score it reads).

    reward = get_reward("rm:runs/rm")          # or in YAML: target: {reward: "rm:runs/rm", beta: 0.1}
    reward(["a dog"], ["Tell me"])             # the model's logit at the last token of "Tell me" + "a dog"

r(x, y) is the model's single logit at the last non-padding token of the *reward model's* tokenization of the
prompt's text followed by the completion's text — what TRL's RewardTrainer trains and OpenRLHF / verl score
with. When the RM's tokenizer has a chat template and the sample has a prompt, the pair is rendered as a
user turn (the prompt) and an assistant turn (the completion) with that template instead, as a chat-trained
RM expects; a tokenizer without one scores ``tokenizer(prompt + completion)`` (special tokens as the tokenizer
adds them). Rows are scored in batches, padded on the tokenizer's padding side with positions counted from
each row's first real token, and read at its last real token: the score of a row does not depend on the
padding or on its batch (tests/test_reward_model.py compares with transformers row by row).

The directory is checked before anything is allocated (tiltlm.policies.modeldir.validate_model_dir with the
sequence-classification task: tokenizer files, safetensors headers against config.json, a ``score`` head of
one label, the memory it needs); the model is loaded on first use, frozen (eval mode, no grad), on the GPU
when there is one, and shared by every reward built on the same directory in the process.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tiltlm.errors import TiltlmError
from tiltlm.rewards.base import register_reward

BATCH_SIZE = 32


def check_score_head(path: Path, config, weights) -> None:
    """Refuse a directory that is not a one-label sequence classifier: a causal LM or base model (no ``score``
    head in its weights), or a classifier with more than one label."""
    labels = getattr(config, "num_labels", None)
    heads = [k for k in weights.shapes if k == "score.weight" or k.endswith(".score.weight")]
    if not heads:
        raise TiltlmError(f"'{path}' has no score head (no score.weight in its safetensors; a causal LM or base model, not a "
                          "reward model); pass a save_pretrained AutoModelForSequenceClassification with num_labels=1, e.g. "
                          "one written by `tiltlm reward-model train`")
    rows = weights.shapes[heads[0]][0]
    if labels != 1 or rows != 1:
        raise TiltlmError(f"'{path}' is a classifier with {rows if labels is None else labels} labels, but a reward is one number; "
                          "pass a reward model with num_labels=1 (one output)")


def validate_reward_model_dir(path: str | Path) -> Path:
    """The directory, after the checks of the module docstring (nothing allocated)."""
    from tiltlm.policies.modeldir import validate_model_dir
    from tiltlm.quiet import quiet_transformers

    path = Path(path).expanduser()
    if not path.is_dir():
        raise TiltlmError(f"reward model directory '{path}' not found; pass a directory written by save_pretrained "
                          "(e.g. by `tiltlm reward-model train`)")
    if not (path / "config.json").is_file():
        raise TiltlmError(f"'{path}' has no config.json; pass a reward model directory written by save_pretrained")
    with quiet_transformers():
        validate_model_dir(path, task="sequence-classification", check_head=check_score_head)
    return path


@functools.lru_cache(maxsize=4)
def load_reward_model(path: str):
    """(model, tokenizer) of a checked directory: frozen, eval mode, on CUDA when available (cached per path)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tiltlm.policies.modeldir import check_loading_info
    from tiltlm.quiet import quiet_transformers

    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad directory for the user
            raise TiltlmError(f"cannot load a tokenizer from '{path}' ({type(e).__name__}); save one there with tokenizer.save_pretrained") from e
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                                            output_loading_info=True)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TiltlmError(f"cannot load a reward model from '{path}' ({first}); it needs config.json and model.safetensors") from e
    check_loading_info(Path(path), info)
    model.requires_grad_(False)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def _window(model) -> int | None:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


class RewardModelScorer:
    """(texts, prompts or None) -> the reward model's logit per text, float64 (B,); see the module docstring.

    ``normalize``: standardise each call's scores to mean 0, std 1 (off by default; it makes r depend on the
    batch, so p* is then no fixed distribution — use it for RL baselines, not for exact comparisons)."""

    def __init__(self, path: str | Path, *, normalize: bool = False, batch_size: int = BATCH_SIZE):
        self.path = validate_reward_model_dir(path)
        self.normalize, self.batch_size = normalize, batch_size

    def texts(self, texts: list[str], prompts: list[str] | None, tokenizer) -> list[str]:
        """The string the RM reads for each row: the chat-rendered turn pair, or prompt + completion."""
        prompts = prompts if prompts is not None else [""] * len(texts)
        if not getattr(tokenizer, "chat_template", None):
            return [p + t for p, t in zip(prompts, texts)]
        out = []
        for p, t in zip(prompts, texts):
            if not p:
                out.append(t)
                continue
            try:
                out.append(tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": t}],
                                                         tokenize=False))
            except Exception as e:  # noqa: BLE001 - a template that raises (jinja) or is malformed
                why = " ".join(str(e).split())[:160] or type(e).__name__
                raise TiltlmError(f"reward model '{self.path}': its chat template cannot render the prompt {p[:40]!r} ({why}); "
                                  "fix the template in its tokenizer_config.json") from None
        return out

    def encode(self, strings: list[str], tokenizer, window: int | None, *, who: str | None = None,
               row_name=None) -> list[list[int]]:
        """Token ids per string; an empty string (a sequence that ended at once, after no prompt) is read at the
        tokenizer's BOS token where it has one (docs/math.md §15.1), else refused. Errors start with ``who`` (default:
        this reward model) or, for string k, ``row_name(k)`` (e.g. the preference file's row)."""
        who = who or f"reward model '{self.path}'"
        try:
            ids = [list(row) for row in tokenizer(strings)["input_ids"]]
        except Exception as e:  # noqa: BLE001 - e.g. a WordLevel tokenizer without [UNK] meets an unknown character
            why = " ".join(str(e).split())[:160] or type(e).__name__
            raise TiltlmError(f"{who}: its tokenizer cannot encode the texts ({why}); use a model whose tokenizer covers "
                              "the text it scores") from None
        bos = getattr(tokenizer, "bos_token_id", None)
        for k, (row, s) in enumerate(zip(ids, strings)):
            if not row and bos is not None:
                ids[k] = row = [int(bos)]
            if not row:
                raise TiltlmError(f"{row_name(k) if row_name else who}: the text {s[:40]!r} encodes to no tokens and the "
                                  "tokenizer has no BOS token to read it at; give the tokenizer a BOS token or the row text")
            if window is not None and len(row) > window:
                raise TiltlmError(f"reward model '{self.path}': a text of {len(row)} tokens exceeds its window of {window}; "
                                  "lower max_new_tokens or use a reward model with a longer window")
        return ids

    @torch.no_grad()
    def __call__(self, texts: list[str], prompts: list[str] | None = None) -> torch.Tensor:
        model, tokenizer = load_reward_model(str(self.path))
        ids = self.encode(self.texts(list(texts), prompts, tokenizer), tokenizer, _window(model))
        scores = torch.cat([score_rows(model, ids[i:i + self.batch_size], tokenizer.padding_side)
                            for i in range(0, len(ids), self.batch_size)]) if ids else torch.zeros(0, dtype=torch.float64)
        if self.normalize and len(scores) > 1:
            scores = (scores - scores.mean()) / scores.std().clamp(min=1e-8)
        return scores


def pad_rows(rows: list[list[int]], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention) of token rows padded on ``side`` ("left" or "right"), (b, T) each."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[k, sl], attn[k, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, attn


def sequence_scores(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The score head at each row's last real token, (b,) in the model's dtype (with grad when enabled):
    the base model runs with positions counted from the row's first real token, so left and right padding
    give the unpadded row's score (transformers' own pooling finds the last token by the pad id instead, which
    a text containing that token would fool)."""
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=False).last_hidden_state  # (b, T, d)
    last = (attn * torch.arange(attn.shape[1], device=device)).argmax(-1)  # (b,) the rightmost real position
    return model.score(hidden[torch.arange(len(ids), device=device), last]).squeeze(-1)


def score_rows(model, rows: list[list[int]], side: str) -> torch.Tensor:
    """(b,) float64 scores of token rows, batched, on the CPU."""
    ids, attn = pad_rows(rows, side)
    return sequence_scores(model, ids, attn).double().cpu()


@register_reward("rm", takes_argument=True, metavar="dir", row=True,
                 help="a local reward model (sequence classification, one label): its logit at the last token of prompt + text")
def reward_model(path: str):
    """r = the logit of the reward model in ``path`` (module docstring); the directory is checked now, loaded on first use."""
    scorer = RewardModelScorer(path)
    return lambda texts, prompts, columns: scorer(texts, prompts)
