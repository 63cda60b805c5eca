"""What one ``lpdseg slide`` run does, as one validated value: :class:`SlideJob`.

Every field says its unit in its name where it has one:

* ``..._um_per_px``: micrometres per pixel;
* ``..._level0_px``: level-0 (full-resolution) pixels per pixel;
* ``..._working_px``: pixels at the working resolution (the resolution the
  model sees: ``mpp_um_per_px`` or ``downsample_level0_px``);
* ``..._map_px``: pixels of the stitched class map;
* ``..._side_px``: the longest side of a picture, in its own pixels.

The model is a PyTorch checkpoint (``best.pt``) or, when ``checkpoint`` ends
in ``.onnx``, a model written by ``lpdseg export`` (run with onnxruntime; its
tile size, gate and threshold are fixed at export, see :attr:`SlideJob.backend`).

A bad value fails in ``__post_init__`` with a :class:`SlideJobError` that
names the field (``SlideJob.overlap=1.5 must be in [0, 1)``); front ends map
it to their own option names with :meth:`SlideJobError.for_names`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lpdseg.errors import ConfigError

#: Working resolution used when nothing is requested, the model does not record the pixel
#: size it was trained at (no ``data.mpp``) and the slide knows its mpp.
DEFAULT_MPP_UM_PER_PX = 2.0
#: Largest plausible pixel size (um/px); a slide's pixel size must be below it.
MAX_MPP_UM_PER_PX = 100.0
#: ``SlideJob.backend`` values: PyTorch checkpoints, ONNX exports (``.onnx``).
BACKENDS = ("torch", "onnx")
#: Smallest tile side the job accepts (working pixels).
MIN_TILE_WORKING_PX = 16
#: Smallest thumbnail / overlay side (pixels).
MIN_PICTURE_SIDE_PX = 16


def _show(value: Any) -> str:
    return str(value) if isinstance(value, (Path, str)) else repr(value)


class SlideJobError(ConfigError):
    """A ``SlideJob`` field has a value the job cannot run with.

    The message names the library field (``SlideJob.overlap=1.5 must be in
    [0, 1)``); :meth:`for_names` renders the same facts with a front end's
    names for the fields (``--overlap 1.5: must be in [0, 1)``).

    Attributes:
        field: the ``SlideJob`` field at fault.
        value: its value.
        problem: what is wrong, e.g. ``"must be in [0, 1)"``. It may name other
            fields as ``{field_name}`` (rendered with their value from ``related``)
            or as ``{@field_name}`` (the name alone, e.g. a flag to give).
        related: values of the other fields the problem names.
        remedy: ``(bool field, purpose)`` to switch on to go ahead, e.g.
            ``("overwrite", "to replace it")``.
    """

    def __init__(
        self,
        field: str,
        value: Any,
        problem: str,
        *,
        related: Mapping[str, Any] | None = None,
        remedy: tuple[str, str] | None = None,
    ) -> None:
        self.field, self.value, self.problem = field, value, problem
        self.related = dict(related or {})
        self.remedy = remedy
        super().__init__(self._render({}))

    def for_names(self, names: Mapping[str, str]) -> str:
        """The message with ``names[field]`` (e.g. CLI flags) for the fields it names.

        A field in ``names`` is shown as ``NAME VALUE``, the value after a
        colon (``--overlap 1.5: must be in [0, 1)``); a bool ``remedy`` field
        as ``pass NAME``. Fields missing from ``names`` keep their library
        form (``SlideJob.field=VALUE``, ``set SlideJob.field=True``).
        """
        return self._render(names)

    def field_names_in_problem(self) -> list[str]:
        """The fields the problem names alone, as ``{@field}``."""
        return [
            name[1:]
            for _, name, _, _ in string.Formatter().parse(self.problem)
            if name and name.startswith("@")
        ]

    def _render(self, names: Mapping[str, str]) -> str:
        def named(field: str, value: Any) -> str:
            if field in names:
                return f"{names[field]} {_show(value)}"
            return f"SlideJob.{field}={_show(value)}"

        def name_only(field: str) -> str:
            return names.get(field, f"SlideJob.{field}")

        refs = {f: named(f, v) for f, v in self.related.items()}
        refs.update({f"@{f}": name_only(f) for f in self.field_names_in_problem()})
        problem = self.problem.format_map(refs)
        sep = ": " if self.field in names else " "
        text = f"{named(self.field, self.value)}{sep}{problem}"
        if self.remedy is not None:
            field, purpose = self.remedy
            how = f"pass {names[field]}" if field in names else f"set SlideJob.{field}=True"
            text += f"; {how} {purpose}"
        return text


@dataclass(frozen=True)
class SlideJob:
    """One whole slide through one checkpoint into one output folder.

    Attributes:
        checkpoint: a ``best.pt`` / ``last.pt`` written by ``lpdseg train``, or a
            ``.onnx`` file written by ``lpdseg export`` (see ``backend``).
        slide: a slide OpenSlide reads (SVS, NDPI, MRXS, pyramidal TIFF, ...)
            or a plain image.
        out_dir: output folder (created; must not be a file).
        mpp_um_per_px: working resolution in micrometres per pixel (default:
            the model's own, the checkpoint's ``data.mpp`` or the ONNX
            metadata's ``mpp``; ``DEFAULT_MPP_UM_PER_PX`` with a warning when
            the model does not record it).
        downsample_level0_px: working resolution as level-0 pixels per
            working pixel, instead of ``mpp_um_per_px`` (for slides without
            a resolution).
        slide_mpp_um_per_px: the slide's level-0 pixel size in micrometres per
            pixel, replacing what its metadata says (missing or wrong); None:
            the metadata's.
        tile_working_px: tile side in working pixels, the model's input size;
            None = the checkpoint's ``eval.tile`` (an ONNX model's fixed tile;
            another value is refused for ONNX).
        overlap: fraction of a tile shared by neighbours, in [0, 1).
        batch_tiles: tiles per forward pass.
        map_downsample_working_px: working pixels per pixel of the stitched
            class map (rounded to whole pixels of the level read).
        tta: test-time augmentation (not with ONNX: exported without it).
        threshold: class probability threshold in [0, 1] (None: the checkpoint's;
            not with ONNX: fixed at export).
        thumbnail_side_px: longest side of the thumbnail tissue is found on.
        tissue_min_fraction: tiles with less tissue than this fraction of
            their area are skipped, in [0, 1].
        overlay_side_px: longest side of the overlay PNG (at most the map's).
        min_region_area_map_px: regions smaller than this many map pixels are
            left out of the GeoJSON.
        read_workers: threads reading tiles ahead of the model (0: read between batches).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        overwrite: replace the outputs of a finished run of this slide in
            ``out_dir`` (otherwise such a run is refused).
        tissue_mask: the user's tissue mask instead of the automatic one: a
            binary image (any size, scaled to the slide; non-zero = tissue) or a
            QuPath GeoJSON of annotations (level-0 pixels).
        pen_filter: remove blue/green/black ink from the automatic tissue mask.
        ome_tiff: also write the class map as a pyramidal OME-TIFF
            (``<stem>_classmap.ome.tif``, palette + pixel size).
        ome_probabilities: add uint8 per-class probabilities to the OME-TIFF.
        geojson_object_type: QuPath object type of the regions,
            ``annotation`` or ``detection``.
        geojson_simplify_level0_px: polygon simplification tolerance in level-0
            pixels (0: exact outlines).
        slide_scoring: ``seamless`` (default: raw maps stitched, then normalised,
            gated over fields of the training crop and glass/non-tissue made
            background on the stitched canvas, so tiles leave no seams) or
            ``per_tile`` (each tile's label scores as ``predict`` gives them,
            stitched). Stage-2 networks always use ``per_tile``, and so do ONNX
            files exported without the raw outputs (older exports, stage-2 networks).
    """

    checkpoint: Path
    slide: Path
    out_dir: Path
    mpp_um_per_px: float | None = None
    downsample_level0_px: float | None = None
    slide_mpp_um_per_px: float | None = None
    tile_working_px: int | None = None
    overlap: float = 0.25
    batch_tiles: int = 8
    map_downsample_working_px: int = 8
    tta: bool = False
    threshold: float | None = None
    thumbnail_side_px: int = 2048
    tissue_min_fraction: float = 0.05
    overlay_side_px: int = 2048
    min_region_area_map_px: float = 1.0
    read_workers: int = 1
    device: str = "auto"
    overwrite: bool = False
    tissue_mask: Path | None = None
    pen_filter: bool = False
    ome_tiff: bool = True
    ome_probabilities: bool = False
    geojson_object_type: str = "annotation"
    geojson_simplify_level0_px: float = 0.0
    slide_scoring: str = "seamless"

    def __post_init__(self) -> None:
        for name in ("checkpoint", "slide", "out_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or str(value) == "":
                raise SlideJobError(name, value, "must be a file system path")
            object.__setattr__(self, name, Path(value))
        mpp, ds = self.mpp_um_per_px, self.downsample_level0_px
        _positive("mpp_um_per_px", mpp, allow_none=True)
        _positive("downsample_level0_px", ds, allow_none=True)
        if mpp is not None and ds is not None:
            raise SlideJobError(
                "downsample_level0_px",
                ds,
                "cannot be combined with {mpp_um_per_px}: give one working resolution, not both",
                related={"mpp_um_per_px": mpp},
            )
        if self.slide_mpp_um_per_px is not None:
            _positive("slide_mpp_um_per_px", self.slide_mpp_um_per_px)
            if self.slide_mpp_um_per_px >= MAX_MPP_UM_PER_PX:
                raise SlideJobError(
                    "slide_mpp_um_per_px",
                    self.slide_mpp_um_per_px,
                    f"must be < {MAX_MPP_UM_PER_PX:g} (micrometres per level-0 pixel, e.g. "
                    "0.25 at 40x, 0.5 at 20x)",
                )
        if self.tile_working_px is not None:
            _integer("tile_working_px", self.tile_working_px, MIN_TILE_WORKING_PX)
        _fraction("overlap", self.overlap, hi_open=True)
        _integer("batch_tiles", self.batch_tiles, 1)
        _integer("map_downsample_working_px", self.map_downsample_working_px, 1)
        _flag("tta", self.tta)
        if self.threshold is not None:
            _fraction("threshold", self.threshold)
        _integer("thumbnail_side_px", self.thumbnail_side_px, MIN_PICTURE_SIDE_PX)
        _fraction("tissue_min_fraction", self.tissue_min_fraction)
        _integer("overlay_side_px", self.overlay_side_px, MIN_PICTURE_SIDE_PX)
        _number("min_region_area_map_px", self.min_region_area_map_px)
        if self.min_region_area_map_px < 0:
            raise SlideJobError(
                "min_region_area_map_px", self.min_region_area_map_px, "must be >= 0"
            )
        _integer("read_workers", self.read_workers, 0)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise SlideJobError("device", self.device, "must be auto, cpu, cuda or cuda:N")
        _flag("overwrite", self.overwrite)
        if self.tissue_mask is not None:
            object.__setattr__(self, "tissue_mask", Path(self.tissue_mask))
            if not self.tissue_mask.is_file():
                raise SlideJobError(
                    "tissue_mask",
                    self.tissue_mask,
                    "is not a file: give a binary image or a QuPath GeoJSON of tissue",
                )
        for name in ("pen_filter", "ome_tiff", "ome_probabilities"):
            _flag(name, getattr(self, name))
        if self.ome_probabilities and not self.ome_tiff:
            raise SlideJobError(
                "ome_probabilities", True, "needs {ome_tiff}", related={"ome_tiff": False}
            )
        if self.geojson_object_type not in ("annotation", "detection"):
            raise SlideJobError(
                "geojson_object_type", self.geojson_object_type, "must be annotation or detection"
            )
        _number("geojson_simplify_level0_px", self.geojson_simplify_level0_px)
        if self.geojson_simplify_level0_px < 0:
            raise SlideJobError(
                "geojson_simplify_level0_px", self.geojson_simplify_level0_px, "must be >= 0"
            )
        if self.slide_scoring not in ("seamless", "per_tile"):
            raise SlideJobError("slide_scoring", self.slide_scoring, "must be seamless or per_tile")
        if self.backend == "onnx":
            why = "cannot be used with an ONNX model ({checkpoint}): "
            if self.tta:
                raise SlideJobError(
                    "tta",
                    self.tta,
                    why + "it was exported without test-time augmentation; drop it, or run "
                    "the PyTorch checkpoint",
                    related={"checkpoint": self.checkpoint},
                )
            if self.threshold is not None:
                raise SlideJobError(
                    "threshold",
                    self.threshold,
                    why + "its class threshold is fixed at export (eval.cls_threshold); drop "
                    "it, or export again from a checkpoint with another eval.cls_threshold",
                    related={"checkpoint": self.checkpoint},
                )

    @property
    def backend(self) -> str:
        """``"onnx"`` when ``checkpoint`` is a ``.onnx`` file (onnxruntime), else ``"torch"``."""
        return "onnx" if self.checkpoint.suffix.lower() == ".onnx" else "torch"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the fields, in order."""
        return tuple(f.name for f in fields(cls))

    @property
    def summary_path(self) -> Path:
        """``out_dir/<slide stem>_summary.json``: written last, so it marks a finished run."""
        return self.out_dir / f"{self.slide.stem}_summary.json"

    def output_files(self) -> dict[str, Path]:
        """Every file the job writes into ``out_dir``, by kind (``summary`` last)."""
        stem, out = self.slide.stem, self.out_dir
        files = {
            "geojson": out / f"{stem}.geojson",
            "overlay": out / f"{stem}_overlay.png",
            "class_map": out / f"{stem}_classmap.png",
            "areas_csv": out / f"{stem}_areas.csv",
            "areas_json": out / f"{stem}_areas.json",
        }
        if self.ome_tiff:
            files["ome_tiff"] = out / f"{stem}_classmap.ome.tif"
        return {**files, "summary": self.summary_path}


# ---------------------------------------------------------------- checks
def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SlideJobError(name, value, "must be a finite number")


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _number(name, value)
    if value <= 0:
        raise SlideJobError(name, value, "must be > 0")


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SlideJobError(name, value, f"must be a whole number >= {minimum}")
    if value < minimum:
        raise SlideJobError(name, value, f"must be >= {minimum}")


def _fraction(name: str, value: Any, *, hi_open: bool = False) -> None:
    _number(name, value)
    if value < 0 or (value >= 1 if hi_open else value > 1):
        raise SlideJobError(name, value, f"must be in [0, 1{')' if hi_open else ']'}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SlideJobError(name, value, "must be True or False")
