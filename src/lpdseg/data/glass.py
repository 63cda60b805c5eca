"""The white-glass rule: which pixels are bare slide glass (or pale gaps in tissue).

Glass is bright and grey: its mean RGB is above ``brightness`` and its channels
differ by less than ``spread`` (both in [0, 1] units). One rule, on torch
tensors and numpy arrays alike, so training, evaluation, prediction and
slides agree on what counts as glass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DEFAULT_BRIGHTNESS = 0.78
DEFAULT_SPREAD = 0.12


def glass_mask(
    rgb: Tensor, brightness: float = DEFAULT_BRIGHTNESS, spread: float = DEFAULT_SPREAD
) -> Tensor:
    """Glass pixels (B x H x W bool) of RGB images in [0, 1] (B x 3 x H x W)."""
    bright = rgb.mean(1) > brightness
    grey = (rgb.amax(1) - rgb.amin(1)) < spread
    return bright & grey


def glass_mask_np(
    image: np.ndarray, brightness: float = DEFAULT_BRIGHTNESS, spread: float = DEFAULT_SPREAD
) -> np.ndarray:
    """Glass pixels (H x W bool) of an ``H x W x 3`` uint8 RGB image; same rule."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    return glass_mask(x, brightness, spread)[0].numpy()
