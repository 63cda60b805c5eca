"""``lpdseg slide`` as steps: a checkpoint on a whole slide -> what QuPath and people open.

:func:`run_slide_job` runs one :class:`~lpdseg.wsi.job.SlideJob` through
these steps, each a function of its own:

1. :func:`check_output` - before any work: the output folder is a folder (or
   can be created) and holds no finished run of this slide unless
   ``overwrite``;
2. open the slide (``open_image``: OpenSlide formats, or a plain image as a
   one-level slide) and :func:`load_predictor` (a PyTorch checkpoint, or an
   ONNX export run by onnxruntime);
3. :func:`choose_level` - the pyramid level for the working resolution:
   the job's ``mpp_um_per_px`` or ``downsample_level0_px`` when given, else
   the pixel size the model was trained at (:func:`model_mpp`: the
   checkpoint's ``data.mpp``, the ONNX metadata's ``mpp``), found on the
   slide through its pixel size (its metadata's, or the job's
   ``slide_mpp_um_per_px``); between levels, tiles are read larger at the
   next finer level and resized to the model's tile (``cfg.eval.tile`` or
   the ONNX model's fixed tile, unless the job says);
4. :func:`lock_output` - take ``out_dir``'s lock file (rank 0), so two runs
   never write into one folder at once;
5. :func:`find_tissue` on a thumbnail, so glass tiles are skipped;
6. :func:`infer_tiles` - stream batched, overlapping tiles through the
   model into a low-resolution canvas (``stitch_slide``: memory bounded by
   the canvas and one batch); under ``torchrun`` each rank takes a share of
   the tiles, and :func:`merge_ranks` adds the shares up on rank 0;
7. :func:`write_outputs` into ``out_dir`` (``<stem>`` = slide file stem):

   - ``<stem>.geojson``: QuPath annotations, one polygon per class region,
     holes kept, coordinates in level-0 pixels;
   - ``<stem>_overlay.png``: class colours over a downsampled slide, legend;
   - ``<stem>_classmap.png``: index PNG of the stitched map (classes
     ``0..C-1``, background ``C``), one pixel per ``summary.map_downsample``
     level-0 pixels;
   - ``<stem>_areas.csv`` / ``.json``: pixels, fraction of tissue and area
     in um^2 (when the slide has a resolution) per class;
   - ``<stem>_summary.json`` (last, so it marks a finished run): level,
     resolutions and where they came from (``resolution_source``,
     ``slide_mpp_source``), tiles, seconds, peak RSS.

Every file is written atomically; a failure leaves earlier files in place
and releases the lock.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lpdseg.engine.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    resolve_device,
    training_device,
)
from lpdseg.errors import LpdsegError
from lpdseg.heap import keep_freed_memory
from lpdseg.wsi.finish import SlideMap, finish_per_tile, finish_seamless
from lpdseg.wsi.job import (
    DEFAULT_MPP_UM_PER_PX,
    MAX_MPP_UM_PER_PX,
    SlideJob,
    SlideJobError,
)
from lpdseg.wsi.lock import OutputLock
from lpdseg.wsi.reader import ImageReader, open_image
from lpdseg.wsi.storage import DiskArrays, open_array, remove_stale
from lpdseg.wsi.tiling import (
    SCORE_SUM,
    WEIGHT_SUM,
    SlideCanvas,
    merge_partial,
    stitch_slide,
)
from lpdseg.wsi.tissue import detect_tissue

log = logging.getLogger(__name__)

__all__ = [
    "RESOLUTION_DEFAULT",
    "LevelPlan",
    "SlideResult",
    "check_output",
    "choose_level",
    "find_tissue",
    "finish_canvas",
    "infer_tiles",
    "job_device",
    "load_predictor",
    "lock_output",
    "merge_ranks",
    "model_mpp",
    "model_tile",
    "peak_rss_mb",
    "run_slide_job",
    "slide_scoring",
    "slide_mpp",
    "write_outputs",
]


#: ``resolution_source`` of a run at ``DEFAULT_MPP_UM_PER_PX`` (the model records no pixel size).
RESOLUTION_DEFAULT = f"default {DEFAULT_MPP_UM_PER_PX:g} um/px (the model records no data.mpp)"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


# ---------------------------------------------------------------- 1. output
def check_output(job: SlideJob) -> None:
    """Fail early when the job could not write its outputs, or would replace a finished run.

    Raises:
        SlideJobError: ``out_dir`` is a file, lies under a file, is not
            writable, or already holds this slide's summary and
            ``job.overwrite`` is off.
    """
    out = job.out_dir
    if out.exists() and not out.is_dir():
        raise SlideJobError(
            "out_dir", out, "is an existing file, not a folder; name a folder (it is created)"
        )
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise SlideJobError("out_dir", out, f"cannot be created: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SlideJobError("out_dir", out, f"cannot be written: no write permission on {base}")
    summary = job.summary_path
    if summary.is_file() and not job.overwrite:
        raise SlideJobError(
            "out_dir",
            out,
            f"already holds a finished run of {job.slide.name} ({summary}); "
            "refusing to overwrite it",
            remedy=("overwrite", "to replace it"),
        )


# ---------------------------------------------------------------- 2. model
def job_device(name: str, ctx: DistContext) -> torch.device:
    """The device for ``SlideJob.device`` ``name`` on this rank (``cuda:LOCAL_RANK`` under torchrun).

    Raises:
        SlideJobError: a CUDA device is asked for and there is none.
    """
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SlideJobError("device", name, "but no CUDA device is available; use auto or cpu")
    return resolve_device(training_device(name, ctx))


_device = job_device


def load_predictor(job: SlideJob, device: torch.device) -> Any:
    """The model as a tile predictor (RGB tiles in [0, 1] -> label scores).

    ``job.backend == "torch"``: the checkpoint as an ``lpdseg.inference.Predictor``
    on ``device`` (the job's tta/threshold). ``"onnx"``: the ``.onnx`` file as an
    ``lpdseg.exports.onnx.OnnxPredictor`` (onnxruntime; its CUDA provider when
    ``device`` is CUDA and onnxruntime has one, else the CPU).

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        OnnxError: onnxruntime is missing or the file is not an lpdseg ONNX export.
    """
    if job.backend == "onnx":
        from lpdseg.exports.onnx import OnnxPredictor

        return OnnxPredictor(job.checkpoint, providers=_onnx_providers(device))
    from lpdseg.inference import Predictor, load_model

    model, cfg = load_model(job.checkpoint, device)
    return Predictor(model, cfg, tta=job.tta, threshold=job.threshold, device=device)


def _onnx_providers(device: torch.device) -> list[str] | None:
    """onnxruntime providers for ``device`` (None: onnxruntime is missing, the predictor says so)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    try:
        import onnxruntime
    except ImportError:
        return None
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _predictor_device(predictor: Any, device: torch.device) -> str:
    """Where the predictor runs, in words (``cuda:0``, ``onnxruntime CPUExecutionProvider``)."""
    session = getattr(predictor, "session", None)
    if session is not None:
        return "onnxruntime " + ",".join(session.get_providers())
    return str(device)


def model_mpp(predictor: Any) -> tuple[float | None, str]:
    """The pixel size the model was trained at (um/px, None: unknown) and where it was read.

    A ``Predictor``'s checkpoint config ``data.mpp`` (``"checkpoint data.mpp"``)
    or an ``OnnxPredictor``'s metadata ``mpp`` (``"ONNX metadata mpp"``). A value
    that is not a plausible pixel size is ignored with a warning.
    """
    if hasattr(predictor, "cfg"):
        value, source = getattr(predictor.cfg.data, "mpp", None), "checkpoint data.mpp"
    else:
        value, source = getattr(predictor, "mpp", None), "ONNX metadata mpp"
    if value is None:
        return None, source
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and 0 < value < MAX_MPP_UM_PER_PX):
        log.warning("ignoring the model's %s=%r: not a pixel size in (0, 100) um/px", source, value)
        return None, source
    return float(value), source


def model_tile(predictor: Any, job: SlideJob) -> int:
    """The tile side the model sees: ``job.tile_working_px``, else the model's own.

    The model's own is the checkpoint's ``eval.tile``, or an ONNX model's fixed
    input size (which a different ``job.tile_working_px`` cannot change).

    Raises:
        SlideJobError: ``job.tile_working_px`` differs from an ONNX model's tile.
    """
    fixed = getattr(predictor, "tile", None) if job.backend == "onnx" else None
    if fixed is not None:
        fixed = int(fixed)
        if job.tile_working_px is not None and job.tile_working_px != fixed:
            raise SlideJobError(
                "tile_working_px",
                job.tile_working_px,
                f"differs from the fixed tile of the ONNX model ({{checkpoint}}): {fixed} px; "
                "drop it to use the model's, or export again with `lpdseg export --tile "
                f"{job.tile_working_px}`",
                related={"checkpoint": job.checkpoint},
            )
        return fixed
    return job.tile_working_px or int(predictor.cfg.eval.tile)


# ---------------------------------------------------------------- 3. level
@dataclass(frozen=True)
class LevelPlan:
    """Where and how big tiles are read for the job's working resolution.

    Attributes:
        requested: the request in words (``"2 um/px"``, ``"downsample 4"``).
        level: pyramid level read.
        level_downsample: level-0 pixels per pixel of ``level``.
        level_mpp_um_per_px: micrometres per pixel of ``level`` (None: unknown).
        extra_scale: working pixels per ``level`` pixel (<= 1; 1 when the
            level matches, or when the request is finer than level 0 and level
            0 is used as it is).
        tile_model_px: tile side the model sees (working pixels).
        tile_level_px: tile side read from ``level`` (resized to
            ``tile_model_px`` when they differ).
        map_downsample_level_px: ``level`` pixels per class-map pixel.
        resolution_source: where the working resolution came from, named by
            the ``lpdseg slide`` flag that sets it: ``"--mpp"``,
            ``"--downsample"``, ``"checkpoint data.mpp"``, ``"ONNX metadata
            mpp"`` or :data:`RESOLUTION_DEFAULT`.
        model_mpp_um_per_px: the pixel size the model was trained at (None: unknown).
        mpp_level0: the slide's ``(x, y)`` micrometres per level-0 pixel used
            (None: unknown).
        slide_mpp_source: ``"metadata"`` (the slide's own), ``"--slide-mpp"``
            (the job's ``slide_mpp_um_per_px``) or None (unknown).
        slide_mpp_metadata: what the slide's metadata says (mean um/px; None: nothing).
    """

    requested: str
    level: int
    level_downsample: float
    level_mpp_um_per_px: float | None
    extra_scale: float
    tile_model_px: int
    tile_level_px: int
    map_downsample_level_px: int
    resolution_source: str = ""
    model_mpp_um_per_px: float | None = None
    mpp_level0: tuple[float, float] | None = None
    slide_mpp_source: str | None = None
    slide_mpp_metadata: float | None = None

    @property
    def map_downsample_level0_px(self) -> float:
        """Level-0 pixels per class-map pixel."""
        return self.level_downsample * self.map_downsample_level_px

    @property
    def map_mpp_um_per_px(self) -> float | None:
        """Micrometres per class-map pixel (None when the slide has no mpp)."""
        if not self.level_mpp_um_per_px:
            return None
        return self.level_mpp_um_per_px * self.map_downsample_level_px

    @property
    def working_mpp_um_per_px(self) -> float | None:
        """Micrometres per pixel the model actually sees (None when the slide has no mpp)."""
        if not self.level_mpp_um_per_px:
            return None
        return self.level_mpp_um_per_px / self.extra_scale

    def resolution_fields(self) -> dict[str, Any]:
        """The resolutions used and where they came from, as summary fields."""
        slide = None if self.mpp_level0 is None else 0.5 * sum(self.mpp_level0)
        return {
            "working_mpp": self.working_mpp_um_per_px,
            "resolution_source": self.resolution_source,
            "model_mpp": self.model_mpp_um_per_px,
            "slide_mpp": slide,
            "slide_mpp_source": self.slide_mpp_source,
            "slide_mpp_metadata": self.slide_mpp_metadata,
        }


def slide_mpp(reader: ImageReader, job: SlideJob) -> tuple[tuple[float, float] | None, str | None]:
    """The slide's ``(x, y)`` micrometres per level-0 pixel and where it came from.

    ``job.slide_mpp_um_per_px`` (``"--slide-mpp"``) replaces the metadata's
    (``"metadata"``); ``(None, None)`` when neither says.
    """
    if job.slide_mpp_um_per_px is not None:
        given = float(job.slide_mpp_um_per_px)
        if reader.mpp is not None:
            log.info(
                "%s: its metadata says %.4g um/px; using the given %.4g um/px",
                reader.path,
                0.5 * (reader.mpp[0] + reader.mpp[1]),
                given,
            )
        return (given, given), "--slide-mpp"
    if reader.mpp is not None:
        return (float(reader.mpp[0]), float(reader.mpp[1])), "metadata"
    return None, None


def choose_level(
    reader: ImageReader,
    job: SlideJob,
    tile_model_px: int,
    model_mpp_um_per_px: float | None = None,
    model_mpp_source: str = "checkpoint data.mpp",
) -> LevelPlan:
    """Pick the level to read and the tile and map sizes there.

    The working resolution is, in this order: ``job.downsample_level0_px``
    (level-0 pixels per working pixel), ``job.mpp_um_per_px``, the model's
    own pixel size (``model_mpp_um_per_px``), else ``DEFAULT_MPP_UM_PER_PX``
    (with a warning). A resolution in um/px is found on the slide through
    its pixel size (:func:`slide_mpp`: the job's ``slide_mpp_um_per_px``,
    else its metadata's). A request finer than level 0 works at level 0 as
    it is (nothing finer can be read, and tiles are not upsampled), with a
    warning saying so.

    Args:
        reader: the open slide.
        job: the job (its resolution and ``map_downsample_working_px``).
        tile_model_px: the model's tile side in working pixels.
        model_mpp_um_per_px: the pixel size the model was trained at (None: unknown).
        model_mpp_source: where it was read (the plan's ``resolution_source``).

    Raises:
        SlideJobError: a resolution in um/px is asked for (or the model's is
            used) but the slide's pixel size is unknown, or neither the model
            nor the slide knows its pixel size and no downsample is given;
            the message says how to give each.
    """
    mpp_level0, slide_source = slide_mpp(reader, job)
    slide_mean = None if mpp_level0 is None else 0.5 * (mpp_level0[0] + mpp_level0[1])
    target: float | None = None
    if job.downsample_level0_px is not None:
        downsample, source = float(job.downsample_level0_px), "--downsample"
    else:
        if job.mpp_um_per_px is not None:
            target, source = float(job.mpp_um_per_px), "--mpp"
        elif model_mpp_um_per_px is not None:
            target, source = float(model_mpp_um_per_px), model_mpp_source
        elif slide_mean is not None:
            target, source = DEFAULT_MPP_UM_PER_PX, RESOLUTION_DEFAULT
            log.warning(
                "%s records no pixel size it was trained at (data.mpp); working at the "
                "default %g um/px. Give the working resolution (--mpp X) if the model was "
                "trained at another, and train with data.mpp=X so checkpoints record it",
                job.checkpoint,
                DEFAULT_MPP_UM_PER_PX,
            )
        else:
            raise SlideJobError(
                "slide",
                job.slide,
                "has no pixel size (mpp) in its metadata and the model ({checkpoint}) records "
                "none it was trained at (data.mpp), so there is no working resolution: give "
                "the slide's pixel size with {@slide_mpp_um_per_px} X (micrometres per level-0 "
                "pixel), or the working resolution with {@mpp_um_per_px} X (um/px, with the "
                "slide's pixel size) or {@downsample_level0_px} X (level-0 pixels per working "
                "pixel); train with data.mpp=X so checkpoints record theirs",
                related={"checkpoint": job.checkpoint},
            )
        if slide_mean is None:
            raise SlideJobError(
                "slide",
                job.slide,
                f"has no pixel size (mpp) in its metadata, so the working resolution "
                f"{target:g} um/px ({source}) cannot be found on it: give the slide's pixel "
                "size with {@slide_mpp_um_per_px} X (micrometres per level-0 pixel), or the "
                "working resolution as {@downsample_level0_px} X (level-0 pixels per "
                "working pixel)",
            )
        downsample = target / slide_mean
    level, extra = reader.best_level_for(downsample=downsample)
    how = f"{target:g} um/px" if target is not None else f"downsample {downsample:g}"
    lds = float(reader.level_downsamples[level])
    level_mpp = None if slide_mean is None else slide_mean * lds
    out_ds = job.map_downsample_working_px
    if extra > 1.0:
        native = f"{level_mpp:.3g} um/px" if level_mpp else "downsample 1"
        log.warning(
            "%s: %s is finer than level 0 (%s), the finest the slide has; working at "
            "level 0's native resolution instead (tiles of %d level-0 px, not "
            "upsampled; class map at %d level-0 px per pixel)",
            reader.path,
            how,
            native,
            tile_model_px,
            out_ds,
        )
        extra = 1.0
    # Tiles are read at the level so that, resized by `extra`, they are `tile_model_px`.
    if extra < 1.0:
        tile_level = max(tile_model_px, round(tile_model_px / extra))
        map_ds = max(1, round(out_ds / extra))
    else:
        tile_level, map_ds = tile_model_px, out_ds
    plan = LevelPlan(
        how,
        level,
        lds,
        level_mpp,
        float(extra),
        tile_model_px,
        tile_level,
        map_ds,
        resolution_source=source,
        model_mpp_um_per_px=model_mpp_um_per_px,
        mpp_level0=mpp_level0,
        slide_mpp_source=slide_source,
        slide_mpp_metadata=None if reader.mpp is None else 0.5 * (reader.mpp[0] + reader.mpp[1]),
    )
    log.info(
        "%s: %s (%s) -> level %d (downsample %.3g%s), tiles of %d level px",
        reader.path,
        how,
        source,
        level,
        lds,
        f", {level_mpp:.3g} um/px" if level_mpp else "",
        tile_level,
    )
    return plan


# ---------------------------------------------------------------- 4. lock
def lock_output(job: SlideJob, ctx: DistContext) -> OutputLock:
    """Take ``job.out_dir``'s lock on rank 0 and check the folder again under it.

    Every rank returns or raises together (rank 0's outcome is broadcast),
    so no rank starts on tiles that will never be written.

    Returns:
        The lock (held on rank 0; not held on the other ranks). Release it
        with ``release()``.

    Raises:
        OutputLockedError: another live run holds the lock.
        SlideJobError: a finished run appeared meanwhile (see ``check_output``).
    """
    lock = OutputLock(job.out_dir)
    error: Exception | None = None
    if ctx.is_main:
        try:
            lock.acquire()
            check_output(job)  # a run that finished since the first check
        except Exception as exc:
            lock.release()
            lock.remove_folder_if_empty()
            error = exc
    message = broadcast_object(ctx, None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise LpdsegError(f"rank 0 stopped before the tiles: {message}")
    return lock


# ---------------------------------------------------------------- 5. tissue
def find_tissue(reader: ImageReader, job: SlideJob) -> np.ndarray:
    """Tissue mask at the ``job.thumbnail_side_px`` thumbnail: the user's, or ``detect_tissue``."""
    thumb = reader.thumbnail(job.thumbnail_side_px)
    if job.tissue_mask is not None:
        from lpdseg.wsi.tissue import load_tissue_mask

        return load_tissue_mask(job.tissue_mask, reader.dimensions, thumb.shape[:2])
    return detect_tissue(thumb, remove_pen=job.pen_filter)


# ---------------------------------------------------------------- 6. infer
def _resized_to(
    predict_fn: Callable[[torch.Tensor], torch.Tensor], model_tile: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a tile predictor so tiles read at another size are resized to ``model_tile`` first.

    The scores come back at ``model_tile``; ``stitch_slide`` resizes them to
    the tile size it read.
    """

    def fn(tiles: torch.Tensor) -> torch.Tensor:
        if tiles.shape[-1] != model_tile or tiles.shape[-2] != model_tile:
            tiles = F.interpolate(
                tiles, size=(model_tile, model_tile), mode="bilinear", antialias=True
            )
        return predict_fn(tiles)

    return fn


def infer_tiles(
    reader: ImageReader,
    plan: LevelPlan,
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    num_labels: int,
    job: SlideJob,
    tissue: np.ndarray | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    storage: DiskArrays | None = None,
    cell_maps: bool = False,
    progress: bool = True,
) -> SlideCanvas:
    """This rank's share of the tissue tiles through the model, stitched into a canvas.

    Args:
        reader: the open slide.
        plan: from ``choose_level``.
        predict_fn: RGB tiles in [0, 1] ``B x 3 x t x t`` (``t = plan.tile_model_px``)
            -> label scores ``B x L x h x w``.
        num_labels: L (classes + background).
        job: overlap, batch size, tissue fraction, read workers.
        tissue: mask from ``find_tissue`` (None: every tile).
        rank: this process's index; it takes tiles ``i % world_size == rank``.
        world_size: processes sharing the slide.
        storage: keep the canvas on disk there (None: in memory).
        cell_maps: ``predict_fn`` takes ``size`` and gives maps on the canvas
            grid (``Predictor.slide_raw``); used when the tile is a multiple of
            the map's downsample.
        progress: show a progress bar.
    """
    ds = plan.map_downsample_level_px
    cell_maps = cell_maps and plan.tile_level_px % ds == 0
    if cell_maps:
        side = plan.tile_level_px // ds
        predict_fn = functools.partial(predict_fn, size=(side, side))
    if plan.tile_level_px != plan.tile_model_px:
        predict_fn = _resized_to(predict_fn, plan.tile_model_px)
    return stitch_slide(
        reader,
        plan.level,
        predict_fn,
        num_labels,
        tile=plan.tile_level_px,
        overlap=job.overlap,
        batch_size=job.batch_tiles,
        tissue_mask=tissue,
        tissue_min_fraction=job.tissue_min_fraction,
        output_downsample=plan.map_downsample_level_px,
        read_workers=job.read_workers,
        progress=progress,
        rank=rank,
        world_size=world_size,
        storage=storage,
        cell_maps=cell_maps,
    )


def slide_scoring(predictor: Any, job: SlideJob) -> str:
    """``seamless`` when the job asks for it and the predictor can (``slide_raw``), else ``per_tile``.

    ONNX files without raw outputs (exported before they existed) give per-tile label
    scores only, and stage-2 networks' softmax needs no slide-level decision: both
    stitch their label scores as they are.
    """
    if job.slide_scoring == "seamless" and getattr(predictor, "supports_seamless", False):
        return "seamless"
    return "per_tile"


def finish_canvas(
    canvas: SlideCanvas,
    predictor: Any,
    tissue: np.ndarray | None,
    level_per_model: float = 1.0,
    *,
    probabilities: bool = False,
    storage: DiskArrays | None = None,
) -> SlideMap:
    """A seamless canvas of raw maps -> the slide's map, decided on the stitched canvas.

    The gate field is the model's (``predictor.gate_window_px``, model pixels)
    in canvas pixels (``level_per_model``: level pixels per model pixel, the
    plan's ``tile_level_px / tile_model_px``); pixels outside ``tissue`` (resized
    to the canvas) and glass pixels (the glass channel) become background.
    Decided band by band (``finish_seamless``), so a canvas on disk
    (``storage``) is never loaded whole.
    """
    import cv2

    window = max(1, round(predictor.gate_window_px * level_per_model / canvas.output_downsample))
    background = None
    if tissue is not None:
        h, w = canvas.shape_hw
        resized = cv2.resize(tissue.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        background = resized == 0
    return finish_seamless(
        canvas, predictor, window, background, probabilities=probabilities, storage=storage
    )


#: bytes of canvas sums rank 0 adds per band when it merges the ranks' canvas files
MERGE_BAND_BYTES = 8 * 2**20


def merge_ranks(
    canvas: SlideCanvas, ctx: DistContext, storage: DiskArrays | None = None
) -> SlideCanvas | None:
    """Every rank's canvas summed on rank 0 (None on the other ranks; as is for one process).

    With ``storage`` (each rank's canvas in its own folder of the output folder,
    a disk every rank sees), rank 0 adds the other ranks' files to its own band by
    band, so memory stays that of one band whatever the slide's size or the number
    of ranks; the other ranks keep their files until rank 0 is done. Without it,
    the canvases are gathered in memory.

    Raises:
        ValueError: on rank 0, a rank's canvas file is missing (no shared disk) or
            does not match.
    """
    if not ctx.enabled:
        return canvas
    if storage is None:
        parts = all_gather_objects(ctx, canvas)
        return merge_partial(parts) if ctx.is_main else None
    storage.flush()  # this rank's sums on disk before rank 0 reads them
    ranks = all_gather_objects(ctx, (str(storage.folder), canvas.tiles, canvas.layout))
    error = None
    if ctx.is_main:
        try:
            for folder, tiles, other in ranks[1:]:
                if other != canvas.layout:
                    raise ValueError(
                        "canvases do not match: (shape, level, output_downsample) "
                        f"{canvas.layout} here, {other} in {folder}"
                    )
                _add_canvas_files(canvas, Path(folder), storage)
                canvas.tiles += tiles
        except Exception as exc:
            error = exc
    # every rank waits here: the others' files stay until rank 0 has added them
    failed = broadcast_object(ctx, None if error is None else str(error))
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 could not merge the ranks' canvases: {failed}")
    return canvas if ctx.is_main else None


def _add_canvas_files(canvas: SlideCanvas, folder: Path, storage: DiskArrays) -> None:
    """Add the canvas another rank's ``stitch_slide`` left in ``folder`` to ``canvas``."""
    score = open_array(folder, SCORE_SUM, canvas.score_sum.shape, np.int64)
    weight = open_array(folder, WEIGHT_SUM, canvas.weight_sum.shape, np.int64)
    labels, h, w = canvas.score_sum.shape
    rows = max(1, MERGE_BAND_BYTES // max(1, (labels + 1) * w * 8))
    for y0 in range(0, h, rows):
        band = slice(y0, min(h, y0 + rows))
        canvas.score_sum[:, band] += score[:, band]
        canvas.weight_sum[band] += weight[band]
        storage.release()  # resident memory stays one band's


# ---------------------------------------------------------------- 7. write
@dataclass
class SlideResult:
    """What ``write_outputs`` needs of a segmented slide.

    Attributes:
        plan: the level plan.
        slide_map: the finished map of every tile (``finish_per_tile`` / ``finish_canvas``).
        picture: RGB thumbnail the overlay is drawn on.
        class_names: the checkpoint's class names.
        colors: one ``(r, g, b)`` per class.
        mpp_level0: the slide's ``(x, y)`` micrometres per level-0 pixel, or None.
        dimensions_level0: ``(width, height)`` of level 0.
        tissue_fraction: fraction of the thumbnail found to be tissue.
        device: where the model ran.
    """

    plan: LevelPlan
    slide_map: SlideMap
    picture: np.ndarray
    class_names: list[str]
    colors: list[tuple[int, int, int]]
    mpp_level0: tuple[float, float] | None
    dimensions_level0: tuple[int, int]
    tissue_fraction: float
    device: str
    slide_scoring: str = "per_tile"


def write_outputs(job: SlideJob, result: SlideResult, started: float) -> dict[str, Any]:
    """Write GeoJSON, overlay, class map, areas and (last) the summary into ``job.out_dir``.

    Args:
        job: the job.
        result: the segmented slide.
        started: ``time.perf_counter()`` at the start of the run.

    Returns:
        The summary written to ``<stem>_summary.json`` (``files`` lists the outputs).
    """
    from lpdseg.exports.areas import area_table, pixel_area_um2, write_area_csv, write_area_json
    from lpdseg.io import atomic_write_json
    from lpdseg.viz import add_legend, overlay
    from lpdseg.viz import save_png as write_png
    from lpdseg.wsi.export import write_geojson

    plan, slide_map = result.plan, result.slide_map
    names, colors = result.class_names, result.colors
    class_map = slide_map.class_map()
    scale = slide_map.downsample_to_level0
    h, w = class_map.shape
    job.out_dir.mkdir(parents=True, exist_ok=True)
    files = job.output_files()
    regions = write_geojson(
        files["geojson"],
        class_map,
        names,
        colors,
        scale,
        min_area_px=job.min_region_area_map_px,
        object_type=job.geojson_object_type,
        simplify_tolerance_px=job.geojson_simplify_level0_px,
        mpp_level0=result.mpp_level0,
    )
    if job.ome_tiff:
        from lpdseg.wsi.ometiff import write_class_map_ome_tiff

        write_class_map_ome_tiff(
            files["ome_tiff"],
            class_map,
            names,
            colors[: len(names)],
            plan.map_mpp_um_per_px,
            probabilities=slide_map.probabilities if job.ome_probabilities else None,
        )
    pictured = overlay(result.picture, class_map, colors[: len(names)])
    write_png(files["overlay"], add_legend(pictured, names, colors[: len(names)]))
    write_png(files["class_map"], class_map)
    rows = area_table(class_map, names, pixel_area_um2(result.mpp_level0, scale))
    write_area_csv(files["areas_csv"], rows)
    write_area_json(files["areas_json"], rows)
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "slide": str(job.slide),
        "checkpoint": str(job.checkpoint),
        "class_names": names,
        "dimensions_level0": list(result.dimensions_level0),
        "mpp_level0": list(result.mpp_level0) if result.mpp_level0 else None,
        "requested": plan.requested,
        **plan.resolution_fields(),
        "backend": job.backend,
        "slide_scoring": result.slide_scoring,
        "level": plan.level,
        "level_downsample": plan.level_downsample,
        "level_mpp": plan.level_mpp_um_per_px,
        "tile_level_px": plan.tile_level_px,
        "tile_model_px": plan.tile_model_px,
        "overlap": job.overlap,
        "map_shape_hw": [h, w],
        "map_downsample": scale,
        "map_mpp": plan.map_mpp_um_per_px,
        "tissue_fraction_thumbnail": result.tissue_fraction,
        "tiles": slide_map.tiles,
        "regions": regions,
        "seconds": round(seconds, 2),
        "tiles_per_second": round(slide_map.tiles / seconds, 2) if seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": result.device,
        "files": {k: str(v) for k, v in files.items()},
    }
    atomic_write_json(files["summary"], summary)
    log.info(
        "%s: %d tiles (%s scoring) in %.1f s, %d regions, peak RSS %.0f MiB -> %s",
        job.slide,
        slide_map.tiles,
        result.slide_scoring,
        seconds,
        regions,
        summary["peak_rss_mb"],
        job.out_dir,
    )
    return summary


# ---------------------------------------------------------------- the run
def run_slide_job(
    job: SlideJob,
    *,
    progress: bool = True,
    predictor: Any | None = None,
    device: torch.device | None = None,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Segment a whole slide with a checkpoint and write GeoJSON, pictures and areas.

    Runs in one process, or under ``torchrun`` with the slide's tiles split
    over the ranks (rank 0 merges, writes and holds the output lock; the
    other ranks return ``{"rank": r, "tiles": n}``).

    Args:
        job: what to run.
        progress: show a progress bar (rank 0 only).
        predictor: the model, already loaded (``load_predictor``) on
            ``device``, e.g. once for many slides; None loads ``job.checkpoint``.
        device: where ``predictor`` runs (with ``predictor``).
        ctx: the processes sharing this slide's tiles; None: from the
            environment (``torchrun``), joined and left here. Pass
            ``DistContext()`` to run the slide in this process alone.

    Returns:
        The summary written to ``<stem>_summary.json`` (``files`` lists the outputs).

    Raises:
        SlideJobError: the output folder cannot be used (a file, not writable,
            a finished run there without ``job.overwrite``), no CUDA device,
            no working resolution (see ``choose_level``) or a ``tile`` an ONNX
            model cannot take.
        OutputLockedError: another run is writing into ``job.out_dir``.
        DataError: the slide is missing, not a slide/image, or corrupt.
        CheckpointError: the checkpoint cannot be loaded.
        OnnxError: the ONNX model cannot be loaded (or onnxruntime is missing).
    """
    started = time.perf_counter()
    check_output(job)  # before any work
    keep_freed_memory()  # batches reuse the model's freed activations (lpdseg.heap)
    own_ctx = ctx is None
    if ctx is None:
        ctx = init_distributed(_device(job.device, DistContext()))
    lock: OutputLock | None = None
    try:
        # Open the slide first: a wrong file fails before the model is loaded.
        with contextlib.ExitStack() as stack:
            reader = stack.enter_context(open_image(job.slide))
            if predictor is None:
                device = _device(job.device, ctx)
                predictor = load_predictor(job, device)
            elif device is None:
                device = _device(job.device, ctx)
            tile = model_tile(predictor, job)
            plan = choose_level(reader, job, tile, *model_mpp(predictor))
            lock = lock_output(job, ctx)
            tissue = find_tissue(reader, job)
            scoring = slide_scoring(predictor, job)
            seamless = scoring == "seamless"
            # The canvas lives on disk beside the outputs (each rank's in its own folder),
            # so memory stays flat whatever the slide's size and the number of ranks.
            if ctx.is_main:  # we hold the lock: a canvas folder here is a killed run's
                remove_stale(job.out_dir)
            barrier(ctx)  # no rank makes its canvas folder before the stale ones are gone
            storage = stack.enter_context(DiskArrays(job.out_dir))
            canvas = infer_tiles(
                reader,
                plan,
                predictor.slide_raw if seamless else predictor,
                predictor.slide_channels if seamless else predictor.num_labels,
                job,
                tissue,
                rank=ctx.rank,
                world_size=ctx.world_size,
                storage=storage,
                cell_maps=seamless,
                progress=progress and ctx.is_main,
            )
            merged = merge_ranks(canvas, ctx, storage)
            if merged is None:  # not rank 0: rank 0 merges, writes and reports
                return {"rank": ctx.rank, "tiles": canvas.tiles}
            probabilities = job.ome_tiff and job.ome_probabilities
            if seamless:
                slide_map = finish_canvas(
                    merged,
                    predictor,
                    tissue,
                    plan.tile_level_px / plan.tile_model_px,
                    probabilities=probabilities,
                    storage=storage,
                )
            else:
                slide_map = finish_per_tile(merged, probabilities=probabilities, storage=storage)
            del canvas, merged
            h, w = slide_map.shape_hw
            result = SlideResult(
                plan=plan,
                slide_map=slide_map,
                picture=reader.thumbnail(min(job.overlay_side_px, max(h, w))),
                class_names=predictor.class_names,
                colors=predictor.colors,
                mpp_level0=plan.mpp_level0,
                dimensions_level0=reader.dimensions,
                tissue_fraction=float(tissue.mean()),
                device=_predictor_device(predictor, device),
                slide_scoring=scoring,
            )
            return write_outputs(job, result, started)
    except BaseException:
        if lock is not None:  # nothing written yet: leave no empty folder behind
            lock.release()
            lock.remove_folder_if_empty()
        raise
    finally:
        if lock is not None:
            lock.release()
        if own_ctx:
            cleanup(ctx)
