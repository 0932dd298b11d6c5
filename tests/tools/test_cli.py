"""The console script: demo, methods, and generate against a checkpoint saved locally."""

import subprocess
import sys

from globalcom2.testing.tiny import demo_image, tiny_model, tiny_processor
from globalcom2.tools import cli


def test_demo_prints_counts_ratios_and_timing(capsys, tmp_path):
    assert cli.main(["demo", "--ratio", "0.25", "--repeats", "1", "--out", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert "visual tokens: stock" in out and "r_j =" in out
    assert "speedup x" in out and "generate:" in out


def test_demo_without_matplotlib_prints_how_to_get_the_picture(capsys, tmp_path, monkeypatch):
    """No viz extra: the demo still runs, writes no picture and says which extra draws it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out_png = tmp_path / "demo.png"
    assert cli.main(["demo", "--ratio", "0.5", "--repeats", "1", "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "generate:" in out and not out_png.exists()
    (line,) = [ln for ln in out.splitlines() if "no picture" in ln]
    assert 'pip install "globalcom2[viz]"' in line


def test_methods_lists_registry(capsys):
    assert cli.main(["methods"]) == 0
    assert "globalcom2" in capsys.readouterr().out


def test_generate_on_a_local_checkpoint(tmp_path):
    ckpt = tmp_path / "tiny-llava-next"
    tiny_model().save_pretrained(ckpt)
    tiny_processor().save_pretrained(ckpt)
    image = tmp_path / "img.png"
    demo_image(height=200, width=320).save(image)
    cmd = [
        sys.executable,
        "-m",
        "globalcom2.tools.cli",
        "generate",
        "--model",
        str(ckpt),
        "--image",
        str(image),
        "--prompt",
        "USER: <image>\nwhat is this ? ASSISTANT:",
        "--ratio",
        "0.25",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
