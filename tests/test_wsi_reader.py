"""wsi.reader: slide geometry, regions, thumbnails, level choice, plain images, bad files."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from lpdseg.errors import DataError
from lpdseg.wsi import open_image


def test_pyramidal_tiff_geometry_and_levels(wsi_pyramid):
    s = wsi_pyramid
    w0, h0, img = s.width, s.height, s.rgb
    with open_image(s.path) as r:
        assert type(r).__name__ == "OpenSlideReader"
        assert r.dimensions == (w0, h0)
        assert r.level_count == 3
        assert r.level_dimensions == tuple((w0 // d, h0 // d) for d in s.downsamples)
        assert r.level_downsamples == pytest.approx(s.downsamples)
        assert r.mpp == pytest.approx((s.mpp, s.mpp))
        assert r.level_mpp(2) == pytest.approx(s.mpp * 16)

        region0 = r.read_region((512, 256), 0, (1024, 768))
        assert region0.shape == (768, 1024, 3) and region0.dtype == np.uint8
        np.testing.assert_array_equal(region0, img[256:1024, 512:1536])
        region1 = r.read_region((512, 256), 1, (256, 192))  # same area at level 1
        resized = cv2.resize(region0, (256, 192), interpolation=cv2.INTER_AREA)
        assert np.abs(region1.astype(int) - resized.astype(int)).mean() < 1.0

        # Outside the slide is white (transparent composited on white).
        assert (r.read_region((w0 - 10, h0 - 10), 0, (40, 40))[20:, 20:] == 255).all()

        thumb = r.thumbnail(256)
        assert thumb.shape == (192, 256, 3)
        ref = cv2.resize(img, (256, 192), interpolation=cv2.INTER_AREA)
        assert np.abs(thumb.astype(int) - ref.astype(int)).mean() < 3.0


def test_best_level_for(wsi_pyramid):
    with open_image(wsi_pyramid.path) as r:
        assert r.best_level_for(target_mpp=0.5) == (0, 1.0)
        assert r.best_level_for(target_mpp=2.0) == (1, 1.0)
        level, extra = r.best_level_for(target_mpp=4.0)
        assert level == 1 and extra == pytest.approx(0.5)
        assert r.best_level_for(target_mpp=8.0) == (2, 1.0)
        assert r.best_level_for(target_mpp=100.0)[0] == 2
        assert r.best_level_for(downsample=16.0) == (2, 1.0)
        level, extra = r.best_level_for(downsample=6.0)
        assert level == 1 and extra == pytest.approx(4 / 6)
        with pytest.raises(ValueError, match="pass target_mpp .* or downsample"):
            r.best_level_for()
        with pytest.raises(ValueError, match="target_mpp must be > 0"):
            r.best_level_for(target_mpp=0.0)
        with pytest.raises(ValueError, match="downsample must be > 0"):
            r.best_level_for(downsample=-1.0)


def test_best_level_for_finer_than_level0_claims_no_upsampling(wsi_pyramid, caplog):
    """The reader returns level 0 and extra_scale > 1; what happens next is the caller's."""
    with (
        caplog.at_level(logging.DEBUG, logger="lpdseg.wsi.reader"),
        open_image(wsi_pyramid.path) as r,
    ):
        level, extra = r.best_level_for(target_mpp=0.01)
    assert level == 0 and extra == pytest.approx(50.0)
    assert "upsampled" not in caplog.text
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]


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


def test_bad_region_arguments(wsi_pyramid):
    with open_image(wsi_pyramid.path) as r:
        with pytest.raises(ValueError, match="region size must be positive"):
            r.read_region((0, 0), 0, (0, 10))
        with pytest.raises(ValueError, match="max_size must be >= 1"):
            r.thumbnail(0)


def test_real_svs_reading(cmu_svs):
    with open_image(cmu_svs) as r:
        assert r.dimensions == (2220, 2967)
        assert r.mpp is not None and 0.2 < r.mpp[0] < 1.0
        thumb = r.thumbnail(512)
        assert max(thumb.shape[:2]) == 512
