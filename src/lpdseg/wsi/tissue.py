"""Tissue detection on a slide thumbnail.

H&E-stained tissue is coloured (pink/purple, i.e. saturated) while glass is
white or light grey (unsaturated and bright). The mask is

1. ``saturation > max(Otsu(saturation), min_saturation)`` (HSV, 0..255) and
   not glass by the white-glass rule of :mod:`lpdseg.data.glass` (bright,
   faintly tinted glass is never tissue, whatever Otsu picks on a slide that
   is nearly all glass or nearly all tissue; the same rule evaluation and the
   prototype bank use),
2. a morphological closing (elliptical kernel) that bridges small gaps,
3. connected fragments smaller than ``min_area_fraction`` of the image
   removed (dust, specks, debris), and holes smaller than
   ``hole_area_fraction`` of the image filled (nuclei-free spots, small
   vessels). Larger holes (lumens, tears) are kept.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from lpdseg.data.glass import DEFAULT_BRIGHTNESS, DEFAULT_SPREAD, glass_mask_np

log = logging.getLogger(__name__)


def detect_tissue(
    thumbnail_rgb: np.ndarray,
    *,
    min_area_fraction: float = 1e-3,
    hole_area_fraction: float = 1e-3,
    min_saturation: int = 15,
    glass_brightness: float = DEFAULT_BRIGHTNESS,
    glass_spread: float = DEFAULT_SPREAD,
    closing_radius_px: int | None = None,
) -> np.ndarray:
    """Foreground (tissue) mask of an RGB thumbnail.

    Args:
        thumbnail_rgb: ``H x W x 3`` uint8 RGB thumbnail of the slide (e.g.
            ``reader.thumbnail(2048)``); any size, the parameters are relative.
        min_area_fraction: connected tissue pieces smaller than this fraction
            of the thumbnail area are removed.
        hole_area_fraction: enclosed holes smaller than this fraction of the
            thumbnail area are filled.
        min_saturation: lower bound on the saturation threshold (0..255), so
            that Otsu cannot split the noise of blank glass into "tissue".
        glass_brightness, glass_spread: the white-glass rule
            (``lpdseg.data.glass.glass_mask_np``): pixels whose mean RGB is
            above ``glass_brightness`` and whose channels differ by less than
            ``glass_spread`` (both in [0, 1]) are glass, whatever their saturation.
        closing_radius_px: radius of the closing kernel in thumbnail pixels;
            None = ``max(1, round(min(H, W) / 200))``.

    Returns:
        ``H x W`` bool mask, True on tissue.

    Raises:
        ValueError: the thumbnail is not ``H x W x 3`` uint8, or a fraction is
            outside [0, 1).
    """
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3 or thumbnail_rgb.dtype != np.uint8:
        raise ValueError(
            f"thumbnail must be H x W x 3 uint8 RGB, got {thumbnail_rgb.shape} "
            f"{thumbnail_rgb.dtype}"
        )
    for name, value in (
        ("min_area_fraction", min_area_fraction),
        ("hole_area_fraction", hole_area_fraction),
    ):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    h, w = thumbnail_rgb.shape[:2]
    rgb = np.ascontiguousarray(thumbnail_rgb)
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]

    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(min_saturation))
    mask = (saturation > threshold) & ~glass_mask_np(rgb, glass_brightness, glass_spread)
    log.debug(
        "tissue: Otsu saturation %.0f, threshold %.0f, raw fraction %.3f",
        otsu,
        threshold,
        mask.mean(),
    )

    radius = max(1, round(min(h, w) / 200)) if closing_radius_px is None else closing_radius_px
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        # Pad so the closing does not glue tissue to the image border.
        pad = radius + 1
        padded = cv2.copyMakeBorder(
            mask.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0
        )
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
        mask = closed[pad : pad + h, pad : pad + w].astype(bool)

    mask = remove_small_components(mask, min_area_fraction * h * w)
    mask = fill_small_holes(mask, hole_area_fraction * h * w)
    return mask


def remove_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop 8-connected True components with fewer than ``min_area_px`` pixels.

    Args:
        mask: ``H x W`` bool.
        min_area_px: smallest area kept, in pixels of ``mask``.

    Returns:
        A new bool mask.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # label 0 is the False region
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill False regions that do not touch the border and have < ``max_hole_px`` pixels.

    Holes are 4-connected False components (the complement of 8-connected
    foreground), so a diagonal gap in a tissue outline does not open a hole.

    Args:
        mask: ``H x W`` bool.
        max_hole_px: holes smaller than this (pixels of ``mask``) are filled.

    Returns:
        A new bool mask.
    """
    h, w = mask.shape
    background = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    touches = np.zeros(n, bool)
    for edge in (labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]):
        touches[np.unique(edge)] = True
    fill = (~touches) & (stats[:, cv2.CC_STAT_AREA] < max_hole_px)
    fill[0] = False  # label 0 is the foreground
    return mask | fill[labels]


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction of True pixels of a tissue mask."""
    return float(mask.mean()) if mask.size else 0.0
