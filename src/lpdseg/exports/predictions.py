"""``lpdseg predict``: a checkpoint on images of any size -> the files a user opens.

Per image: ``<stem>_mask.png`` (index PNG: classes 0..C-1, background C),
``<stem>_overlay.png`` (colour overlay with a legend) and ``<stem>_areas.csv`` /
``.json`` (pixels and fraction of tissue per class). Images up to
``eval.max_side`` go through the model whole; larger ones by overlapping
sliding windows with smooth blending. Every file is written atomically, and a
bad image never removes what was written for the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lpdseg.config import Config
from lpdseg.data.datasets import read_image
from lpdseg.errors import DataError
from lpdseg.imageio import expand_inputs
from lpdseg.inference import Predictor

log = logging.getLogger(__name__)


def write_outputs(
    out: Path, stem: str, image: np.ndarray, mask: np.ndarray, cfg: Config
) -> list[Path]:
    """Index mask, overlay with legend, area CSV + JSON for one image.

    The areas table (``lpdseg.exports.areas``) has a background row; ``area_um2``
    is empty (plain images carry no pixel size here).
    """
    from lpdseg.exports.areas import area_table, write_area_csv, write_area_json
    from lpdseg.viz import add_legend, overlay, save_png

    names = list(cfg.data.class_names)
    colors = [tuple(c) for c in cfg.data.colors]  # C classes + background
    paths = [
        out / f"{stem}_mask.png",
        out / f"{stem}_overlay.png",
        out / f"{stem}_areas.csv",
        out / f"{stem}_areas.json",
    ]
    save_png(paths[0], mask)
    pictured = overlay(image, mask, colors[: len(names)])  # background left as it is
    save_png(paths[1], add_legend(pictured, [*names, "background"], colors))
    rows = area_table(mask, names, tissue_only=False)
    write_area_csv(paths[2], rows)
    write_area_json(paths[3], rows)
    return paths


def predict_images(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    tta: bool = False,
    threshold: float | None = None,
    batch_size: int = 8,
    skip_bad: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Segment images with a checkpoint and write masks, overlays and area tables.

    Args:
        checkpoint: a ``best.pt``/``last.pt`` written by ``lpdseg train``.
        inputs: files, folders or glob patterns.
        out: output folder (created).
        tta: test-time augmentation.
        threshold: class probability threshold (default: the checkpoint's).
        batch_size: tiles per forward for large images.
        skip_bad: log and skip unreadable images instead of stopping.

    Returns:
        The images that were processed.

    Raises:
        DataError: an unreadable image (without ``skip_bad``); outputs written for
            earlier images are kept.
    """
    predictor = Predictor.from_checkpoint(
        checkpoint, tta=tta, threshold=threshold, batch_size=batch_size
    )
    cfg = predictor.cfg
    paths = expand_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done, bad = [], []
    for path in tqdm(paths, desc="predict", disable=not progress, unit="img"):
        try:
            image = read_image(path)
        except DataError as exc:
            if not skip_bad:
                raise
            bad.append((path, str(exc)))
            log.warning("skipped %s: %s", path, exc)
            continue
        mask = predictor.mask(image)
        write_outputs(out, path.stem, image, mask, cfg)
        done.append(path)
    if bad:
        log.warning("%d images skipped: %s", len(bad), ", ".join(str(p) for p, _ in bad))
    return done
