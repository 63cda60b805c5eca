"""Whole-slide and large-image machinery, each step separate and individually tested.

* ``reader``: ``open_image`` -> an ``ImageReader`` (OpenSlide or plain image);
* ``tissue``: ``detect_tissue`` on a thumbnail;
* ``tiling``: tile grids, sliding-window inference with smooth blending, and
  bounded-memory slide stitching split over ranks;
* ``export``: polygons, QuPath GeoJSON, area tables, overlays.

The model enters only as a ``predict_fn`` (RGB tiles in [0, 1] -> label scores).
"""

from lpdseg.wsi.export import (
    add_legend,
    area_table,
    mask_to_polygons,
    overlay,
    pixel_area_um2,
    read_geojson_to_mask,
    write_area_csv,
    write_area_json,
    write_geojson,
    write_png,
)
from lpdseg.wsi.reader import ImageReader, open_image
from lpdseg.wsi.tiling import (
    SlideCanvas,
    TileGrid,
    blend_window,
    grid_for,
    merge_partial,
    select_tissue_tiles,
    sliding_window_predict,
    stitch_slide,
)
from lpdseg.wsi.tissue import detect_tissue

__all__ = [
    "ImageReader",
    "SlideCanvas",
    "TileGrid",
    "add_legend",
    "area_table",
    "blend_window",
    "detect_tissue",
    "grid_for",
    "mask_to_polygons",
    "merge_partial",
    "open_image",
    "overlay",
    "pixel_area_um2",
    "read_geojson_to_mask",
    "select_tissue_tiles",
    "sliding_window_predict",
    "stitch_slide",
    "write_area_csv",
    "write_area_json",
    "write_geojson",
    "write_png",
]
