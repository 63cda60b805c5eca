"""wsi.export GeoJSON options: QuPath object type, area measurement, simplification."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from shapely.geometry import shape

from lpdseg.wsi.export import (
    AREA_PX2,
    AREA_UM2,
    geojson_features,
    read_geojson_to_mask,
    write_geojson,
)

NAMES = ["tumor", "stroma", "necrosis"]
COLORS = [(200, 0, 0), (0, 160, 0), (0, 0, 200)]
SCALE, OFFSET = 8.0, (64.0, 32.0)
MPP = (0.25, 0.3)  # level-0 µm per pixel, x and y


def label_map() -> np.ndarray:
    m = np.full((160, 200), 3, np.uint8)
    cv2.ellipse(m, (60, 60), (45, 30), 20, 0, 360, 0, -1)
    m[45:70, 45:75] = 3  # a hole
    cv2.circle(m, (150, 70), 35, 1, -1)
    pts = np.array([[20, 150], [90, 105], [190, 150]], np.int32)
    cv2.fillPoly(m, [pts], 2)
    return m


def vertices(features: list[dict]) -> int:
    total = 0
    for f in features:
        geom = shape(f["geometry"])
        for poly in getattr(geom, "geoms", [geom]):
            total += len(poly.exterior.coords) + sum(len(r.coords) for r in poly.interiors)
    return total


@pytest.mark.parametrize("tolerance", [0.0, 0.5 * SCALE])  # exact; half a map pixel
def test_round_trip_within_one_percent_per_class(tmp_path, tolerance):
    m = label_map()
    path = tmp_path / "map.geojson"
    n = write_geojson(
        path, m, NAMES, COLORS, SCALE, OFFSET, simplify_tolerance_px=tolerance, mpp_level0=MPP
    )
    features = json.loads(path.read_text())["features"]
    assert len(features) == n == 3
    for f in features:
        assert shape(f["geometry"]).is_valid
    back = read_geojson_to_mask(path, m.shape, NAMES, SCALE, OFFSET)
    for c in range(4):
        wrong = ((back == c) != (m == c)).sum()
        assert wrong / (m == c).sum() < 0.01, (c, wrong)
    if tolerance == 0:
        np.testing.assert_array_equal(back, m)  # exact outlines rasterise back exactly


def test_simplification_drops_vertices_and_moves_outlines_less_than_the_tolerance():
    m = label_map()
    exact = geojson_features(m, NAMES, COLORS, SCALE, OFFSET)
    simple = geojson_features(m, NAMES, COLORS, SCALE, OFFSET, simplify_tolerance_px=2 * SCALE)
    assert vertices(simple) < vertices(exact) / 2
    for a, b in zip(exact, simple, strict=True):
        ga, gb = shape(a["geometry"]), shape(b["geometry"])
        assert gb.is_valid and ga.hausdorff_distance(gb) <= 2 * SCALE + 1e-6
    assert len(shape(simple[0]["geometry"]).interiors) == 1  # the hole survives


def test_object_type_classification_and_area_measurement():
    m = label_map()
    features = geojson_features(
        m, NAMES, COLORS, SCALE, OFFSET, object_type="detection", mpp_level0=MPP
    )
    pixel_area = MPP[0] * MPP[1]
    total = {name: 0.0 for name in NAMES}
    for f in features:
        props = f["properties"]
        assert props["objectType"] == "detection"
        name = props["classification"]["name"]
        assert props["classification"]["color"] == list(COLORS[NAMES.index(name)])
        measurements = props["measurements"]
        assert list(measurements) == [AREA_UM2] == ["Area µm^2"]  # QuPath's name, dict form
        area = shape(f["geometry"]).area * pixel_area  # polygon area (level-0 px) x pixel area
        assert measurements[AREA_UM2] == pytest.approx(area, rel=1e-6)
        total[name] += measurements[AREA_UM2]
    for c, name in enumerate(NAMES):
        # Exact outlines cover the class's pixels (1-pixel diagonal steps are cut at
        # 45 degrees, a half-pixel triangle each): area ~ pixel count x map-pixel area.
        assert total[name] == pytest.approx((m == c).sum() * SCALE**2 * pixel_area, rel=0.01)
    plain = geojson_features(m, NAMES, COLORS, SCALE, OFFSET)
    assert {f["properties"]["objectType"] for f in plain} == {"annotation"}
    assert all(list(f["properties"]["measurements"]) == [AREA_PX2] for f in plain)
    assert plain[0]["properties"]["measurements"][AREA_PX2] == pytest.approx(
        shape(plain[0]["geometry"]).area
    )
    iso = geojson_features(m, NAMES, COLORS, SCALE, OFFSET, mpp_level0=0.5)
    assert iso[0]["properties"]["measurements"][AREA_UM2] == pytest.approx(
        shape(iso[0]["geometry"]).area * 0.25
    )


def test_bad_options_are_refused(tmp_path):
    m = label_map()
    with pytest.raises(ValueError, match="objectType"):
        geojson_features(m, NAMES, COLORS, SCALE, object_type="cell")
    with pytest.raises(ValueError, match="simplify_tolerance_px"):
        write_geojson(tmp_path / "x.geojson", m, NAMES, COLORS, SCALE, simplify_tolerance_px=-1)
    with pytest.raises(ValueError, match="mpp_level0"):
        geojson_features(m, NAMES, COLORS, SCALE, mpp_level0=(0.25, 0))
    assert not (tmp_path / "x.geojson").exists()
