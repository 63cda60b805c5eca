"""The one sliding-window path: tile grids, smooth blending, windowed prediction.

The model side is a ``predict_fn``: a callable taking a batch of RGB tiles
(``B x 3 x h x w`` float in [0, 1], i.e. uint8 / 255, *not* normalised -
models normalise themselves) and returning per-pixel scores
``B x L x h' x w'`` (``L = C + 1`` labels, background last; ``h' x w'``
other than ``h x w`` is resized bilinearly). What lives here:

* ``TileGrid`` / ``grid_for``: tile origins that cover an image exactly (the
  last tile is flush with the border; an image smaller than a tile is padded);
* ``blend_window`` / ``TileWindows``: the separable cosine window of a tile
  (flat on the image border) and a cache of them per border case;
* ``predict_tiles``: one batch of uint8 tiles through ``predict_fn``, checked;
* ``sliding_window_predict``: full-resolution scores of an image, or of one
  level of anything that reads like a slide (``LevelSource``), with
  overlapping tiles blended - no seams.

Whole slides with bounded memory (a low-resolution canvas, ranks) are built
on these in ``lpdseg.wsi.tiling``; nothing here imports ``lpdseg.wsi``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "WINDOW_FLOOR",
    "LevelSource",
    "PredictFn",
    "TileGrid",
    "TileWindows",
    "WeightKind",
    "batched",
    "blend_window",
    "grid_for",
    "level_tile_reader",
    "predict_tiles",
    "sliding_window_predict",
]

PredictFn = Callable[[torch.Tensor], torch.Tensor]
WeightKind = Literal["cosine", "uniform"]

# Weight of the outermost tile pixels relative to the centre: small enough that
# tile borders blend away, non-zero so that the blend is defined everywhere even
# without overlap.
WINDOW_FLOOR = 1e-3


@runtime_checkable
class LevelSource(Protocol):
    """What ``sliding_window_predict`` needs of a multi-level image (duck typed).

    ``lpdseg.wsi.reader.ImageReader`` is one; any object with these three
    members works. Conventions are OpenSlide's: ``(width, height)`` per
    level, level-0 pixels per level pixel, and ``read_region`` at a level-0
    ``(x, y)`` for a ``(w, h)`` size in level pixels returning ``h x w x 3``
    uint8 RGB (white outside the image).
    """

    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]: ...

    @property
    def level_downsamples(self) -> Sequence[float]: ...

    def read_region(
        self, location_level0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray: ...


# ---------------------------------------------------------------- the grid
@dataclass(frozen=True)
class TileGrid:
    """Square tiles covering an image at the working level.

    Attributes:
        shape_hw: ``(height, width)`` of the image, pixels at the working level.
        tile: tile side in pixels at the working level.
        stride: step between neighbouring tile origins in pixels (<= ``tile``,
            so there are no gaps; the last tile of a row/column is moved back
            to be flush with the border).
    """

    shape_hw: tuple[int, int]
    tile: int
    stride: int

    def __post_init__(self) -> None:
        h, w = self.shape_hw
        if h < 1 or w < 1:
            raise ValueError(f"image shape must be positive, got {self.shape_hw}")
        if self.tile < 1:
            raise ValueError(f"tile must be >= 1 pixel, got {self.tile}")
        if not 1 <= self.stride <= self.tile:
            raise ValueError(
                f"stride must be in [1, tile={self.tile}] so tiles leave no gaps, got {self.stride}"
            )

    @classmethod
    def from_overlap(cls, shape_hw: tuple[int, int], tile: int, overlap: float) -> TileGrid:
        """Grid whose neighbouring tiles overlap by the fraction ``overlap`` of a tile.

        Args:
            shape_hw: ``(height, width)`` in pixels.
            tile: tile side in pixels.
            overlap: fraction of a tile shared by neighbours, in [0, 1).
        """
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap is a fraction of the tile in [0, 1), got {overlap}")
        stride = max(1, round(tile * (1.0 - overlap)))
        return cls((int(shape_hw[0]), int(shape_hw[1])), int(tile), min(stride, int(tile)))

    @property
    def padded_hw(self) -> tuple[int, int]:
        """Image shape after padding up to at least one tile per side."""
        return max(self.shape_hw[0], self.tile), max(self.shape_hw[1], self.tile)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Tile top-left corners ``(y, x)``, row-major."""
        ys = _axis_positions(self.shape_hw[0], self.tile, self.stride)
        xs = _axis_positions(self.shape_hw[1], self.tile, self.stride)
        return [(y, x) for y in ys for x in xs]

    def __len__(self) -> int:
        return len(_axis_positions(self.shape_hw[0], self.tile, self.stride)) * len(
            _axis_positions(self.shape_hw[1], self.tile, self.stride)
        )


def _axis_positions(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(n)})


def grid_for(shape_hw: tuple[int, int], tile: int, overlap: float) -> list[tuple[int, int]]:
    """Tile origins ``(y, x)`` covering an image of ``shape_hw`` exactly.

    Args:
        shape_hw: ``(height, width)`` in pixels.
        tile: tile side in pixels.
        overlap: fraction of a tile shared by neighbours, in [0, 1).

    Returns:
        Row-major origins; the last row/column is flush with the border, and an
        image smaller than a tile gets the single origin ``(0, 0)`` (pad it).
    """
    return TileGrid.from_overlap(shape_hw, tile, overlap).origins


def batched(items: Sequence[tuple[int, int]], size: int) -> Iterator[Sequence[tuple[int, int]]]:
    """Consecutive slices of ``items`` of ``size`` (the last may be shorter)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------- blending
def blend_window(
    tile: int,
    weight: WeightKind = "cosine",
    floor: float = WINDOW_FLOOR,
    flat_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
) -> torch.Tensor:
    """Separable 2-D blending window of one tile.

    ``cosine`` is a Hann window, ``sin^2(pi (i + 0.5) / tile)`` per axis,
    clipped below at ``floor``: overlapping tiles fade into each other, so the
    blended result has no seams. On a side where the tile touches the image
    border (``flat_edges``) the ramp is replaced by ones from the centre out:
    no neighbour shares those pixels, and a ramp there would leave them to
    the near-zero edges of overlapping tiles. ``uniform`` is all ones (plain
    averaging).

    Args:
        tile: tile side in pixels.
        weight: ``"cosine"`` or ``"uniform"``.
        floor: smallest 1-D weight (cosine only), in (0, 1].
        flat_edges: ``(top, bottom, left, right)``: sides on the image border.

    Returns:
        ``tile x tile`` float32 tensor with maximum 1.
    """
    if weight == "uniform":
        return torch.ones(tile, tile)
    if weight != "cosine":
        raise ValueError(f"weight must be 'cosine' or 'uniform', got {weight!r}")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    i = torch.arange(tile, dtype=torch.float64)
    ramp = torch.sin(math.pi * (i + 0.5) / tile).pow(2).clamp_min(floor)
    half = tile // 2
    top, bottom, left, right = flat_edges
    wy, wx = ramp.clone(), ramp.clone()
    if top:
        wy[:half] = 1.0
    if bottom:
        wy[half:] = 1.0
    if left:
        wx[:half] = 1.0
    if right:
        wx[half:] = 1.0
    return torch.outer(wy, wx).float()


class TileWindows:
    """Blending windows of the tiles of one image, cached by which image borders they touch.

    Args:
        tile: tile side in pixels.
        weight: ``"cosine"`` or ``"uniform"`` (see ``blend_window``).
        shape_hw: ``(height, width)`` of the image the tiles cover.
    """

    def __init__(self, tile: int, weight: WeightKind, shape_hw: tuple[int, int]) -> None:
        self.tile, self.weight, self.shape_hw = tile, weight, shape_hw
        self._cache: dict[tuple[bool, bool, bool, bool], torch.Tensor] = {}

    def __call__(self, y: int, x: int) -> torch.Tensor:
        """The ``tile x tile`` window of the tile at origin ``(y, x)``."""
        h, w = self.shape_hw
        key = (y <= 0, y + self.tile >= h, x <= 0, x + self.tile >= w)
        if key not in self._cache:
            self._cache[key] = blend_window(self.tile, self.weight, flat_edges=key)
        return self._cache[key]


# ---------------------------------------------------------------- prediction
def predict_tiles(
    predict_fn: PredictFn,
    batch: np.ndarray,
    num_labels: int,
    *,
    check_finite: bool = True,
    size: int | None = None,
) -> torch.Tensor:
    """uint8 tiles ``B x t x t x 3`` -> float32 scores ``B x L x s x s`` on the CPU (s = t).

    Args:
        check_finite: refuse NaN/inf scores here (False: the caller checks
            something smaller they flow into, e.g. the slide's pooled sums).
        size: the side ``s`` the scores are resized to, when not ``t``.

    Raises:
        ValueError: ``predict_fn`` returned something else than ``B x L x h x w``
            finite scores.
    """
    n, t = batch.shape[0], batch.shape[1]
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    with torch.no_grad():
        out = predict_fn(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise ValueError(
            "predict_fn must return a tensor B x L x h x w, got "
            f"{type(out).__name__} {getattr(out, 'shape', '')}"
        )
    if out.shape[0] != n or out.shape[1] != num_labels:
        raise ValueError(
            f"predict_fn returned shape {tuple(out.shape)} for {n} tiles; expected "
            f"{n} x {num_labels} (num_labels) x h x w"
        )
    out = out.detach().float()
    side = size or t
    if out.shape[-2:] != (side, side):
        out = F.interpolate(out, size=(side, side), mode="bilinear", align_corners=False)
    out = out.cpu()
    if check_finite and not torch.isfinite(out).all():
        raise ValueError("predict_fn returned non-finite scores (NaN/inf)")
    return out


def level_tile_reader(
    source: LevelSource, level: int, tile: int
) -> Callable[[int, int], np.ndarray]:
    """``fetch(y, x)``: the ``tile x tile x 3`` uint8 tile of ``level`` at level pixel ``(y, x)``."""
    lds = source.level_downsamples[level]

    def fetch(y: int, x: int) -> np.ndarray:
        return source.read_region((round(x * lds), round(y * lds)), level, (tile, tile))

    return fetch


def sliding_window_predict(
    image: np.ndarray | LevelSource,
    predict_fn: PredictFn,
    num_labels: int,
    tile: int = 224,
    overlap: float = 0.25,
    batch_size: int = 8,
    weight: WeightKind = "cosine",
    progress: bool = True,
    *,
    level: int = 0,
) -> torch.Tensor:
    """Full-resolution label scores of an image by blended overlapping tiles.

    Tiles are batched through ``predict_fn``; each output is multiplied by
    the blending window, accumulated, and the sum divided by the accumulated
    window, so every pixel is a smooth weighted average of the tiles covering
    it. Images smaller than a tile are reflect-padded (slides: padded white).

    Args:
        image: ``H x W x 3`` uint8 RGB, or a ``LevelSource`` (e.g. an open
            ``lpdseg.wsi.ImageReader``; then ``level`` is the level processed
            and the result is full size at that level - whole slides go
            through ``lpdseg.wsi.stitch_slide`` instead).
        predict_fn: tiles ``B x 3 x t x t`` in [0, 1] -> scores ``B x L x h x w``.
        num_labels: L, the number of labels (classes + background).
        tile: tile side in pixels.
        overlap: fraction of a tile shared by neighbours, in [0, 1).
        batch_size: tiles per ``predict_fn`` call.
        weight: ``"cosine"`` (smooth blending) or ``"uniform"`` (averaging).
        progress: show a progress bar.
        level: pyramid level when ``image`` is a ``LevelSource``.

    Returns:
        ``L x H x W`` float32 tensor of blended scores.

    Raises:
        ValueError: a bad image, option, or ``predict_fn`` output.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be H x W x 3 uint8 RGB, got {image.shape} {image.dtype}")
        h_img, w_img = image.shape[:2]
        pad_h, pad_w = max(0, tile - h_img), max(0, tile - w_img)
        padded = (
            np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
            if pad_h or pad_w
            else image
        )

        def fetch(y: int, x: int) -> np.ndarray:
            return padded[y : y + tile, x : x + tile]
    elif isinstance(image, LevelSource):
        w_img, h_img = image.level_dimensions[level]
        fetch = level_tile_reader(image, level, tile)
    else:
        raise ValueError(
            "image must be an H x W x 3 uint8 array or have level_dimensions, "
            f"level_downsamples and read_region (like lpdseg.wsi.ImageReader); got "
            f"{type(image).__name__}"
        )

    grid = TileGrid.from_overlap((h_img, w_img), tile, overlap)
    hp, wp = grid.padded_hw
    windows = TileWindows(tile, weight, (h_img, w_img))
    acc = torch.zeros(num_labels, hp, wp)
    wsum = torch.zeros(hp, wp)
    origins = grid.origins
    with tqdm(total=len(origins), desc="tiles", unit="tile", disable=not progress) as bar:
        for chunk in batched(origins, batch_size):
            batch = np.stack([fetch(y, x) for y, x in chunk])
            out = predict_tiles(predict_fn, batch, num_labels)
            for (y, x), o in zip(chunk, out, strict=True):
                window = windows(y, x)
                acc[:, y : y + tile, x : x + tile] += o * window
                wsum[y : y + tile, x : x + tile] += window
            bar.update(len(chunk))
    return (acc / wsum)[:, :h_img, :w_img]
