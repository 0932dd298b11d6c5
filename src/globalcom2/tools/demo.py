"""``globalcom2 demo``: the whole pipeline offline, on a small random-weight LLaVA-NeXT.

The model has real LLaVA-NeXT geometry (336 px views, 14 px patches, the 7B pinpoints) but
narrow random layers, so it runs on a laptop CPU in seconds. Its words are noise: the point is
to show the token counts, the per-crop ratios and a stock-vs-compressed timing measured side by
side in one run.
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import apply, make_config, remove
from ..models import llava_next as adapter
from ..testing import DEMO_SHAPE, demo_image, tiny_model, tiny_processor

PROMPT = "USER: <image>\nwhat is in this picture ? ASSISTANT:"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_demo(method: str = "globalcom2", ratio: float = 0.25, out: str | None = None, repeats: int = 5) -> int:
    """Run the demo and print what it measured; returns a process exit code."""
    cfg = make_config(method, retention_ratio=ratio)
    print("globalcom2 demo -- RANDOM WEIGHTS: a tiny LLaVA-NeXT built offline; its answers are noise.")
    torch.manual_seed(0)
    model = tiny_model(seed=0, **DEMO_SHAPE)
    processor = tiny_processor(image_size=DEMO_SHAPE["image_size"], patch_size=DEMO_SHAPE["patch_size"])
    image = demo_image(height=400, width=640)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    geo = adapter.Geometry.from_config(model.config)
    size = tuple(int(x) for x in inputs["image_sizes"][0])

    _, records = adapter.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
    rec = records[0]
    stock = geo.stock_tokens(size)
    print(f"image {size[1]}x{size[0]} px -> grid {rec.grid[0]}x{rec.grid[1]} crops of {geo.side}x{geo.side} tokens")
    print(f"method {cfg.name!r}, retention ratio R = {ratio}")
    print(f"visual tokens: stock {stock} -> compressed {rec.num_tokens} ({rec.num_tokens / stock:.1%})")
    kept = rec.kept_per_view().tolist()
    print(f"  thumbnail: kept {kept[0]} of {geo.side**2}")
    for j, r in enumerate(rec.selection.crop_ratios.tolist()):
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
