"""Calibrating the classifier gate: per-class thresholds chosen on the validation split.

A fixed 0.5 for every class and head is not what maximises the masks' quality:
heads differ in how confident their classifier is, and a rare class may need a
lower bar than a common one. After training, the validation images go through
the model once; their fused maps and class probabilities are kept, and each
class's threshold is chosen by coordinate ascent on the validation mIoU of the
classifier-gated masks (candidates: a 0.05 grid; a move needs a gain of at
least 0.2 points). Ties keep the threshold nearest 0.5. Opt-in
(``eval.calibrate_gate``): on a small validation split it can fit noise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from lpdseg.config import EvalConfig
from lpdseg.data.glass import glass_mask
from lpdseg.metrics import confusion_matrix, scores_from_confusion
from lpdseg.models.decode import force_background, fuse_maps, infer_maps, label_scores

log = logging.getLogger(__name__)

GRID = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))


@torch.no_grad()
def collect_outputs(
    model: torch.nn.Module, loader: Iterable[dict], cfg: EvalConfig, device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor]]:
    """Per validation image: fused maps (C x H x W), probabilities (C), glass mask, truth."""
    was_training = model.training
    model.eval()
    out = []
    for batch in loader:
        images, masks = batch["image"], batch["mask"]
        if isinstance(images, Tensor):
            images, masks = list(images), list(masks)
        for img, msk in zip(images, masks):
            x = img[None].to(device)
            maps = infer_maps(model, x, cfg, tta=False)
            fused = fuse_maps(maps.stage_maps, cfg.fuse_weights)[0].cpu()
            glass = None
            if cfg.glass_background:
                glass = glass_mask(x.float(), cfg.glass_brightness, cfg.glass_spread)[0].cpu()
            out.append((fused, maps.probs[0].cpu(), glass, msk))
    model.train(was_training)
    return out


def _miou(
    outputs: Sequence[tuple[Tensor, Tensor, Tensor | None, Tensor]],
    thresholds: Tensor,
    cfg: EvalConfig,
    class_names: Sequence[str],
) -> float:
    """Validation mIoU (tissue classes, one confusion matrix) of classifier-gated masks."""
    c = len(class_names)
    cm = torch.zeros(c + 1, c + 1, dtype=torch.int64)
    for fused, probs, glass, truth in outputs:
        scores = label_scores(fused[None], (probs > thresholds)[None], cfg.bg_gamma)
        if glass is not None:
            scores = force_background(scores, glass[None])
        cm += confusion_matrix(scores.argmax(1)[0], truth, c + 1)
    value = scores_from_confusion(cm, c)["mIoU"]
    return float(value) if np.isfinite(value) else -1.0


def choose_thresholds(
    outputs: Sequence[tuple[Tensor, Tensor, Tensor | None, Tensor]],
    cfg: EvalConfig,
    class_names: Sequence[str],
    rounds: int = 2,
    min_gain: float = 0.002,
) -> tuple[list[float], float, float]:
    """Per-class thresholds maximising validation mIoU (coordinate ascent on a grid).

    A threshold moves only for a gain above ``min_gain`` (0.2 mIoU points).

    Returns:
        ``(thresholds, mIoU with cfg.cls_threshold for all, mIoU with the thresholds)``.
    """
    c = len(class_names)
    current = torch.full((c,), float(cfg.cls_threshold))
    base = best = _miou(outputs, current, cfg, class_names)
    for _ in range(rounds):
        changed = False
        for k in range(c):
            # a coarse grid only: midpoints between observed probabilities fit a small
            # validation split too closely (measured on the demo, docs/results.md)
            candidates = sorted(set(GRID) | {float(current[k])})
            for t in sorted(candidates, key=lambda v: abs(v - 0.5)):
                trial = current.clone()
                trial[k] = t
                score = _miou(outputs, trial, cfg, class_names)
                if score > best + min_gain:
                    best, current, changed = score, trial, True
        if not changed:
            break
    return [round(float(v), 6) for v in current], base, best
