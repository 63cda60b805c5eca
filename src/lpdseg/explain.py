"""What each prototype looks at: per-prototype activation heatmaps and top patches.

``lpdseg explain CHECKPOINT IMAGE``: for every class, the k prototype maps
``A_4(., c, j)`` side by side over the image, and (given the training folder)
the training patches that activate each prototype most -- the evidence that
prototypes of one class cover different morphologies.

Options and every input's header are checked before anything is written; a bad
image or training patch stops the run naming the file, or with ``skip_bad``
(``--skip-bad``) is skipped and listed.
"""

from __future__ import annotations

import io
import logging
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lpdseg.data.datasets import FixHints, _file_problem, read_image
from lpdseg.data.transforms import to_tensor
from lpdseg.errors import CheckpointError, ConfigError, DataError
from lpdseg.io import atomic_write_bytes

log = logging.getLogger(__name__)

#: What the Python API's messages suggest (the CLI passes its flags instead).
API_HINTS = FixHints(
    skip_bad="pass skip_bad=True", outside_root="", root="pass the dataset folder as train_dir"
)


def _check_count(name: str, value: int, flag: str, what: str) -> None:
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < 1:
        raise ConfigError(f"{name}={value!r} must be a whole number >= 1 ({flag}): {what}")


def require_prototypes(model, source: str | Path = "this checkpoint") -> None:
    """Refuse a model without prototypes (CAM head or stage-2 network).

    Raises:
        CheckpointError: naming ``source`` and what to give instead.
    """
    if not hasattr(model, "head") or not hasattr(model.head, "prototypes"):
        raise CheckpointError(
            f"{source} has no prototypes (a CAM or stage-2 model); "
            "explain needs an LPD or PBIP checkpoint (model.head=lpd or pbip)"
        )


@torch.no_grad()
def prototype_maps(model, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-4 prototype maps at image size (C x k x H x W), and class probabilities (C)."""
    require_prototypes(model)
    x = to_tensor(image)[None]
    out = model(x, stages=(3,))
    a = F.interpolate(
        out.proto_maps[3][0].float(), size=image.shape[:2], mode="bilinear", align_corners=False
    )
    return a, torch.sigmoid(out.logits[3][0].float())


@torch.no_grad()
def top_patches(
    model,
    samples: Sequence,
    per_prototype: int = 4,
    batch_size: int = 16,
    progress: bool = True,
    *,
    skip_bad: bool = False,
    hints: FixHints = API_HINTS,
) -> list[list[list[int]]]:
    """Indices of the training patches with the highest GAP score per prototype.

    Args:
        samples: training samples (``.image`` paths).
        per_prototype: patches per prototype (at most ``len(samples)``).
        batch_size: patches per forward pass.
        skip_bad: leave out a patch that fails to decode (logged) instead of raising.
        hints: how the caller's user skips bad files (said in the error).

    Raises:
        ConfigError: ``per_prototype`` or ``batch_size`` below 1.
        DataError: an unreadable patch (without ``skip_bad``), or none readable.
    """
    _check_count("per_prototype", per_prototype, "--per-prototype", "patches shown per prototype")
    _check_count("batch_size", batch_size, "batch_size", "patches per forward pass")
    scores, kept = [], []
    for start in tqdm(
        range(0, len(samples), batch_size), desc="score patches", disable=not progress, unit="batch"
    ):
        tensors = []
        for i in range(start, min(start + batch_size, len(samples))):
            image = _read(samples[i].image, skip_bad, hints)
            if image is not None:
                tensors.append(to_tensor(image))
                kept.append(i)
        if not tensors:
            continue
        a = model(torch.stack(tensors), stages=(3,)).proto_maps[3].float()
        scores.append(a.amax((3, 4)))  # peak activation: where the prototype fires at all
    if not scores:
        raise DataError(f"none of the {len(samples)} training patches could be read")
    s = torch.cat(scores)  # N x C x k
    top = s.topk(min(per_prototype, s.shape[0]), dim=0).indices  # t x C x k
    index = torch.tensor(kept)
    return index[top].permute(1, 2, 0).tolist()


def _read(path: Path, skip_bad: bool, hints: FixHints) -> np.ndarray | None:
    """``read_image(path)``; with ``skip_bad`` None (logged) for a file that fails."""
    try:
        return read_image(path)
    except DataError as exc:
        if not skip_bad:
            raise hints.with_skip_advice(exc) from exc
        log.warning("skipping %s: %s", path, exc)
        return None


def _checked_inputs(paths: Sequence[Path], skip_bad: bool, hints: FixHints) -> list[Path]:
    """The images whose headers are readable (not decoded); the others raise or are skipped."""
    good, bad = [], []
    for path in paths:
        reason = _file_problem(path, True)
        if reason is None:
            good.append(path)
            continue
        if not skip_bad:
            raise DataError(f"{path}: {reason}; {hints.skip_advice()}")
        bad.append(path)
        log.warning("skipping %s: %s", path, reason)
    if bad:
        log.warning("%d images skipped: %s", len(bad), ", ".join(str(p) for p in bad))
    if not good:
        raise DataError(f"none of the {len(paths)} images can be read (see the warnings above)")
    return good


def explain_figure(
    image: np.ndarray,
    maps: torch.Tensor,
    probs: torch.Tensor,
    class_names: Sequence[str],
    patches: list[list[list[np.ndarray]]] | None = None,
) -> bytes:
    """PNG bytes: image + one row per class with its k prototype heatmaps (+ top patches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, k = maps.shape[:2]
    extra = 1 if patches else 0
    fig, axes = plt.subplots(
        c * (1 + extra), k + 1, figsize=(2.0 * (k + 1), 2.1 * c * (1 + extra)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ci in range(c):
        row = ci * (1 + extra)
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(f"{class_names[ci]} p={float(probs[ci]):.2f}", fontsize=8)
        lo, hi = float(maps[ci].min()), float(maps[ci].max())
        for j in range(k):
            axes[row, j + 1].imshow(image)
            axes[row, j + 1].imshow(maps[ci, j].numpy(), cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
            axes[row, j + 1].set_title(f"prototype {j}", fontsize=8)
            if patches:
                strip = np.concatenate([p for p in patches[ci][j]], axis=1)
                axes[row + 1, j + 1].imshow(strip)
                axes[row + 1, j + 1].set_title("top training patches", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def explain(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    train_dir: str | Path | None = None,
    per_prototype: int = 4,
    progress: bool = True,
    skip_bad: bool = False,
    hints: FixHints = API_HINTS,
) -> list[Path]:
    """Write one explanation figure per image, and a summary figure over the folder.

    Everything is checked before the first figure is written: ``per_prototype``,
    the checkpoint, every image's header and the training folder's files.

    Args:
        checkpoint: LPD or PBIP checkpoint.
        images: image files / folders / globs.
        out: output folder.
        train_dir: dataset folder of training patches; enables "top patches" rows.
        per_prototype: patches shown per prototype (>= 1).
        skip_bad: skip (and list) unreadable images and training patches instead of stopping.
        hints: how the caller's user skips bad files (the CLI: ``--skip-bad``).

    Raises:
        ConfigError: ``per_prototype`` below 1.
        CheckpointError: a checkpoint without prototypes.
        DataError: an unreadable image or patch (without ``skip_bad``), naming it.
    """
    from lpdseg.imageio import expand_inputs
    from lpdseg.inference import load_model

    _check_count("per_prototype", per_prototype, "--per-prototype", "patches shown per prototype")
    paths = expand_inputs(images)
    model, cfg = load_model(checkpoint)
    require_prototypes(model, checkpoint)
    paths = _checked_inputs(paths, skip_bad, hints)
    names = list(cfg.data.class_names)
    samples = None
    if train_dir is not None:
        from lpdseg.data.datasets import list_split

        samples, _ = list_split(
            train_dir,
            cfg.data.format,
            "train",
            skip_bad=skip_bad,
            check_images=True,
            hints=hints,
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    patches = None
    if samples is not None:
        top = top_patches(
            model, samples, per_prototype, progress=progress, skip_bad=skip_bad, hints=hints
        )
        thumb = 64
        patches = [
            [[np.asarray(_thumb(read_image(samples[i].image), thumb)) for i in idx] for idx in cls]
            for cls in top
        ]
    written = []
    mean_maps = None
    for path in tqdm(paths, desc="explain", disable=not progress, unit="img"):
        image = _read(path, skip_bad, hints)
        if image is None:
            continue
        maps, probs = prototype_maps(model, image)
        target = out / f"{path.stem}_prototypes.png"
        atomic_write_bytes(target, explain_figure(image, maps, probs, names, patches))
        written.append(target)
        # how much each prototype fires, per image: for the summary
        share = maps.clamp_min(0).mean((2, 3))
        mean_maps = share if mean_maps is None else mean_maps + share
    if mean_maps is not None:
        target = out / "summary_prototypes.png"
        atomic_write_bytes(target, _summary_figure(mean_maps / len(written), names))
        written.append(target)
    return written


def _thumb(image: np.ndarray, size: int):
    from PIL import Image

    return Image.fromarray(image).resize((size, size))


def _summary_figure(mean_act: torch.Tensor, names: Sequence[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.6 * mean_act.shape[1], 0.5 + 0.5 * len(names)))
    im = ax.imshow(mean_act.numpy(), cmap="viridis")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(mean_act.shape[1]))
    ax.set_xlabel("prototype")
    ax.set_title("mean positive activation over the images")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
