#!/usr/bin/env bash
# Run the test suite in a fresh virtual environment installed exactly from one lock.
#
#   bash scripts/test-range.sh ci      # newest tested releases (requirements/ci.lock.txt)
#   bash scripts/test-range.sh floor   # lowest supported torch/transformers (requirements/floor.lock.txt)
#   bash scripts/test-range.sh ci -x -k llava   # extra arguments go to pytest
#
# The lock is installed with --no-deps: no resolver runs, so nothing released after the lock was made
# can enter (and lmms-eval's torchvision, left out of the lock, is never installed). The project itself
# is what a user would install: `python -m build` (the lock's build frontend) makes the sdist and, from
# it, the wheel in dist/, and the wheel is installed (not `-e .`), so the tests run on the packaged files
# and metadata (entry points included). scripts/check_lock.py then proves the environment equals the
# lock before any test runs. Environment: PYTHON (default python3, the version the locks were made
# with), VENV (default .ci-venv-NAME, recreated each run), DIST (default dist-NAME, emptied each run).
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:?usage: bash scripts/test-range.sh ci|floor [pytest args]}"
shift
lock="requirements/$name.lock.txt"
[[ -f "$lock" ]] || { echo "no lock $lock (bash scripts/lock.sh $name makes it)" >&2; exit 2; }
venv="${VENV:-.ci-venv-$name}"
"${PYTHON:-python3}" -m venv --clear "$venv"
py="$venv/bin/python"
echo "== $name: installing $lock"
"$py" -m pip install -q --no-deps -r "$lock"
dist="${DIST:-dist-$name}"
rm -rf "$dist" && mkdir -p "$dist"
echo "== $name: building the sdist and the wheel (python -m build) into $dist/"
"$py" -m build --outdir "$dist" . >"$dist/build.log" 2>&1 || { cat "$dist/build.log" >&2; exit 1; }
wheels=("$dist"/globalcom2-*.whl)
sdists=("$dist"/globalcom2-*.tar.gz)
[[ -f "${wheels[0]}" && -f "${sdists[0]}" ]] || { echo "== $name: python -m build made no wheel/sdist" >&2; exit 1; }
"$py" -m pip install -q --no-deps "${wheels[0]}"
"$py" scripts/check_lock.py "$lock"
echo "== $name: $("$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
rc=0
"$py" -m pytest -q "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "== $name: pytest collected no tests (exit 5): that is a failure here" >&2
fi
if [[ $rc -ne 0 ]]; then
    echo "== $name: FAILED (pytest exit $rc)" >&2
    exit "$rc"
fi
echo "== $name: passed"
