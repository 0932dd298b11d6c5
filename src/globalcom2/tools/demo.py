"""``globalcom2 demo``: the whole pipeline offline, on a small random-weight model of any supported family.

The model has the family's real geometry where it is cheap (LLaVA-NeXT: 336 px views, 14 px patches, the 7B
pinpoints; the others their tiny test shapes, ``globalcom2.testing.DEMO_MODELS``) but narrow random layers, so
it runs on a laptop CPU in seconds. Its words are noise: the point is to show the token counts, the per-crop
ratios and a stock-vs-compressed timing measured side by side in one run. Everything goes through the
family's adapter (``models.adapter_for``), so a new family needs no edit here.
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import apply, make_config, remove
from ..models import adapter_for
from ..testing import DEMO_MODELS, demo_image

QUESTION = "what is in this picture ?"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def demo_prompt(processor) -> str:
    """LLaVA's one-turn prompt around the processor's image token (the tiny processors have no chat template)."""
    token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {token}\n{QUESTION} ASSISTANT:"


def check_family(model, cfg) -> None:
    """ValueError naming the method where the model's family cannot run it (e.g. visionzip on InternVL)."""
    adapter_for(model).resolve(cfg, model.config)


def run_demo(
    method: str = "globalcom2",
    ratio: float = 0.25,
    out: str | None = None,
    repeats: int = 5,
    family: str = "llava_next",
    model=None,
    processor=None,
) -> int:
    """Run the demo and print what it measured; returns a process exit code.

    family: a key of ``globalcom2.testing.DEMO_MODELS``; model/processor: that family's demo pair, if already built.
    """
    cfg = make_config(method, retention_ratio=ratio)
    torch.manual_seed(0)
    if model is None or processor is None:
        model, processor = DEMO_MODELS[family]()
    adapter = adapter_for(model)
    check_family(model, cfg)
    print(f"globalcom2 demo -- RANDOM WEIGHTS: a tiny {adapter.display_name} built offline; its answers are noise.")
    image = demo_image(height=400, width=640)
    inputs = processor(images=[image], text=[demo_prompt(processor)], return_tensors="pt")
    inputs = dict(inputs, **adapter.processor_kwargs(processor, [image]))
    vision = {k: inputs[k] for k in adapter.vision_kwargs if k in inputs}
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")

    with torch.no_grad():
        batch = adapter.prepare_images(model, adapter.resolve(cfg, model.config), inputs["pixel_values"], vision, ids,
                                       mask)  # fmt: skip
    (rec,), (stock,) = batch.records, batch.stock_counts
    n_crops = rec.grid[0] * rec.grid[1]
    print(
        f"image {image.height}x{image.width} px (height x width) -> grid {rec.grid[0]}x{rec.grid[1]} crops of "
        f"{rec.side}x{rec.side} tokens"
    )
    print(f"method {cfg.name!r}, retention ratio R = {ratio}")
    print(f"visual tokens: stock {stock} -> compressed {rec.num_tokens} ({rec.num_tokens / stock:.1%})")
    kept = rec.kept_per_view().tolist()
    print(f"  thumbnail: kept {kept[0]} of {rec.side**2}")
    if rec.n_views > 1:
        for j, r in enumerate(rec.selection.crop_ratios.tolist()[:n_crops]):
            print(f"  crop {j}: r_j = {r:.4f}, kept {kept[j + 1]} of {int(rec.valid[j].sum())} unpadded tokens")

    with torch.no_grad():
        run_stock = lambda: model(**inputs)
        model(**inputs)  # warm-up
        apply(model, cfg)
        run_comp = lambda: model(**inputs)
        model(**inputs)  # warm-up
        remove(model)
        t_stock, t_comp = [], []
        for _ in range(repeats):  # interleaved so drift hits both alike
            t_stock.append(_median_time(run_stock, 1))
            apply(model, cfg)
            t_comp.append(_median_time(run_comp, 1))
            remove(model)
    ts, tc = statistics.median(t_stock), statistics.median(t_comp)
    print(
        f"prefill (vision + LLM forward), median of {repeats}: stock {ts * 1e3:.1f} ms, "
        f"compressed {tc * 1e3:.1f} ms -> speedup x{ts / tc:.2f} (measured in this run)"
    )

    apply(model, cfg)
    gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = gen[:, inputs["input_ids"].shape[1] :]
    print(f"generate: {new.shape[1]} new tokens: {processor.batch_decode(new, skip_special_tokens=True)[0]!r}")
    remove(model)

    if out and not _have_matplotlib():
        print(f'no picture ({out}): matplotlib is not installed; pip install "globalcom2[viz]" adds it')
    elif out:
        from .viz import render

        fig = render(model, processor, image, method=method, ratio=ratio, random_weights=True)
        fig.savefig(out, dpi=110, bbox_inches="tight")
        print(f"picture of the kept tokens: {out}")
    return 0


def _have_matplotlib() -> bool:
    """Whether the optional ``viz`` extra's matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
