"""`lpdseg slide` (wsi.pipeline): level choice, stitched map, QuPath GeoJSON round trip, areas,
the output folder's lock and checks, errors in the CLI's own words."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from shapely.geometry import shape
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.errors import CheckpointError, DataError
from lpdseg.wsi import (
    SlideJob,
    SlideJobError,
    open_image,
    pipeline,
    read_geojson_to_mask,
    run_slide_job,
)
from lpdseg.wsi.lock import LOCK_NAME, OutputLockedError
from lpdseg.wsi.pipeline import check_output, choose_level

torch.set_num_threads(2)

W0, H0 = 1024, 768
MPP = 0.5


def write_pyramid(writer, path: Path, mpp: float | None = MPP) -> np.ndarray:
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
    writer(path, img, (1, 4, 16), mpp, tile=64)
    return img


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, pyramid_writer) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
    write_pyramid(pyramid_writer, path)
    return path


def job(run_dir: Path, slide: Path, out: Path, **kw) -> SlideJob:
    return SlideJob(run_dir / "best.pt", slide, out, **kw)


def cli_slide(run_dir: Path, slide: Path, out: Path, *flags: str, **options: str | None):
    """`lpdseg slide` in this process; quick by default (level 2, 32 px tiles).

    ``options`` override the defaults by name (``tile="128"``; None drops one),
    ``flags`` are appended as they are (``"--overwrite"``).
    """
    opts = {"downsample": "16", "tile": "32", "output_downsample": "1", **options}
    args = [a for k, v in opts.items() if v is not None for a in (f"--{k.replace('_', '-')}", v)]
    return CliRunner().invoke(
        app,
        ["slide", str(run_dir / "best.pt"), str(slide), "--out", str(out), *args, *flags, "-q"],
    )


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


# ---------------------------------------------------------------- the pipeline
def test_slide_outputs_and_geojson_round_trip(run_dir, slide_path, tmp_path):
    out = tmp_path / "out"
    # threshold 0: every class is kept, so the untrained model's map has several classes
    s = run_slide_job(
        job(
            run_dir,
            slide_path,
            out,
            mpp_um_per_px=2.0,
            tile_working_px=64,
            batch_tiles=8,
            map_downsample_working_px=4,
            threshold=0.0,
        ),
        progress=False,
    )
    assert s["level"] == 1 and s["level_downsample"] == pytest.approx(4.0)
    assert s["tile_level_px"] == 64 and s["map_downsample"] == pytest.approx(16.0)
    assert s["map_shape_hw"] == [H0 // 16, W0 // 16]
    assert s["map_mpp"] == pytest.approx(8.0)
    # glass is skipped: fewer tiles than the full 256 x 192 level grid (6 x 4 at stride 48)
    assert 0 < s["tiles"] < 24
    assert s["peak_rss_mb"] > 0 and s["seconds"] > 0
    assert sorted(s) == sorted(
        [
            "slide", "checkpoint", "class_names", "dimensions_level0", "mpp_level0", "requested",
            "level", "level_downsample", "level_mpp", "tile_level_px", "tile_model_px", "overlap",
            "map_shape_hw", "map_downsample", "map_mpp", "tissue_fraction_thumbnail", "tiles",
            "regions", "seconds", "tiles_per_second", "peak_rss_mb", "device", "files",
            # where the resolutions came from (tests/test_wsi_resolution.py)
            "working_mpp", "resolution_source", "model_mpp", "slide_mpp", "slide_mpp_source",
            "slide_mpp_metadata", "backend", "slide_scoring",
        ]
    )  # fmt: skip
    assert s["requested"] == "2 um/px" and s["tile_model_px"] == 64 and s["overlap"] == 0.25
    assert s["resolution_source"] == "--mpp" and s["working_mpp"] == pytest.approx(2.0)
    assert s["slide_mpp_source"] == "metadata" and s["backend"] == "torch"
    assert s["slide_scoring"] == "seamless"  # the default for a PyTorch prototype model
    for f in s["files"].values():
        assert Path(f).is_file(), f
    assert sorted(p.name for p in out.iterdir()) == sorted(
        Path(f).name for f in s["files"].values()
    )
    names = s["class_names"]
    class_map = cv2.imread(s["files"]["class_map"], cv2.IMREAD_UNCHANGED)
    assert class_map.shape == (H0 // 16, W0 // 16)
    # glass corners are background (label C)
    assert class_map[0, -1] == len(names) and class_map[-1, 0] == len(names)
    assert len(np.unique(class_map[class_map < len(names)])) >= 2
    from lpdseg.inference import load_model

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
    s = run_slide_job(
        job(
            run_dir,
            slide_path,
            tmp_path,
            mpp_um_per_px=4.0,  # level 1 is 2 um/px, level 2 is 8 um/px: read level 1 tiles 2x
            tile_working_px=32,
            map_downsample_working_px=2,
        ),
        progress=False,
    )
    assert s["level"] == 1 and s["tile_level_px"] == 64 and s["tile_model_px"] == 32
    assert s["map_downsample"] == pytest.approx(16.0)  # 2 working px of 4 um = 16 level-0 px


def test_choose_level_without_mpp(run_dir, tmp_path, caplog, pyramid_writer):
    path = tmp_path / "nompp.tif"
    write_pyramid(pyramid_writer, path, mpp=None)
    with open_image(path) as r:
        assert r.mpp is None
        plan = choose_level(r, job(run_dir, path, tmp_path, downsample_level0_px=4), 32)
        assert (plan.level, plan.extra_scale) == (1, 1.0)
        assert plan.requested == "downsample 4" and plan.level_mpp_um_per_px is None
        assert plan.map_mpp_um_per_px is None
        # No mpp, nothing asked and a model without data.mpp: no working resolution. This
        # used to work at level 0 with a warning; it is an error that says how to give one.
        with pytest.raises(SlideJobError, match=r"has no pixel size \(mpp\) in its metadata"):
            choose_level(r, job(run_dir, path, tmp_path), 32)
        plan = choose_level(r, job(run_dir, path, tmp_path, downsample_level0_px=6), 32)
        assert plan.level == 1 and plan.tile_level_px == 48  # 32 working px = 48 level-1 px
        assert plan.map_downsample_level_px == 12  # 8 working px
    with pytest.raises(SlideJobError, match="not both"):
        job(run_dir, path, tmp_path, mpp_um_per_px=2.0, downsample_level0_px=4)
    with pytest.raises(SlideJobError, match=r"SlideJob.downsample_level0_px=0 must be > 0"):
        job(run_dir, path, tmp_path, downsample_level0_px=0)


def test_bad_slide_and_checkpoint_errors_name_the_file(run_dir, slide_path, tmp_path):
    notes = tmp_path / "notes.svs"
    notes.write_text("this is not a slide")
    with pytest.raises(DataError, match="notes.svs"):
        run_slide_job(job(run_dir, notes, tmp_path / "o"), progress=False)
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(slide_path.read_bytes()[:300])
    with pytest.raises(DataError, match="cut.tif"):
        run_slide_job(job(run_dir, truncated, tmp_path / "o"), progress=False)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bogus.pt"):
        run_slide_job(SlideJob(bogus, slide_path, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()  # nothing half-written

    result = CliRunner().invoke(
        app, ["slide", str(run_dir / "best.pt"), str(notes), "--out", str(tmp_path / "o"), "-q"]
    )
    assert result.exit_code == 2
    assert "notes.svs" in result.output


def test_cli_slide(run_dir, slide_path, tmp_path):
    result = cli_slide(run_dir, slide_path, tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "synthetic_summary.json").read_text())
    assert summary["level"] == 2 and summary["map_shape_hw"] == [H0 // 16, W0 // 16]
    assert "tiles at level 2" in result.output
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_tile_comes_from_the_checkpoint_unless_given(run_dir, slide_path, tmp_path):
    from lpdseg.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run_dir / "best.pt")
    ckpt["config"]["eval"]["tile"] = 48
    ckpt = {k: v for k, v in ckpt.items() if k not in ("format_version", "lpdseg_version")}
    tile48 = tmp_path / "tile48"
    tile48.mkdir()
    save_checkpoint(tile48 / "best.pt", ckpt)
    for out, flags, tile in (("a", [], 48), ("b", ["--tile", "32"], 32)):
        res = CliRunner().invoke(
            app,
            ["slide", str(tile48 / "best.pt"), str(slide_path), "--out", str(tmp_path / out),
             "--downsample", "16", "--output-downsample", "1", *flags, "-q"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        s = json.loads((tmp_path / out / "synthetic_summary.json").read_text())
        assert s["tile_model_px"] == s["tile_level_px"] == tile


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--overlap", "1.5"], "error: --overlap 1.5: must be in [0, 1)"),
        (["--tile", "8"], "error: --tile 8: must be >= 16"),
        (["--batch-size", "0"], "error: --batch-size 0: must be >= 1"),
        (["--output-downsample", "0"], "error: --output-downsample 0: must be >= 1"),
        (["--threshold", "2"], "error: --threshold 2.0: must be in [0, 1]"),
        (["--mpp", "0"], "error: --mpp 0.0: must be > 0"),
        (
            ["--mpp", "2", "--downsample", "4"],
            "error: --downsample 4.0: cannot be combined with --mpp 2.0",
        ),
    ],
)
def test_cli_job_errors_name_the_flags(run_dir, slide_path, tmp_path, args, message):
    result = CliRunner().invoke(
        app,
        ["slide", str(run_dir / "best.pt"), str(slide_path), "--out", str(tmp_path / "o"),
         *args, "-q"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "SlideJob." not in result.output  # the library's field names stay inside
    assert not (tmp_path / "o").exists()


def test_cmu_slide_geojson_round_trip(run_dir, cmu_svs, tmp_path):
    s = run_slide_job(
        job(
            run_dir,
            cmu_svs,
            tmp_path,
            mpp_um_per_px=4.0,
            tile_working_px=64,
            map_downsample_working_px=2,
            threshold=0.0,
        ),
        progress=False,
    )
    assert s["mpp_level0"] is not None and s["level"] == 0
    assert s["tile_level_px"] > 64 * 7  # level 0 is ~0.5 um/px: tiles read larger, resized
    names = s["class_names"]
    class_map = cv2.imread(s["files"]["class_map"], cv2.IMREAD_UNCHANGED)
    assert (class_map < len(names)).mean() > 0.1  # the tissue strip is segmented
    from lpdseg.inference import load_model

    _, cfg = load_model(run_dir / "best.pt")
    check_geojson(
        Path(s["files"]["geojson"]), class_map, names, cfg.data.colors, s["map_downsample"]
    )
    rows = json.loads(Path(s["files"]["areas_json"]).read_text())
    assert all(r["area_um2"] is not None for r in rows)


def test_cli_slide_under_torchrun_equals_one_process(run_dir, slide_path, tmp_path):
    """`torchrun --nproc_per_node 2 -m lpdseg.cli slide`: tiles split over ranks, same map."""
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
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lpdseg.cli", "slide", str(run_dir / "best.pt"), str(slide_path),
        "--out", str(sharded), *args,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = np.asarray(Image.open(single / "synthetic_classmap.png"))
    b = np.asarray(Image.open(sharded / "synthetic_classmap.png"))
    np.testing.assert_array_equal(a, b)
    sa = json.loads((single / "synthetic_summary.json").read_text())
    sb = json.loads((sharded / "synthetic_summary.json").read_text())
    assert sa["tiles"] == sb["tiles"] > 4
    assert not (sharded / LOCK_NAME).exists()
    assert not list(sharded.glob(".lpdseg-canvas-*"))  # every rank's canvas folder removed

    # A finished run is refused by every rank alike, and nothing hangs.
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert "pass --overwrite to replace it" in proc.stderr + proc.stdout

    # A folder locked by a live run: rank 0 cannot take the lock, every rank stops (no hang).
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    command[command.index(str(sharded))] = str(busy)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    output = " ".join((proc.stderr + proc.stdout).split())
    assert f"output folder {busy} is in use by another run" in output
    assert "rank 0 stopped before the tiles" in output  # rank 1's message
    assert not (busy / "synthetic_summary.json").exists()


# ---------------------------------------------------------------- known defects
def no_work(monkeypatch) -> None:
    """Make loading the model or reading tiles fail the test: the error must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr(pipeline, "load_predictor", boom)
    monkeypatch.setattr(pipeline, "stitch_slide", boom)


def test_out_that_is_a_file_fails_before_any_work(run_dir, slide_path, tmp_path, monkeypatch):
    no_work(monkeypatch)
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    result = cli_slide(run_dir, slide_path, target)
    assert result.exit_code == 2, result.output
    assert f"error: --out {target}: is an existing file, not a folder" in result.output
    assert "Traceback" not in result.output
    assert target.read_text() == "keep me"
    under = target / "sub"
    result = cli_slide(run_dir, slide_path, under)
    assert result.exit_code == 2, result.output
    assert f"--out {under}: cannot be created: {target} is a file" in result.output


def test_mpp_finer_than_level0_says_it_works_at_level0_native(run_dir, tmp_path, caplog):
    from PIL import Image

    img = np.full((192, 256, 3), 240, np.uint8)
    cv2.circle(img, (100, 90), 70, (160, 70, 150), -1)
    small = tmp_path / "small.png"
    Image.fromarray(img).save(small, dpi=(25400 / 0.5, 25400 / 0.5))  # 0.5 um/px
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        result = cli_slide(
            run_dir, small, out, mpp="0.01", downsample=None, tile="64", output_downsample="4"
        )
    assert result.exit_code == 0, result.output
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "0.01 um/px is finer than level 0 (0.5 um/px)" in warnings
    assert "working at level 0's native resolution" in warnings
    assert "tiles of 64 level-0 px, not upsampled" in warnings
    assert "using level 0 upsampled" not in warnings
    s = json.loads((out / "small_summary.json").read_text())
    assert s["level"] == 0 and s["tile_level_px"] == s["tile_model_px"] == 64
    assert s["map_shape_hw"] == [48, 64]
    assert s["map_downsample"] == pytest.approx(4.0) and s["map_mpp"] == pytest.approx(2.0)


def test_second_run_on_a_locked_folder_stops(run_dir, slide_path, tmp_path, monkeypatch):
    out = tmp_path / "busy"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live holder: this process
    monkeypatch.setattr(pipeline, "stitch_slide", lambda *a, **k: pytest.fail("ran tiles"))
    result = cli_slide(run_dir, slide_path, out)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # undo line wrapping of the message
    assert f"output folder {out} is in use by another run (pid {os.getpid()}" in text
    assert f"lock file {lock} exists" in text
    assert lock.read_text().split()[0] == str(os.getpid())  # someone else's: left alone
    with pytest.raises(OutputLockedError):
        run_slide_job(job(run_dir, slide_path, out, tile_working_px=32), progress=False)


def test_stale_lock_is_taken_over_and_lock_is_held_while_working(
    run_dir, slide_path, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "stale"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    dead = int(proc.stdout)
    (out / LOCK_NAME).write_text(f"{dead} {socket.gethostname()}\n")
    seen = []
    real_find_tissue = pipeline.find_tissue

    def find_tissue(reader, job):
        seen.append((out / LOCK_NAME).read_text().split()[0])
        return real_find_tissue(reader, job)

    monkeypatch.setattr(pipeline, "find_tissue", find_tissue)
    result = cli_slide(run_dir, slide_path, out)
    assert result.exit_code == 0, result.output
    assert seen == [str(os.getpid())]  # held by this run while it worked
    assert f"taking over the stale lock file {out / LOCK_NAME} (pid {dead} is not running)" in (
        caplog.text
    )
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_when_the_run_fails(run_dir, slide_path, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise DataError("synthetic.tif: unreadable tile at (0, 0)")

    monkeypatch.setattr(pipeline, "stitch_slide", broken)
    out = tmp_path / "existing"
    out.mkdir()
    result = cli_slide(run_dir, slide_path, out)
    assert result.exit_code == 2 and "unreadable tile" in result.output
    assert out.is_dir() and not (out / LOCK_NAME).exists()
    fresh = tmp_path / "fresh"
    result = cli_slide(run_dir, slide_path, fresh)
    assert result.exit_code == 2
    assert not fresh.exists()  # created for the lock, nothing written: removed again


def test_finished_run_is_not_overwritten_without_the_flag(
    run_dir, slide_path, tmp_path, monkeypatch
):
    out = tmp_path / "done"
    first = cli_slide(run_dir, slide_path, out)
    assert first.exit_code == 0, first.output
    summary = out / "synthetic_summary.json"
    before = summary.read_text()
    with monkeypatch.context() as m:
        no_work(m)
        again = cli_slide(run_dir, slide_path, out)
    assert again.exit_code == 2, again.output
    text = " ".join(again.output.split())
    assert f"error: --out {out}: already holds a finished run of synthetic.tif ({summary})" in text
    assert "pass --overwrite to replace it" in text
    assert summary.read_text() == before
    with pytest.raises(SlideJobError, match="set SlideJob.overwrite=True"):
        check_output(job(run_dir, slide_path, out))
    replaced = cli_slide(run_dir, slide_path, out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(summary.read_text())["seconds"] >= 0
    check_output(job(run_dir, slide_path, out, overwrite=True))  # no error
