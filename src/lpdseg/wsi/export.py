"""Exports of a label map: polygons / QuPath GeoJSON, area tables, overlays.

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

Every file is written atomically (temporary file in the same folder, then
``os.replace``) through ``lpdseg.io``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from lpdseg.errors import DataError
from lpdseg.io import atomic_write_bytes, atomic_write_json, atomic_write_text

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


def geojson_features(
    class_map: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[Color],
    scale_to_level0: float,
    offset: tuple[float, float] = (0.0, 0.0),
    min_area_px: float = 1.0,
    ndigits: int = 2,
) -> list[dict]:
    """QuPath annotation features of every region of every class (background excluded).

    Args:
        class_map: ``h x w`` label map, classes ``0..C-1``, background ``C``.
        class_names: the C class names (QuPath classification names).
        colors: one ``(r, g, b)`` per class.
        scale_to_level0: level-0 pixels per map pixel.
        offset: ``(x, y)`` of the map's top-left corner in level-0 pixels.
        min_area_px: regions smaller than this (map pixels) are left out.
        ndigits: decimals kept in the coordinates.

    Returns:
        GeoJSON ``Feature`` dicts, one per region (Polygon or MultiPolygon).
    """
    _check_colors(class_names, colors)
    features = []
    for c, name in enumerate(class_names):
        color = [int(v) for v in colors[c][:3]]
        regions = _region_geometries(class_map == c, min_area_px)
        for k, region in enumerate(regions):
            geom = mapping(_to_level0(region, float(scale_to_level0), offset))
            features.append(
                {
                    "type": "Feature",
                    "id": str(uuid.uuid5(_ID_NAMESPACE, f"{name}/{k}/{region.bounds}")),
                    "geometry": {
                        "type": geom["type"],
                        "coordinates": _rounded(geom["coordinates"], ndigits),
                    },
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": color},
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

    Returns:
        The number of features written.
    """
    features = geojson_features(
        class_map, class_names, colors, scale_to_level0, offset, min_area_px
    )
    atomic_write_text(path, json.dumps({"type": "FeatureCollection", "features": features}))
    log.info("wrote %d regions to %s", len(features), path)
    return len(features)


def _feature_class(feature: dict) -> str | None:
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
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} cannot be read as GeoJSON ({exc}); export it from QuPath "
            "with File > Export objects as GeoJSON"
        ) from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise DataError(
            f"{path} is JSON but not a GeoJSON Feature, FeatureCollection or list of features"
        )
    index = {name: i for i, name in enumerate(class_names)}
    out = np.full(shape_hw, len(class_names), np.uint8)
    skipped: dict[str, int] = {}
    off = np.asarray(offset, np.float64)
    one = float(1 << _RASTER_SHIFT)
    for feature in features:
        name = _feature_class(feature) if isinstance(feature, dict) else None
        if name not in index:
            skipped[str(name)] = skipped.get(str(name), 0) + 1
            continue
        try:
            geom = shape(feature["geometry"])
        except (
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            shapely.errors.ShapelyError,
        ) as exc:
            raise DataError(
                f"{path}: a feature of class {name!r} has an invalid geometry ({exc})"
            ) from exc
        local = shapely.transform(geom, lambda xy: (xy - off) / scale_to_level0)
        local = shapely.make_valid(local) if not local.is_valid else local
        for poly in _polygons_of(local.buffer(-_RASTER_INSET, join_style="mitre")):
            # Shift by -0.5 so pixel centres sit on integer coordinates (fillPoly's grid).
            rings = [np.asarray(poly.exterior.coords)] + [
                np.asarray(r.coords) for r in poly.interiors
            ]
            pts = [np.round((r[:, :2] - 0.5) * one).astype(np.int32) for r in rings]
            cv2.fillPoly(out, pts, int(index[name]), lineType=cv2.LINE_8, shift=_RASTER_SHIFT)
    if skipped:
        log.warning(
            "%s: skipped features of classes not in %s: %s", path, list(class_names), skipped
        )
    return out


# ---------------------------------------------------------------- areas
def pixel_area_um2(mpp: float | tuple[float, float] | None, downsample: float) -> float | None:
    """Area of one map pixel in square micrometres.

    Args:
        mpp: micrometres per level-0 pixel, ``(x, y)`` or one number; None if unknown.
        downsample: level-0 pixels per map pixel.

    Returns:
        ``mpp_x * mpp_y * downsample**2``, or None when ``mpp`` is None.
    """
    if mpp is None:
        return None
    mx, my = (mpp, mpp) if isinstance(mpp, (int, float)) else mpp
    return float(mx) * float(my) * float(downsample) ** 2


def area_table(
    class_map: np.ndarray,
    class_names: Sequence[str],
    pixel_area_um2: float | None = None,
    tissue_only: bool = True,
) -> list[dict]:
    """Pixels, fraction of tissue and area of every class.

    Args:
        class_map: label map, classes ``0..C-1``, background ``C``.
        class_names: the C class names.
        pixel_area_um2: area of one map pixel in um^2 (``pixel_area_um2(mpp,
            downsample)``); None leaves ``area_um2`` empty.
        tissue_only: leave out the background row (fractions are of tissue
            pixels either way; the background row has fraction None).

    Returns:
        Rows ``{"class", "class_id", "pixels", "fraction_of_tissue", "area_um2"}``.
    """
    c = len(class_names)
    counts = np.bincount(class_map.ravel().astype(np.int64), minlength=c + 1)
    tissue = int(counts[:c].sum())
    if counts.size > c + 1 and counts[c + 1 :].any():
        log.warning("class map holds labels above background (%d); counted as neither", c)

    def area(n: int) -> float | None:
        return None if pixel_area_um2 is None else n * pixel_area_um2

    rows = [
        {
            "class": name,
            "class_id": i,
            "pixels": int(counts[i]),
            "fraction_of_tissue": (int(counts[i]) / tissue) if tissue else 0.0,
            "area_um2": area(int(counts[i])),
        }
        for i, name in enumerate(class_names)
    ]
    if not tissue_only:
        rows.append(
            {
                "class": "background",
                "class_id": c,
                "pixels": int(counts[c]),
                "fraction_of_tissue": None,
                "area_um2": area(int(counts[c])),
            }
        )
    return rows


def write_area_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """Write area rows as CSV (header from the first row; None as an empty cell)."""
    if not rows:
        raise ValueError("no rows to write")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def write_area_json(path: str | Path, rows: Sequence[dict]) -> None:
    """Write area rows as a JSON list."""
    atomic_write_json(path, list(rows))


# ---------------------------------------------------------------- pictures
def overlay(
    image_rgb: np.ndarray, class_map: np.ndarray, colors: Sequence[Color], alpha: float = 0.4
) -> np.ndarray:
    """Blend class colours over an image.

    Args:
        image_rgb: ``H x W x 3`` uint8 RGB.
        class_map: label map, resized (nearest) to ``H x W`` if it differs
            (e.g. a slide canvas over a thumbnail).
        colors: one ``(r, g, b)`` per label to colour; labels without a
            colour (e.g. background when only C colours are given) are left
            as they are.
        alpha: colour opacity in [0, 1].

    Returns:
        ``H x W x 3`` uint8 RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = image_rgb.shape[:2]
    labels = class_map
    if labels.shape != (h, w):
        labels = cv2.resize(labels.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    lut = np.zeros((256, 3), np.float32)
    painted = np.zeros(256, bool)
    for i, col in enumerate(colors[:256]):
        lut[i] = col[:3]
        painted[i] = True
    idx = labels.astype(np.uint8)
    a = (alpha * painted[idx]).astype(np.float32)[..., None]
    out = image_rgb.astype(np.float32) * (1.0 - a) + lut[idx] * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def add_legend(
    img: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[Color],
    font_scale: float | None = None,
) -> np.ndarray:
    """Append a legend strip (colour swatch + name per class) below an image.

    Args:
        img: ``H x W x 3`` uint8 RGB.
        class_names: names to list.
        colors: one ``(r, g, b)`` per name.
        font_scale: OpenCV font scale; None picks one from the image width.

    Returns:
        ``(H + legend) x W x 3`` uint8 RGB.
    """
    _check_colors(class_names, colors)
    w = img.shape[1]
    scale = font_scale if font_scale is not None else float(np.clip(w / 900, 0.35, 1.2))
    font = cv2.FONT_HERSHEY_SIMPLEX
    thick = max(1, round(scale * 1.5))
    (_, text_h), base = cv2.getTextSize("Ag", font, scale, thick)
    row_h = text_h + base + 8
    sw = row_h - 6  # swatch side
    # Lay out entries left to right, wrapping to new rows.
    entries, x, y = [], 6, 0
    for name in class_names:
        (tw, _), _ = cv2.getTextSize(name, font, scale, thick)
        width = sw + 6 + tw + 14
        if x + width > w and x > 6:
            x, y = 6, y + row_h
        entries.append((x, y, name))
        x += width
    strip = np.full((y + row_h + 4, w, 3), 255, np.uint8)
    for (ex, ey, name), col in zip(entries, colors, strict=False):
        color = tuple(int(v) for v in col[:3])
        cv2.rectangle(strip, (ex, ey + 3), (ex + sw, ey + 3 + sw), color, -1)
        cv2.rectangle(strip, (ex, ey + 3), (ex + sw, ey + 3 + sw), (0, 0, 0), 1)
        cv2.putText(
            strip,
            name,
            (ex + sw + 6, ey + 3 + text_h + 1),
            font,
            scale,
            (0, 0, 0),
            thick,
            cv2.LINE_AA,
        )
    return np.concatenate([img, strip], axis=0)


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write an RGB (``H x W x 3``) or label/gray (``H x W``) uint8 array as PNG atomically."""
    if array.dtype != np.uint8:
        raise ValueError(f"PNG export needs uint8, got {array.dtype}")
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError(f"OpenCV could not encode an array of shape {array.shape} as PNG")
    atomic_write_bytes(path, encoded.tobytes())
