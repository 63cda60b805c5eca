"""wsi.export: polygons with holes, QuPath GeoJSON round trip, area tables, overlays, legend.

Moved unchanged from test_wsi.py (the export module is being consolidated).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from lpdseg.errors import DataError
from lpdseg.exports.areas import area_table, pixel_area_um2, write_area_csv, write_area_json
from lpdseg.viz import add_legend, overlay
from lpdseg.wsi import mask_to_polygons, read_geojson_to_mask, write_geojson

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
