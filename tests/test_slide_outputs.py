"""`lpdseg slide` writes what viewers open: OME-TIFF class map, QuPath options, user tissue mask."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app


def _slide(tmp_path, tiny_run_dir):
    data = tiny_run_dir.parent / "data" / "test" / "img"
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.iterdir())[:3]]
    row = np.concatenate(tiles * 2, axis=1)  # 32 x 192
    path = tmp_path / "slide.png"
    Image.fromarray(np.concatenate([row, row], axis=0)).save(path)
    return path


def test_slide_writes_ome_tiff_and_qupath_options(tiny_run_dir, tmp_path):
    slide = _slide(tmp_path, tiny_run_dir)
    out = tmp_path / "out"
    args = [
        "slide",
        str(tiny_run_dir / "best.pt"),
        str(slide),
        "--downsample",
        "1",
        "--output-downsample",
        "1",
        "--tile",
        "32",
        "--probabilities",
        "--geojson-type",
        "detection",
        "--simplify",
        "0.5",
        "--out",
        str(out),
        "-q",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    class_map = np.asarray(Image.open(out / "slide_classmap.png"))
    with tifffile.TiffFile(out / "slide_classmap.ome.tif") as tif:
        assert tif.is_ome
        assert np.array_equal(tif.series[0].levels[0].asarray(), class_map)
        assert len(tif.series) == 2  # class map, then the per-class probabilities
        assert tif.series[1].shape[0] == 4
    features = json.loads((out / "slide.geojson").read_text())["features"]
    assert features and all(f["properties"]["objectType"] == "detection" for f in features)
    summary = json.loads((out / "slide_summary.json").read_text())
    assert "ome_tiff" in summary["files"]


def test_slide_takes_the_users_tissue_mask_and_can_skip_the_ome_tiff(tiny_run_dir, tmp_path):
    slide = _slide(tmp_path, tiny_run_dir)
    mask = np.zeros((64, 192), np.uint8)
    mask[:, :32] = 255  # tissue only in the first column of tiles
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = [
        str(tiny_run_dir / "best.pt"),
        str(slide),
        "--downsample",
        "1",
        "--tile",
        "32",
        "--overlap",
        "0",
        "-q",
    ]
    full = CliRunner().invoke(app, ["slide", *common, "--out", str(tmp_path / "a")])
    part = CliRunner().invoke(
        app,
        [
            "slide",
            *common,
            "--tissue-mask",
            str(tmp_path / "mask.png"),
            "--no-ome-tiff",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert full.exit_code == 0 and part.exit_code == 0, (full.output, part.output)
    tiles_full = json.loads((tmp_path / "a" / "slide_summary.json").read_text())["tiles"]
    tiles_part = json.loads((tmp_path / "b" / "slide_summary.json").read_text())["tiles"]
    assert tiles_part == 2 < tiles_full  # the two 32-px tiles of the masked column
    assert not (tmp_path / "b" / "slide_classmap.ome.tif").exists()
    missing = CliRunner().invoke(
        app,
        [
            "slide",
            *common,
            "--tissue-mask",
            str(tmp_path / "nope.png"),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert missing.exit_code == 2 and "--tissue-mask" in missing.output
    assert "nope.png" in missing.output
