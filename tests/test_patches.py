"""Patch-from-masks builder on small synthetic image + mask pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.data.datasets import list_split, parse_label, read_mask
from lpdseg.data.loaders import read_pseudo_manifest
from lpdseg.data.patches import (
    PatchRule,
    build_patch_dataset,
    patch_name,
    split_stems,
    tile_pair,
    tile_starts,
)
from lpdseg.errors import ConfigError, DataError

PALETTE = [0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255]  # WSSS4LUAD colours


def _write_pair(folder: Path, stem: str, mask: np.ndarray, palette: bool = True) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem) + mask.size)
    image = rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "img" / f"{stem}.png")
    m = Image.fromarray(mask.astype(np.uint8))
    if palette:
        m = m.convert("P")
        m.putpalette(PALETTE)
    m.save(folder / "mask" / f"{stem}.png")


@pytest.fixture()
def pairs(tmp_path) -> Path:
    # "a": 96 x 144; left third tumor, middle stroma, right background, with a
    # 2 x 2 px normal speck (0.17 % of a 48 px patch: below the 2 % rule)
    a = np.zeros((96, 144), np.uint8)
    a[:, 48:96] = 1
    a[:, 96:] = 3
    a[10:12, 10:12] = 2
    # "b": 40 x 40 (smaller than a patch: padded); all normal
    b = np.full((40, 40), 2, np.uint8)
    # "c": 60 x 60; half tumor, half stroma (held out)
    c = np.zeros((60, 60), np.uint8)
    c[30:] = 1
    _write_pair(tmp_path / "src", "a", a)
    _write_pair(tmp_path / "src", "b", b)
    _write_pair(tmp_path / "src", "c", c)
    return tmp_path / "src"


def test_tile_starts_cover_the_border():
    assert tile_starts(144, 48, 48) == [0, 48, 96]
    assert tile_starts(100, 48, 48) == [0, 48, 52]  # last tile moved inward
    assert tile_starts(30, 48, 24) == [0]
    assert tile_starts(96, 48, 24) == [0, 24, 48]


def test_labels_follow_the_min_fraction_rule():
    mask = np.zeros((48, 48), np.uint8)
    mask[:, :1] = 1  # 48 / 2304 = 2.08 % stroma
    mask[0, 1] = 2  # one normal pixel
    image = np.zeros((48, 48, 3), np.uint8)
    ((_, _, _, _, label, _),) = tile_pair(image, mask, 3, PatchRule(48, 48, 0.02, 0.5))
    assert label.tolist() == [1, 1, 0]
    ((_, _, _, _, label, _),) = tile_pair(image, mask, 3, PatchRule(48, 48, 0.03, 0.5))
    assert label.tolist() == [1, 0, 0]


def test_build_wsss4luad_layout(pairs, tmp_path):
    out = tmp_path / "out"
    rule = PatchRule(size=48, stride=48, min_fraction=0.02, max_background=0.5)
    summary = build_patch_dataset(
        pairs / "img", pairs / "mask", out, fmt="wsss4luad", rule=rule, test_stems=["c"]
    )
    names = sorted(p.name for p in (out / "train").iterdir())
    # a: 2 rows x 3 columns, right column dropped (background); b: one padded patch
    assert names == sorted(
        [
            "a-0-0-[1, 0, 0].png",  # the normal speck is below 2 %
            "a-0-48-[1, 0, 0].png",
            "a-48-0-[0, 1, 0].png",
            "a-48-48-[0, 1, 0].png",
            "b-0-0-[0, 0, 1].png",
        ]
    )
    assert summary["dropped"] == {"background": 2, "no_class": 0}
    assert summary["splits"] == {"train": ["a", "b"], "val": [], "test": ["c"]}
    # b was padded: 48 x 48 patch, padding ignored in the true mask
    assert Image.open(out / "train" / "b-0-0-[0, 0, 1].png").size == (48, 48)
    sup = read_mask(out / "supervised" / "masks" / "b-0-0-[0, 0, 1].png", 3)
    assert (sup[:40, :40] == 2).all() and (sup[40:] == 255).all() and (sup[:, 40:] == 255).all()
    # the ordinary readers take the folder
    train, _ = list_split(out, "wsss4luad", "train")
    assert len(train) == 5 and train[-1].label.tolist() == [0, 0, 1]
    test, _ = list_split(out, "wsss4luad", "test")
    assert [s.image.name for s in test] == ["c.png"]
    assert Image.open(test[0].mask).mode == "P"  # held-out masks copied unchanged
    manifest = read_pseudo_manifest(out / "supervised")
    assert len(manifest) == 5 and all(s.mask.is_file() and s.image.is_file() for s in manifest)
    # the rule is recorded next to the patches
    recorded = json.loads((out / "patches.json").read_text())
    assert recorded["rule"]["min_fraction"] == 0.02 and recorded["rule"]["size"] == 48
    assert "covers >= min_fraction" in recorded["rule"]["label"]


def test_overlapping_stride_and_other_formats(pairs, tmp_path):
    rule = PatchRule(size=48, stride=24, max_background=1.0)
    s = build_patch_dataset(
        pairs / "img", pairs / "mask", tmp_path / "csv", fmt="csv", rule=rule,
        class_names=["T", "S", "N"], val_stems=["c"], write_masks=False,
    )  # fmt: skip
    # a: rows {0, 24, 48} x columns {0, 24, 48, 72, 96}; all kept (max_background=1
    # still drops the all-background tiles: no class) + b
    assert s["patches"] == 3 * 4 + 1 and s["dropped"]["no_class"] == 3
    train, _ = list_split(tmp_path / "csv", "csv", "train")
    val, _ = list_split(tmp_path / "csv", "csv", "val")
    assert len(train) == 13 and len(val) == 1 and val[0].mask.is_file()
    label = np.array([1, 0, 1], np.uint8)
    for fmt in ("bcss_wsss", "luad_histoseg"):
        name = patch_name("x", 3, 4, np.array([1, 0, 1, 1], np.uint8), fmt)
        assert parse_label(name, fmt).tolist() == [1, 0, 1, 1]
    assert parse_label(patch_name("x", 3, 4, label, "wsss4luad"), "wsss4luad").tolist() == [1, 0, 1]
    with pytest.raises(ConfigError, match="4 classes"):
        build_patch_dataset(
            pairs / "img", pairs / "mask", tmp_path / "b", fmt="bcss_wsss", class_names="TSN"
        )


def test_errors_name_the_problem(pairs, tmp_path):
    (pairs / "img" / "d.png").write_bytes((pairs / "img" / "a.png").read_bytes())
    with pytest.raises(DataError, match="d.png: no mask"):
        build_patch_dataset(pairs / "img", pairs / "mask", tmp_path / "o")
    (pairs / "img" / "d.png").unlink()
    with pytest.raises(ConfigError, match="held out and used for training"):
        build_patch_dataset(
            pairs / "img", pairs / "mask", tmp_path / "o", train_stems=["a"], test_stems=["a"]
        )
    with pytest.raises(ConfigError):
        PatchRule(size=0)


def test_split_stems_by_image_is_seeded():
    stems = [f"{i:02d}" for i in range(10)]
    a = split_stems(stems, 0.2, 0.3, seed=1)
    assert a == split_stems(stems, 0.2, 0.3, seed=1)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (5, 2, 3)
    assert sorted(train + val + test) == stems


def test_cli_patches(pairs, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "patches", str(pairs / "img"), str(pairs / "mask"), "--out", str(out),
            "--size", "48", "--stride", "48", "--test-fraction", "0.34", "-q",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rule in" in result.output
    summary = json.loads((out / "patches.json").read_text())
    assert len(summary["splits"]["test"]) == 1
    assert len(list((out / "test" / "img").iterdir())) == 1
