"""Maps to masks, and scoring a split (METHOD.md, "Turning maps into masks").

1. Test-time augmentation: every scale x (flip or not); maps are resized back
   to the input size, un-flipped and averaged.
2. Each stage's class maps are min-max normalised per image and class, fused
   with ``eval.fuse_weights`` (0.3 M_2 + 0.3 M_3 + 0.4 M_4) and normalised again.
3. Class gating: ``pseudo`` keeps the image's labelled classes, ``predict``
   keeps classes whose classifier probability exceeds ``eval.cls_threshold``.
4. Background channel ``(1 - max_c M_c)^gamma``; argmax over C + 1 channels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from lpdseg.config import EvalConfig
from lpdseg.metrics import SegmentationMeter
from lpdseg.models.lpd import WSSSModel, needed_stages

log = logging.getLogger(__name__)


@dataclass
class MapOutput:
    """TTA-averaged outputs for a batch.

    Attributes:
        stage_maps: per stage, B x C x H x W raw class maps at input size (``None``
            for stages with fuse weight 0).
        probs: B x C classifier probabilities (sigmoid of stage-4 logits; with
            ``eval.gate_window``, the max over windows, see :func:`window_probs`).
    """

    stage_maps: list[Tensor | None]
    probs: Tensor


def _flip(x: Tensor, flip: bool) -> Tensor:
    return x.flip(-1) if flip else x


@torch.no_grad()
def infer_maps(
    model: WSSSModel,
    images: Tensor,
    cfg: EvalConfig,
    tta: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> MapOutput:
    """Run the model with TTA and return raw per-stage maps at input size.

    Args:
        model: a trained model (put in eval mode by the caller).
        images: B x 3 x H x W normalised images.
        cfg: evaluation settings (scales, flip, fuse weights, merge).
        tta: ``False`` runs scale 1.0 without flip only (fast validation).
        amp_dtype: autocast dtype, or ``None`` for fp32.
    """
    h, w = images.shape[-2:]
    stages = needed_stages(cfg.fuse_weights)
    scales = cfg.tta_scales if tta else [1.0]
    flips = [False, True] if (tta and cfg.tta_flip) else [False]
    sums: list[Tensor | None] = [None] * 4
    prob_sum = None
    count = 0
    for scale in scales:
        x = images
        if scale != 1.0:
            size = (max(32, round(h * scale)), max(32, round(w * scale)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flip in flips:
            with torch.autocast(
                images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                out = model(_flip(x, flip), stages=stages, inference_merge=cfg.inference_merge)
            for i in stages:
                if not cfg.fuse_weights[i]:
                    continue
                m = F.interpolate(
                    out.class_maps[i].float(), size=(h, w), mode="bilinear", align_corners=False
                )
                m = _flip(m, flip)
                sums[i] = m if sums[i] is None else sums[i] + m
            if cfg.gate_window:
                p = window_probs(model, out, cfg.gate_window * scale, x.shape[-2:])
            else:
                p = torch.sigmoid(out.logits[3].float())
            prob_sum = p if prob_sum is None else prob_sum + p
            count += 1
    maps = [None if s is None else s / count for s in sums]
    return MapOutput(maps, prob_sum / count)


def window_probs(model: WSSSModel, out, window: float, size: tuple[int, int]) -> Tensor:
    """Class probabilities (B x C): max over sliding windows of ``window`` input px.

    Each window's logit is the model's own (GAP, merge, bias) over that window of
    the stage-4 maps, the windows overlap by half; an image no larger than the
    window gives the whole-image probability. Why: a classifier trained on
    ``window``-px crops is calibrated for fields of that size, and a class in one
    corner of a large image gets a diluted whole-image logit.
    """
    maps = out.class_maps[3]
    fh, fw = maps.shape[-2:]
    kh = max(1, min(fh, round(window * fh / size[0])))
    kw = max(1, min(fw, round(window * fw / size[1])))
    logits = model.head.window_logits(out, 3, (kh, kw), (max(1, kh // 2), max(1, kw // 2)))
    return torch.sigmoid(logits.amax(-1))


def minmax_normalise(maps: Tensor) -> Tensor:
    """Min-max normalise each (image, class) map over its pixels to [0, 1]."""
    flat = maps.flatten(2)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-6)


def fuse_maps(stage_maps: list[Tensor | None], weights: Iterable[float]) -> Tensor:
    """Weighted sum of min-max normalised stage maps, normalised again (B x C x H x W)."""
    fused = None
    for m, wt in zip(stage_maps, weights):
        if m is None or not wt:
            continue
        term = wt * minmax_normalise(m)
        fused = term if fused is None else fused + term
    if fused is None:
        raise ValueError("eval.fuse_weights selects no stage")
    return minmax_normalise(fused)


def label_scores(fused: Tensor, keep: Tensor, gamma: float) -> Tensor:
    """Gated fused maps + background channel (B x (C + 1) x H x W), background last.

    Args:
        fused: B x C x H x W fused maps in [0, 1].
        keep: B x C bool, classes allowed in each image.
        gamma: background exponent.
    """
    gated = fused * keep[:, :, None, None].to(fused.dtype)
    background = (1.0 - gated.max(1, keepdim=True).values).clamp_min(0) ** gamma
    return torch.cat([gated, background], dim=1)


def glass_mask(rgb: Tensor, cfg: EvalConfig) -> Tensor:
    """White-glass pixels (B x H x W bool) of RGB images in [0, 1] (B x 3 x H x W)."""
    bright = rgb.mean(1) > cfg.glass_brightness
    grey = (rgb.amax(1) - rgb.amin(1)) < cfg.glass_spread
    return bright & grey


def force_background(scores: Tensor, where: Tensor) -> Tensor:
    """Scores (B x (C + 1) x H x W, in [0, 1]) with background winning at ``where`` pixels."""
    scores = scores.clone()
    background = scores[:, -1]
    background[where] = 2.0  # above every tissue score (all are <= 1)
    return scores


def maps_to_mask(fused: Tensor, keep: Tensor, gamma: float) -> Tensor:
    """Gated fused maps -> label mask (B x H x W), background = C."""
    return label_scores(fused, keep, gamma).argmax(1)


def class_gate(
    cfg: EvalConfig, probs: Tensor, labels: Tensor | None, mode: str | None = None
) -> Tensor:
    """Which classes may appear: the labels (``pseudo``) or confident ones (``predict``)."""
    mode = mode or cfg.gating
    if mode == "pseudo":
        if labels is None:
            raise ValueError("pseudo gating needs image-level labels; use gating=predict")
        return labels > 0.5
    return probs > cfg.cls_threshold


def predict_scores(
    model: WSSSModel,
    images: Tensor,
    cfg: EvalConfig,
    labels: Tensor | None = None,
    mode: str | None = None,
    tta: bool = True,
    amp_dtype: torch.dtype | None = None,
    rgb: Tensor | None = None,
) -> Tensor:
    """Images -> per-label scores (B x (C + 1) x H x W); argmax gives the mask.

    ``rgb``: the same images un-normalised, in [0, 1]; needed by ``cfg.glass_background``.
    """
    return _scores_and_maps(model, images, cfg, labels, mode, tta, amp_dtype, rgb)[0]


def _scores_and_maps(
    model: WSSSModel,
    images: Tensor,
    cfg: EvalConfig,
    labels: Tensor | None,
    mode: str | None,
    tta: bool,
    amp_dtype: torch.dtype | None,
    rgb: Tensor | None = None,
) -> tuple[Tensor, MapOutput | None]:
    """Per-label scores and, for prototype/CAM models, the maps they came from.

    Stage-2 networks (no prototype head) give their softmax; gating does not apply.
    With ``cfg.glass_background``, white-glass pixels of ``rgb`` become background.
    """
    if cfg.glass_background and rgb is None:
        raise ValueError(
            "eval.glass_background needs the un-normalised images (rgb=...) to find glass"
        )
    out = None
    if not isinstance(model, WSSSModel):
        scores = segnet_scores(model, images, cfg, tta)
    else:
        out = infer_maps(model, images, cfg, tta=tta, amp_dtype=amp_dtype)
        fused = fuse_maps(out.stage_maps, cfg.fuse_weights)
        scores = label_scores(fused, class_gate(cfg, out.probs, labels, mode), cfg.bg_gamma)
    if cfg.glass_background:
        scores = force_background(scores, glass_mask(rgb.to(scores.device).float(), cfg))
    return scores, out


@torch.no_grad()
def segnet_scores(
    model: torch.nn.Module, images: Tensor, cfg: EvalConfig, tta: bool = True
) -> Tensor:
    """Stage-2 network: TTA-averaged softmax (B x (C + 1) x H x W)."""
    h, w = images.shape[-2:]
    scales = cfg.tta_scales if tta else [1.0]
    flips = [False, True] if (tta and cfg.tta_flip) else [False]
    total, n = None, 0
    for scale in scales:
        x = (
            images
            if scale == 1.0
            else F.interpolate(
                images,
                size=(max(32, round(h * scale)), max(32, round(w * scale))),
                mode="bilinear",
                align_corners=False,
            )
        )
        for flip in flips:
            p = torch.softmax(model(_flip(x, flip)).float(), 1)
            p = _flip(F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False), flip)
            total, n = (p if total is None else total + p), n + 1
    return total / n


def predict_masks(
    model: WSSSModel,
    images: Tensor,
    cfg: EvalConfig,
    labels: Tensor | None = None,
    mode: str | None = None,
    tta: bool = True,
    amp_dtype: torch.dtype | None = None,
    rgb: Tensor | None = None,
) -> tuple[Tensor, MapOutput | None]:
    """Images -> label masks (B x H x W) and the maps they came from.

    Stage-2 networks (no prototype head) give their argmax; gating does not apply.
    ``rgb``: the same images un-normalised, in [0, 1]; needed by ``cfg.glass_background``.
    """
    scores, out = _scores_and_maps(model, images, cfg, labels, mode, tta, amp_dtype, rgb)
    return scores.argmax(1), out


@torch.no_grad()
def evaluate(
    model: WSSSModel,
    loader: Iterable[dict],
    cfg: EvalConfig,
    class_names: list[str],
    *,
    mode: str | None = None,
    tta: bool = True,
    limit: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "eval",
    normalisation: tuple[Iterable[float], Iterable[float]] | None = None,
) -> dict:
    """Score a split: one confusion matrix over all pixels + boundary IoU.

    Args:
        model: the model (switched to eval mode here).
        loader: yields dicts with ``image`` (B x 3 x H x W), ``mask`` (B x H x W)
            and ``label`` (B x C); lists of per-image tensors are accepted for
            images of different sizes.
        cfg: evaluation settings.
        class_names: tissue class names.
        mode: ``pseudo`` or ``predict`` (default ``cfg.gating``).
        tta: use test-time augmentation.
        limit: stop after this many images.
        normalisation: ``(mean, std)`` the loader normalised with; needed by
            ``cfg.glass_background`` to recover the RGB values.

    Returns:
        The meter's results (see :class:`lpdseg.metrics.SegmentationMeter`),
        plus ``mode`` and ``images``.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    mean = std = None
    if cfg.glass_background:
        if normalisation is None or normalisation[0] is None or normalisation[1] is None:
            raise ValueError("eval.glass_background needs evaluate(..., normalisation=(mean, std))")
        mean = torch.tensor(list(normalisation[0]), device=device).view(1, 3, 1, 1)
        std = torch.tensor(list(normalisation[1]), device=device).view(1, 3, 1, 1)
    meter = SegmentationMeter(len(class_names), class_names, boundary_ratio=cfg.boundary_ratio)
    seen = 0
    bar = tqdm(total=limit, desc=desc, disable=not progress, leave=False, unit="img")
    for batch in loader:
        images, masks, labels = batch["image"], batch["mask"], batch["label"]
        if isinstance(images, torch.Tensor):
            images, masks, labels = [images], [masks], [labels]
        else:  # list of single images of different sizes
            images = [im[None] for im in images]
            masks = [m[None] for m in masks]
            labels = [lb[None] for lb in labels]
        for img, msk, lab in zip(images, masks, labels):
            img = img.to(device)
            rgb = img * std + mean if mean is not None else None
            pred, _ = predict_masks(model, img, cfg, lab.to(device), mode=mode, tta=tta, rgb=rgb)
            meter.update(pred.cpu(), msk)
            seen += img.shape[0]
            bar.update(img.shape[0])
        if limit is not None and seen >= limit:
            break
    bar.close()
    model.train(was_training)
    results = meter.compute()
    results["mode"] = mode or cfg.gating
    results["images"] = seen
    return results
