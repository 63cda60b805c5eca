"""`lpdseg slide model.onnx SLIDE`: the slide pipeline with an ONNX export (onnxruntime).

The same small synthetic slide through the PyTorch checkpoint and through its ONNX export
gives class maps that agree on >= 99 % of pixels (measured: all of them), per tile and
seamless (the default: the export's raw outputs stitched and decided over the canvas). The export's fixed
tile is the job's tile, its mpp metadata the default working resolution.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'lpdseg[onnx]')"
)
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'lpdseg[onnx]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install 'lpdseg[onnx]')")

from lpdseg.cli import app  # noqa: E402
from lpdseg.exports.onnx import OnnxPredictor, export_onnx  # noqa: E402

torch.set_num_threads(2)

TILE = 32
AGREEMENT = 0.99
W0, H0 = 512, 384
MPP = 0.5


@pytest.fixture(scope="module")
def slide(tmp_path_factory, pyramid_writer) -> Path:
    rng = np.random.default_rng(3)
    img = np.full((H0, W0, 3), 240, np.uint8)
    cv2.ellipse(img, (190, 170), (150, 110), 20, 0, 360, (160, 70, 150), -1)
    cv2.circle(img, (400, 260), 90, (220, 130, 180), -1)
    cv2.circle(img, (300, 120), 40, (90, 40, 120), -1)
    img = np.clip(img.astype(int) + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("onnx_slide") / "tissue.tif"
    pyramid_writer(path, img, (1, 4), MPP, tile=64)
    return path


def _keep_every_class(run: Path, out: Path, **data) -> Path:
    """A copy of ``run``'s best.pt whose classifier gate keeps every class (threshold 0)."""
    from lpdseg.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    ckpt["config"]["eval"]["cls_threshold"] = 0.0
    if ckpt["config"]["eval"].get("cls_thresholds") is not None:
        ckpt["config"]["eval"]["cls_thresholds"] = None
    ckpt["config"]["data"].update(data)
    ckpt = {k: v for k, v in ckpt.items() if k not in ("format_version", "lpdseg_version")}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "best.pt", ckpt)
    return out / "best.pt"


def _with_mpp(path: Path, out: Path, mpp: float) -> Path:
    """A copy of an export whose metadata says ``data.mpp`` was ``mpp`` (as an export of such a
    run writes it: ``onnx_metadata``), without exporting again."""
    import onnx

    from lpdseg.exports.onnx import META_PREFIX

    proto = onnx.load(str(path))
    proto.metadata_props.add(key=META_PREFIX + "mpp", value=json.dumps(mpp))
    onnx.save(proto, str(out))
    return out


@pytest.fixture(scope="module")
def models(tiny_run_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx_models")
    pt = _keep_every_class(tiny_run_dir, root / "plain")
    exported = export_onnx(pt, root / "model.onnx", tile=TILE)
    return {
        "pt": pt,
        "onnx": exported,
        "onnx_1um": _with_mpp(exported, root / "model_1um.onnx", 1.0),
    }


def run(model: Path, slide: Path, out: Path, *args: str):
    return CliRunner().invoke(
        app,
        ["slide", str(model), str(slide), "--out", str(out), "--downsample", "4",
         "--output-downsample", "1", *args, "-q"],
    )  # fmt: skip


def test_onnx_and_pytorch_class_maps_agree(models, slide, tmp_path):
    from PIL import Image

    # an ONNX export scores each tile on its own: compare with PyTorch doing the same
    res = run(
        models["pt"], slide, tmp_path / "pt", "--tile", str(TILE), "--slide-scoring", "per_tile"
    )
    assert res.exit_code == 0, res.output
    # the tile comes from the model
    res = run(models["onnx"], slide, tmp_path / "onnx", "--slide-scoring", "per_tile")
    assert res.exit_code == 0, res.output
    a = np.asarray(Image.open(tmp_path / "pt" / "tissue_classmap.png"))
    b = np.asarray(Image.open(tmp_path / "onnx" / "tissue_classmap.png"))
    assert a.shape == b.shape == (H0 // 4, W0 // 4)
    n_classes = len(
        json.loads((tmp_path / "pt" / "tissue_summary.json").read_text())["class_names"]
    )
    assert len(np.unique(a[a < n_classes])) >= 2  # several classes, not just background
    agreement = float((a == b).mean())
    assert agreement >= AGREEMENT, agreement
    print(f"ONNX vs PyTorch class maps: {agreement:.4%} of {a.size} pixels agree")
    s = json.loads((tmp_path / "onnx" / "tissue_summary.json").read_text())
    assert s["backend"] == "onnx" and s["tile_model_px"] == s["tile_level_px"] == TILE
    assert s["device"].startswith("onnxruntime ") and "CPUExecutionProvider" in s["device"]
    t = json.loads((tmp_path / "pt" / "tissue_summary.json").read_text())
    assert t["backend"] == "torch" and s["tiles"] == t["tiles"]
    assert s["slide_scoring"] == t["slide_scoring"] == "per_tile"
    assert s["class_names"] == t["class_names"]


def test_onnx_slides_are_seamless_like_pytorch(models, slide, tmp_path):
    """By default an export's slide is stitched from its raw outputs and decided over the
    canvas, as the checkpoint's: the same class map."""
    from PIL import Image

    res = run(models["pt"], slide, tmp_path / "pt", "--tile", str(TILE))
    assert res.exit_code == 0, res.output
    res = run(models["onnx"], slide, tmp_path / "onnx")
    assert res.exit_code == 0, res.output
    a = np.asarray(Image.open(tmp_path / "pt" / "tissue_classmap.png"))
    b = np.asarray(Image.open(tmp_path / "onnx" / "tissue_classmap.png"))
    s = json.loads((tmp_path / "onnx" / "tissue_summary.json").read_text())
    t = json.loads((tmp_path / "pt" / "tissue_summary.json").read_text())
    assert s["slide_scoring"] == t["slide_scoring"] == "seamless"
    assert len(np.unique(a[a < len(t["class_names"])])) >= 2
    agreement = float((a == b).mean())
    assert agreement >= AGREEMENT, agreement
    print(f"seamless ONNX vs PyTorch class maps: {agreement:.4%} of {a.size} pixels agree")


def test_onnx_mpp_metadata_is_the_default_resolution(models, slide, tmp_path):
    assert OnnxPredictor(models["onnx_1um"]).mpp == 1.0
    assert OnnxPredictor(models["onnx"]).mpp is None
    res = CliRunner().invoke(
        app, ["slide", str(models["onnx_1um"]), str(slide), "--out", str(tmp_path), "-q"]
    )
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "tissue_summary.json").read_text())
    assert s["resolution_source"] == "ONNX metadata mpp" and s["model_mpp"] == 1.0
    assert s["working_mpp"] == pytest.approx(1.0)
    assert s["level"] == 0 and s["tile_level_px"] == 2 * TILE  # 0.5 um/px read 2x, resized


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tile", "48"],
            "error: --tile 48: differs from the fixed tile of the ONNX model (CHECKPOINT {model}):"
            f" {TILE} px; drop it to use the model's, or export again with `lpdseg export --tile 48`",
        ),
        (["--tta"], "error: --tta True: cannot be used with an ONNX model (CHECKPOINT {model})"),
        (
            ["--threshold", "0.3"],
            "error: --threshold 0.3: cannot be used with an ONNX model (CHECKPOINT {model}): its "
            "class threshold is fixed at export",
        ),
    ],
)
def test_onnx_refuses_what_the_export_fixed(models, slide, tmp_path, args, message):
    res = run(models["onnx"], slide, tmp_path / "o", *args)
    assert res.exit_code == 2, res.output
    assert message.format(model=models["onnx"]) in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()


def test_a_file_that_is_not_onnx_names_it(slide, tmp_path):
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not a model")
    res = run(fake, slide, tmp_path / "o")
    assert res.exit_code == 2
    assert f"{fake} is not a readable ONNX model" in " ".join(res.output.split())
