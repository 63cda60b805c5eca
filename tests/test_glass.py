"""The white-glass rule (lpdseg.data.glass) is the one rule of the bank, evaluation and slides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpdseg.config import EvalConfig
from lpdseg.data.glass import DEFAULT_BRIGHTNESS, DEFAULT_SPREAD, glass_mask, glass_mask_np
from lpdseg.engine.bank import WhiteRule
from lpdseg.wsi.tissue import detect_tissue

# (colour, glass?) by the rule: mean RGB > 0.78 * 255 and max - min < 0.12 * 255
CASES = [
    ((245, 245, 245), True),  # white glass
    ((240, 215, 236), True),  # pale pink glass (mean 230, spread 25)
    ((222, 214, 218), True),
    ((255, 220, 250), False),  # bright but tinted (spread 35)
    ((200, 195, 199), False),  # grey but not bright (mean 198)
    ((170, 80, 150), False),  # tissue
    ((120, 40, 120), False),  # nuclei
]


def _tensor(colors) -> torch.Tensor:
    return torch.tensor(colors, dtype=torch.float32).T.reshape(1, 3, 1, -1) / 255.0


def test_rule_values_and_numpy_tensor_agree():
    rgb = np.array([[c for c, _ in CASES]], np.uint8)
    want = [g for _, g in CASES]
    assert glass_mask_np(rgb)[0].tolist() == want
    assert glass_mask(_tensor([c for c, _ in CASES]))[0, 0].tolist() == want
    # random colours: the two forms never disagree
    rng = np.random.default_rng(0)
    many = rng.integers(150, 256, (64, 64, 3), dtype=np.uint8)
    t = torch.from_numpy(many).permute(2, 0, 1)[None].float() / 255
    assert np.array_equal(glass_mask_np(many), glass_mask(t)[0].numpy())


def test_config_defaults_are_the_rules():
    cfg = EvalConfig()
    assert (cfg.glass_brightness, cfg.glass_spread) == (DEFAULT_BRIGHTNESS, DEFAULT_SPREAD)
    rule = WhiteRule()
    assert (rule.brightness, rule.spread) == (DEFAULT_BRIGHTNESS, DEFAULT_SPREAD)


def test_bank_white_fraction_is_the_glass_fraction():
    rule = WhiteRule()
    img = np.zeros((10, 10, 3), np.uint8)
    img[:] = (170, 80, 150)
    img[:6] = (240, 215, 236)  # pale pink glass: HSV saturation 0.10 > the old 0.08
    assert rule.white_fraction(img) == pytest.approx(0.6)
    assert rule.white_fraction(img) == pytest.approx(glass_mask_np(img).mean())
    assert rule.is_white(img)  # 60 % > max_fraction 50 %
    assert not WhiteRule(max_fraction=0.7).is_white(img)
    img[:4] = (170, 80, 150)
    assert not rule.is_white(img)  # 20 %
    assert WhiteRule(brightness=0.95).white_fraction(np.full((4, 4, 3), 245, np.uint8)) == 1.0
    assert WhiteRule(brightness=0.97).white_fraction(np.full((4, 4, 3), 245, np.uint8)) == 0.0


def _slide(tinted_rgb, tissue: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A thumbnail: white glass with a band of tinted glass (e.g. mounting medium) and,
    if ``tissue``, a tissue ellipse. Without tissue, Otsu's saturation threshold falls
    between white and tinted glass, so only the glass rule keeps the band out."""
    import cv2

    rng = np.random.default_rng(1)
    h, w = 300, 400
    img = np.clip(245 + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)
    img[:, 250:] = tinted_rgb
    truth = np.zeros((h, w), np.uint8)
    if tissue:
        cv2.ellipse(truth, (120, 150), (90, 110), 0, 0, 360, 1, -1)
        col = np.clip(np.array([170, 80, 150]) + rng.normal(0, 15, (h, w, 3)), 0, 255)
        img[truth > 0] = col.astype(np.uint8)[truth > 0]
    return img, truth.astype(bool)


@pytest.mark.parametrize(("tinted", "is_glass"), [(c, g) for c, g in CASES[:3]])
def test_a_glass_pixel_is_glass_for_bank_evaluation_and_tissue_detection(tinted, is_glass):
    assert is_glass
    patch = np.full((16, 16, 3), tinted, np.uint8)
    # prototype bank: a patch of it is all glass, so it is dropped
    assert WhiteRule().white_fraction(patch) == 1.0 and WhiteRule().is_white(patch)
    # evaluation: forced to background with the run's eval settings
    cfg = EvalConfig(glass_background=True)
    assert glass_mask(_tensor([tinted]), cfg.glass_brightness, cfg.glass_spread).all()
    # slides: never tissue, with tissue beside it or without
    img, truth = _slide(tinted)
    mask = detect_tissue(img)
    assert not mask[:, 260:].any()
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9
    assert not detect_tissue(_slide(tinted, tissue=False)[0]).any()


def test_tissue_detection_follows_the_rules_settings():
    img, _ = _slide((240, 215, 236), tissue=False)  # HSV saturation 26 > Otsu's threshold
    assert not detect_tissue(img).any()
    # with a stricter brightness the pale pink band is not glass: Otsu then calls it tissue
    loose = detect_tissue(img, glass_brightness=0.95)
    assert loose[:, 260:].mean() > 0.9 and not loose[:, :240].any()
