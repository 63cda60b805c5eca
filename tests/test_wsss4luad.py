"""WSSS4LUAD layout end to end: patches -> train -> `lpdseg eval` at full image size.

The synthetic part always runs; the part on ../shared/data/wsss4luad-val skips
when that folder is absent. The tests of benchmarks/wsss4luad.py are in
benchmarks/tests/ (`make bench-test`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.data.datasets import list_split, read_mask
from lpdseg.data.patches import PatchRule, build_patch_dataset
from lpdseg.engine.train import train

torch.set_num_threads(2)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsss4luad-val"
PALETTE = [0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255]
COLOURS = {0: (200, 60, 160), 1: (240, 150, 200), 2: (170, 120, 220), 3: (250, 250, 250)}


def _pair(folder: Path, stem: str, h: int, w: int, seed: int) -> None:
    """An image whose colour follows its palette mask (vertical class bands)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    cuts = sorted(rng.choice(np.arange(8, w - 8), 2, replace=False))
    mask[:, cuts[0] : cuts[1]] = 1
    mask[:, cuts[1] :] = rng.choice([2, 3])
    image = np.stack([np.array(COLOURS[v]) for v in range(4)])[mask].astype(np.int16)
    image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "img" / f"{stem}.png")
    m = Image.fromarray(mask, mode="L").convert("P")
    m.putpalette(PALETTE)
    m.save(folder / "mask" / f"{stem}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint trained on patches of some pairs; an eval folder of the others."""
    base = tmp_path_factory.mktemp("wsss4luad")
    sizes = [(64, 80), (72, 56), (48, 96), (56, 64), (90, 70), (40, 120)]
    for i, (h, w) in enumerate(sizes):
        _pair(base / "src", f"{i:02d}", h, w, seed=i)
    build_patch_dataset(
        base / "src" / "img", base / "src" / "mask", base / "data", fmt="wsss4luad",
        rule=PatchRule(size=32, stride=16, max_background=0.9),
        train_stems=["00", "01", "02"], val_stems=["03", "04", "05"], progress=False,
    )  # fmt: skip
    cfg = load_config(
        "wsss4luad",
        [
            f"data.root={base / 'data'}",
            "data.crop_size=32",
            "data.num_workers=0",
            "model.backbone=mit_b0",
            "model.prototypes_per_class=2",
            "model.proj_hidden=16",
            "train.batch_size=8",
            "train.max_steps=3",
            "train.lr=1e-3",
            f"train.out_dir={base / 'run'}",
            "eval.tta_scales=[1.0]",
        ],
    )
    train(cfg, progress=False, evaluate_test=False)
    # the WSSS4LUAD val/test release layout: img/ + palette mask/ directly in the folder
    evalset = base / "evalset"
    for sub in ("img", "mask"):
        (evalset / sub).mkdir(parents=True)
        for stem in ("03", "04", "05"):
            (evalset / sub / f"{stem}.png").write_bytes(
                (base / "src" / sub / f"{stem}.png").read_bytes()
            )
    return base / "run" / "best.pt", evalset


def test_eval_cli_on_wsss4luad_layout_at_full_size(trained, tmp_path):
    ckpt, evalset = trained
    result = CliRunner().invoke(
        app,
        ["eval", str(ckpt), "--data", str(evalset), "--split", "val", "--out", str(tmp_path), "-q"],
    )
    assert result.exit_code == 0, result.output
    for word in ("mIoU", "mDice", "FwIoU", "TUM", "STR", "NOR"):
        assert word in result.output
    scores = json.loads((tmp_path / "val_metrics.json").read_text())
    for mode in ("labels", "classifier"):
        res = scores[mode]
        assert res["images"] == 3
        assert 0.0 <= res["mIoU"] <= 1.0 and 0.0 <= res["pixel_acc"] <= 1.0
    # full size: the confusion matrix counts every pixel of the three images once
    pixels = sum(
        np.asarray(Image.open(p)).size for p in sorted((evalset / "mask").iterdir())
    )  # 56 x 64 + 90 x 70 + 40 x 120
    assert pixels == 56 * 64 + 90 * 70 + 40 * 120
    confusion = np.asarray(scores["labels"]["confusion"])
    assert confusion.sum() == pixels


def test_patch_split_reads_back_in_wsss4luad_layout(trained):
    data = trained[0].parent.parent / "data"
    train_samples, _ = list_split(data, "wsss4luad", "train")
    val, _ = list_split(data, "wsss4luad", "val")
    assert train_samples and all(s.image.stem[:2] in ("00", "01", "02") for s in train_samples)
    assert [s.image.stem for s in val] == ["03", "04", "05"]


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared WSSS4LUAD data not found at {SHARED}")
def test_shared_wsss4luad_reads_and_tiles(tmp_path):
    val, bad = list_split(SHARED, "wsss4luad", "val")
    assert len(val) == 31 and not bad
    sizes = set()
    for s in val[:5]:
        mask = read_mask(s.mask, 3)
        assert Image.open(s.mask).mode == "P" and set(np.unique(mask)) <= {0, 1, 2, 3}
        sizes.add(mask.shape)
    assert len(sizes) > 1  # sizes vary
    train_samples, _ = list_split(SHARED, "wsss4luad", "train")
    assert len(train_samples) == 4
    summary = build_patch_dataset(
        SHARED / "img", SHARED / "mask", tmp_path / "p", fmt="wsss4luad",
        rule=PatchRule(112, 112), train_stems=["00", "01"], test_stems=["02"], progress=False,
    )  # fmt: skip
    patches, _ = list_split(tmp_path / "p", "wsss4luad", "train")
    assert len(patches) == summary["patches"] > 0
    assert {p.image.name.split("-")[0] for p in patches} == {"00", "01"}
