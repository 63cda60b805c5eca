"""wsi.tissue: tissue masks on thumbnails (blobs, specks, holes, glass), input checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lpdseg.wsi import detect_tissue, open_image
from lpdseg.wsi.tissue import fill_small_holes, remove_small_components, tissue_fraction


def test_detect_tissue_blobs_specks_and_holes():
    rng = np.random.default_rng(3)
    h, w = 400, 500
    truth = np.zeros((h, w), np.uint8)
    cv2.ellipse(truth, (150, 200), (110, 140), 0, 0, 360, 1, -1)
    cv2.circle(truth, (370, 150), 80, 1, -1)
    lumen = np.zeros_like(truth)
    cv2.circle(lumen, (150, 200), 40, 1, -1)  # large hole: stays a hole
    truth &= 1 - lumen
    img = np.clip(242 + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)  # glass
    tissue_col = np.clip(np.array([170, 80, 150]) + rng.normal(0, 18, (h, w, 3)), 0, 255)
    img[truth > 0] = tissue_col.astype(np.uint8)[truth > 0]
    # A small hole inside tissue (should be filled) and specks on glass (removed).
    img[144:156, 364:376] = 240
    for y, x in [(30, 30), (380, 480), (50, 450), (370, 40)]:
        img[y : y + 2, x : x + 2] = (120, 40, 120)

    mask = detect_tissue(img)
    t = truth.astype(bool)
    iou = (mask & t).sum() / (mask | t).sum()
    assert iou > 0.9
    assert mask[144:156, 364:376].all()  # small hole filled
    for y, x in [(30, 30), (380, 480), (50, 450), (370, 40)]:
        assert not mask[y : y + 2, x : x + 2].any()  # specks removed
    assert not mask[190:210, 140:160].any()  # the large lumen is kept open
    blank = np.clip(245 + rng.normal(0, 2, (100, 100, 3)), 0, 255).astype(np.uint8)
    assert detect_tissue(blank).mean() < 0.01  # white glass only: no tissue


def test_detect_tissue_rejects_bad_input():
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        detect_tissue(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        detect_tissue(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"min_area_fraction must be in \[0, 1\)"):
        detect_tissue(np.zeros((10, 10, 3), np.uint8), min_area_fraction=1.0)


def test_component_and_hole_helpers():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5:7, 5:7] = False  # a 4-px hole
    mask[16, 16] = True  # a 1-px speck
    cleaned = remove_small_components(mask, 2)
    assert not cleaned[16, 16] and cleaned[2, 2]
    filled = fill_small_holes(cleaned, 5)
    assert filled[5:7, 5:7].all()
    assert not fill_small_holes(cleaned, 4)[5:7, 5:7].any()  # hole not smaller than 4 px
    assert tissue_fraction(filled) == pytest.approx(100 / 400)
    assert tissue_fraction(np.zeros((0, 0), bool)) == 0.0


def test_real_svs_tissue(cmu_svs):
    with open_image(cmu_svs) as r:
        mask = detect_tissue(r.thumbnail(512))
    assert 0.15 < mask.mean() < 0.7  # a strip of skin on glass


def test_synthetic_slide_tissue_matches_truth(wsi_pyramid):
    with open_image(wsi_pyramid.path) as r:
        thumb = r.thumbnail(512)
    mask = detect_tissue(thumb)
    truth = cv2.resize(
        wsi_pyramid.truth.astype(np.uint8), mask.shape[::-1], interpolation=cv2.INTER_AREA
    ).astype(bool)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95
