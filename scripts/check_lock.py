"""Fail, readably, when the installed environment drifts from a lock file (run by .ci/run before the tests).

    python scripts/check_lock.py requirements/ci.lock.txt

Every ``name==version`` pin of the lock must be installed at exactly that version, and nothing else may be
installed except pip's own tools and this project. The message names each difference, e.g.
``filelock 4.3.1 installed, lock says 4.2.12``, so a moved dependency shows up here and not as a mystery
deep inside a test. Standard library only: it checks the interpreter that runs it.

One exception, for torch only: a lock pin without a local version label (``torch==2.13.0``) also accepts
an installed local build of that exact release (``2.13.0+cpu``, ``2.13.0+cu128``), as PEP 440's ``==``
does. The locks pin torch that way so that their install command works on public PyPI (whose 2.13.0 is
the CUDA build) as well as on an index serving the CPU build; every other package must match exactly.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

#: installed but never in a lock: ``pip freeze`` leaves out pip's own tools; the project is installed editable
IGNORED = frozenset({"pip", "setuptools", "wheel", "distribute", "globalcom2"})
#: pins that accept a local build (``X+label``) of their exact release when they name none themselves
LOCAL_LABEL_OK = frozenset({"torch"})
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def canonical(name: str) -> str:
    """The PEP 503 normalised form of a distribution name (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    """``{canonical name: version}`` from a ``pip freeze`` style lock; raises ValueError on any other line."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(f"lock line {number} is not 'name==version': {raw!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed_distributions() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution the running interpreter can import from."""
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def matches(name: str, want: str, have: str) -> bool:
    """Whether installed version ``have`` satisfies the lock's ``want``: equal, or for torch (``LOCAL_LABEL_OK``) a
    local build of the release the lock names without a label (``2.13.0`` accepts ``2.13.0+cpu``)."""
    if have == want:
        return True
    return name in LOCAL_LABEL_OK and "+" not in want and have.split("+", 1)[0] == want


def drift(lock: dict[str, str], installed: dict[str, str], ignored: frozenset[str] = IGNORED) -> list[str]:
    """One readable line per difference between the lock and the installed set, sorted by name."""
    problems = []
    for name in sorted(set(lock) | set(installed)):
        if name in ignored:
            continue
        want, have = lock.get(name), installed.get(name)
        if want is None:
            problems.append(f"{name} {have} installed, not in the lock")
        elif have is None:
            problems.append(f"{name} not installed, lock says {want}")
        elif not matches(name, want, have):
            problems.append(f"{name} {have} installed, lock says {want}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Compare this interpreter's distributions with the lock given as the only argument; 0 when they match."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/check_lock.py LOCK_FILE", file=sys.stderr)
        return 2
    path = Path(args[0])
    lock = read_lock(path.read_text())
    problems = drift(lock, installed_distributions())
    if problems:
        print(f"environment differs from {path} ({len(problems)}):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print(
            f"install it exactly with `python -m pip install --no-deps -r {path} .` in a fresh venv"
            " (scripts/test-range.sh does), or regenerate the lock with `bash scripts/lock.sh`",
            file=sys.stderr,
        )
        return 1
    print(f"environment matches {path} ({len(lock)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
