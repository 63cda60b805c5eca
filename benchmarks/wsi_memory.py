"""Peak memory of slide stitching against slide size (bounded-memory check).

Writes synthetic pyramidal tiled TIFFs (about 4k x 4k and 16k x 16k pixels,
tissue-like blobs on white, levels 1/4/16) to a temporary folder, tile by
tile so the writer itself stays small. Then, for each slide, a fresh Python
process opens it, takes a thumbnail, detects tissue and runs
``stitch_slide`` at level 0 with a cheap ``predict_fn``; it reports its peak
resident memory (``VmHWM`` from ``/proc/self/status``) after the imports and
at the end. With bounded memory the peak grows only by the output canvas
(``L x H/ds x W/ds`` int64), not with the 16x larger slide.

Usage::

    python benchmarks/wsi_memory.py [--sizes 4096 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slide_speed import write_synthetic_slides  # noqa: E402  (one slide writer)
from common import vm_hwm_mib  # noqa: E402

NUM_LABELS = 3  # two tissue classes + background


def child(path: str, tile: int, output_downsample: int) -> None:
    """Run in a fresh process: stitch one slide and print a JSON line of measurements."""
    import torch

    from lpdseg.wsi import detect_tissue, open_image, stitch_slide

    torch.set_num_threads(1)
    base = vm_hwm_mib()

    def predict_fn(x: torch.Tensor) -> torch.Tensor:  # cheap "model": darkness classes
        g = x.mean(1, keepdim=True)
        return torch.cat(
            [(g < 0.45).float(), ((g >= 0.45) & (g < 0.85)).float(), (g >= 0.85).float()], 1
        )

    t0 = time.perf_counter()
    with open_image(path) as reader:
        mask = detect_tissue(reader.thumbnail(1024))
        canvas = stitch_slide(
            reader,
            0,
            predict_fn,
            NUM_LABELS,
            tile=tile,
            overlap=0.25,
            batch_size=8,
            tissue_mask=mask,
            output_downsample=output_downsample,
            progress=False,
        )
        cmap = canvas.class_map()
        dims = reader.dimensions
    elapsed = time.perf_counter() - t0
    canvas_mib = (canvas.score_sum.nbytes + canvas.weight_sum.nbytes) / 2**20
    print(
        json.dumps(
            {
                "width": dims[0],
                "height": dims[1],
                "tiles": canvas.tiles,
                "canvas_hw": list(cmap.shape),
                "canvas_mib": round(canvas_mib, 2),
                "baseline_mib": round(base, 1),
                "peak_mib": round(vm_hwm_mib(), 1),
                "seconds": round(elapsed, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--output-downsample", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tile, args.output_downsample)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    with tempfile.TemporaryDirectory(prefix="wsi_memory_") as tmp:
        for path in write_synthetic_slides(Path(tmp), args.sizes):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(path),
                    "--tile",
                    str(args.tile),
                    "--output-downsample",
                    str(args.output_downsample),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"{'slide':>13} {'tiles':>6} {'canvas MiB':>10} {'base MiB':>9} {'peak MiB':>9} "
        f"{'peak-base':>9} {'s':>6}"
    )
    for r in results:
        print(
            f"{r['width']:>6}x{r['height']:<6} {r['tiles']:>6} {r['canvas_mib']:>10.2f} "
            f"{r['baseline_mib']:>9.1f} {r['peak_mib']:>9.1f} "
            f"{r['peak_mib'] - r['baseline_mib']:>9.1f} {r['seconds']:>6.1f}"
        )
    if len(results) >= 2:
        first, last = results[0], results[-1]
        px = (last["width"] * last["height"]) / (first["width"] * first["height"])
        growth = last["peak_mib"] / first["peak_mib"]
        delta = (last["peak_mib"] - last["baseline_mib"]) / max(
            first["peak_mib"] - first["baseline_mib"], 1e-9
        )
        print(f"slide pixels x{px:.0f}: peak RSS x{growth:.2f}, peak above baseline x{delta:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
