"""What a model does to its input before the backbone: normalise, then rescale.

Every model in lpdseg takes RGB in [0, 1] (B x 3 x H x W); the statistics it
normalises with travel with it (buffers filled from the run's config, not
saved in the state dict, so checkpoints of any age load), and so does the
``input_scale`` resize. Callers never normalise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpdseg.config import Config
from lpdseg.models.pretrained import pretrained_cfg

log = logging.getLogger(__name__)


def rescale(images: Tensor, factor: float) -> Tensor:
    """Images resized by ``factor`` (bilinear); the input itself when the factor is 1."""
    if factor == 1.0:
        return images
    return F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)


class Preprocess(nn.Module):
    """RGB in [0, 1] -> ``(x - mean) / std``, resized by ``input_scale``.

    Normalisation comes first, as the data pipeline did before models owned it,
    so ``input_scale`` runs give the same numbers as before.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], input_scale: float = 1.0
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std need 3 values with std > 0, got {mean} / {std}")
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)
        self.input_scale = float(input_scale)

    def normalise(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> Tensor:
        return rescale(self.normalise(images), self.input_scale)


def model_statistics(config: Config) -> tuple[list[float], list[float]]:
    """The RGB mean/std a run's model normalises with (resolved into ``data.mean/std``).

    Raises:
        ValueError: the config has not been through the data pipeline's resolution.
    """
    d = config.data
    if d.mean is None or d.std is None:
        raise ValueError("data.mean/std are not resolved; build models from a prepared config")
    return list(d.mean), list(d.std)


def choose_statistics(config: Config, dataset_mean, dataset_std) -> tuple[list, list]:
    """The mean/std a new run's model normalises with.

    ``data.mean/std`` when set; else the pretrained weights' statistics from the
    weights table (no model built, no file read); else the dataset's.
    """
    d, m = config.data, config.model
    if d.mean is not None and d.std is not None:
        return list(d.mean), list(d.std)
    if m.weights:
        try:
            pre = pretrained_cfg(m.backbone, m.weights)
        except KeyError:  # an unknown pair: the backbone factory reports it
            pre = None
        if pre is not None and pre.mean is not None:
            log.info("normalising with the backbone's pretraining statistics (%s)", pre.source)
            return list(pre.mean), list(pre.std)
    return list(dataset_mean), list(dataset_std)
