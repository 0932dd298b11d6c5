"""The picture shows exactly the tokens the language model receives."""

import pytest
import torch

import globalcom2
from conftest import lm_inputs, make_inputs
from globalcom2.testing.tiny import demo_image
from globalcom2.tools import viz


@pytest.mark.parametrize("size", [(300, 220), (300, 150), (150, 400)])
@pytest.mark.parametrize("method", ["globalcom2", "fastervlm", "drop_important_crop"])
def test_highlighted_patches_equal_tokens_the_llm_receives(model, processor, size, method):
    image = demo_image(height=size[1], width=size[0])
    (panel,) = viz.panels(model, processor, image, methods=(method,), ratios=(0.25,))
    counts = panel.kept_patch_counts()
    assert counts == panel.record.kept_per_view().tolist()
    # what the patched model's language model gets: per-view tokens + newlines
    globalcom2.apply(model, method=method, retention_ratio=0.25)
    inputs = make_inputs(processor, [image])
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    n_newline = panel.record.num_tokens - sum(counts)
    assert seen[0][0].shape[1] == n_text + sum(counts) + n_newline
    order = panel.record.order
    assert int((order == order.max()).sum()) == n_newline or n_newline == 0


def test_render_several_methods_and_ratios(model, processor):
    image = demo_image(height=200, width=300)
    fig = viz.render(model, processor, image, methods=["globalcom2", "uniform"], ratios=[0.5, 0.1], random_weights=True)
    assert len(fig.axes) >= 4 * 3
    assert "RANDOM WEIGHTS" in fig._suptitle.get_text()
    img = viz.render_image(model, processor, demo_image(height=200, width=300))
    assert img.size[0] > 100 and img.mode == "RGB"


def test_in_llm_methods_cannot_be_drawn(model, processor):
    with pytest.raises(ValueError, match="prunes inside the language model"):
        viz.panels(model, processor, demo_image(height=200, width=200), methods=("fastv",))
    with pytest.raises(ValueError, match="method must be one of"):
        viz.panels(model, processor, demo_image(height=200, width=200), methods=("nope",))


def test_cli_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert viz.main(["--demo", "--out", str(out), "--ratio", "0.5", "0.25"]) == 0
    assert out.stat().st_size > 10_000 and "saved" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        viz.main(["--model", str(tmp_path)])  # --image missing
