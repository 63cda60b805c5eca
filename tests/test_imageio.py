"""lpdseg.imageio: the one image decoder (16-bit rule, palette, alpha, EXIF, limits, errors)."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from lpdseg import imageio
from lpdseg.data import datasets
from lpdseg.imageio import (
    IMAGE_SUFFIXES,
    MAX_PIXELS_ENV,
    MIN_IMAGE_SIDE,
    composite_on_white,
    image_header_size,
    read_image,
    read_image_with_dpi,
    read_mask,
    uint16_to_uint8,
)
from lpdseg.wsi import open_image

ORIENTATION = 0x0112


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG signature and IHDR chunk (8-bit RGB), no pixel data: tiny, claims a huge size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr))
    return path


# ---------------------------------------------------------------- one decoder
def test_datasets_reexports_the_one_decoder():
    assert datasets.read_image is imageio.read_image
    assert datasets.read_mask is imageio.read_mask
    assert datasets.IMAGE_SUFFIXES is IMAGE_SUFFIXES


# ---------------------------------------------------------------- 16 bits
def test_16bit_rule_is_round_v_over_257():
    v = np.arange(65536, dtype=np.uint16)
    out = uint16_to_uint8(v)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.round(v / 257.0).astype(np.uint8))
    assert uint16_to_uint8(np.array([65535, 257, 128, 129, 0])).tolist() == [255, 1, 0, 1, 0]
    np.testing.assert_array_equal(uint16_to_uint8(np.arange(256) * 257), np.arange(256))


VALUES16 = [65535, 257, 128, 386]  # -> 255, 1, 0, 2 (round(386 / 257) = round(1.502))
EXPECTED8 = [255, 1, 0, 2]


def test_16bit_gray_png_and_tiff(tmp_path):
    gray = np.tile(np.array(VALUES16, np.uint16), (8, 2))
    png = tmp_path / "g16.png"
    Image.fromarray(gray).save(png)
    assert Image.open(png).mode.startswith("I;16")
    tif = tmp_path / "g16.tif"
    tifffile.imwrite(tif, gray)
    for path in (png, tif):
        out = read_image(path)
        assert out.shape == (8, 8, 3)
        assert out[0, :4, 0].tolist() == EXPECTED8, path
        assert (out[..., 0] == out[..., 2]).all()


def test_16bit_colour_png_and_tiff_use_the_same_rule(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[0, :4, 0] = VALUES16  # red
    rgb[0, :4, 1] = VALUES16[::-1]  # green
    png = tmp_path / "c16.png"
    cv2.imwrite(str(png), rgb[..., ::-1])  # OpenCV writes BGR
    tif = tmp_path / "c16.tif"
    tifffile.imwrite(tif, rgb, photometric="rgb")
    for path in (png, tif):
        out = read_image(path)
        assert out[0, :4, 0].tolist() == EXPECTED8, path
        assert out[0, :4, 1].tolist() == EXPECTED8[::-1], path
        assert out[0, :4, 2].tolist() == [0, 0, 0, 0]
        # the slide reader's plain backend (PIL / tifffile) gives the same pixels
        with open_image(path) as r:
            np.testing.assert_array_equal(r.read_region((0, 0), 0, (8, 8)), out)


def test_16bit_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint16)
    rgba[..., 0] = 386
    rgba[..., 3] = 65535
    rgba[0, 0, 3] = 0
    path = tmp_path / "c16a.png"
    cv2.imwrite(str(path), rgba[..., [2, 1, 0, 3]])
    out = read_image(path)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [2, 0, 0]


# ---------------------------------------------------------------- palette, alpha
def test_palette_and_transparent_palette(tmp_path):
    idx = np.tile(np.array([[0, 1], [1, 0]], np.uint8), (4, 4))
    pal = Image.fromarray(idx, "L").convert("P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    out = read_image(tmp_path / "pal.png")
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 50]
    pal.save(tmp_path / "pal_t.png", transparency=1)  # index 1 transparent
    out = read_image(tmp_path / "pal_t.png")
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]
    # as a mask, a palette PNG gives its indices
    assert np.array_equal(read_mask(tmp_path / "pal.png", 3), idx)


def test_rgba_and_gray_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 10, 50)
    rgba[..., 3] = 255
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 128
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [200, 10, 50]
    assert out[0, 1].tolist() == [round((c * 128 + 255 * 127) / 255) for c in (200, 10, 50)]
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out[0, 0].tolist() == [255] * 3 and out[1, 1].tolist() == [200] * 3
    # the rule itself: exact for alpha 0 and 255
    px = np.array([[[0, 100, 255, 0], [0, 100, 255, 255], [0, 100, 255, 51]]], np.uint8)
    assert composite_on_white(px).tolist() == [[[255, 255, 255], [0, 100, 255], [204, 224, 255]]]


# ---------------------------------------------------------------- EXIF orientation
def test_exif_rotated_jpeg_is_read_as_displayed(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)  # stored 64 wide, 32 tall
    stored[:16, :16] = (250, 0, 0)  # red block at the stored top-left
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, exif=_exif(6), quality=95)  # 6: rotate 90 cw to show
    assert Image.open(path).size == (64, 32)
    out = read_image(path)
    assert out.shape == (64, 32, 3)  # displayed: 32 wide, 64 tall
    # rotating 90 degrees clockwise moves the stored top-left corner to the top-right
    assert out[:16, 16:, 0].mean() > 200 and out[:16, :16, 0].mean() < 50
    np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(Image.open(path))))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=_exif(orientation))
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    np.testing.assert_array_equal(read_image(path), want)
    # masks too: the same turn, so image and mask stay aligned
    labels = (stored[..., 0] % 4).astype(np.uint8)
    mpath = tmp_path / f"m{orientation}.png"
    Image.fromarray(labels, "L").save(mpath, exif=_exif(orientation))
    want_mask = np.asarray(ImageOps.exif_transpose(Image.open(mpath)))
    np.testing.assert_array_equal(read_mask(mpath, 3), want_mask)
    assert read_mask(mpath, 3).shape == read_image(path).shape[:2]


def test_plain_slide_reader_applies_orientation_and_keeps_dpi(tmp_path):
    stored = np.zeros((16, 40, 3), np.uint8)
    path = tmp_path / "rot.png"
    Image.fromarray(stored).save(path, exif=_exif(8), dpi=(25400 / 0.5, 25400 / 0.5))
    rgb, dpi = read_image_with_dpi(path)
    assert rgb.shape == (40, 16, 3) and dpi == pytest.approx((50800, 50800), rel=1e-3)
    with open_image(path) as r:
        assert r.dimensions == (16, 40) and r.mpp == pytest.approx((0.5, 0.5), rel=1e-3)


# ---------------------------------------------------------------- limits
def test_bomb_header_png_raises_data_error_naming_the_file(tmp_path, raises_naming):
    path = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert path.stat().st_size < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        msg = raises_naming(lambda: read_image(path), "bomb.png", "20000x20000", MAX_PIXELS_ENV)
        raises_naming(lambda: read_mask(path, 3), "bomb.png", MAX_PIXELS_ENV)
        raises_naming(lambda: open_image(path), "bomb.png", MAX_PIXELS_ENV)
    assert "400,000,000" in msg and "decompression bomb" in msg


def test_bomb_header_pil_checks_is_a_data_error_too(tmp_path, raises_naming, bmp_bomb):
    """A BMP header: the size is PIL's to read, and PIL's own bomb error is translated."""
    path = bmp_bomb(tmp_path / "bomb.bmp", 20000, 20000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raises_naming(lambda: read_image(path), "bomb.bmp", MAX_PIXELS_ENV)


def test_header_size_is_cheap_and_checked(tmp_path, raises_naming, bmp_bomb):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "ok.png")
    assert image_header_size(tmp_path / "ok.png") == (40, 30)
    bomb = bmp_bomb(tmp_path / "bomb.bmp", 20000, 20000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raises_naming(lambda: image_header_size(bomb), "bomb.bmp", MAX_PIXELS_ENV)
    (tmp_path / "t.png").write_text("text")
    raises_naming(lambda: image_header_size(tmp_path / "t.png"), "t.png", "not a readable")


def test_limit_can_be_lowered_and_raised(tmp_path, monkeypatch, raises_naming):
    path = tmp_path / "img.jpg"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    raises_naming(lambda: read_image(path), "img.jpg", "50x40", "2,000", f"{MAX_PIXELS_ENV}=2000")
    monkeypatch.setenv(MAX_PIXELS_ENV, "2000")
    assert read_image(path).shape == (40, 50, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # no limit
    assert read_image(path).shape == (40, 50, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    raises_naming(lambda: read_image(path), MAX_PIXELS_ENV, "whole number")


def test_limit_above_pils_own_is_honoured(tmp_path, monkeypatch, raises_naming, bmp_bomb):
    # a header claiming 20000 x 20000 passes our raised limit; it then fails as what it
    # is (no pixel data), still a DataError naming the file, never PIL's bomb error
    path = bmp_bomb(tmp_path / "big.bmp", 20000, 20000)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(20000 * 20000))
    msg = raises_naming(lambda: read_image(path), "big.bmp")
    assert MAX_PIXELS_ENV not in msg
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's limit is restored afterwards


def test_too_small_image_is_refused_naming_the_file(tmp_path, raises_naming):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    raises_naming(lambda: read_image(path), "tiny.png", "1x1", f"{MIN_IMAGE_SIDE} px")
    Image.fromarray(np.zeros((MIN_IMAGE_SIDE - 1, 64, 3), np.uint8)).save(path)
    raises_naming(lambda: read_image(path), "tiny.png", f"{MIN_IMAGE_SIDE - 1}x64")
    Image.fromarray(np.zeros((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 3), np.uint8)).save(path)
    assert read_image(path).shape == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 3)
    assert read_image(path.parent / "tiny.png", min_side=1).shape[0] == MIN_IMAGE_SIDE


# ---------------------------------------------------------------- errors
def test_every_decode_error_is_a_data_error_naming_the_file(tmp_path, raises_naming):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good)
    jpg = tmp_path / "good.jpg"
    Image.open(good).save(jpg)
    cases = {
        "missing.png": None,
        "empty.png": b"",
        "text.png": b"not an image at all",
        "trunc.png": good.read_bytes()[: good.stat().st_size // 2],
        "trunc.jpg": jpg.read_bytes()[:200],
        "header.png": good.read_bytes()[:40],
        "garbage.tif": b"II*\x00" + b"\xff" * 60,
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        raises_naming(lambda p=path: read_image(p), name)
        raises_naming(lambda p=path: read_mask(p, 3), name)
    f32 = tmp_path / "float.tif"
    Image.fromarray(np.zeros((8, 8), np.float32)).save(f32)
    raises_naming(lambda: read_image(f32), "float.tif", "floating-point")


def test_masks_keep_their_values(tmp_path, raises_naming):
    m = np.array([[0, 1, 2], [3, 255, 3]], np.uint8)
    Image.fromarray(m, "L").save(tmp_path / "l.png")
    assert np.array_equal(read_mask(tmp_path / "l.png", 3), m)  # masks may be tiny
    m16 = np.array([[0, 1, 2, 3]], np.uint16)
    Image.fromarray(m16).save(tmp_path / "m16.png")  # 16-bit labels: not rescaled
    assert read_mask(tmp_path / "m16.png", 3).tolist() == [[0, 1, 2, 3]]
    raises_naming(lambda: read_mask(tmp_path / "l.png", 2), "l.png", "3", "0..1")
