"""Run a trained checkpoint on a whole-slide image and write what QuPath and people open.

``lpdseg slide CHECKPOINT SLIDE --out DIR``:

1. open the slide (``lpdseg.wsi.reader.open_image``: OpenSlide formats, or a
   plain image as a one-level slide);
2. choose the pyramid level for the requested resolution - micrometres per
   pixel when the slide records it, else a downsample of level 0; when no
   level matches exactly, tiles are read larger at the next finer level and
   resized to the model's tile size;
3. find tissue on a thumbnail (``detect_tissue``) so glass tiles are skipped;
4. stream batched, overlapping tiles through the model into a
   low-resolution canvas (``stitch_slide``: memory bounded by the canvas and
   one batch, whatever the slide size);
5. write into ``DIR`` (``<stem>`` = slide file stem):

   - ``<stem>.geojson``: QuPath annotations, one polygon per class region,
     holes kept, coordinates in level-0 pixels;
   - ``<stem>_overlay.png``: class colours over a downsampled slide, legend;
   - ``<stem>_classmap.png``: index PNG of the stitched map (classes
     ``0..C-1``, background ``C``), one pixel per ``summary.map_downsample``
     level-0 pixels;
   - ``<stem>_areas.csv`` / ``.json``: pixels, fraction of tissue and
     area in um^2 (when the slide has a resolution) per class;
   - ``<stem>_summary.json``: level, resolutions, tiles, seconds, peak RSS.

Every file is written atomically; a failure leaves earlier files in place.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lpdseg.errors import ConfigError

log = logging.getLogger(__name__)

#: Working resolution used when nothing is requested and the slide knows its mpp.
DEFAULT_MPP = 2.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def choose_level(
    reader: Any, mpp: float | None = None, downsample: float | None = None
) -> tuple[int, float, str]:
    """Pick the level to read for a requested working resolution.

    Args:
        reader: an open ``ImageReader``.
        mpp: micrometres per pixel wanted (used when the slide has an mpp).
        downsample: level-0 pixels per working pixel (used when ``mpp`` is
            None, or the slide has no mpp).

    Returns:
        ``(level, extra_scale, how)``: ``extra_scale`` (<= 1 except for
        requests finer than level 0) resizes the level to the working
        resolution; ``how`` says in words what was chosen.

    Raises:
        ConfigError: both or neither of ``mpp`` / ``downsample`` are usable.
    """
    if mpp is not None and downsample is not None:
        raise ConfigError(f"give either --mpp ({mpp}) or --downsample ({downsample}), not both")
    if mpp is not None and mpp <= 0:
        raise ConfigError(f"--mpp must be > 0 micrometres per pixel, got {mpp}")
    if downsample is not None and downsample <= 0:
        raise ConfigError(f"--downsample must be > 0 (level-0 pixels per pixel), got {downsample}")
    if downsample is None and reader.mpp is None:
        wanted = mpp if mpp is not None else DEFAULT_MPP
        log.warning(
            "%s has no pixel size (mpp) in its metadata, so %.3g um/px cannot be "
            "honoured; working at level 0 (pass --downsample N to work coarser)",
            reader.path,
            wanted,
        )
        downsample = 1.0
    if downsample is not None:
        level, extra = reader.best_level_for(downsample=downsample)
        how = f"downsample {downsample:g}"
    else:
        target = mpp if mpp is not None else DEFAULT_MPP
        level, extra = reader.best_level_for(target_mpp=target)
        how = f"{target:g} um/px"
    return level, extra, how


def _resizing_predictor(
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


def segment_slide(
    checkpoint: str | Path,
    slide: str | Path,
    out: str | Path,
    *,
    mpp: float | None = None,
    downsample: float | None = None,
    tile: int = 224,
    overlap: float = 0.25,
    batch_size: int = 8,
    output_downsample: int = 8,
    tta: bool = False,
    threshold: float | None = None,
    thumbnail_size: int = 2048,
    tissue_min_fraction: float = 0.05,
    overlay_max_side: int = 2048,
    min_region_px: float = 1.0,
    read_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment a whole slide with a checkpoint and write GeoJSON, pictures and areas.

    Args:
        checkpoint: a ``best.pt`` / ``last.pt`` written by ``lpdseg train``.
        slide: a slide OpenSlide reads (SVS, NDPI, MRXS, pyramidal TIFF, ...)
            or a plain image.
        out: output folder (created).
        mpp: working resolution in micrometres per pixel (default
            ``DEFAULT_MPP`` when the slide has an mpp).
        downsample: working resolution as level-0 pixels per pixel (instead
            of ``mpp``; used for slides without a resolution).
        tile: tile side in working pixels (the model's input size).
        overlap: fraction of a tile shared by neighbours, in [0, 1).
        batch_size: tiles per forward pass.
        output_downsample: working pixels per pixel of the stitched map
            (rounded to whole pixels of the level read).
        tta: test-time augmentation.
        threshold: class probability threshold (default: the checkpoint's).
        thumbnail_size: longest side of the thumbnail tissue is detected on.
        tissue_min_fraction: tiles with less tissue than this are skipped.
        overlay_max_side: longest side of the overlay PNG.
        min_region_px: regions smaller than this (map pixels) are left out
            of the GeoJSON.
        read_workers: threads reading tiles ahead of the model.
        progress: show a progress bar.

    Returns:
        The summary written to ``<stem>_summary.json`` (``files`` lists the outputs).

    Raises:
        DataError: the slide is missing, not a slide/image, or corrupt.
        CheckpointError: the checkpoint cannot be loaded.
        ConfigError: a bad resolution or tiling option.
    """
    from lpdseg.engine.predict import make_tile_predictor
    from lpdseg.engine.train import load_model, resolve_device
    from lpdseg.io import atomic_write_json
    from lpdseg.wsi.export import (
        add_legend,
        area_table,
        overlay,
        pixel_area_um2,
        write_area_csv,
        write_area_json,
        write_geojson,
        write_png,
    )
    from lpdseg.wsi.reader import open_image
    from lpdseg.wsi.tiling import stitch_slide
    from lpdseg.wsi.tissue import detect_tissue

    if tile < 16:
        raise ConfigError(f"--tile must be at least 16 pixels, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"--overlap is a fraction of the tile in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if output_downsample < 1:
        raise ConfigError(f"--output-downsample must be >= 1, got {output_downsample}")

    start = time.perf_counter()
    slide = Path(slide)
    out = Path(out)
    from lpdseg.engine.distributed import cleanup, init_distributed, training_device

    # one process, unless started by torchrun: then each rank takes a share of the tiles
    ctx = init_distributed(resolve_device("auto"))
    try:
        # Open the slide first: a wrong file fails before the model is loaded.
        with open_image(slide) as reader:
            device = resolve_device(training_device("auto", ctx))
            model, cfg = load_model(checkpoint, device)
            names = list(cfg.data.class_names)
            colors = [tuple(int(v) for v in c[:3]) for c in cfg.data.colors]
            num_labels = len(names) + 1

            level, extra, how = choose_level(reader, mpp, downsample)
            # Tiles are read at the level so that, resized by `extra`, they are `tile` px.
            level_tile = max(tile, round(tile / extra)) if extra < 1.0 else tile
            level_ds_out = (
                max(1, round(output_downsample / extra)) if extra < 1.0 else output_downsample
            )
            lds = reader.level_downsamples[level]
            level_mpp = reader.level_mpp(level)
            log.info(
                "%s: %s -> level %d (downsample %.3g%s), tiles of %d level px",
                slide,
                how,
                level,
                lds,
                f", {level_mpp:.3g} um/px" if level_mpp else "",
                level_tile,
            )

            thumb = reader.thumbnail(thumbnail_size)
            tissue = detect_tissue(thumb)
            predict_fn = make_tile_predictor(
                model, cfg, tta=tta, threshold=threshold, device=device
            )
            if level_tile != tile:
                predict_fn = _resizing_predictor(predict_fn, tile)
            canvas = stitch_slide(
                reader,
                level,
                predict_fn,
                num_labels,
                tile=level_tile,
                overlap=overlap,
                batch_size=batch_size,
                tissue_mask=tissue,
                tissue_min_fraction=tissue_min_fraction,
                output_downsample=level_ds_out,
                read_workers=read_workers,
                progress=progress and ctx.is_main,
                rank=ctx.rank,
                world_size=ctx.world_size,
            )
            if ctx.enabled:  # under torchrun: every rank did a share of the tiles; rank 0 merges
                from lpdseg.engine.distributed import all_gather_objects
                from lpdseg.wsi.tiling import merge_partial

                parts = all_gather_objects(ctx, canvas)
                if not ctx.is_main:
                    return {"rank": ctx.rank, "tiles": canvas.tiles}
                canvas = merge_partial(parts)
            class_map = canvas.class_map()
            scale = canvas.downsample_to_level0
            h, w = class_map.shape
            image = reader.thumbnail(min(overlay_max_side, max(h, w)))
            slide_mpp = reader.mpp
            level0_wh = reader.dimensions

        stem = slide.stem
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "geojson": out / f"{stem}.geojson",
            "overlay": out / f"{stem}_overlay.png",
            "class_map": out / f"{stem}_classmap.png",
            "areas_csv": out / f"{stem}_areas.csv",
            "areas_json": out / f"{stem}_areas.json",
            "summary": out / f"{stem}_summary.json",
        }
        regions = write_geojson(
            files["geojson"], class_map, names, colors, scale, min_area_px=min_region_px
        )
        pictured = overlay(image, class_map, colors[: len(names)])
        write_png(files["overlay"], add_legend(pictured, names, colors[: len(names)]))
        write_png(files["class_map"], class_map)
        rows = area_table(class_map, names, pixel_area_um2(slide_mpp, scale))
        write_area_csv(files["areas_csv"], rows)
        write_area_json(files["areas_json"], rows)
        seconds = time.perf_counter() - start
        summary: dict[str, Any] = {
            "slide": str(slide),
            "checkpoint": str(checkpoint),
            "class_names": names,
            "dimensions_level0": list(level0_wh),
            "mpp_level0": list(slide_mpp) if slide_mpp else None,
            "requested": how,
            "level": level,
            "level_downsample": lds,
            "level_mpp": level_mpp,
            "tile_level_px": level_tile,
            "tile_model_px": tile,
            "overlap": overlap,
            "map_shape_hw": [h, w],
            "map_downsample": scale,
            "map_mpp": (level_mpp * level_ds_out) if level_mpp else None,
            "tissue_fraction_thumbnail": float(tissue.mean()),
            "tiles": canvas.tiles,
            "regions": regions,
            "seconds": round(seconds, 2),
            "tiles_per_second": round(canvas.tiles / seconds, 2) if seconds > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "device": str(device),
            "files": {k: str(v) for k, v in files.items()},
        }
        atomic_write_json(files["summary"], summary)
        log.info(
            "%s: %d tiles in %.1f s, %d regions, peak RSS %.0f MiB -> %s",
            slide,
            canvas.tiles,
            seconds,
            regions,
            summary["peak_rss_mb"],
            out,
        )
        return summary
    finally:
        cleanup(ctx)
