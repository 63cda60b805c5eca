"""Maps -> masks: normalisation, fusion, gating, background channel, TTA."""

from __future__ import annotations

import torch

from lpdseg.config import EvalConfig
from lpdseg.engine.evaluate import (
    class_gate,
    fuse_maps,
    infer_maps,
    maps_to_mask,
    minmax_normalise,
)
from lpdseg.models.prototypes import HeadOutput


def test_minmax_per_image_and_class():
    m = torch.tensor([[[[1.0, 3.0]], [[-2.0, -2.0]]]])  # 1 x 2 x 1 x 2
    n = minmax_normalise(m)
    assert torch.allclose(n[0, 0], torch.tensor([[0.0, 1.0]]))
    assert torch.all(n[0, 1] == 0)  # constant map -> zeros, no NaN


def test_fusion_weights_and_renormalisation():
    a = torch.tensor([[[[0.0, 1.0, 2.0]]]])
    b = torch.tensor([[[[2.0, 1.0, 0.0]]]])
    fused = fuse_maps([None, a, b, None], [0.0, 0.75, 0.25, 0.0])
    # 0.75*[0, .5, 1] + 0.25*[1, .5, 0] = [.25, .5, .75] -> renormalised [0, .5, 1]
    assert torch.allclose(fused[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_mask_background_and_gating_by_hand():
    fused = torch.tensor([[[[0.9, 0.2, 0.0]], [[0.1, 0.8, 0.05]]]])  # 1 x 2 x 1 x 3
    keep = torch.tensor([[True, True]])
    # background (1 - max)^1: [0.1, 0.2, 0.95] -> labels [0, 1, 2]
    assert maps_to_mask(fused, keep, gamma=1.0).tolist() == [[[0, 1, 2]]]
    # class 1 gated off: pixel 1 -> bg (0.8 > 0.2)
    keep = torch.tensor([[True, False]])
    assert maps_to_mask(fused, keep, gamma=1.0).tolist() == [[[0, 2, 2]]]
    # gamma = 10 shrinks the background: (1 - 0.2)^10 = 0.107 < 0.2
    assert maps_to_mask(fused, keep, gamma=10.0).tolist() == [[[0, 0, 2]]]


def test_gating_modes():
    cfg = EvalConfig(cls_threshold=0.5)
    probs = torch.tensor([[0.9, 0.3]])
    labels = torch.tensor([[0.0, 1.0]])
    assert class_gate(cfg, probs, labels, "pseudo").tolist() == [[False, True]]
    assert class_gate(cfg, probs, labels, "predict").tolist() == [[True, False]]


class _Shifty(torch.nn.Module):
    """Class map = the red channel; logits = its mean. Equivariant to flips and resizing."""

    def forward(self, x, stages=(3,), inference_merge="mean"):
        maps = [None, x[:, :1], x[:, :1], x[:, :1]]
        return HeadOutput([None] * 4, maps, [None, None, None, x[:, :1].mean((2, 3))])


def test_tta_undoes_flips_and_scales():
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    cfg = EvalConfig(tta_scales=[0.75, 1.0, 1.25], tta_flip=True)
    out = infer_maps(_Shifty(), x, cfg)
    assert out.stage_maps[3].shape == (1, 1, 32, 32)
    # averaged maps still increase left to right (flips were undone)
    row = out.stage_maps[3][0, 0, 16]
    assert torch.all(row[1:] >= row[:-1] - 1e-4)
    assert torch.allclose(row, x[0, 0, 16], atol=0.05)
