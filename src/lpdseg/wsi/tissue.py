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

Pen marks (``detect_tissue(..., remove_pen=True)``): pathologists circle
regions with marker pens; the ink is saturated, so rule 1 takes it for
tissue. With the filter on, ink pixels (:func:`pen_mask`) are left out of
the Otsu threshold and of the mask, before and again after the closing (so
the closing cannot bridge a stroke back in), and pieces cut off by a stroke
that fall under ``min_area_fraction`` go too. The rules, in OpenCV's HSV
(H = hue in degrees / 2, 0..179; S and V 0..255), defaults of
:class:`PenThresholds`:

* blue ink: ``100 <= H <= 125`` (200..250 degrees) and ``S >= 125``
  (~49 %). Hematoxylin is purple (H ~ 128..150, 255..300 degrees) and less
  saturated (S ~ 70..120 at thumbnail scale), so nuclei-dense tissue stays;
* green ink: ``35 <= H < 100`` (70..200 degrees: yellow-green to cyan) and
  ``S >= 50``: H&E has no green or cyan at all;
* black ink: ``V <= 50`` (~20 % brightness), any hue: the darkest tissue at
  thumbnail scale (dense nuclei, folds) stays above it;
* every ink mask is grown by ``dilate_px`` (1) thumbnail pixel for the
  blended rim of a stroke.

Red ink is not removed: it cannot be told from eosin by colour.

:func:`load_tissue_mask` reads a user's tissue mask instead: a binary image
or a QuPath GeoJSON of annotations, at the thumbnail's shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely

from lpdseg.data.glass import DEFAULT_BRIGHTNESS, DEFAULT_SPREAD, glass_mask_np
from lpdseg.errors import DataError
from lpdseg.imageio import read_image, read_mask
from lpdseg.wsi.export import (
    feature_class_name,
    feature_geometry,
    rasterize_geometry,
    read_geojson_features,
)

log = logging.getLogger(__name__)

#: Suffixes read as GeoJSON by ``load_tissue_mask`` (anything else: an image).
GEOJSON_SUFFIXES = (".geojson", ".json")
#: QuPath classification names (prefix, case-insensitive) whose polygons are cut
#: out of a GeoJSON tissue mask: QuPath's own ``Ignore*`` class.
IGNORE_CLASS_PREFIX = "ignore"
#: Largest mismatch of a mask image's aspect ratio with the slide's (fraction of
#: its width, at least 2 pixels) before it is refused as another slide's mask.
MASK_ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class PenThresholds:
    """HSV rules of :func:`pen_mask` (OpenCV HSV: H 0..179 = degrees / 2, S and V 0..255).

    Attributes:
        blue_hue: inclusive ``(lo, hi)`` hue of blue ink.
        blue_min_saturation: smallest saturation of blue ink.
        green_hue: ``(lo, hi)`` hue of green ink, ``lo <= H < hi``.
        green_min_saturation: smallest saturation of green ink.
        black_max_value: brightest black ink (V), any hue.
        dilate_px: the ink mask is grown by this many pixels (0: not grown).
    """

    blue_hue: tuple[int, int] = (100, 125)
    blue_min_saturation: int = 125
    green_hue: tuple[int, int] = (35, 100)
    green_min_saturation: int = 50
    black_max_value: int = 50
    dilate_px: int = 1


def pen_mask(thumbnail_rgb: np.ndarray, thresholds: PenThresholds | None = None) -> np.ndarray:
    """Pixels of blue, green or black marker ink on an RGB thumbnail (module doc: the rules).

    Args:
        thumbnail_rgb: ``H x W x 3`` uint8 RGB.
        thresholds: the rules; None = :class:`PenThresholds` defaults.

    Returns:
        ``H x W`` bool, True on ink.
    """
    t = thresholds or PenThresholds()
    hsv = cv2.cvtColor(np.ascontiguousarray(thumbnail_rgb), cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (h >= t.blue_hue[0]) & (h <= t.blue_hue[1]) & (s >= t.blue_min_saturation)
    green = (h >= t.green_hue[0]) & (h < t.green_hue[1]) & (s >= t.green_min_saturation)
    ink = blue | green | (v <= t.black_max_value)
    if t.dilate_px > 0 and ink.any():
        k = 2 * int(t.dilate_px) + 1
        ink = cv2.dilate(ink.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    return ink


def detect_tissue(
    thumbnail_rgb: np.ndarray,
    *,
    min_area_fraction: float = 1e-3,
    hole_area_fraction: float = 1e-3,
    min_saturation: int = 15,
    glass_brightness: float = DEFAULT_BRIGHTNESS,
    glass_spread: float = DEFAULT_SPREAD,
    closing_radius_px: int | None = None,
    remove_pen: bool = False,
    pen_thresholds: PenThresholds | None = None,
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
        remove_pen: leave blue, green and black marker ink out of the mask
            (:func:`pen_mask`; the rules are in the module doc).
        pen_thresholds: the ink rules; None = :class:`PenThresholds` defaults.

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

    ink = pen_mask(rgb, pen_thresholds) if remove_pen else None
    if ink is not None and ink.all():
        return np.zeros((h, w), bool)
    # Otsu on the pixels that are not ink (saturated ink would raise the threshold).
    values = saturation if ink is None else saturation[~ink].reshape(1, -1)
    otsu, _ = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(min_saturation))
    mask = (saturation > threshold) & ~glass_mask_np(rgb, glass_brightness, glass_spread)
    if ink is not None:
        mask &= ~ink
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
    if ink is not None and ink.any():
        log.debug("tissue: pen ink on %.3f of the thumbnail removed", ink.mean())
        mask = remove_small_components(mask & ~ink, min_area_fraction * h * w)
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


# ---------------------------------------------------------------- the user's mask
def _mask_from_image(path: Path, slide_wh: tuple[int, int]) -> np.ndarray:
    """Non-zero pixels of a mask image (single-channel, or colour: any channel non-zero)."""
    try:
        values = read_mask(path, 254)  # every uint8 value is accepted
    except DataError as first:
        try:
            values = read_image(path, min_side=1).max(axis=2)
        except DataError:
            raise first from None
    mh, mw = values.shape
    expected_w = mh * slide_wh[0] / slide_wh[1]
    if abs(mw - expected_w) > max(2.0, MASK_ASPECT_TOLERANCE * expected_w):
        raise DataError(
            f"{path}: tissue mask is {mw}x{mh} px, not the shape of the slide "
            f"({slide_wh[0]}x{slide_wh[1]} level-0 px; a {mw}-px-wide mask would be "
            f"{mw * slide_wh[1] / slide_wh[0]:.0f} px tall); export the mask of this "
            "slide, whole (any downsample)"
        )
    tissue = values != 0
    if not tissue.any():
        raise DataError(
            f"{path}: tissue mask has no non-zero pixel (non-zero = tissue, 0 = "
            "background); invert it if tissue is black"
        )
    return tissue


def _mask_from_geojson(
    path: Path, slide_wh: tuple[int, int], out_hw: tuple[int, int]
) -> np.ndarray:
    """Polygons of a QuPath GeoJSON (level-0 px) rasterised at ``out_hw``; ``Ignore*`` cut out."""
    sx, sy = out_hw[1] / slide_wh[0], out_hw[0] / slide_wh[1]
    keep = np.zeros(out_hw, np.uint8)
    drop = np.zeros(out_hw, np.uint8)
    polygons = ignored = 0
    for feature in read_geojson_features(path):
        if not isinstance(feature, dict):
            continue
        geom = feature_geometry(path, feature)
        if geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            continue
        local = shapely.transform(geom, lambda xy: xy * (sx, sy))
        name = feature_class_name(feature) or ""
        if name.lower().startswith(IGNORE_CLASS_PREFIX):
            rasterize_geometry(drop, local, 1)
            ignored += 1
        else:
            rasterize_geometry(keep, local, 1)
            polygons += 1
    if polygons == 0:
        raise DataError(
            f"{path}: no polygon annotations to use as the tissue mask (points and "
            "lines are not areas); draw the tissue with the brush, wand or polygon "
            "tool in QuPath and export it with File > Export objects as GeoJSON"
        )
    tissue = keep.astype(bool) & ~drop.astype(bool)
    if not tissue.any():
        raise DataError(
            f"{path}: its {polygons} polygons cover no pixel of the {out_hw[1]}x{out_hw[0]} "
            f"mask of a {slide_wh[0]}x{slide_wh[1]} slide (after {ignored} Ignore* "
            "polygons): are they in level-0 pixels of this slide?"
        )
    return tissue


def load_tissue_mask(
    path: str | Path,
    slide_dims_level0: Sequence[int],
    out_shape: Sequence[int],
) -> np.ndarray:
    """A user's tissue mask as a bool mask of shape ``out_shape`` (e.g. the thumbnail's).

    Two kinds of file:

    * a binary image of the whole slide at any size (PNG, TIFF, ...): non-zero
      = tissue, scaled to ``out_shape`` by nearest neighbour (pixel centres);
      its aspect ratio must be the slide's. Single-channel (L, 1-bit,
      palette indices, 16-bit) is best; a colour image counts a pixel with
      any non-zero channel, after transparency is composited on white
      (``lpdseg.imageio``'s rule: transparent = tissue);
    * a GeoJSON (``.geojson`` / ``.json``, e.g. QuPath's File > Export
      objects as GeoJSON): its polygons, in level-0 pixels, are tissue (a
      mask pixel is tissue when its centre lies inside; holes honoured),
      minus the polygons classified ``Ignore*`` (QuPath's class for regions
      to leave out); points and lines are skipped.

    Args:
        path: the mask file.
        slide_dims_level0: ``(width, height)`` of the slide's level 0
            (``reader.dimensions``).
        out_shape: ``(h, w)`` of the mask to return (e.g. the thumbnail's
            ``shape[:2]``, the working shape ``stitch_slide`` scales from).

    Returns:
        ``h x w`` bool, True on tissue.

    Raises:
        DataError: unreadable file, a mask image of another shape than the
            slide, a GeoJSON without polygons, or a mask with no tissue.
    """
    path = Path(path)
    slide_wh = (int(slide_dims_level0[0]), int(slide_dims_level0[1]))
    out_hw = (int(out_shape[0]), int(out_shape[1]))
    if min(slide_wh) < 1 or min(out_hw) < 1:
        raise ValueError(
            f"slide_dims_level0 {tuple(slide_dims_level0)} and out_shape {tuple(out_shape)} "
            "must be positive"
        )
    if path.suffix.lower() in GEOJSON_SUFFIXES:
        tissue = _mask_from_geojson(path, slide_wh, out_hw)
        kind = "GeoJSON"
    else:
        mask = _mask_from_image(path, slide_wh)
        kind = f"{mask.shape[1]}x{mask.shape[0]} image"
        resized = cv2.resize(
            mask.astype(np.uint8), (out_hw[1], out_hw[0]), interpolation=cv2.INTER_NEAREST_EXACT
        )
        tissue = resized.astype(bool)
    log.info(
        "tissue mask from %s (%s): %.1f %% of the slide", path, kind, 100 * tissue_fraction(tissue)
    )
    return tissue
