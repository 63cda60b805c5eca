"""Finding and decoding images: the one place that knows image files.

``IMAGE_SUFFIXES`` are the files lpdseg reads as images; :func:`expand_inputs`
turns the files, folders and globs a user passes into image paths;
:func:`read_image` and :func:`read_mask` decode them. Every reader of pixels
(datasets, prediction, patches, plain images opened as slides) goes through
these, so one rule holds everywhere:

- 16-bit values ``v`` become ``round(v / 257)`` (0 -> 0, 257 -> 1, 65535 -> 255),
  grey and colour alike (:func:`uint16_to_uint8`);
- transparency is composited on white (:func:`composite_on_white`);
- palette images give their colours (masks: their indices);
- the EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a photo
  shown 32 wide and 64 tall is read 64 x 32 (H x W), masks too;
- an image with more than :func:`max_image_pixels` pixels is refused before it
  is decoded (decompression bombs), and one smaller than
  :data:`MIN_IMAGE_SIDE` px on a side is refused as unusable;
- every failure is a :class:`~lpdseg.errors.DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lpdseg.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
#: Images smaller than this on either side are refused (no model can use them).
MIN_IMAGE_SIDE = 8
#: Environment variable that sets the largest image (in pixels) decoded; 0 = no limit.
MAX_PIXELS_ENV = "LPDSEG_MAX_IMAGE_PIXELS"
#: Default limit: PIL's own hard limit (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, ~13 400^2),
#: about 0.5 GB of RGB pixels.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
_IGNORE_INDEX = 255
_EXIF_ORIENTATION = 0x0112
_PIL_LIMIT_LOCK = threading.Lock()


# ---------------------------------------------------------------- finding
def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image suffix (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their images, sorted) and globs -> image paths.

    Raises:
        DataError: an input matches nothing, or a folder holds no images.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and is_image_file(q))
            if not found:
                raise DataError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item)))
            if not matches:
                raise DataError(f"{item} is not a file, folder or matching glob")
            paths.extend(m for m in matches if m.is_file())
    return paths


# ---------------------------------------------------------------- pixel rules
def uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit values (clipped to 0..65535) -> 8 bits: ``round(v / 257)``.

    257 = 65535 / 255, so 0, 257 and 65535 map exactly to 0, 1 and 255 and
    every 8-bit value ``k`` stored as 16 bits (``k * 257``) comes back as ``k``.
    """
    v = np.clip(np.asarray(values).astype(np.int64), 0, 65535)
    return ((v + 128) // 257).astype(np.uint8)  # integer round(v / 257): never a tie


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite a non-premultiplied ``H x W x 4`` uint8 image on white.

    ``out = round((rgb * a + 255 * (255 - a)) / 255)``, exact for ``a`` in {0, 255}.

    Args:
        rgba: RGBA pixels (alpha 0 = transparent).

    Returns:
        ``H x W x 3`` uint8 RGB.
    """
    if (rgba[..., 3] == 255).all():  # opaque (the usual case): no arithmetic needed
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255  # x / 255 is never a tie
    return out.astype(np.uint8)


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Decoded pixels -> ``H x W x 3`` uint8 RGB, by the rules above.

    Args:
        arr: gray (``H x W`` or ``H x W x 1``), gray + alpha, RGB or RGBA
            pixels; uint8, uint16 (:func:`uint16_to_uint8`) or bool.

    Raises:
        ValueError: another dtype or shape (the message completes "<file> ...").
    """
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = uint16_to_uint8(arr)
    elif arr.dtype != np.uint8:
        raise ValueError(
            f"has {arr.dtype} pixels; only 8- or 16-bit images are supported - convert it "
            "to 8-bit RGB"
        )
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"has pixel array shape {arr.shape}; expected a gray, RGB or RGBA image (H x W [x C])"
        )
    if arr.shape[2] == 2:  # gray + alpha
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
    if arr.shape[2] == 4:
        return composite_on_white(arr)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------- limits
def max_image_pixels() -> int | None:
    """Largest image (width x height) decoded: ``$LPDSEG_MAX_IMAGE_PIXELS``, None = no limit.

    Raises:
        DataError: the variable is set but is not a whole number >= 0.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(raw)) if "e" in raw.lower() else int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise DataError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} must be a whole number of "
            "pixels (0 = no limit)"
        )
    return value or None


def _check_pixels(path: Path, what: str, wh: tuple[int, int], limit: int | None) -> None:
    w, h = int(wh[0]), int(wh[1])
    if limit is not None and w * h > limit:
        raise DataError(
            f"{path}: {what} is {w}x{h} = {w * h:,} pixels, more than the {limit:,} "
            "lpdseg decodes (a guard against decompression bombs); if you trust the file, "
            f"raise the limit with the environment variable {MAX_PIXELS_ENV}={w * h} "
            f"(0 = no limit), or save it as a pyramidal tiled TIFF "
            "(vips tiffsave --tile --pyramid) and read it as a slide (lpdseg slide)"
        )


def _png_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (the first 24 bytes), or None."""
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return w, h
    return None


@contextlib.contextmanager
def _pil_limit(limit: int | None) -> Iterator[None]:
    """Lift PIL's own bomb limit to ours while opening (only when ours is larger)."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and (limit is None or limit > 2 * pil):
        with _PIL_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = None if limit is None else limit
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = pil
    else:
        yield


# ---------------------------------------------------------------- decoding
def _open_header(path: Path, what: str, limit: int | None) -> Image.Image:
    """Open ``path`` with PIL (header parsed, size checked, pixels not decoded)."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: {what} file is empty (0 bytes); re-export or remove it")
    try:
        header = _png_header_size(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot open {what} ({exc})") from exc
    if header is not None:  # refused before PIL parses anything
        _check_pixels(path, what, header, limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with _pil_limit(limit):
                im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise DataError(
                f"{path}: {what} is larger than the {limit:,} pixels lpdseg decodes ({exc}); "
                f"if you trust the file, raise the limit with the environment variable "
                f"{MAX_PIXELS_ENV} (0 = no limit)"
            ) from exc
        except UnidentifiedImageError as exc:
            raise DataError(
                f"{path}: not a readable image (PIL cannot identify it); expected "
                f"PNG/JPEG/TIFF, re-export or remove it"
            ) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise DataError(f"{path}: cannot open {what} ({exc})") from exc
    try:
        _check_pixels(path, what, im.size, limit)
    except DataError:
        im.close()
        raise
    return im


def image_header_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """``(width, height)`` as stored in an image's header, without decoding its pixels.

    A cheap check of a file (EXIF orientation is not applied).

    Raises:
        DataError: missing, empty, not an image, or over :func:`max_image_pixels`.
    """
    path = Path(path)
    with _open_header(path, what, max_image_pixels()) as im:
        return int(im.size[0]), int(im.size[1])


def _open(path: Path, what: str, min_side: int) -> tuple[Image.Image, bool]:
    """Open, check and fully decode ``path`` with PIL, or raise a DataError naming it.

    Returns the image and whether it has 16 bits per colour channel: such an
    image is opened but not decoded (PIL would keep only the high byte;
    :func:`_read_16bit_colour` decodes it).
    """
    limit = max_image_pixels()
    im = _open_header(path, what, limit)
    try:
        if min(im.size) < min_side:
            raise DataError(
                f"{path}: {what} is {im.size[1]}x{im.size[0]} pixels (H x W); images "
                f"must be at least {min_side} px on each side - remove it or use a "
                "larger crop"
            )
        sixteen = _is_16bit_colour(im)
        if not sixteen:
            with warnings.catch_warnings(), _pil_limit(limit):
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
    except DataError:
        im.close()
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        im.close()
        raise DataError(
            f"{path}: {what} is truncated or corrupt ({exc}); re-export or remove it"
        ) from exc
    return im, sixteen


def _is_16bit_colour(im: Image.Image) -> bool:
    """Colour (or grey + alpha) stored with 16 bits per channel (PIL decodes 8 of them)."""
    if im.mode not in ("RGB", "RGBA", "LA") or not im.tile:
        return False
    args = im.tile[0][3]
    rawmode = args if isinstance(args, str) else (args[0] if args else "")
    return isinstance(rawmode, str) and ";16" in rawmode


def _orientation(im: Image.Image, path: Path) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception as exc:  # noqa: BLE001 - broken metadata must not lose the pixels
        log.warning("%s: unreadable EXIF metadata (%s); orientation not applied", path, exc)
        return 1


def _upright(im: Image.Image, orientation: int) -> Image.Image:
    """``ImageOps.exif_transpose`` with a given EXIF orientation (1 = as stored)."""
    if orientation in (0, 1):
        return im
    im.getexif()[_EXIF_ORIENTATION] = orientation  # for images made from arrays
    return ImageOps.exif_transpose(im)


def _read_16bit_colour(path: Path) -> np.ndarray:
    """A 16-bit-per-channel image as uint16 (H x W x C, RGB(A) order)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(path)
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
            raise DataError(f"{path}: 16-bit TIFF is truncated or corrupt ({exc})") from exc
    else:
        import cv2

        arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise DataError(f"{path}: 16-bit image is truncated or corrupt; re-export it")
        if arr.ndim == 3 and arr.shape[2] >= 3:  # OpenCV gives BGR(A)
            arr = np.concatenate([arr[..., 2::-1], arr[..., 3:]], axis=2)
    if arr.dtype != np.uint16 or arr.ndim not in (2, 3):
        raise DataError(
            f"{path}: expected 16-bit pixels, decoded {arr.dtype} {arr.shape}; save it as 8-bit RGB"
        )
    return arr


def _decode_rgb(path: Path, min_side: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    im, sixteen = _open(path, "image", min_side)
    with im:
        dpi = im.info.get("dpi")
        orientation = _orientation(im, path)  # may decode a 16-bit PNG: `sixteen` is kept
        if sixteen:
            rgb = to_rgb_uint8(_read_16bit_colour(path))
            rgb = np.asarray(_upright(Image.fromarray(rgb), orientation))
        else:
            rgb = _pil_to_rgb(_upright(im, orientation), path)
    if dpi is not None:
        try:
            dpi = (float(dpi[0]), float(dpi[1]))
        except (TypeError, ValueError, IndexError):
            dpi = None
    return np.require(rgb, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]), dpi


def _pil_to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return to_rgb_uint8(uint16_to_uint8(np.asarray(im)))
    if mode == "F":
        raise DataError(f"{path}: floating-point images are not supported; save it as 8-bit RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return composite_on_white(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "1"):
        return to_rgb_uint8(np.asarray(im.convert("L"), dtype=np.uint8))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)  # palette, CMYK, YCbCr, ...


def read_image(path: str | Path, *, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Read an image as ``H x W x 3`` uint8 RGB, upright.

    Conversions:

    - greyscale (``L``, ``1``): the grey channel is replicated to R, G, B;
    - 16 bits per channel (grey or colour): ``round(v / 257)``
      (:func:`uint16_to_uint8`);
    - alpha (``RGBA``, ``LA``, ``PA`` or a palette with transparency):
      composited on white (:func:`composite_on_white`);
    - palette (``P``): the palette colours;
    - other modes (``CMYK``, ``YCbCr``...): PIL's conversion to RGB;
    - EXIF orientation: applied, so the array is the picture as displayed.

    Args:
        path: image file.
        min_side: smallest height / width accepted.

    Returns:
        ``H x W x 3`` uint8 array.

    Raises:
        DataError: the file is missing, empty, truncated, corrupt, not an image,
            larger than :func:`max_image_pixels` or smaller than ``min_side``.
    """
    return _decode_rgb(Path(path), min_side)[0]


def read_image_with_dpi(
    path: str | Path, *, min_side: int = MIN_IMAGE_SIDE
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """:func:`read_image` and the file's ``(x, y)`` dots per inch (None when not stored)."""
    return _decode_rgb(Path(path), min_side)


def read_mask(
    path: str | Path, num_classes: int, expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a single-channel index mask as ``H x W`` uint8, upright (EXIF orientation).

    Palette (``P``) PNGs give their indices, ``L``/``1``/16-bit greyscale their
    values (not rescaled: they are labels). Valid values are ``0..num_classes-1``
    (classes), ``num_classes`` (background) and 255 (ignore).

    Args:
        path: mask file.
        num_classes: number of tissue classes ``C``.
        expected_hw: the image's ``(H, W)``; the mask must match it.

    Returns:
        ``H x W`` uint8 index mask.

    Raises:
        DataError: unreadable file, RGB(A) mask, values outside the valid range
            (listed) or a size other than ``expected_hw`` (both named).
    """
    path = Path(path)
    im, sixteen = _open(path, "mask", 1)
    with im:
        mode = im.mode
        if mode in ("P", "L", "1", "I") or mode.startswith("I;16"):
            arr = np.asarray(_upright(im, _orientation(im, path)))
        else:
            rgb = None if sixteen else np.asarray(im.convert("RGB"))
            hint = ""
            if (
                rgb is not None
                and (rgb[..., 0] == rgb[..., 1]).all()
                and (rgb[..., 1] == rgb[..., 2]).all()
            ):
                hint = " (its channels are equal: Image.open(p).convert('L').save(p) does it)"
            raise DataError(
                f"{path}: mask is a {mode} colour image; convert it to a single-channel index "
                f"PNG (mode L or P) with values 0..{num_classes - 1} for classes, {num_classes} "
                f"for background and 255 for ignore{hint}"
            )
    if arr.ndim != 2:
        raise DataError(
            f"{path}: mask has shape {arr.shape}; expected a single-channel H x W image"
        )
    values = np.unique(arr).astype(np.int64)
    bad = values[((values > num_classes) & (values != _IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        hint = (
            " (JPEG masks are lossy: save masks as PNG)"
            if path.suffix.lower() in (".jpg", ".jpeg")
            else ""
        )
        raise DataError(
            f"{path}: mask has values {shown} outside the valid range 0..{num_classes - 1} "
            f"(classes), {num_classes} (background) and 255 (ignore){hint}; remap them"
        )
    mask = arr.astype(np.uint8)
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        raise DataError(
            f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (H x W) but its image is "
            f"{expected_hw[0]}x{expected_hw[1]}; masks must have their image's size"
        )
    return mask
