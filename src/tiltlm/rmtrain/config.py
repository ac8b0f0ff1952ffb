"""The reward-model training config (`tiltlm reward-model train CONFIG --out DIR`): typed, frozen, one docstring per field.

    base: default                          # any causal LM directory (save_pretrained) or 'default'
    data: {path: prefs.jsonl, eval_size: 100}
    lr: 1e-4
    epochs: 2
    batch_size: 16
    lora: {r: 8}                           # optional: adapters on the base, merged before saving

Every problem (bad YAML, unknown keys, wrong types) becomes one TiltlmError line, as for training configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tiltlm.errors import TiltlmError
from tiltlm.train.config import MAX_LR, LoraConfig, read_config_mapping
from tiltlm.train.config import _explain as explain  # the training config's one-line wording of pydantic's errors


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PreferenceFileConfig(_Strict):
    """Preference pairs (tiltlm.preference_data: TRL's explicit, implicit-prompt and conversational formats) and the
    held-out pairs on which the pairwise accuracy is measured."""

    path: str = Field(..., description="a .jsonl / .csv / .parquet file or a datasets.save_to_disk directory of pairs")
    prompt_column: str = Field("prompt", description="the prompts (absent from the data: the prompt is implicit)")
    chosen_column: str = Field("chosen", description="the preferred completions")
    rejected_column: str = Field("rejected", description="the dispreferred completions")
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = Field("auto", description="auto: by suffix / directory contents")
    split: str | None = Field(None, description="which split of a saved DatasetDict (default: train)")
    eval_size: int | None = Field(None, ge=1, description="pairs held out for the accuracy (instead of eval_fraction)")
    eval_fraction: float | None = Field(None, gt=0, lt=1, description="fraction of pairs held out; neither given: 0.2")

    @model_validator(mode="after")
    def _one_split(self) -> "PreferenceFileConfig":
        if self.eval_size is not None and self.eval_fraction is not None:
            raise ValueError("give data.eval_size or data.eval_fraction, not both")
        return self

    @property
    def held_out(self) -> dict:
        """PreferenceData.split's size arguments."""
        if self.eval_size is None and self.eval_fraction is None:
            return {"eval_fraction": 0.2}
        return {"eval_size": self.eval_size, "eval_fraction": self.eval_fraction}


class RewardModelConfig(_Strict):
    base: str = Field("default", description="the LM the reward model starts from: 'default' or a causal-LM save_pretrained "
                                             "directory; its LM head is replaced by a one-output score head")
    data: PreferenceFileConfig = Field(..., description="the preference pairs: {path, …}")
    seed: int = Field(0, ge=0, lt=2**63, description="the train/eval split, the score head's and LoRA's init, the batch order")
    lr: float = Field(1e-4, gt=0, le=MAX_LR, allow_inf_nan=False, description="AdamW learning rate, decayed linearly to 0")
    weight_decay: float = Field(0.0, ge=0, le=MAX_LR, allow_inf_nan=False, description="AdamW weight decay")
    epochs: int = Field(1, ge=1, description="passes over the training pairs (ignored when steps is set)")
    steps: int | None = Field(None, ge=1, description="optimiser steps; null = epochs × ⌈pairs / batch_size⌉")
    batch_size: int = Field(8, ge=1, description="pairs per step (2·batch_size sequences)")
    max_length: int = Field(512, ge=2, description="longest tokenised prompt + completion; longer pairs are left out (counted)")
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False, description="max gradient norm; null disables clipping")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters (and the score head) instead of all weights; merged "
                                                      "into the base before saving, so the directory loads without peft")

    def total_steps(self, n_pairs: int) -> int:
        return self.steps if self.steps is not None else self.epochs * -(-n_pairs // self.batch_size)


def parse_rm_config(data: dict) -> RewardModelConfig:
    try:
        return RewardModelConfig.model_validate(data)
    except ValidationError as e:
        raise TiltlmError(explain(e, RewardModelConfig)) from None


def load_rm_config(path: str | Path) -> RewardModelConfig:
    """Read a YAML file into a validated RewardModelConfig (one-line errors); a relative data.path is taken from the
    directory the command runs in, as for training configs."""
    return parse_rm_config(read_config_mapping(path, "reward-model"))
