"""Frozen encoders for the similarity loss and the PBIP bank: the shared base.

An encoder takes RGB images in [0, 1], like every model in lpdseg, and
normalises them with its own pretraining statistics. The registry that builds
one by name is :mod:`lpdseg.models.encoders`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class FrozenEncoder(nn.Module):
    """Base: a frozen network fed RGB in [0, 1], normalised with its own statistics.

    Args:
        model_mean, model_std: the trained model's statistics, used when the
            encoder has none of its own (an EMA copy of the model's backbone).
        enc_mean, enc_std: the encoder's pretraining statistics.
    """

    name = "base"
    random_weights = False

    def __init__(self, model_mean, model_std, enc_mean=None, enc_std=None) -> None:
        super().__init__()
        mean = model_mean if enc_mean is None else enc_mean
        std = model_std if enc_std is None else enc_std
        self.register_buffer("_mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)

    def renormalise(self, images: Tensor) -> Tensor:
        """RGB in [0, 1] -> the encoder's input (same arithmetic as the model's own)."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

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
