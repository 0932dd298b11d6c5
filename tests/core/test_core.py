"""Level 1: core functions on hand-made tensors whose answer is known."""

import math

import pytest
import torch
import torch.nn.functional as F

from globalcom2 import core


def test_grid_roundtrip():
    x = torch.arange(2 * 3 * 16).view(6, 16)  # 6 crops (2x3) of 4x4
    g = core.crops_to_grid(x, (2, 3), 4)
    assert g.shape == (8, 12)
    assert g[0, 4].item() == x[1, 0].item()  # crop (0, 1) starts at column 4
    assert g[4, 0].item() == x[3, 0].item()  # crop (1, 0) starts at row 4
    assert torch.equal(core.grid_to_crops(g, (2, 3), 4), x)


def test_unpadded_box_wide_and_tall():
    # wide image on a square 2x2 grid of 4x4 tokens: new_h = int(200 * 8 / 400) = 4 -> 2 rows padded each side
    assert core.unpadded_box((2, 2), 4, (200, 400)) == (2, 6, 0, 8)
    # tall image: columns padded instead
    assert core.unpadded_box((2, 2), 4, (400, 200)) == (0, 8, 2, 6)


def test_unpadded_box_truncates_like_authors_rounds_like_transformers():
    # 47 * 48 / 752 = 2.9999999...: the authors' int() gives 2, transformers' round(., 7) gives 3
    assert core.unpadded_box((1, 2), 24, (47, 752), round_digits=None) == (11, 13, 0, 48)
    assert core.unpadded_box((1, 2), 24, (47, 752), round_digits=7) == (10, 14, 0, 48)


def test_box_mask_counts():
    valid = core.box_mask((2, 6, 0, 8), (2, 2), 4)
    assert valid.shape == (4, 16)
    assert valid.sum(1).tolist() == [8, 8, 8, 8]  # each crop loses two of its four rows


def test_crop_regions_even_and_uneven():
    r = core.crop_regions(4, (2, 2)).view(4, 4)
    assert r.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # 8 columns over 3 crops: cells of 2, leftovers join the last crop
    r = core.crop_regions(8, (1, 3)).view(8, 8)
    assert r[0].tolist() == [0, 0, 1, 1, 2, 2, 2, 2]


def test_crop_region_stats_sum_and_max():
    thumb = torch.arange(16.0)
    s = core.crop_region_stats(thumb, 4, (2, 2), "sum")
    assert s.dtype == torch.float64
    assert s.tolist() == [0 + 1 + 4 + 5, 2 + 3 + 6 + 7, 8 + 9 + 12 + 13, 10 + 11 + 14 + 15]
    assert core.crop_region_stats(thumb, 4, (2, 2), "max").tolist() == [5, 7, 13, 15]


def test_softmax_retention_formula():
    s = torch.tensor([0.0, 10.0], dtype=torch.float64)
    r = core.softmax_retention(s, 0.5, 10.0)
    e = torch.tensor([math.exp(-1.0), 1.0], dtype=torch.float64)
    sigma = e / (e.sum() + 1e-8)
    expected = (0.5 * (1 + sigma - sigma.mean())).clamp(max=1)
    assert torch.allclose(r, expected, rtol=0, atol=1e-15)
    # equal crops -> everyone gets R; ratios are capped at 1
    assert torch.allclose(
        core.softmax_retention(torch.zeros(4, dtype=torch.float64), 0.25, 10),
        torch.full((4,), 0.25, dtype=torch.float64),
    )
    assert core.softmax_retention(torch.tensor([0.0, 1e4], dtype=torch.float64), 1.0, 10).max() == 1.0


def test_count_kept_truncates():
    assert core.count_kept(
        torch.tensor([576, 10, 3]), torch.tensor([0.25, 0.99, 0.5], dtype=torch.float64)
    ).tolist() == [144, 9, 1]
    assert int(core.count_kept(576, 0.1)) == int(576 * 0.1)


def test_global_crop_scores_no_padding_is_interpolate_and_split():
    thumb = torch.rand(16)
    valid = torch.ones(4, 16, dtype=torch.bool)  # 2x2 crops of 4x4, no padding
    g = core.global_crop_scores(thumb, valid, (2, 2), 4)
    up = F.interpolate(thumb.view(1, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(g, core.grid_to_crops(up, (2, 2), 4))


def test_global_crop_scores_padded_rows_map_onto_unpadded_area():
    thumb = torch.rand(16)
    valid = core.box_mask((2, 6, 0, 8), (2, 2), 4)  # middle 4 rows of 8 valid
    g = core.global_crop_scores(thumb, valid, (2, 2), 4)
    up = F.interpolate(thumb.view(1, 1, 4, 4), size=(4, 8), mode="bilinear", align_corners=False)[0, 0]
    grid = core.crops_to_grid(g, (2, 2), 4)
    assert torch.equal(grid[2:6], up)
    assert (grid[:2] == 0).all() and (grid[6:] == 0).all()


def test_keep_top_per_row():
    valid = torch.tensor([[True, True, False, True], [False, True, True, True]])
    scores = [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([3.0, 1.0, 2.0])]
    keep = core.keep_top_per_row(scores, valid, torch.tensor([2, 1]))
    assert keep.tolist() == [[False, True, False, True], [False, True, False, False]]


def test_assemble_order_spatial_and_authors_slots():
    # one row of two 2x2 crops; crop 0 fully valid, crop 1 only its right column valid
    side, grid = 2, (1, 2)
    valid = torch.tensor([[True, True, True, True], [False, True, False, True]])
    crop_keep = torch.tensor([[True, False, False, True], [False, False, False, True]])
    thumb = torch.tensor([3, 0])
    N, nl = 4, 3 * 4
    spatial = core.assemble_order(thumb, crop_keep, valid, grid, side, "spatial")
    # rows of the 2x4 grid: [c0p0 c0p1 c1p0 c1p1 | nl], [c0p2 c0p3 c1p2 c1p3 | nl]
    assert spatial.tolist() == [3, 0, N + 0, nl, N + 3, 2 * N + 3, nl]
    authors = core.assemble_order(thumb, crop_keep, valid, grid, side, "authors")
    # crop 1's kept token p3 is its 2nd valid token -> written to slot 1 (first row)
    assert authors.tolist() == [3, 0, N + 0, 2 * N + 3, nl, N + 3, nl]
    with pytest.raises(ValueError, match="layout"):
        core.assemble_order(thumb, crop_keep, valid, grid, side, "diagonal")


def test_cls_attention_matches_full_attention_row():
    torch.manual_seed(0)
    v, n, d, h = 3, 9, 16, 4
    q = torch.randn(v, 1 + n, d)
    k = torch.randn(v, 1 + n, d)
    scale = (d // h) ** -0.5
    qh = (q * scale).view(v, 1 + n, h, d // h).transpose(1, 2)
    kh = k.view(v, 1 + n, h, d // h).transpose(1, 2)
    full = qh @ kh.transpose(-1, -2)  # (v, h, 1+n, 1+n)
    logits = core.cls_attention(q[:, 0] * scale, k, h, "logits")
    assert torch.allclose(logits, full.mean(1)[:, 0, 1:], atol=1e-6)
    probs = core.cls_attention(q[:, 0] * scale, k, h, "softmax")
    assert torch.allclose(probs, full.softmax(-1).mean(1)[:, 0, 1:], atol=1e-6)
