"""``lpdseg eval``: a checkpoint's metrics on a split, in every gate from one pass.

Data of other classes than the checkpoint's is refused before anything is
scored (:func:`check_data_classes`): a 4-class checkpoint on 3-class data
would score the data's background as its fourth class. A missing split is
named with the split the folder does have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lpdseg.config import GATES, Config, EvalConfig, apply_overrides, config_from_dict
from lpdseg.data.datasets import API_HINTS, FixHints
from lpdseg.data.loaders import DataBundle, make_eval_loader, resolve_data
from lpdseg.data.patches import data_class_problem
from lpdseg.engine.evaluate import score_split
from lpdseg.errors import ConfigError, DataError
from lpdseg.inference.loading import load_model, resolve_device
from lpdseg.inference.sliding import sliding_window_predict
from lpdseg.io import atomic_write_json
from lpdseg.models.decode import decode_scores


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
    overwrite: bool = False,
    skip_bad: bool | None = None,
    hints: FixHints = API_HINTS,
) -> dict[str, Any]:
    """Score a checkpoint on a split in each gate; write JSON + Markdown tables.

    ``<split>_metrics.json`` records what was evaluated (checkpoint, data root,
    split, gates, TTA, eval overrides) under ``evaluated``; an existing one from
    another evaluation (e.g. the run's own test metrics, then ``--data`` other
    data) is not replaced without ``overwrite``. Re-running the same evaluation
    rewrites the same result.

    Args:
        path: checkpoint.
        split: ``val`` or ``test``.
        eval_overrides: ``eval.key=value`` strings applied to the checkpoint's own
            config (e.g. ``eval.glass_background=true``).
        gates: ``labels`` and/or ``classifier``.
        tta: test-time augmentation.
        out_dir: where ``<split>_metrics.json`` and ``<split>_metrics.md`` go.
        data_root: evaluate on this folder instead of the training data.
        overwrite: replace the metrics files of another evaluation in ``out_dir``.

    Raises:
        ConfigError: an override outside the ``eval`` section, or an invalid value.
        DataError: the data has other classes than the checkpoint (both sets
            named), no such split (the one it has is suggested), or ``out_dir``
            holds the metrics of another evaluation (without ``overwrite``).
    """
    bad = [o for o in eval_overrides or [] if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"only eval.* settings can change at evaluation, got {' '.join(bad)}")
    device = resolve_device("auto")
    model, cfg = load_model(path, device)
    own_root = cfg.data.root
    if eval_overrides or data_root is not None:
        d = apply_overrides(cfg.to_dict(), list(eval_overrides or []))
        if data_root is not None:
            d["data"]["root"] = str(data_root)
        cfg = config_from_dict(d)
    # only the scored split is checked (and, with skip_bad, its bad files skipped)
    bundle = resolve_data(cfg, need_train=False, eval_splits=(), skip_bad=skip_bad, hints=hints)
    check_data_classes(path, cfg, bundle.root)
    check_split(bundle, split)
    evaluated = {
        "checkpoint": str(Path(path).resolve()),
        "data_root": str(Path(bundle.root).resolve()),
        "split": split,
        "gates": ["seg"] if cfg.train.task == "seg" else sorted(gates),
        "tta": bool(tta),
        "eval_overrides": sorted(eval_overrides or []),
    }
    target = Path(out_dir) / f"{split}_metrics.json" if out_dir is not None else None
    if target is not None and target.is_file() and not overwrite:
        check_same_evaluation(target, evaluated, own_root, Path(path))
    loader = make_eval_loader(cfg, bundle, split)
    results = score_split(
        model,
        cfg,
        loader,
        split,
        gates=gates,
        tta=tta,
        progress=progress,
        out_dir=out_dir,
        source=str(path),
        scorer=full_size_scorer(model, cfg.eval, len(cfg.data.class_names) + 1, tta),
    )
    if target is not None and target.is_file():
        written = json.loads(target.read_text())
        atomic_write_json(target, {**written, "evaluated": evaluated})
    return results


def check_same_evaluation(
    target: Path, now: dict[str, Any], own_root: str | None, checkpoint: Path
) -> None:
    """Refuse to replace ``target`` when it holds the metrics of another evaluation.

    A file without an ``evaluated`` record was written by ``lpdseg train`` (the
    test metrics of ``best.pt``: its own data, both gates, TTA, no overrides).

    Raises:
        DataError: names the file, what differs (both values) and the fixes.
    """
    try:
        earlier = json.loads(target.read_text())
    except (OSError, ValueError):
        earlier = {}
    before = earlier.get("evaluated") if isinstance(earlier, dict) else None
    if not isinstance(before, dict):
        recorded = Path(str(earlier.get("checkpoint") or checkpoint.name)).name
        seg = "seg" in earlier
        before = {
            "checkpoint": str((target.parent / recorded).resolve()),
            "data_root": str(Path(own_root).resolve()) if own_root else None,
            "split": earlier.get("split", now["split"]),
            "gates": ["seg"] if seg else sorted(g for g in GATES if g in earlier),
            "tta": True,
            "eval_overrides": [],
        }
    changed = [k for k in now if before.get(k) != now[k]]
    if not changed:
        return
    diff = "; ".join(f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in changed)
    raise DataError(
        f"{target} holds the {now['split']} metrics of another evaluation ({diff}); write "
        "these to another --out, or pass --overwrite to replace it"
    )


def full_size_scorer(model, cfg: EvalConfig, num_labels: int, tta: bool):
    """Scores of an image at full size, for every gate from one forward per tile.

    Whole up to ``eval.max_side``, else by the one sliding-window path ``predict``
    and ``slide`` use; either way the network runs once per image or tile (and
    TTA view), and every gate is decoded from that pass.
    """

    def score(image: Tensor, labels: Tensor, gates) -> dict[str, Tensor]:
        if max(image.shape[-2:]) <= cfg.max_side:
            return decode_scores(model, image, cfg, labels, gates, tta)[0]
        rgb = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
        gates = list(gates)

        def predict_fn(tiles: Tensor) -> Tensor:
            lab = labels.expand(tiles.shape[0], -1)
            by_gate, _ = decode_scores(model, tiles.to(labels.device), cfg, lab, gates, tta)
            return torch.cat([by_gate[g] for g in gates], dim=1).cpu()  # gates side by side

        stacked = sliding_window_predict(
            rgb,
            predict_fn,
            num_labels * len(gates),
            tile=cfg.tile,
            overlap=cfg.overlap,
            progress=False,
        )
        return {
            g: stacked[i * num_labels : (i + 1) * num_labels][None] for i, g in enumerate(gates)
        }

    return score


def check_data_classes(checkpoint: str | Path, cfg: Config, root: str | Path) -> None:
    """Refuse data whose classes differ from the checkpoint's (both sets named).

    The data's classes come from what the folder says: ``patches.json``, CSV
    headers, the label strings of training file names and mask palettes (see
    :func:`lpdseg.data.patches.infer_data_classes`).

    Raises:
        DataError: the data's class count or names differ from the checkpoint's.
    """
    problem = data_class_problem(
        root, list(cfg.data.class_names), cfg.data.format, f"checkpoint {checkpoint}"
    )
    if problem:
        raise DataError(problem)


def check_split(bundle: DataBundle, split: str) -> None:
    """Refuse a missing split, suggesting the one the folder has (``--split val``...).

    Raises:
        DataError: ``split`` is not on disk.
    """
    if bundle.has_split(split):
        return
    root = bundle.root
    other = "val" if split == "test" else "test"
    layout = (
        f"{root}/{split}.csv"
        if bundle.format == "csv"
        else f"{root}/{split}/img + {root}/{split}/mask"
        + (f" (or {root}/img + {root}/mask)" if split == "val" else "")
    )
    if bundle.has_split(other):
        found = (
            f"{root}/img + {root}/mask, which lpdseg reads as the val split"
            if other == "val" and (root / "img").is_dir() and not (root / "val").is_dir()
            else f"a {other} split"
        )
        hint = f"it has {found}: use --split {other}"
    else:
        hint = "it has no val split either: add images and masks in that layout"
    raise DataError(f"{root} has no {split} split (expected {layout}); {hint}")
