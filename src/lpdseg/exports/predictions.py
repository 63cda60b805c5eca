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
    overwrite: bool = False,
) -> list[Path]:
    """Segment images with a checkpoint and write masks, overlays and area tables.

    Output names: ``<name>_mask.png``, ``<name>_overlay.png``, ``<name>_areas.csv``
    and ``<name>_areas.json``, where ``<name>`` is the input's stem. When two
    inputs share a stem (``a.png`` and ``a.jpg``, or ``a.png`` in two folders)
    the suffix joins it, ``a_png`` / ``a_jpg``, then ``_2``, ``_3`` in input
    order: no input's outputs replace another's. An input given twice is
    predicted once.

    Outputs of an earlier run in ``out`` are never replaced silently: a name
    that already has files there is refused unless ``overwrite``, except when
    continuing an unfinished run of the same checkpoint and settings into
    ``out`` (``out/predict_run.json`` records each run).

    Args:
        checkpoint: a ``best.pt``/``last.pt`` written by ``lpdseg train``.
        inputs: files, folders or glob patterns.
        out: output folder (created).
        tta: test-time augmentation.
        threshold: class probability threshold (default: the checkpoint's).
        batch_size: tiles per forward for large images.
        skip_bad: log and skip unreadable images instead of stopping.
        overwrite: replace outputs of an earlier run that have the same names.

    Returns:
        The images that were processed.

    Raises:
        DataError: an unreadable image (without ``skip_bad``; outputs written for
            earlier images are kept), or outputs of an earlier run in ``out``
            would be replaced (without ``overwrite``; named).
    """
    import json

    from lpdseg.inference.pseudo import unique_stems
    from lpdseg.io import atomic_write_json

    predictor = Predictor.from_checkpoint(
        checkpoint, tta=tta, threshold=threshold, batch_size=batch_size
    )
    cfg = predictor.cfg
    paths, seen = [], set()
    for path in expand_inputs(inputs):  # the same file given twice is predicted once
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(path)
    names = unique_stems(paths)
    renamed = [f"{p.name} -> {n}_*" for p, n in zip(paths, names) if n != p.stem]
    if renamed:
        log.warning(
            "inputs share a file stem; outputs named by stem + suffix: %s", ", ".join(renamed)
        )
    out = Path(out)
    # the files write_outputs writes per name (also the names checked for an earlier run)
    suffixes = ("_mask.png", "_overlay.png", "_areas.csv", "_areas.json")
    record_path = out / "predict_run.json"
    ckpt = Path(checkpoint).resolve()
    stat = ckpt.stat()
    settings = {
        "checkpoint": str(ckpt),
        "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "tta": tta,
        "threshold": threshold,
    }
    planned = {name: str(path.resolve()) for name, path in zip(names, paths)}
    existing = [
        out / f"{name}{suffix}"
        for name in names
        for suffix in suffixes
        if (out / f"{name}{suffix}").exists()
    ]
    if existing and not overwrite:
        try:
            earlier = json.loads(record_path.read_text()) if record_path.is_file() else {}
        except (OSError, ValueError):
            earlier = {}
        earlier_names = earlier.get("names") or {}
        clashing = [n for n in names if any((out / f"{n}{sfx}").exists() for sfx in suffixes)]
        # an unfinished run of the same checkpoint and settings on the same inputs: go on
        continuing = (
            earlier.get("status") == "running"
            and earlier.get("settings") == settings
            and all(earlier_names.get(n) == planned[n] for n in clashing)
        )
        if not continuing:
            shown = ", ".join(f"{n}_mask.png" for n in clashing[:4])
            more = f" (+{len(clashing) - 4} more images)" if len(clashing) > 4 else ""
            raise DataError(
                f"{out} already holds predictions of an earlier run that this one would "
                f"replace ({len(existing)} files: {shown}{more} and their overlays and "
                "areas); write to another --out, or pass --overwrite to replace them"
            )
        log.info("continuing the unfinished predict run in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"status": "running", "settings": settings, "names": planned}
    atomic_write_json(record_path, record)
    done, bad = [], []
    for path, name in tqdm(
        list(zip(paths, names)), desc="predict", disable=not progress, unit="img"
    ):
        try:
            image = read_image(path)
        except DataError as exc:
            if not skip_bad:
                raise
            bad.append((path, str(exc)))
            log.warning("skipped %s: %s", path, exc)
            continue
        mask = predictor.mask(image)
        write_outputs(out, name, image, mask, cfg)
        done.append(path)
    if bad:
        log.warning("%d images skipped: %s", len(bad), ", ".join(str(p) for p, _ in bad))
    record.update(status="complete", skipped=[str(p) for p, _ in bad])
    atomic_write_json(record_path, record)
    return done
