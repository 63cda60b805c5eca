"""`lpdseg predict`: outputs, large images by sliding window, bad images and checkpoints.

The seam acceptance (a 2000 x 2000 image tiled at 224 with overlap, a model
whose output is a smooth function of position: no discontinuity at tile
borders, same scores as one full-image forward) is
``tests/test_wsi.py::test_sliding_window_reproduces_full_image_without_seams``;
here the same holds through ``image_scores``, the function ``predict`` calls.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.engine.checkpoint import load_checkpoint
from lpdseg.errors import CheckpointError, DataError
from lpdseg.exports.predictions import predict_images
from lpdseg.inference.predictor import image_scores

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path, Path]:
    """a_good.png, b_bad.png (truncated), c_good.png: sorted in this order in a folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    a, c = folder / "a_good.png", folder / "c_good.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(c)
    bad = folder / "b_bad.png"
    bad.write_bytes(c.read_bytes()[:100])  # truncated PNG
    return a, bad, c


def test_outputs_per_image(run_dir, images, tmp_path):
    a, _, c = images
    out = tmp_path / "out"
    done = predict_images(run_dir / "best.pt", [str(a), str(c)], out, progress=False)
    assert done == [a, c]
    mask = np.asarray(Image.open(out / "c_good_mask.png"))
    assert mask.shape == (64, 64) and mask.max() <= 4
    overlay = np.asarray(Image.open(out / "c_good_overlay.png"))
    assert overlay.shape[1] == 64 and overlay.shape[0] > 64  # legend below
    rows = list(csv.DictReader((out / "c_good_areas.csv").open()))
    assert [r["class"] for r in rows] == ["TUM", "STR", "LYM", "NEC", "background"]
    for i, r in enumerate(rows):
        assert int(r["pixels"]) == int((mask == i).sum())


def test_corrupt_image_stops_naming_it_and_keeps_earlier_outputs(run_dir, images, tmp_path):
    a, bad, c = images
    out = tmp_path / "out"
    with pytest.raises(DataError, match="b_bad.png"):
        predict_images(run_dir / "best.pt", [str(a.parent)], out, progress=False)
    assert (out / "a_good_mask.png").is_file() and (out / "a_good_areas.json").is_file()
    assert not (out / "c_good_mask.png").exists()  # stopped at the bad one
    # --skip-bad: the bad one is skipped and listed, the rest is written; earlier files kept
    done = predict_images(run_dir / "best.pt", [str(a.parent)], out, skip_bad=True, progress=False)
    assert done == [a, c]
    assert (out / "c_good_mask.png").is_file() and not (out / "b_bad_mask.png").exists()


def test_cli_bad_image_and_skip_bad(run_dir, images, tmp_path):
    a, bad, c = images
    runner = CliRunner()
    args = ["predict", str(run_dir / "best.pt"), str(a.parent), "--out", str(tmp_path / "o"), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "b_bad.png" in result.output
    assert (tmp_path / "o" / "a_good_overlay.png").is_file()
    result = runner.invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0 and "for 2 images" in result.output

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    result = runner.invoke(
        app, ["predict", str(run_dir / "best.pt"), str(notes), "--out", str(tmp_path / "o"), "-q"]
    )
    assert result.exit_code == 2 and "notes.txt" in result.output


def _altered(run_dir: Path, tmp_path: Path, name: str, change) -> Path:
    ckpt = load_checkpoint(run_dir / "best.pt")
    change(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        (
            "three_classes.pt",
            lambda ck: ck["config"]["data"].update(
                class_names=["A", "B", "C"], colors=[[1, 1, 1]] * 4
            ),
            "wrong shape",
        ),
        (
            "other_arch.pt",
            lambda ck: ck["config"]["model"].update(backbone="mit_b1"),
            "wrong shape",
        ),
        ("old_format.pt", lambda ck: ck.update(format_version=99), "format 99"),
    ],
)
def test_checkpoint_that_does_not_fit_is_refused(run_dir, images, tmp_path, name, change, match):
    path = _altered(run_dir, tmp_path, name, change)
    with pytest.raises(CheckpointError, match=rf"{name}.*{match}|{match}.*{name}"):
        predict_images(path, [str(images[0])], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_large_image_by_sliding_window_equals_full_forward():
    """2000 x 2000 tiled at 224 with overlap == one forward of the whole image."""
    h = w = 2000
    ys, xs = np.mgrid[0:h, 0:w]
    # a smooth image: each pixel's colour is a smooth function of its position
    image = np.stack(
        [
            127 + 120 * np.sin(2 * math.pi * xs / 900),
            127 + 120 * np.cos(2 * math.pi * ys / 700),
            127 + 120 * np.sin(2 * math.pi * (xs + ys) / 1300),
        ],
        -1,
    ).astype(np.uint8)
    calls = []

    def pointwise(x: torch.Tensor) -> torch.Tensor:  # scores: smooth per-pixel functions
        calls.append(tuple(x.shape))
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        return torch.stack([r - g, g - b, b - r, 0.1 * (r + g + b) - 0.2], 1)

    tiled_cfg = load_config("demo", ["eval.max_side=1024", "eval.tile=224", "eval.overlap=0.25"])
    whole_cfg = load_config("demo", ["eval.max_side=4096"])
    tiled = image_scores(image, pointwise, tiled_cfg.eval, 4, batch_size=32).argmax(0).numpy()
    assert all(s[-1] == 224 for s in calls) and sum(s[0] for s in calls) > 80
    calls.clear()
    whole = image_scores(image, pointwise, whole_cfg.eval, 4).argmax(0).numpy()
    assert calls == [(1, 3, h, w)]
    assert tiled.shape == whole.shape == (h, w)
    assert (tiled == whole).mean() > 0.9999  # only exact ties may differ
    assert len(np.unique(whole)) == 4
