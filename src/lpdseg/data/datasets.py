"""Readers for the dataset folder layouts of docs/data.md, all producing the same samples.

Class convention across lpdseg: tissue classes are ``0..C-1``, background is
``C`` and ``255`` is ignored. Every supported mask format already follows it
(BCSS-WSSS and LUAD-HistoSeg: 0..3 + 4 background; WSSS4LUAD palette masks:
0..2 + 3 background), so masks are read as stored and only checked.

Layouts (``root`` is the dataset folder):

- ``train``: ``root/training/`` or ``root/train/`` (the first that exists),
  flat folder of patches whose image-level label is in the file name. If
  neither exists but ``root`` itself holds image files, ``root`` is the
  training folder.
- ``val``: ``root/val/`` or ``root/valid/`` with ``img/`` and ``mask/``; if
  neither exists, ``root/img`` + ``root/mask`` (the layout of the shared
  WSSS4LUAD subset).
- ``test``: ``root/test/`` with ``img/`` and ``mask/``.
- ``csv``: a manifest with an ``image`` column, one 0/1 column per class
  (class names = headers, in order), an optional ``mask`` column and an
  optional ``split`` column (``train``/``val``/``test``).

Every problem names the file, what is wrong and what to do. With
``skip_bad=True`` a bad item is listed as a :class:`BadFile`, logged, and left
out instead. What to do is said in the caller's words (:class:`FixHints`): a
run config's ``data.skip_bad=true``, a command's ``--skip-bad`` or this
module's ``skip_bad=True``.
"""

from __future__ import annotations

import csv
import inspect
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpdseg.errors import ConfigError, DataError
from lpdseg.imageio import (  # noqa: F401 - read_image / read_mask are re-exported
    IMAGE_SUFFIXES,
    MIN_IMAGE_SIDE,
    image_header_size,
    read_image,
    read_mask,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
# Columns of a CSV manifest that are not classes.
CSV_RESERVED = ("image", "mask", "split")
# Files that operating systems drop into folders; never data.
_JUNK_NAMES = {"Thumbs.db", "desktop.ini"}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class FixHints:
    """How the user of a caller turns on what an error message suggests.

    The same problem has a different fix from Python, from a run config and from
    a command: each caller passes the spelling that works for its user.

    Attributes:
        skip_bad: how to skip bad files, completing "... or <skip_bad> to skip bad files".
        outside_root: how to allow CSV paths outside the CSV's folder, or ``""``
            where the caller has no such option.
        root: how to point at the dataset folder.
    """

    skip_bad: str = "pass skip_bad=True"
    outside_root: str = "pass allow_outside_root=True to list_split"
    root: str = "pass the dataset folder as root"

    def skip_advice(self) -> str:
        """``"fix or remove it, or <how> to skip bad files (they are logged and listed)"``."""
        return (
            f"fix or remove it, or {self.skip_bad} to skip bad files (they are logged and listed)"
        )

    def with_skip_advice(self, exc: DataError) -> DataError:
        """``exc`` (which names its file) with how to skip bad files added."""
        return DataError(
            f"{exc}; to go on without it, {self.skip_bad} (bad files are skipped and listed)"
        )


#: The Python API: list_split's own keywords.
API_HINTS = FixHints()
#: Code driven by a run config (train, bank, pseudo, eval): its ``data.*`` keys.
CONFIG_HINTS = FixHints(
    skip_bad="set data.skip_bad=true", outside_root="", root="point data.root at the dataset folder"
)


def cli_hints(root_flag: str = "--data") -> FixHints:
    """Hints for a command with a ``--skip-bad`` flag whose dataset folder is ``root_flag``."""
    return FixHints(
        skip_bad="pass --skip-bad", outside_root="", root=f"pass the dataset folder as {root_flag}"
    )


# ------------------------------------------------------------------ formats
@dataclass(frozen=True)
class DatasetFormat:
    """A dataset format: its tissue classes and RGB normalisation.

    Attributes:
        name: format name (``bcss_wsss``, ``luad_histoseg``, ``wsss4luad`` or ``csv``).
        class_names: tissue classes in label order; background is index ``len(class_names)``.
        mean: RGB mean in [0, 1] units.
        std: RGB standard deviation in [0, 1] units.
    """

    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ConfigError(f"dataset format {self.name!r} needs at least one class name")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"dataset format {self.name!r}: mean and std need 3 RGB values, std > 0 "
                f"(got mean={self.mean}, std={self.std})"
            )

    @property
    def num_classes(self) -> int:
        """Number of tissue classes ``C`` (background is index ``C``)."""
        return len(self.class_names)


FORMATS: dict[str, DatasetFormat] = {
    "bcss_wsss": DatasetFormat(
        "bcss_wsss",
        ("TUM", "STR", "LYM", "NEC"),
        (0.6679, 0.4779, 0.7062),
        (0.1737, 0.2256, 0.1982),
    ),
    "luad_histoseg": DatasetFormat(
        "luad_histoseg",
        ("TE", "NEC", "LYM", "TAS"),
        (0.6916, 0.5050, 0.7343),
        (0.1552, 0.2277, 0.1885),
    ),
    # docs/data.md gives no statistics for WSSS4LUAD: these are the pixel mean/std of
    # the shared real subset (31 val images + 4 train patches, background included).
    "wsss4luad": DatasetFormat(
        "wsss4luad", ("TUM", "STR", "NOR"), (0.7510, 0.5416, 0.6988), (0.2046, 0.2608, 0.1850)
    ),
}

_LABEL_EXAMPLES = {
    "bcss_wsss": "<id>+<slide>[1101].png",
    "luad_histoseg": "<name>-[1 0 0 1].png",
    "wsss4luad": "<slide>-<x>-<y>-[1, 1, 0].png",
}
_LABEL_RE = re.compile(r"\[([^\[\]]*)\]")


def get_format(name: str) -> DatasetFormat:
    """Return the built-in dataset format called ``name``.

    Args:
        name: ``bcss_wsss``, ``luad_histoseg`` or ``wsss4luad``.

    Returns:
        The format's classes and normalisation.

    Raises:
        ConfigError: unknown name (the message lists the valid ones); ``csv`` has
            no fixed classes, see :func:`csv_class_names`.
    """
    if name in FORMATS:
        return FORMATS[name]
    if name == "csv":
        raise ConfigError(
            "format 'csv' has no built-in classes: they are the CSV's label columns "
            "(see csv_class_names) or data.class_names"
        )
    raise ConfigError(f"unknown dataset format {name!r}; valid formats: {', '.join(FORMATS)}, csv")


def parse_label(filename: str | Path, fmt: str) -> np.ndarray:
    """Image-level label encoded in a training file name.

    Formats (the last ``[...]`` group of the name is the label):

    - ``bcss_wsss``: ``<id>+<slide>[1101].png`` (TUM, STR, LYM, NEC)
    - ``luad_histoseg``: ``...-[1 0 0 1].png`` (TE, NEC, LYM, TAS)
    - ``wsss4luad``: ``...-[1, 1, 0].png`` (tumor, stroma, normal)

    Separators are tolerated across formats (spaces, commas or none).

    Args:
        filename: file name or path.
        fmt: dataset format name.

    Returns:
        ``(C,)`` uint8 array of 0/1.

    Raises:
        DataError: no label in the name, wrong number of values, values other
            than 0/1, or no positive class (names the file).
        ConfigError: unknown format.
    """
    spec = get_format(fmt)
    c = spec.num_classes
    name = Path(filename).name
    order = ", ".join(spec.class_names)
    expected = f"expected {c} 0/1 values in brackets like {_LABEL_EXAMPLES[fmt]} (order {order})"
    groups = _LABEL_RE.findall(name)
    if not groups:
        raise DataError(f"{filename}: no image-level label in the file name; {expected}")
    content = groups[-1].strip()
    tokens = [t for t in re.split(r"[\s,;]+", content) if t]
    if len(tokens) == 1 and len(tokens[0]) > 1:
        tokens = list(tokens[0])  # bcss_wsss style: digits without separators
    if len(tokens) != c:
        raise DataError(
            f"{filename}: label [{content}] has {len(tokens)} values but {fmt} has {c} classes; "
            f"{expected}"
        )
    bad = sorted({t for t in tokens if t not in ("0", "1")})
    if bad:
        raise DataError(f"{filename}: label [{content}] has non-0/1 values {bad}; {expected}")
    label = np.array([int(t) for t in tokens], dtype=np.uint8)
    if not label.any():
        raise DataError(
            f"{filename}: label [{content}] has no positive class; a training patch needs at "
            f"least one of {order} (fix the name or remove the file)"
        )
    return label


# ------------------------------------------------------------------ samples
@dataclass(frozen=True)
class Sample:
    """One image with its image-level label and/or pixel mask.

    Attributes:
        image: image file.
        label: ``(C,)`` uint8 image-level label; ``None`` for val/test (derived
            from the mask when read, see :class:`MaskedDataset`).
        mask: index mask file, or ``None``.
    """

    image: Path
    label: np.ndarray | None = field(default=None, compare=False)
    mask: Path | None = None


@dataclass
class BadFile:
    """A file left out by ``skip_bad=True``, and why."""

    path: Path
    reason: str


class _Problems:
    """Raises on the first bad item, or collects them all with ``skip_bad``."""

    def __init__(self, skip_bad: bool, hints: FixHints = API_HINTS) -> None:
        self.skip_bad = skip_bad
        self.hints = hints
        self.bad: list[BadFile] = []

    def add(self, path: Path, reason: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{path}: {reason}; {self.hints.skip_advice()}")
        self.bad.append(BadFile(Path(path), reason))
        log.warning("skipping %s: %s", path, reason)


def _reason(exc: DataError, path: Path) -> str:
    """A DataError's message without its leading ``"<path>: "``."""
    return str(exc).removeprefix(f"{path}: ")


def _found_folders(root: Path) -> str:
    names = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
    return ", ".join(names) if names else "no folders"


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _folder_files(folder: Path) -> list[Path]:
    """Files of a folder (sorted), without hidden/OS junk; subfolders are logged."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name in _JUNK_NAMES:
            continue
        if p.is_dir():
            log.info("ignoring subfolder %s (only files directly in %s are read)", p, folder)
            continue
        files.append(p)
    return files


def _file_problem(
    path: Path, check_image: bool, what: str = "image", min_side: int = MIN_IMAGE_SIDE
) -> str | None:
    """Why ``path`` cannot be an image file, or ``None`` (cheap checks only).

    With ``check_image`` the header is read (:func:`lpdseg.imageio.image_header_size`,
    no pixels decoded): non-images named ``.png``, decompression bombs and images
    under ``min_side`` px are caught, as :func:`read_image` would refuse them.
    """
    if not _is_image_name(path):
        return (
            f"not an image file (suffix {path.suffix or 'none'!r}); expected one of "
            f"{', '.join(IMAGE_SUFFIXES)} (move other files out of the folder)"
        )
    if not path.is_file():
        return "does not exist"
    if path.stat().st_size == 0:
        return "is empty (0 bytes); re-export or remove it"
    if check_image:
        try:
            w, h = image_header_size(path, what)
        except DataError as exc:
            return _reason(exc, path)
        if min(w, h) < min_side:
            return (
                f"{what} is {h}x{w} pixels (H x W); {what}s must be at least {min_side} px on "
                "each side - remove it or use a larger crop"
            )
    return None


def _display_hw(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`read_image` gives it (EXIF orientation applied).

    From the header when the orientation is known without decoding (the usual
    case); a PNG whose EXIF block comes after its pixels is decoded.

    Raises:
        DataError: as :func:`lpdseg.imageio.image_header_size`.
    """
    w, h = image_header_size(path)  # the bomb / readability guard comes first
    orientation: int | None = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.format != "PNG":
                    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
                elif "exif" in im.info:
                    exif = Image.Exif()
                    exif.load(im.info["exif"])
                    orientation = int(exif.get(_EXIF_ORIENTATION, 1) or 1)
                elif b"eXIf" in path.read_bytes():  # EXIF after the pixels: PIL must decode
                    orientation = None
    except Exception:  # noqa: BLE001 - unreadable metadata: read_image ignores it too
        orientation = 1
    if orientation is None:
        return tuple(read_image(path).shape[:2])  # type: ignore[return-value]
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def check_masked_samples(
    samples: Sequence[Sample],
    num_classes: int,
    *,
    skip_bad: bool = False,
    hints: FixHints = API_HINTS,
) -> tuple[list[Sample], list[BadFile]]:
    """Check val/test samples before they are used: each mask as :class:`MaskedDataset` reads it.

    The image's header is read (readable, not a decompression bomb, at least
    :data:`~lpdseg.imageio.MIN_IMAGE_SIDE` px; its pixels are not decoded) and
    the mask is decoded: values in ``0..C-1``, ``C`` (background) or 255, and
    the image's size (EXIF orientation applied to both).

    Args:
        samples: samples with masks (``list_split(..., "val" | "test")``).
        num_classes: tissue classes ``C``.
        skip_bad: leave bad samples out (logged, returned) instead of raising.
        hints: how the caller's user skips bad files (the message says it).

    Returns:
        ``(usable samples, bad files)``; a bad mask is listed under the mask's path.

    Raises:
        DataError: the first bad sample, without ``skip_bad``; names the file and the fix.
    """
    problems = _Problems(skip_bad, hints)
    good = []
    for s in samples:
        if s.mask is None:
            problems.add(s.image, "has no mask; evaluation samples need one")
            continue
        reason = _file_problem(s.image, False)
        hw = (0, 0)
        if reason is None:
            try:
                hw = _display_hw(s.image)
            except DataError as exc:
                reason = _reason(exc, s.image)
        if reason is None and min(hw) < MIN_IMAGE_SIDE:
            reason = (
                f"image is {hw[0]}x{hw[1]} pixels (H x W); images must be at least "
                f"{MIN_IMAGE_SIDE} px on each side - remove it or use a larger crop"
            )
        if reason is not None:
            problems.add(s.image, reason)
            continue
        try:
            read_mask(s.mask, num_classes, expected_hw=hw)
        except DataError as exc:
            problems.add(s.mask, f"{_reason(exc, s.mask)} (image {s.image})")
            continue
        good.append(s)
    return good, problems.bad


def list_split(
    root: str | Path,
    fmt: str,
    split: str,
    *,
    skip_bad: bool = False,
    csv_path: str | Path | None = None,
    allow_outside_root: bool = False,
    check_images: bool | None = None,
    hints: FixHints = API_HINTS,
) -> tuple[list[Sample], list[BadFile]]:
    """List the samples of one split of a dataset folder.

    See the module docstring for the layouts. ``train`` samples carry the label
    from the file name (or CSV columns); ``val``/``test`` samples carry a mask
    and ``label=None``. For ``val``, if neither ``val/`` nor ``valid/`` exists,
    ``root/img`` + ``root/mask`` are used. Images and masks are paired by stem.

    For ``fmt="csv"`` the manifest is ``csv_path`` (relative paths are tried
    as given, then under ``root``) or else ``root/<split>.csv``. Paths in it
    are relative to the CSV's folder; a path that resolves outside that folder
    is refused unless ``allow_outside_root``. With a ``split`` column only the
    rows of ``split`` are used (``valid`` counts as ``val``).

    Args:
        root: dataset folder.
        fmt: ``bcss_wsss``, ``luad_histoseg``, ``wsss4luad`` or ``csv``.
        split: ``train``, ``val`` or ``test``.
        skip_bad: leave bad items out (returned as :class:`BadFile`, logged)
            instead of raising on the first.
        csv_path: manifest for ``fmt="csv"``.
        allow_outside_root: let CSV paths point outside the CSV's folder.
        check_images: also read each image's header, no pixels decoded
            (catches non-image files named ``.png``, decompression bombs and
            images under 8 px); ``None`` means "when ``skip_bad``". Empty files
            and wrong suffixes are always caught.
        hints: how the caller's user fixes what a message names (default:
            this function's keywords; see :data:`CONFIG_HINTS`, :func:`cli_hints`).

    Returns:
        ``(samples sorted by image path, bad files)``.

    Raises:
        DataError: missing or empty folder, or a bad item without ``skip_bad``
            (the message names the path, what was expected and what was found).
        ConfigError: unknown format or split.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if fmt != "csv":
        get_format(fmt)
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"dataset folder {root} {what}; {hints.root}")
    check = skip_bad if check_images is None else check_images
    problems = _Problems(skip_bad, hints)
    if fmt == "csv":
        samples = _list_csv(root, split, csv_path, allow_outside_root, check, problems)
    elif split == "train":
        samples = _list_train(root, fmt, check, problems)
    else:
        samples = _list_masked(root, split, check, problems)
    samples.sort(key=lambda s: str(s.image))
    if problems.bad:
        log.warning(
            "%d bad file(s) skipped in %s split of %s",
            len(problems.bad),
            split,
            root,
        )
    return samples, problems.bad


def _list_train(root: Path, fmt: str, check: bool, problems: _Problems) -> list[Sample]:
    folder = next((root / n for n in ("training", "train") if (root / n).is_dir()), None)
    if folder is None:
        if any(_is_image_name(p) for p in root.iterdir() if p.is_file()):
            folder = root  # a bare folder of labelled patches
        else:
            raise DataError(
                f"{root}: no training folder; expected {root / 'training'}/ or {root / 'train'}/ "
                f"with labelled patches like {_LABEL_EXAMPLES[fmt]}; found {_found_folders(root)}"
            )
    files = _folder_files(folder)
    if not files:
        raise DataError(
            f"{folder}: training folder is empty; expected patches named like {_LABEL_EXAMPLES[fmt]}"
        )
    samples = []
    for path in files:
        reason = _file_problem(path, check)
        if reason is None:
            try:
                label = parse_label(path.name, fmt)
            except DataError as exc:
                reason = str(exc).removeprefix(f"{path.name}: ")
        if reason is not None:
            problems.add(path, reason)
            continue
        samples.append(Sample(path, label, None))
    return samples


def _split_folders(root: Path, split: str) -> tuple[Path, Path]:
    names = ("val", "valid") if split == "val" else ("test",)
    for n in names:
        base = root / n
        if base.is_dir():
            img, mask = base / "img", base / "mask"
            for sub in (img, mask):
                if not sub.is_dir():
                    raise DataError(
                        f"{sub}: folder missing; {split} split {base} needs img/ and mask/ "
                        f"(found {_found_folders(base)})"
                    )
            return img, mask
    if split == "val" and (root / "img").is_dir() and (root / "mask").is_dir():
        return root / "img", root / "mask"
    alt = " or img/+mask/ directly in the root" if split == "val" else ""
    wanted = " or ".join(f"{root / n}/img + {n}/mask" for n in names)
    raise DataError(
        f"{root}: no {split} split; expected {wanted}{alt}; found {_found_folders(root)}"
    )


def _list_masked(root: Path, split: str, check: bool, problems: _Problems) -> list[Sample]:
    img_dir, mask_dir = _split_folders(root, split)
    images = _folder_files(img_dir)
    if not images:
        raise DataError(
            f"{img_dir}: image folder is empty; expected {split} images paired with masks in {mask_dir}"
        )
    masks: dict[str, list[Path]] = {}
    for m in _folder_files(mask_dir):
        reason = _file_problem(m, check, "mask", 1)
        if reason is not None:
            problems.add(m, reason)
            continue
        masks.setdefault(m.stem, []).append(m)
    stems = set()
    samples = []
    for path in images:
        stems.add(path.stem)
        reason = _file_problem(path, check)
        found = masks.get(path.stem, [])
        if reason is None and not found:
            reason = f"has no mask; expected {mask_dir / (path.stem + '.png')}"
        elif reason is None and len(found) > 1:
            reason = f"has several masks ({', '.join(p.name for p in found)}); keep one"
        if reason is not None:
            problems.add(path, reason)
            continue
        samples.append(Sample(path, None, found[0]))
    orphans = sorted(set(masks) - stems)
    if orphans:
        log.warning(
            "%d mask(s) in %s have no image (e.g. %s); they are not used",
            len(orphans),
            mask_dir,
            masks[orphans[0]][0].name,
        )
    return samples


# ----------------------------------------------------------------- CSV
def _resolve_csv(root: Path, split: str, csv_path: str | Path | None) -> Path:
    if csv_path is not None:
        p = Path(csv_path)
        if not p.is_absolute() and not p.is_file() and (root / p).is_file():
            p = root / p
        if not p.is_file():
            raise DataError(
                f"{p}: CSV manifest not found; check data.csv (relative paths are tried "
                f"as given, then under {root})"
            )
        return p
    names = [f"{split}.csv"] + (["valid.csv"] if split == "val" else [])
    for n in names:
        if (root / n).is_file():
            return root / n
    raise DataError(
        f"{root}: format csv needs a manifest; pass csv_path (data.csv) or add "
        f"{' or '.join(str(root / n) for n in names)}"
    )


def csv_class_names(csv_path: str | Path) -> tuple[str, ...]:
    """Class names of a CSV manifest: its label columns, in header order.

    Args:
        csv_path: the manifest.

    Returns:
        Every column except ``image``, ``mask`` and ``split``.

    Raises:
        DataError: unreadable file, no ``image`` column or no class column.
    """
    csv_path = Path(csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the CSV manifest ({exc})") from exc
    return _csv_classes(csv_path, header)


def _csv_classes(csv_path: Path, header: Sequence[str] | None) -> tuple[str, ...]:
    if not header or "image" not in header:
        raise DataError(
            f"{csv_path}: CSV needs a header with an 'image' column, one 0/1 column "
            f"per class and optionally 'mask' and 'split' (header: {header})"
        )
    classes = tuple(h for h in header if h not in CSV_RESERVED)
    if not classes:
        raise DataError(f"{csv_path}: CSV has no class columns; add one 0/1 column per class")
    return classes


def _csv_path(
    cell: str, base: Path, allow_outside: bool, hints: FixHints
) -> tuple[Path, str | None]:
    p = Path(cell.strip())
    full = p if p.is_absolute() else base / p
    if not allow_outside and not full.resolve().is_relative_to(base.resolve()):
        allow = f", or {hints.outside_root}" if hints.outside_root else ""
        return full, (
            f"path {cell!r} resolves outside the CSV's folder {base}; move the file under "
            f"it, or move the CSV to a folder that holds its files (paths in it are "
            f"relative to its folder){allow}"
        )
    return full, None


def _list_csv(
    root: Path,
    split: str,
    csv_path: str | Path | None,
    allow_outside: bool,
    check: bool,
    problems: _Problems,
) -> list[Sample]:
    path = _resolve_csv(root, split, csv_path)
    base = path.parent
    aliases = {"valid": "val", "training": "train"}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            classes = _csv_classes(path, reader.fieldnames)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the CSV manifest ({exc})") from exc
    if "split" in (reader.fieldnames or ()):
        rows = [
            (n, r)
            for n, r in rows
            if aliases.get(
                (r.get("split") or "").strip().lower(), (r.get("split") or "").strip().lower()
            )
            == split
        ]
    if not rows:
        raise DataError(
            f"{path}: CSV lists no {split} images (a 'split' column, if present, "
            f"must say train, val or test)"
        )
    has_mask = "mask" in (reader.fieldnames or ())
    samples = []
    for line, row in rows:
        where = f"{path} line {line}"
        cell = (row.get("image") or "").strip()
        if not cell:
            problems.add(path, f"line {line}: empty 'image' cell")
            continue
        image, reason = _csv_path(cell, base, allow_outside, problems.hints)
        if reason is None:
            reason = _file_problem(image, check)
        if reason is not None:
            reason = f"{reason} (listed in {where})"
        label = None
        if reason is None:
            values = [(row.get(c) or "").strip() for c in classes]
            bad = {c: v for c, v in zip(classes, values, strict=True) if v not in ("0", "1")}
            if bad:
                reason = f"label columns must be 0 or 1, got {bad} in {where}"
            else:
                label = np.array([int(v) for v in values], dtype=np.uint8)
                if split == "train" and not label.any():
                    reason = (
                        f"label has no positive class in {where}; a training image needs "
                        f"at least one of {', '.join(classes)}"
                    )
        mask = None
        mcell = (row.get("mask") or "").strip() if has_mask else ""
        if reason is None and mcell:
            mask, reason = _csv_path(mcell, base, allow_outside, problems.hints)
            if reason is None:
                reason = _file_problem(mask, check, "mask", 1)
            if reason is not None:
                reason = f"mask {mask}: {reason} (listed in {where})"
        if reason is None and split != "train" and mask is None:
            reason = (
                f"{split} rows need a 'mask' ({where}); add masks, or a 'split' column "
                "to keep train and evaluation rows in one CSV"
            )
        if reason is not None:
            problems.add(image if image is not None else path, reason)
            continue
        samples.append(Sample(image, label if split == "train" else None, mask))
    return samples


# ----------------------------------------------------------------- reading
# read_image / read_mask live in lpdseg.imageio (imported above) and are re-exported here.


def mask_to_label(mask: np.ndarray, num_classes: int, min_fraction: float = 0.0) -> np.ndarray:
    """Image-level label of a mask: the tissue classes present.

    A class is present if it covers at least ``min_fraction`` of the labelled
    (non-255) pixels, background included; with ``min_fraction=0`` any pixel
    counts. Background (``num_classes``) is never part of the label.

    Args:
        mask: ``H x W`` integer index mask (numpy array or tensor).
        num_classes: number of tissue classes ``C``.
        min_fraction: minimum area fraction, in ``[0, 1)``; 0 (the default here:
            the classes of a ground-truth mask) or, for labels of training
            patches, a run config's ``data.label_min_fraction`` (default
            :data:`lpdseg.catalog.LABEL_MIN_FRACTION`).

    Returns:
        ``(C,)`` uint8 array of 0/1.
    """
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    flat = m.reshape(-1).astype(np.int64)
    flat = flat[(flat >= 0) & (flat != IGNORE_INDEX)]
    counts = np.bincount(flat[flat < num_classes], minlength=num_classes)[:num_classes]
    if flat.size == 0:
        return np.zeros(num_classes, np.uint8)
    if min_fraction == 0.0:
        return (counts > 0).astype(np.uint8)
    return ((counts > 0) & (counts / flat.size >= min_fraction)).astype(np.uint8)


# ----------------------------------------------------------------- datasets
def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class MaskedDataset(Dataset):
    """Images with pixel masks (val/test), at full size (sizes may vary).

    Items: ``{"image": 3 x H x W float, "mask": H x W long, "label": (C,) float,
    "name": str}``; the label lists the classes present in the mask (after the
    transform, if it takes a mask).
    """

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        transform: Callable,
        min_fraction: float = 0.0,
        *,
        skip_bad: bool = False,
        hints: FixHints = API_HINTS,
    ) -> None:
        """Args:
        samples: samples with masks (best checked first, see :func:`check_masked_samples`).
        num_classes: number of tissue classes ``C``.
        transform: image transform (e.g. EvalTransform); if it has a ``mask``
            parameter it is called as ``transform(image, mask)``.
        min_fraction: area a class must cover to be in the label (see mask_to_label).
        skip_bad: an image or mask that fails to decode gives ``None`` (logged)
            instead of raising; the collate function drops it.
        hints: how the caller's user skips bad files (said in the error).
        """
        self.samples = list(samples)
        self.num_classes = num_classes
        self.transform = transform
        self.min_fraction = min_fraction
        self.skip_bad = skip_bad
        self.hints = hints
        self._joint = _accepts(transform, "mask")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        if sample.mask is None:
            raise DataError(f"{sample.image}: no mask; evaluation samples need one")
        try:
            image = read_image(sample.image)
            mask = read_mask(sample.mask, self.num_classes, expected_hw=image.shape[:2])
        except DataError as exc:
            if not self.skip_bad:
                raise self.hints.with_skip_advice(exc) from exc
            log.warning("skipping %s: %s", sample.image, exc)
            return None  # type: ignore[return-value] - dropped by the collate function
        if self._joint:
            tensor, mask_t = self.transform(image, mask)
            mask_t = torch.as_tensor(mask_t).long()
        else:
            tensor, mask_t = self.transform(image), torch.from_numpy(mask.astype(np.int64))
        label = mask_to_label(mask_t.numpy(), self.num_classes, self.min_fraction)
        return {
            "image": tensor,
            "mask": mask_t,
            "label": torch.from_numpy(label.astype(np.float32)),
            "name": sample.image.name,
        }
