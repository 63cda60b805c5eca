"""Speed and memory of ``lpdseg slide`` on synthetic slides of growing size.

Writes pyramidal tiled TIFFs (default 4k x 4k and 16k x 16k pixels at 0.5 um/px,
tissue-like blobs on white glass, levels 1/4/16) tile by tile, then measures, each
in a fresh Python process so that nothing is shared:

* **memory**: ``run_slide_job`` on each slide (the checkpoint's own scoring,
  GeoJSON, overlay, areas and the OME-TIFF with class probabilities written),
  peak resident memory (``VmHWM``, the median of ``--repeats`` fresh runs: the
  threads' timing moves it by a few per cent); the figure is the largest slide's
  peak over the smallest's (target <= 1.10: memory does not grow with the slide);
* **speed** (on the largest slide): the same tissue tiles read into memory
  first, then the model alone on them (``predictor.slide_raw`` on batches of
  ``batch_tiles``, what the slide run calls), then the whole slide run (open,
  tissue detection, reading, model, stitching, finishing, writing). The figure
  is slide tiles/s over model-only tiles/s (target >= 0.9: everything but the
  model overlaps with it or costs little). The model-only pass runs twice,
  before and after the slide run (after a warm-up on its first batches: they
  run slower), and its mean is used.

Both children tune the C heap as the CLI does (``lpdseg.heap.keep_freed_memory``).

Usage::

    python benchmarks/bench_slide_speed.py --checkpoint demo_output/runs/lpd/best.pt
    python benchmarks/bench_slide_speed.py --checkpoint best.pt --sizes 2048 8192

Writes ``benchmarks/results/slide_speed.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from common import vm_hwm_mib, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "slide_speed.json"
TILE_WRITE = 256
WARMUP_BATCHES = 50
MPP = 0.5

log = logging.getLogger("bench_slide_speed")


# ---------------------------------------------------------------- synthetic slides
def _blob_field(ys: np.ndarray, xs: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Smooth tissue indicator in [0, 1] at level-0 coordinates (same for every level)."""
    rng = np.random.default_rng(seed)
    field = np.zeros(ys.shape, np.float32)
    for cy, cx, r in rng.uniform([0.1, 0.1, 0.06], [0.9, 0.9, 0.18], size=(12, 3)):
        d2 = ((ys - cy * size) ** 2 + (xs - cx * size) ** 2) / (r * size) ** 2
        field += np.exp(-d2).astype(np.float32)
    return field


def _tiles(size: int, ds: int):
    """The RGB tiles (row-major) of the level with downsample ``ds``."""
    n = size // ds
    rng = np.random.default_rng(ds)
    for ty in range(0, n, TILE_WRITE):
        for tx in range(0, n, TILE_WRITE):
            # The field is smooth: evaluate it every 8 pixels and interpolate.
            ys, xs = np.mgrid[ty : ty + TILE_WRITE : 8, tx : tx + TILE_WRITE : 8].astype(np.float32)
            coarse = _blob_field((ys + 3.5) * ds, (xs + 3.5) * ds, size)
            f = cv2.resize(coarse, (TILE_WRITE, TILE_WRITE), interpolation=cv2.INTER_LINEAR)
            tile = np.full((TILE_WRITE, TILE_WRITE, 3), 245, np.uint8)
            noise = rng.integers(-15, 16, (TILE_WRITE, TILE_WRITE, 1))
            tissue, dark = f > 0.5, f > 1.0
            tile[tissue] = np.clip(np.array([215, 120, 175]) + noise, 0, 255)[tissue]
            tile[dark] = np.clip(np.array([120, 50, 140]) + noise, 0, 255)[dark]
            yield tile


def write_synthetic_slide(path: Path, size: int) -> None:
    """A ``size x size`` pyramidal tiled TIFF at 0.5 um/px that OpenSlide reads."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, ds in enumerate((1, 4, 16)):
            n = size // ds
            res = 1e4 / (MPP * ds)
            tw.write(
                _tiles(size, ds),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(TILE_WRITE, TILE_WRITE),
                photometric="rgb",
                compression="zlib",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )


def write_synthetic_slides(folder: Path, sizes: list[int]) -> list[Path]:
    """``synthetic_<size>.tif`` in ``folder`` for every size (logged with its time)."""
    paths = []
    for size in sizes:
        path = Path(folder) / f"synthetic_{size}.tif"
        t0 = time.perf_counter()
        write_synthetic_slide(path, size)
        log.info(
            "wrote %s (%.1f MiB) in %.1f s",
            path.name,
            path.stat().st_size / 2**20,
            time.perf_counter() - t0,
        )
        paths.append(path)
    return paths


# ---------------------------------------------------------------- children
def _job(args: argparse.Namespace, slide: str, out: Path):
    from lpdseg.wsi import SlideJob

    return SlideJob(
        Path(args.checkpoint),
        Path(slide),
        out,
        device="cpu",
        downsample_level0_px=args.downsample,
        batch_tiles=args.batch,
        ome_tiff=True,
        ome_probabilities=True,
        read_workers=args.read_workers,
    )


def child_memory(args: argparse.Namespace) -> dict:
    """One slide run in this fresh process: its peak resident memory and timings."""
    import torch

    from lpdseg.heap import keep_freed_memory
    from lpdseg.wsi import run_slide_job

    keep_freed_memory()  # as the CLI does
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="slide_speed_") as tmp:
        t0 = time.perf_counter()
        s = run_slide_job(_job(args, args.child, Path(tmp) / "out"), progress=False)
        seconds = time.perf_counter() - t0
    return {
        "tiles": s["tiles"],
        "map_shape_hw": s["map_shape_hw"],
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(vm_hwm_mib(), 1),
        "dimensions": s["dimensions_level0"],
    }


def child_speed(args: argparse.Namespace) -> dict:
    """Model-only throughput on the slide's tissue tiles, then the slide run, in one process."""
    import torch

    from lpdseg.engine.distributed import DistContext
    from lpdseg.heap import keep_freed_memory
    from lpdseg.inference.sliding import batched, level_tile_reader
    from lpdseg.wsi import open_image, run_slide_job
    from lpdseg.wsi.pipeline import (
        choose_level,
        find_tissue,
        job_device,
        load_predictor,
        model_mpp,
        model_tile,
        slide_scoring,
    )
    from lpdseg.wsi.tiling import level_tiles

    keep_freed_memory()  # as the CLI does, before either side runs
    torch.set_num_threads(args.threads)
    device = job_device("cpu", DistContext())
    with tempfile.TemporaryDirectory(prefix="slide_speed_") as tmp:
        job = _job(args, args.child, Path(tmp) / "out")
        predictor = load_predictor(job, device)
        seamless = slide_scoring(predictor, job) == "seamless"
        fn = predictor.slide_raw if seamless else predictor
        with open_image(job.slide) as reader:
            plan = choose_level(reader, job, model_tile(predictor, job), *model_mpp(predictor))
            side, ds = plan.tile_level_px, plan.map_downsample_level_px
            if seamless and side % ds == 0 and plan.tile_level_px == plan.tile_model_px:
                # what the slide run calls: the raw maps on the canvas grid
                fn = functools.partial(predictor.slide_raw, size=(side // ds, side // ds))
            tissue = find_tissue(reader, job)
            _, origins = level_tiles(
                reader,
                plan.level,
                plan.tile_level_px,
                job.overlap,
                tissue,
                job.tissue_min_fraction,
            )
            read = level_tile_reader(reader, plan.level, plan.tile_level_px)
            batches = [
                torch.from_numpy(np.stack([read(*o) for o in chunk])).permute(0, 3, 1, 2)
                for chunk in batched(origins, job.batch_tiles)
            ]

        def model_only(todo: list = batches) -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in todo:
                    fn(b.float().div_(255.0))
            return time.perf_counter() - t0

        model_only(batches[:WARMUP_BATCHES])  # the first batches run slower
        first = model_only()
        t0 = time.perf_counter()
        s = run_slide_job(job, progress=False, predictor=predictor, device=device)
        slide_s = time.perf_counter() - t0
        second = model_only()
    tiles = len(origins)
    assert s["tiles"] == tiles, (s["tiles"], tiles)
    model_s = 0.5 * (first + second)
    return {
        "tiles": tiles,
        "scoring": s["slide_scoring"],
        "model_only_seconds": [round(first, 2), round(second, 2)],
        "model_only_tiles_per_s": round(tiles / model_s, 2),
        "slide_seconds": round(slide_s, 2),
        "slide_tiles_per_s": round(tiles / slide_s, 2),
        "ratio_slide_over_model": round(model_s / slide_s, 3),
    }


def run_child(args: argparse.Namespace, kind: str, slide: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--checkpoint",
        str(args.checkpoint),
        "--child",
        str(slide),
        "--child-kind",
        kind,
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--downsample",
        str(args.downsample),
        "--read-workers",
        str(args.read_workers),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{kind} run on {slide.name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a best.pt (or .onnx)")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="slide sides (px)")
    p.add_argument(
        "--downsample",
        type=float,
        default=1.0,
        help="level-0 px per working px (1: the model at 0.5 um/px)",
    )
    p.add_argument("--batch", type=int, default=8, help="tiles per forward")
    p.add_argument("--read-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=3, help="fresh memory runs per size (median peak)"
    )
    p.add_argument(
        "--parts",
        default="memory,speed",
        help="memory, speed or both; one part alone keeps the other's figures in --out",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-kind", default="memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = child_speed if args.child_kind == "speed" else child_memory
        print(json.dumps(fn(args)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    result: dict = {
        "checkpoint": str(args.checkpoint),
        "downsample": args.downsample,
        "batch": args.batch,
        "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "memory": [],
    }
    parts = {p for p in args.parts.split(",") if p}
    if not parts <= {"memory", "speed"} or not parts:
        raise SystemExit(f"--parts takes memory, speed or both, not {args.parts!r}")
    if parts != {"memory", "speed"} and args.out.is_file():
        # one part again: the other part's figures (and their command) are kept
        earlier = json.loads(args.out.read_text())
        if "speed" not in parts and "speed" in earlier:
            result["speed"] = {**earlier["speed"], "command": earlier.get("command")}
        if "memory" not in parts and earlier.get("memory"):
            result["memory"] = earlier["memory"]
            result["memory_command"] = earlier.get("command")
            result["peak_rss_ratio_largest_over_smallest"] = earlier.get(
                "peak_rss_ratio_largest_over_smallest"
            )
    with tempfile.TemporaryDirectory(prefix="slide_speed_") as tmp:
        needed = args.sizes if "memory" in parts else args.sizes[-1:]
        slides = dict(zip(needed, write_synthetic_slides(Path(tmp), needed), strict=True))
        if "memory" in parts:
            for size in args.sizes:
                # peak RSS varies from run to run (threads' timing): the median of fresh runs
                runs = [run_child(args, "memory", slides[size]) for _ in range(args.repeats)]
                peaks = [r["peak_rss_mib"] for r in runs]
                r = {**runs[0], "peak_rss_mib": float(np.median(peaks)), "peak_rss_runs_mib": peaks}
                result["memory"].append({"size": size, **r})
                log.info(
                    "memory %6d^2: %5d tiles, map %s, peak RSS %.1f MiB (runs %s), %.1f s",
                    size,
                    r["tiles"],
                    r["map_shape_hw"],
                    r["peak_rss_mib"],
                    peaks,
                    r["seconds"],
                )
            first, last = result["memory"][0], result["memory"][-1]
            result["peak_rss_ratio_largest_over_smallest"] = round(
                last["peak_rss_mib"] / first["peak_rss_mib"], 3
            )
        if "speed" in parts:
            r = run_child(args, "speed", slides[args.sizes[-1]])
            result["speed"] = {"size": args.sizes[-1], **r}
            log.info(
                "speed %d^2: %d tiles; model only %.2f tiles/s, slide %.2f tiles/s: ratio %.3f",
                args.sizes[-1],
                r["tiles"],
                r["model_only_tiles_per_s"],
                r["slide_tiles_per_s"],
                r["ratio_slide_over_model"],
            )
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["command"] = "python benchmarks/bench_slide_speed.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    if result.get("peak_rss_ratio_largest_over_smallest") is not None:
        print(
            f"peak RSS {args.sizes[-1]}^2 / {args.sizes[0]}^2: "
            f"x{result['peak_rss_ratio_largest_over_smallest']:.3f} (target <= 1.10)"
        )
    if "speed" in result:
        print(
            f"slide / model-only throughput: {result['speed']['ratio_slide_over_model']:.3f} "
            "(target >= 0.9)"
        )
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
