#!/usr/bin/env bash
# Regenerate the pinned test/CI environments in requirements/ from pyproject.toml.
#
#   bash scripts/lock.sh              # both locks
#   bash scripts/lock.sh ci           # newest releases the resolver picks today -> requirements/ci.lock.txt
#   bash scripts/lock.sh floor        # the lowest tested torch/transformers     -> requirements/floor.lock.txt
#
# How: a fresh virtual environment; torch first (the CPU build; on a plain public index set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu so that `torch==X` resolves to `X+cpu`);
# then this project with the extras test, viz and eval (the floor lock also pins transformers==FLOOR);
# then the CUDA-linked torchvision that lmms-eval pulls in is removed (nothing here needs it and it
# breaks imports next to a CPU torch); then `pip freeze --exclude-editable` becomes the lock, with
# torch's local version label dropped (`torch==2.13.0`, not `2.13.0+cpu`): PEP 440's `==2.13.0` matches
# any local build of 2.13.0, so the lock installs from public PyPI (the CUDA build) as well as from an
# index serving the CPU build, and scripts/check_lock.py accepts a local label on torch only.
# Install a lock exactly, with no resolver involved (scripts/test-range.sh installs the built wheel):
#   python -m pip install --no-deps -r requirements/ci.lock.txt -e .
# Environment: PYTHON (default python3; the locks are made with CPython 3.11 on linux x86_64),
# TORCH / FLOOR_TRANSFORMERS (override the pins below), OUT (write the lock elsewhere),
# VENV (build in this directory and keep it; default: a temporary one, removed afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH="${TORCH:-2.13.0}"                       # lowest and newest torch tested (see README, "Supported versions")
FLOOR_TRANSFORMERS="${FLOOR_TRANSFORMERS:-5.0.0}"  # lowest transformers the suite passes on (measured)
PYTHON="${PYTHON:-python3}"

lock() {  # lock NAME [extra requirement...]
    local name="$1"; shift
    local out="${OUT:-requirements/$name.lock.txt}"
    local venv="${VENV:-}" tmp=""
    if [[ -z "$venv" ]]; then tmp="$(mktemp -d)"; venv="$tmp/venv"; fi
    "$PYTHON" -m venv --clear "$venv"
    local py="$venv/bin/python"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "torch==$TORCH"
    "$py" -m pip install -q -e ".[test,viz,eval]" "torch==$TORCH" "$@"
    "$py" -m pip uninstall -q -y torchvision || true
    mkdir -p "$(dirname "$out")"
    {
        echo "# $name lock: the exact environment the test suite passed in (pip freeze, $(date -u +%Y-%m-%d))."
        echo "# Regenerate: bash scripts/lock.sh $name     Install: python -m pip install --no-deps -r $out -e ."
        echo "# Made with $("$py" -c 'import platform; print("CPython", platform.python_version(), platform.system(), platform.machine())'); torch $TORCH${*:+; $*}."
        echo "# torchvision is left out on purpose (see scripts/lock.sh); .ci/run checks an install against this file."
        echo "# torch is pinned without its local label (2.13.0, not 2.13.0+cpu) so that public PyPI can install it too;"
        echo "# scripts/check_lock.py accepts any local build of that version for torch only (see scripts/lock.sh)."
        "$py" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*$/\1/' | LC_ALL=C sort -f
    } >"$out.tmp"
    mv "$out.tmp" "$out"
    echo "wrote $out ($(grep -vc '^#' "$out") pins)"
    if [[ -n "$tmp" ]]; then rm -rf "$tmp"; fi
}

case "${1:-all}" in
    ci) lock ci ;;
    floor) lock floor "transformers==$FLOOR_TRANSFORMERS" ;;
    all) lock ci; lock floor "transformers==$FLOOR_TRANSFORMERS" ;;
    *) echo "usage: bash scripts/lock.sh [ci|floor|all]" >&2; exit 2 ;;
esac
