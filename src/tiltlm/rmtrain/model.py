"""A Bradley–Terry reward model built from a causal LM, and its save_pretrained directory (docs/math.md §15).

The base LM's directory is checked as any prior's (tiltlm.policies.modeldir: tokenizer, weights against config.json,
memory for the weights, gradients and AdamW's moments) and loaded as ``AutoModelForSequenceClassification`` with
``num_labels=1``: the transformer body is the LM's, the LM head is dropped, and a new ``score`` head (d -> 1, no bias)
is drawn from N(0, initializer_range²) by a generator seeded with the config's seed (the global RNG is left alone).
A tokenizer without a pad token pads with its EOS token; padding never changes a score (the score is read at each
row's last real token, with positions counted from its first: tiltlm.rewards.reward_model.sequence_scores).

With ``lora`` the body gets peft adapters (task SEQ_CLS, so the score head trains in full beside them); the adapters
are merged into the weights before saving (``merge_and_unload``), so the directory is a plain transformers model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tiltlm.errors import TiltlmError
from tiltlm.io import os_errors
from tiltlm.quiet import quiet_transformers


def load_base(base: str, *, seed: int):
    """(model, tokenizer): the base LM as a one-output sequence classifier with a seeded score head (module docstring)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tiltlm.policies.hf import resolve_model_dir
    from tiltlm.policies.modeldir import validate_model_dir

    path = resolve_model_dir(base)
    check_causal_lm(path)
    with quiet_transformers():
        validate_model_dir(path, trained_with=None if torch.cuda.is_available() else "adam")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad directory for the user
            raise TiltlmError(f"cannot load a tokenizer from '{path}' ({type(e).__name__}); save one there with tokenizer.save_pretrained") from e
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise TiltlmError(f"the tokenizer in '{path}' has neither a pad nor an EOS token; give it a pad token (tokenizer.pad_token)")
            tokenizer.pad_token = tokenizer.eos_token
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, pad_token_id=tokenizer.pad_token_id, local_files_only=True, use_safetensors=True,
                output_loading_info=True)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TiltlmError(f"cannot build a sequence classifier from the causal LM in '{path}' ({first}); pass a "
                              "transformers causal LM whose architecture has a ForSequenceClassification class (GPT-2, Llama, …)") from e
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("score.")]
    if missing or not hasattr(model, "score"):
        raise TiltlmError(f"'{path}' does not hold the body of a sequence classifier (missing {', '.join(sorted(missing)[:3]) or 'a score head'}); "
                          "pass the directory of a causal LM (save_pretrained)")
    with torch.no_grad():
        std = float(getattr(model.config, "initializer_range", 0.02))
        model.score.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(int(seed)))
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    return model, tokenizer


def check_causal_lm(path: Path) -> None:
    """Refuse a base directory whose config.json names a sequence classifier (a reward model) before its weights are
    compared with a causal LM's (which would blame the config)."""
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # validate_model_dir words a broken config.json
    classifiers = [a for a in architectures if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    if classifiers:
        raise TiltlmError(f"base '{path}' is a sequence classifier ({classifiers[0]}: a reward model), not a causal LM; pass the "
                          "causal LM to build the reward model from (e.g. 'default' or the policy's prior)")


def add_lora(model, lora, *, seed: int):
    """The model with peft adapters on its body and a trainable score head (the peft model)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TiltlmError("LoRA needs the package peft; pip install peft") from None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="SEQ_CLS",
                        target_modules=list(lora.target_modules) if lora.target_modules else None)
    try:
        with torch.random.fork_rng(devices=[]):  # the adapters' init from the seed, the global RNG left as it was
            torch.manual_seed(int(seed))
            return get_peft_model(model, config)
    except ValueError as e:
        raise TiltlmError(f"cannot add LoRA adapters ({str(e).splitlines()[0]}); set lora.target_modules to module names of this model") from None


def scoring_model(model):
    """The transformers model whose body and ``score`` head compute the scores (inside a peft wrapper: the wrapped one,
    with its adapters and trainable head copy in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_reward_model(model, tokenizer, out: Path, record: dict) -> Path:
    """Write the model (LoRA merged), tokenizer and ``training.json`` (``record``) under a temporary name beside ``out``,
    then swap it in (tiltlm.io.replace_dir): a reader sees the old directory or the whole new one."""
    from tiltlm.io import replace_dir

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers(), os_errors(tmp):
            model.config.architectures = [type(model).__name__]
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        return replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
