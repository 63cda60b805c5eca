"""Pseudo masks with an ignore margin: uncertain pixels are 255, the rest the argmax."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import _tiny_overrides
from PIL import Image

from lpdseg.config import load_config
from lpdseg.engine.train import train
from lpdseg.errors import DataError
from lpdseg.inference import write_pseudo_masks
from lpdseg.inference.pseudo import pseudo_labels


def _slow_pseudo(scores: np.ndarray, margin: float) -> np.ndarray:
    """Pixel by pixel: the best label, or 255 when it leads the second by < margin."""
    b, _, h, w = scores.shape
    out = np.zeros((b, h, w), np.uint8)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                ranked = sorted(scores[i, :, y, x].tolist(), reverse=True)
                best = int(np.argmax(scores[i, :, y, x]))
                out[i, y, x] = 255 if margin > 0 and ranked[0] - ranked[1] < margin else best
    return out


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.3])
def test_pseudo_labels_match_pixel_reference(margin):
    scores = torch.rand(2, 4, 7, 5, generator=torch.Generator().manual_seed(3))
    got = pseudo_labels(scores, margin).numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, _slow_pseudo(scores.numpy(), margin))
    if margin == 0.3:
        assert 0 < (got == 255).mean() < 1  # the test data exercises both branches


def test_glass_forced_background_is_never_ignored():
    scores = torch.full((1, 3, 2, 2), 0.5)  # every pixel a tie: all uncertain ...
    scores[0, -1, 0, 0] = 2.0  # ... but the glass rule's forced background
    got = pseudo_labels(scores, 0.2)
    assert got[0, 0, 0] == 2 and (got.flatten()[1:] == 255).all()


def test_write_pseudo_masks_ignore_margin(tiny_run_dir, tmp_path):
    ckpt = tiny_run_dir / "best.pt"
    plain = write_pseudo_masks(ckpt, tmp_path / "plain", tta=False, progress=False)
    held = write_pseudo_masks(ckpt, tmp_path / "held", tta=False, progress=False, ignore_margin=0.2)
    assert plain["ignored_fraction"] == 0 and plain["ignore_margin"] == 0
    recorded = json.loads((tmp_path / "held" / "pseudo.json").read_text())
    assert recorded == held
    assert recorded["ignore_margin"] == 0.2
    ignored = total = 0
    for path in sorted((tmp_path / "plain" / "masks").glob("*.png")):
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(tmp_path / "held" / "masks" / path.name))
        keep = b != 255
        np.testing.assert_array_equal(a[keep], b[keep])  # only ignored pixels differ
        ignored += int((~keep).sum())
        total += b.size
    assert ignored > 0
    assert recorded["ignored_fraction"] == pytest.approx(ignored / total, abs=1e-4)
    # stage 2 trains on masks holding 255 (the loss skips them)
    out = tmp_path / "seg"
    data = tiny_run_dir.parent / "data"
    cfg = load_config(
        "demo",
        _tiny_overrides(
            data,
            out,
            "train.max_steps=2",
            "train.task=seg",
            f"data.pseudo={tmp_path / 'held'}",
        ),
    )
    assert train(cfg, progress=False)["step"] == 2


def test_ignore_margin_out_of_range_is_refused(tiny_run_dir, tmp_path):
    with pytest.raises(DataError, match="ignore_margin"):
        write_pseudo_masks(tiny_run_dir / "best.pt", tmp_path / "p", ignore_margin=1.5)
    assert not (tmp_path / "p").exists()  # refused before anything was written
