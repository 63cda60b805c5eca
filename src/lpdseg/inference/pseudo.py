"""``lpdseg pseudo``: stage-1 checkpoint -> pseudo masks of the training set.

The masks are made with the ``labels`` gate (each patch's image-level
labels, with TTA), exactly how the papers make stage-2 training targets, and
written as index PNGs with a ``manifest.csv`` (image, mask, label) that
``lpdseg train ... train.task=seg data.pseudo=<folder>`` reads. ``pseudo.json``
records the checkpoint, the data root and the class names, so stage 2 can
refuse masks made from another dataset.

Masks are named ``<stem>.png``; when two training images share a stem the
suffix joins it (``a_png.png``, ``a_jpg.png``), then ``_2``, ``_3``. A folder
that already holds pseudo masks is refused unless ``overwrite`` (the earlier
``masks/``, ``manifest.csv`` and ``pseudo.json`` are deleted first). Data of
other classes than the checkpoint's is refused.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lpdseg.data.datasets import API_HINTS, FixHints, read_image
from lpdseg.data.loaders import resolve_data
from lpdseg.data.transforms import IGNORE_INDEX
from lpdseg.errors import DataError
from lpdseg.inference.evaluation import check_data_classes
from lpdseg.inference.loading import load_model, resolve_device
from lpdseg.io import atomic_write_json, atomic_write_text
from lpdseg.models.decode import predict_scores
from lpdseg.viz import save_png

log = logging.getLogger(__name__)


@torch.no_grad()
def write_pseudo_masks(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data_root: str | None = None,
    tta: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    overwrite: bool = False,
    skip_bad: bool | None = None,
    hints: FixHints = API_HINTS,
    ignore_margin: float = 0.0,
) -> dict[str, Any]:
    """Write pseudo masks for every training patch of the checkpoint's dataset.

    Args:
        checkpoint: stage-1 checkpoint (LPD, PBIP or CAM).
        out: output folder (``masks/``, ``manifest.csv``, ``pseudo.json``).
        data_root: dataset folder (default: the one the checkpoint was trained on).
        tta: test-time augmentation.
        batch_size: patches per forward (same-size patches are batched).
        overwrite: replace pseudo masks already in ``out`` (deleted first);
            without it such a folder is refused.
        ignore_margin: pixels whose top label score leads the next by less than
            this are 255 (ignored by stage 2); 0 keeps every pixel.

    Returns:
        Summary (count, class pixel fractions, ignored fraction, settings, data root).

    Raises:
        DataError: ``out`` holds pseudo masks (without ``overwrite``), or the
            data has other classes than the checkpoint (both named).
    """
    from lpdseg.config import config_from_dict

    if not 0.0 <= ignore_margin < 1.0:
        raise DataError(
            f"ignore_margin={ignore_margin} must be in [0, 1) (label scores are in [0, 1])"
        )
    device = resolve_device("auto")
    model, cfg = load_model(checkpoint, device)
    if data_root is not None:
        d = cfg.to_dict()
        d["data"]["root"] = str(data_root)
        cfg = config_from_dict(d)
    if cfg.data.root:  # before reading the data: its file names may not parse as this format
        check_data_classes(checkpoint, cfg, cfg.data.root)
    # training patches only (val/test are not read), bad ones skipped with skip_bad
    bundle = resolve_data(cfg, eval_splits=(), skip_bad=skip_bad, hints=hints)
    skip_bad = cfg.data.skip_bad if skip_bad is None else skip_bad
    out = Path(out)
    _prepare_output(out, overwrite)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names = dict(
        zip((s.image for s in bundle.train), unique_stems([s.image for s in bundle.train]))
    )
    c = len(bundle.class_names)
    counts = np.zeros(c + 1, np.int64)
    ignored = 0
    rows = [["image", "mask", "label"]]
    samples = bundle.train
    skipped: list[str] = []
    for start in tqdm(
        range(0, len(samples), batch_size), desc="pseudo", disable=not progress, unit="batch"
    ):
        group, images = [], []
        for s in samples[start : start + batch_size]:
            try:  # headers were checked at start; a file can still fail to decode
                images.append(read_image(s.image))
            except DataError as exc:
                if not skip_bad:
                    raise hints.with_skip_advice(exc) from None
                log.warning("skipped %s: %s", s.image, exc)
                skipped.append(str(s.image))
                continue
            group.append(s)
        if not group:
            continue
        same = len({im.shape for im in images}) == 1
        chunks = [images] if same else [[im] for im in images]
        labels_all = torch.tensor(np.stack([s.label for s in group]), dtype=torch.float32)
        preds = []
        offset = 0
        for chunk in chunks:
            x = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).float().to(device) / 255
            lab = labels_all[offset : offset + len(chunk)].to(device)
            offset += len(chunk)
            scores = predict_scores(model, x, cfg.eval, lab, gate="labels", tta=tta)
            preds.extend(pseudo_labels(scores, ignore_margin).cpu().numpy())
        for s, pred in zip(group, preds):
            name = f"{names[s.image]}.png"
            save_png(out / "masks" / name, pred)
            counts += np.bincount(pred.ravel(), minlength=c + 1)[: c + 1]
            ignored += int((pred == IGNORE_INDEX).sum())
            label = " ".join(str(int(v)) for v in s.label)
            rows.append([str(s.image.resolve()), f"masks/{name}", label])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    summary = {
        "checkpoint": str(checkpoint),
        "images": len(samples) - len(skipped),
        "skipped": skipped + [str(b.path) for b in bundle.bad],
        "tta": tta,
        "class_names": list(bundle.class_names),
        "data_root": str(Path(bundle.root).resolve()),
        "data_format": cfg.data.format,
        "pixel_fraction": (counts / max(1, counts.sum())).round(4).tolist(),
        "ignore_margin": ignore_margin,
        "ignored_fraction": round(ignored / max(1, counts.sum() + ignored), 4),
    }
    atomic_write_json(out / "pseudo.json", summary)
    return summary


def pseudo_labels(scores: torch.Tensor, ignore_margin: float = 0.0) -> torch.Tensor:
    """Label scores (B x (C + 1) x H x W) -> uint8 pseudo masks (B x H x W).

    The argmax, with 255 where the best score leads the second by less than
    ``ignore_margin`` (0: no pixel is ignored).
    """
    mask = scores.argmax(1).to(torch.uint8)
    if ignore_margin > 0:
        top2 = scores.topk(2, dim=1).values
        mask[(top2[:, 0] - top2[:, 1]) < ignore_margin] = IGNORE_INDEX
    return mask


def unique_stems(paths: list[Path]) -> list[str]:
    """Output stems, one per path: the file stem, ``<stem>_<suffix>`` when stems collide
    (case-insensitively: ``a.png`` / ``a.jpg`` -> ``a_png`` / ``a_jpg``), then ``_2``, ``_3``."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem.casefold()] = counts.get(p.stem.casefold(), 0) + 1
    taken: set[str] = set()
    out = []
    for p in paths:
        base = p.stem if counts[p.stem.casefold()] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}"
        name, k = base, 2
        while name.casefold() in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name.casefold())
        out.append(name)
    return out


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding pseudo masks unless ``overwrite`` (then delete them)."""
    masks = out / "masks"
    found = [out / n for n in ("manifest.csv", "pseudo.json") if (out / n).is_file()]
    pngs = sorted(masks.glob("*.png")) if masks.is_dir() else []
    if not found and not pngs:
        return
    what = ", ".join([p.name for p in found] + ([f"{len(pngs)} masks in masks/"] if pngs else []))
    if not overwrite:
        raise DataError(
            f"{out} already holds pseudo masks ({what}); write to another --out, or pass "
            "--overwrite to replace them (the earlier masks are deleted first)"
        )
    for path in [*found, *pngs]:
        path.unlink()
    log.warning("--overwrite: removed the earlier pseudo masks in %s (%s)", out, what)
