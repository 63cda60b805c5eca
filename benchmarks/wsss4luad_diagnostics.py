"""Why LPD/EfficientNet loses on whole WSSS4LUAD images: the diagnostics quoted in docs/results.md.

Runs on the checkpoints of a finished ``benchmarks/wsss4luad.py`` work folder
(default ``runs/wsss4luad_bench``, the 2-fold run) and prints, for each run:

- ``tiles``: classifier per-class AUC / recall at 0.5 on 96-px tiles of the
  held-out images (tiles at most half glass);
- ``whole``: class probabilities of every held-out image scored whole, next
  to its true labels;
- ``gate``: classifier-gated mIoU scored whole vs by 96-px sliding windows.

    python benchmarks/wsss4luad_diagnostics.py [--work runs/wsss4luad_bench] [--what tiles whole gate]
        [--runs lpd_effnet_s0] [--checkpoint best|last]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from lpdseg.data.datasets import mask_to_label, read_image, read_mask
from lpdseg.inference import Predictor, load_model
from lpdseg.metrics import SegmentationMeter
from lpdseg.models.decode import infer_maps

RUNS = ["cam_effnet_s0", "lpd_effnet_s0", "cam_mit_b0_s0", "lpd_mit_b0_s0"]
TILE = 96


def _auc(scores: np.ndarray, truth: np.ndarray) -> float:
    pos, neg = scores[truth == 1], scores[truth == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def _test_pairs(fold: Path):
    for path in sorted((fold / "data/test/img").glob("*.png")):
        yield path, read_image(path), read_mask(fold / "data/test/mask" / path.name, 3)


def tiles(fold: Path, run: str, checkpoint: str = "best.pt") -> None:
    model, cfg = load_model(fold / run / checkpoint)
    model.eval()
    probs, labels = [], []
    for _, image, mask in _test_pairs(fold):
        for y in range(0, image.shape[0] - TILE + 1, TILE):
            for x in range(0, image.shape[1] - TILE + 1, TILE):
                m = mask[y : y + TILE, x : x + TILE]
                if (m >= 3).mean() > 0.5:
                    continue
                rgb = torch.from_numpy(image[y : y + TILE, x : x + TILE]).permute(2, 0, 1)[None]
                out = infer_maps(model, rgb.float() / 255, cfg.eval, tta=False)
                probs.append(out.probs[0].numpy())
                labels.append(mask_to_label(m, 3, 0.02))
    p, t = np.stack(probs), np.stack(labels)
    auc = [round(_auc(p[:, c], t[:, c]), 3) for c in range(3)]
    recall = [round(float((p[t[:, c] > 0.5, c] > 0.5).mean()), 3) for c in range(3)]
    print(f"{fold.name} {run} tiles n={len(p)} AUC {auc} recall@0.5 {recall}", flush=True)


def whole(fold: Path, run: str, checkpoint: str = "best.pt") -> None:
    model, cfg = load_model(fold / run / checkpoint)
    model.eval()
    print(f"{fold.name} {run} whole images: name, labels, probabilities", flush=True)
    for path, image, mask in _test_pairs(fold):
        rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        out = infer_maps(model, rgb, cfg.eval, tta=False)
        label = mask_to_label(mask, 3, 0.02).astype(int).tolist()
        print(f"  {path.stem} {label} {[round(v, 2) for v in out.probs[0].tolist()]}", flush=True)


def gate(fold: Path, run: str, checkpoint: str = "best.pt") -> None:
    model, cfg = load_model(fold / run / checkpoint)
    model.eval()
    res = []
    for side in ("whole", "tiles"):
        ev = dataclasses.replace(
            cfg.eval, max_side=10**6 if side == "whole" else TILE - 1, tile=TILE, overlap=0.5
        )
        c2 = dataclasses.replace(cfg, eval=ev)
        predictor = Predictor(model, c2, tta=True, device=torch.device("cpu"), batch_size=16)
        meter = SegmentationMeter(3, list(cfg.data.class_names))
        for _, image, mask in _test_pairs(fold):
            pred = predictor.mask(image)
            meter.update(
                torch.from_numpy(pred.astype(np.int64))[None],
                torch.from_numpy(mask.astype(np.int64))[None],
            )
        res.append(f"{side} {100 * meter.compute()['mIoU']:.1f}")
    print(f"{fold.name} {run} classifier-gated mIoU: {' | '.join(res)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/wsss4luad_bench"))
    parser.add_argument("--what", nargs="+", default=["tiles", "whole", "gate"])
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument(
        "--checkpoint", choices=["best", "last"], default="best", help="best.pt or last.pt"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    for fold in sorted(p for p in args.work.glob("fold*") if p.is_dir()):
        for run in args.runs:
            if not (fold / run / "best.pt").is_file():
                continue
            for what in args.what:
                fn = {"tiles": tiles, "whole": whole, "gate": gate}[what]
                fn(fold, run, f"{args.checkpoint}.pt")


if __name__ == "__main__":
    main()
