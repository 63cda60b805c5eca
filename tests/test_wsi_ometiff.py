"""wsi.ometiff: pyramidal OME-TIFF of a class map (levels, palette, OME-XML, memory)."""

from __future__ import annotations

import os
import re
import time
import tracemalloc
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
import tifffile

from lpdseg.wsi.ometiff import (
    CLASS_NAMESPACE,
    OME_NAMESPACE,
    CanvasProbabilities,
    mean_2x2,
    mode_2x2,
    pyramid_shapes,
    write_class_map_ome_tiff,
)
from lpdseg.wsi.tiling import FIXED_POINT_SCALE, SlideCanvas

NAMES = ["tumor", "stroma", "necrosis"]
COLORS = [(200, 0, 0), (0, 160, 0), (0, 0, 200)]
OME = f"{{{OME_NAMESPACE}}}"


def class_map(h: int = 300, w: int = 470) -> np.ndarray:
    m = np.full((h, w), 3, np.uint8)
    m[20:180, 30:250] = 0
    m[60:100, 80:150] = 3
    cv2.circle(m, (350, 150), 80, 1, -1)
    m[220:290, 40:460] = 2
    m[::7, ::11] = 1  # isolated pixels: the mode of a level does not simply subsample
    return m


def reduced(m: np.ndarray, levels: int, reduce=mode_2x2) -> list[np.ndarray]:
    out = [m]
    for _ in range(levels - 1):
        out.append(reduce(out[-1]))
    return out


# ---------------------------------------------------------------- structure check
_TYPES = {"uint8": np.uint8, "uint16": np.uint16, "float": np.float32}
_ORDERS = {"XYZCT", "XYZTC", "XYCTZ", "XYCZT", "XYTCZ", "XYTZC"}
_ID = {
    "Image": r"Image:\S+",
    "Pixels": r"Pixels:\S+",
    "Channel": r"Channel:\S+",
    "MapAnnotation": r"Annotation:\S+",
}


def _in_order(children: list[str], order: list[str]) -> bool:
    """Tags appear only from ``order`` and in that order (repeats allowed)."""
    ranks = [order.index(t) for t in children if t in order]
    return len(ranks) == len(children) and ranks == sorted(ranks)


def check_ome_structure(xml: str, tif: tifffile.TiffFile) -> ET.Element:
    """What the OME 2016-06 schema requires of the parts written, checked by hand.

    Namespace and root; IDs present, unique and of the schema's patterns;
    element order (OME: Image* then StructuredAnnotations; Image:
    Description?, Pixels, AnnotationRef*; Pixels: Channel*, TiffData+;
    MapAnnotation: Description?, Value of M with K); required Pixels
    attributes and values of the schema's enumerations; one Channel per
    plane; TiffData IFDs covering the file's main IFDs in order; AnnotationRefs
    that resolve; and Size*/Type/DimensionOrder matching the data tifffile reads.
    """
    root = ET.fromstring(xml)
    assert root.tag == f"{OME}OME"
    ids = [e.get("ID") for e in root.iter() if e.get("ID") and not e.tag.endswith("Ref")]
    assert len(ids) == len(set(ids)), ids
    for e in root.iter():
        tag = e.tag.removeprefix(OME)
        if tag in _ID:
            assert re.fullmatch(_ID[tag], e.get("ID", "")), (tag, e.get("ID"))
    top = [c.tag.removeprefix(OME) for c in root]
    assert _in_order(top, ["Image", "StructuredAnnotations"]), top
    annotations = {e.get("ID") for e in root.iter(f"{OME}MapAnnotation")}
    ifd = 0
    images = root.findall(f"{OME}Image")
    assert len(images) == len(tif.series)
    for image, series in zip(images, tif.series, strict=True):
        kids = [c.tag.removeprefix(OME) for c in image]
        assert (
            _in_order(kids, ["Description", "Pixels", "AnnotationRef"])
            and kids.count("Pixels") == 1
        ), kids
        for ref in image.findall(f"{OME}AnnotationRef"):
            assert ref.get("ID") in annotations
        pixels = image.find(f"{OME}Pixels")
        for attr in ("ID", "DimensionOrder", "Type", "SizeX", "SizeY", "SizeZ", "SizeC", "SizeT"):
            assert pixels.get(attr), attr
        assert pixels.get("DimensionOrder") in _ORDERS
        size = {a: int(pixels.get(f"Size{a}")) for a in "XYZCT"}
        assert all(v >= 1 for v in size.values())
        assert np.dtype(_TYPES[pixels.get("Type")]) == series.dtype
        expected = (size["C"], size["Y"], size["X"]) if size["C"] > 1 else (size["Y"], size["X"])
        assert series.shape == expected and series.axes == ("CYX" if size["C"] > 1 else "YX")
        for unit_attr in ("PhysicalSizeXUnit", "PhysicalSizeYUnit"):
            if pixels.get(unit_attr) is not None:
                assert pixels.get(unit_attr) == "µm"
                assert float(pixels.get(unit_attr.removesuffix("Unit"))) > 0
        kids = [c.tag.removeprefix(OME) for c in pixels]
        assert _in_order(kids, ["Channel", "TiffData"]) and "TiffData" in kids, kids
        channels = pixels.findall(f"{OME}Channel")
        assert len(channels) == size["C"]
        assert all(c.get("SamplesPerPixel") == "1" for c in channels)
        for c in channels:
            if c.get("Color") is not None:
                assert -(2**31) <= int(c.get("Color")) < 2**31
        planes = 0
        for data in pixels.findall(f"{OME}TiffData"):
            assert int(data.get("IFD")) == ifd + planes
            planes += int(data.get("PlaneCount"))
        assert planes == size["C"] * size["Z"] * size["T"]
        ifd += planes
    assert ifd == len(tif.pages)  # the main IFDs; reduced levels are SubIFDs
    for note in root.iter(f"{OME}MapAnnotation"):
        kids = [c.tag.removeprefix(OME) for c in note]
        assert _in_order(kids, ["Description", "Value"]) and kids.count("Value") == 1
        assert all(m.get("K") is not None for m in note.find(f"{OME}Value"))
    return root


def schema_validate(xml: str) -> bool | None:
    """Validate against the OME XSD when it can be done offline (lxml + a local ome.xsd)."""
    try:
        import lxml  # noqa: F401
    except ImportError:
        return None
    if not os.path.exists(os.path.join(os.path.dirname(tifffile.__file__), "ome.xsd")):
        return None  # tifffile would download it
    return tifffile.OmeXml.validate(xml)


def labels_of(root: ET.Element, image: int = 0) -> dict[str, str]:
    note = root.findall(f"{OME}StructuredAnnotations/{OME}MapAnnotation")[image]
    assert note.get("Namespace") == CLASS_NAMESPACE
    return {m.get("K"): m.text for m in note.find(f"{OME}Value")}


# ---------------------------------------------------------------- tests
def test_pyramid_levels_palette_and_metadata(tmp_path):
    m = class_map()
    rng = np.random.default_rng(3)
    probs = rng.integers(0, 256, (3, *m.shape), dtype=np.uint8)
    path = tmp_path / "map.ome.tif"
    info = write_class_map_ome_tiff(path, m, NAMES, COLORS, 2.5, tile=64, probabilities=probs)
    assert info.level_shapes == [(300, 470), (150, 235), (75, 118), (38, 59)]  # until < 64
    assert info.images == ["class map", "class probabilities"]
    want_labels = reduced(m, 4)
    want_probs = reduced(probs, 4, mean_2x2)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 2
        labels, planes = tif.series
        assert [lv.shape for lv in labels.levels] == info.level_shapes
        for k, level in enumerate(labels.levels):
            np.testing.assert_array_equal(level.asarray(), want_labels[k])
        np.testing.assert_array_equal(labels.levels[0].asarray(), m)  # level 0 exactly
        assert [lv.shape for lv in planes.levels] == [(3, *s) for s in info.level_shapes]
        for k, level in enumerate(planes.levels):
            np.testing.assert_array_equal(level.asarray(), want_probs[k])
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        cmap = page.colormap
        for c, color in enumerate(COLORS):
            assert tuple(cmap[:, c] // 257) == color
        assert tuple(cmap[:, 3] // 257) == (255, 255, 255)  # background
        assert len(page.subifds) == 3
        sub = tif.series[0].levels[1].keyframe
        assert sub.subfiletype == 1 and sub.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert tif.pages[1].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        x_res = page.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 2.5)  # px per cm
        xml = tif.ome_metadata
        root = check_ome_structure(xml, tif)
    assert schema_validate(xml) in (None, True)
    pixels = root.find(f"{OME}Image/{OME}Pixels")
    assert float(pixels.get("PhysicalSizeX")) == 2.5 and float(pixels.get("PhysicalSizeY")) == 2.5
    assert pixels.get("PhysicalSizeXUnit") == "µm" == pixels.get("PhysicalSizeYUnit")
    assert (pixels.get("SizeX"), pixels.get("SizeY"), pixels.get("SizeC")) == ("470", "300", "1")
    named = labels_of(root)
    assert [named[str(c)] for c in range(4)] == [*NAMES, "background"]
    assert named["color 0"] == "#c80000" and named["color 3"] == "#ffffff"
    channels = root.findall(f"{OME}Image/{OME}Pixels/{OME}Channel")
    assert [c.get("Name") for c in channels] == ["class", *NAMES]
    assert int(channels[1].get("Color")) == (200 << 24 | 255) - 2**32  # RGBA, signed
    assert labels_of(root, 1) == {
        **{str(c): n for c, n in enumerate(NAMES)},
        **{f"color {c}": f"#{r:02x}{g:02x}{b:02x}" for c, (r, g, b) in enumerate(COLORS)},
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_tiles_from_a_generator_lzw_no_mpp_and_levels(tmp_path):
    m = class_map(200, 130)
    tile = 32

    def tiles():  # edge tiles cut at the map's border, as the docs allow
        for y in range(0, m.shape[0], tile):
            for x in range(0, m.shape[1], tile):
                yield m[y : y + tile, x : x + tile]

    path = tmp_path / "gen.ome.tif"
    info = write_class_map_ome_tiff(
        path, tiles(), NAMES, COLORS, None, tile=tile, levels=2, shape=m.shape, compression="lzw"
    )
    assert info.level_shapes == [(200, 130), (100, 65)]
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        np.testing.assert_array_equal(levels[0].asarray(), m)
        np.testing.assert_array_equal(levels[1].asarray(), mode_2x2(m))
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
        root = check_ome_structure(tif.ome_metadata, tif)
        assert (
            "XResolution" not in tif.pages[0].tags
            or tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
        )
    pixels = root.find(f"{OME}Image/{OME}Pixels")
    assert pixels.get("PhysicalSizeX") is None and pixels.get("PhysicalSizeXUnit") is None
    assert len(root.findall(f"{OME}Image")) == 1


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    m = class_map(100, 100)
    path = tmp_path / "map.ome.tif"
    write_class_map_ome_tiff(path, m, NAMES, COLORS, 1.0, tile=32)
    before = path.read_bytes()

    def short():
        yield np.zeros((32, 32), np.uint8)  # then stops: 15 tiles missing

    with pytest.raises(ValueError, match="tile iterator ended"):
        write_class_map_ome_tiff(path, short(), NAMES, COLORS, 1.0, tile=32, shape=(100, 100))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.ome.tif"]
    with pytest.raises(ValueError, match="shape"):
        write_class_map_ome_tiff(path, iter([]), NAMES, COLORS, 1.0)
    with pytest.raises(ValueError, match="colours"):
        write_class_map_ome_tiff(path, m, NAMES, COLORS[:2], 1.0)
    with pytest.raises(ValueError, match="C x h x w"):
        write_class_map_ome_tiff(path, m, NAMES, COLORS, 1.0, probabilities=np.zeros((2, 100, 100)))
    with pytest.raises(ValueError, match="uint8"):
        write_class_map_ome_tiff(path, m, NAMES, COLORS, 1.0, probabilities=np.zeros((3, 100, 100)))
    with pytest.raises(ValueError, match="integers"):
        write_class_map_ome_tiff(path, m.astype(np.float32), NAMES, COLORS, 1.0)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="multiple of 16"):
        write_class_map_ome_tiff(path, m, NAMES, COLORS, 1.0, tile=50)


def test_reductions_and_level_shapes():
    assert pyramid_shapes((16384, 16384)) == [(16384 >> k, 16384 >> k) for k in range(7)]
    assert pyramid_shapes((511, 300)) == [(511, 300)]
    assert pyramid_shapes((5, 3), levels=4) == [(5, 3), (3, 2), (2, 1), (1, 1)]
    with pytest.raises(ValueError):
        pyramid_shapes((5, 3), levels=5)
    block = np.array([[1, 2, 5, 5], [3, 1, 6, 7], [4, 4, 9, 9]], np.uint8)
    # mode: 1 (twice), 5 (twice: top pair); odd last row repeats itself: 4, 9
    np.testing.assert_array_equal(mode_2x2(block), [[1, 5], [4, 9]])
    np.testing.assert_array_equal(mode_2x2(np.array([[1, 2], [3, 4]], np.uint8)), [[1]])
    np.testing.assert_array_equal(mode_2x2(np.array([[1, 2], [2, 1]], np.uint8)), [[1]])
    np.testing.assert_array_equal(mode_2x2(np.array([[1, 2], [3, 2]], np.uint8)), [[2]])
    np.testing.assert_array_equal(mean_2x2(np.array([[0, 255], [255, 255]], np.uint8)), [[191]])


def test_canvas_probabilities_are_lazy_and_exact(tmp_path):
    rng = np.random.default_rng(0)
    h, w, labels = 40, 56, 4
    probs = rng.random((labels, h, w))
    probs /= probs.sum(0)
    weight = np.full((h, w), 3 * FIXED_POINT_SCALE, np.int64)
    weight[:, :8] = 0  # no tile here
    score = np.rint(probs * weight).astype(np.int64)
    canvas = SlideCanvas(score, weight, level=0, level_downsample=1.0, output_downsample=4)
    lazy = CanvasProbabilities(canvas)
    assert lazy.shape == (3, h, w)
    want = np.rint(probs[:3] * 255).astype(np.uint8)
    want[:, :, :8] = 0
    np.testing.assert_array_equal(lazy[:, :, :], want)
    np.testing.assert_array_equal(lazy[1, 5:9, 10:20], want[1, 5:9, 10:20])
    path = tmp_path / "c.ome.tif"
    write_class_map_ome_tiff(
        path, canvas.class_map(), NAMES, COLORS, 4.0, tile=16, probabilities=lazy
    )
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(tif.series[0].asarray(), canvas.class_map())
        np.testing.assert_array_equal(tif.series[1].asarray(), want)


def test_16k_map_from_a_tile_generator_keeps_memory_flat(tmp_path):
    side, tile = 16384, 512
    n = side // tile
    grid = np.full((n, n), 3, np.uint8)  # background, with a few class tiles
    grid[4:10, 3:20] = 0
    grid[15:30, 22:28] = 1
    grid[25, 1:31] = 2

    def tiles():
        for r in range(n):
            for c in range(n):
                yield np.full((tile, tile), grid[r, c], np.uint8)

    tracemalloc.start()
    try:
        started = time.perf_counter()
        info = write_class_map_ome_tiff(
            tmp_path / "big.ome.tif", tiles(), NAMES, COLORS, 2.0, shape=(side, side)
        )
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = side * side  # bytes of the uint8 map
    print(f"16k map: {seconds:.1f} s, traced peak {peak / 2**20:.1f} MiB of {full / 2**20:.0f}")
    assert peak < full / 16, peak  # a few tiles, never the map (measured ~1 MiB)
    assert len(info.level_shapes) == 7 and info.level_shapes[-1] == (256, 256)
    with tifffile.TiffFile(info.path) as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == info.level_shapes
        k = 3  # 2048 x 2048: each 512-px tile is 64 px here
        np.testing.assert_array_equal(
            levels[k].asarray(), np.kron(grid, np.ones((64, 64), np.uint8))
        )
        page = tif.pages[0]  # one level-0 tile, decoded alone (the level is 256 MiB)
        index = 25 * n + 1
        tif.filehandle.seek(page.dataoffsets[index])
        data, _, _ = page.decode(tif.filehandle.read(page.databytecounts[index]), index)
        assert data.squeeze().shape == (tile, tile) and (data == 2).all()
