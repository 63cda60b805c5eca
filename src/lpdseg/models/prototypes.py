"""Prototype heads: per-stage prototype activation maps, class maps and logits.

docs/method.md, LPD steps 1-3. Prototypes ``P`` (C x k x D) live in the frozen
encoder's space; a small MLP per backbone stage projects them to that stage's
channels, and every pixel is compared with every projected prototype by a
scaled cosine similarity. Everything is one einsum per stage: no loop over
classes or prototypes.

Three heads share one output structure (:class:`HeadOutput`):

- :class:`PrototypeHead` with ``learnable=True`` -- LPD;
- :class:`PrototypeHead` with a fixed bank -- PBIP (only the projections train);
- :class:`CamHead` -- a plain CAM baseline (1x1 conv classifier per stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class HeadOutput:
    """What a head returns for a batch.

    Attributes:
        proto_maps: per stage, ``A_i`` (B x C x k x H_i x W_i) scaled cosines,
            or ``None`` for stages not computed / heads without prototypes.
        class_maps: per stage, ``M_i`` (B x C x H_i x W_i), or ``None``.
        logits: per stage, ``y_hat_i`` (B x C), or ``None``.
    """

    proto_maps: list[Tensor | None]
    class_maps: list[Tensor | None]
    logits: list[Tensor | None]


def merge_prototype_scores(scores: Tensor, merge: str) -> Tensor:
    """Merge sub-prototype scores (... x k) into one score per class (...).

    ``mean`` averages; ``softmax`` weights each score by its softmax over the
    class's prototypes (how the public code forms class logits).
    """
    if merge == "mean":
        return scores.mean(-1)
    weights = torch.softmax(scores, dim=-1)
    return (weights * scores).sum(-1)


def pool_maps(maps: Tensor, weight: Tensor | None) -> Tensor:
    """Global pooling of ``B x ... x H x W`` maps: the mean, or the ``weight``-ed mean.

    ``weight`` (``B x 1 x H0 x W0``, e.g. the tissue fraction of the input pixels) is
    area-resized to the maps; an image whose weights sum to ~0 (all glass) falls back
    to the plain mean.
    """
    plain = maps.mean((-2, -1))
    if weight is None:
        return plain
    w = F.interpolate(weight.to(maps.dtype), size=maps.shape[-2:], mode="area")[:, 0]
    total = w.sum((-2, -1))  # B
    shape = (w.shape[0],) + (1,) * (maps.dim() - 3)
    w = w.reshape(w.shape[0], *(1,) * (maps.dim() - 3), *w.shape[-2:])
    weighted = (maps * w).sum((-2, -1)) / total.clamp_min(1e-6).reshape(shape)
    return torch.where((total > 1e-6).reshape(shape), weighted, plain)


class PrototypeHead(nn.Module):
    """Learnable (LPD) or fixed-bank (PBIP) prototypes with per-stage projections.

    Args:
        num_classes: C.
        prototypes_per_class: k.
        embed_dim: D, the prototype space (the frozen encoder's embedding size).
        stage_channels: channels of the four backbone stages.
        proj_hidden: hidden width of the projection MLPs (256 in the paper).
        scale_init: initial cosine scale ``s`` (1/0.07).
        merge: ``mean`` or ``softmax`` merge of sub-prototype scores into logits.
        bank: fixed prototypes (C x k x D) for PBIP; ``None`` for learnable ones
            initialised N(0, 1).
        logit_bias: add a learnable bias per stage and class to the logits (the
            maps are unchanged).
    """

    def __init__(
        self,
        num_classes: int,
        prototypes_per_class: int,
        embed_dim: int,
        stage_channels: tuple[int, ...],
        proj_hidden: int = 256,
        scale_init: float = 1 / 0.07,
        merge: str = "softmax",
        bank: Tensor | None = None,
        logit_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.prototypes_per_class = prototypes_per_class
        self.embed_dim = embed_dim
        self.merge = merge
        shape = (num_classes, prototypes_per_class, embed_dim)
        if bank is None:
            self.prototypes = nn.Parameter(torch.randn(shape))
        else:
            if tuple(bank.shape) != shape:
                raise ValueError(f"bank has shape {tuple(bank.shape)}, head expects {shape}")
            self.register_buffer("prototypes", bank.detach().clone().float())
        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Linear(embed_dim, proj_hidden), nn.ReLU(inplace=True), nn.Linear(proj_hidden, c)
            )
            for c in stage_channels
        )
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        # cosine maps are bounded and have no offset: without a bias, an absent class can
        # only get a low logit by anti-aligning every pixel, which a 1x1-conv CAM gets for free
        self.logit_bias = (
            nn.Parameter(torch.zeros(len(stage_channels), num_classes)) if logit_bias else None
        )

    @property
    def learnable(self) -> bool:
        return isinstance(self.prototypes, nn.Parameter)

    def projected(self, stage: int) -> Tensor:
        """``P_i``: prototypes projected to stage ``stage``'s channels (C x k x C_i)."""
        return self.projections[stage](self.prototypes)

    def stage_maps(self, feat: Tensor, stage: int) -> Tensor:
        """``A_i(p, c, j) = s * cos(F_i(p), P_i(c, j))`` -> B x C x k x H x W."""
        protos = F.normalize(self.projected(stage), dim=-1)  # C x k x C_i
        feat = F.normalize(feat, dim=1)  # B x C_i x H x W
        return self.scale * torch.einsum("bdhw,ckd->bckhw", feat, protos.to(feat.dtype))

    def forward(
        self,
        feats: list[Tensor],
        stages: tuple[int, ...] = (0, 1, 2, 3),
        inference_merge: str = "mean",
        pool_weight: Tensor | None = None,
    ) -> HeadOutput:
        """Maps and logits for the requested stages (others are ``None``).

        Args:
            feats: the backbone's four feature maps.
            stages: which stages to compute (stage weights of 0 need none).
            inference_merge: ``mean`` (training definition) or ``softmax``-over-j
                weighted class maps (docs/method.md's inference switch).
            pool_weight: ``B x 1 x H x W`` weights of the input pixels in the logits'
                pooling (:func:`pool_maps`; tissue pooling); None: plain GAP.
        """
        n = len(feats)
        proto_maps: list[Tensor | None] = [None] * n
        class_maps: list[Tensor | None] = [None] * n
        logits: list[Tensor | None] = [None] * n
        for i in stages:
            a = self.stage_maps(feats[i], i)  # B x C x k x H x W
            proto_maps[i] = a
            if inference_merge == "softmax":
                w = torch.softmax(a, dim=2)
                class_maps[i] = (w * a).sum(2)
            else:
                class_maps[i] = a.mean(2)
            scores = pool_maps(a, pool_weight)  # B x C x k: GAP of every prototype map
            logits[i] = merge_prototype_scores(scores, self.merge)
            if self.logit_bias is not None:
                logits[i] = logits[i] + self.logit_bias[i]
        return HeadOutput(proto_maps, class_maps, logits)

    def window_logits(self, out: HeadOutput, stage: int, kernel: int, stride: int) -> Tensor:
        """Logits of every kernel x kernel window of stage ``stage``'s maps (B x C x n).

        The logit computed as in :meth:`forward` (GAP, merge, bias) but over each
        window instead of the whole map; a window covering the map gives ``logits``.
        """
        a = out.proto_maps[stage].float()  # B x C x k x H x W
        b, c, k = a.shape[:3]
        pooled = F.avg_pool2d(a.flatten(1, 2), kernel, stride)  # B x Ck x h' x w'
        scores = pooled.reshape(b, c, k, -1).transpose(2, 3)  # B x C x n x k
        logits = merge_prototype_scores(scores, self.merge)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias[stage][:, None]
        return logits


class CamHead(nn.Module):
    """CAM baseline: a 1x1 conv classifier per stage; class maps = its outputs."""

    def __init__(self, num_classes: int, stage_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classifiers = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in stage_channels)

    def forward(
        self,
        feats: list[Tensor],
        stages: tuple[int, ...] = (0, 1, 2, 3),
        inference_merge: str = "mean",
        pool_weight: Tensor | None = None,
    ) -> HeadOutput:
        n = len(feats)
        class_maps: list[Tensor | None] = [None] * n
        logits: list[Tensor | None] = [None] * n
        for i in stages:
            m = self.classifiers[i](feats[i])  # B x C x H x W
            class_maps[i] = m
            logits[i] = pool_maps(m, pool_weight)
        return HeadOutput([None] * n, class_maps, logits)

    def window_logits(self, out: HeadOutput, stage: int, kernel: int, stride: int) -> Tensor:
        """Logits of every kernel x kernel window of stage ``stage``'s maps (B x C x n)."""
        return F.avg_pool2d(out.class_maps[stage].float(), kernel, stride).flatten(2)
