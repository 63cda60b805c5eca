"""Pictures: training curves, colour overlays, image | truth | prediction panels."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lpdseg.io import atomic_write_bytes  # noqa: E402


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 image (H x W or H x W x 3) as PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def colorize(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """Label mask (H x W, background = len(colors) - 1, 255 ignore -> black) -> RGB."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    return palette[mask.astype(np.uint8)]


def blend(
    image: np.ndarray, mask: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.45
) -> np.ndarray:
    """Colour overlay of a mask on an RGB image; background pixels stay as they are."""
    color = colorize(mask, colors).astype(np.float32)
    out = image.astype(np.float32)
    tissue = (mask < len(colors) - 1)[..., None]
    out = np.where(tissue, (1 - alpha) * out + alpha * color, out)
    return out.clip(0, 255).astype(np.uint8)


def legend_strip(
    names: Sequence[str], colors: Sequence[Sequence[int]], width: int, height: int = 18
) -> np.ndarray:
    """A strip with one coloured box + name per class."""
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x = 4
    for name, col in zip(names, colors):
        draw.rectangle([x, 4, x + 10, 14], fill=tuple(int(v) for v in col), outline=(0, 0, 0))
        draw.text((x + 14, 3), name, fill=(0, 0, 0))
        x += 14 + 7 * len(name) + 12
    return np.asarray(strip)


def triptych(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    names: Sequence[str],
    colors: Sequence[Sequence[int]],
) -> np.ndarray:
    """image | ground truth | prediction side by side, with a legend underneath."""
    panels = [image]
    if truth is not None:
        panels.append(colorize(truth, colors))
    panels.append(colorize(pred, colors))
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], axis=1)
    legend = legend_strip(list(names) + ["background"], colors, row.shape[1])
    return np.concatenate([row, legend], axis=0)


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> None:
    """Loss terms per step and validation mIoU per epoch from ``metrics.jsonl``."""
    steps, losses, terms = [], [], {}
    val_steps, val_miou = [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        if "val_mIoU" in rec:
            val_steps.append(rec["step"])
            val_miou.append(rec["val_mIoU"])
        elif "loss" in rec and rec.get("finite", True):
            steps.append(rec["step"])
            losses.append(rec["loss"])
            for k in ("cls", "sim", "div"):
                if k in rec:
                    terms.setdefault(k, []).append(rec[k])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    if steps:
        ax.plot(steps, _smooth(losses), label="total", lw=1.5)
        for k, v in terms.items():
            ax.plot(steps[: len(v)], _smooth(v), label=k, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (smoothed)")
    ax.legend()
    ax = axes[1]
    if val_steps:
        ax.plot(val_steps, [100 * v for v in val_miou], "o-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation mIoU (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())


def _smooth(values: list[float], window: int = 10) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if len(v) < window:
        return v
    kernel = np.ones(window) / window
    head = np.cumsum(v[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])
