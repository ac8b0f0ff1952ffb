"""A model directory is checked before its weights are allocated, and the loaded model after.

``validate_model_dir`` runs on every load (tiltlm.policies.hf.load_model_and_tokenizer) and reads
only small files: config.json, the names of the tokenizer files, and the JSON header of each
safetensors file (tensor names, shapes, dtypes; no tensor data). It refuses, with one line naming the
fix, a directory that

* has no tokenizer files (transformers would otherwise build a 1-token tokenizer from config.json);
* has no readable safetensors weights (pickles are never read);
* has a config.json that does not describe its weights: the model the config builds (on the meta
  device, so nothing is allocated) needs tensors the files lack, or the files hold tensors it has no
  place for, or shapes differ. Without this, a config naming another architecture (GPT-2 weights under
  ``model_type: llama``) builds a randomly initialised 6.5B-parameter Llama: minutes and > 26 GB for a
  model that is pure noise;
* needs more memory than is available (``memory_needed`` vs ``available_memory``).

After loading, ``check_loading_info`` refuses any key transformers reports as missing, unexpected or
mismatched (it would have been randomly initialised or dropped), and ``check_tokenizer`` refuses a
tokenizer whose ids reach past the model's vocabulary or that has no EOS. A vocabulary padded beyond
the tokenizer (GPT-2, SmolLM2, Qwen pad their embedding matrices to a round number) is fine: those rows
are never produced by the tokenizer, and sampling gives them the model's own (tiny) probability.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tiltlm.errors import TiltlmError

# files that hold a tokenizer's vocabulary (fast tokenizers, GPT-2 BPE, WordPiece, SentencePiece, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPE_BYTES = {"float64": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
# weight-sized tensors per parameter while training (weights, gradients and the optimiser's state)
TRAINING_COPIES = {"adam": 4, "sgd": 2}
TRAINING_STATE = {"adam": "weights, gradients and Adam's two moments", "sgd": "weights and gradients"}
MEMORY_ENV = "TILTLM_MEMORY_BYTES"  # overrides the measured available memory (tests; a machine whose limit tiltlm cannot see)
RESTORE_CONFIG = "restore the config.json saved with these weights"


@dataclass(frozen=True)
class Weights:
    """What the safetensors header(s) of a directory say: each tensor's shape and safetensors dtype."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def n_params(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return sum(_numel(s) * DTYPE_BYTES.get(self.dtypes[k], 4) for k, s in self.shapes.items())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} bytes"


# ---- tokenizer -----------------------------------------------------------------------------
def check_tokenizer_files(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise TiltlmError(f"'{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, …); copy the tokenizer "
                          "saved with these weights into it (tokenizer.save_pretrained)")


def check_tokenizer(tokenizer, vocab_size: int, config_eos=None) -> int:
    """The EOS id of ``tokenizer`` after checking that it fits a model with ``vocab_size`` output rows: no more
    tokens than rows, no id past the last row, and an EOS token (``config_eos``: the model config's, used
    when the tokenizer names none)."""
    if len(tokenizer) > vocab_size:
        raise TiltlmError(f"tokenizer has {len(tokenizer)} tokens but the model only {vocab_size}; use the tokenizer saved with this model")
    vocab = tokenizer.get_vocab()
    if vocab:
        token, top = max(vocab.items(), key=lambda kv: kv[1])
        if top >= vocab_size:
            raise TiltlmError(f"the tokenizer's token {token!r} has id {top} but the model has only {vocab_size} output rows; "
                              "use the tokenizer saved with this model")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config_eos
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        raise TiltlmError("the tokenizer has no EOS token; set tokenizer.eos_token so sequences can end")
    if not 0 <= int(eos) < vocab_size:
        raise TiltlmError(f"the EOS id {eos} is outside the model's {vocab_size} output rows; use the tokenizer saved with this model")
    return int(eos)


# ---- weights -------------------------------------------------------------------------------
def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), checked against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(size - 8, 100_000_000):
            raise ValueError("not a safetensors file, or cut short")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"cut short: {size} bytes of {8 + n + end}")
    return header


def read_weights(path: Path) -> Weights:
    """Tensor names, shapes and dtypes from ``model.safetensors``, or from every shard that
    ``model.safetensors.index.json`` names. Refuses (the old message of the loader) when there is none."""
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            why = f"only {pickled[0]}, a pickle tiltlm never reads" if pickled else "no model.safetensors"
            raise TiltlmError(f"cannot load a causal LM from '{path}' ({why}); it needs config.json and model.safetensors")
        shapes, dtypes = {}, {}
        for name in files:
            if not (path / name).is_file():
                raise ValueError(f"shard {name} named by model.safetensors.index.json is missing")
            for key, info in safetensors_header(path / name).items():
                if key != "__metadata__":
                    shapes[key], dtypes[key] = tuple(info["shape"]), info["dtype"]
    except TiltlmError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated / non-JSON header, a bad index
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise TiltlmError(f"cannot load a causal LM from '{path}' (its model.safetensors is unreadable: {why}); "
                          "it needs config.json and model.safetensors as save_pretrained writes them") from None
    return Weights(shapes, dtypes)


def _config(path: Path, *, trust_remote_code: bool = False):
    """The config object config.json describes (read as JSON, so no code it names is imported), or None when
    remote code is allowed and the directory brings its own model class (then transformers' loading info,
    check_loading_info, is the check)."""
    from transformers import CONFIG_MAPPING

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TiltlmError(f"'{path}/config.json' is not valid JSON ({' '.join(str(e).split())[:120]}); {RESTORE_CONFIG}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if trust_remote_code and (model_type not in CONFIG_MAPPING or "auto_map" in raw):
        return None  # the directory's own code builds the model, not the built-in class
    if model_type not in CONFIG_MAPPING:
        raise TiltlmError(f"'{path}/config.json' names model_type {model_type!r}, which this transformers does not know; "
                          "use a model of a built-in architecture (tiltlm runs no code from a model directory)")
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as e:  # noqa: BLE001 - a config class that rejects a field
        raise TiltlmError(f"'{path}/config.json' is not a valid {model_type} config ({' '.join(str(e).split())[:160]}); {RESTORE_CONFIG}") from None


# what a directory must hold, by task: the transformers auto class that builds it and how messages name it
TASKS = {"causal-lm": ("AutoModelForCausalLM", "causal LM", "causal language model"),
         "sequence-classification": ("AutoModelForSequenceClassification", "sequence-classification model",
                                     "reward model (a sequence-classification model with one label)")}


def meta_model(config, task: str = "causal-lm"):
    """The model of ``task`` (TASKS) that ``config`` builds, on the meta device: names, shapes and ties, no memory."""
    import transformers

    auto, what, fix = TASKS[task]
    try:
        with torch.device("meta"):
            return getattr(transformers, auto).from_config(config)
    except ValueError as e:  # not an architecture of this task
        raise TiltlmError(f"config.json describes a {type(config).__name__.removesuffix('Config')} model, which is not a {what} "
                          f"({' '.join(str(e).split())[:120]}); pass the directory of a {fix}") from None


def _renamer(model):
    """checkpoint key -> (model key, whether a many-to-one converter made it), the way transformers renames
    keys when it loads (legacy names, base-model prefix added or dropped)."""
    expected = model.state_dict()
    prefix = model.base_model_prefix
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        def rename(key):
            target, converter = rename_source_key(key, renamings, converters, prefix, expected)
            return target, converter is not None
        return rename
    except (ImportError, AttributeError, TypeError):  # another transformers: the base-model prefix alone
        def rename(key):
            if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
                return key[len(prefix) + 1:], False
            return (f"{prefix}.{key}" if prefix and f"{prefix}.{key}" in expected else key), False
        return rename


def compare_weights(model, weights: Weights) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) between the tensors ``model`` (a meta model) needs and those in the
    files. Tied parameters are one tensor under several names: any one of them present is enough."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    state = model.state_dict()
    alias = {name: names[0] for names in groups.values() for name in names}
    expected = {name: tuple(t.shape) for name, t in state.items()}
    ignore_missing = [re.compile(p) for p in (model._keys_to_ignore_on_load_missing or ())]
    ignore_unexpected = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or ())]
    ignore_unexpected += [re.compile(r"rotary_emb\.inv_freq"), re.compile(r"(^|\.)position_ids$")]  # old persistent buffers
    rename = _renamer(model)
    found, unexpected, mismatched = set(), [], []
    for key, shape in weights.shapes.items():
        target, converted = rename(key)
        if target not in expected:
            if not any(p.search(key) for p in ignore_unexpected):
                unexpected.append(key)
            continue
        found.add(alias.get(target, target))
        if not converted and tuple(shape) != expected[target]:
            mismatched.append(f"{key} {list(shape)} vs {list(expected[target])}")
    missing = [n for n in expected if alias.get(n, n) not in found and not any(p.search(n) for p in ignore_missing)]
    return missing, unexpected, mismatched


def check_config_matches_weights(path: Path, model, weights: Weights) -> None:
    missing, unexpected, mismatched = compare_weights(model, weights)
    if not (missing or unexpected or mismatched):
        return
    problems = [f"it builds a {type(model).__name__} of {model.num_parameters():,} parameters"]
    for what, keys in (("shapes differ", mismatched), ("missing from the files", missing), ("in the files but not in the model", unexpected)):
        if keys:
            more = f" and {len(keys) - 2} more" if len(keys) > 2 else ""
            problems.append(f"{what}: {', '.join(keys[:2])}{more}")
    raise TiltlmError(f"'{path}/config.json' does not describe its weights ({'; '.join(problems)}); {RESTORE_CONFIG}")


def check_loading_info(path: Path, info: dict) -> None:
    """Refuse what transformers reports after loading: keys it had to initialise randomly or could not place."""
    problems = []
    for key, what in (("missing_keys", "missing (randomly initialised)"), ("unexpected_keys", "unused"),
                      ("mismatched_keys", "of the wrong shape"), ("error_msgs", "errors")):
        keys = sorted(str(k) for k in (info.get(key) or ()))
        if keys:
            problems.append(f"{what}: {', '.join(keys[:2])}{f' and {len(keys) - 2} more' if len(keys) > 2 else ''}")
    if problems:
        raise TiltlmError(f"the weights in '{path}' do not fit the model its config.json builds ({'; '.join(problems)}); {RESTORE_CONFIG}")


# ---- memory --------------------------------------------------------------------------------
def memory_needed(n_params: int, bytes_per_param: int, *, trained_with: str | None = None) -> int:
    """Bytes the parameters alone take: ``n_params × bytes_per_param``, times the number of weight-sized
    tensors training keeps per parameter (``TRAINING_COPIES``: weights, gradients and Adam's two moments
    = 4; SGD = 2; None = a frozen model, 1). A lower bound: activations, the KV cache of sampling and the
    Python process itself come on top."""
    return int(n_params) * int(bytes_per_param) * (TRAINING_COPIES[trained_with] if trained_with else 1)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_available() -> int | None:
    """limit − usage + reclaimable page cache of this process's memory cgroup (v2, else v1); None if unlimited."""
    root = Path("/sys/fs/cgroup")
    try:
        own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")), "/")
    except OSError:
        own = "/"
    for folder in dict.fromkeys([root / own.lstrip("/"), root]):
        limit = _read_int(folder / "memory.max")
        if limit is not None:
            usage = _read_int(folder / "memory.current") or 0
            return max(0, limit - usage + _stat(folder / "memory.stat", "inactive_file"))
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < 1 << 60:  # v1 writes a huge number for "no limit"
        usage = _read_int(v1 / "memory.usage_in_bytes") or 0
        return max(0, limit - usage + _stat(v1 / "memory.stat", "total_inactive_file"))
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: ``$TILTLM_MEMORY_BYTES`` when set, else MemAvailable from
    /proc/meminfo capped by the memory cgroup's limit; None when neither can be read (then no check)."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        if not override.strip().isdigit():
            raise TiltlmError(f"{MEMORY_ENV}={override!r} is not a number of bytes; set it to an integer or unset it")
        return int(override)
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_available()
    if cgroup is not None:
        found.append(cgroup)
    return min(found) if found else None


def _load_dtype_bytes(config, weights: Weights) -> int:
    """Bytes per parameter once loaded: the dtype config.json names (transformers' dtype="auto"), else the
    files' first floating-point dtype."""
    named = (getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)) if config is not None else None
    name = str(named).removeprefix("torch.") if named is not None else None
    if name in TORCH_DTYPE_BYTES:
        return TORCH_DTYPE_BYTES[name]
    floats = [d for d in weights.dtypes.values() if d.startswith(("F", "BF"))]
    return DTYPE_BYTES.get(floats[0], 4) if floats else 4


def check_memory(path: Path, n_params: int, bytes_per_param: int, *, trained_with: str | None = None) -> None:
    need = memory_needed(n_params, bytes_per_param, trained_with=trained_with)
    have = available_memory()
    if have is None or need <= have:
        return
    how = f"{n_params:,} parameters × {bytes_per_param} bytes"
    if trained_with:
        how += f" × {TRAINING_COPIES[trained_with]}: {TRAINING_STATE[trained_with]}"
    fix = ("use a smaller model, LoRA (which trains adapters only), or a machine with more memory" if trained_with
           else "use a smaller model or a machine with more memory (or free some memory)")
    raise TiltlmError(f"the model in '{path}' needs at least {_size(need)} ({how}) but only {_size(have)} of memory is available; {fix}")


# ---- the one entry point -------------------------------------------------------------------
def validate_model_dir(path: Path, *, trained_with: str | None = None, trust_remote_code: bool = False, task: str = "causal-lm",
                       check_head=None) -> None:
    """Check a save_pretrained directory before anything is allocated (see the module docstring).
    ``trained_with``: the optimiser when this load will be trained in this process's memory (memory_needed).
    ``task``: what the directory must hold (TASKS); ``check_head(path, config, weights)``, when given, runs
    before the config is compared with the weights (a reward model's one-label score head)."""
    check_tokenizer_files(path)
    weights = read_weights(path)
    config = _config(path, trust_remote_code=trust_remote_code)
    if config is not None:
        if check_head is not None:
            check_head(path, config, weights)
        model = meta_model(config, task)
        check_config_matches_weights(path, model, weights)
    check_memory(path, weights.n_params, _load_dtype_bytes(config, weights), trained_with=trained_with)
