"""Check that the redesign moved the demo only through the initial weights.

The code before the redesign built a throwaway backbone to read its
normalisation statistics, which drew random numbers before the model was
initialised; the statistics now come from a static table. This script puts
that build back (a patch of this process only) and trains one demo method, so
its test mIoU can be compared with the old code's.

    python benchmarks/demo_seed_check.py --data demo_output/data --method lpd
    # old code on the same machine and data: LPD 75.12 / 73.95, CAM 71.00 / 70.82

(run `make demo` first: it writes demo_output/data).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lpdseg.engine.train as train_module
from lpdseg.config import load_config
from lpdseg.models.backbones import build_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("demo_output/data"))
    p.add_argument("--method", choices=("lpd", "cam"), default="lpd")
    args = p.parse_args()
    real = train_module.resolve_data

    def resolve_like_before(cfg, *a, **k):
        bundle = real(cfg, *a, **k)
        if cfg.model.weights and cfg.data.mean is None:  # what the old loader did
            build_backbone(cfg.model.backbone, weights=cfg.model.weights)
        return bundle

    train_module.resolve_data = resolve_like_before
    extra = [] if args.method == "lpd" else ["model.head=cam", "name=cam"]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            "demo_pretrained", [f"data.root={args.data}", *extra, f"train.out_dir={out}/run"]
        )
        s = train_module.train(cfg, progress=False)
    print(args.method, {g: round(100 * s["test"][g]["mIoU"], 2) for g in ("labels", "classifier")})


if __name__ == "__main__":
    main()
