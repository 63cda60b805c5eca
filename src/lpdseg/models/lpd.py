"""The weakly supervised model: backbone + head -> per-stage maps and logits."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import Tensor, nn

from lpdseg.config import Config
from lpdseg.data.glass import glass_mask
from lpdseg.models.backbones import build_backbone
from lpdseg.models.preprocess import Preprocess, model_statistics
from lpdseg.models.prototypes import CamHead, HeadOutput, PrototypeHead

log = logging.getLogger(__name__)


class WSSSModel(nn.Module):
    """RGB images -> head maps (docs/method.md LPD steps 1-3).

    Attributes:
        preprocess: normalisation + ``input_scale`` (see ``models.preprocess``).
        backbone: multi-scale feature extractor (see ``models.backbones``).
        head: :class:`PrototypeHead` (LPD/PBIP) or :class:`CamHead`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_scale: float = 1.0,
        tissue_pooling: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std, input_scale)
        self.backbone = backbone
        self.head = head
        # (brightness, spread) of the glass rule when logits pool over tissue pixels only
        self.tissue_pooling = tissue_pooling

    def pool_weight(self, images: Tensor) -> Tensor | None:
        """``B x 1 x H x W`` tissue weights of the logits' pooling (None: plain GAP)."""
        if self.tissue_pooling is None:
            return None
        glass = glass_mask(images.float(), *self.tissue_pooling)
        return (~glass)[:, None].to(images.dtype)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(
        self, images: Tensor, stages: tuple[int, ...] = (0, 1, 2, 3), inference_merge: str = "mean"
    ) -> HeadOutput:
        """Images (B x 3 x H x W, RGB in [0, 1]) -> maps and logits of ``stages``.

        With ``input_scale != 1`` the maps have ``input_scale`` times the resolution
        they would have at 1.
        """
        feats = self.backbone(self.preprocess(images))
        return self.head(
            feats,
            stages=stages,
            inference_merge=inference_merge,
            pool_weight=self.pool_weight(images),
        )


def build_model(
    config: Config,
    num_classes: int,
    embed_dim: int | None = None,
    bank: Tensor | None = None,
    *,
    load_weights: bool = True,
) -> WSSSModel:
    """Build the model a config describes.

    Args:
        config: the run config (``model`` section; ``data.mean/std`` must be resolved).
        num_classes: C, number of tissue classes.
        embed_dim: prototype space size D; falls back to ``config.model.embed_dim``,
            then the backbone's last-stage width.
        bank: fixed prototypes for ``head=pbip`` (C x k x D); read from
            ``model.bank`` when not given.
        load_weights: read ``model.weights`` (``False``: a checkpoint will supply
            every weight, so the pretrained file need not exist).
    """
    m = config.model
    backbone = build_backbone(
        m.backbone, weights=m.weights, last_stride=m.last_stride, load_weights=load_weights
    )
    if hasattr(backbone, "set_drop_path"):
        backbone.set_drop_path(m.drop_path)
    channels = tuple(backbone.stage_channels)
    if m.head == "cam":
        head: nn.Module = CamHead(num_classes, channels)
    else:
        dim = embed_dim or m.embed_dim or channels[-1]
        if m.head == "pbip":
            if bank is None:
                from lpdseg.models.bank import load_bank

                bank = load_bank(m.bank).prototypes
            dim = bank.shape[-1]
        head = PrototypeHead(
            num_classes,
            m.prototypes_per_class if bank is None else bank.shape[1],
            dim,
            channels,
            m.proj_hidden,
            m.scale_init,
            m.merge,
            bank=bank,
            logit_bias=m.logit_bias,
        )
    mean, std = model_statistics(config)
    glass = (config.eval.glass_brightness, config.eval.glass_spread)
    return WSSSModel(
        backbone,
        head,
        mean,
        std,
        input_scale=m.input_scale,
        tissue_pooling=glass if m.tissue_pooling else None,
    )


def needed_stages(
    weights: list[float] | tuple[float, ...], always: tuple[int, ...] = (3,)
) -> tuple[int, ...]:
    """Stages with a non-zero weight, plus ``always`` (stage 4 feeds the other losses)."""
    return tuple(sorted({i for i, w in enumerate(weights) if w} | set(always)))
