"""A stitched class map as a pyramidal OME-TIFF that slide viewers open.

File layout (OME-TIFF 2016-06 with sub-resolutions in SubIFDs, the layout
Bio-Formats 6+, QuPath and tifffile read as a pyramid):

* ``Image:0`` "class map": one ``uint8`` plane (IFD 0), the label of each
  map pixel (classes ``0..C-1``, background ``C``), TIFF palette
  (``PhotometricInterpretation = 3`` + ``ColorMap``) in the class colours,
  so any TIFF viewer shows the map in colour;
* ``Image:1`` "class probabilities" (only with ``probabilities``): ``C``
  ``uint8`` planes (IFDs ``1..C``), probability x 255 of each class, one
  OME channel per class named after it and coloured like it. They are a
  second OME Image rather than extra channels of the first because a TIFF
  palette belongs to an IFD and makes the image it colours an indexed,
  single-channel one for the readers (Bio-Formats, QuPath).

Every plane is tiled (``tile`` x ``tile``) and deflate-compressed; its
reduced resolutions, each half the size of the one above (rounded up), are
its SubIFDs (``NewSubfileType = 1``). Labels are reduced by the mode of
each 2 x 2 block (ties: the top-left pixel's label first, then top-right,
bottom-left), probabilities by the rounded mean.

The OME-XML (UTF-8, in the first IFD's ImageDescription) holds the size,
type and ``DimensionOrder="XYCZT"`` of each image, ``PhysicalSizeX/Y`` with
``PhysicalSizeX/YUnit="µm"`` when the map's pixel size is known, and a
``MapAnnotation`` (namespace :data:`CLASS_NAMESPACE`) per image naming
every label: key ``"0"``, value ``"tumor"``, and key ``"color 0"``, value
``"#c80000"``, ...

Memory stays flat whatever the map's size: level 0 is streamed tile by tile
from the input (an array, a memory map or a tile generator) straight into
the TIFF writer; each tile is reduced as it passes, and its reduced block
written to a temporary file of the next level (next to the output, deleted
afterwards; plain reads and writes, not a memory map, so the level is in
the page cache, not in the process's resident memory), which is streamed
the same way in turn. Only a few tiles are in memory at a time. The file
is written atomically (``lpdseg.io.atomic_open``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lpdseg.io import atomic_open

log = logging.getLogger(__name__)

OME_NAMESPACE = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
OME_SCHEMA_LOCATION = f"{OME_NAMESPACE} {OME_NAMESPACE}/ome.xsd"
#: Namespace of the MapAnnotations naming the labels.
CLASS_NAMESPACE = "lpdseg/class-map"
#: Longest side under which no further reduced level is added (the default tile).
DEFAULT_TILE = 512
#: Raw size above which BigTIFF (64-bit offsets) is written instead of classic TIFF.
BIGTIFF_ABOVE_BYTES = 2**31
_WHITE = (255, 255, 255)


class SlicedArray(Protocol):
    """What is read of an input: ``shape`` and numpy basic slicing (arrays, memory maps)."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...


@dataclass(frozen=True)
class OmeTiffWritten:
    """What ``write_class_map_ome_tiff`` wrote.

    Attributes:
        path: the file.
        level_shapes: ``(h, w)`` of every resolution level, level 0 first.
        images: names of the OME Images, in order.
        size_bytes: file size.
    """

    path: Path
    level_shapes: list[tuple[int, int]]
    images: list[str]
    size_bytes: int


# ---------------------------------------------------------------- levels
def pyramid_shapes(
    shape_hw: tuple[int, int], levels: int | None = None, min_side: int = DEFAULT_TILE
) -> list[tuple[int, int]]:
    """``(h, w)`` of each resolution level: level 0, then halved (rounded up).

    Args:
        shape_hw: size of level 0.
        levels: number of levels including level 0; None = halve until the
            longest side is under ``min_side``.
        min_side: see ``levels``.

    Raises:
        ValueError: ``levels < 1``, an empty shape, or more levels than
            halvings down to 1 x 1.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"the class map must be at least 1 x 1, got {h} x {w}")
    longest = max(h, w)
    most = 1 + math.ceil(math.log2(longest)) if longest > 1 else 1
    if levels is None:
        levels = 1
        side = longest
        while side >= min_side and levels < most:
            side = -(-side // 2)
            levels += 1
    elif int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels}")
    elif levels > most:
        raise ValueError(
            f"levels={levels} is more than a {h} x {w} map has ({most} halvings down to 1 px)"
        )
    shapes = [(h, w)]
    for _ in range(int(levels) - 1):
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w))
    return shapes


def _even(block: np.ndarray) -> np.ndarray:
    """Pad the last two axes to even sizes by repeating the edge."""
    ph, pw = block.shape[-2] % 2, block.shape[-1] % 2
    if not (ph or pw):
        return block
    pad = [(0, 0)] * (block.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(block, pad, mode="edge")


def mode_2x2(block: np.ndarray) -> np.ndarray:
    """Most frequent label of each 2 x 2 block (``... x h x w`` -> ``... x ceil(h/2) x ceil(w/2)``).

    Ties go to the first of top-left, top-right, bottom-left (reading order)
    holding a tied label; an odd edge repeats its last row/column.
    """
    b = _even(block)
    if b.size and b.min() == b.max():  # constant (background, a large region): fast path
        return np.full((*b.shape[:-2], b.shape[-2] // 2, b.shape[-1] // 2), b.flat[0], b.dtype)
    a, r, c, d = (
        np.ascontiguousarray(q)
        for q in (b[..., 0::2, 0::2], b[..., 0::2, 1::2], b[..., 1::2, 0::2], b[..., 1::2, 1::2])
    )
    # a with a partner has >= 2 votes, and nothing can have more unless it is a's:
    # a wins (ties included). Else a is alone and r wins with a partner; else c with d;
    # else all four differ and a (top-left) is kept.
    out = np.where(c == d, c, a)
    out = np.where((r == c) | (r == d), r, out)
    return np.where((a == r) | (a == c) | (a == d), a, out)


def mean_2x2(block: np.ndarray) -> np.ndarray:
    """Rounded mean of each 2 x 2 block of a uint8 array (odd edges repeat)."""
    b = _even(block).astype(np.uint16)
    total = b[..., 0::2, 0::2] + b[..., 0::2, 1::2] + b[..., 1::2, 0::2] + b[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


# ---------------------------------------------------------------- streaming
def _tile_origins(shape_hw: tuple[int, int], tile: int) -> Iterator[tuple[int, int]]:
    for y in range(0, shape_hw[0], tile):
        for x in range(0, shape_hw[1], tile):
            yield y, x


def _array_blocks(
    source: SlicedArray, planes: int, shape_hw: tuple[int, int], tile: int
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """``(plane, y, x, block)`` of a ``planes x h x w`` (or ``h x w``) array, plane by plane."""
    for p in range(planes):
        for y, x in _tile_origins(shape_hw, tile):
            if isinstance(source, _LevelFile):
                yield p, y, x, source.read(p, y, x)
                continue
            key = (slice(y, y + tile), slice(x, x + tile))
            block = source[key] if len(source.shape) == 2 else source[(p, *key)]
            yield p, y, x, np.asarray(block)


def _iterator_blocks(
    tiles: Iterable[Any], shape_hw: tuple[int, int], tile: int
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """``(0, y, x, block)`` of a generator of level-0 tiles in row-major order."""
    it = iter(tiles)
    h, w = shape_hw
    for y, x in _tile_origins(shape_hw, tile):
        try:
            item = np.asarray(next(it))
        except StopIteration:
            raise ValueError(
                f"the tile iterator ended at tile (y={y}, x={x}) of a {h} x {w} map "
                f"with {tile} px tiles; it must yield every tile in row-major order"
            ) from None
        th, tw = min(tile, h - y), min(tile, w - x)
        if item.ndim != 2 or item.shape[0] < th or item.shape[1] < tw or max(item.shape) > tile:
            raise ValueError(
                f"tile (y={y}, x={x}) has shape {item.shape}; expected {th} x {tw} "
                f"(or {tile} x {tile} padded)"
            )
        yield 0, y, x, item[:th, :tw]
    if next(it, None) is not None:
        raise ValueError(f"the tile iterator yielded more tiles than a {h} x {w} map has")


class _LevelFile:
    """A reduced level (``planes x h x w`` uint8) in a temporary file, by blocks.

    The level is built from the tiles of the level above: each ``tile x tile``
    tile there reduces to one ``tile/2`` block here, stored padded at a fixed
    offset; a ``tile x tile`` tile of this level is then four blocks.
    """

    def __init__(self, path: Path, planes: int, shape_hw: tuple[int, int], tile: int) -> None:
        self.shape = (planes, *shape_hw)
        self.tile, self.block = tile, tile // 2
        self.rows = -(-shape_hw[0] // self.block)
        self.cols = -(-shape_hw[1] // self.block)
        self._file = path.open("w+b")

    def _seek(self, p: int, by: int, bx: int) -> None:
        index = (p * self.rows + by) * self.cols + bx
        self._file.seek(index * self.block * self.block)

    def put(self, p: int, y: int, x: int, small: np.ndarray) -> None:
        """Store the reduced block of the tile at ``(y, x)`` of the level above."""
        full = np.zeros((self.block, self.block), np.uint8)
        full[: small.shape[0], : small.shape[1]] = small
        self._seek(p, y // self.tile, x // self.tile)
        self._file.write(full.tobytes())

    def read(self, p: int, y: int, x: int) -> np.ndarray:
        """The tile at ``(y, x)`` of this level (cut at its edge)."""
        b, t = self.block, self.tile
        out = np.zeros((t, t), np.uint8)
        part = np.empty((b, b), np.uint8)
        for dy in (0, 1):
            for dx in (0, 1):
                by, bx = 2 * (y // t) + dy, 2 * (x // t) + dx
                if by < self.rows and bx < self.cols:
                    self._seek(p, by, bx)
                    if self._file.readinto(part) != part.nbytes:  # type: ignore[arg-type]
                        raise OSError(f"short read from the temporary level {self._file.name}")
                    out[dy * b : (dy + 1) * b, dx * b : (dx + 1) * b] = part
        return out[: min(t, self.shape[1] - y), : min(t, self.shape[2] - x)]

    def close(self) -> None:
        self._file.close()


def _writer_tiles(
    blocks: Iterator[tuple[int, int, int, np.ndarray]],
    tile: int,
    reduce: Any,
    below: _LevelFile | None,
) -> Iterator[np.ndarray]:
    """Full ``tile x tile`` uint8 tiles for the TIFF writer; each block reduced into ``below``."""
    for p, y, x, block in blocks:
        if block.dtype.kind not in "biu":
            raise ValueError(f"tiles must hold integers (uint8), got {block.dtype}")
        if block.dtype != np.uint8:
            if block.size and (block.min() < 0 or block.max() > 255):
                raise ValueError(f"values must fit uint8, got {block.min()}..{block.max()}")
            block = block.astype(np.uint8)
        if below is not None:
            below.put(p, y, x, reduce(block))
        if block.shape == (tile, tile):
            yield np.ascontiguousarray(block)
        else:
            full = np.zeros((tile, tile), np.uint8)
            full[: block.shape[0], : block.shape[1]] = block
            yield full


# ---------------------------------------------------------------- metadata
def _hex(color: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color[:3]))


def _ome_color(color: Sequence[int]) -> int:
    """OME ``Color``: RGBA packed into a signed 32-bit integer."""
    r, g, b = (int(c) & 255 for c in color[:3])
    value = (r << 24) | (g << 16) | (b << 8) | 255
    return value - 2**32 if value >= 2**31 else value


def _mpp_xy(mpp: float | Sequence[float] | None) -> tuple[float, float] | None:
    if mpp is None:
        return None
    x, y = (float(mpp), float(mpp)) if np.ndim(mpp) == 0 else (float(mpp[0]), float(mpp[1]))
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        raise ValueError(f"mpp_um_per_px must be positive and finite (or None), got {mpp}")
    return x, y


def class_map_ome_xml(
    shape_hw: tuple[int, int],
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]],
    mpp_um_per_px: float | Sequence[float] | None,
    *,
    with_probabilities: bool = False,
    background_name: str = "background",
    background_color: Sequence[int] = _WHITE,
    creator: str = "lpdseg",
) -> str:
    """The OME-XML of the file ``write_class_map_ome_tiff`` writes (see the module doc).

    Args:
        shape_hw: ``(h, w)`` of level 0.
        class_names: the C class names (labels ``0..C-1``; label C is background).
        colors: one ``(r, g, b)`` per class.
        mpp_um_per_px: micrometres per map pixel, one number or ``(x, y)``; None
            leaves the physical size out.
        with_probabilities: add the ``class probabilities`` image (C planes).
        background_name, background_color: name and colour of label C.
        creator: the ``Creator`` attribute.

    Returns:
        The XML document, declaration included.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    n = len(class_names)
    mpp = _mpp_xy(mpp_um_per_px)
    root = ET.Element(
        "OME",
        {
            "xmlns": OME_NAMESPACE,
            "xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
            "xsi:schemaLocation": OME_SCHEMA_LOCATION,
            "Creator": creator,
        },
    )
    images: list[tuple[str, int, str]] = [
        (
            "class map",
            1,
            f"Label of each pixel: 0..{n - 1} the classes, {n} {background_name}; "
            f"names and colours in MapAnnotation Annotation:0 ({CLASS_NAMESPACE}).",
        )
    ]
    if with_probabilities:
        images.append(
            (
                "class probabilities",
                n,
                "Probability of each class x 255 (channel i = class i), "
                "0 where no tile was segmented.",
            )
        )
    first_ifd = 0
    for index, (name, size_c, description) in enumerate(images):
        image = ET.SubElement(root, "Image", {"ID": f"Image:{index}", "Name": name})
        ET.SubElement(image, "Description").text = description
        attrs = {
            "ID": f"Pixels:{index}",
            "DimensionOrder": "XYCZT",
            "Type": "uint8",
            "SignificantBits": "8",
            "Interleaved": "false",
            "BigEndian": "false",
            "SizeX": str(w),
            "SizeY": str(h),
            "SizeC": str(size_c),
            "SizeZ": "1",
            "SizeT": "1",
        }
        if mpp is not None:
            attrs.update(
                PhysicalSizeX=repr(mpp[0]),
                PhysicalSizeXUnit="µm",
                PhysicalSizeY=repr(mpp[1]),
                PhysicalSizeYUnit="µm",
            )
        pixels = ET.SubElement(image, "Pixels", attrs)
        for c in range(size_c):
            channel = {"ID": f"Channel:{index}:{c}", "SamplesPerPixel": "1"}
            if index == 0:
                channel["Name"] = "class"
            else:
                channel.update(Name=str(class_names[c]), Color=str(_ome_color(colors[c])))
            ET.SubElement(pixels, "Channel", channel)
        ET.SubElement(
            pixels,
            "TiffData",
            {
                "IFD": str(first_ifd),
                "PlaneCount": str(size_c),
                "FirstC": "0",
                "FirstZ": "0",
                "FirstT": "0",
            },
        )
        first_ifd += size_c
        ET.SubElement(image, "AnnotationRef", {"ID": f"Annotation:{index}"})
    annotations = ET.SubElement(root, "StructuredAnnotations")
    labels = [(str(c), class_names[c], colors[c]) for c in range(n)]
    for index, _ in enumerate(images):
        labelled = labels + [(str(n), background_name, background_color)] if index == 0 else labels
        note = ET.SubElement(
            annotations,
            "MapAnnotation",
            {"ID": f"Annotation:{index}", "Namespace": CLASS_NAMESPACE},
        )
        ET.SubElement(note, "Description").text = (
            "label -> class name ('N'), label -> colour ('color N', #rrggbb)"
            if index == 0
            else "channel -> class name ('N'), channel -> colour ('color N', #rrggbb)"
        )
        value = ET.SubElement(note, "Value")
        for key, name, _ in labelled:
            ET.SubElement(value, "M", {"K": key}).text = str(name)
        for key, _, color in labelled:
            ET.SubElement(value, "M", {"K": f"color {key}"}).text = _hex(color)
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body


def _palette(colors: Sequence[Sequence[int]], n: int, background: Sequence[int]) -> np.ndarray:
    """TIFF ColorMap (3 x 256 uint16): label c -> colour c, label n -> background, rest black."""
    table = np.zeros((3, 256), np.uint16)
    for c in range(n):
        table[:, c] = [int(v) * 257 for v in colors[c][:3]]
    table[:, n] = [int(v) * 257 for v in background[:3]]
    return table


# ---------------------------------------------------------------- writing
def write_class_map_ome_tiff(
    path: str | Path,
    class_map: np.ndarray | SlicedArray | Iterable[np.ndarray],
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]],
    mpp_um_per_px: float | Sequence[float] | None,
    *,
    tile: int = DEFAULT_TILE,
    levels: int | None = None,
    probabilities: np.ndarray | SlicedArray | None = None,
    shape: tuple[int, int] | None = None,
    compression: str = "zlib",
    background_name: str = "background",
    background_color: Sequence[int] | None = None,
) -> OmeTiffWritten:
    """Write a class map (and class probabilities) as a tiled, compressed, pyramidal OME-TIFF.

    Args:
        path: output file (``.ome.tif``), written atomically.
        class_map: the ``h x w`` uint8 label map (classes ``0..C-1``,
            background ``C``, e.g. ``SlideCanvas.class_map()``): an array, a
            memory map, anything with ``shape`` and numpy slicing, or an
            iterable of its level-0 tiles (then ``shape`` is required): tile
            ``(r, c)`` covers rows ``r*tile ..`` and columns ``c*tile ..``,
            row-major, each ``tile x tile`` or cut at the map's edge.
        class_names: the C class names.
        colors: one ``(r, g, b)`` per class; entry C, when given, colours the
            background (default white).
        mpp_um_per_px: micrometres per map pixel (e.g.
            ``LevelPlan.map_mpp_um_per_px``), one number or ``(x, y)``; None
            when the slide has no resolution (no physical size written).
        tile: tile side in pixels (a multiple of 16, the TIFF rule).
        levels: resolution levels including level 0; None = halve until the
            longest side is under ``tile`` (512 px by default).
        probabilities: optional ``C x h x w`` uint8 (probability x 255), an
            array or anything with ``shape`` and numpy slicing (e.g.
            :class:`CanvasProbabilities`); written as a second OME Image.
        shape: ``(h, w)`` of the map; needed for a tile iterable, checked otherwise.
        compression: TIFF compression of the tiles: ``"zlib"`` (deflate) or ``"lzw"``.
        background_name: name of label C in the metadata.
        background_color: colour of label C (overrides ``colors[C]``).

    Returns:
        :class:`OmeTiffWritten`: level shapes, images, size.

    Raises:
        ValueError: inconsistent shapes, too few colours, a bad tile or levels.
        lpdseg.io.WriteError: the file could not be written (it keeps its old content).
    """
    import tifffile

    path = Path(path)
    n = len(class_names)
    if n < 1 or n > 255:
        raise ValueError(f"1..255 classes fit a uint8 map, got {n}")
    if len(colors) < n:
        raise ValueError(f"{n} class names but {len(colors)} colours; give one (r, g, b) per class")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in ("zlib", "lzw"):
        raise ValueError(f"compression must be 'zlib' or 'lzw', got {compression!r}")
    background = tuple(
        background_color
        if background_color is not None
        else (colors[n] if len(colors) > n else _WHITE)
    )
    sliced = hasattr(class_map, "shape") and hasattr(class_map, "__getitem__")
    if sliced:
        map_shape = tuple(int(s) for s in class_map.shape)  # type: ignore[union-attr]
        if len(map_shape) != 2:
            raise ValueError(f"class_map must be h x w, got shape {map_shape}")
        if shape is not None and tuple(shape) != map_shape:
            raise ValueError(f"shape={tuple(shape)} but class_map is {map_shape}")
        hw = (map_shape[0], map_shape[1])
    elif shape is None:
        raise ValueError("a class_map given as tiles needs shape=(h, w)")
    else:
        hw = (int(shape[0]), int(shape[1]))
    if probabilities is not None:
        p_shape = tuple(int(s) for s in probabilities.shape)
        if p_shape != (n, *hw):
            raise ValueError(
                f"probabilities must be C x h x w = {(n, *hw)} (one plane per class), got {p_shape}"
            )
        p_dtype = np.dtype(getattr(probabilities, "dtype", np.uint8))
        if p_dtype != np.uint8:
            raise ValueError(
                f"probabilities must be uint8 (probability x 255), got {p_dtype}; e.g. "
                "np.rint(p * 255).astype(np.uint8), or CanvasProbabilities(canvas)"
            )
    shapes = pyramid_shapes(hw, levels, tile)
    xml = class_map_ome_xml(
        hw,
        class_names,
        colors,
        mpp_um_per_px,
        with_probabilities=probabilities is not None,
        background_name=background_name,
        background_color=background,
    )
    mpp = _mpp_xy(mpp_um_per_px)
    planes = 1 + (n if probabilities is not None else 0)
    raw = sum(h * w for h, w in shapes) * planes
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "dtype": np.uint8,
        "compression": compression,
        "software": "lpdseg",
        "metadata": None,
    }
    if mpp is not None:  # TIFF resolution tags too: pixels per centimetre
        options.update(resolution=(1e4 / mpp[0], 1e4 / mpp[1]), resolutionunit="CENTIMETER")
    palette = {"photometric": "palette", "colormap": _palette(colors, n, background)}
    gray = {"photometric": "minisblack"}

    with atomic_open(path, "wb") as handle:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.levels.", dir=path.parent) as tmp:
            files: list[_LevelFile] = []

            def spill(name: str, count: int, level: int) -> _LevelFile | None:
                if level >= len(shapes):
                    return None
                level_file = _LevelFile(Path(tmp) / f"{name}{level}.u8", count, shapes[level], tile)
                files.append(level_file)
                return level_file

            def pyramid(
                tif: Any, first: Iterator[Any], planes: int, name: str, reduce: Any, **kind: Any
            ) -> None:
                """Level 0 from ``first`` (with its SubIFDs), then each level from the one above."""
                below = spill(name, planes, 1)
                page_shape = (lambda hw_: hw_) if planes == 1 else (lambda hw_: (planes, *hw_))
                tif.write(
                    _writer_tiles(first, tile, reduce, below),
                    shape=page_shape(hw),
                    subifds=len(shapes) - 1,
                    **kind,
                    **options,
                )
                for level in range(1, len(shapes)):
                    above, below = below, spill(name, planes, level + 1)
                    assert above is not None
                    tif.write(
                        _writer_tiles(
                            _array_blocks(above, planes, shapes[level], tile), tile, reduce, below
                        ),
                        shape=page_shape(shapes[level]),
                        subfiletype=1,
                        **kind,
                        **options,
                    )
                    above.close()

            # A named handle: tifffile asks a stream for its name (os.fdopen's is the fd).
            named = tifffile.FileHandle(handle, mode="wb", name=path.name)
            try:
                with tifffile.TiffWriter(
                    named, bigtiff=raw > BIGTIFF_ABOVE_BYTES, ome=False, shaped=False
                ) as tif:
                    blocks = (
                        _array_blocks(class_map, 1, hw, tile)  # type: ignore[arg-type]
                        if sliced
                        else _iterator_blocks(class_map, hw, tile)  # type: ignore[arg-type]
                    )
                    pyramid(
                        tif,
                        blocks,
                        1,
                        "labels",
                        mode_2x2,
                        description=xml.encode("utf-8"),
                        **palette,
                    )
                    if probabilities is not None:
                        blocks = _array_blocks(probabilities, n, hw, tile)
                        pyramid(tif, blocks, n, "probabilities", mean_2x2, **gray)
            finally:
                for level_file in files:
                    level_file.close()
    size = path.stat().st_size
    images = ["class map"] + (["class probabilities"] if probabilities is not None else [])
    log.info(
        "wrote %s: %s levels %s, %.1f MiB",
        path,
        " + ".join(images),
        [f"{w}x{h}" for h, w in shapes],
        size / 2**20,
    )
    return OmeTiffWritten(path, shapes, images, size)


# ---------------------------------------------------------------- canvases
class CanvasProbabilities:
    """Lazy ``C x h x w`` uint8 class probabilities (x 255) of a ``SlideCanvas``.

    Each slice is computed from the canvas's fixed-point sums when it is
    read (``score_sum / weight_sum``, clipped to [0, 1], x 255, rounded; 0
    where no tile contributed), so the ``L x h x w`` float scores are never
    held. The background label (last) is left out. Pass it as
    ``write_class_map_ome_tiff(..., probabilities=CanvasProbabilities(canvas))``.
    """

    def __init__(self, canvas: Any, num_classes: int | None = None) -> None:
        self.score_sum = canvas.score_sum
        self.weight_sum = canvas.weight_sum
        labels = int(self.score_sum.shape[0])
        self.num_classes = labels - 1 if num_classes is None else int(num_classes)
        if not 1 <= self.num_classes <= labels:
            raise ValueError(f"num_classes must be in 1..{labels}, got {num_classes}")
        self.shape = (self.num_classes, *self.weight_sum.shape)
        self.dtype = np.dtype(np.uint8)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        c, ys, xs = key
        if isinstance(c, (int, np.integer)):
            c = slice(int(c), int(c) + 1)
            squeeze = True
        else:
            squeeze = False
        classes = range(self.num_classes)[c]
        weight = self.weight_sum[ys, xs]
        scores = self.score_sum[classes.start : classes.stop : classes.step, ys, xs]
        prob = scores / np.maximum(weight, 1)
        out = np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
        out[:, weight <= 0] = 0
        return out[0] if squeeze else out
