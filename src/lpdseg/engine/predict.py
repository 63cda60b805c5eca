"""Run a trained checkpoint on images of any size and write what a user opens.

Per image: ``<stem>_mask.png`` (index PNG: classes 0..C-1, background C),
``<stem>_overlay.png`` (colour overlay with a legend) and ``<stem>_areas.csv`` /
``.json`` (pixels and fraction of tissue per class). Images up to
``eval.max_side`` go through the model whole; larger ones by overlapping
sliding windows with smooth blending. Every file is written atomically, and a
bad image never removes what was written for the others.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lpdseg.config import Config
from lpdseg.data.datasets import read_image
from lpdseg.engine.evaluate import predict_scores
from lpdseg.errors import DataError
from lpdseg.models.lpd import WSSSModel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their images, sorted) and globs -> image paths.

    Raises:
        DataError: an input matches nothing, or nothing at all is found.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item)))
            if not matches:
                raise DataError(f"{item} is not a file, folder or matching glob")
            paths.extend(m for m in matches if m.is_file())
    return paths


def make_tile_predictor(
    model: WSSSModel, cfg: Config, *, tta: bool, threshold: float | None, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function: RGB tiles in [0, 1] (B x 3 x h x w) -> label scores (B x (C+1) x h x w)."""
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)
    ecfg = cfg.eval
    if threshold is not None:
        ecfg = type(ecfg)(**{**ecfg.__dict__, "cls_threshold": threshold})

    @torch.no_grad()
    def predict_fn(tiles: torch.Tensor) -> torch.Tensor:
        rgb = tiles.to(device).float()
        return predict_scores(
            model, (rgb - mean) / std, ecfg, mode="predict", tta=tta, rgb=rgb
        ).cpu()

    return predict_fn


def predict_array(
    image: np.ndarray,
    predict_fn: Callable,
    cfg: Config,
    num_labels: int,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """One RGB uint8 image -> label mask (H x W uint8), whole or by sliding window."""
    h, w = image.shape[:2]
    if max(h, w) <= cfg.eval.max_side:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        return predict_fn(t)[0].argmax(0).numpy().astype(np.uint8)
    from lpdseg.wsi.tiling import sliding_window_predict

    scores = sliding_window_predict(
        image,
        predict_fn,
        num_labels,
        tile=cfg.eval.tile,
        overlap=cfg.eval.overlap,
        batch_size=batch_size,
        progress=progress,
    )
    return scores.argmax(0).numpy().astype(np.uint8)


def area_rows(mask: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Pixels and fraction of tissue per class (background excluded from the tissue total)."""
    c = len(class_names)
    counts = np.bincount(mask.ravel(), minlength=c + 1)[: c + 1]
    tissue = int(counts[:c].sum())
    rows = [
        {
            "class": name,
            "pixels": int(counts[i]),
            "fraction_of_tissue": (float(counts[i]) / tissue) if tissue else 0.0,
        }
        for i, name in enumerate(class_names)
    ]
    rows.append({"class": "background", "pixels": int(counts[c]), "fraction_of_tissue": None})
    return rows


def write_outputs(
    out: Path, stem: str, image: np.ndarray, mask: np.ndarray, cfg: Config
) -> list[Path]:
    """Index mask, overlay with legend, area CSV + JSON for one image."""
    from lpdseg.io import atomic_write_json, atomic_write_text
    from lpdseg.viz import blend, legend_strip, save_png

    names = list(cfg.data.class_names)
    colors = [tuple(c) for c in cfg.data.colors]
    paths = [
        out / f"{stem}_mask.png",
        out / f"{stem}_overlay.png",
        out / f"{stem}_areas.csv",
        out / f"{stem}_areas.json",
    ]
    save_png(paths[0], mask)
    overlay = blend(image, mask, colors)
    legend = legend_strip(names + ["background"], colors, overlay.shape[1])
    save_png(paths[1], np.concatenate([overlay, legend], axis=0))
    rows = area_rows(mask, names)
    lines = ["class,pixels,fraction_of_tissue"]
    for r in rows:
        frac = r["fraction_of_tissue"]
        lines.append(f"{r['class']},{r['pixels']},{'' if frac is None else f'{frac:.6f}'}")
    csv = "\n".join(lines) + "\n"
    atomic_write_text(paths[2], csv)
    atomic_write_json(paths[3], rows)
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
    from lpdseg.engine.train import load_model, resolve_device

    device = resolve_device("auto")
    model, cfg = load_model(checkpoint, device)
    paths = expand_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predict_fn = make_tile_predictor(model, cfg, tta=tta, threshold=threshold, device=device)
    num_labels = len(cfg.data.class_names) + 1
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
        mask = predict_array(image, predict_fn, cfg, num_labels, batch_size=batch_size)
        write_outputs(out, path.stem, image, mask, cfg)
        done.append(path)
    if bad:
        log.warning("%d images skipped: %s", len(bad), ", ".join(str(p) for p, _ in bad))
    return done
