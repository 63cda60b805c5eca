"""``lpdseg pseudo``: stage-1 checkpoint -> pseudo masks of the training set.

The masks are made with the ``labels`` gate (each patch's image-level
labels, with TTA), exactly how the papers make stage-2 training targets, and
written as index PNGs with a ``manifest.csv`` (image, mask, label) that
``lpdseg train ... train.task=seg data.pseudo=<folder>`` reads.
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

from lpdseg.data.datasets import read_image
from lpdseg.data.loaders import resolve_data
from lpdseg.inference.loading import load_model, resolve_device
from lpdseg.io import atomic_write_json, atomic_write_text
from lpdseg.models.decode import predict_masks
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
) -> dict[str, Any]:
    """Write pseudo masks for every training patch of the checkpoint's dataset.

    Args:
        checkpoint: stage-1 checkpoint (LPD, PBIP or CAM).
        out: output folder (``masks/``, ``manifest.csv``, ``pseudo.json``).
        data_root: dataset folder (default: the one the checkpoint was trained on).
        tta: test-time augmentation.
        batch_size: patches per forward (same-size patches are batched).

    Returns:
        Summary (count, class pixel fractions, settings).
    """
    from lpdseg.config import config_from_dict

    device = resolve_device("auto")
    model, cfg = load_model(checkpoint, device)
    if data_root is not None:
        d = cfg.to_dict()
        d["data"]["root"] = str(data_root)
        cfg = config_from_dict(d)
    bundle = resolve_data(cfg)
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    c = len(bundle.class_names)
    counts = np.zeros(c + 1, np.int64)
    rows = [["image", "mask", "label"]]
    samples = bundle.train
    for start in tqdm(
        range(0, len(samples), batch_size), desc="pseudo", disable=not progress, unit="batch"
    ):
        group = samples[start : start + batch_size]
        images = [read_image(s.image) for s in group]
        same = len({im.shape for im in images}) == 1
        chunks = [images] if same else [[im] for im in images]
        labels_all = torch.tensor(np.stack([s.label for s in group]), dtype=torch.float32)
        preds = []
        offset = 0
        for chunk in chunks:
            x = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).float().to(device) / 255
            lab = labels_all[offset : offset + len(chunk)].to(device)
            offset += len(chunk)
            pred, _ = predict_masks(model, x, cfg.eval, lab, gate="labels", tta=tta)
            preds.extend(pred.cpu().numpy().astype(np.uint8))
        for s, pred in zip(group, preds):
            name = f"{s.image.stem}.png"
            save_png(out / "masks" / name, pred)
            counts += np.bincount(pred.ravel(), minlength=c + 1)[: c + 1]
            label = " ".join(str(int(v)) for v in s.label)
            rows.append([str(s.image.resolve()), f"masks/{name}", label])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    summary = {
        "checkpoint": str(checkpoint),
        "images": len(samples),
        "tta": tta,
        "class_names": list(bundle.class_names),
        "pixel_fraction": (counts / max(1, counts.sum())).round(4).tolist(),
    }
    atomic_write_json(out / "pseudo.json", summary)
    return summary
