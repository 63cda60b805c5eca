"""Model outputs -> label scores and masks (docs/method.md, "Turning maps into masks").

1. Test-time augmentation (:func:`with_tta`, the one TTA loop): every scale x
   (flip or not); maps are resized back to the input size, un-flipped and
   averaged.
2. Each stage's class maps are min-max normalised per image and class, fused
   with ``eval.fuse_weights`` (0.3 M_2 + 0.3 M_3 + 0.4 M_4) and normalised again.
3. Class gate: ``labels`` keeps the image's labelled classes, ``classifier``
   keeps classes whose classifier probability exceeds ``eval.cls_threshold``.
4. Background channel ``(1 - max_c M_c)^gamma``; argmax over C + 1 channels.
5. With ``eval.glass_background``, white-glass pixels become background.

Images are RGB in [0, 1] (models normalise their own input). One forward pass
serves every gate (:func:`decode_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lpdseg.config import GATES, EvalConfig
from lpdseg.data.glass import glass_mask
from lpdseg.models.lpd import WSSSModel, needed_stages
from lpdseg.models.prototypes import merge_prototype_scores


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


def _resize(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of maps; antialiased when shrinking (slide maps at the canvas grid)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    shrink = m.shape[-2] > size[0] or m.shape[-1] > size[1]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def with_tta(
    images: Tensor,
    cfg: EvalConfig,
    tta: bool,
    forward: Callable[[Tensor, float], tuple[Sequence[Tensor | None], Sequence[Tensor]]],
    size: tuple[int, int] | None = None,
) -> tuple[list[Tensor | None], list[Tensor]]:
    """Average ``forward`` over the TTA views of ``images``.

    Args:
        images: B x 3 x H x W.
        cfg: ``tta_scales`` and ``tta_flip``.
        tta: ``False``: scale 1 without flip only (fast validation).
        forward: ``(view, scale) -> (maps, vectors)``; maps (B x K x h x w, or
            ``None``) are resized to H x W and un-flipped before averaging,
            vectors (B x K) are averaged as they are.
        size: ``(h, w)`` the maps are resized to (None: the images' H x W).

    Returns:
        The averaged maps and vectors.
    """
    h, w = size or images.shape[-2:]
    scales = cfg.tta_scales if tta else [1.0]
    flips = [False, True] if (tta and cfg.tta_flip) else [False]
    map_sums: list[Tensor | None] | None = None
    vec_sums: list[Tensor] | None = None
    count = 0
    for scale in scales:
        x = images
        if scale != 1.0:
            size = (max(32, round(h * scale)), max(32, round(w * scale)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flip in flips:
            maps, vectors = forward(_flip(x, flip), scale)
            maps = [None if m is None else _flip(_resize(m.float(), (h, w)), flip) for m in maps]
            if map_sums is None:
                map_sums, vec_sums = list(maps), list(vectors)
            else:
                map_sums = [None if s is None else s + m for s, m in zip(map_sums, maps)]
                vec_sums = [s + v for s, v in zip(vec_sums, vectors)]
            count += 1
    return (
        [None if s is None else s / count for s in map_sums],
        [v / count for v in vec_sums],
    )


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
        images: B x 3 x H x W RGB in [0, 1].
        cfg: evaluation settings (scales, flip, fuse weights, merge).
        tta: ``False`` runs scale 1.0 without flip only (fast validation).
        amp_dtype: autocast dtype, or ``None`` for fp32.
    """
    stages = needed_stages(cfg.fuse_weights)

    def forward(x: Tensor, scale: float) -> tuple[list[Tensor | None], list[Tensor]]:
        with torch.autocast(
            x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            out = model(x, stages=stages, inference_merge=cfg.inference_merge)
        return view_maps(model, out, cfg, scale, x.shape[-2:])

    maps, (probs,) = with_tta(images, cfg, tta, forward)
    return MapOutput(maps, probs)


def view_maps(
    model: WSSSModel, out, cfg: EvalConfig, scale: float, size: tuple[int, int]
) -> tuple[list[Tensor | None], list[Tensor]]:
    """One view's class maps (fused stages, at their resolution) and classifier probabilities.

    ``out``: the model's output for a view of side ``size`` at TTA ``scale``.
    """
    maps = [out.class_maps[i] if cfg.fuse_weights[i] else None for i in range(4)]
    if cfg.gate_window:
        p = window_probs(model, out, cfg.gate_window * scale, size)
    else:
        p = torch.sigmoid(out.logits[3].float())
    return maps, [p]


def view_scores(model: WSSSModel, out, images: Tensor, cfg: EvalConfig) -> Tensor:
    """Classifier-gated label scores of ``images`` (one view, no TTA) from the model's ``out``.

    Equal to ``predict_scores(model, images, cfg, gate="classifier", tta=False)``
    for the same output, so one forward can serve these scores and :func:`raw_outputs`.
    """
    maps, (probs,) = view_maps(model, out, cfg, 1.0, images.shape[-2:])
    size = images.shape[-2:]
    maps = [None if m is None else _resize(m.float(), size) for m in maps]
    scores = gated_scores(MapOutput(maps, probs), cfg, None, ("classifier",))
    return with_glass(scores, images, cfg)["classifier"]


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


def force_background(scores: Tensor, where: Tensor) -> Tensor:
    """Scores (B x (C + 1) x H x W, in [0, 1]) with background winning at ``where`` pixels."""
    scores = scores.clone()
    background = scores[:, -1]
    background[where] = 2.0  # above every tissue score (all are <= 1)
    return scores


def class_gate(cfg: EvalConfig, probs: Tensor, labels: Tensor | None, gate: str) -> Tensor:
    """Which classes may appear: the labelled ones (``labels``) or confident ones (``classifier``).

    The classifier gate uses ``eval.cls_thresholds`` (per class, calibrated on the
    validation split) when set, else the one ``eval.cls_threshold``.

    Raises:
        ValueError: an unknown gate, or ``labels`` without image-level labels.
    """
    if gate == "labels":
        if labels is None:
            raise ValueError("the labels gate needs image-level labels; use gate=classifier")
        return labels > 0.5
    if gate == "classifier":
        if cfg.cls_thresholds is not None:
            if len(cfg.cls_thresholds) != probs.shape[-1]:
                raise ValueError(
                    f"eval.cls_thresholds has {len(cfg.cls_thresholds)} values for "
                    f"{probs.shape[-1]} classes"
                )
            return probs > probs.new_tensor(cfg.cls_thresholds)
        return probs > cfg.cls_threshold
    raise ValueError(f"unknown gate {gate!r}; valid: {', '.join(GATES)}")


@torch.no_grad()
def segnet_scores(
    model: torch.nn.Module, images: Tensor, cfg: EvalConfig, tta: bool = True
) -> Tensor:
    """Stage-2 network: TTA-averaged softmax (B x (C + 1) x H x W)."""
    (probs,), _ = with_tta(
        images, cfg, tta, lambda x, scale: ([torch.softmax(model(x).float(), 1)], [])
    )
    return probs


def decode_scores(
    model: torch.nn.Module,
    images: Tensor,
    cfg: EvalConfig,
    labels: Tensor | None = None,
    gates: Sequence[str] = ("classifier",),
    tta: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], MapOutput | None]:
    """Per-label scores (B x (C + 1) x H x W) for each gate, from one forward pass.

    Stage-2 networks (no prototype head) give their softmax for every gate.

    Returns:
        ``{gate: scores}`` and, for prototype/CAM models, the maps they came from.
    """
    out = None
    if not isinstance(model, WSSSModel):
        shared = segnet_scores(model, images, cfg, tta)
        scores = {g: shared for g in gates}
    else:
        out = infer_maps(model, images, cfg, tta=tta, amp_dtype=amp_dtype)
        scores = gated_scores(out, cfg, labels, gates)
    return with_glass(scores, images, cfg), out


def gated_scores(
    out: MapOutput, cfg: EvalConfig, labels: Tensor | None, gates: Sequence[str]
) -> dict[str, Tensor]:
    """Maps (at input size) -> ``{gate: label scores}``: fused, gated, background added."""
    fused = fuse_maps(out.stage_maps, cfg.fuse_weights)
    return {
        g: label_scores(fused, class_gate(cfg, out.probs, labels, g), cfg.bg_gamma) for g in gates
    }


def with_glass(scores: dict[str, Tensor], images: Tensor, cfg: EvalConfig) -> dict[str, Tensor]:
    """With ``eval.glass_background``, white-glass pixels of ``images`` made background."""
    if not cfg.glass_background:
        return scores
    glass = glass_mask(images.float(), cfg.glass_brightness, cfg.glass_spread)
    return {g: force_background(s, glass.to(s.device)) for g, s in scores.items()}


def _decode_one(model, images, cfg, labels, gate, tta, amp_dtype):
    gate = gate or cfg.gate
    scores, out = decode_scores(model, images, cfg, labels, (gate,), tta, amp_dtype)
    return scores[gate], out


def predict_scores(
    model: torch.nn.Module,
    images: Tensor,
    cfg: EvalConfig,
    labels: Tensor | None = None,
    gate: str | None = None,
    tta: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """Images (RGB in [0, 1]) -> per-label scores (B x (C + 1) x H x W); argmax = mask."""
    return _decode_one(model, images, cfg, labels, gate, tta, amp_dtype)[0]


def predict_masks(
    model: torch.nn.Module,
    images: Tensor,
    cfg: EvalConfig,
    labels: Tensor | None = None,
    gate: str | None = None,
    tta: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, MapOutput | None]:
    """Images -> label masks (B x H x W, background = C) and the maps they came from."""
    scores, out = _decode_one(model, images, cfg, labels, gate, tta, amp_dtype)
    return scores.argmax(1), out


# ---------------------------------------------------------------- slide scoring (seamless)
# ``slide_scoring: seamless``: tiles give quantities that are comparable across tiles
# (raw stage maps, the per-pixel inputs of the classifier logit, a glass flag); they are
# stitched (blended means are linear) and only then normalised, gated and turned into
# label scores, over the stitched canvas (:func:`seamless_scores`). Nothing is decided
# per tile, so tile borders leave no trace. An image given whole is the one-tile case.

SLIDE_SCORINGS = ("seamless", "per_tile")


@dataclass(frozen=True)
class SlideLayout:
    """Channels of :func:`slide_raw_maps`, in order.

    Attributes:
        num_classes: C.
        stages: stages with a non-zero fuse weight (C raw class-map channels each).
        weights: their fuse weights.
        gate_channels: G, per-pixel inputs of the stage-4 classifier logit (the
            prototype maps ``C x k`` of a prototype head, the class maps of a CAM head).
    """

    num_classes: int
    stages: tuple[int, ...]
    weights: tuple[float, ...]
    gate_channels: int

    @property
    def channels(self) -> int:
        """K = C * stages + G + 1 (the last channel: glass fraction)."""
        return self.num_classes * len(self.stages) + self.gate_channels + 1


@dataclass(frozen=True)
class GateHead:
    """What deciding a stitched canvas needs of a model's head, as plain values.

    The seamless decoder turns window-pooled per-pixel logit inputs into
    classifier logits with the head's own merge and stage-4 bias; holding them
    here (not the module) lets an ONNX export carry them in its metadata.

    Attributes:
        num_classes: C.
        prototypes_per_class: k for a prototype head, ``None`` for a CAM head
            (whose pooled class maps are its logits).
        merge: how sub-prototype scores become a class score (``mean`` / ``softmax``).
        logit_bias: the stage-4 logit bias per class (``None``: the head has none).
        tissue_pooling: the head pools over tissue only (``model.tissue_pooling``).
    """

    num_classes: int
    prototypes_per_class: int | None
    merge: str = "mean"
    logit_bias: tuple[float, ...] | None = None
    tissue_pooling: bool = False

    @classmethod
    def of(cls, model: WSSSModel | GateHead) -> GateHead:
        """The gate head of a model (a ``GateHead`` is returned as it is)."""
        if isinstance(model, GateHead):
            return model
        head = model.head
        protos = hasattr(head, "prototypes")
        bias = getattr(head, "logit_bias", None)
        return cls(
            num_classes=int(head.num_classes),
            prototypes_per_class=int(getattr(head, "prototypes_per_class", 1)) if protos else None,
            merge=str(getattr(head, "merge", "mean")),
            logit_bias=None if bias is None else tuple(float(v) for v in bias[3].detach().cpu()),
            tissue_pooling=getattr(model, "tissue_pooling", None) is not None,
        )

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "prototypes_per_class": self.prototypes_per_class,
            "merge": self.merge,
            "logit_bias": None if self.logit_bias is None else list(self.logit_bias),
            "tissue_pooling": self.tissue_pooling,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GateHead:
        bias = d.get("logit_bias")
        k = d.get("prototypes_per_class")
        return cls(
            num_classes=int(d["num_classes"]),
            prototypes_per_class=None if k is None else int(k),
            merge=str(d.get("merge", "mean")),
            logit_bias=None if bias is None else tuple(float(v) for v in bias),
            tissue_pooling=bool(d.get("tissue_pooling", False)),
        )


def fused_stages(cfg: EvalConfig) -> tuple[int, ...]:
    """Stages with a non-zero fuse weight (the class maps a slide's canvas keeps)."""
    stages = tuple(i for i, w in enumerate(cfg.fuse_weights) if w)
    if not stages:
        raise ValueError("eval.fuse_weights selects no stage")
    return stages


def slide_layout(model: WSSSModel | GateHead, cfg: EvalConfig) -> SlideLayout:
    """The channel layout :func:`slide_raw_maps` gives for ``model``."""
    head = GateHead.of(model)
    c = head.num_classes
    stages = fused_stages(cfg)
    k = head.prototypes_per_class or 1
    return SlideLayout(c, stages, tuple(float(cfg.fuse_weights[i]) for i in stages), c * k)


@torch.no_grad()
def slide_raw_maps(
    model: WSSSModel,
    images: Tensor,
    cfg: EvalConfig,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Tiles (RGB in [0, 1]) -> comparable per-pixel quantities (B x K x H x W, float32).

    Channels (:class:`SlideLayout`): the raw class maps of every fused stage (scaled
    cosines / CAM logits, no per-image normalisation), the stage-4 per-pixel logit
    inputs (their mean over a window is that window's pooled classifier input), and
    the glass flag (0/1, the :mod:`lpdseg.data.glass` rule). All are TTA-averaged and
    resized to the input size, so their window-weighted means can be stitched.

    ``size``: give them at ``(h, w)`` instead (the slide canvas's grid, ``H / h``
    input pixels per cell, the glass flag as its mean over each cell): what a
    slide keeps of a tile, at a fraction of the cost of full resolution.
    """
    stages = needed_stages(cfg.fuse_weights)

    def forward(x: Tensor, scale: float) -> tuple[list[Tensor | None], list[Tensor]]:
        with torch.autocast(
            x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            out = model(x, stages=stages, inference_merge=cfg.inference_merge)
        return raw_outputs(model, out, cfg), []

    return stitchable_maps(images, cfg, tta, forward, size)


def raw_outputs(model: WSSSModel, out, cfg: EvalConfig) -> list[Tensor]:
    """A view's network outputs behind :func:`slide_raw_maps`, at their own resolution.

    The raw class maps of every fused stage, then the stage-4 per-pixel logit
    inputs (prototype maps ``C x k``, or a CAM head's class maps), float32.
    """
    # per view, so no GateHead here: building one copies the logit bias to the host
    maps = [out.class_maps[i].float() for i in fused_stages(cfg)]
    protos = hasattr(model.head, "prototypes")
    gate = out.proto_maps[3].flatten(1, 2) if protos else out.class_maps[3]
    return [*maps, gate.float()]


def stitchable_maps(
    images: Tensor,
    cfg: EvalConfig,
    tta: bool,
    forward: Callable[[Tensor, float], tuple[Sequence[Tensor | None], Sequence[Tensor]]],
    size: tuple[int, int] | None = None,
) -> Tensor:
    """:func:`raw_outputs` of every TTA view (``forward``) -> the :func:`slide_raw_maps` tensor.

    The outputs are TTA-averaged at ``size`` (the input size when None) and the
    glass flag of ``images`` is appended; shared by PyTorch models and ONNX exports.
    """
    maps, _ = with_tta(images, cfg, tta, forward, size)
    glass = glass_mask(images.float(), cfg.glass_brightness, cfg.glass_spread)[:, None].float()
    if size is not None and tuple(size) != tuple(images.shape[-2:]):
        glass = F.adaptive_avg_pool2d(glass, size)
    return torch.cat([*maps, glass.to(maps[0].dtype)], dim=1)


def gate_logits(model: WSSSModel | GateHead, pooled: Tensor) -> Tensor:
    """Window-pooled stage-4 logit inputs (B x G x h x w) -> classifier logits (B x C x h x w).

    The head's own merge of sub-prototype scores and its logit bias, as in
    ``forward`` / ``window_logits``; a CAM head's pooled maps are its logits.
    """
    head = GateHead.of(model)
    if head.prototypes_per_class is None:
        return pooled
    b, _, h, w = pooled.shape
    scores = pooled.reshape(b, head.num_classes, -1, h, w).permute(0, 1, 3, 4, 2)  # ... x k
    logits = merge_prototype_scores(scores, head.merge)
    if head.logit_bias is not None:
        logits = logits + logits.new_tensor(head.logit_bias)[None, :, None, None]
    return logits


def _box_sum(x: Tensor, window: int) -> Tensor:
    """Sum over the odd ``window`` x ``window`` box centred on each pixel (zero outside), ... x h x w.

    Cumulative sums along each axis: linear in the pixels whatever the window.
    """
    pad = window // 2
    out = x.double()
    for dim in (-2, -1):
        n = out.shape[dim]
        padded = F.pad(out.movedim(dim, -1), (pad + 1, pad))  # one leading zero for the difference
        c = padded.cumsum(-1)
        out = (c[..., window : window + n] - c[..., :n]).movedim(-1, dim)
    return out


def _window_mean(x: Tensor, valid: Tensor, window: int) -> Tensor:
    """Mean of ``x`` (G x h x w) over the valid pixels of the window centred on each pixel.

    ``valid`` is bool, or float weights (e.g. the tissue fraction: a weighted mean).
    """
    window = max(1, int(window)) | 1  # odd: centred
    v = valid.to(torch.float64)
    num = _box_sum(x.double() * v, window)
    den = _box_sum(v, window)
    return (num / den.clamp_min(1e-12)).to(x.dtype)


def _window_any(x: Tensor, window: int) -> Tensor:
    """Whether any pixel of the odd ``window`` box centred on each pixel is set (C x h x w bool)."""
    window = max(1, int(window)) | 1
    return _box_sum(x.double(), window) > 0.5


@dataclass(frozen=True)
class SeamlessNorm:
    """The canvas-wide scale of :func:`seamless_scores`: per-stage and fused class extremes.

    Attributes:
        stage_lo, stage_hi: ``S x C`` min / max of each fused stage's raw class maps
            over the valid canvas pixels.
        fused_lo, fused_hi: ``C`` min / max of the weighted sum of the normalised stages.
    """

    stage_lo: Tensor
    stage_hi: Tensor
    fused_lo: Tensor
    fused_hi: Tensor


def _scale(maps: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Min-max normalise C x h x w maps with per-class extremes, clipped to [0, 1]."""
    lo, hi = lo[:, None, None].to(maps), hi[:, None, None].to(maps)
    return (maps - lo).div_((hi - lo).clamp_min(1e-6)).clamp_(0, 1)


def _extremes(maps: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (min, max) of C x h x w maps over the valid pixels (+inf / -inf: none)."""
    if not bool(valid.any()):
        c = maps.shape[0]
        return maps.new_full((c,), float("inf")), maps.new_full((c,), float("-inf"))
    # Invalid pixels take a valid pixel's value, then one min/max pass: no gather of the
    # valid pixels (maps[:, valid] copies them all) and one fill, not two.
    first = int(valid.flatten().nonzero()[0, 0])
    flat = maps.flatten(-2)
    filled = torch.where(valid.flatten(), flat, flat[:, first : first + 1])
    lo, hi = torch.aminmax(filled, dim=-1)
    return lo, hi


class SeamlessDecoder:
    """Stitched raw maps -> label scores, decided over the canvas, in row bands or whole.

    The canvas of a large slide need not be held at once: with the canvas split
    into row bands, :meth:`stage_extremes` over every band, then
    :meth:`fused_extremes` over every band, give the :class:`SeamlessNorm`, and
    :meth:`scores` decides one band from the band grown by :attr:`margin` rows
    each side (the gate's window needs them). The result equals deciding the
    whole canvas in one piece (:func:`seamless_scores`, the one-band case).

    Args:
        model: the model (its head's merge and logit bias, its layout).
        cfg: fuse weights, thresholds, ``bg_gamma``.
        window: the gate's field side in canvas pixels (made odd: centred).
        glass_fraction: glass-flag mean above which a pixel is glass.
    """

    def __init__(
        self,
        model: WSSSModel | GateHead,
        cfg: EvalConfig,
        window: int,
        glass_fraction: float = 0.5,
    ) -> None:
        self.head, self.cfg = GateHead.of(model), cfg
        self.layout = slide_layout(self.head, cfg)
        self.window = max(1, int(window)) | 1
        self.glass_fraction = glass_fraction
        c = self.layout.num_classes
        if cfg.cls_thresholds is not None and len(cfg.cls_thresholds) != c:
            raise ValueError(
                f"eval.cls_thresholds has {len(cfg.cls_thresholds)} values for {c} classes"
            )

    @property
    def margin(self) -> int:
        """Rows of context each side a band needs: the gate's window mean, then its spread."""
        return 2 * (self.window // 2)

    def _check(self, raw: Tensor) -> None:
        if raw.shape[0] != self.layout.channels:
            raise ValueError(
                f"raw maps have {raw.shape[0]} channels, the layout {self.layout.channels}"
            )

    def _stage(self, raw: Tensor, i: int) -> Tensor:
        c = self.layout.num_classes
        return raw[i * c : (i + 1) * c].float()

    def stage_extremes(self, raw: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``S x C`` (min, max) of every fused stage's raw maps on a band; combine with min / max."""
        self._check(raw)
        pairs = [_extremes(self._stage(raw, i), valid) for i in range(len(self.layout.stages))]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _fuse(self, raw: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        fused = None
        for i, wt in enumerate(self.layout.weights):
            term = wt * _scale(self._stage(raw, i), lo[i], hi[i])
            fused = term if fused is None else fused + term
        return fused

    def fused_extremes(
        self, raw: Tensor, valid: Tensor, stage_lo: Tensor, stage_hi: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``C`` (min, max) of the fused normalised stages on a band (given the stage extremes)."""
        self._check(raw)
        return _extremes(self._fuse(raw, stage_lo, stage_hi), valid)

    def scores(
        self,
        raw: Tensor,
        valid: Tensor,
        norm: SeamlessNorm,
        background: Tensor | None = None,
        rows: slice | None = None,
    ) -> Tensor:
        """Label scores ((C+1) x h x w) of ``raw[:, rows]``, decided with context ``raw``.

        Args:
            raw: K x h x w raw means of the band and its margin rows.
            valid: h x w bool, pixels some tile covered.
            norm: the canvas-wide scale.
            background: h x w bool forced to background (None: none).
            rows: the band's rows within ``raw`` (None: all).
        """
        self._check(raw)
        raw = raw.float()
        c, ns, g = self.layout.num_classes, len(self.layout.stages), self.layout.gate_channels
        rows = rows or slice(None)
        # the maps are needed on the band's rows only; the context rows feed the gate
        fused = _scale(
            self._fuse(raw[:, rows], norm.stage_lo, norm.stage_hi), norm.fused_lo, norm.fused_hi
        )
        if not bool(valid.any()):
            fused = torch.zeros_like(fused)
        gate_in = raw[c * ns : c * ns + g]
        weight = valid
        if self.head.tissue_pooling:
            # the head pools over tissue only: weight each cell by its non-glass share
            weight = valid.to(raw.dtype) * (1.0 - raw[-1].clamp(0, 1))
        pooled = _window_mean(gate_in, weight, self.window)
        probs = torch.sigmoid(gate_logits(self.head, pooled[None])[0])
        if self.cfg.cls_thresholds is not None:
            thr = probs.new_tensor(self.cfg.cls_thresholds)[:, None, None]
        else:
            thr = self.cfg.cls_threshold
        keep = _window_any((probs > thr) & valid[None], self.window)[:, rows]
        gated = fused * keep.to(fused.dtype)
        bg = (1.0 - gated.max(0, keepdim=True).values).clamp_min(0) ** self.cfg.bg_gamma
        scores = torch.cat([gated, bg], dim=0)[None]
        forced = ~valid[rows] | (raw[-1, rows] > self.glass_fraction)
        if background is not None:
            forced = forced | background[rows].to(forced.device)
        return force_background(scores, forced[None])[0]


def seamless_scores(
    raw: Tensor,
    valid: Tensor,
    model: WSSSModel,
    cfg: EvalConfig,
    window: int,
    *,
    background: Tensor | None = None,
    glass_fraction: float = 0.5,
) -> Tensor:
    """Stitched raw maps (K x h x w, :func:`slide_raw_maps` layout) -> label scores ((C+1) x h x w).

    1. Each fused stage's raw maps are min-max normalised over the whole canvas
       (the ``valid`` pixels), fused with the fuse weights and normalised again:
       one common scale for every tile.
    2. Gate per pixel: the classifier logit of the ``window`` x ``window`` field
       centred on every pixel (the head's pooling, merge and bias over that
       field); a class may appear at a pixel when some field of that size
       containing it passes ``eval.cls_threshold`` (or ``cls_thresholds``).
    3. Background channel ``(1 - max)^gamma``.
    4. Pixels whose glass fraction exceeds ``glass_fraction``, pixels in
       ``background`` (e.g. outside the tissue mask) and invalid pixels are
       background.

    The whole canvas as one band of :class:`SeamlessDecoder` (which decides a
    canvas too large to hold band by band, with the same result).

    Args:
        raw: blended means of the stitched tiles.
        valid: h x w bool, pixels some tile covered.
        model: the model (its head's merge and logit bias).
        cfg: fuse weights, thresholds, ``bg_gamma``.
        window: the gate's field side in canvas pixels (the training crop / ``eval.gate_window``).
        background: h x w bool forced to background (None: none).
        glass_fraction: glass-flag mean above which a pixel is glass.
    """
    decoder = SeamlessDecoder(model, cfg, window, glass_fraction)
    lo, hi = decoder.stage_extremes(raw, valid)
    flo, fhi = decoder.fused_extremes(raw, valid, lo, hi)
    return decoder.scores(raw, valid, SeamlessNorm(lo, hi, flo, fhi), background)
