"""`lpdseg explain`: per-prototype heatmaps, top training patches, CAM refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpdseg.config import config_from_dict
from lpdseg.data.datasets import list_split, read_image
from lpdseg.data.transforms import to_tensor
from lpdseg.engine.checkpoint import load_checkpoint, save_checkpoint
from lpdseg.errors import CheckpointError
from lpdseg.explain import explain, prototype_maps, top_patches
from lpdseg.inference import load_model
from lpdseg.models.lpd import build_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


def test_figures_for_an_lpd_checkpoint(run_dir, tmp_path):
    model, cfg = load_model(run_dir / "best.pt")
    data = Path(cfg.data.root)
    tests = sorted((data / "test" / "img").glob("*.png"))[:2]
    written = explain(run_dir / "best.pt", [str(t) for t in tests], tmp_path, progress=False)
    assert [p.name for p in written] == [f"{t.stem}_prototypes.png" for t in tests] + [
        "summary_prototypes.png"
    ]
    plain = np.asarray(Image.open(written[0]))
    assert plain.std() > 0
    # with the training folder, each class gets a second row of top patches: a taller figure
    with_patches = explain(
        run_dir / "best.pt", [str(tests[0])], tmp_path / "p", train_dir=data, progress=False
    )
    tall = np.asarray(Image.open(with_patches[0]))
    assert tall.shape[0] > 1.5 * plain.shape[0]

    maps, probs = prototype_maps(model, read_image(tests[0]))
    assert maps.shape == (4, 2, 32, 32) and probs.shape == (4,)
    assert torch.isfinite(maps).all() and ((probs >= 0) & (probs <= 1)).all()


def test_top_patches_are_the_highest_scoring(run_dir):
    model, cfg = load_model(run_dir / "best.pt")
    samples, _ = list_split(cfg.data.root, cfg.data.format, "train")
    top = top_patches(model, samples, per_prototype=3, batch_size=5, progress=False)
    assert len(top) == 4 and all(len(cls) == 2 for cls in top)  # C x k
    # reference: each patch alone through the model, peak activation per prototype
    with torch.no_grad():
        ref = torch.stack(
            [
                model(to_tensor(read_image(s.image))[None], stages=(3,))
                .proto_maps[3][0]
                .float()
                .amax((2, 3))
                for s in samples
            ]
        )  # N x C x k
    for c in range(4):
        for j in range(2):
            idx = top[c][j]
            assert len(idx) == 3 and len(set(idx)) == 3
            expected = ref[:, c, j].topk(3).values
            assert torch.allclose(ref[idx, c, j], expected, atol=1e-4)


def test_cam_checkpoint_is_refused_naming_the_file(run_dir, tmp_path):
    ckpt = load_checkpoint(run_dir / "best.pt")
    cfg_dict = ckpt["config"]
    cfg_dict["model"]["head"] = "cam"
    cam = build_model(config_from_dict(cfg_dict), 4)
    path = tmp_path / "cam_best.pt"
    save_checkpoint(path, {"config": cfg_dict, "model": cam.state_dict()})
    load_model(path)  # a valid CAM checkpoint...
    image = sorted((Path(cfg_dict["data"]["root"]) / "test" / "img").glob("*.png"))[0]
    with pytest.raises(CheckpointError, match="cam_best.pt.*no prototypes"):
        explain(path, [str(image)], tmp_path / "o", progress=False)
    with pytest.raises(CheckpointError, match="no prototypes"):
        explain(path, [str(image)], tmp_path / "o", train_dir=cfg_dict["data"]["root"])
