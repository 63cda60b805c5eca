"""``lpdseg eval``: a checkpoint's metrics on a split, in every gate from one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpdseg.config import GATES, apply_overrides, config_from_dict
from lpdseg.data.loaders import make_eval_loader, resolve_data
from lpdseg.engine.evaluate import score_split
from lpdseg.errors import ConfigError
from lpdseg.inference.loading import load_model, resolve_device


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    eval_overrides: list[str] | None = None,
    gates: tuple[str, ...] = GATES,
    tta: bool = True,
    progress: bool = True,
    out_dir: str | Path | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on a split in each gate; write JSON + Markdown tables.

    Args:
        path: checkpoint.
        split: ``val`` or ``test``.
        eval_overrides: ``eval.key=value`` strings applied to the checkpoint's own
            config (e.g. ``eval.glass_background=true``).
        gates: ``labels`` and/or ``classifier``.
        tta: test-time augmentation.
        out_dir: where ``<split>_metrics.json`` and ``<split>_metrics.md`` go.
        data_root: evaluate on this folder instead of the training data.

    Raises:
        ConfigError: an override outside the ``eval`` section, or an invalid value.
    """
    bad = [o for o in eval_overrides or [] if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"only eval.* settings can change at evaluation, got {' '.join(bad)}")
    device = resolve_device("auto")
    model, cfg = load_model(path, device)
    if eval_overrides or data_root is not None:
        d = apply_overrides(cfg.to_dict(), list(eval_overrides or []))
        if data_root is not None:
            d["data"]["root"] = str(data_root)
        cfg = config_from_dict(d)
    bundle = resolve_data(cfg, need_train=False)
    loader = make_eval_loader(cfg, bundle, split)
    return score_split(
        model,
        cfg,
        loader,
        split,
        gates=gates,
        tta=tta,
        progress=progress,
        out_dir=out_dir,
        source=str(path),
    )
