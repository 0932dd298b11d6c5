"""README and docs/ examples run, so they cannot rot; the README's first screen is what it promises."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _python_blocks(path: Path = README):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_offline_examples_run(path):
    blocks = [b for b in _python_blocks(path) if "globalcom2.testing" in b or "globalcom2.tiny" in b]
    if path == README:
        assert blocks, "README lost its offline example"
    for block in blocks:
        exec(compile(block, str(path), "exec"), {})


def test_readme_first_screen():
    """What it does, the two commands, a short example, the size convention; docs linked, not pasted in."""
    text = README.read_text()
    first = text[: text.index("## ")]
    assert first.count("```python") == 1
    example = _python_blocks()[0]
    assert len(example.strip().splitlines()) <= 12 and "globalcom2.apply" in example
    assert "(height, width)" in first
    for doc in ("versions", "models", "methods", "fidelity", "efficiency"):
        assert f"(docs/{doc}.md)" in text
    assert len(text.splitlines()) < 400  # the long tables live in docs/


def test_docs_speak_of_the_project_only():
    """No words about how the work was organised (issue numbers, sessions) in README, CHANGELOG or docs."""
    for path in [README, ROOT / "CHANGELOG.md", *DOCS]:
        text = path.read_text()
        assert not re.search(r"\bsession\b|\bissues? \d+|after issues", text, flags=re.I), path.name


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    fence = lines.index("```bash")
    assert "globalcom2 demo" in lines[fence + 1]
    assert "pytest" in lines[fence + 2]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert lines[fence + 2] in ci  # CI runs exactly the README's test command


def test_checkpoint_table_matches_the_cost_model():
    from globalcom2.tools import flops

    rows = re.findall(r"^\| llava-v1\.6-\S+ \|.*\| `(\S+)` \| ([\d.]+) → ([\d.]+) \| ([\d.]+) → ([\d.]+) \|$",
                      (ROOT / "docs" / "models.md").read_text(), flags=re.M)  # fmt: skip
    assert len(rows) == 4, "docs/models.md lost its LLaVA-NeXT checkpoint table"
    for preset, *printed in rows:
        shape = flops.PRESETS[preset]
        want = [flops.prefill_flops(shape, t) / 1e12 for t in (2880, 720)]
        want += [flops.kv_cache_bytes(shape, t) / 2**20 for t in (2880, 720)]
        assert [float(x) for x in printed] == [round(w, 1) for w in want], preset
