"""Patch-from-masks builder: any folder of image + mask pairs -> a weakly labelled dataset.

``lpdseg patches IMG_DIR MASK_DIR --out DIR`` tiles every labelled image into
``size`` x ``size`` patches at ``stride``, derives each patch's image-level
label from its mask and writes a training folder that the ordinary readers
take (``data.format`` + ``data.root=DIR``):

- ``bcss_wsss``: ``DIR/training/<stem>+<x>_<y>[1101].png`` (4 classes),
- ``luad_histoseg``: ``DIR/train/<stem>_<x>_<y>-[1 0 0 1].png`` (4 classes),
- ``wsss4luad``: ``DIR/train/<stem>-<x>-<y>-[1, 1, 0].png`` (3 classes),
- ``csv``: ``DIR/train/<stem>_<x>_<y>.png`` + ``DIR/train.csv`` (any class count).

The rule (recorded in ``DIR/patches.json`` with every count):

- tile origins every ``stride`` px; the last tile of a row/column is moved
  inward so it ends at the image border (no pixel is left untiled); an image
  smaller than ``size`` is padded with white and its padded mask pixels set to
  255 (ignore);
- a tissue class is in the label when it covers at least ``min_fraction`` of
  the patch's labelled (non-ignore) pixels
  (:func:`lpdseg.data.datasets.mask_to_label`); the default is the package's
  :data:`lpdseg.catalog.LABEL_MIN_FRACTION` (2 %), and
  :meth:`PatchRule.from_config` takes a run config's ``data.label_min_fraction``;
- a patch is dropped when background + padding cover more than
  ``max_background`` of it, or when no class reaches ``min_fraction``.

Held-out images (``val_stems`` / ``test_stems``) are copied unchanged into
``DIR/val|test/img`` and ``/mask`` for pixel evaluation at full size, and
none of their pixels reach the training folder. With ``write_masks`` the true
mask of every training patch goes to ``DIR/supervised/masks/`` with a
``manifest.csv`` (image, mask, label) in the format of ``lpdseg pseudo``, so
``train.task=seg data.pseudo=DIR/supervised`` trains a fully supervised upper
bound on exactly the training patches.

Masks must fit the format: before anything is written every mask is checked
(:func:`inspect_mask`): a palette that colours a class index white (the
background colour of every supported release, e.g. a 3-class WSSS4LUAD mask
read as 4-class ``bcss_wsss``, whose index 3 would become NEC), a palette that
is another format's, or values above the background index are refused, naming
the file, the format and the ``--format`` that fits. :func:`infer_data_classes`
applies the same evidence (plus ``patches.json``, CSV headers and training
file names) to a whole dataset folder, so ``lpdseg eval --data`` can refuse
data of other classes than a checkpoint's.

A folder that already holds a patch dataset (``patches.json``) is never
written into again silently: ``overwrite=True`` (``--overwrite``) deletes the
earlier run's outputs first (only what ``patches.json`` says it wrote).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lpdseg.catalog import LABEL_MIN_FRACTION
from lpdseg.data.datasets import FORMATS, IGNORE_INDEX, csv_class_names, mask_to_label
from lpdseg.errors import ConfigError, DataError
from lpdseg.imageio import IMAGE_SUFFIXES, read_image, read_mask
from lpdseg.io import atomic_write_json, atomic_write_text
from lpdseg.viz import save_png

if TYPE_CHECKING:
    from lpdseg.config import Config, DataConfig

log = logging.getLogger(__name__)

PATCH_FORMATS = ("bcss_wsss", "luad_histoseg", "wsss4luad", "csv")

#: Palette colours of the released masks of each format: classes in label order, then
#: background (white in every release). Used to recognise a palette mask's format.
FORMAT_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "bcss_wsss": ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)),
    "luad_histoseg": ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)),
    "wsss4luad": ((0, 64, 128), (64, 128, 0), (243, 152, 0), (255, 255, 255)),
}
WHITE = (255, 255, 255)
# a white palette entry beyond this index is not taken for a background class index
_MAX_BACKGROUND_INDEX = 32


@dataclass(frozen=True)
class MaskInfo:
    """What a mask file says about its class set (see :func:`inspect_mask`).

    Attributes:
        path: the mask.
        mode: PIL mode (``P`` palette, ``L`` grey, ...).
        background: the palette index (> 0) coloured white, the background of
            every released format, when the mask uses it; else ``None``.
        palette_format: the format whose released palette this is, or ``None``.
        values: the distinct pixel values, 255 (ignore) excluded.
    """

    path: Path
    mode: str
    background: int | None
    palette_format: str | None
    values: tuple[int, ...]


def inspect_mask(path: str | Path, read_values: bool = True) -> MaskInfo | None:
    """Palette and values of a mask, without judging them (``None``: not a readable mask)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            palette = im.getpalette() if mode in ("P", "PA") else None
            values: tuple[int, ...] = ()
            if read_values and (mode in ("P", "L", "1", "I") or mode.startswith("I;16")):
                arr = np.asarray(im)
                if arr.ndim == 2:
                    found = np.unique(arr).astype(np.int64)
                    values = tuple(int(v) for v in found if v != IGNORE_INDEX)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    background = None
    palette_format = None
    if palette:
        colours = [tuple(palette[i : i + 3]) for i in range(0, len(palette) - 2, 3)]
        # index 0 white is no sign of a class count (a background-first palette)
        white = [i for i, c in enumerate(colours[: _MAX_BACKGROUND_INDEX + 1]) if c == WHITE and i]
        background = white[0] if white else None
        if read_values and background not in values:
            background = None  # an unused white entry (e.g. a padded palette) says nothing
        for fmt, ref in FORMAT_PALETTES.items():
            if tuple(colours[: len(ref)]) == ref:
                palette_format = fmt
                break
    return MaskInfo(path, mode, background, palette_format, values)


def formats_for(count: int, palette_format: str | None = None) -> str:
    """``--format`` suggestion for masks of ``count`` classes (+ background)."""
    if palette_format is not None:
        return f"--format {palette_format}"
    fits = [f"--format {f}" for f, spec in FORMATS.items() if spec.num_classes == count]
    csv_hint = f"--format csv --class-names <{count} comma-separated names>"
    return " or ".join([*fits, csv_hint])


def mask_format_problem(info: MaskInfo, fmt: str, class_names: Sequence[str]) -> str | None:
    """Why a mask cannot be of ``fmt`` with ``class_names`` (``None``: it may be).

    A mask does not fit when its palette colours a class index white (its
    background is there: fewer classes), its white background index is beyond
    the format's, its palette is another format's, or it has values above the
    background index (more classes).
    """
    c = len(class_names)
    names = ", ".join(class_names)
    where = f"--format {fmt} has {c} classes ({names}) and background {c}"
    b = info.background
    if b is not None and b != c:
        meaning = (
            f"its index {b} would be read as {class_names[b]}"
            if b < c
            else f"values {c}..{b - 1} would be out of range"
        )
        return (
            f"{info.path}: the mask's palette colours index {b} white (background), so it has "
            f"{b} classes + background, but {where}: {meaning}. Use {formats_for(b, info.palette_format)}"
        )
    if info.palette_format is not None and fmt != "csv" and info.palette_format != fmt:
        return (
            f"{info.path}: the mask has the palette of {info.palette_format} masks "
            f"({', '.join(FORMATS[info.palette_format].class_names)}), but {where}. "
            f"Use --format {info.palette_format}"
        )
    top = max(info.values, default=0)
    if top > c:
        return (
            f"{info.path}: the mask has values up to {top}, more than {where}; it looks like a "
            f"mask of {top} classes + background. Use {formats_for(top, info.palette_format)}"
        )
    return None


@dataclass(frozen=True)
class ClassEvidence:
    """One source's view of a dataset's classes (see :func:`infer_data_classes`).

    Attributes:
        source: where it comes from, for messages (e.g. ``"training file names"``).
        count: number of tissue classes it implies, if any.
        names: class names it states, if any.
        format: the format it implies, if any.
        declared: ``names`` are stated by the data (``patches.json``, a CSV
            header), not guessed from a format.
    """

    source: str
    count: int | None
    names: tuple[str, ...] | None = None
    format: str | None = None
    declared: bool = False


def _label_style(stem: str) -> tuple[str, int] | None:
    """(format, class count) of the label string in a training file name, if any."""
    found = re.findall(r"\[([^\[\]]*)\]", stem)
    if not found:
        return None
    text = found[-1].strip()
    if "," in text:
        parts = [t.strip() for t in text.split(",")]
        fmt = "wsss4luad"
    elif " " in text:
        parts = text.split()
        fmt = "luad_histoseg"
    else:
        parts = list(text)
        fmt = "bcss_wsss"
    if not parts or any(p not in ("0", "1") for p in parts):
        return None
    return fmt, len(parts)


def infer_data_classes(root: str | Path, sample: int = 24) -> list[ClassEvidence]:
    """What a dataset folder says about its classes, source by source.

    Sources: ``patches.json`` (written by :func:`build_patch_dataset`), CSV
    headers (``train/val/test.csv``), the label strings of training file names
    (``[1101]`` -> 4 classes, ``[1, 1, 0]`` -> 3 ...), and the palettes and
    values of a few masks (a white palette index is the background index).
    """
    root = Path(root)
    out: list[ClassEvidence] = []
    info = root / "patches.json"
    if info.is_file():
        try:
            names = tuple(json.loads(info.read_text()).get("class_names") or ())
        except (OSError, ValueError):
            names = ()
        if names:
            out.append(ClassEvidence(f"{info}", len(names), names, declared=True))
    for name in ("train.csv", "val.csv", "test.csv"):
        if (root / name).is_file():
            try:
                names = csv_class_names(root / name)
            except DataError:
                continue
            out.append(  # counts only: data.class_names may rename the CSV's columns
                ClassEvidence(f"the header of {root / name}", len(names), None, "csv")
            )
            break
    folder = next((root / n for n in ("training", "train") if (root / n).is_dir()), None)
    if folder is not None:
        styles = set()
        for path in sorted(folder.iterdir())[: sample * 4]:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                style = _label_style(path.stem)
                if style is not None:
                    styles.add(style)
        if len(styles) == 1:
            fmt, count = styles.pop()
            names = FORMATS[fmt].class_names if FORMATS[fmt].num_classes == count else None
            out.append(
                ClassEvidence(
                    f"the label strings of {folder}/*", count, names, fmt if names else None
                )
            )
    mask_dirs = [root / s / "mask" for s in ("val", "valid", "test")] + [root / "mask"]
    masks = [
        p
        for d in mask_dirs
        if d.is_dir()
        for p in sorted(d.iterdir())[:sample]
        if p.suffix.lower() in IMAGE_SUFFIXES
    ][:sample]
    infos = [i for i in (inspect_mask(p) for p in masks) if i is not None]
    backgrounds = {i.background for i in infos if i.background is not None}
    if len(backgrounds) == 1:
        b = backgrounds.pop()
        fmts = {i.palette_format for i in infos}
        fmt = fmts.pop() if len(fmts) == 1 else None
        names = FORMATS[fmt].class_names if fmt else None
        where = infos[0].path.parent
        out.append(ClassEvidence(f"the mask palettes of {where} (index {b} white)", b, names, fmt))
    elif infos:
        top = max((max(i.values, default=0) for i in infos), default=0)
        if top > 0:
            out.append(
                ClassEvidence(f"the mask values of {infos[0].path.parent} (up to {top})", None)
            )
    return out


def data_class_problem(
    root: str | Path, class_names: Sequence[str], fmt: str, what: str
) -> str | None:
    """Why the data in ``root`` has other classes than ``class_names`` (``None``: no sign of it).

    A source's class count differs, its declared names differ, or it implies a
    built-in format of other class names than ``what``'s built-in ``fmt``.
    """
    names = tuple(class_names)
    c = len(names)
    for ev in infer_data_classes(root):
        other: tuple[str, ...] | None = None
        if ev.count is not None and ev.count != c:
            other = ev.names
        elif ev.declared and ev.names is not None and ev.names != names:
            other = ev.names
        elif (
            ev.format is not None
            and ev.format != fmt
            and fmt != "csv"
            and ev.format != "csv"
            and ev.names is not None
            and ev.names != names
        ):
            other = ev.names
        else:
            continue
        count = ev.count if ev.count is not None else len(other or ())
        theirs = f"{count} classes ({', '.join(other)})" if other else f"{count} classes"
        background = (
            f"; its background (index {count}) would be scored as {names[count]}"
            if count < c
            else ""
        )
        data_fmt = f"data.format={ev.format} " if ev.format else ""
        return (
            f"{what} was trained on {c} classes ({', '.join(names)}; data.format={fmt}) but "
            f"{root} holds {theirs}, by {ev.source}{background}. Use data of the "
            f"checkpoint's classes, or train a checkpoint on this data "
            f"(lpdseg train PRESET {data_fmt}data.root={root})"
        )
    return None


@dataclass(frozen=True)
class PatchRule:
    """How images are tiled and how patch labels are derived.

    Attributes:
        size: patch side (px).
        stride: distance between tile origins (px); ``< size`` overlaps.
        min_fraction: a class is present if it covers at least this fraction of
            the patch's labelled pixels (default ``LABEL_MIN_FRACTION``; a run
            config's is ``data.label_min_fraction``, see :meth:`from_config`).
        max_background: drop a patch whose background + padding fraction exceeds this.
    """

    size: int = 224
    stride: int = 224
    min_fraction: float = LABEL_MIN_FRACTION
    # 0.8: airy tissue is kept (normal lung: its alveoli are background in the masks); at
    # 0.5 the WSSS4LUAD folds kept 34-71 normal-tissue patches, at 0.8 83-103 (docs/results.md)
    max_background: float = 0.8

    @classmethod
    def from_config(cls, config: Config | DataConfig, **kwargs: Any) -> PatchRule:
        """The rule with a config's ``data.label_min_fraction`` (other fields from kwargs).

        Args:
            config: a run :class:`~lpdseg.config.Config` or its ``data`` section.
            **kwargs: ``size``, ``stride``, ``max_background`` (and ``min_fraction``
                to override the config's value).
        """
        data = getattr(config, "data", config)
        kwargs.setdefault("min_fraction", data.label_min_fraction)
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.stride <= 0:
            raise ConfigError(f"patch size and stride must be > 0 (got {self.size}, {self.stride})")
        if not 0.0 <= self.min_fraction < 1.0:
            raise ConfigError(f"min_fraction={self.min_fraction} must be in [0, 1)")
        if not 0.0 <= self.max_background <= 1.0:
            raise ConfigError(f"max_background={self.max_background} must be in [0, 1]")


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Tile origins along one axis, the last moved inward to end at the border."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def pair_files(img_dir: str | Path, mask_dir: str | Path) -> list[tuple[Path, Path]]:
    """Image/mask pairs matched by file stem, sorted by image name.

    Raises:
        DataError: a folder is missing or empty, an image has no mask, or two
            images (or masks) share a stem (both named).
    """
    img_dir, mask_dir = Path(img_dir), Path(mask_dir)
    for folder in (img_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder; give the image folder and the mask folder")
    mask_files = [
        p
        for p in sorted(mask_dir.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    images = [
        p
        for p in sorted(img_dir.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    if not images:
        raise DataError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for kind, files in (("images", images), ("masks", mask_files)):
        seen: dict[str, Path] = {}
        for path in files:
            if path.stem in seen:
                raise DataError(
                    f"{seen[path.stem]} and {path} share the stem {path.stem!r}: {kind} are "
                    "paired (and patches named) by stem, so one would replace the other; "
                    "rename or remove one"
                )
            seen[path.stem] = path
    masks = {p.stem: p for p in mask_files}
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise DataError(
                f"{image}: no mask named {image.stem}.png in {mask_dir}; masks are paired by stem"
            )
        pairs.append((image, masks[image.stem]))
    return pairs


def patch_name(stem: str, x: int, y: int, label: np.ndarray, fmt: str) -> str:
    """File name of a patch with its label in the format's convention."""
    bits = [str(int(v)) for v in label]
    if fmt == "bcss_wsss":
        return f"{stem}+{x}_{y}[{''.join(bits)}].png"
    if fmt == "luad_histoseg":
        return f"{stem}_{x}_{y}-[{' '.join(bits)}].png"
    if fmt == "wsss4luad":
        return f"{stem}-{x}-{y}-[{', '.join(bits)}].png"
    return f"{stem}_{x}_{y}.png"


def tile_pair(
    image: np.ndarray, mask: np.ndarray, num_classes: int, rule: PatchRule
) -> Iterable[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None, str]]:
    """Tile one image/mask pair.

    Yields:
        ``(x, y, image patch, mask patch, label or None, reason)`` per tile;
        ``label`` is ``None`` for a dropped tile and ``reason`` says why
        (``"background"`` or ``"no_class"``), else ``reason`` is ``""``.
    """
    h, w = mask.shape
    s = rule.size
    if h < s or w < s:  # pad small images with white glass, ignored in the mask
        ph, pw = max(h, s), max(w, s)
        padded = np.full((ph, pw, 3), 255, np.uint8)
        padded[:h, :w] = image
        pmask = np.full((ph, pw), IGNORE_INDEX, np.uint8)
        pmask[:h, :w] = mask
        image, mask = padded, pmask
        h, w = ph, pw
    for y in tile_starts(h, s, rule.stride):
        for x in tile_starts(w, s, rule.stride):
            m = mask[y : y + s, x : x + s]
            im = image[y : y + s, x : x + s]
            empty = float(np.mean((m == num_classes) | (m == IGNORE_INDEX)))
            if empty > rule.max_background:
                yield x, y, im, m, None, "background"
                continue
            label = mask_to_label(m, num_classes, rule.min_fraction)
            if not label.any():
                yield x, y, im, m, None, "no_class"
                continue
            yield x, y, im, m, label, ""


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(path, buf.getvalue())


def build_patch_dataset(
    img_dir: str | Path,
    mask_dir: str | Path,
    out: str | Path,
    *,
    fmt: str = "bcss_wsss",
    rule: PatchRule = PatchRule(),
    class_names: Sequence[str] | None = None,
    train_stems: Sequence[str] | None = None,
    val_stems: Sequence[str] = (),
    test_stems: Sequence[str] = (),
    write_masks: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tile image + mask pairs into a weakly labelled training folder (+ held-out splits).

    Args:
        img_dir: folder of RGB images.
        mask_dir: folder of index masks (PNG, mode L or P), paired by file stem;
            values ``0..C-1`` classes, ``C`` background, 255 ignore.
        out: dataset folder to write.
        fmt: naming convention (see the module docstring).
        rule: tiling and labelling rule.
        class_names: tissue classes; default the format's (required for ``csv``).
        train_stems: images to tile for training (default: all not held out).
        val_stems: images copied whole to ``out/val/img`` + ``mask``.
        test_stems: images copied whole to ``out/test/img`` + ``mask``.
        write_masks: also write each training patch's true mask and a
            ``supervised/manifest.csv`` for a fully supervised run.
        progress: show a progress bar.
        overwrite: replace the patch dataset an earlier call wrote in ``out``
            (its outputs are deleted first); without it such a folder is refused.

    Returns:
        The summary written to ``out/patches.json`` (rule, counts, splits).

    Raises:
        ConfigError: unknown format, class names that do not fit it, or a stem
            in two splits.
        DataError: unreadable or mismatched files (named), masks that do not fit
            the format (named, with the ``--format`` that fits), unknown stems, no
            patch kept, or ``out`` already holds a patch dataset (without ``overwrite``).
    """
    if fmt not in PATCH_FORMATS:
        raise ConfigError(f"unknown patch format {fmt!r}; choose one of {', '.join(PATCH_FORMATS)}")
    if class_names is None:
        if fmt == "csv":
            raise ConfigError("format csv needs class names (e.g. --class-names TUM,STR,NOR)")
        class_names = FORMATS[fmt].class_names
    class_names = [str(c) for c in class_names]
    c = len(class_names)
    if fmt != "csv" and c != FORMATS[fmt].num_classes:
        raise ConfigError(
            f"format {fmt} names files with {FORMATS[fmt].num_classes} classes "
            f"({', '.join(FORMATS[fmt].class_names)}) but {c} were given; use --format csv "
            "for another class count"
        )
    pairs = pair_files(img_dir, mask_dir)
    by_stem = {img.stem: (img, msk) for img, msk in pairs}
    held = {"val": list(val_stems), "test": list(test_stems)}
    if set(held["val"]) & set(held["test"]):
        raise ConfigError(
            f"images in both val and test: {sorted(set(val_stems) & set(test_stems))}"
        )
    held_set = set(held["val"]) | set(held["test"])
    train = [s for s in by_stem if s not in held_set] if train_stems is None else list(train_stems)
    overlap = held_set & set(train)
    if overlap:
        raise ConfigError(f"images both held out and used for training: {sorted(overlap)}")
    unknown = sorted((held_set | set(train)) - set(by_stem))
    if unknown:
        raise DataError(f"{img_dir}: no image with stem(s) {unknown[:10]}")
    _check_masks_fit([by_stem[st][1] for st in [*train, *held_set]], fmt, class_names)
    out = Path(out)
    _prepare_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    # marks the folder as this builder's while it works (the summary replaces it at the end)
    atomic_write_json(
        out / "patches.json",
        {
            "status": "incomplete",
            "format": fmt,
            "class_names": class_names,
            "splits": {"train": train, **held},
        },
    )
    train_dir = out / ("training" if fmt == "bcss_wsss" else "train")
    train_dir.mkdir(parents=True, exist_ok=True)
    sup_dir = out / "supervised"
    if write_masks:
        (sup_dir / "masks").mkdir(parents=True, exist_ok=True)
    class_patches = np.zeros(c, np.int64)
    pixels = np.zeros(c + 1, np.int64)
    dropped = {"background": 0, "no_class": 0}
    per_image: dict[str, int] = {}
    csv_rows = [["image", *class_names]]
    manifest = [["image", "mask", "label"]]
    kept = 0
    for stem in tqdm(train, desc="patches", disable=not progress, unit="img"):
        img_path, mask_path = by_stem[stem]
        image = read_image(img_path)
        mask = read_mask(mask_path, c, expected_hw=image.shape[:2])
        per_image[stem] = 0
        for x, y, im, m, label, reason in tile_pair(image, mask, c, rule):
            if label is None:
                dropped[reason] += 1
                continue
            name = patch_name(stem, x, y, label, fmt)
            save_png(train_dir / name, im)
            if write_masks:
                save_png(sup_dir / "masks" / f"{Path(name).stem}.png", m)
                manifest.append(
                    [
                        str((train_dir / name).resolve()),
                        f"masks/{Path(name).stem}.png",
                        " ".join(str(int(v)) for v in label),
                    ]
                )
            if fmt == "csv":
                csv_rows.append([f"{train_dir.name}/{name}", *(str(int(v)) for v in label)])
            class_patches += label
            valid = m[m != IGNORE_INDEX].astype(np.int64)
            pixels += np.bincount(valid[valid <= c], minlength=c + 1)[: c + 1]
            per_image[stem] += 1
            kept += 1
    if train and kept == 0:
        raise DataError(
            f"no patch kept from {len(train)} image(s) of {img_dir}: every tile was mostly "
            f"background (> {rule.max_background}) or had no class >= {rule.min_fraction}; "
            "lower --size, raise --max-background or check the masks"
        )
    if fmt == "csv":
        _write_csv(out / "train.csv", csv_rows)
    if write_masks:
        _write_csv(sup_dir / "manifest.csv", manifest)
    for split, stems in held.items():
        if not stems:
            continue
        (out / split / "img").mkdir(parents=True, exist_ok=True)
        (out / split / "mask").mkdir(parents=True, exist_ok=True)
        rows = [["image", "mask", *class_names]]
        for stem in stems:
            img_path, mask_path = by_stem[stem]
            image = read_image(img_path)
            mask = read_mask(mask_path, c, expected_hw=image.shape[:2])  # validate before copying
            shutil.copyfile(img_path, out / split / "img" / img_path.name)
            shutil.copyfile(mask_path, out / split / "mask" / f"{stem}{mask_path.suffix}")
            label = mask_to_label(mask, c, rule.min_fraction)
            rows.append(
                [f"{split}/img/{img_path.name}", f"{split}/mask/{stem}{mask_path.suffix}"]
                + [str(int(v)) for v in label]
            )
        if fmt == "csv":
            _write_csv(out / f"{split}.csv", rows)
    summary = {
        "source": {"images": str(img_dir), "masks": str(mask_dir)},
        "format": fmt,
        "class_names": class_names,
        "rule": {
            **asdict(rule),
            "label": "a class is present when it covers >= min_fraction of the patch's "
            "labelled (non-255) pixels",
            "drop": "patches with background + padding > max_background, or with no class",
            "edges": "last tile moved inward to the border; images smaller than size padded "
            "with white, padding ignored (255) in the mask",
        },
        "patches": kept,
        "dropped": dropped,
        "patches_with_class": dict(zip(class_names, class_patches.tolist())),
        "pixel_fraction": dict(
            zip([*class_names, "background"], (pixels / max(1, pixels.sum())).round(4).tolist())
        ),
        "patches_per_image": per_image,
        "splits": {"train": train, **held},
        "supervised_manifest": str(sup_dir / "manifest.csv") if write_masks else None,
    }
    atomic_write_json(out / "patches.json", summary)
    log.info(
        "wrote %d patches from %d images to %s (dropped %s)", kept, len(train), train_dir, dropped
    )
    return summary


def _check_masks_fit(masks: Sequence[Path], fmt: str, class_names: Sequence[str]) -> None:
    """Refuse (before anything is written) masks that cannot be of ``fmt``; warn on doubt."""
    c = len(class_names)
    seen: set[int] = set()
    grey = 0
    for path in masks:
        info = inspect_mask(path)
        if info is None:
            continue  # read_mask names the unreadable file
        problem = mask_format_problem(info, fmt, class_names)
        if problem:
            raise DataError(problem)
        seen.update(info.values)
        grey += info.background is None
    if masks and grey and c not in seen and (c - 1) in seen:
        log.warning(
            "no mask uses the background value %d of --format %s, and %d (%s) is in them: if %d "
            "is your background, use %s",
            c,
            fmt,
            c - 1,
            class_names[c - 1],
            c - 1,
            formats_for(c - 1),
        )


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to write into an earlier patch dataset unless ``overwrite`` (then delete it).

    An unfinished one (``patches.json`` still says ``incomplete``: the call that wrote
    it failed or was killed) is replaced without ``overwrite``.

    Only what the earlier run recorded in ``patches.json`` is deleted; a training
    folder with files but no ``patches.json`` (not written by lpdseg) is always refused.
    """
    info = out / "patches.json"
    train_dirs = [out / n for n in ("training", "train") if (out / n).is_dir()]
    busy = [d for d in train_dirs if any(d.iterdir())]
    if not info.is_file():
        if busy:
            raise DataError(
                f"{busy[0]} already holds files that `lpdseg patches` did not write (no "
                f"{info}); write the patches to another --out (an empty or new folder)"
            )
        return
    try:
        earlier = json.loads(info.read_text())
    except (OSError, ValueError):
        earlier = {}
    unfinished = earlier.get("status") == "incomplete"
    state = "an unfinished" if unfinished else "a"
    # an unfinished dataset is a failed or killed earlier call of ours: nothing in it is a
    # result, so a retry replaces it without --overwrite
    if not overwrite and not unfinished:
        raise DataError(
            f"{out} already holds {state} patch dataset ({info}); write to another --out, or "
            "pass --overwrite to replace it (its patches, masks and splits are deleted first)"
        )
    fmt = earlier.get("format")
    splits = earlier.get("splits") or {}
    doomed = [out / ("training" if fmt == "bcss_wsss" else "train"), out / "supervised"]
    doomed += [out / split for split in ("val", "test") if splits.get(split)]
    for folder in doomed:
        if folder.is_dir():
            shutil.rmtree(folder)
    for name in ("train.csv", "val.csv", "test.csv"):
        if fmt == "csv" and (out / name).is_file():
            (out / name).unlink()
    info.unlink()
    if unfinished and not overwrite:
        log.warning("removed the unfinished patch dataset an interrupted call left in %s", out)
    else:
        log.warning("--overwrite: removed the earlier patch dataset in %s", out)


def split_stems(
    stems: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Random split of image stems into (train, val, test) by image, seeded."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError("val and test fractions must be >= 0 and sum to less than 1")
    order = [str(s) for s in np.random.default_rng(seed).permutation(sorted(stems))]
    n_val = int(round(val_fraction * len(order)))
    n_test = int(round(test_fraction * len(order)))
    val, test = order[:n_val], order[n_val : n_val + n_test]
    train = order[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)
