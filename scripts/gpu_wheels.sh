#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels that scripts/gpu_check.sh installs on a GPU machine that can fetch nothing.
#
#   bash scripts/gpu_wheels.sh            # scripts/gpu_wheels.txt's pins -> gpu_wheels/ (git-ignored), then the size check
#   bash scripts/gpu_wheels.sh --check    # only the size check of what is in the folder (downloads nothing)
#   NO_TRL=1 bash scripts/gpu_wheels.sh   # without trl and its needs (the TRL comparison then reports "not run")
#
# Wheels for CPython 3.12 on x86-64 Linux (the lent machines' python3), --no-deps: gpu_wheels.txt names every one.
# The folder travels with the working tree: `run` with carry ["gpu_wheels"]. Over LIMIT_MIB (default 60 of the 64 MiB
# that may travel) it refuses in one line and exits 2. WHEELS_DIR (default gpu_wheels in the repo) moves the folder.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${WHEELS_DIR:-$REPO/gpu_wheels}"
LIMIT_MIB="${LIMIT_MIB:-60}"
PYTHON="${PYTHON:-python3}"
TRL_PACKAGES="trl datasets dill multiprocess"

if [ "${1:-}" != "--check" ]; then
    mkdir -p "$DIR"
    rm -f "$DIR"/*.whl
    pins=()
    while read -r pin; do
        name="${pin%%==*}"
        if [ "${NO_TRL:-0}" = "1" ] && [[ " $TRL_PACKAGES " == *" $name "* ]]; then continue; fi
        pins+=("$pin")
    done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$REPO/scripts/gpu_wheels.txt" | grep -v '^$')
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any -d "$DIR" "${pins[@]}"
fi

shopt -s nullglob
wheels=("$DIR"/*.whl)
bytes=0
for w in "${wheels[@]}"; do bytes=$((bytes + $(stat -c %s "$w"))); done
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')"
if awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN { exit !(b > l * 1048576) }'; then
    echo "gpu_wheels.sh: the ${#wheels[@]} wheels in $DIR total $mib MiB, over the $LIMIT_MIB MiB that may travel; drop the TRL comparison (NO_TRL=1) or pins from scripts/gpu_wheels.txt" >&2
    exit 2
fi
echo "gpu_wheels.sh: ${#wheels[@]} wheels, $mib MiB in $DIR (limit $LIMIT_MIB MiB); carry it: run(carry=[\"$(basename "$DIR")\"])"
