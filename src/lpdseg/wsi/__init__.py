"""Whole-slide and large-image machinery, each step separate and individually tested.

* ``reader``: ``open_image`` -> an ``ImageReader`` (OpenSlide or plain image);
* ``tissue``: ``detect_tissue`` on a thumbnail;
* ``tiling``: tissue tiles and bounded-memory slide stitching split over
  ranks (the tile grid, blending and the sliding window over an image are
  the inference layer's: ``lpdseg.inference.sliding``);
* ``storage``: slide-sized arrays on disk (canvases), released band by band;
* ``finish``: a stitched canvas -> class map and probabilities, band by band;
* ``export``: polygons, QuPath GeoJSON, area tables, overlays;
* ``job`` / ``pipeline`` / ``lock``: ``lpdseg slide`` as one validated
  ``SlideJob`` and the steps that run it (choose level, find tissue, infer,
  merge ranks, write outputs), guarded by a lock on the output folder.

``stitch_slide`` takes the model as a ``predict_fn`` (RGB tiles in [0, 1] ->
label scores); ``run_slide_job`` loads it from a checkpoint.
"""

from lpdseg.wsi.export import mask_to_polygons, read_geojson_to_mask, write_geojson
from lpdseg.wsi.job import SlideJob, SlideJobError
from lpdseg.wsi.lock import OutputLock, OutputLockedError
from lpdseg.wsi.pipeline import run_slide_job
from lpdseg.wsi.reader import ImageReader, open_image
from lpdseg.wsi.tiling import SlideCanvas, merge_partial, select_tissue_tiles, stitch_slide
from lpdseg.wsi.tissue import detect_tissue

__all__ = [
    "ImageReader",
    "OutputLock",
    "OutputLockedError",
    "SlideCanvas",
    "SlideJob",
    "SlideJobError",
    "detect_tissue",
    "mask_to_polygons",
    "merge_partial",
    "open_image",
    "read_geojson_to_mask",
    "run_slide_job",
    "select_tissue_tiles",
    "stitch_slide",
    "write_geojson",
]
