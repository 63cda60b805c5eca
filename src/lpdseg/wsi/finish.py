"""A stitched canvas -> the slide's class map (and class probabilities), band by band.

The canvas holds sums (``SlideCanvas``); what the exports need is one label per
canvas pixel and, for the OME-TIFF, ``uint8`` class probabilities. Both are made
here in row bands, so a canvas kept on disk (``DiskArrays``) is never loaded
whole: resident memory holds one band, plus the ``uint8`` class map.

* :func:`finish_per_tile`: a canvas of label scores (``slide_scoring: per_tile``,
  stage-2 networks, ONNX): the argmax of the blended scores;
* :func:`finish_seamless`: a canvas of raw maps (``slide_scoring: seamless``):
  normalised over the whole canvas, gated over windows of it, glass and
  non-tissue made background (``models.decode.SeamlessDecoder``), in three
  passes over the bands (stage extremes, fused extremes, scores).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lpdseg.heap import release_heap
from lpdseg.wsi.storage import DiskArrays, ReleasingView
from lpdseg.wsi.tiling import SlideCanvas

__all__ = ["BAND_BYTES", "SlideMap", "finish_per_tile", "finish_seamless", "row_bands"]

#: Bytes of canvas sums one band reads (its rows are chosen to fit). Deciding a band
#: makes float temporaries several times its size, so bands stay small: resident
#: memory then does not depend on the slide's width.
BAND_BYTES = 8 * 2**20


@dataclass
class SlideMap:
    """A finished slide: one label per canvas pixel, and what the exports need with it.

    Attributes:
        labels: ``h x w`` uint8, classes ``0..C-1``, background ``C``.
        probabilities: ``C x h x w`` uint8 class probabilities x 255, sliceable
            (read lazily, tile by tile, by the OME-TIFF writer); None when not made.
        level: pyramid level the tiles were read from.
        level_downsample: level-0 pixels per pixel of ``level``.
        output_downsample: level pixels per canvas pixel.
        tiles: tiles that went into it.
    """

    labels: np.ndarray
    probabilities: Any | None
    level: int
    level_downsample: float
    output_downsample: int
    tiles: int

    def class_map(self) -> np.ndarray:
        """``h x w`` uint8 label map (background = number of classes)."""
        return self.labels

    @property
    def shape_hw(self) -> tuple[int, int]:
        """``(h, w)`` of the map."""
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    @property
    def downsample_to_level0(self) -> float:
        """Level-0 pixels per map pixel."""
        return self.level_downsample * self.output_downsample


def row_bands(height: int, rows: int) -> Iterator[tuple[int, int]]:
    """``(y0, y1)`` row ranges of ``rows`` rows (the last may be shorter) covering ``height``."""
    rows = max(1, int(rows))
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


def _band_rows(canvas: SlideCanvas, band_rows: int | None) -> int:
    if band_rows is not None:
        return max(1, int(band_rows))
    per_row = (canvas.num_labels + 1) * canvas.shape_hw[1] * 8
    return max(8, BAND_BYTES // max(per_row, 1))


def _new(storage: DiskArrays | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.uint8) if storage is None else storage.zeros(name, shape, np.uint8)


def _release(storage: DiskArrays | None) -> None:
    if storage is not None:
        storage.release()


def _meta(canvas: SlideCanvas) -> dict[str, Any]:
    return {
        "level": canvas.level,
        "level_downsample": canvas.level_downsample,
        "output_downsample": canvas.output_downsample,
        "tiles": canvas.tiles,
    }


def finish_per_tile(
    canvas: SlideCanvas,
    *,
    probabilities: bool = False,
    storage: DiskArrays | None = None,
    band_rows: int | None = None,
) -> SlideMap:
    """A canvas of label scores -> its class map (argmax; background where no tile).

    Args:
        canvas: blended label scores (``L`` channels, background last).
        probabilities: also give the class probabilities (read lazily from the canvas).
        storage: where the canvas lives (its pages are released band by band).
        band_rows: canvas rows per band (None: about ``BAND_BYTES`` of sums).
    """
    from lpdseg.wsi.ometiff import CanvasProbabilities

    h, w = canvas.shape_hw
    labels = np.empty((h, w), np.uint8)
    for y0, y1 in row_bands(h, _band_rows(canvas, band_rows)):
        labels[y0:y1] = canvas.class_map(slice(y0, y1))
        _release(storage)
    probs = ReleasingView(CanvasProbabilities(canvas), storage) if probabilities else None
    return SlideMap(labels, probs, **_meta(canvas))


def _band_means(canvas: SlideCanvas, y0: int, y1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``K x rows x w`` float32 blended means of canvas rows ``y0:y1``, and where covered."""
    # in float32 with torch's threads (numpy's int64 / int64 made float64, on one core);
    # sums are fixed point < 2^53, so float32 keeps ~7 digits of each mean
    weight = torch.from_numpy(np.ascontiguousarray(canvas.weight_sum[y0:y1]))
    sums = torch.from_numpy(np.ascontiguousarray(canvas.score_sum[:, y0:y1]))
    valid = weight > 0
    means = sums.to(torch.float32).div_(weight.clamp_min(1).to(torch.float32))
    return means.mul_(valid), valid


@torch.no_grad()
def finish_seamless(
    canvas: SlideCanvas,
    predictor: Any,
    window: int,
    background: np.ndarray | None = None,
    *,
    probabilities: bool = False,
    storage: DiskArrays | None = None,
    band_rows: int | None = None,
) -> SlideMap:
    """A canvas of raw maps -> label scores decided over the whole canvas, band by band.

    Equal to deciding the canvas in one piece (``Predictor.finish_slide``):
    the normalisation's extremes are gathered over every band first, and each
    band is decided with ``decoder.margin`` rows of context each side.

    Args:
        canvas: blended raw maps (``predictor.slide_raw`` layout).
        predictor: a ``Predictor`` (its ``seamless_decoder`` and device).
        window: the gate field in canvas pixels.
        background: ``h x w`` bool forced to background (e.g. outside the tissue mask).
        probabilities: also make ``uint8`` class probabilities (``storage`` holds them).
        storage: where the canvas lives, and where the probabilities go.
        band_rows: canvas rows per band (None: about ``BAND_BYTES`` of sums).
    """
    from lpdseg.models.decode import SeamlessNorm

    decoder = predictor.seamless_decoder(window)
    dev = predictor.device
    h, w = canvas.shape_hw
    c = decoder.layout.num_classes
    # a band at least as tall as its context rows, or each band reads mostly context
    rows = max(_band_rows(canvas, band_rows), decoder.margin if band_rows is None else 1)
    bands = list(row_bands(h, rows))

    last: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def means(y0: int, y1: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The three passes read the same rows again; a canvas of one band is read once.
        if (y0, y1) not in last:
            last.clear()
            raw, valid = _band_means(canvas, y0, y1)
            _release(storage)
            last[(y0, y1)] = raw.to(dev), valid.to(dev)
        return last[(y0, y1)]

    stage_lo = stage_hi = None
    for y0, y1 in bands:
        lo, hi = decoder.stage_extremes(*means(y0, y1))
        stage_lo = lo if stage_lo is None else torch.minimum(stage_lo, lo)
        stage_hi = hi if stage_hi is None else torch.maximum(stage_hi, hi)
    fused_lo = fused_hi = None
    for y0, y1 in bands:
        lo, hi = decoder.fused_extremes(*means(y0, y1), stage_lo, stage_hi)
        fused_lo = lo if fused_lo is None else torch.minimum(fused_lo, lo)
        fused_hi = hi if fused_hi is None else torch.maximum(fused_hi, hi)
    norm = SeamlessNorm(stage_lo, stage_hi, fused_lo, fused_hi)
    release_heap()  # the passes' float temporaries, before the outputs are made

    labels = np.empty((h, w), np.uint8)
    probs = _new(storage, "probabilities", (c, h, w)) if probabilities else None
    m = decoder.margin
    for y0, y1 in bands:
        e0, e1 = max(0, y0 - m), min(h, y1 + m)
        raw, valid = means(e0, e1)
        bg = None
        if background is not None:
            bg = torch.from_numpy(np.ascontiguousarray(background[e0:e1])).to(dev)
        scores = decoder.scores(raw, valid, norm, bg, slice(y0 - e0, y1 - e0)).cpu()
        labels[y0:y1] = scores.argmax(0).numpy().astype(np.uint8)
        if probs is not None:
            probs[:, y0:y1] = torch.round(scores[:c].clamp(0, 1) * 255).to(torch.uint8).numpy()
        _release(storage)
    release_heap()
    view = None if probs is None else ReleasingView(probs, storage)
    return SlideMap(labels, view, **_meta(canvas))
