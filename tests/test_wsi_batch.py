"""`lpdseg slide CKPT DIR | GLOB | manifest.csv --out OUT` (wsi.batch): one folder per slide,
OUT/slides_summary.csv, --skip-done, a bad slide among good ones, manifests, colliding stems,
slides shared over torchrun ranks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.errors import DataError
from lpdseg.wsi.batch import (
    SUMMARY_NAME,
    SlideEntry,
    collect_slides,
    folder_names,
    is_batch,
    read_manifest,
)

torch.set_num_threads(2)

W0, H0 = 256, 192
MPP = 0.5
# quick: level 1 (downsample 4 = 2 um/px), 32 px tiles
QUICK = ["--downsample", "4", "--tile", "32", "--output-downsample", "2", "-q"]


def _slide(writer, path: Path, seed: int, mpp: float | None = MPP) -> Path:
    rng = np.random.default_rng(seed)
    img = np.full((H0, W0, 3), 240, np.uint8)
    cv2.ellipse(img, (100 + 10 * seed, 90), (70, 50), 15, 0, 360, (160, 70, 150), -1)
    cv2.circle(img, (190, 130), 40, (220, 130, 180), -1)
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path, img, (1, 4), mpp, tile=64)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pyramid_writer) -> Path:
    """Two good slides, one text file named .svs, and a file that is no slide (ignored)."""
    root = tmp_path_factory.mktemp("batch") / "slides"
    _slide(pyramid_writer, root / "alpha.tif", 1)
    _slide(pyramid_writer, root / "beta.tif", 2)
    (root / "broken.svs").write_text("this is not a slide")
    (root / "notes.txt").write_text("not a slide suffix: left out of the batch")
    return root


@pytest.fixture(scope="module")
def ckpt(tiny_run_dir) -> Path:
    return tiny_run_dir / "best.pt"


def slide_cli(ckpt: Path, *args: str):
    return CliRunner().invoke(app, ["slide", str(ckpt), *args])


def read_csv(out: Path) -> dict[str, dict[str, str]]:
    with (out / SUMMARY_NAME).open() as f:
        return {Path(r["slide"]).name: r for r in csv.DictReader(f)}


def flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- inputs
def test_is_batch_and_collect(folder, tmp_path):
    assert not is_batch([str(folder / "alpha.tif")])  # one file: today's single slide
    assert not is_batch([str(tmp_path / "missing.svs")])  # fails as one slide does
    assert is_batch([str(folder)]) and is_batch([str(folder / "*.tif")])
    assert is_batch([str(folder / "alpha.tif"), str(folder / "beta.tif")])
    names = [e.path.name for e in collect_slides([str(folder)])]
    assert names == ["alpha.tif", "beta.tif", "broken.svs"]  # sorted; notes.txt left out
    assert [e.path.name for e in collect_slides([str(folder / "al*.tif")])] == ["alpha.tif"]
    both = collect_slides([str(folder / "alpha.tif"), str(folder / "*.tif")])
    assert [e.path.name for e in both] == ["alpha.tif", "beta.tif"]  # each once
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"folder {empty} holds no slide or image"):
        collect_slides([str(empty)])
    with pytest.raises(DataError, match=r"pattern .*\*\.ndpi matches no slide"):
        collect_slides([str(folder / "*.ndpi")])


def test_folder_names_are_unique_stems():
    entries = [SlideEntry(Path(p)) for p in ("a/x.svs", "b/x.tif", "c/X.ndpi", "y.svs", "x-2.tif")]
    assert folder_names(entries) == ["x", "x-2", "X-3", "y", "x-2-2"]


def test_manifest_rows(tmp_path):
    m = tmp_path / "list.csv"
    m.write_text("slide,slide_mpp,case\nsub/a.svs,0.25,1\n/abs/b.svs,,2\n\n")
    a, b = read_manifest(m)
    assert a.path == tmp_path / "sub/a.svs" and a.slide_mpp_um_per_px == 0.25
    assert b.path == Path("/abs/b.svs") and b.slide_mpp_um_per_px is None
    assert a.origin == f"{m} row 2"
    m.write_text("path,mpp\na.svs,0.5\n")
    with pytest.raises(DataError, match=f"manifest {m} has no 'slide' column"):
        read_manifest(m)
    m.write_text("slide,slide_mpp\na.svs,fast\n")
    with pytest.raises(DataError, match=f"manifest {m} row 2: slide_mpp 'fast' is not a pixel"):
        read_manifest(m)
    m.write_text("slide\n")
    with pytest.raises(DataError, match="lists no slides"):
        read_manifest(m)


# ---------------------------------------------------------------- the batch
def test_folder_with_a_bad_slide(ckpt, folder, tmp_path):
    out = tmp_path / "out"
    res = slide_cli(ckpt, str(folder), "--out", str(out), *QUICK)
    assert res.exit_code == 1, res.output  # some failed
    text = flat(res.output)
    assert f"3 slides: 2 done, 0 skipped, 1 failed; summary {out / SUMMARY_NAME}" in text
    assert f"failed: {folder / 'broken.svs'}: {folder / 'broken.svs'} is not a readable slide" in (
        text
    )
    rows = read_csv(out)
    assert list(rows) == ["alpha.tif", "beta.tif", "broken.svs"]
    bad = rows["broken.svs"]
    assert bad["status"] == "failed" and "broken.svs is not a readable slide" in bad["reason"]
    assert bad["seconds"] == "" and bad["tissue_area_mm2"] == ""
    for name in ("alpha", "beta"):
        row = rows[f"{name}.tif"]
        assert row["status"] == "done" and row["reason"] == "" and row["folder"] == name
        s = json.loads((out / name / f"{name}_summary.json").read_text())
        assert float(row["working_mpp_um_per_px"]) == pytest.approx(2.0)  # 4 x 0.5 um/px
        assert row["resolution_source"] == "--downsample"
        assert float(row["slide_mpp_um_per_px"]) == MPP and row["slide_mpp_source"] == "metadata"
        assert float(row["seconds"]) == pytest.approx(s["seconds"])
        areas = json.loads((out / name / f"{name}_areas.json").read_text())
        for a in areas:
            assert float(row[f"{a['class']}_area_mm2"]) == pytest.approx(
                a["area_um2"] / 1e6, rel=1e-5
            )
        assert float(row["tissue_area_mm2"]) == pytest.approx(
            sum(a["area_um2"] for a in areas) / 1e6, rel=1e-5
        )
        assert float(row["tissue_area_mm2"]) > 0
    assert not (out / "broken").exists()  # nothing written for it
    header = (out / SUMMARY_NAME).read_text().splitlines()[0].split(",")
    assert header[:4] == ["slide", "folder", "status", "reason"] and header[-1] == "seconds"
    assert "working_mpp_um_per_px" in header and "tissue_area_mm2" in header
    assert not list(out.glob(".*.tmp"))  # written atomically


def test_skip_done_resumes_and_finished_slides_are_not_redone(ckpt, folder, tmp_path):
    out = tmp_path / "out"
    pattern = str(folder / "*.tif")
    first = slide_cli(ckpt, pattern, "--out", str(out), *QUICK)
    assert first.exit_code == 0, first.output
    assert "2 slides: 2 done, 0 skipped, 0 failed" in flat(first.output)
    # an interruption after alpha: beta's summary (written last) is missing
    (out / "beta" / "beta_summary.json").unlink()
    alpha_before = (out / "alpha" / "alpha_summary.json").read_text()
    again = slide_cli(ckpt, pattern, "--out", str(out), "--skip-done", *QUICK)
    assert again.exit_code == 0, again.output
    assert "2 slides: 1 done, 1 skipped, 0 failed" in flat(again.output)
    rows = read_csv(out)
    assert rows["alpha.tif"]["status"] == "skipped"
    assert "finished before (alpha_summary.json" in rows["alpha.tif"]["reason"]
    assert rows["alpha.tif"]["tissue_area_mm2"] != ""  # read from its earlier run
    assert rows["beta.tif"]["status"] == "done"
    assert (out / "alpha" / "alpha_summary.json").read_text() == alpha_before
    # without --skip-done a finished slide is refused (listed), and the message says both ways
    third = slide_cli(ckpt, pattern, "--out", str(out), *QUICK)
    assert third.exit_code == 1, third.output
    reason = read_csv(out)["alpha.tif"]["reason"]
    assert "already holds a finished run of alpha.tif" in reason
    assert "pass --overwrite to replace it, or --skip-done to keep it" in reason
    both = slide_cli(ckpt, pattern, "--out", str(out), "--skip-done", "--overwrite", *QUICK)
    assert both.exit_code == 2
    assert "--skip-done and --overwrite contradict each other" in flat(both.output)


def test_manifest_with_slide_mpp_and_colliding_stems(ckpt, tmp_path, pyramid_writer):
    a = _slide(pyramid_writer, tmp_path / "site_a" / "case.tif", 1, mpp=None)
    b = _slide(pyramid_writer, tmp_path / "site_b" / "case.tif", 2)
    manifest = tmp_path / "lists" / "slides.csv"
    manifest.parent.mkdir()
    manifest.write_text("slide,slide_mpp\n../site_a/case.tif,0.5\n../site_b/case.tif,\n")
    out = tmp_path / "out"
    # no --downsample: the tiny model has no data.mpp, so the default 2 um/px on each slide
    res = slide_cli(ckpt, str(manifest), "--out", str(out), "--tile", "32", "-q")
    assert res.exit_code == 0, res.output
    with (out / SUMMARY_NAME).open() as f:
        rows = list(csv.DictReader(f))
    assert [r["folder"] for r in rows] == ["case", "case-2"]
    assert [Path(r["slide"]).resolve() for r in rows] == [a.resolve(), b.resolve()]
    assert rows[0]["slide_mpp_source"] == "manifest slide_mpp" and rows[0]["slide_mpp_um_per_px"]
    assert rows[1]["slide_mpp_source"] == "metadata"
    for r in rows:
        assert float(r["working_mpp_um_per_px"]) == pytest.approx(2.0)
        assert r["resolution_source"].startswith("default 2 um/px")
    s = json.loads((out / "case-2" / "case_summary.json").read_text())
    assert s["slide"] == str(b.parent.parent / "lists" / ".." / "site_b" / "case.tif")
    # a manifest without the slide column stops before any work, naming the file and column
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.svs\n")
    res = slide_cli(ckpt, str(bad), "--out", str(tmp_path / "o2"), "-q")
    assert res.exit_code == 2
    assert f"error: manifest {bad} has no 'slide' column" in flat(res.output)
    assert not (tmp_path / "o2").exists()


def test_one_slide_keeps_its_layout_and_skip_done_skips_it(ckpt, folder, tmp_path):
    slide = str(folder / "alpha.tif")
    res = slide_cli(ckpt, slide, "--out", str(tmp_path), *QUICK)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "alpha_summary.json").is_file()  # directly in --out, as before
    assert not (tmp_path / SUMMARY_NAME).exists()
    again = slide_cli(ckpt, slide, "--out", str(tmp_path), "--skip-done", *QUICK)
    assert again.exit_code == 0, again.output
    assert f"skipped: {slide} finished before ({tmp_path / 'alpha_summary.json'})" in flat(
        again.output
    )


def test_options_are_checked_before_any_slide(ckpt, folder, tmp_path):
    res = slide_cli(ckpt, str(folder), "--out", str(tmp_path / "o"), "--overlap", "1.5", "-q")
    assert res.exit_code == 2
    assert "error: --overlap 1.5: must be in [0, 1)" in res.output
    assert not (tmp_path / "o").exists()


def test_help_states_the_exit_codes():
    res = CliRunner().invoke(app, ["slide", "--help"])
    text = flat(res.output)
    assert "Exit code: 0 when every slide is done (or skipped), 1 when some failed" in text
    assert "--skip-done" in text and "--slide-mpp" in text


def test_slides_shared_over_torchrun_ranks(ckpt, folder, tmp_path):
    """2 ranks, 3 slides: rank 0 takes alpha and broken, rank 1 beta; same maps as one process."""
    from PIL import Image

    single = tmp_path / "single"
    res = slide_cli(ckpt, str(folder), "--out", str(single), *QUICK)
    assert res.exit_code == 1, res.output
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    shared = tmp_path / "shared"
    # not quiet (QUICK without -q): the log says how the tiles were shared
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lpdseg.cli", "slide", str(ckpt), str(folder), "--out", str(shared), *QUICK[:-1],
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0  # broken.svs failed: exit code 1 on the ranks
    output = flat(proc.stdout + proc.stderr)
    assert "3 slides: 2 done, 0 skipped, 1 failed" in output, output[-3000:]
    # every slide's tiles went to one rank alone, never split over the two
    assert "rank 0/1 processes" in output and "/2 processes" not in output
    rows = read_csv(shared)
    assert [rows[n]["status"] for n in ("alpha.tif", "beta.tif", "broken.svs")] == [
        "done", "done", "failed",
    ]  # fmt: skip
    for name in ("alpha", "beta"):
        a = np.asarray(Image.open(single / name / f"{name}_classmap.png"))
        b = np.asarray(Image.open(shared / name / f"{name}_classmap.png"))
        np.testing.assert_array_equal(a, b)
        # each slide was run whole by one rank
        s = json.loads((shared / name / f"{name}_summary.json").read_text())
        t = json.loads((single / name / f"{name}_summary.json").read_text())
        assert s["tiles"] == t["tiles"] > 0
