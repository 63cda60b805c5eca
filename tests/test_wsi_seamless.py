"""Seamless slide scoring: stitched raw maps decided on the canvas, glass per pixel, seam score."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lpdseg.data.synthetic import generate_patch
from lpdseg.inference import Predictor
from lpdseg.inference.sliding import TileGrid
from lpdseg.wsi import open_image
from lpdseg.wsi.pipeline import finish_canvas
from lpdseg.wsi.tiling import seam_score, stitch_slide, tile_border_zones

torch.set_num_threads(2)

SIDE, TILE, DS = 192, 64, 2


def _miou(pred: np.ndarray, gt: np.ndarray, n: int) -> float:
    ious = []
    for c in range(n):
        inter = np.sum((pred == c) & (gt == c))
        union = np.sum((pred == c) | (gt == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


@pytest.fixture(scope="module")
def predictor(tiny_run_dir) -> Predictor:
    return Predictor.from_checkpoint(tiny_run_dir / "best.pt", device="cpu")


def _write(path: Path, image: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def _seamless_map(predictor, path: Path, tile: int, tissue=None) -> np.ndarray:
    with open_image(path) as reader:
        canvas = stitch_slide(
            reader,
            0,
            predictor.slide_raw,
            predictor.slide_channels,
            tile=tile,
            overlap=0.25,
            output_downsample=DS,
            progress=False,
        )
    return finish_canvas(canvas, predictor, tissue).class_map()


def test_slide_matches_whole_image(predictor, tmp_path):
    patch = generate_patch(3, SIDE)
    path = _write(tmp_path / "synthetic.png", patch.image)
    tiled = _seamless_map(predictor, path, TILE)
    whole = _seamless_map(predictor, path, SIDE)  # one tile: the whole image at once
    gt = patch.mask[DS // 2 :: DS, DS // 2 :: DS]
    assert tiled.shape == whole.shape == gt.shape
    n = predictor.num_labels
    assert abs(_miou(tiled, gt, n) - _miou(whole, gt, n)) <= 0.01
    assert (tiled == whole).mean() >= 0.9
    grid = TileGrid.from_overlap((SIDE, SIDE), TILE, 0.25)
    zy = [(a / DS, b / DS) for a, b in tile_border_zones([o[0] for o in grid.origins], TILE, SIDE)]
    zx = [(a / DS, b / DS) for a, b in tile_border_zones([o[1] for o in grid.origins], TILE, SIDE)]
    assert seam_score(tiled, zy, zx) <= 1.5


def test_glass_inside_tissue_is_background(predictor, tmp_path):
    patch = generate_patch(5, SIDE, background=False)
    image = patch.image.copy()
    image[60:120, 70:130] = 240  # a white hole in the tissue
    path = _write(tmp_path / "hole.png", image)
    labels = _seamless_map(predictor, path, TILE)
    bg = predictor.num_labels - 1
    hole = labels[62 // DS : 118 // DS, 72 // DS : 128 // DS]
    assert (hole == bg).all()
    # the tissue mask applies per pixel too: its holes are background
    tissue = np.ones((SIDE // 4, SIDE // 4), bool)
    tissue[: SIDE // 8, : SIDE // 8] = False
    masked = _seamless_map(predictor, path, TILE, tissue)
    assert (masked[: SIDE // 2 // DS - 1, : SIDE // 2 // DS - 1] == bg).all()


def test_seam_score_hand_made_maps():
    h = w = 120
    zones = [(40.0, 40.0), (80.0, 80.0)]
    # two classes split exactly along the tile border x = 40 and y = 80: all changes on borders
    seam = np.zeros((h, w), np.uint8)
    seam[:, 40:] = 1
    seam[80:, :] = 2
    assert seam_score(seam, zones, zones) == float("inf")
    # the same, plus an equal length of boundary elsewhere: high but finite
    seam[:, 100:] = 3
    assert seam_score(seam, zones, zones) > 5
    # a smooth map whose boundaries do not follow the grid (a circle, a diagonal): ~1
    yy, xx = np.mgrid[:h, :w]
    smooth = ((yy - 57) ** 2 + (xx - 63) ** 2 < 35**2).astype(np.uint8)
    smooth[yy + xx > 190] = 2
    score = seam_score(smooth, zones, zones)
    assert 0.5 <= score <= 1.5
    assert seam_score(np.zeros((h, w), np.uint8), zones, zones) == 1.0


def test_border_zones_are_tile_overlaps():
    assert tile_border_zones([0, 48, 96], 64, 160) == [(56.0, 56.0), (104.0, 104.0)]
    assert tile_border_zones([0, 64], 64, 128) == [(64.0, 64.0)]


def test_extremes_over_valid_pixels_match_a_per_channel_reference():
    from lpdseg.models.decode import _extremes

    g = torch.Generator().manual_seed(1)
    maps = torch.randn(5, 13, 17, generator=g)
    for valid in (torch.rand(13, 17, generator=g) > 0.7, torch.ones(13, 17, dtype=torch.bool)):
        lo, hi = _extremes(maps, valid)
        for c in range(5):
            vals = [float(maps[c, y, x]) for y in range(13) for x in range(17) if valid[y, x]]
            assert float(lo[c]) == min(vals) and float(hi[c]) == max(vals)
    lo, hi = _extremes(maps, torch.zeros(13, 17, dtype=torch.bool))
    assert torch.isinf(lo).all() and (lo > 0).all() and torch.isinf(hi).all() and (hi < 0).all()
