"""Why LPD/EfficientNet loses on whole WSSS4LUAD images: the diagnostics quoted in docs/results.md.

Runs on the checkpoints of a finished ``benchmarks/wsss4luad.py`` work folder
(default ``runs/wsss4luad_bench``, the 2-fold run) and prints, for each run:

- ``tiles``: classifier per-class AUC / recall at 0.5 on 96-px tiles of the
  held-out images (tiles at most half glass);
- ``whole``: class probabilities of every held-out image scored whole, next
  to its true labels;
- ``gate``: classifier-gated mIoU scored whole vs by 96-px sliding windows;
- ``area``: whole images, one forward each, classifier-gated mIoU with the
  whole-image gate (P > 0.5) next to area gates: a class kept when more than a
  share ``q`` of the image's tissue has P > 0.5 per feature cell (``px>q``) or
  per 96-px window (``win>q``), and the label gate.

    python benchmarks/wsss4luad_diagnostics.py [--work runs/wsss4luad_bench] [--what tiles whole gate]
        [--runs lpd_effnet_s0] [--checkpoint best|last]
    python benchmarks/wsss4luad_diagnostics.py --work runs/r600_lpd --what area \
        --runs lpd_effnet_s0 lpd_effnet_s1 --checkpoint last
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lpdseg.data.datasets import mask_to_label, read_image, read_mask
from lpdseg.data.glass import glass_mask
from lpdseg.inference import Predictor, load_model
from lpdseg.metrics import SegmentationMeter
from lpdseg.models.decode import (
    force_background,
    fuse_maps,
    gate_logits,
    infer_maps,
    label_scores,
    needed_stages,
)

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


AREA_SHARES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
AREA_MEANS: dict[str, list[float]] = {}


def _area_share(probs: Tensor, tissue: Tensor) -> Tensor:
    """Per class: the share of tissue cells (tissue: h x w bool) with P > 0.5 (probs C x h x w)."""
    if not bool(tissue.any()):
        return (probs > 0.5).flatten(1).float().mean(1)
    return ((probs > 0.5) & tissue).flatten(1).sum(1).float() / tissue.sum()


def _flip_tta(model, x: Tensor, ev) -> tuple[list[Tensor | None], Tensor, Tensor]:
    """One forward per flip view: the stage maps at image size, the classifier probabilities,
    and the per-cell stage-4 logit inputs at their own grid (all averaged over the views)."""
    stages = needed_stages(ev.fuse_weights)
    protos = hasattr(model.head, "prototypes")
    maps_sum, probs_sum, cells_sum = None, 0.0, 0.0
    for flip in (False, True):
        view = x.flip(-1) if flip else x
        out = model(view, stages=stages, inference_merge=ev.inference_merge)
        maps = [
            F.interpolate(
                out.class_maps[i].float(), x.shape[-2:], mode="bilinear", align_corners=False
            )
            if ev.fuse_weights[i]
            else None
            for i in range(4)
        ]
        cells = out.proto_maps[3].flatten(1, 2) if protos else out.class_maps[3]
        if flip:
            maps = [None if m is None else m.flip(-1) for m in maps]
            cells = cells.flip(-1)
        maps_sum = (
            maps
            if maps_sum is None
            else [None if a is None else a + b for a, b in zip(maps_sum, maps)]
        )
        probs_sum = probs_sum + torch.sigmoid(out.logits[3].float())
        cells_sum = cells_sum + cells.float()
    return [None if m is None else m / 2 for m in maps_sum], probs_sum / 2, cells_sum / 2


def area(fold: Path, run: str, checkpoint: str = "best.pt") -> None:
    model, cfg = load_model(fold / run / checkpoint)
    model.eval()
    ev = cfg.eval
    meters: dict[str, SegmentationMeter] = {}
    with torch.no_grad():
        for _, image, mask in _test_pairs(fold):
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            maps, probs, cells = _flip_tta(model, x, ev)
            fused = fuse_maps(maps, ev.fuse_weights)
            glass = glass_mask(x, ev.glass_brightness, ev.glass_spread)
            fh, fw = cells.shape[-2:]
            tissue = 1 - F.adaptive_avg_pool2d(glass[:, None].float(), (fh, fw))
            label = torch.from_numpy(mask_to_label(mask, 3, 0.02).astype(np.float32))[None]
            keeps = {"whole": probs > 0.5, "labels": label > 0.5}
            cell_probs = torch.sigmoid(gate_logits(model, cells))[0]
            cell_share = _area_share(cell_probs, tissue[0, 0] > 0.5)
            k = (max(1, min(fh, round(TILE * fh / x.shape[-2]))),
                 max(1, min(fw, round(TILE * fw / x.shape[-1]))))  # fmt: skip
            step = (max(1, k[0] // 2), max(1, k[1] // 2))
            win = torch.sigmoid(gate_logits(model, F.avg_pool2d(cells, k, step)))[0]
            win_share = _area_share(win, F.avg_pool2d(tissue, k, step)[0, 0] > 0.5)
            for q in AREA_SHARES:
                keeps[f"px>{q}"] = (cell_share > q)[None]
                keeps[f"win>{q}"] = (win_share > q)[None]
            truth = torch.from_numpy(mask.astype(np.int64))[None]
            for name, keep in keeps.items():
                if not keep.any():  # never an empty gate: the most probable class
                    keep = torch.zeros_like(keep)
                    keep[0, probs[0].argmax()] = True
                scores = force_background(label_scores(fused, keep, ev.bg_gamma), glass)
                meters.setdefault(name, SegmentationMeter(3, list(cfg.data.class_names)))
                meters[name].update(scores.argmax(1), truth)
    res = {n: round(100 * m.compute()["mIoU"], 1) for n, m in meters.items()}
    for n, v in res.items():
        AREA_MEANS.setdefault(n, []).append(v)
    print(f"{fold.name} {run} {checkpoint} classifier-gated mIoU by gate: {res}", flush=True)


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
                fn = {"tiles": tiles, "whole": whole, "gate": gate, "area": area}[what]
                fn(fold, run, f"{args.checkpoint}.pt")
    if AREA_MEANS:
        print("mean over runs:", {n: round(float(np.mean(v)), 1) for n, v in AREA_MEANS.items()})


if __name__ == "__main__":
    main()
