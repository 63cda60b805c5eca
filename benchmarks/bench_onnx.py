"""ONNX Runtime vs PyTorch: tiles/s of the same scoring path on the same tiles.

Both sides score the same synthetic H&E tiles with the classifier gate and no TTA,
the C heap tuned as the CLI does (``lpdseg.heap``):
``lpdseg.inference.Predictor`` (PyTorch) and ``lpdseg.exports.onnx.OnnxPredictor``
(onnxruntime, CPU) on the graph ``lpdseg export`` writes. Timing follows the
suite's rules (``common.time_interleaved``: warm-up, interleaved repeats,
medians); the figure is ONNX tiles/s / PyTorch tiles/s. Both use the same
number of threads. The largest absolute score difference is printed too.
Prototype and CAM models are timed twice: ``scores`` (per-tile label scores,
``slide --slide-scoring per_tile``) and ``raw`` (the stitchable maps of seamless
slide scoring, ``slide_raw`` at a quarter of the tile side, the slide default).
Writes ``benchmarks/results/onnx.json`` (``--json`` elsewhere).

Usage::

    python benchmarks/bench_onnx.py                       # random-weight MiT-B0, 224 px
    python benchmarks/bench_onnx.py --checkpoint runs/x/best.pt --tiles 64 --repeats 3
    python benchmarks/bench_onnx.py --tile 64 --tiles 16  # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import machine_info, make_config, median, side, time_interleaved, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "onnx.json"


def random_model(backbone: str) -> tuple[torch.nn.Module, object]:
    """A random-weight LPD model with the library's default eval settings (speed only)."""
    from lpdseg.config import EvalConfig, config_from_dict
    from lpdseg.models.lpd import build_model

    d = make_config([f"model.backbone={backbone}", "model.prototypes_per_class=10"]).to_dict()
    d["data"]["mean"], d["data"]["std"] = [0.5] * 3, [0.25] * 3
    d["data"]["class_names"] = ["TUM", "STR", "LYM", "NEC"]
    d["eval"] = EvalConfig().__dict__.copy()
    cfg = config_from_dict(d)
    torch.manual_seed(0)
    return build_model(cfg, 4, load_weights=False).eval(), cfg


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="A best.pt (default: random-weight model).")
    ap.add_argument("--backbone", default="mit_b0", help="Backbone of the random-weight model.")
    ap.add_argument("--tile", type=int, help="Tile side (default: the config's eval.tile).")
    ap.add_argument("--tiles", type=int, default=64, help="Tiles scored per timed repeat.")
    ap.add_argument("--batch", type=int, default=8, help="Tiles per call.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed repeats per side.")
    ap.add_argument("--threads", type=int, default=2, help="Threads of both runtimes.")
    ap.add_argument("--json", type=Path, default=RESULTS, help="Where the result is written.")
    args = ap.parse_args(argv)

    from lpdseg.data.synthetic import generate_patch
    from lpdseg.exports.onnx import OPSET, OnnxPredictor, export_model
    from lpdseg.heap import keep_freed_memory
    from lpdseg.inference import Predictor, load_model

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI does (glibc's defaults slow the PyTorch side ~2x)
    if args.checkpoint:
        model, cfg = load_model(args.checkpoint, "cpu")
        source = str(args.checkpoint)
    else:
        model, cfg = random_model(args.backbone)
        source = f"random {args.backbone}"
    tile = int(args.tile or cfg.eval.tile)
    # synthetic H&E (tissue and glass): the classifier gate keeps some classes, not none
    tiles = (
        torch.stack(
            [
                torch.from_numpy(generate_patch(i, tile).image).permute(2, 0, 1)
                for i in range(args.tiles)
            ]
        ).float()
        / 255
    )
    batches = list(tiles.split(args.batch))

    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        path = export_model(model, cfg, Path(tmp) / "model.onnx", tile=tile, checkpoint=source)
        onnx_pred = OnnxPredictor(path, threads=args.threads)
        torch_pred = Predictor(model, cfg, tta=False)

        diff = max((onnx_pred(b) - torch_pred(b)).abs().max().item() for b in batches[:2])
        cells = (tile // 4, tile // 4)
        sides = {"pytorch": torch_pred, "onnxruntime": onnx_pred}
        if onnx_pred.supports_seamless:
            diff_raw = max(
                (onnx_pred.slide_raw(b, cells) - torch_pred.slide_raw(b, cells)).abs().max().item()
                for b in batches[:2]
            )
            sides |= {
                "pytorch raw": lambda b: torch_pred.slide_raw(b, cells),
                "onnxruntime raw": lambda b: onnx_pred.slide_raw(b, cells),
            }

        def run(predict):
            def go() -> None:
                for b in batches:
                    predict(b)

            return go

        times = time_interleaved(
            {name: run(fn) for name, fn in sides.items()}, repeats=args.repeats, warmup=1
        )

    rate = {name: args.tiles / median(t) for name, t in times.items()}
    result = {
        "setting": {
            "model": source,
            "tile": tile,
            "tiles": args.tiles,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": args.threads,
            "opset": OPSET,
        },
        "sides": {name: side(t, tiles_per_s=round(rate[name], 2)) for name, t in times.items()},
        "ratio_onnx_over_torch": round(rate["onnxruntime"] / rate["pytorch"], 3),
        "max_abs_diff": diff,
        **(
            {
                "ratio_onnx_over_torch_raw": round(
                    rate["onnxruntime raw"] / rate["pytorch raw"], 3
                ),
                "max_abs_diff_raw": diff_raw,
            }
            if "pytorch raw" in rate
            else {}
        ),
        "machine": machine_info(),
    }
    print(
        f"{source}, {args.tiles} tiles of {tile} px, batch {args.batch}, "
        f"{args.threads} threads, median of {args.repeats}:"
    )
    for name, r in rate.items():
        print(f"  {name:16s} {r:8.2f} tiles/s")
    print(f"  ratio onnx/torch {result['ratio_onnx_over_torch']:.3f}x; max |diff| {diff:.2e}")
    if "ratio_onnx_over_torch_raw" in result:
        print(
            f"  raw maps: ratio {result['ratio_onnx_over_torch_raw']:.3f}x; "
            f"max |diff| {result['max_abs_diff_raw']:.2e}"
        )
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
