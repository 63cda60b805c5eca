"""Frozen encoder from a local Hugging Face checkpoint (``loss.encoder=hf:<folder>``).

Loads a CLIP / PLIP / DINOv2 / ViT vision model that the user has on disk with
``transformers`` (the optional extra ``lpdseg[hf]``), strictly offline: the
Hub is never contacted (``HF_HUB_OFFLINE=1``, ``local_files_only=True``).

What each family gives:

=====================  ==========================================  ============================
family (model_type)    ``dense`` (B x D x h x w, patch tokens)     ``embed`` (B x D)
=====================  ==========================================  ============================
``clip`` (PLIP too)    vision tower tokens -> post-layernorm ->    ``image_embeds``: projected
                       visual projection (the space of            post-layernormed CLS token
                       ``image_embeds``, as MaskCLIP uses them)   (pooler -> projection)
``dinov2``,            layernormed patch tokens (register tokens   layernormed CLS token
``dinov2_with_regs``   dropped)                                    (the model's ``pooler_output``)
``vit``                layernormed patch tokens                    layernormed CLS token (what
                                                                   ViT's classifier reads)
=====================  ==========================================  ============================

``dense`` and ``embed`` live in the same D-dimensional space, so fg/bg pooled
dense features, image embeddings and PBIP bank prototypes can be compared.
Inputs are resized to a multiple of the patch size and the position
embeddings interpolated where the model supports it.

The normalisation is the checkpoint's own (``image_mean`` / ``image_std`` of
its ``preprocessor_config.json``; the family's published default when the file
is missing, with a warning).

Random weights: a checkpoint whose weights are a fresh initialisation is
flagged (``random_weights``) so :func:`lpdseg.models.encoders.build_encoder`
can refuse it for the similarity loss. Two signs are checked: most parameters
missing from the files (``transformers`` then initialises them), or every
LayerNorm still at its initial value (weight 1, bias 0), which no trained
transformer keeps.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpdseg.errors import CheckpointError, ConfigError
from lpdseg.models.frozen_encoder import FrozenEncoder

log = logging.getLogger(__name__)

# Published preprocessing of each family (used when preprocessor_config.json is absent).
_DEFAULT_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dinov2_with_registers": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
SUPPORTED = tuple(_DEFAULT_STATS)


def _import_transformers():
    # the offline switches are read when huggingface_hub is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "loss.encoder=hf:<folder> needs the optional dependency transformers; "
            "install it with `pip install lpdseg[hf]` (or `pip install transformers`)"
        ) from exc
    return transformers


def read_preprocessor_stats(
    folder: str | Path, model_type: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """RGB mean/std (0-1 units) of a checkpoint folder's ``preprocessor_config.json``.

    Args:
        folder: checkpoint folder.
        model_type: the config's ``model_type`` (for the fallback).

    Returns:
        ``(mean, std)``; the family's published default when the file is missing.

    Raises:
        CheckpointError: the file exists but is not valid JSON or has bad values.
    """
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        mean, std = _DEFAULT_STATS[model_type]
        log.warning(
            "%s not found; using the %s default normalisation mean=%s std=%s",
            path,
            model_type,
            mean,
            std,
        )
        return mean, std
    try:
        values = json.loads(path.read_text())
        mean = tuple(float(v) for v in values["image_mean"])
        std = tuple(float(v) for v in values["image_std"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: cannot read image_mean/image_std ({exc.__class__.__name__}: {exc}); "
            "fix the file or delete it to use the family's default"
        ) from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"{path}: image_mean/image_std need 3 values each, std > 0")
    return mean, std


def looks_untrained(module: nn.Module) -> bool:
    """True when every LayerNorm of ``module`` is still at weight 1, bias 0 (fresh init)."""
    norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None]
    if not norms:
        return False
    for m in norms:
        if not torch.all(m.weight == 1):
            return False
        if m.bias is not None and not torch.all(m.bias == 0):
            return False
    return True


class HFEncoder(FrozenEncoder):
    """A frozen vision transformer from a local ``transformers`` checkpoint folder.

    Args:
        folder: folder with ``config.json``, the weights (``model.safetensors``
            or ``pytorch_model.bin``) and optionally ``preprocessor_config.json``.
        model_mean: RGB mean the model's input images were normalised with.
        model_std: RGB std the model's input images were normalised with.

    Raises:
        ConfigError: ``transformers`` missing, or an unsupported model type.
        CheckpointError: the folder or its files cannot be loaded.
    """

    def __init__(self, folder: str | Path, model_mean, model_std) -> None:
        transformers = _import_transformers()
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"hf encoder folder {folder} has no config.json; point loss.encoder=hf:<folder> "
                "at a checkpoint saved with save_pretrained (config.json + weights)"
            )
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{folder}: cannot read the transformers config ({exc})"
            ) from None
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ConfigError(
                f"{folder}: model_type {model_type!r} is not supported by loss.encoder=hf:; "
                f"supported: {', '.join(SUPPORTED)} (CLIP and PLIP are model_type 'clip')"
            )
        mean, std = read_preprocessor_stats(folder, model_type)
        super().__init__(model_mean, model_std, mean, std)
        try:
            model, info = transformers.AutoModel.from_pretrained(
                folder, local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{folder}: cannot load the weights ({exc})") from None
        self.name = f"hf:{folder}"
        self.folder = folder
        self.model_type = model_type
        if model_type == "clip":
            # the vision tower and its projection only; the text tower is not needed
            self.vision = model.vision_model
            self.projection: nn.Module | None = model.visual_projection
            self.post_norm: nn.Module | None = model.vision_model.post_layernorm
            self.embed_dim = int(config.projection_dim)
            vision_cfg = config.vision_config
        else:
            self.vision = model
            self.projection = None
            self.post_norm = None
            self.embed_dim = int(config.hidden_size)
            vision_cfg = config
        self.patch_size = int(vision_cfg.patch_size)
        del model
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)
        n_params = sum(1 for _ in self.state_dict())
        missing = len(info.get("missing_keys", ()))
        unexpected = len(info.get("unexpected_keys", ()))
        mismatched = len(info.get("mismatched_keys", ()))
        if missing or unexpected or mismatched:
            log.warning(
                "%s: %d missing, %d unexpected, %d mismatched keys while loading",
                folder,
                missing,
                unexpected,
                mismatched,
            )
        self.random_weights = missing > n_params // 2 or looks_untrained(self)
        log.info(
            "hf encoder %s: %s, D=%d, patch %d, mean=%s std=%s%s",
            folder,
            model_type,
            self.embed_dim,
            self.patch_size,
            tuple(round(v, 4) for v in mean),
            tuple(round(v, 4) for v in std),
            " (weights look randomly initialised)" if self.random_weights else "",
        )

    def _tokens(self, images: Tensor) -> tuple[Tensor, Tensor, int, int]:
        """Renormalised images -> (all tokens B x N x W, pooled B x W, grid h, grid w)."""
        p = self.patch_size
        h, w = images.shape[-2:]
        gh, gw = max(1, round(h / p)), max(1, round(w / p))
        if (gh * p, gw * p) != (h, w):
            images = F.interpolate(
                images, size=(gh * p, gw * p), mode="bilinear", align_corners=False
            )
        kwargs = {}
        if self.model_type in ("clip", "vit"):
            kwargs["interpolate_pos_encoding"] = True  # DINOv2 always interpolates
        out = self.vision(pixel_values=images, **kwargs)
        tokens = out.last_hidden_state
        if self.model_type == "clip":
            pooled = out.pooler_output  # post-layernormed CLS
        else:
            # layernormed CLS: DINOv2's pooler_output, what ViT's classifier reads
            pooled = tokens[:, 0]
        return tokens, pooled, gh, gw

    def embed(self, images: Tensor) -> Tensor:
        """Pooled embedding (B x D) in the model's own way (CLIP ``image_embeds``, CLS token)."""
        _, pooled, _, _ = self._tokens(self.renormalise(images))
        if self.projection is not None:
            pooled = self.projection(pooled)
        return pooled

    def _features(self, images: Tensor) -> Tensor:
        tokens, _, gh, gw = self._tokens(images)
        patches = tokens[:, tokens.shape[1] - gh * gw :]  # drop CLS (and register) tokens
        if self.post_norm is not None:
            patches = self.post_norm(patches)
        if self.projection is not None:
            patches = self.projection(patches)
        b, _, d = patches.shape
        return patches.transpose(1, 2).reshape(b, d, gh, gw)
