"""CutMix of weakly labelled batches: boxes, pasting, union labels, seeded by the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpdseg.config import load_config
from lpdseg.data.mixing import (
    AREA_RANGE,
    apply_cutmix,
    cutmix_boxes,
    cutmix_generator,
)
from lpdseg.errors import ConfigError


def _slow_mix(images: np.ndarray, targets: np.ndarray, boxes) -> tuple[np.ndarray, np.ndarray]:
    """Pixel by pixel: inside a box the source's pixel (and mask value), labels OR-ed."""
    out_i, out_t = images.copy(), targets.copy()
    for b in boxes:
        for y in range(images.shape[2]):
            for x in range(images.shape[3]):
                if b.y0 <= y < b.y1 and b.x0 <= x < b.x1:
                    out_i[b.target, :, y, x] = images[b.source, :, y, x]
                    if targets.ndim == 3:
                        out_t[b.target, y, x] = targets[b.source, y, x]
        if targets.ndim == 2:
            out_t[b.target] = np.logical_or(targets[b.target], targets[b.source])
    return out_i, out_t


def test_boxes_cover_a_quarter_to_half_and_repeat_with_the_seed():
    boxes = cutmix_boxes(64, 48, 40, 1.0, cutmix_generator(0, 7))
    assert [b.target for b in boxes] == list(range(64))  # prob 1: every patch is mixed
    for b in boxes:
        assert b.source == (b.target + 1) % 64
        assert 0 <= b.y0 < b.y1 <= 48 and 0 <= b.x0 < b.x1 <= 40
        area = (b.y1 - b.y0) * (b.x1 - b.x0) / (48 * 40)
        assert AREA_RANGE[0] - 0.05 <= area <= AREA_RANGE[1] + 0.05
    assert boxes == cutmix_boxes(64, 48, 40, 1.0, cutmix_generator(0, 7))
    assert boxes != cutmix_boxes(64, 48, 40, 1.0, cutmix_generator(0, 8))  # another step
    some = cutmix_boxes(400, 48, 40, 0.3, cutmix_generator(1, 0))
    assert 0.2 < len(some) / 400 < 0.4
    assert cutmix_boxes(1, 48, 40, 1.0, cutmix_generator(0, 0)) == []  # nothing to mix with
    assert cutmix_boxes(8, 48, 40, 0.0, cutmix_generator(0, 0)) == []


@pytest.mark.parametrize("masks", [False, True])
def test_apply_cutmix_matches_pixel_reference(masks):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 12, 10, generator=g)
    if masks:
        targets = torch.randint(0, 4, (5, 12, 10), generator=g)
    else:
        targets = (torch.rand(5, 3, generator=g) > 0.5).float()
    boxes = cutmix_boxes(5, 12, 10, 0.7, cutmix_generator(3, 2))
    assert 0 < len(boxes) < 5
    before = images.clone(), targets.clone()
    got_i, got_t = apply_cutmix(images, targets, boxes)
    ref_i, ref_t = _slow_mix(images.numpy(), targets.numpy(), boxes)
    np.testing.assert_array_equal(got_i.numpy(), ref_i)
    np.testing.assert_array_equal(got_t.numpy(), ref_t.astype(got_t.numpy().dtype))
    assert torch.equal(images, before[0]) and torch.equal(targets, before[1])  # inputs kept


def test_cutmix_is_validated():
    with pytest.raises(ConfigError, match="data.cutmix"):
        load_config("demo", ["data.cutmix=1.5"])
