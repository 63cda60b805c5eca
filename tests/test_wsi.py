"""Whole-slide machinery: reading, tissue detection, tiling/blending/stitching, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import tifffile
import torch
from PIL import Image
from shapely.geometry import shape

from lpdseg.errors import DataError
from lpdseg.wsi import (
    SlideCanvas,
    TileGrid,
    add_legend,
    area_table,
    blend_window,
    detect_tissue,
    grid_for,
    mask_to_polygons,
    merge_partial,
    open_image,
    overlay,
    pixel_area_um2,
    read_geojson_to_mask,
    select_tissue_tiles,
    sliding_window_predict,
    stitch_slide,
    write_area_csv,
    write_area_json,
    write_geojson,
)

torch.set_num_threads(1)

CMU_SVS = Path(__file__).resolve().parents[1].parent / "shared/data/slides/cmu_small_region.svs"
W0, H0 = 2048, 1536
MPP = 0.5
DOWNSAMPLES = (1, 4, 16)
TISSUE_RGB = (150, 60, 140)


# ---------------------------------------------------------------- fixtures
def synthetic_slide_rgb() -> tuple[np.ndarray, np.ndarray]:
    """Level-0 RGB (tissue-like blobs on white glass) and its tissue truth."""
    rng = np.random.default_rng(0)
    truth = np.zeros((H0, W0), np.uint8)
    cv2.ellipse(truth, (600, 520), (380, 300), 20, 0, 360, 1, -1)
    cv2.ellipse(truth, (1500, 1000), (350, 260), -30, 0, 360, 1, -1)
    cv2.circle(truth, (1600, 300), 120, 1, -1)
    img = np.full((H0, W0, 3), 245, np.uint8)
    noise = rng.integers(-20, 21, size=(H0, W0, 1))
    tissue = np.clip(np.array(TISSUE_RGB)[None, None] + noise, 0, 255).astype(np.uint8)
    img[truth > 0] = tissue[truth > 0]
    return img, truth.astype(bool)


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A tiled pyramidal TIFF (levels 1, 4, 16 as successive pages) that OpenSlide reads."""
    img, truth = synthetic_slide_rgb()
    path = tmp_path_factory.mktemp("slide") / "synthetic.tif"
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate(DOWNSAMPLES):
            level = (
                img
                if ds == 1
                else cv2.resize(img, (W0 // ds, H0 // ds), interpolation=cv2.INTER_AREA)
            )
            res = 1e4 / (MPP * ds)  # pixels per centimetre
            tw.write(
                level,
                tile=(128, 128),
                photometric="rgb",
                compression="zlib",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )
    return path, img, truth


# ---------------------------------------------------------------- reader
def test_pyramidal_tiff_geometry_and_levels(pyramid_tiff):
    path, img, _ = pyramid_tiff
    with open_image(path) as r:
        assert type(r).__name__ == "OpenSlideReader"
        assert r.dimensions == (W0, H0)
        assert r.level_count == 3
        assert r.level_dimensions == tuple((W0 // d, H0 // d) for d in DOWNSAMPLES)
        assert r.level_downsamples == pytest.approx(DOWNSAMPLES)
        assert r.mpp == pytest.approx((MPP, MPP))
        assert r.level_mpp(2) == pytest.approx(MPP * 16)

        region0 = r.read_region((512, 256), 0, (1024, 768))
        assert region0.shape == (768, 1024, 3) and region0.dtype == np.uint8
        np.testing.assert_array_equal(region0, img[256:1024, 512:1536])
        region1 = r.read_region((512, 256), 1, (256, 192))  # same area at level 1
        resized = cv2.resize(region0, (256, 192), interpolation=cv2.INTER_AREA)
        assert np.abs(region1.astype(int) - resized.astype(int)).mean() < 1.0

        # Outside the slide is white (transparent composited on white).
        assert (r.read_region((W0 - 10, H0 - 10), 0, (40, 40))[20:, 20:] == 255).all()

        thumb = r.thumbnail(256)
        assert thumb.shape == (192, 256, 3)
        ref = cv2.resize(img, (256, 192), interpolation=cv2.INTER_AREA)
        assert np.abs(thumb.astype(int) - ref.astype(int)).mean() < 3.0


def test_best_level_for(pyramid_tiff):
    path, _, _ = pyramid_tiff
    with open_image(path) as r:
        assert r.best_level_for(target_mpp=0.5) == (0, 1.0)
        assert r.best_level_for(target_mpp=2.0) == (1, 1.0)
        level, extra = r.best_level_for(target_mpp=4.0)
        assert level == 1 and extra == pytest.approx(0.5)
        assert r.best_level_for(target_mpp=8.0) == (2, 1.0)
        assert r.best_level_for(target_mpp=100.0)[0] == 2
        assert r.best_level_for(downsample=16.0) == (2, 1.0)
        level, extra = r.best_level_for(downsample=6.0)
        assert level == 1 and extra == pytest.approx(4 / 6)
        with pytest.raises(ValueError):
            r.best_level_for()


def test_plain_png_reader_alpha_mpp_and_no_mpp_error(tmp_path):
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:30, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    path = tmp_path / "patch.png"
    Image.fromarray(rgba).save(path, dpi=(25400 / 0.25, 25400 / 0.25))
    with open_image(path) as r:
        assert type(r).__name__ == "PlainImageReader"
        assert r.dimensions == (80, 60) and r.level_count == 1
        assert r.mpp == pytest.approx((0.25, 0.25), rel=1e-3)
        px = r.read_region((0, 0), 0, (80, 60))
        assert tuple(px[0, 0]) == (200, 0, 0)
        assert tuple(px[-1, -1]) == (255, 255, 255)
        assert r.best_level_for(target_mpp=1.0) == (0, pytest.approx(0.25))

    plain = tmp_path / "nodpi.png"
    Image.fromarray(rgba[..., :3]).save(plain)
    with open_image(plain) as r:
        assert r.mpp is None
        assert r.best_level_for(target_mpp=1.0, downsample=2.0) == (0, 0.5)
        with pytest.raises(DataError, match="nodpi.png"):
            r.best_level_for(target_mpp=1.0)


def test_plain_strip_tiff_with_resolution(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "strip.tif"
    tifffile.imwrite(
        path, img, photometric="rgb", resolution=(1e4, 1e4), resolutionunit="CENTIMETER"
    )
    with open_image(path) as r:
        assert r.dimensions == (70, 50)
        assert r.mpp == pytest.approx((1.0, 1.0))
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (70, 50)), img)


def test_bad_files_raise_data_error_naming_the_file(tmp_path):
    fake = tmp_path / "fake_slide.svs"
    fake.write_text("this is not a slide\n")
    with pytest.raises(DataError, match="fake_slide.svs") as err:
        open_image(fake)
    assert ".svs" in str(err.value) and ".png" in str(err.value)  # lists supported formats

    good = tmp_path / "good.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.png"):
        open_image(truncated)

    with pytest.raises(DataError, match="missing.tif"):
        open_image(tmp_path / "missing.tif")
    odd = tmp_path / "notes.xyz"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="notes.xyz"):
        open_image(odd)


@pytest.mark.skipif(not CMU_SVS.is_file(), reason=f"shared slide not available at {CMU_SVS}")
def test_real_svs_reading_tissue_and_stitching():
    with open_image(CMU_SVS) as r:
        assert r.dimensions == (2220, 2967)
        assert r.mpp is not None and 0.2 < r.mpp[0] < 1.0
        thumb = r.thumbnail(512)
        assert max(thumb.shape[:2]) == 512
        mask = detect_tissue(thumb)
        assert 0.15 < mask.mean() < 0.7  # a strip of skin on glass

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


# ---------------------------------------------------------------- tissue
def test_detect_tissue_blobs_specks_and_holes():
    rng = np.random.default_rng(3)
    h, w = 400, 500
    truth = np.zeros((h, w), np.uint8)
    cv2.ellipse(truth, (150, 200), (110, 140), 0, 0, 360, 1, -1)
    cv2.circle(truth, (370, 150), 80, 1, -1)
    lumen = np.zeros_like(truth)
    cv2.circle(lumen, (150, 200), 40, 1, -1)  # large hole: stays a hole
    truth &= 1 - lumen
    img = np.clip(242 + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)  # glass
    tissue_col = np.clip(np.array([170, 80, 150]) + rng.normal(0, 18, (h, w, 3)), 0, 255)
    img[truth > 0] = tissue_col.astype(np.uint8)[truth > 0]
    # A small hole inside tissue (should be filled) and specks on glass (removed).
    img[144:156, 364:376] = 240
    for y, x in [(30, 30), (380, 480), (50, 450), (370, 40)]:
        img[y : y + 2, x : x + 2] = (120, 40, 120)

    mask = detect_tissue(img)
    t = truth.astype(bool)
    iou = (mask & t).sum() / (mask | t).sum()
    assert iou > 0.9
    assert mask[144:156, 364:376].all()  # small hole filled
    for y, x in [(30, 30), (380, 480), (50, 450), (370, 40)]:
        assert not mask[y : y + 2, x : x + 2].any()  # specks removed
    assert not mask[190:210, 140:160].any()  # the large lumen is kept open
    blank = np.clip(245 + rng.normal(0, 2, (100, 100, 3)), 0, 255).astype(np.uint8)
    assert detect_tissue(blank).mean() < 0.01  # white glass only: no tissue


# ---------------------------------------------------------------- grid
@pytest.mark.parametrize("shape_hw", [(1000, 1000), (225, 224), (100, 50), (500, 333), (224, 900)])
def test_grid_covers_every_pixel_and_last_tile_is_flush(shape_hw):
    tile = 224
    grid = TileGrid.from_overlap(shape_hw, tile, 0.25)
    origins = grid_for(shape_hw, tile, 0.25)
    assert origins == grid.origins and len(grid) == len(origins)
    hp, wp = grid.padded_hw
    cover = np.zeros((hp, wp), int)
    for y, x in origins:
        assert 0 <= y and 0 <= x and y + tile <= hp and x + tile <= wp
        cover[y : y + tile, x : x + tile] += 1
    assert (cover[: shape_hw[0], : shape_hw[1]] >= 1).all()
    assert max(y for y, _ in origins) + tile == hp
    assert max(x for _, x in origins) + tile == wp


def test_tile_grid_validation():
    with pytest.raises(ValueError):
        TileGrid((100, 100), 64, 65)  # stride > tile leaves gaps
    with pytest.raises(ValueError):
        TileGrid((0, 100), 64, 32)
    with pytest.raises(ValueError):
        TileGrid.from_overlap((100, 100), 64, 1.0)


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


# ---------------------------------------------------------------- sliding window
PERIOD = 700.0


def encode_position(h: int, w: int) -> np.ndarray:
    """An image whose pixels spell their own (y, x): R/G = coarse x/y, B = fine bits."""
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs // 8, ys // 8, (xs % 8) * 16 + (ys % 8) * 2], -1)
    return img.astype(np.uint8)


def decode_position(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.round(x * 255.0)
    fine = v[:, 2]
    gx = v[:, 0] * 8 + torch.div(fine, 16, rounding_mode="floor")
    gy = v[:, 1] * 8 + torch.div(torch.remainder(fine, 16), 2, rounding_mode="floor")
    return gy, gx


def smooth_fn(x: torch.Tensor) -> torch.Tensor:
    gy, gx = decode_position(x)
    a = torch.sin(2 * math.pi * gx / PERIOD)
    b = torch.cos(2 * math.pi * gy / PERIOD)
    return torch.stack([a, b, a * b], 1)


def border_and_interior_jumps(scores: torch.Tensor, borders: set[int]) -> tuple[float, float]:
    """Max |difference between neighbouring columns| across tile borders and elsewhere."""
    diff = (scores[..., 1:] - scores[..., :-1]).abs().amax(dim=(0, 1))  # per column pair
    at = torch.tensor(sorted(b - 1 for b in borders if 0 < b < scores.shape[-1]))
    mask = torch.zeros(diff.shape[0], dtype=torch.bool)
    mask[at] = True
    return float(diff[mask].max()), float(diff[~mask].max())


def test_sliding_window_reproduces_full_image_without_seams():
    img = encode_position(2000, 2000)
    full = smooth_fn(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0]
    out = sliding_window_predict(
        img, smooth_fn, 3, tile=224, overlap=0.25, batch_size=16, progress=False
    )
    assert out.shape == (3, 2000, 2000) and out.dtype == torch.float32
    assert float((out - full).abs().max()) < 1e-5
    borders = {x + b for _, x in grid_for((2000, 2000), 224, 0.25) for b in (0, 224)}
    across, elsewhere = border_and_interior_jumps(out, borders)
    assert across <= 1.05 * elsewhere


def test_blending_hides_per_tile_bias_seams():
    img = encode_position(900, 900)

    def biased_fn(x: torch.Tensor) -> torch.Tensor:
        gy, gx = decode_position(x)
        y0, x0 = gy[:, 0, 0], gx[:, 0, 0]  # the tile origin, from its top-left pixel
        bias = torch.remainder(x0 * 7 + y0 * 13, 10) / 10  # a different offset per tile
        base = torch.sin(2 * math.pi * gx / PERIOD)
        return torch.stack([base + bias[:, None, None], -base], 1)

    borders = {x + b for _, x in grid_for((900, 900), 128, 0.25) for b in (0, 128)}
    seams = {}
    for weight in ("cosine", "uniform"):
        out = sliding_window_predict(
            img, biased_fn, 2, tile=128, overlap=0.25, batch_size=32, weight=weight, progress=False
        )
        seams[weight], _ = border_and_interior_jumps(out[:1], borders)
    assert seams["uniform"] > 0.1  # plain averaging shows the tile bias as steps
    assert seams["cosine"] < 0.25 * seams["uniform"]


def test_sliding_window_small_image_and_output_resize():
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)

    def coarse_fn(x: torch.Tensor) -> torch.Tensor:  # a model with stride-4 output
        m = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)
        return torch.cat([m, 1 - m], 1)

    out = sliding_window_predict(img, coarse_fn, 2, tile=64, overlap=0.5, progress=False)
    assert out.shape == (2, 50, 70)
    assert torch.allclose(out.sum(0), torch.ones(50, 70), atol=1e-5)
    with pytest.raises(ValueError, match="num_labels"):
        sliding_window_predict(img, coarse_fn, 3, tile=64, progress=False)


def test_blend_window():
    w = blend_window(16)
    assert w.shape == (16, 16)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    assert float(w.min()) > 0 and float(w.max()) <= 1.0
    assert torch.equal(blend_window(8, "uniform"), torch.ones(8, 8))


# ---------------------------------------------------------------- stitching
def dark_is_class0(x: torch.Tensor) -> torch.Tensor:
    """Identity-like model: class 0 where the pixel is dark, background otherwise."""
    t = (x.mean(1, keepdim=True) < 0.75).float()
    return torch.cat([t, 1.0 - t], 1)


def test_stitch_slide_expected_map_and_tissue_skipping(pyramid_tiff):
    path, _, truth = pyramid_tiff
    ds = 4
    with open_image(path) as r:
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
        cv2.resize(truth.astype(np.uint8), cmap.shape[::-1], interpolation=cv2.INTER_AREA) > 0.5
    )
    assert (masked.class_map()[truth_small] == 0).mean() > 0.97


def test_rank_split_merges_to_single_process_result(pyramid_tiff, tmp_path):
    path, _, _ = pyramid_tiff
    kw = {"tile": 64, "overlap": 0.3, "output_downsample": 3, "progress": False}
    with open_image(path) as r:
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
    with open_image(path) as r:  # reading ahead in threads changes nothing
        threaded = stitch_slide(r, 1, dark_is_class0, 2, batch_size=5, read_workers=2, **kw)
    np.testing.assert_array_equal(threaded.score_sum, single.score_sum)
    with pytest.raises(ValueError):
        stitch_slide(None, 1, dark_is_class0, 2, rank=3, world_size=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- export
CLASS_NAMES = ["tumor", "stroma", "necrosis"]
COLORS = [(200, 0, 0), (0, 160, 0), (0, 0, 200)]


def label_map_with_hole() -> np.ndarray:
    m = np.full((120, 160), 3, np.uint8)
    m[10:70, 10:80] = 0
    m[30:50, 30:60] = 3  # a hole in the tumour region
    cv2.circle(m, (120, 60), 25, 1, -1)
    m[90:110, 20:24] = 2
    m[95:100, 90:140] = 2
    for k in range(8):  # a diagonal chain (8-connected)
        m[100 + k, 60 + k] = 1
    return m


def test_mask_to_polygons_keeps_holes_and_scales():
    m = label_map_with_hole()
    polys = mask_to_polygons(m, 0, scale_to_level0=16.0, offset=(100, 50))
    assert len(polys) == 1
    p = polys[0]
    assert p.is_valid and len(p.interiors) == 1
    assert p.bounds == pytest.approx((100 + 10 * 16, 50 + 10 * 16, 100 + 80 * 16, 50 + 70 * 16))
    assert p.area == pytest.approx((m == 0).sum() * 16**2)
    hole = shapely.Polygon(p.interiors[0])
    assert hole.area == pytest.approx(20 * 30 * 16**2)
    assert len(mask_to_polygons(m, 2, 1.0)) == 2  # 20 x 4 and 5 x 50 pixel bars
    assert [q.area for q in mask_to_polygons(m, 2, 1.0, min_area_px=100)] == [250.0]
    chain = mask_to_polygons(m, 1, 1.0)  # disk + 8-connected diagonal chain, all valid
    assert len(chain) == 2 and all(q.is_valid for q in chain)


def test_geojson_qupath_layout_and_round_trip(tmp_path):
    m = label_map_with_hole()
    rng = np.random.default_rng(5)
    noisy = m.copy()
    speck = rng.random(m.shape) < 0.01
    noisy[speck] = rng.integers(0, 4, speck.sum())
    for name, cmap in (("clean", m), ("noisy", noisy)):
        path = tmp_path / f"{name}.geojson"
        n = write_geojson(path, cmap, CLASS_NAMES, COLORS, scale_to_level0=8.0, offset=(64, 32))
        data = json.loads(path.read_text())
        assert data["type"] == "FeatureCollection" and len(data["features"]) == n > 0
        for f in data["features"]:
            assert f["type"] == "Feature"
            props = f["properties"]
            assert props["objectType"] == "annotation"
            cls = props["classification"]
            assert cls["name"] in CLASS_NAMES
            assert cls["color"] == list(COLORS[CLASS_NAMES.index(cls["name"])])
            geom = shape(f["geometry"])
            assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
            assert geom.is_valid
            x0, y0, x1, y1 = geom.bounds  # inside the map's extent in level-0 pixels
            assert x0 >= 64 and y0 >= 32
            assert x1 <= 64 + 8.0 * cmap.shape[1] and y1 <= 32 + 8.0 * cmap.shape[0]
        back = read_geojson_to_mask(
            path, cmap.shape, CLASS_NAMES, scale_to_level0=8.0, offset=(64, 32)
        )
        for c in range(4):
            n_c = max(int((cmap == c).sum()), 1)
            assert ((back == c) != (cmap == c)).sum() / n_c < 0.01, (name, c)
    tumour = [
        f
        for f in json.loads((tmp_path / "clean.geojson").read_text())["features"]
        if f["properties"]["classification"]["name"] == "tumor"
    ]
    assert len(tumour) == 1 and len(tumour[0]["geometry"]["coordinates"]) == 2  # shell + hole
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_read_geojson_errors_and_unknown_classes(tmp_path, caplog):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.geojson"):
        read_geojson_to_mask(bad, (10, 10), CLASS_NAMES, 1.0)
    other = tmp_path / "other.geojson"
    other.write_text(
        json.dumps(
            [
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 5], [0, 0]]],
                    },
                    "properties": {"objectType": "annotation", "classification": {"name": "Other"}},
                }
            ]
        )
    )
    out = read_geojson_to_mask(other, (10, 10), CLASS_NAMES, 1.0)
    assert (out == 3).all() and "Other" in caplog.text


def test_area_table_and_files(tmp_path):
    m = label_map_with_hole()
    mpp, ds = 0.25, 16.0
    pa = pixel_area_um2((mpp, mpp), ds)
    assert pa == pytest.approx(mpp**2 * ds**2)
    rows = area_table(m, CLASS_NAMES, pa)
    counts = np.bincount(m.ravel(), minlength=4)
    assert [r["pixels"] for r in rows] == counts[:3].tolist()
    assert sum(r["pixels"] for r in rows) == int((m < 3).sum())
    assert sum(r["fraction_of_tissue"] for r in rows) == pytest.approx(1.0)
    for r in rows:
        assert r["area_um2"] == pytest.approx(r["pixels"] * mpp**2 * ds**2)
    full = area_table(m, CLASS_NAMES, None, tissue_only=False)
    assert full[-1]["class"] == "background" and full[-1]["pixels"] == int(counts[3])
    assert all(r["area_um2"] is None for r in full)
    assert pixel_area_um2(None, 4.0) is None

    write_area_csv(tmp_path / "a.csv", rows)
    write_area_json(tmp_path / "a.json", full)
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "class,class_id,pixels,fraction_of_tissue,area_um2" and len(lines) == 4
    assert json.loads((tmp_path / "a.json").read_text())[-1]["area_um2"] is None


def test_overlay_and_legend():
    m = label_map_with_hole()
    img = np.full((*m.shape, 3), 100, np.uint8)
    out = overlay(img, m, COLORS, alpha=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[m == 3] == 100).all()  # background: no colour given, unchanged
    assert tuple(out[15, 15]) == (150, 50, 50)  # tumour: halfway to (200, 0, 0)
    small = overlay(np.full((60, 80, 3), 100, np.uint8), m, COLORS)  # map resized
    assert small.shape == (60, 80, 3)
    legend = add_legend(out, CLASS_NAMES + ["background"], COLORS + [(255, 255, 255)])
    assert legend.shape[0] > out.shape[0] and legend.shape[1] == out.shape[1]
    np.testing.assert_array_equal(legend[: out.shape[0]], out)
    assert (legend[out.shape[0] :] < 255).any()  # something was drawn
