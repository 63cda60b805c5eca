"""Backbone registry: name -> factory returning a multi-scale feature extractor.

Every backbone is an ``nn.Module`` whose ``forward(x)`` returns a list of four
feature maps ``[F_1, F_2, F_3, F_4]`` (B x C_i x H_i x W_i) of its input
(normalised as ``pretrained_cfg`` says) and which carries:

- ``stage_channels``: tuple of the four C_i,
- ``stage_strides``: tuple of the four output strides w.r.t. the input,
- ``pretrained_cfg``: a :class:`~lpdseg.models.pretrained.PretrainedCfg`.

The same facts are in :mod:`lpdseg.models.pretrained` for code that must not
build a model to know them. Factories are imported lazily so that a user of one
backbone never pays for the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from lpdseg.catalog import BACKBONES
from lpdseg.errors import ConfigError

# name -> (module, factory function), in lpdseg.catalog. Each factory has the signature
# ``factory(weights=None, last_stride=1, *, load_weights=True) -> nn.Module``.


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    last_stride: int = 1,
    *,
    load_weights: bool = True,
) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: registry name, e.g. ``"mit_b1"`` or ``"efficientnet_lite0"``.
        weights: ``None`` for random init, a local checkpoint path, or a
            backbone-specific keyword such as ``"imagenet"``.
        last_stride: stride of the last stage's downsampling (1 keeps stage 4
            at the resolution of stage 3, as docs/method.md uses).
        load_weights: ``False`` builds the architecture ``weights`` describes
            (same layers, same frozen BatchNorm, same ``pretrained_cfg``)
            without reading the weights: what loading a checkpoint needs.

    Returns:
        The backbone module.

    Raises:
        ConfigError: if the name is unknown.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    module_name, factory_name = BACKBONES[name]
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(weights=weights, last_stride=last_stride, load_weights=load_weights)
