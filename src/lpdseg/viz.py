"""Pictures: the one implementation of every picture lpdseg writes.

- :func:`colorize`: label map -> colour picture (a colour per label);
- :func:`overlay`: class colours blended over an image;
- :func:`legend` / :func:`add_legend`: a strip with a colour swatch and name per
  class (wrapping to more rows when the names do not fit), below a picture;
- :func:`text_strip`, :func:`side_by_side`, :func:`triptych`: captions and panels;
- :func:`png_bytes` / :func:`save_png`: PNG encoding and (atomic) writing;
- :func:`plot_training_curves`: loss and validation curves.

Predictions, slides, reports, the demo, prototype banks and synthetic data all
draw with these, so their overlays and legends look and mean the same.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lpdseg.io import atomic_write_bytes

Color = Sequence[int]
#: Default opacity of class colours over an image.
OVERLAY_ALPHA = 0.4
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


# ---------------------------------------------------------------- PNG
def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode a uint8 image (``H x W`` gray/labels, ``H x W x 3`` RGB or ``x 4`` RGBA) as PNG.

    Args:
        array: the pixels (label maps are written as their values, 8-bit gray).
        compress_level: zlib level 0 (fastest) .. 9 (smallest); pixels are the same.

    Raises:
        ValueError: not uint8, or not one of the shapes above.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG export needs uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"PNG export needs H x W, H x W x 3 or H x W x 4, got {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buf, format="PNG", compress_level=int(compress_level)
    )
    return buf.getvalue()


def save_png(path: str | Path, array: np.ndarray, compress_level: int = 6) -> None:
    """Write a uint8 image as PNG atomically (see :func:`png_bytes`)."""
    atomic_write_bytes(path, png_bytes(array, compress_level))


# ---------------------------------------------------------------- colours
def colorize(mask: np.ndarray, colors: Sequence[Color]) -> np.ndarray:
    """Label map (``H x W``) -> ``H x W x 3`` uint8 RGB: label ``i`` gets ``colors[i]``.

    Labels without a colour (e.g. 255 = ignore) are black.
    """
    palette = np.zeros((256, 3), np.uint8)
    palette[: min(len(colors), 256)] = np.asarray([c[:3] for c in colors[:256]], np.uint8)
    return palette[np.asarray(mask).astype(np.uint8)]


def _resize_nearest(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (the pixel whose centre is nearest)."""
    h, w = hw
    mh, mw = labels.shape
    rows = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(np.int64), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(np.int64), mw - 1)
    return labels[rows[:, None], cols[None, :]]


#: Rows :func:`overlay` blends at a time.
OVERLAY_BAND_ROWS = 128


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[Color],
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """Blend class colours over an image.

    Args:
        image: ``H x W x 3`` uint8 RGB.
        labels: label map; resized (nearest) to ``H x W`` when it differs
            (e.g. a slide's class map over a thumbnail).
        colors: one ``(r, g, b)`` per label to colour. Labels without a colour
            are left as they are: pass the C class colours to leave background
            (label C) and ignore (255) uncoloured.
        alpha: colour opacity in [0, 1].

    Returns:
        ``H x W x 3`` uint8 RGB, ``round((1 - alpha) * image + alpha * colour)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = image.shape[:2]
    labels = np.asarray(labels)
    if labels.shape != (h, w):
        labels = _resize_nearest(labels, (h, w))
    n = min(len(colors), 256)
    lut = np.zeros((256, 3), np.float32)
    painted = np.zeros(256, np.float32)
    if n:
        lut[:n] = np.asarray([c[:3] for c in colors[:n]], np.float32)
        painted[:n] = alpha
    out = np.empty((h, w, 3), np.uint8)
    # in bands of rows: the float temporaries of a slide-sized overlay would be ~10x its size
    for y0 in range(0, h, OVERLAY_BAND_ROWS):
        y1 = min(h, y0 + OVERLAY_BAND_ROWS)
        idx = labels[y0:y1].astype(np.uint8)
        a = painted[idx][..., None]
        band = image[y0:y1, :, :3].astype(np.float32) * (1.0 - a) + lut[idx] * a
        out[y0:y1] = np.clip(np.rint(band), 0, 255)
    return out


# ---------------------------------------------------------------- text
@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _font_size(width: int) -> int:
    """Text height (px) for a picture ``width`` px wide: 11 px up to ~500 px, then larger."""
    return int(np.clip(round(width / 45), 11, 26))


def text_strip(
    text: str, width: int, height: int | None = None, size: int | None = None
) -> np.ndarray:
    """A white ``height x width x 3`` strip with black text, left-aligned and centred vertically.

    Args:
        text: the caption (cut at the right edge if longer).
        width: strip width in pixels.
        height: strip height; None = text height + 8.
        size: text height in pixels; None picks one from ``width``.
    """
    size = size or _font_size(width)
    height = height or size + 8
    strip = Image.new("RGB", (max(1, width), max(1, height)), _WHITE)
    draw = ImageDraw.Draw(strip)
    font = _font(size)
    top, bottom = font.getbbox("Ag")[1::2]
    draw.text((4, (height - (top + bottom)) / 2), text, fill=_BLACK, font=font)
    return np.asarray(strip)


def legend(names: Sequence[str], colors: Sequence[Color], width: int) -> np.ndarray:
    """A legend strip ``width`` px wide: a colour swatch and the name of every entry.

    Entries are laid out left to right and wrap to a new row when the next
    does not fit; the text grows with ``width`` (11 px for patches, up to
    26 px for wide slide overlays).

    Args:
        names: the entries (e.g. class names, plus "background").
        colors: one ``(r, g, b)`` per name.
        width: strip width in pixels.

    Returns:
        ``h x width x 3`` uint8 RGB, white with black text.

    Raises:
        ValueError: fewer colours than names.
    """
    if len(colors) < len(names):
        raise ValueError(
            f"{len(names)} names but {len(colors)} colours; give one (r, g, b) colour per name"
        )
    size = _font_size(width)
    font = _font(size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, swatch = 4, size
    row_h = size + 2 * pad
    top, bottom = font.getbbox("Ag")[1::2]
    entries, x, y = [], pad, 0
    for name in names:
        entry_w = swatch + pad + int(np.ceil(draw.textlength(name, font=font))) + 3 * pad
        if x + entry_w > width and x > pad:
            x, y = pad, y + row_h
        entries.append((x, y, name))
        x += entry_w
    strip = Image.new("RGB", (max(1, width), y + row_h + pad), _WHITE)
    draw = ImageDraw.Draw(strip)
    for (ex, ey, name), col in zip(entries, colors):
        box = [ex, ey + pad, ex + swatch - 1, ey + pad + swatch - 1]
        draw.rectangle(box, fill=tuple(int(v) for v in col[:3]), outline=_BLACK)
        text_y = ey + pad + (swatch - (top + bottom)) / 2
        draw.text((ex + swatch + pad, text_y), name, fill=_BLACK, font=font)
    return np.asarray(strip)


def add_legend(image: np.ndarray, names: Sequence[str], colors: Sequence[Color]) -> np.ndarray:
    """``image`` with a :func:`legend` strip of its width appended below."""
    return np.concatenate([image, legend(names, colors, image.shape[1])], axis=0)


# ---------------------------------------------------------------- panels
def side_by_side(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """RGB panels of one height next to each other, ``gap`` white pixels apart."""
    h = panels[0].shape[0]
    white = np.full((h, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for p in panels:
        if p.shape[0] != h:
            raise ValueError(f"panels must have one height, got {[q.shape[0] for q in panels]}")
        parts.extend([p, white])
    return np.concatenate(parts[:-1], axis=1)


def triptych(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    names: Sequence[str],
    colors: Sequence[Color],
) -> np.ndarray:
    """image | ground truth | prediction side by side, with a legend underneath.

    ``colors`` has one colour per class and one for background (last).
    """
    panels = [image]
    if truth is not None:
        panels.append(colorize(truth, colors))
    panels.append(colorize(pred, colors))
    return add_legend(side_by_side(panels), [*names, "background"], colors)


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> None:
    """Loss terms per step and validation mIoU per epoch from ``metrics.jsonl``."""
    import matplotlib  # here, so that pictures without plots do not load matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
