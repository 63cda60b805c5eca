"""Segmentation metrics: confusion matrix, IoU / Dice / FwIoU / accuracy, Boundary IoU.

Label convention of the package: tissue classes ``0 .. C-1``, background ``C``,
ignore ``255``; so a confusion matrix has ``L = C + 1`` rows and columns.

Everything is accumulated over a whole split, never averaged per image:

- one confusion matrix (rows = ground truth, columns = prediction) gives
  per-label IoU and Dice, **mIoU / mDice over the C tissue classes only**,
  frequency-weighted IoU over all L labels and pixel accuracy;
- Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image
  Segmentation Evaluation", CVPR 2021) sums, per label, the intersection and
  union pixel counts of the boundary bands over all images, and divides once.

Boundary band. The band of a binary mask is the mask minus its erosion by a
``(2d + 1) x (2d + 1)`` square, i.e. the mask pixels within **chessboard**
(L-infinity) distance ``d`` of a pixel outside the mask. This is what the
reference implementation computes (a 3 x 3 erosion iterated ``d`` times).
Like the reference, which pads the mask with zeros before eroding, the **image
border counts as contour**: pixels within ``d`` of the image edge are in the
band. ``d = max(1, round(0.02 * image diagonal))`` by default.

All scores are fractions in [0, 1]; NaN marks a score that is undefined
(a label absent from both ground truth and prediction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SegmentationMeter",
    "boundary_band",
    "boundary_counts",
    "boundary_width",
    "confusion_matrix",
    "format_table",
    "scores_from_confusion",
]

# OpenCV filters accept at most this many channels per image (CV_CN_MAX).
_CV_MAX_CHANNELS = 512


# ------------------------------------------------------------------ checks
def _describe(values: Tensor, limit: int = 10) -> str:
    """Sorted unique values of ``values`` as text, at most ``limit`` of them."""
    uniq = torch.unique(values).tolist()
    text = ", ".join(str(v) for v in uniq[:limit])
    return text + (f", ... ({len(uniq)} distinct)" if len(uniq) > limit else "")


def _check_labels(pred: Tensor, target: Tensor, num_labels: int, ignore_index: int) -> Tensor:
    """Validate a prediction / ground-truth pair and return the mask of counted pixels.

    Args:
        pred: predicted labels.
        target: ground-truth labels, same shape as ``pred``.
        num_labels: number of labels L; valid labels are ``0 .. L-1``.
        ignore_index: ground-truth value of pixels that are not scored.

    Returns:
        Bool tensor, shape of ``target``: pixels whose ground truth is not ``ignore_index``.

    Raises:
        TypeError: a tensor is not an integer (or bool) tensor.
        ValueError: shapes differ, ``num_labels < 1``, or a value is out of range.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1 (tissue classes + background), got {num_labels}")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(
                f"{name} must hold integer labels, got dtype {t.dtype}; "
                "take the argmax of the score maps first"
            )
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}"
        )
    valid = target != ignore_index
    t = target[valid]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_labels):
        bad = t[(t < 0) | (t >= num_labels)]
        raise ValueError(
            f"target holds values outside 0..{num_labels - 1} (and ignore_index={ignore_index}): "
            f"{_describe(bad)}; check the dataset's label mapping or num_labels"
        )
    p = pred[valid]
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_labels):
        bad = p[(p < 0) | (p >= num_labels)]
        raise ValueError(
            f"pred holds values outside 0..{num_labels - 1} at scored pixels: {_describe(bad)}; "
            "predictions must be label ids (tissue classes, then background)"
        )
    return valid


# ------------------------------------------------------- confusion matrix
def confusion_matrix(
    pred: Tensor, target: Tensor, num_labels: int, ignore_index: int = 255
) -> Tensor:
    """Confusion matrix of one prediction against its ground truth.

    Args:
        pred: predicted labels, any shape, integer dtype.
        target: ground-truth labels, same shape as ``pred``, integer dtype.
        num_labels: number of labels L (C tissue classes + background).
        ignore_index: ground-truth value of pixels that are skipped.

    Returns:
        int64 tensor ``L x L`` on ``pred``'s device; ``cm[g, p]`` counts pixels
        with ground truth ``g`` predicted as ``p``.

    Raises:
        TypeError: a tensor is not an integer tensor.
        ValueError: shapes differ or a counted value is outside ``0 .. L-1``.
    """
    target = target.to(pred.device)
    valid = _check_labels(pred, target, num_labels, ignore_index)
    # int64 before multiplying: masks often come as uint8, where g * L overflows
    g = target[valid].long()
    p = pred[valid].long()
    counts = torch.bincount(g * num_labels + p, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


# --------------------------------------------------------- boundary bands
def boundary_width(height: int, width: int, ratio: float = 0.02) -> int:
    """Band width d of Boundary IoU: ``max(1, round(ratio * diagonal))`` pixels.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        ratio: fraction of the image diagonal (0.02 in the Boundary IoU paper).

    Returns:
        The band width in pixels, at least 1.

    Raises:
        ValueError: a size is not positive or ``ratio`` is not positive.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if not ratio > 0:
        raise ValueError(f"boundary ratio must be > 0 (e.g. 0.02), got {ratio}")
    return max(1, round(ratio * math.hypot(height, width)))


def _inner_bands(masks: Tensor, width: int) -> Tensor:
    """Inner boundary bands of a stack of binary masks.

    Args:
        masks: bool ``N x H x W``.
        width: band width d in pixels (chessboard distance), >= 1.

    Returns:
        bool ``N x H x W`` on the device of ``masks``: each mask minus its
        erosion by a ``(2d + 1)`` square, the outside of the image counting as
        not-in-mask (so the image border is contour).
    """
    n, h, w = masks.shape
    if n == 0:
        return masks.clone()
    # one OpenCV call per chunk of up to 512 masks, stacked as channels (H x W x N)
    stack = masks.detach().cpu().permute(1, 2, 0).contiguous().numpy().astype(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    eroded = np.empty_like(stack)
    for start in range(0, n, _CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(stack[:, :, start : start + _CV_MAX_CHANNELS])
        out = cv2.erode(chunk, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        eroded[:, :, start : start + _CV_MAX_CHANNELS] = out.reshape(h, w, -1)
    band = torch.from_numpy(stack > eroded).permute(2, 0, 1)
    return band.to(masks.device)


def boundary_band(mask: Tensor, label: int, width: int) -> Tensor:
    """Inner boundary band of one label's mask (Boundary IoU's ``G_d ∩ G``).

    A pixel is in the band when it belongs to the mask and some pixel within
    chessboard distance ``width`` is outside the mask or outside the image
    (the image border counts as contour, as in the reference implementation).

    Args:
        mask: label map ``H x W`` (integer dtype).
        label: the label whose mask is used (``mask == label``).
        width: band width d in pixels, >= 1.

    Returns:
        bool ``H x W``: the band.

    Raises:
        ValueError: ``mask`` is not 2-D or ``width < 1``.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be H x W, got shape {tuple(mask.shape)}")
    if width < 1:
        raise ValueError(f"band width must be >= 1 pixel, got {width}")
    return _inner_bands((mask == label)[None], width)[0]


def _boundary_counts_batch(
    pred: Tensor, target: Tensor, num_labels: int, width: int, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-label boundary intersection and union, summed over a batch.

    Args:
        pred: predicted labels ``B x H x W``.
        target: ground-truth labels ``B x H x W``.
        num_labels: number of labels L.
        width: band width d in pixels.
        valid: bool ``B x H x W``, pixels that are counted (not ignored).

    Returns:
        ``(intersection, union)``, each int64 of length L on CPU.
    """
    b, h, w = target.shape
    # ignored pixels count as "no label" in the prediction too: otherwise an ignore region
    # draws a contour in the ground truth only and a perfect prediction scores bIoU < 1
    pred = torch.where(valid, pred, target)
    labels = torch.arange(num_labels, device=target.device).view(1, num_labels, 1, 1)
    # one-hot stacks B x L x H x W; ignore / out-of-range values match no label
    g_band = _inner_bands((target[:, None] == labels).reshape(-1, h, w), width)
    p_band = _inner_bands((pred[:, None] == labels).reshape(-1, h, w), width)
    # (the gt bands hold no ignored pixel anyway; masked for symmetry with the prediction)
    g_band = g_band.reshape(b, num_labels, h, w) & valid[:, None]
    p_band = p_band.reshape(b, num_labels, h, w) & valid[:, None]
    inter = (g_band & p_band).sum(dim=(0, 2, 3))
    union = (g_band | p_band).sum(dim=(0, 2, 3))
    return inter.long().cpu(), union.long().cpu()


def boundary_counts(
    pred: Tensor,
    target: Tensor,
    num_labels: int,
    ratio: float = 0.02,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    """Boundary IoU pixel counts of one image, per label.

    For label l with ground-truth mask G and predicted mask P, and their inner
    bands ``G_d ∩ G`` and ``P_d ∩ P`` (see :func:`boundary_band`), the counts are
    ``|(G_d ∩ G) ∩ (P_d ∩ P)|`` and ``|(G_d ∩ G) ∪ (P_d ∩ P)|``. Bands are
    computed on the full masks with ignored pixels (ground truth ``ignore_index``)
    outside every label in both masks, and those pixels are not counted.

    Args:
        pred: predicted labels ``H x W``.
        target: ground-truth labels ``H x W``.
        num_labels: number of labels L.
        ratio: band width as a fraction of the image diagonal.
        ignore_index: ground-truth value of pixels that are not scored.

    Returns:
        ``(intersection, union)``, each int64 of length L (on CPU).

    Raises:
        TypeError: a tensor is not an integer tensor.
        ValueError: shapes differ, the image is not 2-D, or a value is out of range.
    """
    target = target.to(pred.device)
    valid = _check_labels(pred, target, num_labels, ignore_index)
    if target.dim() != 2:
        raise ValueError(f"boundary_counts takes one H x W image, got shape {tuple(target.shape)}")
    width = boundary_width(*target.shape, ratio=ratio)
    return _boundary_counts_batch(pred[None], target[None], num_labels, width, valid[None])


# ----------------------------------------------------------------- scores
def _nanmean(values: Tensor) -> float:
    """Mean of the non-NaN entries; NaN when there are none (no warning)."""
    keep = values[~torch.isnan(values)]
    return float(keep.mean()) if keep.numel() else math.nan


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, NaN where ``den == 0``."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den, torch.full_like(den, math.nan))


def scores_from_confusion(cm: Tensor, num_classes: int) -> dict[str, Any]:
    """IoU, Dice, mIoU, mDice, FwIoU and pixel accuracy from a confusion matrix.

    Args:
        cm: ``L x L`` counts, rows = ground truth, columns = prediction.
        num_classes: number C of tissue classes, the first C labels; the others
            (background) count in FwIoU and pixel accuracy but not in the means.

    Returns:
        Dict with ``iou`` and ``dice`` (lists of L floats, NaN for a label absent
        from both ground truth and prediction), ``mIoU`` and ``mDice`` (NaN-mean
        over the C tissue classes), ``FwIoU`` (sum over labels of ground-truth
        frequency x IoU) and ``pixel_acc``; NaN where nothing was counted.

    Raises:
        ValueError: ``cm`` is not square or ``num_classes`` is not in ``1 .. L``.
    """
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be L x L, got shape {tuple(cm.shape)}")
    n_labels = cm.shape[0]
    if not 1 <= num_classes <= n_labels:
        raise ValueError(
            f"num_classes must be in 1..{n_labels} for a {n_labels} x {n_labels} confusion "
            f"matrix (tissue classes + background), got {num_classes}"
        )
    cm = cm.detach().cpu().double()
    tp = cm.diag()
    gt = cm.sum(dim=1)
    pr = cm.sum(dim=0)
    total = cm.sum()
    iou = _ratio(tp, gt + pr - tp)
    dice = _ratio(2 * tp, gt + pr)
    if total > 0:
        # labels absent from the ground truth weigh 0 (their IoU may be NaN)
        fw = float(torch.where(gt > 0, gt * iou.nan_to_num(0.0), 0.0).sum() / total)
        acc = float(tp.sum() / total)
    else:
        fw = acc = math.nan
    return {
        "iou": iou.tolist(),
        "dice": dice.tolist(),
        "mIoU": _nanmean(iou[:num_classes]),
        "mDice": _nanmean(dice[:num_classes]),
        "FwIoU": fw,
        "pixel_acc": acc,
    }


# ------------------------------------------------------------------ meter
class SegmentationMeter:
    """Accumulates one confusion matrix and boundary counts over a whole split.

    Attributes:
        num_classes: number C of tissue classes; there are ``C + 1`` labels.
        class_names: the C tissue class names.
        boundary_ratio: Boundary IoU band width as a fraction of the diagonal.
        ignore_index: ground-truth value of pixels that are not scored.
        confusion: int64 ``(C+1) x (C+1)`` counts (rows = ground truth).
        boundary_intersection: int64 ``C + 1`` summed band intersections.
        boundary_union: int64 ``C + 1`` summed band unions.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        boundary_ratio: float = 0.02,
        ignore_index: int = 255,
    ) -> None:
        """Create an empty meter.

        Args:
            num_classes: number C of tissue classes (background is label C).
            class_names: C tissue class names (default ``class0`` ...).
            boundary_ratio: band width of Boundary IoU as a fraction of the diagonal.
            ignore_index: ground-truth value of pixels that are not scored.

        Raises:
            ValueError: ``num_classes < 1``, wrong number of names, or ``boundary_ratio <= 0``.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 tissue class, got {num_classes}")
        names = (
            [f"class{i}" for i in range(num_classes)] if class_names is None else list(class_names)
        )
        if len(names) != num_classes:
            raise ValueError(
                f"got {len(names)} class names {names} for num_classes={num_classes}; give one "
                "name per tissue class (background is added automatically)"
            )
        if not boundary_ratio > 0:
            raise ValueError(f"boundary_ratio must be > 0 (e.g. 0.02), got {boundary_ratio}")
        self.num_classes = num_classes
        self.class_names = names
        self.boundary_ratio = boundary_ratio
        self.ignore_index = ignore_index
        self.reset()

    @property
    def num_labels(self) -> int:
        """Number of labels L = C + 1 (tissue classes + background)."""
        return self.num_classes + 1

    def reset(self) -> None:
        """Clear all counts."""
        n = self.num_labels
        self.confusion = torch.zeros(n, n, dtype=torch.long)
        self.boundary_intersection = torch.zeros(n, dtype=torch.long)
        self.boundary_union = torch.zeros(n, dtype=torch.long)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one image (``H x W``) or a batch (``B x H x W``) of label maps.

        Args:
            pred: predicted labels (tissue classes, then background = C).
            target: ground-truth labels, same shape; ``ignore_index`` pixels are skipped.

        Raises:
            TypeError: a tensor is not an integer tensor.
            ValueError: shapes differ, are not 2-D/3-D, or a value is out of range.
        """
        if pred.dim() not in (2, 3):
            raise ValueError(f"pred must be H x W or B x H x W, got shape {tuple(pred.shape)}")
        target = target.to(pred.device)
        valid = _check_labels(pred, target, self.num_labels, self.ignore_index)
        if pred.dim() == 2:
            pred, target, valid = pred[None], target[None], valid[None]
        g = target[valid].long()
        p = pred[valid].long()
        n = self.num_labels
        cm = torch.bincount(g * n + p, minlength=n * n).reshape(n, n)
        self.confusion += cm.cpu()
        width = boundary_width(*target.shape[-2:], ratio=self.boundary_ratio)
        inter, union = _boundary_counts_batch(pred, target, n, width, valid)
        self.boundary_intersection += inter
        self.boundary_union += union

    def merge(self, other: SegmentationMeter) -> None:
        """Add another meter's counts (e.g. from another process or shard).

        Args:
            other: a meter with the same classes, boundary ratio and ignore index.

        Raises:
            ValueError: the meters are not compatible.
        """
        mine = (self.num_classes, self.boundary_ratio, self.ignore_index)
        theirs = (other.num_classes, other.boundary_ratio, other.ignore_index)
        if mine != theirs:
            raise ValueError(
                "cannot merge meters with different (num_classes, boundary_ratio, "
                f"ignore_index): {mine} vs {theirs}"
            )
        self.confusion += other.confusion.cpu()
        self.boundary_intersection += other.boundary_intersection.cpu()
        self.boundary_union += other.boundary_union.cpu()

    def compute(self) -> dict[str, Any]:
        """Scores over everything added so far.

        Returns:
            :func:`scores_from_confusion`'s dict plus ``biou`` (per label:
            summed band intersection / summed band union, NaN where the union
            is 0), ``bIoU`` (NaN-mean of ``biou`` over the tissue classes),
            ``confusion`` (list of lists) and ``class_names`` (tissue names +
            ``background``).
        """
        res = scores_from_confusion(self.confusion, self.num_classes)
        biou = _ratio(self.boundary_intersection, self.boundary_union)
        res["biou"] = biou.tolist()
        res["bIoU"] = _nanmean(biou[: self.num_classes])
        res["confusion"] = self.confusion.tolist()
        res["class_names"] = [*self.class_names, "background"]
        return res


# ------------------------------------------------------------------ table
def _pct(value: Any) -> str:
    """A fraction as a percentage with 2 decimals; ``n/a`` when missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100.0 * float(value):.2f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of per-class and summary scores, in percent.

    Args:
        results: :meth:`SegmentationMeter.compute`'s dict (a dict from
            :func:`scores_from_confusion` works too; missing entries print ``n/a``).

    Returns:
        A Markdown table: one row per label (IoU, Dice, bIoU) and a summary row
        (mIoU, mDice, bIoU over the tissue classes; FwIoU and pixel accuracy
        over all labels), followed by a one-line legend.
    """
    iou = list(results.get("iou", []))
    dice = list(results.get("dice", []))
    biou = list(results.get("biou", []))
    names = list(results.get("class_names", []))
    n = max(len(iou), len(dice), len(biou), len(names))
    names += [f"label {i}" for i in range(len(names), n)]

    def at(seq: list, i: int) -> Any:
        return seq[i] if i < len(seq) else None

    lines = [
        "| class | IoU | Dice | bIoU | FwIoU | pixel acc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i in range(n):
        lines.append(
            f"| {names[i]} | {_pct(at(iou, i))} | {_pct(at(dice, i))} | {_pct(at(biou, i))} | | |"
        )
    lines.append(
        f"| **summary** | **{_pct(results.get('mIoU'))}** | **{_pct(results.get('mDice'))}** "
        f"| **{_pct(results.get('bIoU'))}** | **{_pct(results.get('FwIoU'))}** "
        f"| **{_pct(results.get('pixel_acc'))}** |"
    )
    lines.append("")
    lines.append(
        "Scores in %. Summary: mIoU, mDice and bIoU are means over the tissue classes "
        "(background excluded); FwIoU and pixel acc are over all labels."
    )
    return "\n".join(lines)
