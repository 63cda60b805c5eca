"""`lpdseg slide` works at the model's own resolution: data.mpp in the config and checkpoint,
--slide-mpp for a slide's missing or wrong pixel size, the error when nothing is known, and
where each resolution came from in the summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.errors import ConfigError
from lpdseg.wsi import SlideJob, SlideJobError, open_image
from lpdseg.wsi.pipeline import RESOLUTION_DEFAULT, choose_level

torch.set_num_threads(2)

W0, H0 = 512, 384  # level 0; levels at downsamples 1, 4, 16
MPP = 0.25  # level 0: 0.25 um/px, level 1: 1 um/px, level 2: 4 um/px


def _slide(writer, path: Path, mpp: float | None) -> Path:
    img = np.full((H0, W0, 3), 240, np.uint8)
    cv2.ellipse(img, (200, 180), (150, 110), 10, 0, 360, (160, 70, 150), -1)
    cv2.circle(img, (400, 260), 80, (220, 130, 180), -1)
    noise = np.random.default_rng(0).integers(-20, 21, size=img.shape)
    img = np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)
    writer(path, img, (1, 4, 16), mpp, tile=64)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory, pyramid_writer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("res_slides")
    return {
        "mpp": _slide(pyramid_writer, root / "known.tif", MPP),
        "nompp": _slide(pyramid_writer, root / "unknown.tif", None),
    }


@pytest.fixture(scope="module")
def run_1um(tiny_run_factory) -> Path:
    """A tiny run trained with data.mpp=1.0 (recorded in its checkpoint)."""
    return tiny_run_factory("data.mpp=1.0")


def cli(ckpt: Path, slide: Path, out: Path, *args: str):
    return CliRunner().invoke(
        app,
        ["slide", str(ckpt), str(slide), "--out", str(out), "--tile", "32",
         "--output-downsample", "2", *args, "-q"],
    )  # fmt: skip


def summary(out: Path, slide: Path) -> dict:
    return json.loads((out / f"{slide.stem}_summary.json").read_text())


# ---------------------------------------------------------------- config
def test_data_mpp_is_validated_and_set_where_the_dataset_says():
    assert load_config("demo").data.mpp is None  # synthetic: no physical pixel size
    assert load_config("bcss_wsss").data.mpp == 0.25  # BCSS-WSSS: MPP-0.2500 patches
    assert load_config("pbip_bcss_wsss").data.mpp == 0.25
    assert load_config("luad_histoseg").data.mpp == 1.0  # 10x
    assert load_config("wsss4luad").data.mpp is None  # not documented
    assert load_config("demo", ["data.mpp=0.5"]).data.mpp == 0.5
    for bad in ("0", "-1", "100", "250"):
        with pytest.raises(ConfigError, match=r"data.mpp=.* must be in \(0, 100\) or null"):
            load_config("demo", [f"data.mpp={bad}"])


def test_checkpoint_records_data_mpp(run_1um, tiny_run_dir):
    from lpdseg.inference import load_model

    assert load_model(run_1um / "best.pt")[1].data.mpp == 1.0
    assert load_model(tiny_run_dir / "best.pt")[1].data.mpp is None


# ---------------------------------------------------------------- the job
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, "SlideJob.slide_mpp_um_per_px=0.0 must be > 0"),
        (100.0, "SlideJob.slide_mpp_um_per_px=100.0 must be < 100"),
        (float("inf"), "SlideJob.slide_mpp_um_per_px=inf must be a finite number"),
    ],
)
def test_slide_mpp_is_validated(value, message):
    with pytest.raises(SlideJobError) as err:
        SlideJob("best.pt", "s.svs", "out", slide_mpp_um_per_px=value)
    assert str(err.value).startswith(message)
    assert err.value.for_names({"slide_mpp_um_per_px": "--slide-mpp"}).startswith(
        f"--slide-mpp {value!r}: "
    )


# ---------------------------------------------------------------- the default
def test_default_is_the_checkpoints_mpp(run_1um, slides, tmp_path):
    res = cli(run_1um / "best.pt", slides["mpp"], tmp_path / "a")
    assert res.exit_code == 0, res.output
    s = summary(tmp_path / "a", slides["mpp"])
    assert s["level"] == 1 and s["level_downsample"] == pytest.approx(4.0)  # 1 um/px
    assert s["requested"] == "1 um/px" and s["resolution_source"] == "checkpoint data.mpp"
    assert s["working_mpp"] == pytest.approx(1.0) and s["model_mpp"] == 1.0
    assert s["slide_mpp"] == pytest.approx(MPP) and s["slide_mpp_source"] == "metadata"
    assert s["slide_mpp_metadata"] == pytest.approx(MPP)
    # --mpp still overrides the model's own
    res = cli(run_1um / "best.pt", slides["mpp"], tmp_path / "b", "--mpp", "4")
    assert res.exit_code == 0, res.output
    s = summary(tmp_path / "b", slides["mpp"])
    assert s["level"] == 2 and s["resolution_source"] == "--mpp"
    assert s["working_mpp"] == pytest.approx(4.0) and s["model_mpp"] == 1.0
    res = cli(run_1um / "best.pt", slides["mpp"], tmp_path / "c", "--downsample", "16")
    assert res.exit_code == 0, res.output
    s = summary(tmp_path / "c", slides["mpp"])
    assert s["level"] == 2 and s["resolution_source"] == "--downsample"
    assert s["requested"] == "downsample 16" and s["working_mpp"] == pytest.approx(4.0)


def test_model_without_mpp_works_at_the_default_with_a_warning(
    tiny_run_dir, slides, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING):
        res = cli(tiny_run_dir / "best.pt", slides["mpp"], tmp_path)
    assert res.exit_code == 0, res.output
    s = summary(tmp_path, slides["mpp"])
    assert (
        s["resolution_source"]
        == RESOLUTION_DEFAULT
        == ("default 2 um/px (the model records no data.mpp)")
    )
    assert s["model_mpp"] is None and s["working_mpp"] == pytest.approx(2.0)
    assert s["level"] == 1 and s["tile_level_px"] == 64  # 1 um/px level read at 2x the tile
    text = " ".join(caplog.text.split())
    assert "records no pixel size it was trained at (data.mpp)" in text
    assert "--mpp X" in text and "data.mpp=X" in text


# ---------------------------------------------------------------- --slide-mpp
def test_slide_mpp_gives_a_slide_without_one_its_pixel_size(run_1um, slides, tmp_path):
    out = tmp_path / "o"
    res = cli(run_1um / "best.pt", slides["nompp"], out, "--slide-mpp", "0.25")
    assert res.exit_code == 0, res.output
    s = summary(out, slides["nompp"])
    assert s["level"] == 1 and s["working_mpp"] == pytest.approx(1.0)
    assert s["slide_mpp"] == 0.25 and s["slide_mpp_source"] == "--slide-mpp"
    assert s["slide_mpp_metadata"] is None and s["mpp_level0"] == [0.25, 0.25]
    rows = json.loads((out / "unknown_areas.json").read_text())
    side_um = s["map_downsample"] * 0.25
    for row in rows:  # areas in um^2 from the given pixel size
        assert row["area_um2"] == pytest.approx(row["pixels"] * side_um**2)


def test_slide_mpp_replaces_a_wrong_one(run_1um, slides, tmp_path):
    # the file says 0.25 um/px; say it is 0.0625: 1 um/px is then level 2 (downsample 16)
    res = cli(run_1um / "best.pt", slides["mpp"], tmp_path, "--slide-mpp", "0.0625")
    assert res.exit_code == 0, res.output
    s = summary(tmp_path, slides["mpp"])
    assert s["level"] == 2 and s["slide_mpp"] == 0.0625
    assert s["slide_mpp_source"] == "--slide-mpp"
    assert s["slide_mpp_metadata"] == pytest.approx(MPP)


# ---------------------------------------------------------------- nothing known
def test_neither_resolution_known_is_an_error_saying_how_to_give_each(
    tiny_run_dir, slides, tmp_path
):
    out = tmp_path / "o"
    res = cli(tiny_run_dir / "best.pt", slides["nompp"], out)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"error: SLIDE {slides['nompp']}: has no pixel size (mpp) in its metadata" in text
    assert f"the model (CHECKPOINT {tiny_run_dir / 'best.pt'}) records none" in text
    assert "--slide-mpp X (micrometres per level-0 pixel)" in text
    assert "--mpp X" in text and "--downsample X" in text
    assert "train with data.mpp=X" in text
    assert "SlideJob." not in text and "Traceback" not in text
    assert not out.exists()  # nothing written, no folder left behind
    # the library's own words
    with open_image(slides["nompp"]) as reader, pytest.raises(SlideJobError) as err:
        choose_level(reader, SlideJob(tiny_run_dir / "best.pt", slides["nompp"], out), 32)
    assert "SlideJob.slide_mpp_um_per_px X" in str(err.value)


def test_model_mpp_on_a_slide_without_one_asks_for_its_pixel_size(run_1um, slides, tmp_path):
    res = cli(run_1um / "best.pt", slides["nompp"], tmp_path / "o")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"SLIDE {slides['nompp']}: has no pixel size (mpp) in its metadata" in text
    assert "the working resolution 1 um/px (checkpoint data.mpp) cannot be found on it" in text
    assert "--slide-mpp X" in text and "--downsample X" in text
    res = cli(run_1um / "best.pt", slides["nompp"], tmp_path / "p", "--mpp", "2")
    assert res.exit_code == 2 and "2 um/px (--mpp) cannot be found" in " ".join(res.output.split())
    # a downsample needs no pixel size: areas are then unknown
    res = cli(run_1um / "best.pt", slides["nompp"], tmp_path / "q", "--downsample", "4")
    assert res.exit_code == 0, res.output
    s = summary(tmp_path / "q", slides["nompp"])
    assert s["resolution_source"] == "--downsample" and s["working_mpp"] is None
    assert s["slide_mpp"] is None and s["slide_mpp_source"] is None
