"""Many slides through one model: ``lpdseg slide CKPT DIR | GLOB | manifest.csv --out OUT``.

:func:`collect_slides` turns the command's SLIDE arguments into a list of
:class:`SlideEntry` (a folder: its slides and images; a glob pattern: the
slides and images it matches; a ``.csv`` manifest: its ``slide`` column,
paths relative to the CSV's folder, and an optional ``slide_mpp`` column; a
file: itself). :func:`folder_names` gives each slide its own folder under
``OUT``, named by the slide's file stem (``-2``, ``-3``, ... when stems
collide). :func:`run_batch` loads the model once and runs every slide with
:func:`~lpdseg.wsi.pipeline.run_slide_job` into its folder:

* a slide that fails (unreadable, no resolution, ...) is listed with its
  reason (status ``failed``) and the others go on;
* ``skip_done``: a slide whose folder holds its summary JSON (a finished
  run) is not run again (status ``skipped``), so an interrupted batch resumes;
* under ``torchrun`` with several slides, whole slides are shared over the
  ranks (rank ``r`` takes slides ``r, r + W, ...``), each run in its rank
  alone; with one slide its tiles are split over the ranks as for one slide.

When every slide is through, rank 0 writes ``OUT/slides_summary.csv``
(atomically; :data:`SUMMARY_NAME`), one row per slide read from its summary
and areas JSON: ``slide, folder, status, reason, working_mpp_um_per_px,
resolution_source, slide_mpp_um_per_px, slide_mpp_source, tissue_area_mm2,
<class>_area_mm2 ..., seconds``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from lpdseg.engine.distributed import DistContext, cleanup, init_distributed
from lpdseg.errors import ConfigError, DataError, LpdsegError
from lpdseg.imageio import IMAGE_SUFFIXES
from lpdseg.io import atomic_write_text
from lpdseg.wsi.job import MAX_MPP_UM_PER_PX, SlideJob, SlideJobError
from lpdseg.wsi.pipeline import job_device, load_predictor, model_tile, run_slide_job
from lpdseg.wsi.reader import SLIDE_FORMATS

log = logging.getLogger(__name__)

__all__ = [
    "SLIDE_SUFFIXES",
    "SUMMARY_NAME",
    "BatchResult",
    "SlideEntry",
    "collect_slides",
    "folder_names",
    "is_batch",
    "read_manifest",
    "run_batch",
    "summary_row",
]

#: File suffixes taken from a folder or a glob pattern (slides OpenSlide reads, images).
SLIDE_SUFFIXES = tuple(dict.fromkeys((*SLIDE_FORMATS, *IMAGE_SUFFIXES)))
#: The summary CSV over all slides, in ``OUT``.
SUMMARY_NAME = "slides_summary.csv"
#: Statuses of a slide in the summary.
STATUSES = ("done", "skipped", "failed")
#: How long ranks sharing slides wait for each other at the end (slides take hours).
GATHER_TIMEOUT = timedelta(days=7)
#: ``slide_mpp_source`` in the summary CSV of a slide whose pixel size a manifest gives.
MANIFEST_MPP_SOURCE = "manifest slide_mpp"
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a batch.

    Attributes:
        path: the slide file.
        slide_mpp_um_per_px: its level-0 pixel size from a manifest's
            ``slide_mpp`` column (None: the job's or the slide's own).
        origin: where it was listed, for messages (``manifest.csv row 3``).
    """

    path: Path
    slide_mpp_um_per_px: float | None = None
    origin: str = ""


@dataclass
class BatchResult:
    """What :func:`run_batch` did.

    Attributes:
        rows: one summary row per slide, in input order (every rank has them).
        csv_path: ``OUT/slides_summary.csv`` (written by rank 0).
        rank: this process's rank (0 for one process).
    """

    rows: list[dict[str, Any]]
    csv_path: Path
    rank: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {s: sum(r["status"] == s for r in self.rows) for s in STATUSES}

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The rows of the slides that failed."""
        return [r for r in self.rows if r["status"] == "failed"]


# ---------------------------------------------------------------- inputs
def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def is_batch(sources: Sequence[str | Path]) -> bool:
    """Whether SLIDE arguments name many slides: several, a folder, a ``.csv`` or a glob.

    One existing file that is not a ``.csv`` (or one path that does not exist
    and has no glob characters) is a single slide, run as ``lpdseg slide``
    always has (its outputs directly in ``--out``).
    """
    if len(sources) != 1:
        return True
    p = Path(sources[0])
    if p.is_dir():
        return True
    if p.is_file():
        return p.suffix.lower() == ".csv"
    return _has_glob(str(sources[0]))


def _slides_in(paths: Sequence[Path]) -> list[Path]:
    return sorted(
        p
        for p in paths
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES
    )


def _suffix_list() -> str:
    return " ".join(SLIDE_SUFFIXES)


def read_manifest(path: Path) -> list[SlideEntry]:
    """The slides a manifest CSV lists.

    Columns: ``slide`` (a path, relative to the CSV's folder unless absolute;
    required) and ``slide_mpp`` (the slide's micrometres per level-0 pixel,
    optional; an empty cell: the slide's own). Other columns are ignored.

    Raises:
        DataError: the CSV cannot be read, has no ``slide`` column, no rows,
            an empty path or a ``slide_mpp`` that is not a pixel size; the
            message names the file, the row and the column.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"manifest {path} cannot be read: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "slide" not in columns:
        raise DataError(
            f"manifest {path} has no 'slide' column (its header: {', '.join(columns) or 'none'}); "
            "give a header row with a 'slide' column of slide paths (relative to the CSV's "
            "folder) and optionally 'slide_mpp' (micrometres per level-0 pixel)"
        )
    entries = []
    for i, raw in enumerate(reader, start=2):  # row 1 is the header
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        where = f"{path} row {i}"
        if not any(row.values()):
            continue  # a blank line
        if not row.get("slide"):
            raise DataError(f"manifest {where}: the 'slide' column is empty; give a slide path")
        slide = Path(row["slide"]).expanduser()
        if not slide.is_absolute():
            slide = path.parent / slide
        mpp: float | None = None
        if row.get("slide_mpp"):
            try:
                mpp = float(row["slide_mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and 0 < mpp < MAX_MPP_UM_PER_PX):
                raise DataError(
                    f"manifest {where}: slide_mpp {row['slide_mpp']!r} is not a pixel size; give "
                    f"micrometres per level-0 pixel in (0, {MAX_MPP_UM_PER_PX:g}), e.g. 0.25 "
                    "at 40x, 0.5 at 20x, or leave it empty for the slide's own"
                )
        entries.append(SlideEntry(slide, mpp, where))
    if not entries:
        raise DataError(f"manifest {path} lists no slides (a header and no rows)")
    return entries


def collect_slides(sources: Sequence[str | Path]) -> list[SlideEntry]:
    """Every slide the SLIDE arguments name, in order, each once.

    A folder: its files with a slide or image suffix (:data:`SLIDE_SUFFIXES`,
    not recursive, sorted); a glob pattern (``*``, ``?``, ``[``; ``**``
    recursive): the files it matches with such a suffix, sorted; a ``.csv``:
    :func:`read_manifest`; anything else: that file (one that does not exist
    fails when its turn comes, listed with the reason).

    Raises:
        DataError: a folder or pattern holds no slide, or a manifest is bad.
    """
    entries: list[SlideEntry] = []
    for source in sources:
        p = Path(source).expanduser()
        if p.is_dir():
            found = _slides_in(list(p.iterdir()))
            if not found:
                raise DataError(
                    f"folder {p} holds no slide or image (looked for {_suffix_list()}); "
                    "name the slides, a glob pattern or a manifest.csv"
                )
            entries += [SlideEntry(f, None, str(p)) for f in found]
        elif p.is_file() and p.suffix.lower() == ".csv":
            entries += read_manifest(p)
        elif not p.exists() and _has_glob(str(source)):
            found = _slides_in([Path(m) for m in glob.glob(str(p), recursive=True)])
            if not found:
                raise DataError(
                    f"pattern {source} matches no slide or image (looked for {_suffix_list()}); "
                    "quote it so the shell does not expand it, and check the folder"
                )
            entries += [SlideEntry(f, None, str(source)) for f in found]
        else:
            entries.append(SlideEntry(p, None, "argument"))
    seen: set[Path] = set()
    unique = []
    for e in entries:
        key = e.path.resolve()
        if key in seen:
            log.warning("%s is listed more than once (%s); running it once", e.path, e.origin)
            continue
        seen.add(key)
        unique.append(e)
    return unique


def folder_names(entries: Sequence[SlideEntry]) -> list[str]:
    """A folder name under ``OUT`` for each slide: its file stem, unique.

    When stems collide (``a/x.svs``, ``b/x.tif``) the first keeps the stem
    and the others get ``-2``, ``-3``, ... (case-insensitively unique, so
    folders do not merge on case-insensitive file systems either). The same
    inputs in the same order always get the same names (``skip_done``
    relies on it).
    """
    used: set[str] = set()
    names = []
    for e in entries:
        stem = e.path.stem or "slide"
        name, n = stem, 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        names.append(name)
    return names


# ---------------------------------------------------------------- summary rows
def _round(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s for the slides summary: %s", path, exc)
        return None


def summary_row(
    job: SlideJob,
    folder: str,
    status: str,
    reason: str,
    class_names: Sequence[str],
    *,
    read: bool = True,
    slide_mpp_source: str | None = None,
) -> dict[str, Any]:
    """One slide's row of the summary CSV (from its summary and areas JSON when it ran).

    Areas are in mm^2 (None when the slide's pixel size is unknown, e.g. run
    with a downsample); ``tissue_area_mm2`` is the sum over the classes.
    ``read=False`` leaves out what the files say (status and reason only);
    ``slide_mpp_source`` names where a given slide mpp came from (e.g. a
    manifest) instead of the summary's ``"--slide-mpp"``.
    """
    row: dict[str, Any] = {
        "slide": str(job.slide),
        "folder": folder,
        "status": status,
        "reason": reason,
        "working_mpp_um_per_px": None,
        "resolution_source": None,
        "slide_mpp_um_per_px": None,
        "slide_mpp_source": None,
        "tissue_area_mm2": None,
        **{f"{c}_area_mm2": None for c in class_names},
        "seconds": None,
    }
    if status == "failed" or not read:
        return row
    summary = _read_json(job.summary_path) or {}
    row["working_mpp_um_per_px"] = _round(summary.get("working_mpp"))
    row["resolution_source"] = summary.get("resolution_source")
    row["slide_mpp_um_per_px"] = _round(summary.get("slide_mpp"))
    row["slide_mpp_source"] = summary.get("slide_mpp_source")
    if slide_mpp_source is not None and row["slide_mpp_source"] == "--slide-mpp":
        row["slide_mpp_source"] = slide_mpp_source
    row["seconds"] = summary.get("seconds")
    areas = _read_json(job.output_files()["areas_json"]) or []
    values = []
    for area in areas:
        um2 = area.get("area_um2")
        mm2 = None if um2 is None else um2 / 1e6
        values.append(mm2)
        key = f"{area.get('class')}_area_mm2"
        if key in row:
            row[key] = _round(mm2)
    if values and all(v is not None for v in values):
        row["tissue_area_mm2"] = _round(sum(values))
    return row


def write_summary_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write the rows as CSV atomically (None as an empty cell; columns of the first row)."""
    buf = io.StringIO()
    columns = list(rows[0]) if rows else ["slide", "folder", "status", "reason"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------- the batch
def _gather_group() -> Any:
    """A Gloo group of every rank that waits up to ``GATHER_TIMEOUT`` (made while ranks are in step).

    The default group's timeout (an hour) is too short for the end of a
    batch, when ranks finish their shares of slides hours apart.
    """
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=GATHER_TIMEOUT)


def _gather(ctx: DistContext, group: Any, outcomes: list[Any]) -> list[Any]:
    """Every rank's outcomes, in rank order (the barrier before the summary CSV)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, outcomes, group=group)
    dist.destroy_process_group(group)
    return [o for part in parts for o in part]


def run_batch(
    checkpoint: str | Path,
    sources: Sequence[str | Path],
    out_root: str | Path,
    *,
    skip_done: bool = False,
    progress: bool = True,
    names: Mapping[str, str] | None = None,
    **options: Any,
) -> BatchResult:
    """Run every slide the sources name through one model, each into ``out_root/<name>``.

    Args:
        checkpoint: a ``best.pt`` or an ``.onnx`` export, loaded once.
        sources: SLIDE arguments (folders, glob patterns, manifest CSVs, files;
            see :func:`collect_slides`).
        out_root: the batch's folder: one folder per slide
            (:func:`folder_names`) and ``slides_summary.csv``.
        skip_done: do not run a slide whose folder holds its summary JSON
            (listed as ``skipped``).
        progress: progress bars.
        names: front-end names of ``SlideJob`` fields (e.g. CLI flags) for the
            reasons of failed slides and for option errors.
        **options: other ``SlideJob`` fields, the same for every slide
            (``slide_mpp_um_per_px`` is replaced by a manifest's ``slide_mpp``).

    Returns:
        The rows of the summary CSV and its path (on every rank).

    Raises:
        SlideJobError: an option is invalid, or a tile an ONNX model cannot
            take (before any slide is run).
        ConfigError: ``skip_done`` together with ``overwrite``.
        DataError: the sources name no slide, or a manifest is bad.
        CheckpointError / OnnxError: the model cannot be loaded.
    """
    names = dict(names or {})
    out_root = Path(out_root)
    if skip_done and options.get("overwrite"):
        raise ConfigError(
            f"{names.get('skip_done', 'skip_done')} and {names.get('overwrite', 'overwrite')} "
            "contradict each other (one keeps finished slides, the other runs them again); "
            "choose one"
        )
    # Every option is checked once, before any slide is collected or run.
    probe = SlideJob(checkpoint, out_root / "slide", out_root, **options)
    if out_root.exists() and not out_root.is_dir():
        raise SlideJobError(
            "out_dir", out_root, "is an existing file, not a folder; name a folder (it is created)"
        )
    entries = collect_slides(sources)
    if not entries:
        raise DataError(f"no slides in {', '.join(map(str, sources))}")
    folders = folder_names(entries)
    jobs = [
        SlideJob(
            checkpoint,
            e.path,
            out_root / name,
            **{
                **options,
                "slide_mpp_um_per_px": e.slide_mpp_um_per_px
                if e.slide_mpp_um_per_px is not None
                else options.get("slide_mpp_um_per_px"),
            },
        )
        for e, name in zip(entries, folders, strict=True)
    ]
    ctx = init_distributed(job_device(probe.device, DistContext()))
    try:
        device = job_device(probe.device, ctx)
        predictor = load_predictor(probe, device)
        model_tile(predictor, probe)  # a --tile an ONNX model cannot take fails once, here
        share_slides = ctx.enabled and len(jobs) > 1
        group = _gather_group() if share_slides else None
        # Sharing slides: each rank runs its slides alone; else every rank shares each slide.
        mine = list(range(len(jobs)))[ctx.rank :: ctx.world_size] if share_slides else None
        slide_ctx = DistContext() if share_slides else ctx
        outcomes = []
        for i in mine if mine is not None else range(len(jobs)):
            status, reason = _run_one(
                jobs[i], predictor, device, slide_ctx, skip_done, names, progress
            )
            outcomes.append((i, status, reason))
        if share_slides:
            outcomes = _gather(ctx, group, outcomes)
        by_index = {i: (status, reason) for i, status, reason in outcomes}
        class_names = list(predictor.class_names)
        rows = [
            summary_row(
                job,
                name,
                *by_index[i],
                class_names,
                read=ctx.is_main,
                slide_mpp_source=None if e.slide_mpp_um_per_px is None else MANIFEST_MPP_SOURCE,
            )
            for i, (job, name, e) in enumerate(zip(jobs, folders, entries, strict=True))
        ]
        csv_path = out_root / SUMMARY_NAME
        if ctx.is_main:
            write_summary_csv(csv_path, rows)
            log.info(
                "%d slides: %s -> %s",
                len(rows),
                ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in STATUSES),
                csv_path,
            )
        return BatchResult(rows, csv_path, ctx.rank)
    finally:
        cleanup(ctx)


def _run_one(
    job: SlideJob,
    predictor: Any,
    device: Any,
    ctx: DistContext,
    skip_done: bool,
    names: Mapping[str, str],
    progress: bool,
) -> tuple[str, str]:
    """``(status, reason)`` of one slide of the batch, run (or skipped) here."""
    if skip_done and job.summary_path.is_file():
        log.info("%s: finished before (%s); skipped", job.slide, job.summary_path)
        return "skipped", f"finished before ({job.summary_path.name} in {job.out_dir})"
    started = time.perf_counter()
    try:
        run_slide_job(job, progress=progress, predictor=predictor, device=device, ctx=ctx)
    except SlideJobError as exc:
        reason = exc.for_names(names)
        if exc.remedy == ("overwrite", "to replace it") and "skip_done" in names:
            reason += f", or {names['skip_done']} to keep it"
    except LpdsegError as exc:
        reason = str(exc)
    except Exception as exc:  # a bug or an unexpected library error: this slide only
        log.exception("%s: unexpected error", job.slide)
        reason = f"{type(exc).__name__}: {exc}"
    else:
        log.info("%s: done in %.1f s -> %s", job.slide, time.perf_counter() - started, job.out_dir)
        return "done", ""
    log.error("%s: failed: %s", job.slide, reason)
    return "failed", " ".join(reason.split())
