"""What each prototype looks at: per-prototype activation heatmaps and top patches.

``lpdseg explain CHECKPOINT IMAGE``: for every class, the k prototype maps
``A_4(., c, j)`` side by side over the image, and (given the training folder)
the training patches that activate each prototype most -- the evidence that
prototypes of one class cover different morphologies.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lpdseg.data.datasets import read_image
from lpdseg.data.transforms import to_tensor
from lpdseg.errors import CheckpointError
from lpdseg.io import atomic_write_bytes

log = logging.getLogger(__name__)


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
) -> list[list[list[int]]]:
    """Indices of the training patches with the highest GAP score per prototype."""
    scores = []
    for start in tqdm(
        range(0, len(samples), batch_size), desc="score patches", disable=not progress, unit="batch"
    ):
        x = torch.stack([to_tensor(read_image(s.image)) for s in samples[start : start + batch_size]])
        a = model(x, stages=(3,)).proto_maps[3].float()
        scores.append(a.amax((3, 4)))  # peak activation: where the prototype fires at all
    s = torch.cat(scores)  # N x C x k
    top = s.topk(min(per_prototype, s.shape[0]), dim=0).indices  # t x C x k
    return top.permute(1, 2, 0).tolist()


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
) -> list[Path]:
    """Write one explanation figure per image, and a summary figure over the folder.

    Args:
        checkpoint: LPD or PBIP checkpoint.
        images: image files / folders / globs.
        out: output folder.
        train_dir: dataset folder of training patches; enables "top patches" rows.
        per_prototype: patches shown per prototype.
    """
    from lpdseg.imageio import expand_inputs
    from lpdseg.inference import load_model

    model, cfg = load_model(checkpoint)
    require_prototypes(model, checkpoint)
    names = list(cfg.data.class_names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    patches = None
    if train_dir is not None:
        from lpdseg.data.datasets import list_split

        samples, _ = list_split(train_dir, cfg.data.format, "train", skip_bad=True)
        top = top_patches(model, samples, per_prototype, progress=progress)
        thumb = 64
        patches = [
            [[np.asarray(_thumb(read_image(samples[i].image), thumb)) for i in idx] for idx in cls]
            for cls in top
        ]
    written = []
    mean_maps = None
    for path in tqdm(expand_inputs(images), desc="explain", disable=not progress, unit="img"):
        image = read_image(path)
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
