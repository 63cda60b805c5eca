"""The ``lpdseg`` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lpdseg.errors import LpdsegError
from lpdseg.heap import keep_freed_memory

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Weakly supervised segmentation of H&E tissue with learnable prototypes (LPD) "
    "and the PBIP baseline. Configs are YAML presets (see `lpdseg presets`) with "
    "dotted overrides, e.g. `lpdseg train demo train.epochs=2 model.head=cam`.",
)

PresetArg = Annotated[
    str, typer.Argument(help="Preset name (see `lpdseg presets`) or path to a YAML config.")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Config overrides as section.key=value, e.g. train.epochs=2 data.root=data/x."
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, warnings only.")]
# the image-level label rule of `synth` and `patches` (one option, one wording)
MinFractionOpt = Annotated[
    float | None,
    typer.Option(
        help="A class is in a patch's label if it covers this fraction of it "
        "(default: the preset's data.label_min_fraction, else 0.02)."
    ),
]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _run(fn, *args, **kwargs):
    """Call library code; turn user errors into a one-line message and exit code 2.

    An error carrying its own ``exit_code`` (an interrupted training run: 130 for
    SIGINT, 143 for SIGTERM) is printed as it is and exits with that code; a
    ``KeyboardInterrupt`` (a second Ctrl-C) exits 130.
    """
    keep_freed_memory()  # long CPU runs reuse freed memory (lpdseg.heap)
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        # a second Ctrl-C (or one outside training): stop at once with the shell's
        # code for SIGINT, not click's "Aborted!" and 1; writes are atomic, so the
        # files already there (a previous last.pt) are whole
        typer.secho(
            "stopped at once (Ctrl-C); files written before are intact",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(130) from None
    except LpdsegError as exc:
        code = getattr(exc, "exit_code", None)
        if isinstance(code, int):
            typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(code) from None
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def presets() -> None:
    """List the shipped config presets."""
    from lpdseg.config import preset_names

    for name in preset_names():
        typer.echo(name)


@app.command()
def config(preset: PresetArg = "demo", overrides: OverridesArg = None) -> None:
    """Print the resolved config of a preset + overrides (YAML)."""
    import yaml

    from lpdseg.config import load_config

    cfg = _run(load_config, preset, overrides or [])
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write (BCSS-WSSS layout).")],
    n_train: Annotated[
        int | None,
        typer.Option(
            help="Training patches (image-level labels in the name) "
            "(default: the preset's synthetic.train, else 600)."
        ),
    ] = None,
    n_val: Annotated[
        int | None,
        typer.Option(
            help="Validation patches with masks (default: the preset's synthetic.val, else 60)."
        ),
    ] = None,
    n_test: Annotated[
        int | None,
        typer.Option(
            help="Test patches with masks (default: the preset's synthetic.test, else 120)."
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(help="Patch side in pixels (default: the preset's synthetic.size, else 224)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes identical files.")] = 0,
    min_fraction: MinFractionOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Preset or YAML config (e.g. demo) whose synthetic: section gives the counts "
            "and size and whose data.label_min_fraction gives the label rule."
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Write a synthetic H&E dataset (patches + exact masks) in the BCSS-WSSS layout."""
    _setup_logging(quiet)
    from lpdseg.catalog import LABEL_MIN_FRACTION
    from lpdseg.config import SyntheticConfig, load_config, load_synthetic_config
    from lpdseg.data.synthetic import write_dataset

    def make() -> dict:
        syn = load_synthetic_config(preset) if preset else SyntheticConfig()
        fraction = min_fraction
        if fraction is None:
            fraction = load_config(preset).data.label_min_fraction if preset else LABEL_MIN_FRACTION
        return write_dataset(
            out,
            syn.train if n_train is None else n_train,
            syn.val if n_val is None else n_val,
            syn.test if n_test is None else n_test,
            size=syn.size if size is None else size,
            seed=seed,
            progress=not quiet,
            min_label_fraction=fraction,
        )

    summary = _run(make)
    typer.echo(f"wrote {out}: {summary}")


@app.command()
def train(
    preset: PresetArg = "demo",
    overrides: OverridesArg = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run whose last.pt this is (train.out_dir must be its folder; "
            "only train.max_steps, train.epochs, train.val_every, train.ckpt_every, "
            "train.threads, train.device, data.num_workers, eval.* and a few more may change)."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a run already in train.out_dir: its files are deleted first "
            "(else such a folder is refused).",
        ),
    ] = False,
    allow_other_pseudo: Annotated[
        bool,
        typer.Option(
            "--allow-other-pseudo",
            help="Stage 2: train on data.pseudo masks made from another data root than "
            "data.root (else refused).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model (stage 1: image-level labels; train.task=seg: stage 2 on pseudo masks).

    The run folder (train.out_dir) receives config.yaml, metrics.jsonl, last.pt,
    best.pt (best validation mIoU; the last weights when there is no val split),
    curves.png and the test metrics of best.pt. A folder that already holds a run
    is refused unless --resume FOLDER/last.pt or --overwrite. Ctrl-C (SIGINT) or
    SIGTERM saves last.pt at the current step, prints the command that resumes and
    exits 130 / 143.
    """
    _setup_logging(quiet)
    import shlex

    from lpdseg.config import load_config
    from lpdseg.engine.train import TrainingInterrupted
    from lpdseg.engine.train import train as run_train

    cfg = _run(load_config, preset, overrides or [])

    def run() -> dict:
        try:
            return run_train(
                cfg,
                resume=resume,
                progress=not quiet,
                overwrite=overwrite,
                allow_other_pseudo=allow_other_pseudo,
            )
        except TrainingInterrupted as exc:
            if exc.checkpoint is not None:
                words = ["lpdseg", "train", preset, *(overrides or [])]
                words += ["--resume", exc.checkpoint]
                words += ["--allow-other-pseudo"] if allow_other_pseudo else []
                exc.command = shlex.join(words + (["-q"] if quiet else []))
            raise

    summary = _run(run)
    if "test" in summary:
        typer.echo(summary["test"]["table"])
    typer.echo(f"run folder: {summary['run_dir']}")


@app.command("eval")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (best.pt / last.pt).")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset folder (default: the one it was trained on); data of other classes "
            "than the checkpoint's is refused."
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            help="Split to score: val or test (a folder of just img/ + mask/ is a val split)."
        ),
    ] = "test",
    mode: Annotated[
        str,
        typer.Option(
            help="Class gate: labels (the image-level labels), classifier (its probabilities) "
            "or both."
        ),
    ] = "both",
    tta: Annotated[bool, typer.Option(help="Test-time augmentation (scales x flip).")] = True,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for <split>_metrics.json/.md (default: next to the checkpoint)."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="eval.* settings replacing the checkpoint's, e.g. eval.glass_background=true "
            "eval.cls_threshold=0.4."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace <split>_metrics.json/.md of another evaluation (other data, gates, "
            "TTA or overrides) in --out (else refused).",
        ),
    ] = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable images (listed) instead of stopping.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Score a checkpoint: mIoU, mDice, FwIoU, pixel accuracy and boundary IoU.

    <split>_metrics.json records what was evaluated; the metrics of another evaluation
    (e.g. the run's own test metrics, then --data other data) are not replaced without
    --overwrite.
    """
    _setup_logging(quiet)
    from lpdseg.config import GATES, gate_name
    from lpdseg.data.datasets import cli_hints
    from lpdseg.inference import evaluate_checkpoint

    if split not in ("val", "test"):
        typer.secho("error: --split must be val or test", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    gates = GATES if mode == "both" else (_run(gate_name, mode, "--mode"),)
    res = _run(
        evaluate_checkpoint,
        checkpoint,
        split=split,
        gates=gates,
        tta=tta,
        progress=not quiet,
        out_dir=out or checkpoint.parent,
        data_root=str(data) if data else None,
        eval_overrides=overrides,
        overwrite=overwrite,
        skip_bad=skip_bad or None,  # without the flag: the checkpoint's data.skip_bad
        hints=cli_hints(),
    )
    typer.echo(res["table"])


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (best.pt).")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
    tta: Annotated[bool, typer.Option(help="Test-time augmentation.")] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Class probability threshold (default: the checkpoint's eval.cls_threshold)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 8,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable images (listed at the end) instead of stopping.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace outputs an earlier run wrote in --out under the same names "
            "(else refused).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Segment images of any size: index mask PNG, overlay with legend, per-class areas.

    Per image: NAME_mask.png, NAME_overlay.png, NAME_areas.csv and NAME_areas.json,
    where NAME is the file stem. When inputs share a stem the suffix joins it
    (a.png and a.jpg -> a_png_mask.png and a_jpg_mask.png), then _2, _3 for the same
    name in several folders. Outputs of an earlier run in --out are never replaced
    without --overwrite (an unfinished run of the same checkpoint and settings is
    continued); OUT/predict_run.json records each run.
    """
    _setup_logging(quiet)
    from lpdseg.exports.predictions import predict_images

    written = _run(
        predict_images,
        checkpoint,
        images,
        out,
        tta=tta,
        threshold=threshold,
        batch_size=batch_size,
        skip_bad=skip_bad,
        progress=not quiet,
        overwrite=overwrite,
    )
    typer.echo(f"wrote predictions for {len(written)} images to {out}")


@app.command()
def pseudo(
    checkpoint: Annotated[Path, typer.Argument(help="Stage-1 checkpoint (LPD, PBIP or CAM).")],
    out: Annotated[
        Path, typer.Option(help="Output folder (masks/, manifest.csv, pseudo.json).")
    ] = Path("pseudo"),
    data: Annotated[
        Path | None, typer.Option(help="Dataset folder (default: the training one).")
    ] = None,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation.")] = True,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace pseudo masks already in --out (else refused)."),
    ] = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable images (listed) instead of stopping.")
    ] = False,
    ignore_margin: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Write 255 (ignored by stage 2) where the best label score leads the "
            "next by less than this; 0 keeps every pixel.",
        ),
    ] = 0.0,
    quiet: QuietOpt = False,
) -> None:
    """Write pseudo masks of the training set for stage 2 (train.task=seg data.pseudo=OUT).

    OUT/pseudo.json records the checkpoint, the data root and its classes: stage 2
    refuses masks made from other data than its data.root. Data of other classes than
    the checkpoint's is refused.
    """
    _setup_logging(quiet)
    from lpdseg.data.datasets import cli_hints
    from lpdseg.inference import write_pseudo_masks

    summary = _run(
        write_pseudo_masks,
        checkpoint,
        out,
        data_root=str(data) if data else None,
        tta=tta,
        progress=not quiet,
        overwrite=overwrite,
        skip_bad=skip_bad or None,  # without the flag: the checkpoint's data.skip_bad
        hints=cli_hints(),
        ignore_margin=ignore_margin,
    )
    ignored = f", {summary['ignored_fraction']:.1%} ignored" if ignore_margin else ""
    typer.echo(
        f"wrote {summary['images']} pseudo masks to {out} "
        f"(pixel fractions {summary['pixel_fraction']}{ignored})"
    )


@app.command()
def bank(
    preset: PresetArg = "pbip_demo",
    overrides: OverridesArg = None,
    out: Annotated[Path, typer.Option(help="Bank file to write.")] = Path("bank.pt"),
    clusters: Annotated[int, typer.Option(min=1, help="K-Means clusters per class (K).")] = 3,
    n_keep: Annotated[
        int, typer.Option(min=1, help="Patches kept nearest each centre (N_K).")
    ] = 100,
    seed: Annotated[int, typer.Option(help="K-Means seed.")] = 0,
    allow_fewer: Annotated[
        bool, typer.Option(help="Use what there is when a class has fewer than K x N_K patches.")
    ] = False,
    sheet: Annotated[
        bool, typer.Option(help="Also write a contact sheet PNG of the clusters.")
    ] = True,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Skip unreadable training patches (listed) instead of stopping "
            "(same as data.skip_bad=true).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build PBIP's prototype bank (K-Means of frozen-encoder embeddings of single-label patches)."""
    _setup_logging(quiet)
    from lpdseg.data.datasets import FixHints
    from lpdseg.engine.bank import build_bank_from_config

    hints = FixHints(
        skip_bad="pass --skip-bad (or data.skip_bad=true)",
        outside_root="",
        root="point data.root at the dataset folder",
    )
    path = _run(
        build_bank_from_config,
        preset,
        overrides or [],
        out,
        clusters=clusters,
        n_keep=n_keep,
        seed=seed,
        allow_fewer=allow_fewer,
        sheet=sheet,
        progress=not quiet,
        skip_bad=True if skip_bad else None,  # None: the config's data.skip_bad
        hints=hints,
    )
    typer.echo(f"wrote {path}")


@app.command()
def explain(
    checkpoint: Annotated[Path, typer.Argument(help="LPD or PBIP checkpoint.")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("explanations"),
    train_dir: Annotated[
        Path | None,
        typer.Option(
            help="Training dataset folder: adds the patches that activate each prototype most."
        ),
    ] = None,
    per_prototype: Annotated[
        int, typer.Option(min=1, help="Top patches shown per prototype (>= 1).")
    ] = 4,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Skip unreadable images and training patches (listed) instead of stopping.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-class, per-prototype activation heatmaps (+ top training patches) per image."""
    _setup_logging(quiet)
    from lpdseg.data.datasets import cli_hints
    from lpdseg.explain import explain as run_explain

    written = _run(
        run_explain,
        checkpoint,
        images,
        out,
        train_dir=train_dir,
        per_prototype=per_prototype,
        progress=not quiet,
        skip_bad=skip_bad,
        hints=cli_hints("--train-dir"),
    )
    typer.echo(f"wrote {len(written)} figures to {out}")


@app.command()
def slide(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint (best.pt), or an ONNX model written by `lpdseg export` (a .onnx "
            "file: run with onnxruntime, at its fixed tile, gate and threshold)."
        ),
    ],
    slide_paths: Annotated[
        list[str],
        typer.Argument(
            metavar="SLIDE...",
            help="Whole-slide image (SVS, NDPI, MRXS, pyramidal TIFF...) or image. Many slides: "
            "several files, a folder (its slides and images), a quoted glob pattern "
            "('slides/*.svs') or a manifest .csv (column slide: paths relative to the CSV; "
            "optional column slide_mpp).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder (created; one run at a time: it is locked). Many slides: one "
            "folder per slide in it (named by the file stem; -2, -3... when stems collide) and "
            "slides_summary.csv."
        ),
    ] = Path("slide_out"),
    mpp: Annotated[
        float | None,
        typer.Option(
            help="Working resolution in micrometres per pixel (default: the model's own: the "
            "checkpoint's data.mpp or the ONNX model's mpp; 2.0 when it records none)."
        ),
    ] = None,
    downsample: Annotated[
        float | None,
        typer.Option(help="Working resolution as level-0 pixels per pixel (instead of --mpp)."),
    ] = None,
    slide_mpp: Annotated[
        float | None,
        typer.Option(
            "--slide-mpp",
            help="The slide's micrometres per level-0 pixel, when its metadata has none or a "
            "wrong one (a manifest's slide_mpp column replaces it per slide).",
        ),
    ] = None,
    tile: Annotated[
        int | None,
        typer.Option(
            help="Tile side in working pixels (default: the checkpoint's eval.tile; an ONNX "
            "model's fixed tile, which cannot be changed)."
        ),
    ] = None,
    overlap: Annotated[float, typer.Option(help="Fraction of a tile shared by neighbours.")] = 0.25,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 8,
    output_downsample: Annotated[
        int, typer.Option(help="Working pixels per pixel of the stitched class map.")
    ] = 8,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation (not with ONNX).")] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Class probability threshold (default: the checkpoint's; not with ONNX)."
        ),
    ] = None,
    read_workers: Annotated[
        int, typer.Option(help="Threads reading tiles ahead of the model (0: between batches).")
    ] = 1,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace a finished run of this slide in --out (else refused)."
        ),
    ] = False,
    skip_done: Annotated[
        bool,
        typer.Option(
            "--skip-done",
            help="Skip a slide whose folder holds its finished run (its summary JSON), e.g. to "
            "resume an interrupted batch; listed as skipped.",
        ),
    ] = False,
    tissue_mask: Annotated[
        Path | None,
        typer.Option(
            help="Your tissue mask instead of the automatic one: a binary image (any size, "
            "scaled to the slide) or a QuPath GeoJSON of annotations."
        ),
    ] = None,
    pen_filter: Annotated[
        bool, typer.Option(help="Remove blue/green/black pen marks from the automatic mask.")
    ] = False,
    ome_tiff: Annotated[
        bool, typer.Option(help="Also write the class map as a pyramidal OME-TIFF.")
    ] = True,
    probabilities: Annotated[
        bool, typer.Option(help="Add uint8 per-class probabilities to the OME-TIFF.")
    ] = False,
    geojson_type: Annotated[
        str, typer.Option(help="QuPath object type of the regions: annotation or detection.")
    ] = "annotation",
    simplify: Annotated[
        float, typer.Option(help="GeoJSON outline simplification tolerance, level-0 pixels.")
    ] = 0.0,
    slide_scoring: Annotated[
        str,
        typer.Option(
            help="seamless: raw maps stitched, then normalised and gated on the whole slide "
            "(no tile-shaped blocks); per_tile: each tile scored on its own (what stage-2 "
            "networks and ONNX files exported before seamless support use)."
        ),
    ] = "seamless",
    quiet: QuietOpt = False,
) -> None:
    """Segment whole slides: QuPath GeoJSON, overlay PNG, class map, areas in um^2, summary.

    The model works at the resolution it was trained at (the checkpoint's data.mpp)
    unless --mpp or --downsample say otherwise; a slide without a pixel size needs
    --slide-mpp or --downsample. Many slides (several files, a folder, a glob, a
    manifest.csv): a failed slide is listed with its reason in OUT/slides_summary.csv
    and the others go on; under torchrun the slides are shared over the ranks.
    Exit code: 0 when every slide is done (or skipped), 1 when some failed, 2 for
    a usage error (a bad option, a model that cannot be loaded).
    """
    _setup_logging(quiet)
    from lpdseg.wsi.batch import is_batch, run_batch
    from lpdseg.wsi.job import SlideJob, SlideJobError
    from lpdseg.wsi.pipeline import run_slide_job

    # SlideJob field -> the flag (or argument) that sets it, for error messages.
    flags = {
        "checkpoint": "CHECKPOINT",
        "slide": "SLIDE",
        "out_dir": "--out",
        "mpp_um_per_px": "--mpp",
        "downsample_level0_px": "--downsample",
        "slide_mpp_um_per_px": "--slide-mpp",
        "tile_working_px": "--tile",
        "overlap": "--overlap",
        "batch_tiles": "--batch-size",
        "map_downsample_working_px": "--output-downsample",
        "tta": "--tta",
        "threshold": "--threshold",
        "read_workers": "--read-workers",
        "overwrite": "--overwrite",
        "skip_done": "--skip-done",
        "tissue_mask": "--tissue-mask",
        "pen_filter": "--pen-filter",
        "ome_tiff": "--ome-tiff",
        "ome_probabilities": "--probabilities",
        "geojson_object_type": "--geojson-type",
        "geojson_simplify_level0_px": "--simplify",
        "slide_scoring": "--slide-scoring",
    }
    options = {
        "mpp_um_per_px": mpp,
        "downsample_level0_px": downsample,
        "slide_mpp_um_per_px": slide_mpp,
        "tile_working_px": tile,
        "overlap": overlap,
        "batch_tiles": batch_size,
        "map_downsample_working_px": output_downsample,
        "tta": tta,
        "threshold": threshold,
        "read_workers": read_workers,
        "overwrite": overwrite,
        "tissue_mask": tissue_mask,
        "pen_filter": pen_filter,
        "ome_tiff": ome_tiff,
        "ome_probabilities": probabilities,
        "geojson_object_type": geojson_type,
        "geojson_simplify_level0_px": simplify,
        "slide_scoring": slide_scoring,
    }

    def run_one() -> dict:
        try:
            job = SlideJob(checkpoint=checkpoint, slide=slide_paths[0], out_dir=out, **options)
            if skip_done and not overwrite and job.summary_path.is_file():
                return {"skipped": str(job.summary_path)}
            return run_slide_job(job, progress=not quiet)
        except SlideJobError as exc:
            raise LpdsegError(exc.for_names(flags)) from None

    def run_many():
        try:
            return run_batch(
                checkpoint,
                slide_paths,
                out,
                skip_done=skip_done,
                progress=not quiet,
                names=flags,
                **options,
            )
        except SlideJobError as exc:
            raise LpdsegError(exc.for_names(flags)) from None

    if is_batch(slide_paths):
        result = _run(run_many)
        if result.rank == 0:
            counts = ", ".join(f"{n} {status}" for status, n in result.counts.items())
            typer.echo(f"{len(result.rows)} slides: {counts}; summary {result.csv_path}")
            for row in result.failed:
                typer.secho(
                    f"failed: {row['slide']}: {row['reason']}", fg=typer.colors.RED, err=True
                )
        if result.failed:
            raise typer.Exit(1)
        return
    summary = _run(run_one)
    if "skipped" in summary:
        typer.echo(f"skipped: {slide_paths[0]} finished before ({summary['skipped']})")
        return
    if "rank" in summary:  # a non-zero torchrun rank: rank 0 merges, writes and reports
        return
    typer.echo(
        f"{summary['tiles']} tiles at level {summary['level']} in {summary['seconds']} s "
        f"(peak RSS {summary['peak_rss_mb']} MiB); wrote {out}"
    )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `lpdseg train`.")],
    out: Annotated[
        Path | None, typer.Option(help="HTML file to write (default: RUN_DIR/report.html).")
    ] = None,
    images: Annotated[int, typer.Option(help="Test images shown as overlays.")] = 4,
    quiet: QuietOpt = False,
) -> None:
    """One self-contained HTML report of a run: config, curves, metrics, confusion, overlays."""
    _setup_logging(quiet)
    from lpdseg.report import write_report

    path = _run(write_report, run_dir, out, n_images=images, progress=not quiet)
    typer.echo(f"wrote {path}")


@app.command()
def patches(
    img_dir: Annotated[Path, typer.Argument(help="Folder of RGB images.")],
    mask_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder of index masks paired by file stem (0..C-1 classes, C background)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Dataset folder to write.")] = Path("patches"),
    size: Annotated[int, typer.Option(help="Patch side in pixels.")] = 224,
    stride: Annotated[
        int, typer.Option(help="Distance between patch origins (< size overlaps).")
    ] = 224,
    min_fraction: MinFractionOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Preset or YAML config of the run you will train: its data.label_min_fraction "
            "gives the label rule."
        ),
    ] = None,
    max_background: Annotated[
        float, typer.Option(help="Drop patches whose background fraction exceeds this.")
    ] = 0.8,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="File naming: bcss_wsss (4 classes), luad_histoseg (4), wsss4luad (3), "
            "csv (any, with --class-names).",
        ),
    ] = "wsss4luad",
    class_names: Annotated[
        str | None, typer.Option(help="Comma-separated class names (default: the format's).")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of images held out whole as val/img + val/mask.")
    ] = 0.0,
    test_fraction: Annotated[
        float, typer.Option(help="Fraction of images held out whole as test/img + test/mask.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the by-image split.")] = 0,
    masks: Annotated[
        bool,
        typer.Option(help="Also write the true patch masks + supervised/manifest.csv."),
    ] = True,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the patch dataset an earlier run wrote in --out (else refused).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Tile image + mask pairs into a weakly labelled training set (labels from the masks).

    The rule (size, stride, min fraction, background limit) is recorded in
    OUT/patches.json. Train with `lpdseg train <preset> data.root=OUT data.format=FORMAT`.
    Masks that cannot be of --format (a palette colouring a class index white, another
    format's palette, values above the background index) are refused before anything
    is written, naming the file and the --format that fits.
    """
    _setup_logging(quiet)
    from lpdseg.config import load_config
    from lpdseg.data.patches import PatchRule, build_patch_dataset, pair_files, split_stems

    def make() -> dict:
        kwargs: dict = {"size": size, "stride": stride, "max_background": max_background}
        if min_fraction is not None:
            kwargs["min_fraction"] = min_fraction
        rule = (
            PatchRule.from_config(load_config(preset), **kwargs) if preset else PatchRule(**kwargs)
        )
        stems = [img.stem for img, _ in pair_files(img_dir, mask_dir)]
        train_s, val_s, test_s = split_stems(stems, val_fraction, test_fraction, seed)
        return build_patch_dataset(
            img_dir,
            mask_dir,
            out,
            fmt=format,
            rule=rule,
            class_names=class_names.split(",") if class_names else None,
            train_stems=train_s,
            val_stems=val_s,
            test_stems=test_s,
            write_masks=masks,
            progress=not quiet,
            overwrite=overwrite,
        )

    summary = _run(make)
    typer.echo(
        f"wrote {summary['patches']} patches from {len(summary['splits']['train'])} images to "
        f"{out} (dropped {summary['dropped']}; val {len(summary['splits']['val'])}, "
        f"test {len(summary['splits']['test'])} images); rule in {out / 'patches.json'}"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for data, runs and overlays.")] = Path(
        "demo_output"
    ),
    quick: Annotated[bool, typer.Option(help="Tiny run (seconds) to check the pipeline.")] = False,
    preset: Annotated[
        str,
        typer.Option(
            help="Preset both methods start from: demo_pretrained (EfficientNet-Lite0, "
            "ImageNet weights) or demo (MiT-B0 from scratch)."
        ),
    ] = "demo_pretrained",
    overrides: OverridesArg = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the runs of an earlier demo in --out.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Synthetic H&E -> train LPD and the CAM baseline -> test table + overlays."""
    _setup_logging(quiet)
    from lpdseg.demo import run_demo

    report = _run(
        run_demo,
        out,
        quick=quick,
        progress=not quiet,
        preset=preset,
        overrides=overrides,
        overwrite=overwrite,
    )
    typer.echo(report)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (best.pt).")],
    out: Annotated[Path, typer.Argument(help="ONNX file to write (e.g. model.onnx).")],
    tile: Annotated[
        int | None,
        typer.Option(
            help="Fixed tile side of the model's input (default: the checkpoint's eval.tile)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT (else refused).")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Export the scoring path (classifier gate, no TTA) to ONNX for other runtimes.

    Input: RGB tiles in [0, 1], N x 3 x tile x tile float32 (N dynamic); output: scores
    N x (C + 1) x tile x tile, background last. Class names, colours and the tile size
    are in the model's metadata. Needs `pip install 'lpdseg[onnx]'`.
    """
    _setup_logging(quiet)
    from lpdseg.exports.onnx import export_onnx

    path = _run(export_onnx, checkpoint, out, tile=tile, overwrite=overwrite)
    typer.echo(f"wrote {path}")


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
