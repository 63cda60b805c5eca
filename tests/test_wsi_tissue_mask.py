"""wsi.tissue: the user's tissue mask (image or QuPath GeoJSON) and the pen-mark filter."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import shapely
from PIL import Image

from lpdseg.errors import DataError
from lpdseg.wsi.tissue import PenThresholds, detect_tissue, load_tissue_mask, pen_mask

SLIDE_WH = (4000, 3000)  # level-0 width, height
THUMB_HW = (300, 400)  # 10 level-0 px per thumbnail pixel


def box_expected() -> np.ndarray:
    want = np.zeros(THUMB_HW, bool)
    want[60:180, 100:200] = True  # level-0 x 1000..2000, y 600..1800
    return want


# ---------------------------------------------------------------- image masks
def test_png_mask_of_any_size_is_scaled_to_the_thumbnail(tmp_path):
    small = np.zeros((150, 200), np.uint8)  # 20 level-0 px per mask pixel
    small[30:90, 50:100] = 255
    grey = tmp_path / "mask.png"
    Image.fromarray(small).save(grey)
    np.testing.assert_array_equal(load_tissue_mask(grey, SLIDE_WH, THUMB_HW), box_expected())

    big = np.zeros((600, 800), np.uint8)  # larger than the thumbnail, labels 1 and 7
    big[120:360, 200:300] = 1
    big[120:360, 300:400] = 7
    one = tmp_path / "labels.png"
    Image.fromarray(big).save(one)
    np.testing.assert_array_equal(load_tissue_mask(one, SLIDE_WH, THUMB_HW), box_expected())

    rgb = tmp_path / "rgb.png"  # colour: any non-zero channel
    colour = np.zeros((150, 200, 3), np.uint8)
    colour[30:90, 50:100, 1] = 80
    Image.fromarray(colour).save(rgb)
    np.testing.assert_array_equal(load_tissue_mask(rgb, SLIDE_WH, THUMB_HW), box_expected())

    bits = tmp_path / "bits.png"  # 1-bit
    Image.fromarray(small > 0).save(bits)
    np.testing.assert_array_equal(load_tissue_mask(bits, SLIDE_WH, THUMB_HW), box_expected())


def test_bad_image_masks_are_refused(tmp_path):
    square = tmp_path / "square.png"
    Image.fromarray(np.full((200, 200), 255, np.uint8)).save(square)
    with pytest.raises(DataError, match="not the shape of the slide"):
        load_tissue_mask(square, SLIDE_WH, THUMB_HW)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((150, 200), np.uint8)).save(empty)
    with pytest.raises(DataError, match="no non-zero pixel"):
        load_tissue_mask(empty, SLIDE_WH, THUMB_HW)
    with pytest.raises(DataError, match="missing.png"):
        load_tissue_mask(tmp_path / "missing.png", SLIDE_WH, THUMB_HW)


# ---------------------------------------------------------------- GeoJSON masks
def feature(coords, cls: str | None = None, kind: str = "Polygon") -> dict:
    props: dict = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [0, 0, 0]}
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coords},
        "properties": props,
    }


def ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def centres_inside(geom) -> np.ndarray:
    """Thumbnail pixels whose centre (in level-0 px) lies inside ``geom``."""
    i, j = np.mgrid[0 : THUMB_HW[0], 0 : THUMB_HW[1]]
    return shapely.contains_xy(geom, (j + 0.5) * 10.0, (i + 0.5) * 10.0)


def test_qupath_geojson_annotations_are_rasterised(tmp_path):
    tissue = feature([ring(1000, 600, 2000, 1800), ring(1200, 800, 1500, 1000)], "Tumor")
    triangle = feature([[[2500, 500], [3800, 900], [2700, 2600], [2500, 500]]])
    ignore = feature([ring(1000, 1500, 2000, 1800)], "Ignore*")
    other = feature(
        [[ring(3000, 2700, 3400, 2900)], [ring(100, 2700, 300, 2900)]], "Stroma", "MultiPolygon"
    )
    point = feature([300, 300], "Tumor", "Point")
    path = tmp_path / "tissue.geojson"
    path.write_text(
        json.dumps(
            {"type": "FeatureCollection", "features": [tissue, triangle, ignore, other, point]}
        )
    )
    got = load_tissue_mask(path, SLIDE_WH, THUMB_HW)

    box = np.zeros(THUMB_HW, bool)  # axis-aligned parts: exact, pixel for pixel
    box[60:180, 100:200] = True
    box[80:100, 120:150] = False  # the hole
    box[150:180, 100:200] = False  # Ignore*
    box[270:290, 300:340] = True
    box[270:290, 10:30] = True
    tri = (slice(0, 262), slice(250, 400))  # the triangle's box (rows 50..260, cols 250..380)
    outside = np.ones(THUMB_HW, bool)
    outside[tri] = False
    np.testing.assert_array_equal(got[outside], box[outside])
    shell = shapely.Polygon([[2500, 500], [3800, 900], [2700, 2600]])
    want = centres_inside(shell)[tri]  # pixel centres inside, up to the slanted edges
    i, j = np.mgrid[tri]
    centres = shapely.points((j + 0.5) * 10.0, (i + 0.5) * 10.0)
    near_edge = shapely.distance(shell.boundary, centres) < 5.0  # half a thumbnail pixel
    assert ((got[tri] != want) & ~near_edge).sum() == 0
    assert (got[tri] != want).sum() <= 0.02 * want.sum()

    single = tmp_path / "one.json"  # one Feature, QuPath's other export form
    single.write_text(json.dumps(feature([ring(1000, 600, 2000, 1800)])))
    np.testing.assert_array_equal(load_tissue_mask(single, SLIDE_WH, THUMB_HW), box_expected())


def test_geojson_without_usable_polygons_is_refused(tmp_path):
    points = tmp_path / "points.geojson"
    points.write_text(json.dumps([feature([10, 10], "Tumor", "Point")]))
    with pytest.raises(DataError, match="no polygon annotations"):
        load_tissue_mask(points, SLIDE_WH, THUMB_HW)
    outside = tmp_path / "outside.geojson"
    outside.write_text(json.dumps([feature([ring(9000, 9000, 9500, 9500)])]))
    with pytest.raises(DataError, match="cover no pixel"):
        load_tissue_mask(outside, SLIDE_WH, THUMB_HW)
    broken = tmp_path / "broken.geojson"
    broken.write_text("{")
    with pytest.raises(DataError, match="broken.geojson"):
        load_tissue_mask(broken, SLIDE_WH, THUMB_HW)


# ---------------------------------------------------------------- pen marks
PINK = (225, 150, 195)  # eosin
PURPLE = (120, 80, 160)  # hematoxylin
BLUE_INK, GREEN_INK, BLACK_INK = (35, 65, 170), (40, 150, 70), (25, 25, 30)


def pen_thumbnail() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    img = np.full((400, 600, 3), 238, np.uint8)
    tissue = np.zeros(img.shape[:2], np.uint8)
    cv2.ellipse(tissue, (200, 200), (130, 100), 0, 0, 360, 1, -1)
    cv2.circle(tissue, (470, 280), 70, 1, -1)
    img[tissue > 0] = PINK
    img[150:230, 150:220][tissue[150:230, 150:220] > 0] = PURPLE  # a nuclei-dense patch
    ink = np.zeros(img.shape[:2], np.uint8)
    strokes = [
        (BLUE_INK, [(30, 370), (560, 360)]),  # on glass
        (BLUE_INK, [(40, 40), (330, 330)]),  # across the tissue
        (GREEN_INK, [(380, 40), (580, 120)]),
        (BLACK_INK, [(20, 120), (60, 330)]),
    ]
    for color, (p, q) in strokes:
        cv2.line(img, p, q, color, 8)
        cv2.line(ink, p, q, 1, 8)
    noise = rng.integers(-6, 7, img.shape)
    img = np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)
    return img, tissue.astype(bool), ink.astype(bool)


def test_pen_strokes_are_removed_and_pink_tissue_stays():
    img, tissue, ink = pen_thumbnail()
    near_ink = cv2.dilate(ink.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    plain = detect_tissue(img)
    assert plain[ink & ~tissue].mean() > 0.5  # without the filter ink is "tissue"
    mask = detect_tissue(img, remove_pen=True)
    assert not mask[ink].any()  # every ink pixel goes, on glass and on tissue
    assert mask[tissue & ~near_ink].mean() > 0.99  # the tissue stays, purple patch included
    assert not mask[~tissue & ~near_ink].any()  # and no glass comes in
    assert mask[150:230, 150:220][tissue[150:230, 150:220] & ~near_ink[150:230, 150:220]].all()


def test_pen_mask_rules_spare_hematoxylin_and_eosin():
    stains = [
        PINK,
        PURPLE,
        (200, 100, 160),
        (90, 60, 140),
        (70, 40, 110),
        (80, 80, 150),
        (240, 200, 225),
        (238, 238, 238),
        (180, 60, 90),
    ]
    inks = [BLUE_INK, GREEN_INK, BLACK_INK, (20, 40, 120), (0, 120, 160), (60, 110, 40)]
    swatch = np.array([stains + inks], np.uint8)
    flags = pen_mask(swatch, PenThresholds(dilate_px=0))[0]
    assert not flags[: len(stains)].any(), flags
    assert flags[len(stains) :].all(), flags
    strict = PenThresholds(blue_min_saturation=256, green_min_saturation=256, black_max_value=-1)
    assert not pen_mask(swatch, strict)[0].any()  # the thresholds are the rules' only inputs
