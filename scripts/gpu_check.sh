#!/usr/bin/env bash
# The GPU check (README "Performance", 6) on a lent GPU machine that can fetch nothing: its python3 and CUDA torch as
# they are, no venv, no network. Here first (PyPI reachable): `bash scripts/gpu_wheels.sh` fills gpu_wheels/; then
# the device call carries it:  run(command="bash scripts/gpu_check.sh", carry=["gpu_wheels"], timeout_s=600)
#
#   bash scripts/gpu_check.sh                       # installs, then every part; table + OUT/gpu_check.json
#   bash scripts/gpu_check.sh --parts hf dist       # any scripts/gpu_check.py option is passed on
#   bash scripts/gpu_check.sh --dry-run             # the same installs, then build and validate every part's
#                                                   # configs on the CPU with stand-ins (no GPU needed)
#
# 1. pip installs the carried wheels (WHEELS, default gpu_wheels in the repo: pydantic, vaderSentiment, trl, ...)
#    with --no-index --no-deps into SITE (default /tmp/tiltlm-gpu-site), a --target folder: the image's own site stays
#    as it is (its torch, transformers, accelerate are used), writable or not, and nothing is looked up on an index;
# 2. pip installs tiltlm from this working tree the same way (--no-index --no-deps --no-build-isolation: setuptools
#    from the image builds it); where that build fails, this checkout's src/ goes on PYTHONPATH instead (said so);
# 3. checks that tiltlm, pydantic and vaderSentiment import (else one line naming the fix, exit 2), then runs
#    scripts/gpu_check.py --out OUT (default $OUT, the device tool's output folder, else gpu_check_out).
# Exit status: gpu_check.py's (0 every part run passed, 1 a part failed, 2 no CUDA, a bad config or a missing package).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
WHEELS="${WHEELS:-$REPO/gpu_wheels}"
SITE="${SITE:-/tmp/tiltlm-gpu-site}"
PYTHON="${PYTHON:-python3}"
PIP=("$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --upgrade --target "$SITE")

command -v nvidia-smi >/dev/null 2>&1 && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true; }
mkdir -p "$SITE"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    "${PIP[@]}" "${wheels[@]}"
    echo "gpu_check.sh: installed ${#wheels[@]} carried wheels into $SITE" >&2
else
    echo "gpu_check.sh: no wheels in $WHEELS (bash scripts/gpu_wheels.sh makes them; carry gpu_wheels); using what $PYTHON has" >&2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if "${PIP[@]}" --no-build-isolation "$REPO" >"$SITE/.tiltlm-install.log" 2>&1; then
    echo "gpu_check.sh: installed tiltlm from $REPO into $SITE" >&2
else
    echo "gpu_check.sh: building tiltlm failed ($(tail -n 1 "$SITE/.tiltlm-install.log")); importing it from $REPO/src instead" >&2
    export PYTHONPATH="$REPO/src:$PYTHONPATH"
fi
"$PYTHON" -c 'import tiltlm, pydantic, vaderSentiment, torch; print(f"gpu_check.sh: tiltlm from {tiltlm.__path__[0]}, pydantic {pydantic.VERSION}, torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()})")' >&2 || {
    echo "gpu_check.sh: tiltlm or pydantic or vaderSentiment does not import with $PYTHON (above); run bash scripts/gpu_wheels.sh here and carry gpu_wheels" >&2; exit 2; }
cd "$REPO"
exec "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@"
