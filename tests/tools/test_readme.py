"""README examples run, so they cannot rot."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_offline_readme_example_runs():
    blocks = [b for b in _python_blocks() if "globalcom2.testing" in b or "globalcom2.tiny" in b]
    assert blocks, "README lost its offline example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


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
                      README.read_text(), flags=re.M)  # fmt: skip
    assert len(rows) == 4, "README lost its LLaVA-NeXT checkpoint table"
    for preset, *printed in rows:
        shape = flops.PRESETS[preset]
        want = [flops.prefill_flops(shape, t) / 1e12 for t in (2880, 720)]
        want += [flops.kv_cache_bytes(shape, t) / 2**20 for t in (2880, 720)]
        assert [float(x) for x in printed] == [round(w, 1) for w in want], preset
