"""scripts/check_lock.py: the drift check .ci/run runs before the tests, on fake locks and installed sets."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)

LOCK = """# ci lock: a header comment
filelock==4.2.12
Jinja2==3.1.6
torch==2.13.0+cpu
typing_extensions==4.15.0  # trailing comment
"""


def test_read_lock_normalises_names_and_skips_comments():
    assert check_lock.read_lock(LOCK) == {
        "filelock": "4.2.12",
        "jinja2": "3.1.6",
        "torch": "2.13.0+cpu",
        "typing-extensions": "4.15.0",
    }


def test_read_lock_refuses_loose_lines():
    with pytest.raises(ValueError, match="line 2 is not 'name==version'"):
        check_lock.read_lock("a==1\nfilelock>=4\n")


def test_matching_environment_has_no_drift():
    installed = {"filelock": "4.2.12", "jinja2": "3.1.6", "torch": "2.13.0+cpu", "typing-extensions": "4.15.0"}
    installed |= {"pip": "26.3", "setuptools": "80.0", "globalcom2": "0.1.0"}  # never locked
    assert check_lock.drift(check_lock.read_lock(LOCK), installed) == []


def test_every_kind_of_drift_is_named():
    installed = {"filelock": "4.3.1", "jinja2": "3.1.6", "torch": "2.13.0+cpu", "torchvision": "0.28.0"}
    assert check_lock.drift(check_lock.read_lock(LOCK), installed) == [
        "filelock 4.3.1 installed, lock says 4.2.12",
        "torchvision 0.28.0 installed, not in the lock",
        "typing-extensions not installed, lock says 4.15.0",
    ]


def test_torch_alone_accepts_a_local_build_of_its_release():
    """The locks pin ``torch==2.13.0`` so public PyPI can install them; the CPU (or CUDA) build satisfies it."""
    lock = check_lock.read_lock("torch==2.13.0\nnumpy==2.3.0\n")
    for build in ("2.13.0", "2.13.0+cpu", "2.13.0+cu128"):
        assert check_lock.drift(lock, {"torch": build, "numpy": "2.3.0"}) == []
    assert check_lock.drift(lock, {"torch": "2.13.1+cpu", "numpy": "2.3.0"}) == [
        "torch 2.13.1+cpu installed, lock says 2.13.0"
    ]
    assert check_lock.drift(lock, {"torch": "2.13.0", "numpy": "2.3.0+local"}) == [
        "numpy 2.3.0+local installed, lock says 2.3.0"  # only torch
    ]
    labelled = check_lock.read_lock("torch==2.13.0+cpu\n")  # a lock naming a label still wants that build
    assert check_lock.drift(labelled, {"torch": "2.13.0+cu128"}) == [
        "torch 2.13.0+cu128 installed, lock says 2.13.0+cpu"
    ]


def test_main_fails_with_a_readable_message(tmp_path, monkeypatch, capsys):
    lock = tmp_path / "ci.lock.txt"
    lock.write_text(LOCK)
    good = {"filelock": "4.2.12", "jinja2": "3.1.6", "torch": "2.13.0+cpu", "typing-extensions": "4.15.0"}
    monkeypatch.setattr(check_lock, "installed_distributions", lambda: dict(good))
    assert check_lock.main([str(lock)]) == 0
    assert "matches" in capsys.readouterr().out
    monkeypatch.setattr(check_lock, "installed_distributions", lambda: dict(good, filelock="4.3.1"))
    assert check_lock.main([str(lock)]) == 1
    err = capsys.readouterr().err
    assert "filelock 4.3.1 installed, lock says 4.2.12" in err and "scripts/lock.sh" in err
    assert check_lock.main([]) == 2


def test_script_reads_the_real_environment(tmp_path):
    """Run as .ci/run runs it: a lock naming a version nobody has fails, naming that package."""
    lock = tmp_path / "lock.txt"
    lock.write_text("pytest==0.0.1\n")
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_lock.py"), str(lock)], capture_output=True, text=True
    )
    assert res.returncode == 1
    assert f"pytest {pytest.__version__} installed, lock says 0.0.1" in res.stderr


@pytest.mark.parametrize("name", ["ci", "floor"])
def test_shipped_locks_are_complete_pins(name):
    pins = check_lock.read_lock((ROOT / "requirements" / f"{name}.lock.txt").read_text())
    assert {"torch", "transformers", "tokenizers", "filelock", "lmms-eval", "pytest", "ruff"} <= set(pins)
    assert "torchvision" not in pins  # PyPI's CUDA-linked build breaks imports next to a CPU torch
    assert pins["torch"] == "2.13.0"  # no local label: the install command works on public PyPI too
    assert {"build", "pyproject-hooks"} <= set(pins)  # CI builds the wheel and sdist it tests
    assert tuple(int(part) for part in pins["filelock"].split(".")[:2]) < (4, 3)  # the eval extra's bound


def _release(version: str, width: int = 3) -> tuple[int, ...]:
    """``"2.13"`` / ``"2.13.0+cpu"`` -> ``(2, 13, 0)``: the release part, zero-padded."""
    parts = [int(p) for p in version.split("+")[0].split(".")]
    return tuple(parts + [0] * (width - len(parts)))


def test_declared_floors_are_what_the_floor_lock_tests():
    """pyproject's lower bounds for torch and transformers are exactly the versions CI's floor run installs."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = check_lock.read_lock((ROOT / "requirements" / "floor.lock.txt").read_text())
    newest = check_lock.read_lock((ROOT / "requirements" / "ci.lock.txt").read_text())
    declared = {re.match(r"[A-Za-z0-9_.-]+", d).group(0): d for d in project["dependencies"]}
    for name in ("torch", "transformers"):
        lower = re.search(r">=\s*([0-9.]+)", declared[name]).group(1)
        assert _release(floor[name]) == _release(lower), (name, declared[name], floor[name])
        assert _release(floor[name]) <= _release(newest[name])
    assert "<6" in declared["transformers"] and _release(newest["transformers"])[0] == 5
    assert "tokenizers" in declared  # globalcom2.tiny imports it
    assert "filelock<4.3" in project["optional-dependencies"]["eval"]  # lmms-eval 0.7.3 imports filelock._api
