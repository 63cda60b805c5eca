"""wsi.tiling: tissue tiles, bounded-memory slide stitching, rank splits and canvas files."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from lpdseg.errors import DataError
from lpdseg.inference.sliding import TileGrid, sliding_window_predict
from lpdseg.wsi import (
    SlideCanvas,
    detect_tissue,
    merge_partial,
    open_image,
    select_tissue_tiles,
    stitch_slide,
)

torch.set_num_threads(1)


def dark_is_class0(x: torch.Tensor) -> torch.Tensor:
    """Identity-like model: class 0 where the pixel is dark, background otherwise."""
    t = (x.mean(1, keepdim=True) < 0.75).float()
    return torch.cat([t, 1.0 - t], 1)


# ---------------------------------------------------------------- tissue tiles
def test_select_tissue_tiles():
    grid = TileGrid.from_overlap((1000, 1200), 200, 0.0)
    mask = np.zeros((100, 120), bool)  # mask at 1/10 of the working level
    mask[:, :30] = True  # tissue in the left quarter (x < 300)
    chosen = select_tissue_tiles(grid, mask, 0.1, min_fraction=0.2)
    assert chosen and all(x < 300 for _, x in chosen)
    assert {x for _, x in chosen} == {0, 200}  # x=200 tile is half tissue
    assert select_tissue_tiles(grid, mask, 0.1, min_fraction=0.6) == [
        o for o in grid.origins if o[1] == 0
    ]
    assert select_tissue_tiles(grid, np.zeros_like(mask), 0.1, min_fraction=0.0) == []
    with pytest.raises(ValueError, match="scale .* must be > 0"):
        select_tissue_tiles(grid, mask, 0.0)


# ---------------------------------------------------------------- stitching
def test_stitch_slide_expected_map_and_tissue_skipping(wsi_pyramid):
    ds = 4
    with open_image(wsi_pyramid.path) as r:
        level_img = r.read_region((0, 0), 1, r.level_dimensions[1])
        canvas = stitch_slide(
            r,
            1,
            dark_is_class0,
            2,
            tile=96,
            overlap=0.25,
            batch_size=8,
            output_downsample=ds,
            progress=False,
        )
        thumb = r.thumbnail(256)
        masked = stitch_slide(
            r,
            1,
            dark_is_class0,
            2,
            tile=96,
            overlap=0.25,
            batch_size=8,
            tissue_mask=detect_tissue(thumb),
            output_downsample=ds,
            progress=False,
        )
    h1, w1 = level_img.shape[:2]
    assert canvas.shape_hw == (math.ceil(h1 / ds), math.ceil(w1 / ds))
    assert canvas.downsample_to_level0 == pytest.approx(16.0)
    dark = (level_img.mean(2) / 255 < 0.75).astype(np.float64)
    frac = dark.reshape(h1 // ds, ds, w1 // ds, ds).mean((1, 3))
    cmap = canvas.class_map()
    assert cmap.dtype == np.uint8
    assert (cmap[frac == 1.0] == 0).all() and (cmap[frac == 0.0] == 1).all()
    assert (cmap == np.where(frac > 0.5, 0, 1)).mean() > 0.98
    scores = canvas.scores()
    assert np.allclose(scores.sum(0), 1.0, atol=1e-5)

    # With a tissue mask, fewer tiles run; glass far from tissue is background.
    assert 0 < masked.tiles < canvas.tiles
    assert not masked.covered.all()
    assert (masked.class_map()[~masked.covered] == 1).all()
    truth_small = (
        cv2.resize(
            wsi_pyramid.truth.astype(np.uint8), cmap.shape[::-1], interpolation=cv2.INTER_AREA
        )
        > 0.5
    )
    assert (masked.class_map()[truth_small] == 0).mean() > 0.97


def test_stitched_canvas_is_the_pooled_sliding_window(wsi_pyramid):
    """stitch_slide and sliding_window_predict share one path: same blend, pooled."""
    ds = 4
    with open_image(wsi_pyramid.path) as r:
        full = sliding_window_predict(
            r, dark_is_class0, 2, tile=64, overlap=0.25, progress=False, level=2
        )
        canvas = stitch_slide(
            r, 2, dark_is_class0, 2, tile=64, overlap=0.25, output_downsample=ds, progress=False
        )
    _, h, w = full.shape
    pooled = full.numpy().reshape(2, h // ds, ds, w // ds, ds).mean((2, 4))
    # The canvas weights each pixel by its blend weight inside a cell, so compare class maps.
    assert (canvas.class_map() == pooled.argmax(0)).mean() > 0.98


def test_rank_split_merges_to_single_process_result(wsi_pyramid, tmp_path):
    kw = {"tile": 64, "overlap": 0.3, "output_downsample": 3, "progress": False}
    with open_image(wsi_pyramid.path) as r:
        single = stitch_slide(r, 1, dark_is_class0, 2, batch_size=8, **kw)
        parts = [
            stitch_slide(
                r, 1, dark_is_class0, 2, batch_size=3 + rank, rank=rank, world_size=3, **kw
            )
            for rank in range(3)
        ]
    assert sum(p.tiles for p in parts) == single.tiles
    for i, p in enumerate(parts):  # through files, as separate processes would
        p.save(tmp_path / f"rank{i}.npz")
    merged = merge_partial([SlideCanvas.load(tmp_path / f"rank{i}.npz") for i in range(3)])
    np.testing.assert_array_equal(merged.score_sum, single.score_sum)
    np.testing.assert_array_equal(merged.weight_sum, single.weight_sum)
    np.testing.assert_array_equal(merged.class_map(), single.class_map())
    assert merged.tiles == single.tiles
    with open_image(wsi_pyramid.path) as r:  # reading ahead in threads changes nothing
        threaded = stitch_slide(r, 1, dark_is_class0, 2, batch_size=5, read_workers=2, **kw)
    np.testing.assert_array_equal(threaded.score_sum, single.score_sum)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=3\), got 3"):
        stitch_slide(None, 1, dark_is_class0, 2, rank=3, world_size=3)  # type: ignore[arg-type]


def test_rank_canvas_files_added_band_by_band_equal_one_process(wsi_pyramid, tmp_path, monkeypatch):
    """Under torchrun each rank's canvas is on disk; rank 0 adds the others' files in bands."""
    from lpdseg.wsi import pipeline
    from lpdseg.wsi.storage import DiskArrays

    kw = {"tile": 64, "overlap": 0.3, "output_downsample": 3, "progress": False}
    monkeypatch.setattr(pipeline, "MERGE_BAND_BYTES", 1)  # one row per band: many bands
    with (
        open_image(wsi_pyramid.path) as r,
        DiskArrays(tmp_path) as own,
        DiskArrays(tmp_path) as other,
    ):
        single = stitch_slide(r, 1, dark_is_class0, 2, batch_size=8, **kw)
        rank0 = stitch_slide(r, 1, dark_is_class0, 2, rank=0, world_size=2, storage=own, **kw)
        rank1 = stitch_slide(r, 1, dark_is_class0, 2, rank=1, world_size=2, storage=other, **kw)
        other.flush()
        assert rank1.score_sum.any() and rank0.tiles and rank1.tiles
        pipeline._add_canvas_files(rank0, other.folder, own)
        np.testing.assert_array_equal(rank0.score_sum, single.score_sum)
        np.testing.assert_array_equal(rank0.weight_sum, single.weight_sum)
        missing = tmp_path / "nowhere"
        with pytest.raises(ValueError, match="every rank must see the output folder"):
            pipeline._add_canvas_files(rank0, missing, own)


def test_stitch_and_merge_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="output_downsample must be an integer >= 1"):
        stitch_slide(None, 0, dark_is_class0, 2, output_downsample=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        stitch_slide(None, 0, dark_is_class0, 2, batch_size=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one canvas"):
        merge_partial([])
    a = SlideCanvas(np.zeros((2, 4, 4), np.int64), np.zeros((4, 4), np.int64), 0, 1.0, 2)
    b = SlideCanvas(np.zeros((2, 5, 4), np.int64), np.zeros((5, 4), np.int64), 0, 1.0, 2)
    with pytest.raises(ValueError, match="canvases do not match"):
        merge_partial([a, b])
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a canvas")
    with pytest.raises(DataError, match="junk.npz is not a slide canvas"):
        SlideCanvas.load(junk)


def test_real_svs_stitching(cmu_svs):
    with open_image(cmu_svs) as r:
        mask = detect_tissue(r.thumbnail(512))

        def dark_is_tissue(x: torch.Tensor) -> torch.Tensor:
            t = (x.mean(1, keepdim=True) < 0.8).float()
            return torch.cat([t, 1 - t], 1)

        canvas = stitch_slide(
            r,
            0,
            dark_is_tissue,
            2,
            tile=512,
            overlap=0.125,
            batch_size=4,
            tissue_mask=mask,
            output_downsample=32,
            progress=False,
        )
    cmap = canvas.class_map()
    assert cmap.shape == (math.ceil(2967 / 32), math.ceil(2220 / 32))
    small = cv2.resize(
        mask.astype(np.uint8), cmap.shape[::-1], interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    agree = ((cmap == 0) == small).mean()
    assert agree > 0.85
