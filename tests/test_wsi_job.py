"""wsi.job: SlideJob validation names the field; messages render with a front end's names."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpdseg.errors import ConfigError
from lpdseg.wsi.job import SlideJob, SlideJobError


def job(**kw) -> SlideJob:
    return SlideJob("best.pt", "slide.svs", "out", **kw)


def test_defaults_and_paths():
    j = job()
    assert j.checkpoint == Path("best.pt") and isinstance(j.out_dir, Path)
    assert j.tile_working_px is None  # the checkpoint's eval.tile
    assert j.overlap == 0.25 and j.batch_tiles == 8 and j.map_downsample_working_px == 8
    assert not j.overwrite
    files = j.output_files()
    assert list(files) == [
        "geojson",
        "overlay",
        "class_map",
        "areas_csv",
        "areas_json",
        "ome_tiff",
        "summary",
    ]
    assert "ome_tiff" not in job(ome_tiff=False).output_files()
    assert files["summary"] == j.summary_path == Path("out/slide_summary.json")
    assert files["geojson"] == Path("out/slide.geojson")
    assert "overwrite" in SlideJob.field_names()
    with pytest.raises(AttributeError):
        j.overlap = 0.5  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"overlap": 1.5}, "SlideJob.overlap=1.5 must be in [0, 1)"),
        ({"overlap": -0.1}, "SlideJob.overlap=-0.1 must be in [0, 1)"),
        ({"mpp_um_per_px": 0.0}, "SlideJob.mpp_um_per_px=0.0 must be > 0"),
        ({"downsample_level0_px": -2.0}, "SlideJob.downsample_level0_px=-2.0 must be > 0"),
        ({"tile_working_px": 8}, "SlideJob.tile_working_px=8 must be >= 16"),
        ({"tile_working_px": 32.5}, "SlideJob.tile_working_px=32.5 must be a whole number >= 16"),
        ({"batch_tiles": 0}, "SlideJob.batch_tiles=0 must be >= 1"),
        ({"map_downsample_working_px": 0}, "SlideJob.map_downsample_working_px=0 must be >= 1"),
        ({"threshold": 1.2}, "SlideJob.threshold=1.2 must be in [0, 1]"),
        ({"thumbnail_side_px": 4}, "SlideJob.thumbnail_side_px=4 must be >= 16"),
        ({"tissue_min_fraction": 2.0}, "SlideJob.tissue_min_fraction=2.0 must be in [0, 1]"),
        ({"overlay_side_px": 0}, "SlideJob.overlay_side_px=0 must be >= 16"),
        ({"min_region_area_map_px": -1.0}, "SlideJob.min_region_area_map_px=-1.0 must be >= 0"),
        ({"read_workers": -1}, "SlideJob.read_workers=-1 must be >= 0"),
        ({"device": "tpu"}, "SlideJob.device=tpu must be auto, cpu, cuda or cuda:N"),
        ({"overwrite": "yes"}, "SlideJob.overwrite=yes must be True or False"),
        ({"tta": 1}, "SlideJob.tta=1 must be True or False"),
        ({"overlap": float("nan")}, "SlideJob.overlap=nan must be a finite number"),
    ],
)
def test_validation_names_the_field(kw, message):
    with pytest.raises(SlideJobError) as err:
        job(**kw)
    assert str(err.value) == message
    assert isinstance(err.value, ConfigError)  # a user error: the CLI exits 2
    field = next(iter(kw))
    assert err.value.field == field


def test_both_resolutions_is_an_error_naming_both_fields():
    with pytest.raises(SlideJobError) as err:
        job(mpp_um_per_px=2.0, downsample_level0_px=4.0)
    assert str(err.value) == (
        "SlideJob.downsample_level0_px=4.0 cannot be combined with "
        "SlideJob.mpp_um_per_px=2.0: give one working resolution, not both"
    )
    flags = {"mpp_um_per_px": "--mpp", "downsample_level0_px": "--downsample"}
    assert err.value.for_names(flags) == (
        "--downsample 4.0: cannot be combined with --mpp 2.0: give one working resolution, not both"
    )


def test_bad_paths():
    with pytest.raises(SlideJobError, match="SlideJob.out_dir= must be a file system path"):
        SlideJob("best.pt", "slide.svs", "")
    with pytest.raises(SlideJobError, match="SlideJob.slide=None must be a file system path"):
        SlideJob("best.pt", None, "out")  # type: ignore[arg-type]


def test_for_names_renders_flags_and_remedies():
    err = SlideJobError("overlap", 1.5, "must be in [0, 1)")
    assert err.for_names({"overlap": "--overlap"}) == "--overlap 1.5: must be in [0, 1)"
    assert err.for_names({}) == str(err)  # unnamed fields keep the library form
    err = SlideJobError(
        "out_dir", Path("o"), "already holds a finished run", remedy=("overwrite", "to replace it")
    )
    assert str(err) == (
        "SlideJob.out_dir=o already holds a finished run; set SlideJob.overwrite=True to replace it"
    )
    assert err.for_names({"out_dir": "--out", "overwrite": "--overwrite"}) == (
        "--out o: already holds a finished run; pass --overwrite to replace it"
    )
