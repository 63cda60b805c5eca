"""Read whole-slide images and ordinary images through one interface.

``open_image`` picks the backend: OpenSlide for the formats it recognises
(Aperio SVS, Hamamatsu NDPI, MIRAX MRXS, Leica SCN, Ventana BIF, pyramidal
generic tiled TIFF, ...; decided by ``openslide.OpenSlide.detect_format``,
never by the file name), and a plain backend (PIL, tifffile) for PNG, JPEG,
BMP and ordinary (strip or single-level) TIFF, which presents one level.

Conventions shared by both backends (the OpenSlide ones):

* locations are ``(x, y)`` in level-0 pixels, sizes ``(w, h)`` in pixels of
  the level read;
* pixels are returned as ``H x W x 3`` uint8 RGB; transparency (alpha, or
  areas outside the scanned region) is composited on white;
* resolutions carry their unit: ``mpp`` (micrometres per pixel at level 0),
  ``level`` (pyramid index) or ``downsample`` (level-0 pixels per pixel).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from lpdseg.errors import DataError
from lpdseg.imageio import (
    IMAGE_SUFFIXES,
    composite_on_white,
    read_image_with_dpi,
    to_rgb_uint8,
)

log = logging.getLogger(__name__)

#: Suffixes of the slide formats OpenSlide reads (shown in error messages).
SLIDE_FORMATS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)

# Resolution tags of ordinary images often hold an editor default (72 or 96 dpi,
# i.e. ~265-350 um/px) rather than a microscope calibration: ignore anything
# coarser than this.
_MAX_PLAUSIBLE_MPP = 100.0
# A level whose downsample is within this relative tolerance of the request is
# taken as exact (OpenSlide reports e.g. 4.000259 for a nominal 4x level).
_LEVEL_TOLERANCE = 1e-2


def _supported() -> str:
    slides = ", ".join(SLIDE_FORMATS)
    images = ", ".join(IMAGE_SUFFIXES)
    return f"slides read by OpenSlide ({slides}) or images ({images})"


class ImageReader(ABC):
    """Common interface of a multi-resolution image (one level for plain images).

    Subclasses provide the level geometry and ``_read_level``; everything else
    (bounds handling, thumbnails, level choice) is shared here.
    """

    path: Path

    # ------------------------------------------------------------ geometry
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per pixel of every level (1.0 for level 0)."""

    @property
    @abstractmethod
    def mpp(self) -> tuple[float, float] | None:
        """``(mpp_x, mpp_y)`` in micrometres per level-0 pixel, or None when unknown."""

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float | None:
        """Mean micrometres per pixel at ``level`` (None when the image has no mpp)."""
        self._check_level(level)
        if self.mpp is None:
            return None
        return 0.5 * (self.mpp[0] + self.mpp[1]) * self.level_downsamples[level]

    # ------------------------------------------------------------ pixels
    @abstractmethod
    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Backend read: like ``read_region`` after argument checks."""

    def read_region(
        self, location_level0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a rectangle of one level.

        Args:
            location_level0: ``(x, y)`` of the top-left corner in level-0 pixels.
            level: pyramid level to read from.
            size: ``(w, h)`` in pixels of ``level``.

        Returns:
            ``h x w x 3`` uint8 RGB; parts outside the image are white.

        Raises:
            DataError: the file cannot be decoded at this place.
            ValueError: a bad level or size.
        """
        self._check_level(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        x, y = int(location_level0[0]), int(location_level0[1])
        return self._read_level((x, y), level, (w, h))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """A downsampled RGB image of the whole slide, longest side ``max_size``.

        Reads the coarsest level that is still at least as fine as the
        thumbnail, block by block, so memory stays bounded for huge slides.

        Args:
            max_size: longest side of the result in pixels.

        Returns:
            ``H x W x 3`` uint8 RGB (aspect ratio of level 0 kept).
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        w0, h0 = self.dimensions
        ds = max(w0, h0) / max_size
        if ds <= 1.0:
            return self.read_region((0, 0), 0, (w0, h0))
        tw, th = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        level, _ = self.best_level_for(downsample=ds)
        lds = self.level_downsamples[level]
        out = np.empty((th, tw, 3), np.uint8)
        block = 512  # thumbnail pixels per block side
        for ty in range(0, th, block):
            for tx in range(0, tw, block):
                bw, bh = min(block, tw - tx), min(block, th - ty)
                # The block's extent in level-0 px, then read at `level`.
                x0, y0 = tx * w0 / tw, ty * h0 / th
                x1, y1 = (tx + bw) * w0 / tw, (ty + bh) * h0 / th
                rw = max(1, round((x1 - x0) / lds))
                rh = max(1, round((y1 - y0) / lds))
                region = self.read_region((round(x0), round(y0)), level, (rw, rh))
                out[ty : ty + bh, tx : tx + bw] = cv2.resize(
                    region, (bw, bh), interpolation=cv2.INTER_AREA
                )
        return out

    # ------------------------------------------------------------ resolution
    def best_level_for(
        self, target_mpp: float | None = None, downsample: float | None = None
    ) -> tuple[int, float]:
        """Choose the pyramid level to read for a requested resolution.

        The request is ``target_mpp`` (micrometres per pixel) when the image
        knows its mpp, else ``downsample`` (level-0 pixels per output pixel).
        The level chosen is the coarsest one that is not coarser than the
        request, so the remaining resize is never an upsampling.

        Args:
            target_mpp: requested micrometres per pixel.
            downsample: requested level-0 pixels per pixel (used when
                ``target_mpp`` is None or the image has no mpp).

        Returns:
            ``(level, extra_scale)``: read ``level`` and resize it by
            ``extra_scale`` to get the requested resolution (1.0 when the
            level matches; < 1 otherwise, > 1 only for requests finer than
            level 0).

        Raises:
            DataError: only ``target_mpp`` was given and the image has no mpp.
            ValueError: neither is given, or a value is not positive.
        """
        if target_mpp is not None and self.mpp is not None:
            if target_mpp <= 0:
                raise ValueError(f"target_mpp must be > 0, got {target_mpp}")
            mean_mpp = 0.5 * (self.mpp[0] + self.mpp[1])
            wanted = target_mpp / mean_mpp
        elif downsample is not None:
            if downsample <= 0:
                raise ValueError(f"downsample must be > 0, got {downsample}")
            wanted = float(downsample)
        elif target_mpp is not None:
            raise DataError(
                f"{self.path} has no pixel size (mpp) in its metadata, so "
                f"target_mpp={target_mpp} cannot be honoured; pass a downsample "
                "instead (level-0 pixels per output pixel)"
            )
        else:
            raise ValueError("pass target_mpp (micrometres per pixel) or downsample")
        if wanted < 1.0:
            # Reading cannot go finer than level 0: the caller decides whether to
            # upsample by extra_scale (> 1) or to work at level 0 as it is.
            log.debug(
                "%s: requested downsample %.3g is finer than level 0; returning level 0 "
                "with extra_scale %.3g > 1",
                self.path,
                wanted,
                1.0 / wanted,
            )
        level = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= wanted * (1.0 + _LEVEL_TOLERANCE):
                level = i
        ratio = self.level_downsamples[level] / wanted
        extra = 1.0 if abs(ratio - 1.0) <= _LEVEL_TOLERANCE else ratio
        return level, extra

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the file handle."""

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path} has levels 0..{self.level_count - 1}, got level={level}")


class OpenSlideReader(ImageReader):
    """A slide read by OpenSlide (every level of its pyramid)."""

    def __init__(self, path: str | Path) -> None:
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise DataError(
                f"{self.path} looks like a slide but OpenSlide cannot open it "
                f"({exc}); the file may be truncated or corrupt - re-export or "
                f"re-copy it. Supported: {_supported()}"
            ) from exc
        self._error_type = openslide.OpenSlideError
        self._mpp = _openslide_mpp(self._slide.properties)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def mpp(self) -> tuple[float, float] | None:
        return self._mpp

    @property
    def properties(self) -> dict[str, str]:
        """The raw OpenSlide properties (vendor metadata)."""
        return dict(self._slide.properties)

    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        try:
            region = self._slide.read_region(location, level, size)
        except self._error_type as exc:
            raise DataError(
                f"{self.path}: OpenSlide failed reading level {level} at "
                f"{location} ({exc}); the file is probably corrupt"
            ) from exc
        # openslide-python returns non-premultiplied RGBA; transparent = not scanned.
        return composite_on_white(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


class PlainImageReader(ImageReader):
    """A PNG / JPEG / BMP / ordinary TIFF held in memory as one level."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            self._pixels, self._mpp = _load_tiff(self.path)
        else:
            self._pixels, self._mpp = _load_pil(self.path)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        h, w = self._pixels.shape[:2]
        return ((w, h),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def mpp(self) -> tuple[float, float] | None:
        return self._mpp

    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        x, y = location
        w, h = size
        img_h, img_w = self._pixels.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, img_w), min(y + h, img_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._pixels = np.zeros((1, 1, 3), np.uint8)


def open_image(path: str | Path) -> ImageReader:
    """Open a slide or an image with the right backend.

    Args:
        path: a slide (SVS, NDPI, MRXS, SCN, pyramidal TIFF, ...) or an image
            (PNG, JPEG, BMP, TIFF).

    Returns:
        An ``ImageReader`` (use it as a context manager, or call ``close``).

    Raises:
        DataError: the file does not exist, is not a supported format, or is
            corrupt; the message names the file and the supported formats.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist or is not a file; expected {_supported()}")
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(p))
    except (openslide.OpenSlideError, OSError) as exc:
        log.debug("OpenSlide.detect_format(%s) failed: %s", p, exc)
        vendor = None
    if vendor is not None:
        log.debug("%s: OpenSlide format %s", p, vendor)
        return OpenSlideReader(p)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(
            f"{p} is not a readable slide or image (OpenSlide does not recognise "
            f"it and {p.suffix or 'no suffix'} is not an image type); expected "
            f"{_supported()}. If it should be a slide, the file is probably "
            "corrupt or incomplete - copy it again"
        )
    return PlainImageReader(p)


# ---------------------------------------------------------------- metadata
def _openslide_mpp(props: object) -> tuple[float, float] | None:
    try:
        mx = float(props["openslide.mpp-x"])  # type: ignore[index]
        my = float(props["openslide.mpp-y"])  # type: ignore[index]
    except (KeyError, ValueError, TypeError):
        return None
    if mx > 0 and my > 0 and math.isfinite(mx) and math.isfinite(my):
        return mx, my
    return None


def _mpp_from_resolution(xres: float, yres: float, unit: str) -> tuple[float, float] | None:
    """Pixels per unit (inch / centimetre) -> micrometres per pixel, if plausible."""
    per = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0, "meter": 1e6}.get(unit)
    if per is None or xres <= 0 or yres <= 0:
        return None
    mpp = (per / xres, per / yres)
    if max(mpp) > _MAX_PLAUSIBLE_MPP:
        log.debug(
            "ignoring resolution %.3g x %.3g per %s (%.1f um/px): not a microscope calibration",
            xres,
            yres,
            unit,
            max(mpp),
        )
        return None
    return mpp


def _to_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Gray / RGB / RGBA, 8- or 16-bit -> H x W x 3 uint8 (``lpdseg.imageio``'s rules)."""
    try:
        return to_rgb_uint8(arr)
    except ValueError as exc:
        raise DataError(f"{path} {exc}") from exc


def _load_pil(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    # lpdseg.imageio decodes (16-bit, alpha, palette, EXIF orientation, size limit).
    pixels, dpi = read_image_with_dpi(path, min_side=1)
    mpp = _mpp_from_resolution(dpi[0], dpi[1], "inch") if dpi else None
    return pixels, mpp


def _load_tiff(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            arr = page.asarray()
            mpp = None
            tags = page.tags
            if "XResolution" in tags and "YResolution" in tags:
                xr = tags["XResolution"].value
                yr = tags["YResolution"].value
                unit_tag = tags.get("ResolutionUnit")
                unit_val = int(unit_tag.value) if unit_tag is not None else 2
                unit = {2: "inch", 3: "centimeter"}.get(unit_val, "none")
                mpp = _mpp_from_resolution(xr[0] / xr[1], yr[0] / yr[1], unit)
    except (
        tifffile.TiffFileError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        ZeroDivisionError,
    ) as exc:
        raise DataError(
            f"{path} cannot be decoded as a TIFF ({exc}); the file is corrupt or "
            f"truncated. Supported: {_supported()}"
        ) from exc
    if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE and arr.dtype == np.uint8:
        arr = 255 - arr
    return _to_rgb_uint8(arr, path), mpp
