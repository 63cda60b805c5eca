"""Image (and image + mask) transforms with numpy/cv2/torch only.

Training randomness comes from an explicit ``np.random.Generator`` or, when
none is given, from one seeded by torch's global generator, so torch seeding
(including the DataLoader's per-worker seeding) makes augmentation
reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from lpdseg.errors import ConfigError

IGNORE_INDEX = 255
# Padding colour of images smaller than the crop: white, like slide glass.
PAD_VALUE = 255
# ITU-R BT.601 luma weights (grey level for contrast/saturation).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class AugmentConfig:
    """Training augmentation settings.

    Attributes:
        crop_size: side of the square training crop (random crop, or pad with white).
        hflip: random horizontal flip (p = 0.5).
        vflip: random vertical flip (p = 0.5).
        rot90: random rotation by a multiple of 90 degrees.
        color_jitter: strength ``j`` of the colour jitter: brightness, contrast and
            saturation factors in ``[1 - j, 1 + j]``, hue rotation within
            ``+-j/4`` of a turn; 0 disables it.
        scale: range of the random resize factor applied before cropping.
        stain_jitter: strength ``s`` of the stain augmentation in HED space
            (:func:`stain_jitter`); 0 disables it.
    """

    crop_size: int = 224
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    color_jitter: float = 0.1
    scale: tuple[float, float] = (1.0, 1.0)
    stain_jitter: float = 0.0

    def __post_init__(self) -> None:
        if int(self.crop_size) != self.crop_size or self.crop_size < 1:
            raise ConfigError(f"augment crop_size must be a positive integer, got {self.crop_size}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"augment color_jitter must be in [0, 1), got {self.color_jitter}")
        if not 0.0 <= self.stain_jitter < 1.0:
            raise ConfigError(f"augment stain_jitter must be in [0, 1), got {self.stain_jitter}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi:
            raise ConfigError(
                f"augment scale must be (min, max) with 0 < min <= max, got {self.scale}"
            )
        self.crop_size = int(self.crop_size)
        self.scale = (float(lo), float(hi))


def _check_image(image: np.ndarray) -> None:
    if (
        not isinstance(image, np.ndarray)
        or image.ndim != 3
        or image.shape[2] != 3
        or image.dtype != np.uint8
    ):
        desc = (
            f"{image.dtype} {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {desc}")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 (or float in [0, 1]) RGB -> ``3 x H x W`` float32 in [0, 1].

    Models normalise their own input (``lpdseg.models.preprocess``), so this is
    all the data pipeline does to pixel values.
    """
    x = np.asarray(image)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: ``[B x] 3 x H x W`` in [0, 1] -> ``[B x] H x W x 3`` uint8."""
    x = np.moveaxis(tensor.detach().float().cpu().numpy(), -3, -1)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _crop_pad_axis(size: int, out: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source start, destination start, length) of a random crop or pad along one axis."""
    if size >= out:
        return int(rng.integers(0, size - out + 1)), 0, out
    return 0, int(rng.integers(0, out - size + 1)), size


def _hue_matrix(turns: float) -> np.ndarray:
    """3 x 3 RGB matrix rotating hue by ``turns`` of a full turn about the grey axis."""
    a = 2.0 * math.pi * turns
    c, s = math.cos(a), math.sin(a)
    k = 1.0 / 3.0
    r = math.sqrt(k)
    # Rodrigues rotation about the unit vector (1, 1, 1) / sqrt(3)
    return np.array(
        [
            [c + (1 - c) * k, (1 - c) * k - r * s, (1 - c) * k + r * s],
            [(1 - c) * k + r * s, c + (1 - c) * k, (1 - c) * k - r * s],
            [(1 - c) * k - r * s, (1 - c) * k + r * s, c + (1 - c) * k],
        ],
        dtype=np.float32,
    )


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue change of a uint8 RGB image.

    Args:
        image: ``H x W x 3`` uint8.
        strength: ``j`` in [0, 1); factors in ``[1 - j, 1 + j]``, hue within ``+-j/4`` turn.
        rng: randomness.

    Returns:
        ``H x W x 3`` float32 in [0, 1].
    """
    x = image.astype(np.float32) / 255.0
    if strength <= 0:
        return x
    b, c, s = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    hue = rng.uniform(-strength / 4.0, strength / 4.0)
    x = x * np.float32(b)
    grey_mean = float((x @ _LUMA).mean())
    x = (x - grey_mean) * np.float32(c) + grey_mean
    grey = (x @ _LUMA)[:, :, None]
    x = (x - grey) * np.float32(s) + grey
    x = x @ _hue_matrix(hue).T
    return np.clip(x, 0.0, 1.0, out=x)


# Stain vectors (optical density of haematoxylin, eosin, DAB per RGB channel) of Ruifrok &
# Johnston, "Quantification of histochemical staining by color deconvolution" (2001).
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# darkest optical density the conversion keeps (1/255 transmission): no log(0)
_OD_MAX = float(np.log(255.0))


def stain_jitter(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random change of the haematoxylin / eosin / DAB amounts of an RGB image.

    Colour deconvolution (optical density ``-log(I)`` times the inverse stain
    matrix), then each stain's density ``d -> a * d + b`` with ``a`` in
    ``[1 - s, 1 + s]`` and ``b`` in ``[-s, s]`` (one draw per stain and image), and
    back. This mimics stain differences between labs and scanners, which a plain
    hue/brightness jitter does not (Tellez et al., 2018, "HED" augmentation).

    Args:
        x: ``H x W x 3`` float32 RGB in [0, 1].
        strength: ``s`` in [0, 1); 0 returns ``x`` unchanged.
        rng: randomness (draws 6 values when ``strength > 0``, none otherwise).

    Returns:
        ``H x W x 3`` float32 in [0, 1].
    """
    if strength <= 0:
        return x
    a = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    b = rng.uniform(-strength, strength, size=3)
    od = -np.log(np.clip(x.astype(np.float64), 1.0 / 255.0, 1.0))
    # one matrix product: od' = (hed * a + b) @ M = od @ (Minv diag(a) M) + b @ M
    od = od @ (_HED_FROM_RGB * a) @ _RGB_FROM_HED + b @ _RGB_FROM_HED
    out = np.exp(-np.clip(od, 0.0, _OD_MAX)).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


class TrainTransform:
    """Random resize, crop/pad, flips, rot90, colour and stain jitter -> [0, 1] tensor.

    Called as ``t(image)`` it returns the ``3 x S x S`` float tensor; called as
    ``t(image, mask)`` it returns ``(image_tensor, mask_tensor)`` with the same
    geometry applied to the mask (nearest neighbour, padding = 255 ignore).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        """Args:
        cfg: augmentation settings.
        """
        self.cfg = cfg

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Augment one image (and its mask).

        Args:
            image: ``H x W x 3`` uint8 RGB.
            mask: optional ``H x W`` index mask of the same size.
            rng: randomness; ``None`` draws a seed from torch's global generator.

        Returns:
            ``3 x S x S`` float tensor, or ``(image, mask)`` with a ``S x S`` long mask.
        """
        _check_image(image)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != image.shape[:2]:
                raise ValueError(
                    f"mask shape {mask.shape} differs from image shape {image.shape[:2]}"
                )
            if mask.dtype != np.uint8:
                if mask.size and (mask.min() < 0 or mask.max() > 255):
                    raise ValueError("mask values must be in 0..255 (class indices, 255 ignore)")
                mask = mask.astype(np.uint8)
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        cfg = self.cfg
        s = cfg.crop_size

        lo, hi = cfg.scale
        if hi != 1.0 or lo != 1.0:
            f = rng.uniform(lo, hi) if hi > lo else lo
            h, w = image.shape[:2]
            nh, nw = max(1, round(h * f)), max(1, round(w * f))
            if (nh, nw) != (h, w):
                interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
                image = cv2.resize(image, (nw, nh), interpolation=interp)
                if mask is not None:
                    mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)

        h, w = image.shape[:2]
        sy, dy, ly = _crop_pad_axis(h, s, rng)
        sx, dx, lx = _crop_pad_axis(w, s, rng)
        if (h, w) == (s, s):
            out_img, out_mask = image, mask
        else:
            out_img = np.full((s, s, 3), PAD_VALUE, np.uint8)
            out_img[dy : dy + ly, dx : dx + lx] = image[sy : sy + ly, sx : sx + lx]
            out_mask = None
            if mask is not None:
                out_mask = np.full((s, s), IGNORE_INDEX, mask.dtype)
                out_mask[dy : dy + ly, dx : dx + lx] = mask[sy : sy + ly, sx : sx + lx]

        # Always draw the same number of values so one setting does not shift the others.
        flip_h, flip_v = rng.random(2) < 0.5
        k = int(rng.integers(0, 4))
        if cfg.hflip and flip_h:
            out_img = out_img[:, ::-1]
            out_mask = None if out_mask is None else out_mask[:, ::-1]
        if cfg.vflip and flip_v:
            out_img = out_img[::-1]
            out_mask = None if out_mask is None else out_mask[::-1]
        if cfg.rot90 and k:
            out_img = np.rot90(out_img, k)
            out_mask = None if out_mask is None else np.rot90(out_mask, k)

        x = color_jitter(np.ascontiguousarray(out_img), cfg.color_jitter, rng)
        x = stain_jitter(x, cfg.stain_jitter, rng)
        tensor = to_tensor(x)
        if mask is None:
            return tensor
        return tensor, torch.from_numpy(np.ascontiguousarray(out_mask).astype(np.int64))


class EvalTransform:
    """Full size, [0, 1] tensor only; ``t(image, mask)`` also returns the mask as a long tensor."""

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``image`` (``H x W x 3`` uint8) as a ``3 x H x W`` float tensor in [0, 1].

        Args:
            image: RGB image.
            mask: optional ``H x W`` index mask, returned unchanged as a long tensor.

        Returns:
            The tensor, or ``(tensor, mask)`` when a mask is given.
        """
        _check_image(image)
        tensor = to_tensor(image)
        if mask is None:
            return tensor
        return tensor, torch.from_numpy(np.asarray(mask).astype(np.int64))
