"""Stage-2 network: any registered backbone + SegFormer-style all-MLP decoder.

Fully supervised on pseudo masks (docs/method.md, PBIP stage 2; the paper uses
DeepLab-v2, any solid segmentation net is acceptable). Each stage's features
are mapped to ``decoder_dim`` channels by a 1x1 projection, upsampled to the
stage-1 resolution, concatenated, fused by 1x1 conv + BN + ReLU and classified
into C + 1 labels (background last); logits are upsampled to the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpdseg.config import Config
from lpdseg.models.backbones import build_backbone
from lpdseg.models.preprocess import Preprocess, model_statistics


class MLPDecoder(nn.Module):
    """All-MLP decoder over four feature maps."""

    def __init__(
        self,
        stage_channels: tuple[int, ...],
        num_labels: int,
        decoder_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, decoder_dim, 1) for c in stage_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_dim * len(stage_channels), decoder_dim, 1, bias=False),
            nn.BatchNorm2d(decoder_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(decoder_dim, num_labels, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        ups = [
            F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
            for p, f in zip(self.proj, feats)
        ]  # 4 x (B x D x H/4 x W/4)
        return self.classifier(self.dropout(self.fuse(torch.cat(ups, dim=1))))


class SegNet(nn.Module):
    """RGB images -> B x (C + 1) x H x W logits: backbone + MLP decoder."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        mean,
        std,
        decoder_dim: int = 256,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std, input_scale)
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder = MLPDecoder(tuple(backbone.stage_channels), num_classes + 1, decoder_dim)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.decoder(self.backbone(self.preprocess(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_segnet(config: Config, num_classes: int, *, load_weights: bool = True) -> SegNet:
    """Stage-2 network of a config (``model.backbone``, ``model.weights``, ``data.mean/std``)."""
    m = config.model
    backbone = build_backbone(
        m.backbone, weights=m.weights, last_stride=m.last_stride, load_weights=load_weights
    )
    mean, std = model_statistics(config)
    return SegNet(backbone, num_classes, mean, std, input_scale=m.input_scale)
