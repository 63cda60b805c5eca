"""Backbone registry: name -> factory returning a multi-scale feature extractor.

Every backbone is an ``nn.Module`` whose ``forward(x)`` returns a list of four
feature maps ``[F_1, F_2, F_3, F_4]`` (B x C_i x H_i x W_i) and which carries:

- ``stage_channels``: tuple of the four C_i,
- ``stage_strides``: tuple of the four output strides w.r.t. the input,
- ``pretrained_cfg``: a :class:`PretrainedCfg` (``None`` weights = random init).

Factories are imported lazily so that a user of one backbone never pays for
the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lpdseg.errors import ConfigError


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a backbone's weights came from and how its inputs were normalised.

    Attributes:
        source: ``"random"``, a file path, or a package name.
        mean: RGB mean the weights were trained with (``None``: use the dataset's).
        std: RGB std the weights were trained with (``None``: use the dataset's).
        licence: licence of the weights, for the record.
    """

    source: str = "random"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    licence: str = ""


# name -> (module, factory function). Each factory has the signature
# ``factory(weights: str | Path | None = None, last_stride: int = 1) -> nn.Module``.
BACKBONES: dict[str, tuple[str, str]] = {
    **{f"mit_b{i}": ("lpdseg.models.mit", f"mit_b{i}") for i in range(6)},
    "efficientnet_lite0": ("lpdseg.models.efficientnet_lite", "efficientnet_lite0"),
}


def build_backbone(name: str, weights: str | Path | None = None, last_stride: int = 1) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: registry name, e.g. ``"mit_b1"`` or ``"efficientnet_lite0"``.
        weights: ``None`` for random init, a local checkpoint path, or a
            backbone-specific keyword such as ``"imagenet"``.
        last_stride: stride of the last stage's downsampling (1 keeps stage 4
            at the resolution of stage 3, as METHOD.md uses).

    Returns:
        The backbone module.

    Raises:
        ConfigError: if the name is unknown.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    module_name, factory_name = BACKBONES[name]
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(weights=weights, last_stride=last_stride)
