"""`lpdseg slide`: level choice, stitched map, QuPath GeoJSON round trip, areas, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from _tinyrun import cached_tiny_run
from shapely.geometry import shape
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.engine.slide import choose_level, segment_slide
from lpdseg.errors import CheckpointError, ConfigError, DataError
from lpdseg.wsi import open_image, read_geojson_to_mask

torch.set_num_threads(2)

CMU_SVS = Path(__file__).resolve().parents[1].parent / "shared/data/slides/cmu_small_region.svs"
W0, H0 = 1024, 768
MPP = 0.5


def write_pyramid(path: Path, mpp: float | None = MPP) -> np.ndarray:
    """A tiled pyramidal TIFF (downsamples 1, 4, 16) with tissue-like blobs on white."""
    rng = np.random.default_rng(1)
    img = np.full((H0, W0, 3), 240, np.uint8)
    blobs = np.zeros((H0, W0), np.uint8)
    cv2.ellipse(blobs, (330, 300), (250, 190), 15, 0, 360, 1, -1)
    cv2.circle(blobs, (780, 520), 170, 2, -1)
    noise = rng.integers(-25, 26, size=(H0, W0, 3))
    purple = np.clip(np.array([160, 70, 150]) + noise, 0, 255).astype(np.uint8)
    pink = np.clip(np.array([220, 130, 180]) + noise, 0, 255).astype(np.uint8)
    img[blobs == 1] = purple[blobs == 1]
    img[blobs == 2] = pink[blobs == 2]
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate((1, 4, 16)):
            level = img if ds == 1 else cv2.resize(img, (W0 // ds, H0 // ds), cv2.INTER_AREA)
            kw = {}
            if mpp is not None:
                res = 1e4 / (mpp * ds)
                kw = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(64, 64),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if i == 0 else 1,
                **kw,
            )
    return img


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return cached_tiny_run(tmp_path_factory, evaluate_test=True)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
    write_pyramid(path)
    return path


def check_geojson(path: Path, class_map: np.ndarray, names: list[str], colors, scale: float):
    """Valid polygons with QuPath class properties; rasterises back within 1 % per class."""
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    for feature in data["features"]:
        geom = shape(feature["geometry"])
        assert geom.is_valid and not geom.is_empty and geom.geom_type in ("Polygon", "MultiPolygon")
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        name = props["classification"]["name"]
        assert name in names
        assert props["classification"]["color"] == list(colors[names.index(name)])
        # level-0 coordinates: inside the slide's extent
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0
        assert maxx <= class_map.shape[1] * scale + 1e-6
        assert maxy <= class_map.shape[0] * scale + 1e-6
    back = read_geojson_to_mask(path, class_map.shape, names, scale)
    for c in range(len(names) + 1):
        n = max(1, int((class_map == c).sum()))
        assert int(((back == c) != (class_map == c)).sum()) <= 0.01 * n + 1, names + ["bg"]


def test_slide_outputs_and_geojson_round_trip(run_dir, slide_path, tmp_path):
    out = tmp_path / "out"
    # threshold 0: every class is kept, so the untrained model's map has several classes
    s = segment_slide(
        run_dir / "best.pt",
        slide_path,
        out,
        mpp=2.0,
        tile=64,
        batch_size=8,
        output_downsample=4,
        threshold=0.0,
        progress=False,
    )
    assert s["level"] == 1 and s["level_downsample"] == pytest.approx(4.0)
    assert s["tile_level_px"] == 64 and s["map_downsample"] == pytest.approx(16.0)
    assert s["map_shape_hw"] == [H0 // 16, W0 // 16]
    assert s["map_mpp"] == pytest.approx(8.0)
    # glass is skipped: fewer tiles than the full 256 x 192 level grid (6 x 4 at stride 48)
    assert 0 < s["tiles"] < 24
    assert s["peak_rss_mb"] > 0 and s["seconds"] > 0
    for f in s["files"].values():
        assert Path(f).is_file(), f
    names = s["class_names"]
    class_map = cv2.imread(s["files"]["class_map"], cv2.IMREAD_UNCHANGED)
    assert class_map.shape == (H0 // 16, W0 // 16)
    # glass corners are background (label C)
    assert class_map[0, -1] == len(names) and class_map[-1, 0] == len(names)
    assert len(np.unique(class_map[class_map < len(names)])) >= 2
    from lpdseg.engine.train import load_model

    _, cfg = load_model(run_dir / "best.pt")
    check_geojson(out / "synthetic.geojson", class_map, names, cfg.data.colors, 16.0)

    rows = json.loads((out / "synthetic_areas.json").read_text())
    for row in rows:
        assert row["pixels"] == int((class_map == row["class_id"]).sum())
        # one map pixel = 16 x 16 level-0 pixels of 0.5 um
        assert row["area_um2"] == pytest.approx(row["pixels"] * (16 * 0.5) ** 2)
    assert sum(r["fraction_of_tissue"] for r in rows) == pytest.approx(1.0)
    overlay = cv2.imread(str(out / "synthetic_overlay.png"))
    assert overlay.shape[1] == W0 // 16 and overlay.shape[0] > H0 // 16  # legend below


def test_level_between_pyramid_levels_resizes_tiles(run_dir, slide_path, tmp_path):
    s = segment_slide(
        run_dir / "best.pt",
        slide_path,
        tmp_path,
        mpp=4.0,  # level 1 is 2 um/px, level 2 is 8 um/px: read level 1 tiles twice as big
        tile=32,
        output_downsample=2,
        progress=False,
    )
    assert s["level"] == 1 and s["tile_level_px"] == 64 and s["tile_model_px"] == 32
    assert s["map_downsample"] == pytest.approx(16.0)  # 2 working px of 4 um = 16 level-0 px


def test_choose_level_without_mpp(tmp_path):
    path = tmp_path / "nompp.tif"
    write_pyramid(path, mpp=None)
    with open_image(path) as r:
        assert r.mpp is None
        assert choose_level(r, downsample=4)[:2] == (1, 1.0)
        assert choose_level(r)[:2] == (0, 1.0)  # no mpp, nothing asked: level 0, warned
        with pytest.raises(ConfigError, match="not both"):
            choose_level(r, mpp=2.0, downsample=4)
        with pytest.raises(ConfigError, match="downsample"):
            choose_level(r, downsample=0)


def test_bad_slide_and_checkpoint_errors_name_the_file(run_dir, slide_path, tmp_path):
    notes = tmp_path / "notes.svs"
    notes.write_text("this is not a slide")
    with pytest.raises(DataError, match="notes.svs"):
        segment_slide(run_dir / "best.pt", notes, tmp_path / "o", progress=False)
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(slide_path.read_bytes()[:300])
    with pytest.raises(DataError, match="cut.tif"):
        segment_slide(run_dir / "best.pt", truncated, tmp_path / "o", progress=False)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bogus.pt"):
        segment_slide(bogus, slide_path, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # nothing half-written

    result = CliRunner().invoke(
        app, ["slide", str(run_dir / "best.pt"), str(notes), "--out", str(tmp_path / "o"), "-q"]
    )
    assert result.exit_code == 2
    assert "notes.svs" in result.output


def test_cli_slide(run_dir, slide_path, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "slide",
            str(run_dir / "best.pt"),
            str(slide_path),
            "--out",
            str(tmp_path),
            "--downsample",
            "16",
            "--tile",
            "32",
            "--output-downsample",
            "1",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "synthetic_summary.json").read_text())
    assert summary["level"] == 2 and summary["map_shape_hw"] == [H0 // 16, W0 // 16]
    assert "tiles at level 2" in result.output


@pytest.mark.skipif(not CMU_SVS.is_file(), reason=f"shared slide not available at {CMU_SVS}")
def test_cmu_slide_geojson_round_trip(run_dir, tmp_path):
    s = segment_slide(
        run_dir / "best.pt",
        CMU_SVS,
        tmp_path,
        mpp=4.0,
        tile=64,
        output_downsample=2,
        threshold=0.0,
        progress=False,
    )
    assert s["mpp_level0"] is not None and s["level"] == 0
    assert s["tile_level_px"] > 64 * 7  # level 0 is ~0.5 um/px: tiles read larger, resized
    names = s["class_names"]
    class_map = cv2.imread(s["files"]["class_map"], cv2.IMREAD_UNCHANGED)
    assert (class_map < len(names)).mean() > 0.1  # the tissue strip is segmented
    from lpdseg.engine.train import load_model

    _, cfg = load_model(run_dir / "best.pt")
    check_geojson(
        Path(s["files"]["geojson"]), class_map, names, cfg.data.colors, s["map_downsample"]
    )
    rows = json.loads(Path(s["files"]["areas_json"]).read_text())
    assert all(r["area_um2"] is not None for r in rows)


def test_cli_slide_under_torchrun_equals_one_process(run_dir, slide_path, tmp_path):
    """`torchrun --nproc_per_node 2 -m lpdseg.cli slide`: tiles split over ranks, same map."""
    import os
    import subprocess
    import sys

    from PIL import Image

    args = ["--downsample", "4", "--tile", "32", "--output-downsample", "2", "-q"]
    single = tmp_path / "single"
    res = CliRunner().invoke(
        app, ["slide", str(run_dir / "best.pt"), str(slide_path), "--out", str(single), *args]
    )
    assert res.exit_code == 0, res.output
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    sharded = tmp_path / "sharded"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lpdseg.cli", "slide", str(run_dir / "best.pt"), str(slide_path),
         "--out", str(sharded), *args],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = np.asarray(Image.open(single / "synthetic_classmap.png"))
    b = np.asarray(Image.open(sharded / "synthetic_classmap.png"))
    np.testing.assert_array_equal(a, b)
    sa = json.loads((single / "synthetic_summary.json").read_text())
    sb = json.loads((sharded / "synthetic_summary.json").read_text())
    assert sa["tiles"] == sb["tiles"] > 4
