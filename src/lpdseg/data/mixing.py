"""CutMix for weakly labelled batches: a box of another patch pasted in, labels = union.

Why: a rare class (normal lung tissue is in 4 of the 31 WSSS4LUAD images) shows up
next to every other class in new combinations, and the classifier must find a
class in part of a patch rather than from the patch's overall look. The label
of a mixed patch is the union of both labels (the box holds a quarter to half
of the area, so a class it brings covers more than the 2 % label rule in most
patches). Stage-2 masks are pasted with the same box, so they stay exact.

Boxes come from a generator seeded by the run seed and the step
(:func:`cutmix_generator`), so a resumed run mixes the same way as one that
was never stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: pasted box area as a fraction of the patch
AREA_RANGE = (0.25, 0.5)
#: box aspect ratio range (height / width)
ASPECT_RANGE = (0.75, 4.0 / 3.0)


@dataclass(frozen=True)
class CutBox:
    """Patch ``target`` receives rows ``y0:y1``, columns ``x0:x1`` of patch ``source``."""

    target: int
    source: int
    y0: int
    y1: int
    x0: int
    x1: int


def cutmix_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for the boxes of one training step (same seed, step, rank: same boxes)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return g


def cutmix_boxes(
    n: int, height: int, width: int, prob: float, generator: torch.Generator
) -> list[CutBox]:
    """Boxes for a batch of ``n`` patches: each patch is mixed with probability ``prob``.

    The source of patch ``i`` is patch ``(i + 1) % n`` (a batch of one is never mixed).
    """
    if n < 2 or prob <= 0:
        return []
    draws = torch.rand(n, 4, generator=generator).tolist()
    boxes = []
    for i, (u, a, r, _) in enumerate(draws):
        if u >= prob:
            continue
        area = AREA_RANGE[0] + a * (AREA_RANGE[1] - AREA_RANGE[0])
        aspect = math.exp(
            math.log(ASPECT_RANGE[0]) + r * (math.log(ASPECT_RANGE[1]) - math.log(ASPECT_RANGE[0]))
        )
        bh = min(height, max(1, round(height * math.sqrt(area * aspect))))
        bw = min(width, max(1, round(width * math.sqrt(area / aspect))))
        pos = torch.rand(2, generator=generator).tolist()
        y0 = int(pos[0] * (height - bh + 1))
        x0 = int(pos[1] * (width - bw + 1))
        boxes.append(CutBox(i, (i + 1) % n, y0, y0 + bh, x0, x0 + bw))
    return boxes


def apply_cutmix(images: Tensor, targets: Tensor, boxes: list[CutBox]) -> tuple[Tensor, Tensor]:
    """Paste the boxes: images B x 3 x H x W; targets B x C labels (union) or B x H x W masks.

    Sources are read from the batch as it was given (a patch pasted into another
    is pasted unmixed).
    """
    if not boxes:
        return images, targets
    mixed, out = images.clone(), targets.clone()
    masks = targets.dim() == 3
    for b in boxes:
        mixed[b.target, :, b.y0 : b.y1, b.x0 : b.x1] = images[b.source, :, b.y0 : b.y1, b.x0 : b.x1]
        if masks:
            out[b.target, b.y0 : b.y1, b.x0 : b.x1] = targets[b.source, b.y0 : b.y1, b.x0 : b.x1]
        else:
            out[b.target] = torch.maximum(targets[b.target], targets[b.source])
    return mixed, out
