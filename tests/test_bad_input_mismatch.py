"""Principle 2: never score or train on mismatched things silently.

- ``eval --data`` on data of other classes than the checkpoint's (a 4-class
  checkpoint on 3-class WSSS4LUAD data would score its background as NEC);
- ``patches`` on masks that cannot be of ``--format`` (palette or values);
- stage 2 on pseudo masks made from another dataset than ``data.root``.

Each is refused with exit code 2 and a message naming the file(s), both class
sets or data roots, and the fix; nothing is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import _tiny_overrides
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.train import train
from lpdseg.errors import DataError

SHARED_WSSS4LUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsss4luad-val"
WSSS4LUAD_PALETTE = [0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255]
BCSS_NAMES = "TUM, STR, LYM, NEC"
WSSS4LUAD_NAMES = "TUM, STR, NOR"


def flat(text: str) -> str:
    return " ".join(text.split())


def write_pair(folder: Path, stem: str, mask: np.ndarray, palette: list[int] | None) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(mask.size)
    Image.fromarray(rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)).save(
        folder / "img" / f"{stem}.png"
    )
    m = Image.fromarray(mask.astype(np.uint8))
    if palette is not None:
        m = m.convert("P")
        m.putpalette(palette)
    m.save(folder / "mask" / f"{stem}.png")


def three_class_palette_masks(folder: Path) -> Path:
    """WSSS4LUAD-like pairs: palette masks with 0..2 classes and 3 (white) background."""
    a = np.zeros((64, 64), np.uint8)
    a[:, 20:40] = 1
    a[:, 40:] = 3
    b = np.full((64, 64), 2, np.uint8)
    b[:8] = 3
    write_pair(folder, "a", a, WSSS4LUAD_PALETTE)
    write_pair(folder, "b", b, WSSS4LUAD_PALETTE)
    return folder


def test_eval_of_a_4_class_checkpoint_on_3_class_data_is_refused(tiny_run_dir, tmp_path):
    data = three_class_palette_masks(tmp_path / "luad")  # img/ + mask/: a val split
    out = tmp_path / "eval"
    ckpt = tiny_run_dir / "best.pt"
    res = CliRunner().invoke(
        app, ["eval", str(ckpt), "--data", str(data), "--split", "val", "--out", str(out), "-q"]
    )
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert str(ckpt) in text and str(data) in text
    assert f"4 classes ({BCSS_NAMES}" in text and f"3 classes ({WSSS4LUAD_NAMES})" in text
    assert "would be scored as NEC" in text and "data.format=wsss4luad" in text
    assert not out.exists(), "nothing may be written for refused data"


@pytest.mark.skipif(
    not SHARED_WSSS4LUAD.is_dir(), reason=f"shared WSSS4LUAD data not at {SHARED_WSSS4LUAD}"
)
def test_eval_on_the_shared_wsss4luad_data_names_both_class_sets(tiny_run_dir, tmp_path):
    ckpt = tiny_run_dir / "best.pt"
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        app,
        ["eval", str(ckpt), "--data", str(SHARED_WSSS4LUAD), "--split", "val", "--out", str(out)],
    )
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert BCSS_NAMES in text and WSSS4LUAD_NAMES in text and str(SHARED_WSSS4LUAD) in text
    assert "data.format=wsss4luad" in text
    assert not out.exists()


def test_patches_refuses_masks_that_do_not_fit_the_format(tmp_path):
    runner = CliRunner()
    src = three_class_palette_masks(tmp_path / "src")
    out = tmp_path / "ds"
    args = ["patches", str(src / "img"), str(src / "mask"), "--out", str(out), "--size", "32"]
    res = runner.invoke(app, [*args, "--format", "bcss_wsss", "-q"])
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert str(src / "mask" / "a.png") in text and "--format bcss_wsss" in text
    assert "would be read as NEC" in text and "Use --format wsss4luad" in text
    assert not out.exists(), "a refused format must write nothing"
    assert runner.invoke(app, [*args, "--format", "wsss4luad", "-q"]).exit_code == 0

    # 4-class grey masks (values up to 4 = background) given as 3-class wsss4luad
    grey = tmp_path / "grey"
    four = np.zeros((64, 64), np.uint8)
    four[:, 32:] = 4
    four[:8, :8] = 3
    write_pair(grey, "g", four, None)
    res = runner.invoke(
        app,
        ["patches", str(grey / "img"), str(grey / "mask"), "--out", str(tmp_path / "g"), "-q"],
    )
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert str(grey / "mask" / "g.png") in text and "--format wsss4luad" in text
    assert "--format bcss_wsss" in text and "--format luad_histoseg" in text
    assert not (tmp_path / "g").exists()


def test_patches_refuses_two_images_with_one_stem(tmp_path):
    src = three_class_palette_masks(tmp_path / "src")
    shutil.copy(src / "img" / "a.png", src / "img" / "a.jpg")
    res = CliRunner().invoke(
        app, ["patches", str(src / "img"), str(src / "mask"), "--out", str(tmp_path / "o"), "-q"]
    )
    assert res.exit_code == 2
    text = flat(res.output)
    assert "a.jpg" in text and "a.png" in text and "rename or remove one" in text
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("two")
    a, b = root / "a", root / "b"
    write_dataset(a, n_train=8, n_val=2, n_test=2, size=32, seed=0, progress=False)
    write_dataset(b, n_train=8, n_val=2, n_test=2, size=32, seed=1, progress=False)
    return a, b


def seg_overrides(root: Path, pseudo: Path, out: Path) -> list[str]:
    """A 2-step stage-2 run on ``pseudo`` (conftest's tiny overrides underneath)."""
    return _tiny_overrides(root, out, f"data.pseudo={pseudo}", "train.task=seg")


def test_stage2_refuses_pseudo_masks_of_another_dataset(tiny_run_dir, two_datasets, tmp_path):
    from lpdseg.inference import write_pseudo_masks

    a, b = two_datasets
    pseudo = tmp_path / "pseudo_a"
    info = write_pseudo_masks(
        tiny_run_dir / "best.pt", pseudo, data_root=str(a), tta=False, progress=False
    )
    assert info["data_root"] == str(a.resolve())
    runner = CliRunner()
    out = tmp_path / "seg"
    res = runner.invoke(app, ["train", "demo", *seg_overrides(b, pseudo, out), "-q"])
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert str(pseudo / "pseudo.json") in text and str(a.resolve()) in text
    assert f"data.root={b.resolve()}" in text and "--allow-other-pseudo" in text
    assert not out.exists(), "nothing may be trained or written"

    # without pseudo.json the manifest's absolute image paths give it away
    (pseudo / "pseudo.json").unlink()
    res = runner.invoke(app, ["train", "demo", *seg_overrides(b, pseudo, out), "-q"])
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert "8 of 8 images are not under" in text and str(b.resolve()) in text
    assert "--allow-other-pseudo" in text

    # the documented override trains on them anyway
    res = runner.invoke(
        app, ["train", "demo", *seg_overrides(b, pseudo, out), "--allow-other-pseudo", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert (out / "best.pt").is_file()


def test_stage2_refuses_pseudo_masks_of_other_classes_even_with_the_override(
    tiny_run_dir, two_datasets, tmp_path
):
    from lpdseg.inference import write_pseudo_masks

    a, _ = two_datasets
    pseudo = tmp_path / "pseudo"
    write_pseudo_masks(
        tiny_run_dir / "best.pt", pseudo, data_root=str(a), tta=False, progress=False
    )
    info = json.loads((pseudo / "pseudo.json").read_text())
    info["class_names"] = ["TUM", "STR", "NOR"]
    (pseudo / "pseudo.json").write_text(json.dumps(info))
    cfg = load_config("demo", seg_overrides(a, pseudo, tmp_path / "seg"))
    with pytest.raises(DataError, match=r"TUM, STR, NOR.*TUM, STR, LYM, NEC.*lpdseg pseudo"):
        train(cfg, progress=False, allow_other_pseudo=True)
    assert not (tmp_path / "seg").exists()


def test_pseudo_refuses_data_of_other_classes(tiny_run_dir, tmp_path):
    from lpdseg.inference import write_pseudo_masks

    data = three_class_palette_masks(tmp_path / "luad")
    train_dir = data / "train"
    train_dir.mkdir()
    shutil.copy(data / "img" / "a.png", train_dir / "p-0-0-[1, 1, 0].png")
    with pytest.raises(DataError, match=r"3 classes \(TUM, STR, NOR\)"):
        write_pseudo_masks(
            tiny_run_dir / "best.pt", tmp_path / "p", data_root=str(data), progress=False
        )
    assert not (tmp_path / "p").exists()
