"""Decode errors name the file, skip-bad skips it, and every hint names an option that exists.

Covered callers: predict, explain, training (listing and reading), eval, pseudo
and bank building. Each case: the exit code (or error), a message naming the
file and the fix *in the caller's words* (``--skip-bad`` for a command flag,
``data.skip_bad=true`` for a run config, ``skip_bad=True`` for the Python API),
and outputs written earlier left byte-identical.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import DataConfig, load_config
from lpdseg.data.datasets import Sample, list_split
from lpdseg.data.loaders import make_eval_loader, make_train_loader, resolve_data
from lpdseg.data.synthetic import write_dataset
from lpdseg.data.transforms import EvalTransform
from lpdseg.engine.bank import build_bank
from lpdseg.engine.train import train
from lpdseg.errors import DataError
from lpdseg.imageio import MAX_PIXELS_ENV
from lpdseg.inference import write_pseudo_masks

torch.set_num_threads(2)


# ---------------------------------------------------------------- helpers


def tiny_png(path: Path) -> Path:
    Image.new("RGB", (1, 1), (200, 100, 150)).save(path)
    return path


def truncated_png(path: Path, size: int = 32) -> Path:
    """A PNG whose header is fine and whose pixel data stops half-way (passes header checks)."""
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def small_data(root: Path, n_train: int = 8, n_val: int = 2, n_test: int = 2) -> Path:
    write_dataset(root, n_train, n_val, n_test, size=32, seed=0, progress=False)
    return root


def invoke(args: list[str], code: int, *words: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    for w in words:
        assert w in result.output, (w, result.output)
    return result.output


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


@pytest.fixture
def bad_images(run_dir, tmp_path, png_bomb) -> Path:
    """a_good.png (a real test image), b_tiny.png (1 x 1), c_bomb.png (20000^2 header)."""
    folder = tmp_path / "images"
    folder.mkdir()
    src = sorted((run_dir.parent / "data" / "test" / "img").glob("*.png"))[0]
    shutil.copy(src, folder / "a_good.png")
    tiny_png(folder / "b_tiny.png")
    png_bomb(folder / "c_bomb.png")
    return folder


# ---------------------------------------------------------------- predict
def test_predict_skip_bad_skips_tiny_and_bomb_images_and_lists_them(
    run_dir, bad_images, tmp_path, caplog, snapshot
):
    def outputs(folder: Path) -> dict[str, bytes]:  # the per-image files (not the run record)
        return {k: v for k, v in snapshot(folder).items() if k != "predict_run.json"}

    ckpt = str(run_dir / "best.pt")
    ref = tmp_path / "ref"
    invoke(["predict", ckpt, str(bad_images / "a_good.png"), "--out", str(ref), "-q"], 0)
    expected = outputs(ref)
    assert sorted(expected) == [f"a_good_{s}" for s in ("areas.csv", "areas.json", "mask.png",
                                                         "overlay.png")]  # fmt: skip

    def args(out: Path) -> list[str]:
        return ["predict", ckpt, str(bad_images), "--out", str(out), "-q"]

    invoke(args(tmp_path / "o1"), 2, "b_tiny.png", "at least 8 px")
    assert outputs(tmp_path / "o1").items() <= expected.items()  # nothing for the bad ones
    tiny = (bad_images / "b_tiny.png").read_bytes()
    (bad_images / "b_tiny.png").unlink()
    invoke(args(tmp_path / "o2"), 2, "c_bomb.png", MAX_PIXELS_ENV)
    (bad_images / "b_tiny.png").write_bytes(tiny)
    with caplog.at_level(logging.WARNING):
        invoke([*args(tmp_path / "o3"), "--skip-bad"], 0, "for 1 images")
    assert "b_tiny.png" in caplog.text and "c_bomb.png" in caplog.text
    assert outputs(tmp_path / "o3") == expected
    assert outputs(ref) == expected


# ---------------------------------------------------------------- explain
def test_explain_skip_bad_skips_bad_images_and_training_patches(
    run_dir, bad_images, tmp_path, caplog, snapshot
):
    (bad_images / "d_text.png").write_text("not a PNG")
    out = tmp_path / "explain"
    ckpt = str(run_dir / "best.pt")
    invoke(["explain", ckpt, str(bad_images / "a_good.png"), "--out", str(out), "-q"], 0)
    before = snapshot(out)
    assert sorted(before) == ["a_good_prototypes.png", "summary_prototypes.png"]
    args = ["explain", ckpt, str(bad_images), "--out", str(out), "-q"]
    invoke(args, 2, "b_tiny.png", "at least 8 px", "pass --skip-bad")
    assert snapshot(out) == before  # every header is checked before the first figure
    with caplog.at_level(logging.WARNING):
        invoke([*args, "--skip-bad"], 0, "wrote 2 figures")
    for name in ("b_tiny.png", "c_bomb.png", "d_text.png"):
        assert name in caplog.text

    # a training patch whose pixels are cut short: found when read, named, skipped with --skip-bad
    data = tmp_path / "train_data"
    shutil.copytree(run_dir.parent / "data" / "training", data / "training")
    truncated_png(data / "training" / "zz+s[1000].png")
    fresh = tmp_path / "with_patches"
    args = ["explain", ckpt, str(bad_images / "a_good.png"), "--out", str(fresh), "-q",
            "--train-dir", str(data), "--per-prototype", "2"]  # fmt: skip
    invoke(args, 2, "zz+s[1000].png", "truncated", "pass --skip-bad")
    assert snapshot(fresh) == {}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        invoke([*args, "--skip-bad"], 0, "wrote 2 figures")
    assert "zz+s[1000].png" in caplog.text


# ---------------------------------------------------------------- training and eval, when read
def test_undecodable_training_and_val_images_are_named_or_skipped_when_read(
    tmp_path, caplog, overrides
):
    data = small_data(tmp_path / "data")
    bad_train = truncated_png(data / "training" / "zz+s[1000].png")
    bad_val = truncated_png(sorted((data / "val" / "img").glob("*.png"))[0])
    out = tmp_path / "run"
    cfg = load_config("demo", overrides(data, out))
    bundle = resolve_data(cfg)  # the headers are fine: it is the pixels that fail
    ds = make_train_loader(cfg, bundle, epoch=0).dataset
    index = [s.image for s in ds.samples].index(bad_train)
    with pytest.raises(DataError) as info:
        ds[index]
    assert bad_train.name in str(info.value) and "set data.skip_bad=true" in str(info.value)
    with pytest.raises(DataError) as info:
        list(make_eval_loader(cfg, bundle, "val"))
    assert bad_val.name in str(info.value) and "set data.skip_bad=true" in str(info.value)

    skip = load_config("demo", overrides(data, out, "data.skip_bad=true"))
    bundle = resolve_data(skip)
    ds = make_train_loader(skip, bundle, epoch=0).dataset
    with caplog.at_level(logging.WARNING):
        item = ds[index]  # the next readable sample, augmented with this index's seed
    assert item["name"] != bad_train.name and bad_train.name in caplog.text
    assert ds[index]["image"].equal(item["image"])  # deterministic
    names = [n for batch in make_eval_loader(skip, bundle, "val") for n in batch["name"]]
    assert names == [p.name for p in sorted((data / "val" / "img").glob("*.png"))][1:]


def test_training_eval_and_pseudo_honour_data_skip_bad(
    run_dir, tmp_path, caplog, snapshot, png_bomb, overrides
):
    data = small_data(tmp_path / "data")
    truncated = truncated_png(data / "training" / "zz+s[1000].png")
    bomb = png_bomb(data / "training" / "zy+s[0100].png")
    test_mask = sorted((data / "test" / "mask").glob("*.png"))[0]
    Image.fromarray(np.full((32, 32), 9, np.uint8), mode="L").save(test_mask)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        summary = train(
            load_config("demo", overrides(data, out, "data.skip_bad=true")), progress=False
        )
    assert summary["step"] == 2 and (out / "best.pt").is_file()
    assert "test" in summary  # the test split was scored without the bad mask
    for path in (truncated, bomb, test_mask):
        assert path.name in caplog.text

    # eval: the checkpoint's data.skip_bad=true skips the bad test mask ...
    invoke(["eval", str(out / "best.pt"), "--out", str(tmp_path / "e1"), "--no-tta", "-q"], 0)
    before = snapshot(tmp_path / "e1")
    assert "test_metrics.json" in before
    # ... while a run without it stops before scoring, naming the mask and what is wrong
    fresh = tmp_path / "e2"
    invoke(
        ["eval", str(run_dir / "best.pt"), "--data", str(data), "--out", str(fresh),
         "--no-tta", "-q"],
        2, test_mask.name, "outside the valid range",
    )  # fmt: skip
    assert snapshot(fresh) == {} and snapshot(tmp_path / "e1") == before

    # pseudo: the bomb header is skipped at the start, named in the log
    truncated.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = write_pseudo_masks(
            out / "best.pt", tmp_path / "pseudo", tta=False, progress=False
        )
    assert summary["images"] == 8 and bomb.name in caplog.text
    rows = list(csv.DictReader((tmp_path / "pseudo" / "manifest.csv").open()))
    assert bomb.name not in {Path(r["image"]).name for r in rows}


# ---------------------------------------------------------------- bank
class _MeanEncoder:
    """A stand-in frozen encoder: the mean colour of a patch."""

    embed_dim = 3

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) + 1.0


def test_bank_skip_bad_skips_unreadable_patches(tmp_path, caplog):
    rng = np.random.default_rng(0)
    samples = []
    for c in range(4):
        for i in range(2):
            path = tmp_path / f"{c}_{i}.png"
            Image.fromarray(rng.integers(0, 200, (16, 16, 3), dtype=np.uint8)).save(path)
            samples.append(Sample(path, np.eye(4, dtype=np.uint8)[c], None))
    bad = truncated_png(tmp_path / "bad.png")
    samples.insert(3, Sample(bad, np.eye(4, dtype=np.uint8)[1], None))
    kw = dict(encoder_name="mean", clusters=1, n_keep=2, progress=False)
    args = (samples, ["A", "B", "C", "D"], _MeanEncoder(), EvalTransform())
    with pytest.raises(DataError) as info:
        build_bank(*args, **kw)
    assert "bad.png" in str(info.value) and "pass skip_bad=True" in str(info.value)
    with caplog.at_level(logging.WARNING):
        bank = build_bank(*args, **kw, skip_bad=True)
    assert "bad.png" in caplog.text
    assert bank.settings["skipped_unreadable"] == [str(bad)]
    assert "bad.png" not in {f for cls in bank.members for m in cls for f in m}


def test_bank_cli_skip_bad(tmp_path):
    data = small_data(tmp_path / "data", n_train=12, n_val=0, n_test=0)
    (data / "training" / "zz+s[1000].png").write_text("not a PNG")
    out = tmp_path / "bank.pt"
    base = ["bank", "pbip_demo", f"data.root={data}", "data.crop_size=32", "--out", str(out),
            "--clusters", "1", "--n-keep", "1", "--allow-fewer", "--no-sheet", "-q"]  # fmt: skip
    invoke(base, 2, "zz+s[1000].png", "not a readable image", "--skip-bad", "data.skip_bad=true")
    assert not out.exists()
    invoke([*base, "--skip-bad"], 0, "wrote")
    assert out.is_file()


# ---------------------------------------------------------------- hints name real options
def test_skip_hints_are_in_the_callers_words_and_name_options_that_exist(tmp_path, overrides):
    data = small_data(tmp_path / "data", n_val=0, n_test=0)
    bad = data / "training" / "zz+s[1000].png"
    bad.write_text("not a PNG")
    with pytest.raises(DataError) as info:  # the Python API: its keyword
        list_split(data, "bcss_wsss", "train", check_images=True)
    assert bad.name in str(info.value) and "pass skip_bad=True" in str(info.value)
    assert "--skip-bad" not in str(info.value)
    out = tmp_path / "run"
    msg = invoke(["train", "demo", *overrides(data, out), "-q"], 2, bad.name)  # a run config
    assert "set data.skip_bad=true" in msg and "--skip-bad" not in msg and "=True" not in msg
    assert not out.exists()
    # what the hints name exists: the config key, and each command's flag
    assert load_config("demo", ["data.skip_bad=true"]).data.skip_bad is True
    for command in ("predict", "explain", "bank"):
        invoke([command, "--help"], 0, "--skip-bad")


def test_csv_outside_root_hint_names_an_option_that_exists(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    (root / "train.csv").write_text("image,x,y\na.png,1,0\n../outside.png,0,1\n")
    with pytest.raises(DataError) as info:  # the Python API names its keyword ...
        list_split(root, "csv", "train")
    assert "outside.png" in str(info.value) and "allow_outside_root=True" in str(info.value)
    assert len(list_split(root, "csv", "train", allow_outside_root=True)[0]) == 2  # ... that works
    cfg = load_config("demo", [f"data.root={root}", "data.format=csv", "data.class_names=[x,y]"])
    with pytest.raises(DataError) as info:  # a run config has no such key: only moving works
        resolve_data(cfg)
    msg = str(info.value)
    assert "outside.png" in msg and "move the file under it" in msg
    assert "set data.skip_bad=true" in msg
    keys = {f.name for f in dataclasses.fields(DataConfig)}
    if "allow_outside_root" in keys:
        assert "data.allow_outside_root=true" in msg
    else:
        assert "allow_outside_root" not in msg
