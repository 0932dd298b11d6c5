"""Every documented tool runs for every family and every method the family accepts: viz (render and CLI),
bench (``--tiny --family``), flops (``--config`` of each family), report, demo and generate."""

from __future__ import annotations

import json

import pytest
import torch

import globalcom2
from globalcom2.methods import REGISTRY
from globalcom2.models import adapter_for
from globalcom2.testing import DEMO_MODELS, demo_image
from globalcom2.tools import bench, cli, flops, report, viz

#: options some methods need on a 4-layer language model (the demo models')
OPTIONS = {"sparsevlm": {"layers": [0, 1, 2]}}


def accepted(model, drawable: bool = False) -> list[str]:
    """Registered methods the model's family runs (``resolve`` and ``check_model`` accept them)."""
    out = []
    for name in REGISTRY:
        cfg = globalcom2.make_config(
            name, retention_ratio=0.25, **{k: tuple(v) for k, v in OPTIONS.get(name, {}).items()}
        )
        if drawable and cfg.where != "vision":
            if "embedding" not in cfg.forms:
                continue
            cfg = globalcom2.make_config(cfg, form="embedding")
        try:
            adapter_for(model).resolve(cfg, model.config)
            cfg.check_model(model)
        except ValueError:
            continue
        out.append(name)
    return out


def viz_config(name: str):
    """The config viz draws for ``name`` (DART in its vision-side form)."""
    cfg = globalcom2.make_config(name, retention_ratio=0.25)
    return globalcom2.make_config(cfg, form="embedding") if cfg.where != "vision" else cfg


def test_demo_models_cover_every_family():
    from globalcom2.models import family_names

    assert set(DEMO_MODELS) == set(family_names())


def test_viz_draws_every_method_the_family_accepts(family):
    methods = accepted(family.model, drawable=True)
    assert {"globalcom2", "fastervlm", "divprune", "cdpruner", "dart"} <= set(methods), methods
    image = demo_image(height=220, width=300)
    panels = viz.panels(family.model, family.processor, image, methods=tuple(methods), ratios=(0.25,))
    assert [p.method for p in panels] == methods
    adapter = adapter_for(family.model)
    inputs = family.processor(images=[image], text=[viz._image_token(family.processor)], return_tensors="pt")
    inputs = dict(inputs, **adapter.processor_kwargs(family.processor, [image]))  # the prompt viz draws with
    vision = {k: inputs[k] for k in adapter.vision_kwargs if k in inputs}
    for p in panels:  # the picture is the selection the patched model runs
        cfg = adapter.resolve(viz_config(p.method), family.model.config)
        with torch.no_grad():
            live = adapter.prepare_images(family.model, cfg, inputs["pixel_values"], vision, inputs["input_ids"],
                                          inputs.get("attention_mask")).records[0]  # fmt: skip
        assert torch.equal(p.record.order, live.order), p.method
        drawn, kept = p.kept_patch_counts(), p.record.kept_per_view().tolist()
        assert drawn[0] == kept[0] and sum(drawn[1:]) >= sum(kept[1:]), p.method  # OneVision pools patches
        assert 0 < p.record.num_tokens <= p.stock_tokens, p.method
    fig = viz.render(family.model, family.processor, image, methods=methods[:3], ratios=[0.25, 0.5])
    assert len(fig.axes) >= 6 * 3
    for name in set(REGISTRY) - set(accepted(family.model)) - {"fastv", "sparsevlm"}:  # refused: named, with why
        with pytest.raises(ValueError, match=repr(name)):
            viz.panels(family.model, family.processor, image, methods=(name,))


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_viz_cli_demo_for_every_family(name, tmp_path, capsys):
    model, _ = DEMO_MODELS[name]()
    methods = accepted(model, drawable=True)
    out = tmp_path / "v.png"
    assert (
        cli.main(["viz", "--demo", "--family", name, "--method", *methods, "--ratio", "0.25", "--out", str(out)]) == 0
    )
    assert out.stat().st_size > 10_000 and "saved" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_bench_tiny_for_every_family_and_method(name, tmp_path, capsys):
    model, _ = DEMO_MODELS[name]()
    methods = accepted(model)
    assert {"fastv", "sparsevlm", "dart", "globalcom2"} <= set(methods)
    out = tmp_path / "b.json"
    argv = ["--tiny", "--family", name, "--methods", *methods, "--ratios", "0.25", "--repeats", "1",
            "--decode-tokens", "1", "--image-size", "150", "250", "--options", json.dumps(OPTIONS),
            "--json", str(out), "--quiet"]  # fmt: skip
    assert bench.main(argv) == 0
    assert f"tiny random {name} model; image 150x250 px (height x width)" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["stock", *methods]
    stock = rows[0]
    for r in rows:
        assert r["kv_mb"] == pytest.approx(r["kv_pred_mb"], rel=0, abs=1e-12), r["method"]  # measured == analytic
        assert r["vision_ms"] > 0 and r["prefill_ms"] > 0 and r["pack_ms"] >= 0
        assert r["visual_tokens"] <= stock["visual_tokens"], r["method"]
        where = REGISTRY[r["method"]].where if r["method"] != "stock" else "stock"
        assert (r["select_ms"] is None) == (where != "vision"), r["method"]


def test_bench_image_size_is_height_width(capsys):
    """``--image-size H W``, as transformers' image_sizes, flops and num_image_tokens (it used to be W H)."""
    from globalcom2.budget import stock_image_tokens

    config = DEMO_MODELS["llava_next"]()[0].config
    tall, wide = stock_image_tokens(config, (400, 150)), stock_image_tokens(config, (150, 400))
    assert tall != wide  # one newline per unpadded row: the orientation shows in the count
    assert bench.main(["--tiny", "--methods", "globalcom2", "--ratios", "0.5", "--repeats", "1", "--decode-tokens",
                       "0", "--image-size", "400", "150", "--quiet"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    stock = next(line for line in table.splitlines() if line.strip().startswith("stock"))
    assert int(stock.split()[2]) == tall


def test_flops_config_of_every_family(family, tmp_path, capsys):
    family.model.config.save_pretrained(tmp_path)
    family.processor.image_processor.save_pretrained(tmp_path)  # Qwen-VL's geometry follows its min/max pixels
    names = sorted(REGISTRY)
    assert flops.main(["--config", str(tmp_path), "--image-size", "220", "300", "--ratios", "0.25",
                       "--methods", *names]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"220x300 px, height x width ({family.model.config.model_type} geometry)" in out
    runs = set()
    for name in names:  # what the family refuses at apply, before any layer check
        try:
            adapter_for(family.model).resolve(globalcom2.make_config(name), family.model.config)
            runs.add(name)
        except ValueError:
            pass
    stock = globalcom2.budget.stock_image_tokens(family.model.config, (220, 300), processor=family.processor)
    for name in names:
        (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(f"{name} R=0.25")]
        if name in runs and REGISTRY[name].where == "vision":
            kept = int(line.split("->")[1].split()[0])
            assert 0 < kept <= stock, line
        elif name in runs:  # in-LLM
            assert "prunes inside the language model" in line, line
        else:
            assert f"{name!r}" in line and ("not supported" in line or "does not run" in line), line


def test_report_for_every_family_and_method(family, tmp_path, capsys):
    ckpt = f"/models/{family.name}"
    results = {"gqa": {"exact_match,none": 0.6}, "mme": {"mme_perception_score,none": 1500.0}}
    paths = []
    for i, name in enumerate(["none", *accepted(family.model)]):
        path = tmp_path / f"run{i}" / "r_results.json"
        path.parent.mkdir()
        scored = {"gqa": {"exact_match,none": 0.6 - i / 1000}, "mme": results["mme"]}
        args = f"pretrained={ckpt},method={name}" + (",retention_ratio=0.25" if name != "none" else "")
        path.write_text(json.dumps({"results": scored, "config": {"model": "globalcom2", "model_args": args}}))
        paths.append(str(path))
    assert report.main(paths) == 0
    md = capsys.readouterr().out
    labels = [line.split("|")[1].strip() for line in md.splitlines()[2:]]
    assert labels[0] == "Stock" and len(labels) == len(paths)
    for name in accepted(family.model):
        assert report.DISPLAY.get(name, name) in labels


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_for_every_family(name, tmp_path, capsys):
    assert cli.main(["demo", "--family", name, "--repeats", "1", "--out", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert "visual tokens: stock" in out and "generate:" in out and "RANDOM WEIGHTS" in out


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_generate_picks_the_model_class_from_the_checkpoint(name, tmp_path, capsys, monkeypatch):
    """Any family's checkpoint: the class comes from its config via the adapter (the tiny OneVision/InternVL
    processors cannot be saved without torchvision's video processor, so the processor is handed in)."""
    import transformers

    model, processor = DEMO_MODELS[name]()
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    image = tmp_path / "img.png"
    demo_image(height=200, width=300).save(image)
    argv = ["generate", "--model", str(tmp_path / "ckpt"), "--image", str(image), "--prompt", "what is this ?",
            "--ratio", "0.25", "--max-new-tokens", "2", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.endswith("\n")  # the decoded answer (noise: random weights)


def test_every_family_has_a_tiny_model_with_four_layers():
    for name, build in DEMO_MODELS.items():
        model, _ = build()
        assert model.config.text_config.num_hidden_layers >= 4, name
        assert isinstance(next(model.parameters()), torch.Tensor)
