"""Exports of a label map: polygons / QuPath GeoJSON (area tables and overlays re-exported).

Geometry convention: pixel ``(row i, col j)`` of a class map covers the
square ``[j, j + 1] x [i, i + 1]`` of map coordinates; level-0 coordinates
are ``map * scale_to_level0 + offset``. Region outlines follow pixel edges,
so a polygon's area equals its pixel count (up to diagonal steps, which are
cut at 45 degrees), and rasterising it back at pixel centres gives the map
again.

QuPath GeoJSON layout (checked against QuPath's own reader/writer,
``qupath-core/src/main/java/qupath/lib/io/PathObjectTypeAdapters.java`` and
``GsonTools.java`` (``PathClassTypeAdapter``) in github.com/qupath/qupath,
v0.4+; and the QuPath docs page "Exporting annotations": coordinates are
pixels of the full-resolution image, origin top-left): a ``FeatureCollection``
of ``Feature`` objects with a GeoJSON ``geometry`` (Polygon / MultiPolygon,
holes as inner rings), an optional ``id`` (a UUID string), and
``properties`` holding ``"objectType": "annotation"`` (``"detection"``,
``"cell"``, ... for other objects; QuPath 0.3 wrote ``object_type``) and
``"classification": {"name": ..., "color": [r, g, b]}`` (before v0.4:
``{"name": ..., "colorRGB": packed int}``, still read by QuPath).
QuPath imports such a file with File > Import objects from file, or by
drag and drop.

Options of the writer: the QuPath object type (``"annotation"``: editable
regions, the default; ``"detection"``: read-only objects QuPath draws and
counts faster, for slides with many regions), a measurement of each
region's area (``properties.measurements``, the object form QuPath writes
since v0.4, ``{"Area µm^2": ...}`` - ``"Area px^2"`` in level-0 pixels when
the slide has no pixel size; QuPath also still reads v0.3's list form
``[{"name": ..., "value": ...}]``), and a simplification tolerance in
level-0 pixels (``shapely`` ``simplify`` with ``preserve_topology``; 0
keeps the exact pixel outlines).

Every file is written atomically (temporary file in the same folder, then
``os.replace``) through ``lpdseg.io``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from lpdseg.errors import DataError
from lpdseg.io import atomic_write_text, dumps_strict

log = logging.getLogger(__name__)

Color = Sequence[int]
# Rasterisation insets outlines by this many map pixels before cv2.fillPoly
# (which paints every pixel an edge touches): edges on pixel boundaries then
# fall just inside the boundary pixels, so exactly the pixels whose centres
# are inside are painted, while 1-pixel-wide parts survive.
_RASTER_INSET = 0.4
_RASTER_SHIFT = 8  # fractional bits of the fillPoly coordinates
# Stable namespace for feature ids: the same map gives the same file.
_ID_NAMESPACE = uuid.UUID("6f1c1e2a-2f4e-4c55-9a37-1d0a5b7f3c21")

#: QuPath object types the writer offers (``properties.objectType``).
ObjectType = Literal["annotation", "detection"]
OBJECT_TYPES: tuple[str, ...] = ("annotation", "detection")
#: QuPath's names of its area measurement, with and without a pixel size.
AREA_UM2 = "Area µm^2"
AREA_PX2 = "Area px^2"


# ---------------------------------------------------------------- polygons
def _points_geometry(points: np.ndarray) -> BaseGeometry:
    """Pixel-centre points of one contour -> geometry (degenerate contours kept)."""
    if len(points) >= 3:
        poly = Polygon(points)
        return poly if poly.is_valid else shapely.make_valid(poly)
    if len(points) == 2:
        return LineString(points)
    return Point(points[0])


def _polygons_of(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons of any geometry (collections flattened)."""
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons_of(g)]
    return []


def _outline(points: np.ndarray) -> BaseGeometry:
    """Pixel-centre contour (map px, integer) -> the pixel-edge outline of its pixels.

    A 0.5-pixel mitred buffer moves horizontal and vertical runs out to the
    pixel edges exactly; diagonal steps become 45-degree edges.
    """
    centre = points.astype(np.float64) + 0.5
    return _points_geometry(centre).buffer(0.5, cap_style="square", join_style="mitre")


def _hole_geometry(ring: np.ndarray) -> BaseGeometry:
    """Pixel-edge outline of the pixels strictly inside a hole contour.

    OpenCV traces a hole through the foreground pixels around it (and cuts
    its corners), so the hole's own pixels are rasterised - the filled ring
    minus the ring itself - and outlined like a region.
    """
    x0, y0 = ring.min(0)
    x1, y1 = ring.max(0)
    local = (ring - (x0, y0)).astype(np.int32).reshape(-1, 1, 2)
    inside = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.fillPoly(inside, [local], 1, lineType=cv2.LINE_8)
    cv2.polylines(inside, [local], True, 0, thickness=1, lineType=cv2.LINE_8)
    contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = [_outline(c[:, 0, :] + (x0, y0)) for c in contours]
    return shapely.union_all(parts) if parts else Polygon()


def _region_geometries(binary: np.ndarray, min_area_px: float) -> list[Polygon | MultiPolygon]:
    """Pixel-edge outlines of the 8-connected regions of a bool map (map coordinates).

    ``cv2.findContours`` with RETR_CCOMP gives outer outlines and their holes
    (islands inside a hole are regions of their own).
    """
    contours, hierarchy = cv2.findContours(
        binary.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return []
    links = hierarchy[0]  # rows: next, previous, first child, parent
    extent = shapely.box(0, 0, binary.shape[1], binary.shape[0])
    regions: list[Polygon | MultiPolygon] = []
    for i, contour in enumerate(contours):
        if links[i][3] != -1:
            continue  # a hole; handled with its parent
        region = _outline(contour[:, 0, :])
        holes = []
        child = links[i][2]
        while child != -1:
            ring = contours[child][:, 0, :]
            if len(ring) >= 3:
                holes.append(_hole_geometry(ring))
            child = links[child][0]
        if holes:
            region = region.difference(shapely.union_all(holes))
        if not region.is_valid:
            region = shapely.make_valid(region)
        if not extent.contains(region):  # square caps of 1-pixel diagonals poke out
            region = region.intersection(extent)
        parts = _polygons_of(region)
        if not parts:
            continue
        geom: Polygon | MultiPolygon = parts[0] if len(parts) == 1 else MultiPolygon(parts)
        if geom.area >= min_area_px:
            regions.append(geom)
    return regions


def _to_level0(geom: BaseGeometry, scale: float, offset: tuple[float, float]) -> BaseGeometry:
    off = np.asarray(offset, np.float64)
    return shapely.transform(geom, lambda xy: xy * scale + off)


def mask_to_polygons(
    class_map: np.ndarray,
    class_id: int,
    scale_to_level0: float,
    offset: tuple[float, float] = (0.0, 0.0),
    min_area_px: float = 1.0,
) -> list[Polygon]:
    """Outlines of the regions of one class as valid polygons in level-0 pixels.

    Args:
        class_map: ``h x w`` integer label map.
        class_id: the label whose regions are traced.
        scale_to_level0: level-0 pixels per map pixel (e.g.
            ``SlideCanvas.downsample_to_level0``).
        offset: ``(x, y)`` of the map's top-left corner in level-0 pixels.
        min_area_px: regions smaller than this (in map pixels) are dropped.

    Returns:
        Valid polygons with holes kept as interior rings, coordinates in
        level-0 pixels (x right, y down).
    """
    if class_map.ndim != 2:
        raise ValueError(f"class_map must be h x w, got {class_map.shape}")
    if scale_to_level0 <= 0:
        raise ValueError(f"scale_to_level0 must be > 0, got {scale_to_level0}")
    out: list[Polygon] = []
    for region in _region_geometries(class_map == class_id, min_area_px):
        moved = _to_level0(region, float(scale_to_level0), offset)
        out.extend(_polygons_of(moved))
    return out


# ---------------------------------------------------------------- GeoJSON
def _rounded(coords: Any, ndigits: int) -> Any:
    if isinstance(coords, (tuple, list)):
        if coords and isinstance(coords[0], (int, float)):
            return [round(float(c), ndigits) for c in coords]
        return [_rounded(c, ndigits) for c in coords]
    return coords


def _check_colors(class_names: Sequence[str], colors: Sequence[Color]) -> None:
    if len(colors) < len(class_names):
        raise ValueError(
            f"{len(class_names)} class names but {len(colors)} colours; give one "
            "(r, g, b) colour per class"
        )


def _pixel_area_um2(mpp_level0: float | Sequence[float] | None) -> float | None:
    """µm² per level-0 pixel from ``mpp`` (one number or ``(x, y)``), None when unknown."""
    if mpp_level0 is None:
        return None
    if np.ndim(mpp_level0) == 0:
        mx = my = float(mpp_level0)  # type: ignore[arg-type]
    else:
        mx, my = (float(v) for v in mpp_level0)  # type: ignore[union-attr]
    if not (np.isfinite(mx) and np.isfinite(my) and mx > 0 and my > 0):
        raise ValueError(f"mpp_level0 must be positive and finite (or None), got {mpp_level0}")
    return mx * my


def _check_options(object_type: str, simplify_tolerance_px: float) -> None:
    if object_type not in OBJECT_TYPES:
        raise ValueError(
            f"object_type must be one of {', '.join(OBJECT_TYPES)} (QuPath objectType), "
            f"got {object_type!r}"
        )
    if not (np.isfinite(simplify_tolerance_px) and simplify_tolerance_px >= 0):
        raise ValueError(
            f"simplify_tolerance_px must be >= 0 (level-0 pixels), got {simplify_tolerance_px}"
        )


def _simplified(geom: BaseGeometry, tolerance: float) -> list[Polygon]:
    """``geom`` simplified (Douglas-Peucker, topology preserved) as valid polygons."""
    if tolerance <= 0:
        return _polygons_of(geom)
    out = geom.simplify(tolerance, preserve_topology=True)
    if not out.is_valid:
        out = shapely.make_valid(out)
    return _polygons_of(out)


def geojson_features(
    class_map: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[Color],
    scale_to_level0: float,
    offset: tuple[float, float] = (0.0, 0.0),
    min_area_px: float = 1.0,
    ndigits: int = 2,
    *,
    object_type: ObjectType = "annotation",
    simplify_tolerance_px: float = 0.0,
    mpp_level0: float | Sequence[float] | None = None,
) -> list[dict]:
    """QuPath objects of every region of every class (background excluded).

    Args:
        class_map: ``h x w`` label map, classes ``0..C-1``, background ``C``.
        class_names: the C class names (QuPath classification names).
        colors: one ``(r, g, b)`` per class.
        scale_to_level0: level-0 pixels per map pixel.
        offset: ``(x, y)`` of the map's top-left corner in level-0 pixels.
        min_area_px: regions smaller than this (map pixels) are left out.
        ndigits: decimals kept in the coordinates.
        object_type: QuPath ``objectType``: ``"annotation"`` (editable) or
            ``"detection"`` (read-only, drawn faster).
        simplify_tolerance_px: largest distance, in level-0 pixels, an
            outline may move when simplified (``shapely`` ``simplify`` with
            ``preserve_topology``); 0 keeps the exact pixel outlines.
        mpp_level0: the slide's micrometres per level-0 pixel, one number or
            ``(x, y)``: each feature gets ``measurements`` ``{"Area µm^2": a}``
            with ``a`` = its polygon area (level-0 px, as written) x
            ``mpp_x * mpp_y``; None gives ``{"Area px^2": area}`` in level-0 pixels.

    Returns:
        GeoJSON ``Feature`` dicts, one per region (Polygon or MultiPolygon).

    Raises:
        ValueError: too few colours, an unknown ``object_type``, a negative
            tolerance or a bad ``mpp_level0``.
    """
    _check_colors(class_names, colors)
    _check_options(object_type, simplify_tolerance_px)
    pixel_area = _pixel_area_um2(mpp_level0)
    area_name = AREA_PX2 if pixel_area is None else AREA_UM2
    features = []
    for c, name in enumerate(class_names):
        color = [int(v) for v in colors[c][:3]]
        regions = _region_geometries(class_map == c, min_area_px)
        for k, region in enumerate(regions):
            moved = _to_level0(region, float(scale_to_level0), offset)
            parts = _simplified(moved, float(simplify_tolerance_px))
            if not parts:
                continue
            geom = mapping(parts[0] if len(parts) == 1 else MultiPolygon(parts))
            geometry = {"type": geom["type"], "coordinates": _rounded(geom["coordinates"], ndigits)}
            area = float(shape(geometry).area)  # of the polygon as written
            if pixel_area is not None:
                area *= pixel_area
            features.append(
                {
                    "type": "Feature",
                    "id": str(uuid.uuid5(_ID_NAMESPACE, f"{name}/{k}/{region.bounds}")),
                    "geometry": geometry,
                    "properties": {
                        "objectType": object_type,
                        "classification": {"name": name, "color": color},
                        "measurements": {area_name: round(area, 4)},
                    },
                }
            )
    return features


def write_geojson(
    path: str | Path,
    class_map: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[Color],
    scale_to_level0: float,
    offset: tuple[float, float] = (0.0, 0.0),
    min_area_px: float = 1.0,
    *,
    object_type: ObjectType = "annotation",
    simplify_tolerance_px: float = 0.0,
    mpp_level0: float | Sequence[float] | None = None,
) -> int:
    """Write the regions of a label map as a QuPath-importable GeoJSON FeatureCollection.

    Args:
        path: output ``.geojson`` file (written atomically).
        class_map: ``h x w`` label map, classes ``0..C-1``, background ``C``.
        class_names: the C class names.
        colors: one ``(r, g, b)`` per class.
        scale_to_level0: level-0 pixels per map pixel.
        offset: ``(x, y)`` of the map's top-left corner in level-0 pixels.
        min_area_px: regions smaller than this (map pixels) are left out.
        object_type: QuPath ``objectType``, ``"annotation"`` or ``"detection"``.
        simplify_tolerance_px: outline simplification tolerance in level-0
            pixels (0 = exact pixel outlines).
        mpp_level0: micrometres per level-0 pixel (``(x, y)`` or one number)
            for the ``"Area µm^2"`` measurement; None: ``"Area px^2"``.

    Returns:
        The number of features written.
    """
    features = geojson_features(
        class_map,
        class_names,
        colors,
        scale_to_level0,
        offset,
        min_area_px,
        object_type=object_type,
        simplify_tolerance_px=simplify_tolerance_px,
        mpp_level0=mpp_level0,
    )
    atomic_write_text(path, dumps_strict({"type": "FeatureCollection", "features": features}))
    log.info("wrote %d regions (%ss) to %s", len(features), object_type, path)
    return len(features)


def feature_class_name(feature: dict) -> str | None:
    """A feature's QuPath classification name (``"a: b"`` for a derived class), or None."""
    props = feature.get("properties") or {}
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if "name" in cls:
            return str(cls["name"])
        if cls.get("names"):
            return ": ".join(str(n) for n in cls["names"])  # QuPath's derived-class form
    return None


def read_geojson_features(path: str | Path) -> list[Any]:
    """The features of a GeoJSON file: a FeatureCollection, a list of features or one feature.

    Raises:
        DataError: the file is missing or not GeoJSON.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} cannot be read as GeoJSON ({exc}); export it from QuPath "
            "with File > Export objects as GeoJSON"
        ) from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features", []))
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, list):
        return data
    raise DataError(
        f"{path} is JSON but not a GeoJSON Feature, FeatureCollection or list of features"
    )


def feature_geometry(path: str | Path, feature: dict) -> BaseGeometry:
    """The shapely geometry of a feature.

    Raises:
        DataError: the geometry is missing or invalid (``path`` names the file).
    """
    try:
        return shape(feature["geometry"])
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        shapely.errors.ShapelyError,
    ) as exc:
        raise DataError(
            f"{path}: a feature of class {feature_class_name(feature)!r} has an invalid "
            f"geometry ({exc})"
        ) from exc


def rasterize_geometry(out: np.ndarray, geom: BaseGeometry, value: int) -> None:
    """Paint ``value`` into ``out`` where a pixel's centre lies inside ``geom`` (holes honoured).

    ``geom`` is in ``out``'s pixel coordinates: pixel ``(i, j)`` covers
    ``[j, j + 1] x [i, i + 1]``. Points and lines paint nothing.
    """
    geom = shapely.make_valid(geom) if not geom.is_valid else geom
    one = float(1 << _RASTER_SHIFT)
    for poly in _polygons_of(geom.buffer(-_RASTER_INSET, join_style="mitre")):
        # Shift by -0.5 so pixel centres sit on integer coordinates (fillPoly's grid).
        rings = [np.asarray(poly.exterior.coords)] + [np.asarray(r.coords) for r in poly.interiors]
        pts = [np.round((r[:, :2] - 0.5) * one).astype(np.int32) for r in rings]
        cv2.fillPoly(out, pts, int(value), lineType=cv2.LINE_8, shift=_RASTER_SHIFT)


def read_geojson_to_mask(
    path: str | Path,
    shape_hw: tuple[int, int],
    class_names: Sequence[str],
    scale_to_level0: float,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Rasterise a (QuPath) GeoJSON file back into a label map.

    A pixel gets a class when its centre lies inside one of that class's
    polygons (holes honoured); features of unknown classes or without
    polygon geometry are skipped with a warning.

    Args:
        path: a GeoJSON FeatureCollection, a list of features, or one feature.
        shape_hw: ``(h, w)`` of the map to produce.
        class_names: class names; their index is the label written.
        scale_to_level0: level-0 pixels per map pixel.
        offset: ``(x, y)`` of the map's top-left corner in level-0 pixels.

    Returns:
        ``h x w`` uint8 map, background ``len(class_names)`` where nothing is drawn.

    Raises:
        DataError: the file is missing or not GeoJSON.
    """
    features = read_geojson_features(path)
    index = {name: i for i, name in enumerate(class_names)}
    out = np.full(shape_hw, len(class_names), np.uint8)
    skipped: dict[str, int] = {}
    off = np.asarray(offset, np.float64)
    for feature in features:
        name = feature_class_name(feature) if isinstance(feature, dict) else None
        if name not in index:
            skipped[str(name)] = skipped.get(str(name), 0) + 1
            continue
        geom = feature_geometry(path, feature)
        local = shapely.transform(geom, lambda xy: (xy - off) / scale_to_level0)
        rasterize_geometry(out, local, index[name])
    if skipped:
        log.warning(
            "%s: skipped features of classes not in %s: %s", path, list(class_names), skipped
        )
    return out
