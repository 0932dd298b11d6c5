"""InternVL's tile arrangement is read from the pixel values: the recovered grid is the processor's own choice
(``processor_grids``) over many aspect ratios and sizes, photos, noise and documents alike; ``image_sizes`` or
``image_grids`` that the tiles contradict are an error naming them; a flat image is the documented tie."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import globalcom2
from globalcom2.models import internvl
from globalcom2.testing import demo_image, tiny_internvl_model, tiny_internvl_processor

PROMPT = "<IMG_CONTEXT> what is this ?"
#: 48 aspect ratios (width / height) from 1:14 to 14:1, log-spaced, each at a size drawn below
ASPECTS = np.exp(np.linspace(math.log(1 / 14), math.log(14), 48))


def _image(kind: str, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    if kind == "demo":
        return demo_image(height=height, width=width, seed=int(rng.integers(1 << 16)))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    low = (rng.random((max(height // 9, 1), max(width // 9, 1), 3)) * 255).astype(np.uint8)  # smooth blobs
    return Image.fromarray(low).resize((width, height), Image.BILINEAR)


def _cases(tile: int, n_per_kind: int, seed: int):
    rng = np.random.default_rng(seed)
    for kind in ("demo", "noise", "blobs"):
        for aspect in rng.choice(ASPECTS, n_per_kind, replace=False):
            area = float(rng.uniform(0.05, 16)) * tile * tile
            h = max(int(round(math.sqrt(area / aspect))), 1)
            w = max(int(round(h * aspect)), 1)
            yield kind, _image(kind, h, w, rng)


def _recovered(proc, img) -> tuple[int, int]:
    pv = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    return internvl.recover_grid(pv[:-1], pv[-1]) if pv.shape[0] > 1 else (1, 1)


@pytest.mark.parametrize("tile,n_per_kind,seed", [(112, 48, 0), (448, 4, 1)])
def test_recovered_grid_is_the_processors_choice_over_many_sizes(tile, n_per_kind, seed):
    proc = tiny_internvl_processor(image_size=tile)
    cases = list(_cases(tile, n_per_kind, seed))
    wrong = [(kind, img.size) for kind, img in cases if _recovered(proc, img) != internvl.processor_grids(proc, img)[0]]
    assert not wrong, wrong
    grids = {internvl.processor_grids(proc, img)[0] for _, img in cases}
    assert len(grids) >= (20 if tile == 112 else 5)  # many arrangements, both orientations of each


@pytest.mark.parametrize("size", [(1100, 850), (850, 1100), (1800, 600)])  # (height, width) pages of text
def test_documents_are_recovered(size):
    proc = tiny_internvl_processor(image_size=448)
    h, w = size
    page = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(page)
    for y in range(0, h, 14):
        draw.text((0, y), "the quick brown fox jumps over the lazy dog 0123456789 " * 20, fill="black")
    assert _recovered(proc, page) == internvl.processor_grids(proc, page)[0]


def test_custom_min_max_patches_are_recovered_too():
    proc = tiny_internvl_processor(min_patches=2, max_patches=6)
    for kind, img in _cases(112, 6, 2):
        assert _recovered(proc, img) == internvl.processor_grids(proc, img)[0], (kind, img.size)


def test_processor_output_goes_in_unchanged():
    """``generate(**processor(...))`` on a multi-tile image, exactly as stock takes it (it used to ask for
    image_grids); the tokens are those of the processor's own grid."""
    model, proc = tiny_internvl_model(), tiny_internvl_processor()
    images = [demo_image(height=200, width=300), demo_image(height=300, width=200, seed=1)]  # 2 x 3 and 3 x 2
    inputs = proc(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
    globalcom2.apply(model, retention_ratio=0.25)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    grids = internvl.processor_grids(proc, images)
    assert grids == [(2, 3), (3, 2)]
    given = model.generate(**inputs, image_grids=grids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, given)
    cfg = globalcom2.get_config(model)
    with torch.no_grad():
        batch = internvl.ADAPTER.prepare_images(model, cfg, inputs["pixel_values"], {}, inputs["input_ids"])
    assert [r.grid for r in batch.records] == grids


def test_image_sizes_in_pils_width_height_order_is_an_error_naming_image_sizes():
    """A 900 x 500 px picture: ``image_sizes=[img.size]`` reads as 900 high, a 4 x 2 grid the tiles (2 x 4)
    contradict; it used to run silently on 4 x 2."""
    model, proc = tiny_internvl_model(), tiny_internvl_processor()
    img = demo_image(height=500, width=900)
    inputs = proc(images=[img], text=[PROMPT], return_tensors="pt")
    globalcom2.apply(model, retention_ratio=0.25)
    with pytest.raises(ValueError, match=r"image_sizes gives image 0 the size \(900, 500\), a 4 x 2 tile grid") as err:
        model.generate(**inputs, image_sizes=[img.size], max_new_tokens=1)
    assert "(height, width)" in str(err.value) and "only as 2 x 4" in str(err.value)
    with pytest.raises(ValueError, match="image_sizes gives image 0"):
        model(**inputs, image_sizes=[img.size])
    model(**inputs, image_sizes=[(img.height, img.width)])  # the right order is accepted
    with pytest.raises(ValueError, match=r"image_grids gives image 0 a 4 x 2 grid .* contradicts"):
        model(**inputs, image_grids=[(4, 2)])
    wrong_count = demo_image(height=100, width=400)  # 1 x 4 tiles, but the size says 2 x 5
    inputs = proc(images=[wrong_count], text=[PROMPT], return_tensors="pt")
    with pytest.raises(ValueError, match=r"image_sizes gives image 0 the size \(120, 300\).*\(height, width\)"):
        model(**inputs, image_sizes=[(120, 300)])


def test_a_flat_image_is_the_documented_tie():
    """Every arrangement reproduces a flat thumbnail: the most square grid, landscape on a tie, is used and a given
    image_sizes (either order) decides; every tile is the same picture."""
    model, proc = tiny_internvl_model(), tiny_internvl_processor()
    flat = Image.new("RGB", (300, 600), (30, 160, 90))  # 600 high: the processor cuts 4 x 2
    inputs = proc(images=[flat], text=[PROMPT], return_tensors="pt")
    pv = inputs["pixel_values"]
    assert internvl.processor_grids(proc, flat) == [(4, 2)]
    assert len(internvl.consistent_grids(internvl.arrangement_distances(pv[:-1], pv[-1]))) == 4
    assert internvl.recover_grid(pv[:-1], pv[-1]) == (2, 4)
    assert torch.equal(pv[:-1], pv[:1].expand_as(pv[:-1]))  # every tile the same picture
    globalcom2.apply(model, retention_ratio=0.5)
    cfg = globalcom2.get_config(model)
    for sizes, grid in [(None, (2, 4)), ([(600, 300)], (4, 2)), ([(300, 600)], (2, 4))]:
        kwargs = {} if sizes is None else {"image_sizes": sizes}
        with torch.no_grad():
            batch = internvl.ADAPTER.prepare_images(model, cfg, pv, kwargs, inputs["input_ids"])
        assert batch.records[0].grid == grid
