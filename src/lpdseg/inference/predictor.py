"""A trained model as a function of RGB images: scores and masks at any size.

:class:`Predictor` is what ``eval`` at full size, ``predict``, ``report`` and
``slide`` use: RGB in [0, 1] (or uint8) in, per-label scores (classes, then
background) or an index mask out. Images up to ``eval.max_side`` go through
the model whole; larger ones by the one sliding-window path, overlapping
tiles blended by a smooth window.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lpdseg.config import Config, EvalConfig
from lpdseg.errors import ConfigError
from lpdseg.inference.loading import load_model, resolve_device
from lpdseg.models.decode import (
    SeamlessDecoder,
    predict_scores,
    seamless_scores,
    slide_layout,
    slide_raw_maps,
)
from lpdseg.models.lpd import WSSSModel


class Predictor:
    """Scores and masks of a model on RGB images.

    Args:
        model: a loaded model (see :func:`lpdseg.inference.load_model`).
        cfg: the config it was trained with (class names, colours, ``eval``).
        tta: test-time augmentation.
        threshold: classifier-gate probability threshold (default: the config's).
        gate: ``classifier`` (no labels needed) or ``labels`` (with ``labels=``).
        device: where the model runs (default: where its weights are).
        batch_size: tiles per forward for large images.

    Raises:
        ConfigError: ``threshold`` outside [0, 1], ``batch_size`` < 1 or an
            unknown ``gate``; the message names the value and the command flag.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        *,
        tta: bool = False,
        threshold: float | None = None,
        gate: str = "classifier",
        device: torch.device | None = None,
        batch_size: int = 8,
    ) -> None:
        _check_options(threshold, batch_size, gate)
        self.model = model.eval()
        self.cfg = cfg
        self.eval_cfg = (
            cfg.eval
            if threshold is None
            else dataclasses.replace(cfg.eval, cls_threshold=threshold)
        )
        self.tta = tta
        self.gate = gate
        self.device = device or next(model.parameters()).device
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", **kwargs) -> Predictor:
        """Load ``path`` on ``device`` (``auto``: CUDA when available) and wrap it."""
        dev = resolve_device(device)
        model, cfg = load_model(path, dev)
        return cls(model, cfg, device=dev, **kwargs)

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg.data.class_names)

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [tuple(int(v) for v in c[:3]) for c in self.cfg.data.colors]

    @property
    def num_labels(self) -> int:
        """Classes + background."""
        return len(self.class_names) + 1

    @torch.no_grad()
    def __call__(self, tiles: Tensor, labels: Tensor | None = None) -> Tensor:
        """RGB tiles in [0, 1] (B x 3 x h x w) -> label scores (B x L x h x w) on the CPU."""
        lab = None if labels is None else labels.to(self.device)
        return predict_scores(
            self.model,
            tiles.to(self.device).float(),
            self.eval_cfg,
            lab,
            gate=self.gate,
            tta=self.tta,
        ).cpu()

    # ------------------------------------------------------------ slide scoring
    @property
    def supports_seamless(self) -> bool:
        """Whether :meth:`slide_raw` exists for this model (prototype / CAM heads).

        Stage-2 networks give per-pixel softmax scores, already comparable across
        tiles: their slides use ``__call__``.
        """
        return isinstance(self.model, WSSSModel)

    @property
    def slide_channels(self) -> int:
        """K, channels of :meth:`slide_raw` (see ``decode.SlideLayout``)."""
        return slide_layout(self.model, self.eval_cfg).channels

    @property
    def gate_window_px(self) -> int:
        """Side (model input px) of the field the slide gate pools (:func:`gate_window_px`)."""
        return gate_window_px(self.eval_cfg, self.cfg)

    @torch.no_grad()
    def slide_raw(self, tiles: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """RGB tiles in [0, 1] (B x 3 x h x w) -> stitchable raw maps (B x K x h x w) on the CPU.

        Nothing in them is normalised or gated per tile (``decode.slide_raw_maps``);
        :meth:`finish_slide` turns the stitched canvas into label scores.
        ``size``: the maps at that ``(h', w')`` instead (e.g. the slide canvas's
        cells; ``stitch_slide`` asks for them through ``predict_cells``).
        """
        return slide_raw_maps(
            self.model, tiles.to(self.device).float(), self.eval_cfg, tta=self.tta, size=size
        ).cpu()

    def _require_classifier_gate(self) -> None:
        if self.gate == "labels":
            raise ConfigError("slide scoring uses the classifier gate (no labels on a slide)")

    def seamless_decoder(self, window: int) -> SeamlessDecoder:
        """The decoder that turns a stitched canvas (whole or in row bands) into label scores.

        Args:
            window: the gate field in canvas pixels (:attr:`gate_window_px` rescaled).

        Raises:
            ConfigError: the predictor gates with labels (a slide has none).
        """
        self._require_classifier_gate()
        return SeamlessDecoder(self.model, self.eval_cfg, window)

    @torch.no_grad()
    def finish_slide(
        self, raw: Tensor, valid: Tensor, window: int, background: Tensor | None = None
    ) -> Tensor:
        """Stitched raw maps (K x h x w) -> label scores (L x h x w) (``decode.seamless_scores``).

        Args:
            raw: blended means of :meth:`slide_raw` over the canvas.
            valid: h x w bool, canvas pixels some tile covered.
            window: the gate field in canvas pixels (:attr:`gate_window_px` rescaled).
            background: h x w bool forced to background (e.g. not tissue).
        """
        self._require_classifier_gate()
        dev = self.device
        out = seamless_scores(
            raw.to(dev),
            valid.to(dev),
            self.model,
            self.eval_cfg,
            window,
            background=None if background is None else background.to(dev),
        )
        return out.cpu()

    def scores(self, image: np.ndarray, progress: bool = False) -> Tensor:
        """One ``H x W x 3`` uint8 RGB image -> label scores (L x H x W)."""
        return image_scores(
            image, self, self.eval_cfg, self.num_labels, self.batch_size, progress=progress
        )

    def mask(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        """One ``H x W x 3`` uint8 RGB image -> index mask (H x W uint8, background = C)."""
        return self.scores(image, progress).argmax(0).numpy().astype(np.uint8)


def gate_window_px(eval_cfg: EvalConfig, cfg: Config) -> int:
    """Side (model input px) of the field a slide's classifier gate pools: ``eval.gate_window``,
    else the training crop (the size the classifier is calibrated for)."""
    return int(eval_cfg.gate_window or cfg.data.crop_size)


def _check_options(threshold: float | None, batch_size: int, gate: str) -> None:
    """Refuse option values that would run and give a wrong (or no) answer."""
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise ConfigError(f"threshold={threshold!r} must be a number in [0, 1] (--threshold)")
        if not 0.0 <= float(threshold) <= 1.0:  # also refuses NaN
            raise ConfigError(
                f"threshold={float(threshold):g} must be in [0, 1] (--threshold): it is the class "
                "probability above which a class is kept"
            )
    whole = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not whole or batch_size < 1:
        raise ConfigError(
            f"batch_size={batch_size!r} must be a whole number >= 1 (--batch-size): tiles per "
            "forward pass"
        )
    if gate not in ("classifier", "labels"):
        raise ConfigError(f"gate={gate!r} must be 'classifier' or 'labels'")


def image_scores(
    image: np.ndarray,
    predict_fn: Callable[[Tensor], Tensor],
    cfg: EvalConfig,
    num_labels: int,
    batch_size: int = 8,
    progress: bool = False,
) -> Tensor:
    """Label scores (L x H x W) of one uint8 RGB image: whole, or by sliding window.

    Images up to ``cfg.max_side`` go through ``predict_fn`` (RGB in [0, 1],
    B x 3 x h x w -> B x L x h x w) at once; larger ones by overlapping
    ``cfg.tile`` windows blended smoothly (``cfg.overlap``).
    """
    h, w = image.shape[:2]
    if max(h, w) <= cfg.max_side:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        return predict_fn(t / 255.0)[0]
    from lpdseg.inference.sliding import sliding_window_predict

    return sliding_window_predict(
        image,
        predict_fn,
        num_labels,
        tile=cfg.tile,
        overlap=cfg.overlap,
        batch_size=batch_size,
        progress=progress,
    )
