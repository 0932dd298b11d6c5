"""A CLI that answers in one line: a bad flag is one line naming the flag (never a traceback), checked before any
model is loaded; ``--help`` is plain text and loads no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from globalcom2.testing import demo_image
from globalcom2.tools import cli

BAD = [
    (["demo", "--ratio", "1.5"], "--ratio 1.5: retention_ratio must be"),
    (["demo", "--method", "globalcom"], "--method globalcom: did you mean 'globalcom2'?"),
    (["demo", "--method", "fastv"], "--method fastv: the demo shows a vision-side method"),
    (["demo", "--family", "qwen9"], "--family qwen9: must be one of"),
    (["demo", "--repeats", "0"], "--repeats 0: must be >= 1"),
    (["demo", "--out", "/no/such/dir/d.png"], "--out /no/such/dir/d.png: no such directory"),
    (["viz", "--demo", "--ratio", "1.5"], "--ratio 1.5: retention_ratio must be"),
    (["viz", "--demo", "--image", "missing.png"], "--image missing.png: no such file"),
    (["viz", "--demo", "--method", "fastv"], "--method fastv: prunes inside the language model"),
    (["viz", "--demo", "--family", "internvl", "--method", "visionzip"], "--method visionzip: method 'visionzip' is"),
    (["viz", "--model", "./no_such_dir", "--image", "x.png"], "--model ./no_such_dir: no such local directory"),
    (["generate", "--model", "./no_such_dir", "--image", "x.png", "--prompt", "hi"], "no such local directory"),
    (["bench", "--tiny", "--ratios", "0"], "--ratios 0.0: retention_ratio must be"),
    (["bench", "--tiny", "--methods", "nope"], "--methods nope: method must be one of"),
    (["bench", "--tiny", "--options", "{"], "--options {: not JSON"),
    (["bench", "--tiny", "--options", '{"fastv": {"k": 2}}', "--methods", "globalcom2"], "not among --methods"),
    (["bench", "--tiny", "--methods", "fastv", "--options", '{"fastv": {"kk": 2}}'], "--options"),
    (["bench", "--tiny", "--image-size", "0", "10"], "--image-size 0 10: height and width must be positive"),
    (["bench", "--model", "./no_such_dir"], "--model ./no_such_dir: no such local directory"),
    (["flops", "--ratios", "1.5"], "--ratios 1.5: ratio must be"),
    (["flops", "--image-size", "672", "672", "--methods", "nope"], "--methods nope: method must be one of"),
    (["flops", "--config", "/no/such/config.json"], "--config /no/such/config.json: config must be"),
    (["report", "/no/such/results.json"], "no such file"),
    (["nonsense"], "invalid choice: 'nonsense'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_are_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err, err
    assert err.startswith(f"globalcom2{' ' + argv[0] if argv[0] != 'nonsense' else ''}: error: ")


def test_generate_checks_the_image_before_loading_a_model(tmp_path, capsys):
    from globalcom2.testing import tiny_model, tiny_processor

    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    tiny_processor().save_pretrained(ckpt)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(ckpt), "--image", str(tmp_path / "none.png"), "--prompt", "hi"])
    assert "--image" in capsys.readouterr().err
    (tmp_path / "not-an-image.png").write_text("text")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(ckpt), "--image", str(tmp_path / "not-an-image.png"), "--prompt", "hi"])
    assert "not an image PIL can read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(tmp_path), "--image", str(tmp_path / "not-an-image.png"), "--prompt", "x"])
    assert "not a checkpoint directory (it holds no config.json)" in capsys.readouterr().err


def test_errors_raised_while_running_are_one_line_too(tmp_path, capsys, monkeypatch):
    """Past the flag checks, an error a command raises is still one line, exit status 1."""
    from globalcom2.tools import demo

    def boom(**kwargs):
        raise ValueError("something\nwent wrong")

    monkeypatch.setattr(demo, "run_demo", boom)
    assert cli.main(["demo", "--out", str(tmp_path / "d.png")]) == 1
    assert capsys.readouterr().err == "globalcom2 demo: error: something went wrong\n"
    monkeypatch.setenv("GLOBALCOM2_TRACEBACK", "1")
    with pytest.raises(ValueError, match="went wrong"):
        cli.main(["demo", "--out", str(tmp_path / "d.png")])


VERBS = ["demo", "generate", "methods", "flops", "bench", "viz", "report"]


def test_help_is_plain_text_and_loads_no_torch():
    """``globalcom2 --help`` and every verb's help: no reStructuredText markup, no torch imported (it used to take
    ~5 s to import torch just to build the parser)."""
    code = (
        "import sys\n"
        "from globalcom2.tools import cli\n"
        f"for argv in [['--help']] + [[v, '--help'] for v in {VERBS!r}]:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert out.rstrip().endswith("NO TORCH"), out[-500:]
    assert "``" not in out
    for verb in VERBS:
        assert f"usage: globalcom2 {verb}" in out
    assert "--image-size H W" in out  # flops and bench: (height, width), as transformers' image_sizes


def test_light_verbs_load_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from globalcom2.tools import cli\n"
        "cli.main(['flops', '--preset', 'llava-next-13b'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "79.9" in out and out.rstrip().endswith("NO TORCH"), out[-500:]


def test_image_exists_check_uses_no_model(tmp_path, capsys):
    image = tmp_path / "img.png"
    demo_image(height=20, width=30).save(image)
    with pytest.raises(SystemExit):
        cli.main(["viz", "--model", str(tmp_path / "nothing"), "--image", str(image)])
    assert "no such local directory" in capsys.readouterr().err
