"""Figure 7: inference tiles/s at 224 px and slide peak RSS against slide size.

Tiles/s: the ``predict`` path (:class:`lpdseg.inference.Predictor`,
classifier-gated label scores) on batches of 8 tiles of 224 px, for MiT-B0
and MiT-B1 (random weights: speed does not depend on them), without TTA and
with the library's default TTA (scales 0.9/1.0/1.1 x horizontal flip = 6
forwards), all interleaved.

Slide memory: ``benchmarks/wsi_memory.py`` writes synthetic pyramidal TIFFs
and stitches each in a fresh process; memory is flat when the peak RSS of the
larger slide is <= 1.10 x that of the smaller one. ``make bench`` uses 2k^2
and 8k^2 px slides (16x the pixels; writing a 16k^2 TIFF alone takes minutes
on 2 cores), ``--scale full`` the issue's 4k^2 and 16k^2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, Figure, Scale, make_config, median, side, time_interleaved

TILES = 8


def tile_predictor(backbone: str, tta: bool, k: int = 10):
    """A predict function of a random-weight model with the library's default eval settings."""
    from lpdseg.config import EvalConfig, config_from_dict
    from lpdseg.inference import Predictor
    from lpdseg.models.lpd import build_model

    d = make_config([f"model.backbone={backbone}", f"model.prototypes_per_class={k}"]).to_dict()
    d["data"]["mean"], d["data"]["std"] = [0.5] * 3, [0.25] * 3
    d["eval"] = EvalConfig().__dict__.copy()
    cfg = config_from_dict(d)
    torch.manual_seed(0)
    model = build_model(cfg, 4).eval()
    return Predictor(model, cfg, tta=tta, device=torch.device("cpu"))


def slide_memory(sizes: list[int]) -> list[dict]:
    """Run wsi_memory.py for ``sizes`` and return its per-slide records."""
    with tempfile.TemporaryDirectory(prefix="bench_wsi_") as tmp:
        out = Path(tmp) / "wsi.json"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "wsi_memory.py"),
                "--sizes",
                *map(str, sizes),
                "--json",
                str(out),
            ],
            check=True,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        return json.loads(out.read_text())


def run(scale: Scale, context: dict | None = None) -> Figure:
    """Tiles/s of the four predict variants and the slide peak-RSS ratio."""
    t_start = time.perf_counter()
    size = 64 if scale.tiny else 224
    backbones = ("mit_b0",) if scale.tiny else ("mit_b0", "mit_b1")
    tiles = torch.rand(TILES, 3, size, size)
    sides = {}
    for bb in backbones:
        for tta in (False, True):
            fn = tile_predictor(bb, tta, k=2 if scale.tiny else 10)
            sides[f"{bb}{' +TTA' if tta else ''}"] = lambda fn=fn: fn(tiles)
    times = time_interleaved(sides, repeats=scale.heavy_repeats, warmup=scale.warmup)
    fig = Figure(
        id=7,
        title="inference tiles/s (224 px) + slide peak RSS",
        setting={"tile_px": size, "tiles_per_batch": TILES, "tta": "scales 0.9/1/1.1 x flip"},
        ratio_meaning="x peak RSS (large / small slide)",
        target="<= 1.10x (memory flat)",
    )
    for name, t in times.items():
        rate = TILES / median(t)
        fig.sides[name] = side(t, tiles_per_s=round(rate, 2), display=f"{rate:.1f} tiles/s")
    sizes = [] if scale.tiny else ([4096, 16384] if scale.full else [2048, 8192])
    if sizes:
        slides = slide_memory(sizes)
        small, large = slides[0], slides[-1]
        fig.ratio = large["peak_mib"] / small["peak_mib"]
        fig.met = fig.ratio <= 1.10
        fig.extra["slides"] = slides
        for s in slides:
            fig.sides[f"slide {s['width']}^2 peak"] = {
                "median_s": s["seconds"],
                "peak_mib": s["peak_mib"],
                "display": f"{s['peak_mib']:.0f} MiB",
            }
    fig.seconds = time.perf_counter() - t_start
    return fig


if __name__ == "__main__":
    from common import SCALES

    print(json.dumps(run(SCALES["bench"]).to_dict(), indent=2))
