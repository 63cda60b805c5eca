"""lpdseg.viz: the one overlay, legend, colour map and PNG writer, and that callers use them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lpdseg import viz
from lpdseg.viz import (
    add_legend,
    colorize,
    legend,
    overlay,
    png_bytes,
    save_png,
    side_by_side,
    text_strip,
    triptych,
)

NAMES = ["TUM", "STR", "LYM"]
COLORS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (255, 255, 255)]  # + background


def _labels() -> np.ndarray:
    m = np.full((20, 30), 3, np.uint8)  # background
    m[:10, :10] = 0
    m[10:, :10] = 1
    m[:5, 20:] = 2
    m[19, 29] = 255  # ignore
    return m


# ---------------------------------------------------------------- colours
def test_colorize_gives_each_label_its_colour():
    m = _labels()
    rgb = colorize(m, COLORS)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    for i, col in enumerate(COLORS):
        assert (rgb[m == i] == col).all()
    assert rgb[19, 29].tolist() == [0, 0, 0]  # no colour for 255: black


def test_overlay_values():
    m = _labels()
    img = np.full((20, 30, 3), 100, np.uint8)
    out = overlay(img, m, COLORS[:3], alpha=0.5)
    assert out[0, 0].tolist() == [150, 50, 50]  # halfway to (200, 0, 0)
    assert out[15, 0].tolist() == [50, 150, 50]
    assert (out[m == 3] == 100).all() and out[19, 29].tolist() == [100, 100, 100]
    # default opacity, rounded: 100 * 0.6 + 200 * 0.4 = 140
    assert overlay(img, m, COLORS[:3])[0, 0].tolist() == [140, 60, 60]
    assert viz.OVERLAY_ALPHA == 0.4
    # with the background colour given, background is painted too
    assert overlay(img, m, COLORS, alpha=1.0)[15, 29].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, m, COLORS, alpha=1.5)


def test_overlay_resizes_the_label_map_nearest():
    m = np.array([[0, 1], [2, 3]], np.uint8)
    out = overlay(np.zeros((4, 6, 3), np.uint8), m, COLORS, alpha=1.0)
    assert out.shape == (4, 6, 3)
    assert (out[:2, :3] == COLORS[0]).all() and (out[:2, 3:] == COLORS[1]).all()
    assert (out[2:, :3] == COLORS[2]).all() and (out[2:, 3:] == COLORS[3]).all()


# ---------------------------------------------------------------- legend
def test_legend_draws_every_swatch_and_wraps():
    wide = legend([*NAMES, "background"], COLORS, 600)
    assert wide.shape[1] == 600 and wide.dtype == np.uint8
    for col in COLORS[:3]:  # every class swatch is drawn in its colour
        assert (wide == col).all(-1).sum() > 20
    assert (wide < 100).all(-1).any()  # black text / outlines
    narrow = legend([*NAMES, "background"], COLORS, 64)
    assert narrow.shape[1] == 64 and narrow.shape[0] > wide.shape[0]  # wrapped to rows
    for col in COLORS[:3]:
        assert (narrow == col).all(-1).sum() > 20  # nothing cut off
    big = legend(NAMES, COLORS, 2000)
    assert big.shape[0] > wide.shape[0]  # the text grows with the picture
    with pytest.raises(ValueError, match="colour"):
        legend(NAMES, COLORS[:2], 300)


def test_add_legend_keeps_the_picture_above():
    img = np.random.default_rng(0).integers(0, 256, (40, 120, 3), dtype=np.uint8)
    out = add_legend(img, NAMES, COLORS)
    assert out.shape[1] == 120 and out.shape[0] > 40
    np.testing.assert_array_equal(out[:40], img)


def test_text_strip_and_panels():
    strip = text_strip("TUM #0", 90, 48)
    assert strip.shape == (48, 90, 3) and (strip < 128).any() and (strip == 255).any()
    a, b = np.zeros((10, 5, 3), np.uint8), np.ones((10, 7, 3), np.uint8)
    row = side_by_side([a, b], gap=3)
    assert row.shape == (10, 15, 3) and (row[:, 5:8] == 255).all()
    with pytest.raises(ValueError, match="one height"):
        side_by_side([a, np.zeros((9, 5, 3), np.uint8)])
    m = _labels()
    t = triptych(np.zeros((20, 30, 3), np.uint8), m, m, NAMES, COLORS)
    assert t.shape[1] == 3 * 30 + 2 * 4 and t.shape[0] > 20
    np.testing.assert_array_equal(t[:20, 34:64], colorize(m, COLORS))


# ---------------------------------------------------------------- PNG
@pytest.mark.parametrize("shape", [(9, 7), (9, 7, 3), (9, 7, 4)])
def test_png_round_trip_is_exact(tmp_path, shape):
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    for level in (0, 3, 9):
        back = np.asarray(Image.open(io.BytesIO(png_bytes(arr, level))))
        np.testing.assert_array_equal(back, arr)
    save_png(tmp_path / "a.png", arr)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), arr)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(arr.astype(np.uint16))


# ---------------------------------------------------------------- one implementation
def test_synthetic_mask_pictures_use_colorize():
    from lpdseg.data import synthetic

    m = np.array([[0, 1, 2, 3, 4]], np.uint8)
    np.testing.assert_array_equal(
        colorize(m, synthetic.MASK_COLORS), np.asarray([synthetic.MASK_COLORS], np.uint8)
    )
