"""lpdseg.exports.areas: the one areas table, its CSV and strict JSON, used by predict and slide."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lpdseg.exports.areas import (
    FIELDS,
    area_json,
    area_table,
    pixel_area_um2,
    write_area_csv,
    write_area_json,
)

NAMES = ["TUM", "STR", "LYM"]


def _map() -> np.ndarray:
    m = np.full((40, 50), 3, np.uint8)  # background
    m[:10] = 0  # 500 px
    m[10:16, :20] = 1  # 120 px
    m[30:, 40:] = 2  # 100 px
    return m


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_table_sums_to_the_pixel_count_and_areas_are_pixels_times_pixel_area():
    m = _map()
    pa = pixel_area_um2((0.25, 0.5), 4.0)
    assert pa == pytest.approx(0.25 * 0.5 * 16) == 2.0
    rows = area_table(m, NAMES, pa, tissue_only=False)
    assert [r["class"] for r in rows] == [*NAMES, "background"]
    assert [r["class_id"] for r in rows] == [0, 1, 2, 3]
    assert [r["pixels"] for r in rows] == [500, 120, 100, 2000 - 720]
    assert sum(r["pixels"] for r in rows) == m.size
    assert [r["area_um2"] for r in rows] == [r["pixels"] * 2.0 for r in rows]
    tissue = 720
    assert [r["fraction_of_tissue"] for r in rows[:3]] == [500 / tissue, 120 / tissue, 100 / tissue]
    assert sum(r["fraction_of_tissue"] for r in rows[:3]) == pytest.approx(1.0)
    assert rows[-1]["fraction_of_tissue"] is None
    assert list(rows[0]) == list(FIELDS)
    # tissue only: the class rows
    assert area_table(m, NAMES, pa) == rows[:3]


def test_unknown_pixel_size_gives_none():
    rows = area_table(_map(), NAMES)
    assert all(r["area_um2"] is None for r in rows)
    assert pixel_area_um2(None, 4.0) is None
    assert pixel_area_um2(float("nan"), 1.0) is None
    assert pixel_area_um2((0.0, 0.5), 1.0) is None
    assert pixel_area_um2(np.float32(0.5), 2.0) == pytest.approx(1.0)


def test_no_tissue_and_labels_above_background(caplog):
    m = np.full((4, 4), 3, np.uint8)
    rows = area_table(m, NAMES, 1.0, tissue_only=False)
    assert [r["fraction_of_tissue"] for r in rows] == [0.0, 0.0, 0.0, None]
    m[0, 0] = 7
    rows = area_table(m, NAMES, tissue_only=False)
    assert sum(r["pixels"] for r in rows) == 15 and "above background" in caplog.text


def test_csv_and_strict_json(tmp_path):
    rows = area_table(_map(), NAMES, 2.0, tissue_only=False)
    write_area_csv(tmp_path / "a.csv", rows)
    text = (tmp_path / "a.csv").read_text()
    assert text.splitlines()[0] == ",".join(FIELDS)
    back = list(csv.DictReader(text.splitlines()))
    assert [int(r["pixels"]) for r in back] == [r["pixels"] for r in rows]
    assert back[-1]["fraction_of_tissue"] == ""  # None -> empty cell
    assert float(back[0]["area_um2"]) == 1000.0
    write_area_json(tmp_path / "a.json", rows)
    assert _strict((tmp_path / "a.json").read_text()) == rows

    # NaN / infinity never reach a file: null in JSON, an empty CSV cell
    bad = [{**rows[0], "fraction_of_tissue": math.nan, "area_um2": math.inf}]
    loaded = _strict(area_json(bad))
    assert loaded[0]["fraction_of_tissue"] is None and loaded[0]["area_um2"] is None
    assert "NaN" not in area_json(bad) and "Infinity" not in area_json(bad)
    write_area_json(tmp_path / "b.json", bad)
    assert _strict((tmp_path / "b.json").read_text())[0]["area_um2"] is None
    write_area_csv(tmp_path / "b.csv", bad)
    assert (tmp_path / "b.csv").read_text().splitlines()[1].endswith(",,")
    with pytest.raises(ValueError, match="no rows"):
        write_area_csv(tmp_path / "c.csv", [])


def test_predict_and_slide_write_the_same_table(tmp_path):
    """``lpdseg predict``'s per-image files come from this module (the slide's do too)."""
    from lpdseg.exports.predictions import write_outputs
    from lpdseg.viz import add_legend, overlay

    m = _map()
    image = np.random.default_rng(0).integers(0, 256, (*m.shape, 3), dtype=np.uint8)
    colors = [[200, 0, 0], [0, 200, 0], [0, 0, 200], [255, 255, 255]]
    cfg = SimpleNamespace(data=SimpleNamespace(class_names=NAMES, colors=colors))
    paths = write_outputs(tmp_path, "x", image, m, cfg)
    assert [p.name for p in paths] == ["x_mask.png", "x_overlay.png", "x_areas.csv", "x_areas.json"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), m)
    pictured = np.asarray(Image.open(paths[1]))
    want = add_legend(overlay(image, m, colors[:3]), [*NAMES, "background"], colors)
    np.testing.assert_array_equal(pictured, want)
    assert (pictured[:40][m == 3] == image[m == 3]).all()  # background is left as it is
    rows = area_table(m, NAMES, tissue_only=False)
    assert _strict(paths[3].read_text()) == rows
    assert paths[2].read_text().splitlines()[0] == ",".join(FIELDS)
