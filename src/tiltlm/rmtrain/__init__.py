"""Bradley–Terry reward models trained on preference pairs: `tiltlm reward-model train CONFIG --out DIR`.

    info = train_reward_model(load_rm_config("rm.yaml"), Path("runs/rm"))   # then reward "rm:runs/rm"

``config`` (tiltlm.rmtrain.config), the base model (tiltlm.rmtrain.model), the loop (tiltlm.rmtrain.fit). The
directory is a transformers ``save_pretrained`` sequence classifier (one label) with its tokenizer and a
``training.json`` holding the resolved config and the metrics; ``rm:DIR`` scores with it and
``AutoModelForSequenceClassification.from_pretrained(DIR)`` loads it, with no peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tiltlm.rmtrain.config import RewardModelConfig, load_rm_config, parse_rm_config

__all__ = ["RewardModelConfig", "load_rm_config", "parse_rm_config", "train_reward_model"]


def train_reward_model(config: RewardModelConfig, out: str | Path, *, overwrite: bool = False,
                       log: Callable[[str], None] | None = None) -> dict:
    """Fit and save (module docstring); returns training.json's content. An ``out`` that already holds a reward model
    trained with this config on the same inputs (data and base bytes) is left as it is (its record returned); another one is replaced only with ``overwrite``,
    and a non-empty directory tiltlm did not write never."""
    import json

    from tiltlm.io import check_file_destination
    from tiltlm.policies.hf import resolve_model_dir
    from tiltlm.reuse import model_dir, path_digest
    from tiltlm.rmtrain.fit import fit_reward_model
    from tiltlm.rmtrain.model import save_reward_model

    out = check_file_destination(Path(out), "--out", directory=True)
    # the same config on other bytes (a regenerated preference file, a retrained base) is another reward model
    inputs = {"data": path_digest(config.data.path)["sha256"], "base": path_digest(resolve_model_dir(config.base))["sha256"]}
    wanted = {"config": config.model_dump(mode="json"), "inputs": inputs}
    if model_dir(out, "training.json", wanted, overwrite=overwrite, what="reward model"):
        (log or (lambda _: None))(f"{out} already holds a reward model trained with this config on these inputs (its training.json); left as it was")
        return json.loads((out / "training.json").read_text())
    model, tokenizer, metrics = fit_reward_model(config, log=log)
    record = {**wanted, "metrics": metrics, "written_by": "tiltlm reward-model train"}
    save_reward_model(model, tokenizer, out, record)
    return record
