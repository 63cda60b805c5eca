"""Load a checkpoint anywhere: the architecture from its own config, weights from it.

A checkpoint is self-contained: the model is rebuilt without reading the
pretrained-weights file the run started from (``model.weights`` may name a
file on another machine), then every tensor is loaded from the checkpoint
through :func:`lpdseg.models.weights.load_into`, whose report lists missing,
unexpected and mismatched keys when they do not fit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lpdseg.config import Config, config_from_dict
from lpdseg.engine.checkpoint import load_checkpoint
from lpdseg.engine.distributed import resolve_device
from lpdseg.errors import CheckpointError
from lpdseg.models.lpd import build_model
from lpdseg.models.segnet import build_segnet
from lpdseg.models.weights import load_into

log = logging.getLogger(__name__)

__all__ = ["load_model", "resolve_device"]


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild a model from a checkpoint's own config and load its weights.

    Args:
        path: a ``best.pt``/``last.pt`` written by ``lpdseg train``.
        device: where the model goes.

    Returns:
        The model in eval mode and the config it was trained with.

    Raises:
        CheckpointError: unreadable file, or weights that do not fit the config
            (the message lists the keys that do not fit).
    """
    ckpt = load_checkpoint(path, map_location=device)
    cfg = config_from_dict(ckpt["config"])
    names = cfg.data.class_names
    if not names:
        raise CheckpointError(f"{path} has no class names in its config")
    if cfg.train.task == "seg":
        model: nn.Module = build_segnet(cfg, len(names), load_weights=False)
    else:
        bank = ckpt["model"].get("head.prototypes") if cfg.model.head == "pbip" else None
        if cfg.model.head == "pbip" and bank is None:
            raise CheckpointError(f"{path}: a PBIP checkpoint without its prototype bank")
        model = build_model(cfg, len(names), bank=bank, load_weights=False)
    load_into(model, ckpt["model"], strict=True, source=str(path))
    return model.to(device).eval(), cfg
