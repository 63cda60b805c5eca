"""Seams and glass of the slide pipeline: seamless vs per-tile slide scoring.

A synthetic slide larger than one tile (``lpdseg.data.synthetic.generate_patch`` at
``--size`` px, glass included, exact mask) is segmented four ways with one model:

* ``seamless`` (the slide default): raw maps stitched, then normalised, gated over
  fields of the training crop and glass made background on the stitched canvas;
* ``per_tile`` (the old path): each tile's label scores as ``predict`` gives them;

each once tiled (``--tile``, ``--overlap``, the slide pipeline's ``stitch_slide``)
and once with the whole image as one tile. Printed: mIoU against the mask at the
output resolution, tiled vs whole difference, and the seam score (class changes
on tile borders / elsewhere, per pair of neighbours; ~1 = no seams). With the CMU
slide (``--cmu``, skipped when missing), ``run_slide_job`` in both modes and the
fraction of non-tissue pixels (the glass rule on the slide at the class map's
resolution) labelled as tissue.

Usage::

    python benchmarks/bench_slide_seams.py --checkpoint runs/demo_pretrained/best.pt
    python benchmarks/bench_slide_seams.py --checkpoint best.pt --size 448 --no-cmu

Writes ``benchmarks/results/slide_seams.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import write_json

from lpdseg.data.glass import glass_mask_np
from lpdseg.data.synthetic import generate_patch
from lpdseg.inference import Predictor
from lpdseg.inference.sliding import TileGrid
from lpdseg.wsi import SlideJob, open_image, run_slide_job
from lpdseg.wsi.pipeline import finish_canvas
from lpdseg.wsi.tiling import seam_score, stitch_slide, tile_border_zones

CMU = Path("/work/shared/data/slides/cmu_small_region.svs")
RESULTS = Path(__file__).resolve().parent / "results" / "slide_seams.json"


def miou(pred: np.ndarray, gt: np.ndarray, n: int) -> float:
    """Mean IoU over the labels present in ``gt`` or ``pred``."""
    ious = []
    for c in range(n):
        union = np.sum((pred == c) | (gt == c))
        if union:
            ious.append(np.sum((pred == c) & (gt == c)) / union)
    return float(np.mean(ious))


def class_map(predictor: Predictor, path: Path, tile: int, overlap: float, ds: int, mode: str):
    """Stitched class map of ``path`` with ``tile``-px tiles in ``mode``, and the seconds."""
    seamless = mode == "seamless"
    t0 = time.perf_counter()
    with open_image(path) as reader:
        canvas = stitch_slide(
            reader,
            0,
            predictor.slide_raw if seamless else predictor,
            predictor.slide_channels if seamless else predictor.num_labels,
            tile=tile,
            overlap=overlap,
            output_downsample=ds,
            batch_size=4,
            progress=False,
        )
    if seamless:
        canvas = finish_canvas(canvas, predictor, None)
    return canvas.class_map(), time.perf_counter() - t0


def synthetic_one(args, predictor: Predictor, seed: int) -> dict:
    """One synthetic slide (``generate_patch(seed)``): both modes, tiled and whole."""
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    patch = generate_patch(seed, args.size, classes=classes)
    n = predictor.num_labels
    ds = args.ds
    gt = patch.mask[ds // 2 :: ds, ds // 2 :: ds]
    grid = TileGrid.from_overlap((args.size, args.size), args.tile, args.overlap)
    zones = [
        [
            (a / ds, b / ds)
            for a, b in tile_border_zones([o[i] for o in grid.origins], args.tile, args.size)
        ]
        for i in (0, 1)
    ]
    out: dict = {
        "seed": seed,
        "gt_label_fractions": (np.bincount(gt.ravel(), minlength=n) / gt.size).round(3).tolist(),
        "tiles": len(grid.origins),
        "glass_fraction_gt": float((gt == n - 1).mean()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.png"
        cv2.imwrite(str(path), cv2.cvtColor(patch.image, cv2.COLOR_RGB2BGR))
        for mode in ("seamless", "per_tile"):
            tiled, t_tiled = class_map(predictor, path, args.tile, args.overlap, ds, mode)
            whole, t_whole = class_map(predictor, path, args.size, args.overlap, ds, mode)
            m_t, m_w = miou(tiled, gt, n), miou(whole, gt, n)
            out[mode] = {
                "miou_slide": round(100 * m_t, 2),
                "miou_whole": round(100 * m_w, 2),
                "miou_diff_points": round(100 * (m_t - m_w), 2),
                "agreement_slide_whole": round(float((tiled == whole).mean()), 4),
                "seam_score_slide": round(seam_score(tiled, *zones), 3),
                "seam_score_whole": round(seam_score(whole, *zones), 3),
                "seconds_slide": round(t_tiled, 1),
                "seconds_whole": round(t_whole, 1),
            }
            print(
                f"seed {seed} {mode:9s} mIoU slide {100 * m_t:6.2f}  whole {100 * m_w:6.2f}  "
                f"diff {100 * (m_t - m_w):+6.2f}  seam slide {out[mode]['seam_score_slide']:.3f}"
                f"  (whole {out[mode]['seam_score_whole']:.3f})",
                flush=True,
            )
    return out


def synthetic(args, predictor: Predictor) -> dict:
    """Every ``--seeds`` slide, and per mode the means over them (the headline figures)."""
    seeds = [int(s) for s in str(args.seeds).split(",")]
    runs = [synthetic_one(args, predictor, s) for s in seeds]
    out: dict = {
        "classes": args.classes,
        "size": args.size,
        "tile": args.tile,
        "overlap": args.overlap,
        "ds": args.ds,
        "seeds": seeds,
    }
    for mode in ("seamless", "per_tile"):
        keys = runs[0][mode].keys()
        out[mode] = {k: round(float(np.mean([r[mode][k] for r in runs])), 3) for k in keys}
        m = out[mode]
        print(
            f"mean over {len(seeds)} slides, {mode:9s}: mIoU slide {m['miou_slide']:.2f} "
            f"whole {m['miou_whole']:.2f} diff {m['miou_diff_points']:+.2f} "
            f"seam slide {m['seam_score_slide']:.3f}",
            flush=True,
        )
    out["per_seed"] = runs
    return out


def cmu(args, predictor: Predictor) -> dict:
    """``run_slide_job`` on the CMU slide in both modes; non-tissue labelled as tissue."""
    out: dict = {"slide": str(args.cmu_path)}
    for mode in ("seamless", "per_tile"):
        with tempfile.TemporaryDirectory() as tmp:
            job = SlideJob(
                args.checkpoint,
                args.cmu_path,
                Path(tmp) / mode,
                device="cpu",
                slide_scoring=mode,
                ome_tiff=False,
            )
            t0 = time.perf_counter()
            s = run_slide_job(job, progress=False, predictor=predictor, device=torch.device("cpu"))
            seconds = time.perf_counter() - t0
            labels = cv2.imread(s["files"]["class_map"], cv2.IMREAD_UNCHANGED)
        h, w = labels.shape
        with open_image(args.cmu_path) as reader:
            picture = reader.thumbnail(max(h, w))
        picture = cv2.resize(picture, (w, h), interpolation=cv2.INTER_AREA)
        glass = glass_mask_np(
            picture, predictor.eval_cfg.glass_brightness, predictor.eval_cfg.glass_spread
        )
        tissue_labelled = labels != predictor.num_labels - 1
        frac = float(tissue_labelled[glass].mean()) if glass.any() else 0.0
        out[mode] = {
            "non_tissue_labelled_tissue": round(frac, 4),
            "non_tissue_fraction": round(float(glass.mean()), 4),
            "map_shape_hw": [h, w],
            "tiles": s["tiles"],
            "seconds": round(seconds, 1),
        }
        print(
            f"CMU {mode:9s}: {100 * frac:.2f} % of non-tissue pixels labelled tissue "
            f"({100 * glass.mean():.1f} % of the map is non-tissue, {s['tiles']} tiles)",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a best.pt")
    p.add_argument("--size", type=int, default=672, help="synthetic slide side (px)")
    p.add_argument("--tile", type=int, default=None, help="tile side (default eval.tile)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--ds", type=int, default=2, help="pixels per class-map pixel")
    p.add_argument("--seeds", default="11,12,13", help="synthetic slides (generator seeds)")
    p.add_argument(
        "--classes", default="0,1,2,3", help="classes on the synthetic slide ('' = random)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cmu-path", type=Path, default=CMU)
    p.add_argument("--no-cmu", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    args.tile = args.tile or int(predictor.eval_cfg.tile)
    result = {"checkpoint": str(args.checkpoint), "synthetic": synthetic(args, predictor)}
    if not args.no_cmu and args.cmu_path.is_file():
        result["cmu"] = cmu(args, predictor)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
