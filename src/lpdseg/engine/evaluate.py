"""Scoring a split: one confusion matrix per gate over all pixels, + boundary IoU.

The masks come from :mod:`lpdseg.models.decode`; every gate is scored from the
same forward pass of each image (and TTA view).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lpdseg.config import Config, EvalConfig
from lpdseg.io import atomic_write_json, atomic_write_text
from lpdseg.metrics import SegmentationMeter, format_table
from lpdseg.models.decode import decode_scores

log = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor, torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]


@torch.no_grad()
def evaluate_gates(
    model: torch.nn.Module,
    loader: Iterable[dict],
    cfg: EvalConfig,
    class_names: list[str],
    *,
    gates: Sequence[str] | None = None,
    tta: bool = True,
    limit: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "eval",
    scorer: Scorer | None = None,
) -> dict[str, dict]:
    """Score a split under each gate, one forward per image.

    Args:
        model: the model (switched to eval mode here).
        loader: yields dicts with ``image`` (B x 3 x H x W, RGB in [0, 1]),
            ``mask`` (B x H x W) and ``label`` (B x C); lists of per-image tensors
            are accepted for images of different sizes.
        cfg: evaluation settings.
        class_names: tissue class names.
        gates: ``labels`` and/or ``classifier`` (default: ``cfg.gate``).
        tta: use test-time augmentation.
        limit: stop after this many images.
        scorer: ``(image 1 x 3 x H x W, labels 1 x C, gates) -> {gate: scores}``;
            default: the whole image at once (:func:`lpdseg.models.decode.decode_scores`).
            ``lpdseg eval`` passes the inference layer's, which tiles large images.

    Returns:
        Per gate, the meter's results (see :class:`lpdseg.metrics.SegmentationMeter`)
        plus ``gate`` and ``images``.
    """
    gates = tuple(gates or (cfg.gate,))
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    meters = {
        g: SegmentationMeter(len(class_names), class_names, boundary_ratio=cfg.boundary_ratio)
        for g in gates
    }
    seen = 0
    bar = tqdm(total=limit, desc=desc, disable=not progress, leave=False, unit="img")
    for batch in loader:
        images, masks, labels = batch["image"], batch["mask"], batch["label"]
        if isinstance(images, torch.Tensor):
            images, masks, labels = [images], [masks], [labels]
        else:  # list of single images of different sizes
            images = [im[None] for im in images]
            masks = [m[None] for m in masks]
            labels = [lb[None] for lb in labels]
        for img, msk, lab in zip(images, masks, labels):
            img, lab = img.to(device), lab.to(device)
            if scorer is not None:
                scores = scorer(img, lab, gates)
            else:
                scores, _ = decode_scores(model, img, cfg, lab, gates, tta)
            for g in gates:
                meters[g].update(scores[g].argmax(1).cpu(), msk)
            seen += img.shape[0]
            bar.update(img.shape[0])
        if limit is not None and seen >= limit:
            break
    bar.close()
    model.train(was_training)
    results = {}
    for g in gates:
        res = meters[g].compute()
        res["gate"] = g
        res["images"] = seen
        results[g] = res
    return results


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict],
    cfg: EvalConfig,
    class_names: list[str],
    *,
    gate: str | None = None,
    **kwargs: Any,
) -> dict:
    """:func:`evaluate_gates` for one gate (default ``cfg.gate``); returns its results."""
    gate = gate or cfg.gate
    return evaluate_gates(model, loader, cfg, class_names, gates=(gate,), **kwargs)[gate]


def score_split(
    model: torch.nn.Module,
    cfg: Config,
    loader: Iterable[dict],
    split: str,
    *,
    gates: Sequence[str] = ("labels", "classifier"),
    tta: bool = True,
    progress: bool = True,
    out_dir: str | Path | None = None,
    source: str = "",
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """Score a split in each gate; optionally write ``<split>_metrics.{json,md}``.

    A stage-2 network needs no class gate: it is scored once, as ``seg``.
    """
    seg = cfg.train.task == "seg"
    per_gate = evaluate_gates(
        model,
        loader,
        cfg.eval,
        list(cfg.data.class_names),
        gates=("labels",) if seg else gates,
        tta=tta,
        progress=progress,
        desc=split,
        scorer=scorer,
    )
    if seg:
        per_gate = {"seg": {**per_gate["labels"], "gate": "seg"}}
    results: dict[str, Any] = {"checkpoint": source, "split": split, **per_gate}
    tables = [
        f"### {split}, {g} gate ({res['images']} images)\n\n{format_table(res)}"
        for g, res in per_gate.items()
    ]
    results["table"] = "\n\n".join(tables)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(
            out / f"{split}_metrics.json", {k: v for k, v in results.items() if k != "table"}
        )
        atomic_write_text(out / f"{split}_metrics.md", results["table"] + "\n")
    return results
