"""The areas table of a label map: pixels, fraction of tissue and area of every class.

One table for every output that reports areas (``lpdseg predict`` per image,
``lpdseg slide`` per slide), and its two files:

- CSV with the header ``class,class_id,pixels,fraction_of_tissue,area_um2``
  (an unknown value is an empty cell);
- strict JSON (RFC 8259): a list of row objects, an unknown or non-finite
  value is ``null``, never ``NaN`` / ``Infinity``.

Classes are ``0..C-1`` and background is ``C``; fractions are of the tissue
(non-background) pixels. ``area_um2`` is ``pixels x`` the area of one pixel
when the pixel size is known, else None.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpdseg.io import atomic_write_text, dumps_strict, finite_or_none

log = logging.getLogger(__name__)

#: The columns of the table, in order.
FIELDS = ("class", "class_id", "pixels", "fraction_of_tissue", "area_um2")


def pixel_area_um2(mpp: float | Sequence[float] | None, downsample: float = 1.0) -> float | None:
    """Area of one map pixel in square micrometres.

    Args:
        mpp: micrometres per level-0 pixel, ``(x, y)`` or one number; None if unknown.
        downsample: level-0 pixels per map pixel.

    Returns:
        ``mpp_x * mpp_y * downsample**2``, or None when ``mpp`` is None or not
        a positive finite size.
    """
    if mpp is None:
        return None
    mx, my = (mpp, mpp) if np.ndim(mpp) == 0 else mpp
    area = float(mx) * float(my) * float(downsample) ** 2
    if not (math.isfinite(area) and area > 0 and float(mx) > 0 and float(my) > 0):
        return None
    return area


def area_table(
    class_map: np.ndarray,
    class_names: Sequence[str],
    pixel_area_um2: float | None = None,
    tissue_only: bool = True,
) -> list[dict[str, Any]]:
    """Pixels, fraction of tissue and area of every class.

    Args:
        class_map: label map, classes ``0..C-1``, background ``C``.
        class_names: the C class names.
        pixel_area_um2: area of one map pixel in um^2 (:func:`pixel_area_um2`);
            None leaves ``area_um2`` None.
        tissue_only: leave out the background row (fractions are of tissue
            pixels either way; the background row has fraction None). With the
            background row the pixels add up to the map's pixel count, unless
            the map holds labels above background (counted in no row, warned).

    Returns:
        Rows ``{"class", "class_id", "pixels", "fraction_of_tissue", "area_um2"}``.
    """
    c = len(class_names)
    counts = np.bincount(np.asarray(class_map).ravel().astype(np.int64), minlength=c + 1)
    tissue = int(counts[:c].sum())
    if counts.size > c + 1 and counts[c + 1 :].any():
        log.warning("class map holds labels above background (%d); counted as neither", c)

    def row(name: str, i: int, fraction: float | None) -> dict[str, Any]:
        n = int(counts[i])
        return {
            "class": name,
            "class_id": i,
            "pixels": n,
            "fraction_of_tissue": fraction,
            "area_um2": None if pixel_area_um2 is None else n * float(pixel_area_um2),
        }

    rows = [
        row(name, i, (int(counts[i]) / tissue) if tissue else 0.0)
        for i, name in enumerate(class_names)
    ]
    if not tissue_only:
        rows.append(row("background", c, None))
    return rows


def write_area_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write area rows as CSV atomically (header from the first row; None / non-finite empty)."""
    if not rows:
        raise ValueError("no rows to write")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in finite_or_none(r).items()})
    atomic_write_text(path, buf.getvalue())


def area_json(rows: Sequence[dict[str, Any]]) -> str:
    """Area rows as strict JSON text (non-finite numbers become ``null``)."""
    return dumps_strict(list(rows), indent=2) + "\n"


def write_area_json(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write area rows as a strict JSON list atomically (see :func:`area_json`)."""
    atomic_write_text(path, area_json(rows))
