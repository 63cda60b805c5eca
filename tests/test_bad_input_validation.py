"""Validate everything before the work starts: options, and every split's files.

Each case: the exit code (or the error type), a message naming the file or key
and the fix, and outputs written earlier left byte-identical.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.data.datasets import Sample, list_split
from lpdseg.data.loaders import check_pseudo_samples, resolve_data
from lpdseg.data.synthetic import write_dataset
from lpdseg.errors import ConfigError, DataError
from lpdseg.explain import explain, top_patches
from lpdseg.imageio import MAX_PIXELS_ENV
from lpdseg.inference import Predictor, load_model

torch.set_num_threads(2)


# ---------------------------------------------------------------- helpers


def small_data(root: Path, n_val: int = 3, n_test: int = 2) -> Path:
    write_dataset(root, n_train=8, n_val=n_val, n_test=n_test, size=32, seed=0, progress=False)
    return root


def masks(root: Path, split: str) -> list[Path]:
    return sorted((root / split / "mask").glob("*.png"))


def write_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def cli_fails(args: list[str], *words: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output, (w, result.output)
    return result.output


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


@pytest.fixture(scope="module")
def test_image(run_dir) -> Path:
    return sorted((run_dir.parent / "data" / "test" / "img").glob("*.png"))[0]


# ---------------------------------------------------------------- options
def test_predict_threshold_and_batch_size_refused_before_any_output(
    run_dir, test_image, tmp_path, snapshot
):
    out = tmp_path / "pred"
    base = ["predict", str(run_dir / "best.pt"), str(test_image), "--out", str(out), "-q"]
    assert CliRunner().invoke(app, base).exit_code == 0
    before = snapshot(out)
    assert before
    cli_fails([*base, "--threshold", "5"], "threshold=5 must be in [0, 1] (--threshold)")
    cli_fails([*base, "--threshold", "-0.5"], "threshold=-0.5", "--threshold")
    cli_fails([*base, "--batch-size", "0"], "batch_size=0", ">= 1", "--batch-size")
    assert snapshot(out) == before
    fresh = tmp_path / "never"
    cli_fails(["predict", str(run_dir / "best.pt"), str(test_image), "--out", str(fresh),
               "--threshold", "5", "-q"], "--threshold")  # fmt: skip
    assert not fresh.exists()  # refused before the output folder is made
    # the one check in Predictor covers predict, slide and report alike
    model, cfg = load_model(run_dir / "best.pt")
    for kwargs, word in [
        ({"threshold": float("nan")}, "--threshold"),
        ({"threshold": 1.5}, "--threshold"),
        ({"batch_size": -3}, "--batch-size"),
        ({"batch_size": 2.5}, "--batch-size"),
        ({"gate": "label"}, "'classifier' or 'labels'"),
    ]:
        with pytest.raises(ConfigError, match="must be") as info:
            Predictor(model, cfg, **kwargs)
        assert word in str(info.value)
    Predictor(model, cfg, threshold=0.0, batch_size=1)  # the edges are valid
    Predictor(model, cfg, threshold=1.0)


def test_explain_per_prototype_refused_before_any_output(run_dir, test_image, tmp_path):
    out = tmp_path / "explain"
    base = ["explain", str(run_dir / "best.pt"), str(test_image), "--out", str(out), "-q"]
    for bad in ("0", "-1"):
        cli_fails([*base, "--per-prototype", bad], "--per-prototype")
    assert not out.exists()
    for bad in (0, -1):
        with pytest.raises(ConfigError) as info:
            explain(run_dir / "best.pt", [test_image], out, per_prototype=bad, progress=False)
        assert f"per_prototype={bad}" in str(info.value) and "(--per-prototype)" in str(info.value)
        assert ">= 1" in str(info.value)
    assert not out.exists()
    model, _ = load_model(run_dir / "best.pt")
    with pytest.raises(ConfigError, match="per_prototype=-1"):
        top_patches(model, [], per_prototype=-1, progress=False)


def test_bank_cluster_options_refused_by_the_cli(tmp_path):
    out = tmp_path / "bank.pt"
    cli_fails(["bank", "pbip_demo", "--clusters", "0", "--out", str(out)], "--clusters")
    cli_fails(["bank", "pbip_demo", "--n-keep", "-1", "--out", str(out)], "--n-keep")
    assert not out.exists()


# ---------------------------------------------------------------- val / test at start
def test_bad_val_mask_stops_training_before_the_first_step(tmp_path, overrides):
    data = small_data(tmp_path / "data")
    val = masks(data, "val")
    write_mask(val[0], np.zeros((16, 16)))  # its image is 32 x 32
    out = tmp_path / "run"
    msg = cli_fails(["train", "demo", *overrides(data, out), "-q"], val[0].name, "16x16")
    assert "data.skip_bad=true" in msg and "--skip-bad" not in msg
    assert not out.exists()  # nothing trained, nothing written

    # a value outside the class set (0..3 classes, 4 background, 255 ignore), in val and in test
    write_mask(val[0], np.full((32, 32), 4))
    write_mask(val[1], np.full((32, 32), 9))
    cfg = load_config("demo", overrides(data, out))
    with pytest.raises(DataError) as info:
        resolve_data(cfg)
    assert val[1].name in str(info.value) and "outside the valid range" in str(info.value)
    assert "data.skip_bad=true" in str(info.value)
    write_mask(val[1], np.full((32, 32), 4))
    test_mask = masks(data, "test")[0]
    write_mask(test_mask, np.full((32, 32), 7))
    with pytest.raises(DataError, match=test_mask.name):
        resolve_data(cfg)
    # eval checks its own split only: the val split is fine, the test split is not
    assert resolve_data(cfg, need_train=False).eval_samples == {}


def test_skip_bad_skips_bad_val_and_test_masks_and_training_still_saves_a_checkpoint(
    tmp_path, caplog, overrides
):
    data = small_data(tmp_path / "data")
    val, test = masks(data, "val"), masks(data, "test")
    write_mask(val[0], np.zeros((16, 16)))
    write_mask(test[1], np.full((32, 32), 9))
    out = tmp_path / "run"
    cfg = load_config("demo", overrides(data, out, "data.skip_bad=true"))
    with caplog.at_level(logging.WARNING):
        bundle = resolve_data(cfg)
    assert {b.path for b in bundle.bad} == {val[0], test[1]}
    assert val[0].name in caplog.text and test[1].name in caplog.text
    assert len(bundle.eval_samples["val"]) == 2 and len(bundle.eval_samples["test"]) == 1
    result = CliRunner().invoke(
        app, ["train", "demo", *overrides(data, out, "data.skip_bad=true"), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    # every val image bad: refused at start, not after an epoch
    write_mask(val[1], np.zeros((8, 8)))
    write_mask(val[2], np.zeros((8, 8)))
    with pytest.raises(DataError, match="no usable val images"):
        resolve_data(cfg)


# ---------------------------------------------------------------- training headers at start
def test_bad_training_headers_are_found_at_start(tmp_path, caplog, png_bomb, overrides, bmp_bomb):
    data = small_data(tmp_path / "data", n_val=2, n_test=1)
    train = data / "training"
    bad = {
        png_bomb(train / "zz+s[1000].png"): MAX_PIXELS_ENV,
        bmp_bomb(train / "zy+s[0100].bmp"): MAX_PIXELS_ENV,  # PIL's own bomb error
        train / "zx+s[0010].png": "at least 8 px",
        train / "zw+s[0001].png": "not a readable image",
    }
    Image.new("RGB", (1, 1)).save(train / "zx+s[0010].png")
    (train / "zw+s[0001].png").write_text("not a PNG")
    out = tmp_path / "run"
    cfg = load_config("demo", overrides(data, out))
    for path, word in bad.items():  # each one alone stops the run before it starts
        others = {p: p.read_bytes() for p in bad if p != path}
        for p in others:
            p.unlink()
        with pytest.raises(DataError) as info:
            resolve_data(cfg)
        msg = str(info.value)
        assert path.name in msg and word in msg and "data.skip_bad=true" in msg, msg
        # list_split's header check: a DataError (never PIL's DecompressionBombError)
        # whose fix is list_split's own keyword
        with pytest.raises(DataError) as info:
            list_split(data, "bcss_wsss", "train", check_images=True)
        assert path.name in str(info.value) and "pass skip_bad=True" in str(info.value)
        for p, content in others.items():
            p.write_bytes(content)
    msg = cli_fails(["train", "demo", *overrides(data, out), "-q"], "data.skip_bad=true")
    assert any(p.name in msg for p in bad) and not out.exists()

    skip = load_config("demo", overrides(data, out, "data.skip_bad=true"))
    with caplog.at_level(logging.WARNING):
        bundle = resolve_data(skip)
    reasons = {b.path: b.reason for b in bundle.bad}
    assert set(reasons) == set(bad)
    for path, word in bad.items():
        assert word in reasons[path] and path.name in caplog.text
    assert len(bundle.train) == 8


def test_stage2_pseudo_pairs_are_checked_at_start(tmp_path, png_bomb):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("L", (32, 32)).save(tmp_path / "a_mask.png")
    Image.new("L", (16, 32)).save(tmp_path / "b_mask.png")
    png_bomb(tmp_path / "c.png")
    label = np.array([1, 0, 0, 0], np.uint8)
    good = Sample(tmp_path / "a.png", label, tmp_path / "a_mask.png")
    wrong = Sample(tmp_path / "a.png", label, tmp_path / "b_mask.png")
    bomb = Sample(tmp_path / "c.png", label, tmp_path / "a_mask.png")
    with pytest.raises(DataError, match="b_mask.png.*lpdseg pseudo.*data.skip_bad=true"):
        check_pseudo_samples([good, wrong], skip_bad=False)
    with pytest.raises(DataError, match=f"c.png.*{MAX_PIXELS_ENV}"):
        check_pseudo_samples([bomb], skip_bad=False)
    kept, skipped = check_pseudo_samples([good, wrong, bomb], skip_bad=True)
    assert kept == [good] and [b.path.name for b in skipped] == ["b_mask.png", "c.png"]
