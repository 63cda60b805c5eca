"""Whole slides with bounded memory: tissue tiles, a low-resolution canvas, ranks.

The tile primitives (``TileGrid``, blending windows, ``predict_tiles``) and
the sliding window over a whole image are the inference layer's
(``lpdseg.inference.sliding``); this module adds what only slides need:

* ``select_tissue_tiles``: the tiles of a grid that overlap tissue;
* ``stitch_slide``: blended label scores of one slide level with bounded
  memory: each tile's weighted scores are sum-pooled by
  ``output_downsample`` into a low-resolution canvas right away, so the
  full-resolution score volume is never held;
* ``SlideCanvas`` / ``merge_partial``: canvases of tile subsets (``rank`` /
  ``world_size``) add up exactly to the single-process canvas.

The model enters as a ``predict_fn``: RGB tiles ``B x 3 x h x w`` in [0, 1]
(not normalised) -> label scores ``B x L x h' x w'``, background last.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lpdseg.errors import DataError
from lpdseg.heap import release_heap
from lpdseg.inference.sliding import (
    PredictFn,
    TileGrid,
    TileWindows,
    WeightKind,
    batched,
    level_tile_reader,
    predict_tiles,
)
from lpdseg.wsi.reader import ImageReader
from lpdseg.wsi.storage import DiskArrays

log = logging.getLogger(__name__)

# Slide canvases are accumulated in fixed point (int64, this many units per 1.0):
# integer addition is associative, so partial canvases from several processes
# sum to exactly the single-process canvas, whatever the order.
FIXED_POINT_SCALE = 2**20
#: names of a canvas's arrays in its ``DiskArrays`` folder (rank 0 reads the others' there)
SCORE_SUM, WEIGHT_SUM = "score_sum", "weight_sum"
# Return freed heap memory to the OS every this many batches (see _release_heap).
TRIM_EVERY_BATCHES = 8


# ---------------------------------------------------------------- tissue tiles
def select_tissue_tiles(
    grid: TileGrid,
    tissue_mask: np.ndarray,
    scale: float | tuple[float, float],
    min_fraction: float = 0.05,
) -> list[tuple[int, int]]:
    """Tiles of ``grid`` whose area is at least ``min_fraction`` tissue.

    Args:
        grid: the tile grid at the working level.
        tissue_mask: ``h x w`` bool mask (e.g. from ``detect_tissue``).
        scale: mask pixels per working-level pixel, one number or ``(sy, sx)``.
        min_fraction: smallest tissue fraction of a tile's area; a tile with
            no tissue at all is never selected.

    Returns:
        The selected origins ``(y, x)``, in grid order.
    """
    sy, sx = (float(scale), float(scale)) if np.ndim(scale) == 0 else scale  # type: ignore[misc]
    if sy <= 0 or sx <= 0:
        raise ValueError(f"scale (mask px per working px) must be > 0, got {scale}")
    mh, mw = tissue_mask.shape[:2]
    origins = grid.origins
    if not origins:
        return []
    # int32 while the count fits: the integral of a 2048^2 mask is then 16 MB, not 33
    kind = np.int32 if mh * mw < 2**31 else np.int64
    integral = np.zeros((mh + 1, mw + 1), kind)
    np.cumsum(tissue_mask, axis=0, dtype=kind, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    o = np.asarray(origins, np.float64)
    h_img, w_img = grid.shape_hw
    y1 = np.minimum(o[:, 0] + grid.tile, h_img)
    x1 = np.minimum(o[:, 1] + grid.tile, w_img)
    # Mask box of every tile (at least one mask pixel).
    my0 = np.clip(np.floor(o[:, 0] * sy), 0, mh - 1).astype(np.int64)
    mx0 = np.clip(np.floor(o[:, 1] * sx), 0, mw - 1).astype(np.int64)
    my1 = np.clip(np.ceil(y1 * sy), my0 + 1, mh).astype(np.int64)
    mx1 = np.clip(np.ceil(x1 * sx), mx0 + 1, mw).astype(np.int64)
    inside = (
        integral[my1, mx1].astype(np.int64)
        - integral[my0, mx1]
        - integral[my1, mx0]
        + integral[my0, mx0]
    )
    frac = inside / ((my1 - my0) * (mx1 - mx0))
    keep = (frac > 0) & (frac >= min_fraction)
    return [origins[i] for i in np.flatnonzero(keep)]


def level_tiles(
    reader: ImageReader,
    level: int,
    tile: int,
    overlap: float,
    tissue_mask: np.ndarray | None = None,
    min_fraction: float = 0.05,
) -> tuple[TileGrid, list[tuple[int, int]]]:
    """The tile grid of a slide level and the origins ``stitch_slide`` processes (tissue tiles).

    Args:
        reader: the open slide.
        level: pyramid level.
        tile: tile side in pixels at ``level``.
        overlap: fraction of a tile shared by neighbours.
        tissue_mask: bool mask over the whole slide at any resolution (None: every tile).
        min_fraction: smallest tissue fraction of a selected tile.
    """
    w_img, h_img = reader.level_dimensions[level]
    grid = TileGrid.from_overlap((h_img, w_img), tile, overlap)
    if tissue_mask is None:
        return grid, grid.origins
    mh, mw = tissue_mask.shape[:2]
    return grid, select_tissue_tiles(grid, tissue_mask, (mh / h_img, mw / w_img), min_fraction)


# ---------------------------------------------------------------- slides
@dataclass
class SlideCanvas:
    """Blended label scores of a slide (or of a subset of its tiles) at output resolution.

    Sums are kept in fixed point (int64, ``FIXED_POINT_SCALE`` units per 1.0)
    so that canvases of disjoint tile subsets add up exactly (``merge_partial``).

    Attributes:
        score_sum: ``L x h x w`` int64, sum over tiles and pooled pixels of
            window x score.
        weight_sum: ``h x w`` int64, the matching sum of window weights.
        level: pyramid level the tiles were read from.
        level_downsample: level-0 pixels per pixel of ``level``.
        output_downsample: level pixels per canvas pixel.
        tiles: number of tiles accumulated.
    """

    score_sum: np.ndarray
    weight_sum: np.ndarray
    level: int
    level_downsample: float
    output_downsample: int
    tiles: int = 0

    @property
    def num_labels(self) -> int:
        """L, the number of labels (background last)."""
        return int(self.score_sum.shape[0])

    @property
    def shape_hw(self) -> tuple[int, int]:
        """``(h, w)`` of the canvas."""
        return int(self.weight_sum.shape[0]), int(self.weight_sum.shape[1])

    @property
    def layout(self) -> tuple[tuple[int, ...], int, int]:
        """``(score_sum shape, level, output_downsample)``: what canvases to be summed share."""
        return tuple(self.score_sum.shape), self.level, self.output_downsample

    @property
    def downsample_to_level0(self) -> float:
        """Level-0 pixels per canvas pixel (``scale_to_level0`` of the exports)."""
        return self.level_downsample * self.output_downsample

    @property
    def covered(self) -> np.ndarray:
        """``h x w`` bool, True where at least one tile contributed."""
        return self.weight_sum > 0

    def class_map(self, rows: slice = slice(None)) -> np.ndarray:
        """``h x w`` uint8 label map: argmax of the blended scores, background where no tile.

        ``rows``: only those rows (a band of a canvas too large to read at once).
        """
        labels = self.score_sum[:, rows].argmax(0).astype(np.uint8)
        labels[self.weight_sum[rows] <= 0] = self.num_labels - 1
        return labels

    def scores(self) -> np.ndarray:
        """``L x h x w`` float32 blended scores (one-hot background where no tile)."""
        w = np.maximum(self.weight_sum, 1).astype(np.float64)
        out = (self.score_sum / w).astype(np.float32)
        out[:, ~self.covered] = 0.0
        out[-1, ~self.covered] = 1.0
        return out

    def save(self, path: str | Path) -> None:
        """Write the canvas (e.g. one rank's partial) to an ``.npz`` file atomically."""
        from lpdseg.io import atomic_save_with

        arrays = {
            "score_sum": self.score_sum,
            "weight_sum": self.weight_sum,
            "info": np.array(
                [self.level, self.level_downsample, self.output_downsample, self.tiles], np.float64
            ),
        }
        atomic_save_with(path, lambda handle: np.savez_compressed(handle, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> SlideCanvas:
        """Read a canvas written by ``save``.

        Raises:
            DataError: the file is missing or not a canvas file.
        """
        try:
            with np.load(path) as data:
                info = data["info"]
                return cls(
                    data["score_sum"],
                    data["weight_sum"],
                    int(info[0]),
                    float(info[1]),
                    int(info[2]),
                    int(info[3]),
                )
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise DataError(
                f"{path} is not a slide canvas written by SlideCanvas.save "
                f"({exc}); re-run stitch_slide for this rank"
            ) from exc


def merge_partial(accumulators: Sequence[SlideCanvas]) -> SlideCanvas:
    """Sum canvases of disjoint tile subsets (e.g. one per rank) into one.

    Args:
        accumulators: canvases from ``stitch_slide`` with the same slide,
            level, tile settings and ``output_downsample`` and different ranks.

    Returns:
        A canvas equal to the single-process one.

    Raises:
        ValueError: empty input or canvases that do not match.
    """
    if not accumulators:
        raise ValueError("merge_partial needs at least one canvas")
    first = accumulators[0]
    for other in accumulators[1:]:
        if other.layout != first.layout:
            raise ValueError(
                "canvases do not match: shapes "
                f"{first.score_sum.shape} / {other.score_sum.shape}, levels "
                f"{first.level} / {other.level}, output_downsample "
                f"{first.output_downsample} / {other.output_downsample}"
            )
    score = np.sum([a.score_sum for a in accumulators], axis=0, dtype=np.int64)
    weight = np.sum([a.weight_sum for a in accumulators], axis=0, dtype=np.int64)
    return SlideCanvas(
        score,
        weight,
        first.level,
        first.level_downsample,
        first.output_downsample,
        sum(a.tiles for a in accumulators),
    )


def _pool_tile(
    weighted: np.ndarray, window: np.ndarray, y: int, x: int, h_img: int, w_img: int, ds: int
) -> tuple[np.ndarray, int, int]:
    """Sum-pool one tile's weighted scores (L x t x t) and window onto the ds-grid.

    Returns:
        ``(L + 1) x by x bx`` fixed-point int64 block (scores, then weight) and
        its top-left canvas cell ``(cy, cx)``.
    """
    t = weighted.shape[1]
    hh, ww = min(t, h_img - y), min(t, w_img - x)  # crop the part outside the level
    # Cell boundaries inside the tile: the first cell may be cut by the tile's offset.
    iy = np.arange(-(y % ds), hh, ds).clip(0)
    ix = np.arange(-(x % ds), ww, ds).clip(0)
    stacked = np.concatenate([weighted[:, :hh, :ww], window[None, :hh, :ww]], axis=0)
    rows = np.add.reduceat(stacked, iy, axis=1, dtype=np.float64)
    pooled = np.add.reduceat(rows, ix, axis=2)
    if not np.isfinite(pooled).all():
        raise ValueError("predict_fn returned non-finite scores (NaN/inf)")
    return np.rint(pooled * FIXED_POINT_SCALE).astype(np.int64), y // ds, x // ds


def _aligned(y: int, x: int, t: int, ds: int, h_img: int, w_img: int) -> bool:
    """Whether a tile covers whole canvas cells only (the fast, batched pooling applies)."""
    return y % ds == 0 and x % ds == 0 and t % ds == 0 and y + t <= h_img and x + t <= w_img


def pool_batch(
    out: torch.Tensor,
    origins: Sequence[tuple[int, int]],
    windows: TileWindows,
    h_img: int,
    w_img: int,
    ds: int,
    *,
    cells: bool = False,
) -> list[tuple[np.ndarray, int, int]]:
    """Window-weight and sum-pool a batch of tile scores onto the canvas grid.

    Tiles that cover whole canvas cells (most of them) are pooled together in
    torch (one reshape-sum); the others (cut by the level's border or off the
    grid) by :func:`_pool_tile`. Both give fixed-point blocks.

    With ``cells``, ``out`` holds one mean per canvas cell of the tile
    (``B x L x t/ds x t/ds``): a cell's weighted sum is its mean times the
    window summed over the cell (tiles off the grid spread each mean over its
    ``ds x ds`` pixels first).

    Args:
        out: ``B x L x t x t`` float32 scores on the CPU (``t/ds`` with
            ``cells``); weighted in place (consumed).
        origins: the B tile origins ``(y, x)`` at the level.
        windows: the blending windows.
        h_img, w_img: the level's size.
        ds: level pixels per canvas cell.

    Returns:
        One ``((L + 1) x by x bx int64 block, cy, cx)`` per tile, in order.

    Raises:
        ValueError: the scores hold NaN or inf (checked on the pooled sums, which
            they would reach).
    """
    b, labels = out.shape[0], out.shape[1]
    t = windows.tile
    if cells and (t % ds or out.shape[-1] != t // ds):
        raise ValueError(f"cell maps of a {t}-px tile at {ds} px per cell must be {t // ds} px")
    win = torch.stack([windows(y, x) for y, x in origins]).to(out.dtype)  # B x t x t
    if not cells:
        out.mul_(win[:, None])
    fast = [i for i, (y, x) in enumerate(origins) if _aligned(y, x, t, ds, h_img, w_img)]
    blocks: list[tuple[np.ndarray, int, int] | None] = [None] * b
    if fast:
        n = t // ds
        part = out if len(fast) == b else out[torch.tensor(fast)]
        # Sum within cells in float32 (ds^2 terms), the fixed-point conversion in float64.
        weights = win[fast].reshape(len(fast), 1, n, ds, n, ds).sum((3, 5))
        if cells:
            scores = part * weights
        else:
            scores = part.reshape(len(fast), labels, n, ds, n, ds).sum((3, 5))
        pooled = torch.cat([scores, weights], dim=1).double()
        if not bool(torch.isfinite(pooled).all()):
            raise ValueError("predict_fn returned non-finite scores (NaN/inf)")
        fixed = torch.round(pooled * FIXED_POINT_SCALE).to(torch.int64).numpy()
        for j, i in enumerate(fast):
            y, x = origins[i]
            blocks[i] = (fixed[j], y // ds, x // ds)
    for i, (y, x) in enumerate(origins):
        if blocks[i] is None:
            score = out[i]
            if cells:  # each cell's mean over its ds x ds pixels, weighted per pixel
                score = score.repeat_interleave(ds, -2).repeat_interleave(ds, -1) * win[i]
            blocks[i] = _pool_tile(score.numpy(), win[i].numpy(), y, x, h_img, w_img, ds)
    return blocks  # type: ignore[return-value]


def stitch_slide(
    reader: ImageReader,
    level: int,
    predict_fn: PredictFn,
    num_labels: int,
    tile: int = 224,
    overlap: float = 0.25,
    batch_size: int = 8,
    *,
    tissue_mask: np.ndarray | None = None,
    tissue_min_fraction: float = 0.05,
    output_downsample: int = 8,
    weight: WeightKind = "cosine",
    rank: int = 0,
    world_size: int = 1,
    read_workers: int = 1,
    storage: DiskArrays | None = None,
    cell_maps: bool = False,
    progress: bool = True,
) -> SlideCanvas:
    """Segment one level of a slide tile by tile into a low-resolution canvas.

    Memory is bounded by the canvas (``L x H/ds x W/ds`` int64; on disk with
    ``storage``) plus a few batches of tiles: each tile's window-weighted
    scores are sum-pooled by ``output_downsample`` and added to the canvas as
    soon as it is predicted. Each canvas pixel is thus the window-weighted
    mean score of the level pixels it covers, over every tile covering them.

    The model is kept busy: the next batch is read (``read_workers`` threads)
    and the previous one pooled into the canvas (one thread) while the model
    runs on the current one. The canvas is the same whatever the threads'
    timing: its sums are integers (fixed point), which add up in any order.

    Args:
        reader: an open slide (``open_image``).
        level: pyramid level to run the model on (choose it with
            ``reader.best_level_for(target_mpp=...)``).
        predict_fn: tiles ``B x 3 x t x t`` in [0, 1] -> scores ``B x L x h x w``.
        num_labels: L, the number of labels (classes + background, last).
        tile: tile side in pixels at ``level``.
        overlap: fraction of a tile shared by neighbours, in [0, 1).
        batch_size: tiles per ``predict_fn`` call.
        tissue_mask: bool mask covering the whole slide at any resolution
            (e.g. ``detect_tissue(reader.thumbnail(2048))``); tiles without
            tissue are skipped and their canvas pixels are background. None
            processes every tile.
        tissue_min_fraction: smallest tissue fraction of a processed tile.
        output_downsample: pixels of ``level`` per canvas pixel (integer >= 1).
        weight: blending window, ``"cosine"`` or ``"uniform"``.
        rank: this process's index; it processes tiles ``i`` with
            ``i % world_size == rank`` (e.g. from ``torchrun``'s RANK).
        world_size: number of processes sharing the slide.
        read_workers: threads reading tiles ahead of the model (0: read in
            this thread, between batches).
        storage: keep the canvas in files there (``DiskArrays``), its pages
            released as tiles go by, so memory does not grow with the slide;
            None: in memory.
        cell_maps: ``predict_fn`` gives one value per canvas cell (``t/ds``
            per side; e.g. ``Predictor.slide_raw`` with ``size``), not per
            pixel: much less to pool (``tile`` must be a multiple of ``ds``).
        progress: show a progress bar.

    Returns:
        The ``SlideCanvas``: ``.class_map()`` (uint8, background = L - 1),
        ``.scores()``, ``.downsample_to_level0``; with ``world_size > 1`` a
        partial canvas to combine with ``merge_partial``.
    """
    if output_downsample < 1 or int(output_downsample) != output_downsample:
        raise ValueError(f"output_downsample must be an integer >= 1, got {output_downsample}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = int(output_downsample)
    if cell_maps and tile % ds:
        raise ValueError(f"cell_maps needs a tile ({tile}) that is a multiple of {ds}")
    w_img, h_img = reader.level_dimensions[level]
    lds = reader.level_downsamples[level]
    grid, origins = level_tiles(reader, level, tile, overlap, tissue_mask, tissue_min_fraction)
    mine = origins[rank::world_size]
    log.info(
        "%s level %d (%dx%d): %d of %d tiles hold tissue, rank %d/%d processes %d",
        reader.path,
        level,
        w_img,
        h_img,
        len(origins),
        len(grid),
        rank,
        world_size,
        len(mine),
    )

    canvas_hw = (-(-h_img // ds), -(-w_img // ds))
    if storage is None:
        score_sum = np.zeros((num_labels, *canvas_hw), np.int64)
        weight_sum = np.zeros(canvas_hw, np.int64)
    else:
        score_sum = storage.zeros(SCORE_SUM, (num_labels, *canvas_hw), np.int64)
        weight_sum = storage.zeros(WEIGHT_SUM, canvas_hw, np.int64)
    windows = TileWindows(tile, weight, (h_img, w_img))
    read_tile = level_tile_reader(reader, level, tile)

    def read_batch(chunk: Sequence[tuple[int, int]]) -> np.ndarray:
        if readers is None:
            return np.stack([read_tile(*o) for o in chunk])
        return np.stack(list(readers.map(lambda o: read_tile(*o), chunk)))

    def accumulate(chunk: Sequence[tuple[int, int]], out: torch.Tensor) -> None:
        for block, cy, cx in pool_batch(out, chunk, windows, h_img, w_img, ds, cells=cell_maps):
            by, bx = block.shape[1:]
            score_sum[:, cy : cy + by, cx : cx + bx] += block[:num_labels]
            weight_sum[cy : cy + by, cx : cx + bx] += block[num_labels]

    chunks = list(batched(mine, batch_size))
    # Dropping the canvas pages after every batch keeps resident only what one batch
    # touches; the pages the next batch shares are faulted back in from the page cache
    # (cheap next to a batch's forward). Once per row of tiles let a wide slide's
    # resident canvas grow with its width.
    release_every = 1
    readers = ThreadPoolExecutor(read_workers) if read_workers > 1 else None
    # One thread reads ahead (it drives the `readers`), one pools into the canvas.
    ahead = ThreadPoolExecutor(1) if read_workers > 0 else None
    pooler = ThreadPoolExecutor(1)
    pending = None
    try:
        with tqdm(
            total=len(mine), desc=f"{reader.path.name} tiles", unit="tile", disable=not progress
        ) as bar:
            nxt = ahead.submit(read_batch, chunks[0]) if (ahead and chunks) else None
            for b, chunk in enumerate(chunks):
                tiles = nxt.result() if nxt is not None else read_batch(chunk)
                if ahead is not None and b + 1 < len(chunks):
                    nxt = ahead.submit(read_batch, chunks[b + 1])
                else:
                    nxt = None
                out = predict_tiles(
                    predict_fn,
                    tiles,
                    num_labels,
                    check_finite=False,
                    size=tile // ds if cell_maps else None,
                )
                del tiles
                if pending is not None:
                    pending.result()  # at most one batch waits to be pooled
                pending = pooler.submit(accumulate, chunk, out)
                if b % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
                    release_heap()
                if storage is not None and b % release_every == release_every - 1:
                    storage.release()
                bar.update(len(chunk))
            if pending is not None:
                pending.result()
                pending = None
    finally:
        if pending is not None:
            pending.cancel()
            try:
                pending.result()
            except BaseException:  # the first error is the one raised
                pass
        for pool in (ahead, readers, pooler):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    if storage is not None:
        storage.release()
    release_heap()
    return SlideCanvas(score_sum, weight_sum, level, float(lds), ds, len(mine))


# ---------------------------------------------------------------- seams
def tile_border_zones(origins: Sequence[int], tile: int, length: int) -> list[tuple[float, float]]:
    """Where neighbouring tiles hand over, along one axis (same pixels as ``origins``).

    Between consecutive tiles ``[o_i, o_i + tile)`` and ``[o_j, ...)`` the blending
    weights are equal at the middle of their overlap ``(o_j + o_i + tile) / 2``
    (the edge ``o_j`` without overlap): a per-tile decision flips there. Returned
    as zero-width zones ``(c, c)``; ``seam_score``'s ``band`` widens them.
    """
    starts = sorted(set(int(o) for o in origins))
    zones = []
    for a, b in zip(starts, starts[1:]):
        c = 0.5 * (b + min(a + tile, length))
        zones.append((c, c))
    return zones


def seam_score(
    class_map: np.ndarray,
    zones_y: Sequence[tuple[float, float]],
    zones_x: Sequence[tuple[float, float]],
    *,
    band: float = 2.0,
    valid: np.ndarray | None = None,
) -> float:
    """Class changes on tile borders / class changes elsewhere, per unit length.

    A change is a pair of 4-neighbours with different labels, placed between
    them; changes between horizontal neighbours are counted against the vertical
    borders (``zones_x``, columns) and vertical ones against the horizontal borders
    (``zones_y``, rows). A pair lies on a border when it is within ``band`` pixels
    of a zone. The score is the rate (changes per pair) on borders over the rate
    elsewhere: ~1 when borders are nowhere special, large for tile-shaped artefacts.

    Args:
        class_map: ``h x w`` labels.
        zones_y / zones_x: border intervals in map pixels (``tile_border_zones``
            divided by the map's downsample).
        band: half-width added to every zone.
        valid: ``h x w`` bool, pairs with an invalid pixel are ignored (None: all).

    Returns:
        The ratio (1.0 when there are no changes at all, ``inf`` when all are on borders).
    """
    m = np.asarray(class_map)
    h, w = m.shape
    ok = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)

    def near(n: int, zones) -> np.ndarray:
        pos = np.arange(n - 1) + 0.5  # between pixel i and i + 1
        hit = np.zeros(n - 1, bool)
        for lo, hi in zones:
            hit |= (pos >= lo - band) & (pos <= hi + band)
        return hit

    dx = m[:, 1:] != m[:, :-1]
    okx = ok[:, 1:] & ok[:, :-1]
    dy = m[1:] != m[:-1]
    oky = ok[1:] & ok[:-1]
    zx = np.broadcast_to(near(w, zones_x)[None], dx.shape)
    zy = np.broadcast_to(near(h, zones_y)[:, None], dy.shape)
    on_n = (dx & okx & zx).sum() + (dy & oky & zy).sum()
    on_d = (okx & zx).sum() + (oky & zy).sum()
    off_n = (dx & okx & ~zx).sum() + (dy & oky & ~zy).sum()
    off_d = (okx & ~zx).sum() + (oky & ~zy).sum()
    rate_on = on_n / max(on_d, 1)
    rate_off = off_n / max(off_d, 1)
    if rate_off == 0:
        return 1.0 if rate_on == 0 else float("inf")
    return float(rate_on / rate_off)
