"""Real-tissue benchmark: K-fold by image on the shared WSSS4LUAD images.

    .venv/bin/python benchmarks/wsss4luad.py                 # the default protocol (below)
    .venv/bin/python benchmarks/wsss4luad.py --folds 2 --methods cam,lpd --backbones effnet

Protocol (nothing here is tuned per method):

1. The 31 image/mask pairs of ``../shared/data/wsss4luad-val`` (``img/`` +
   palette ``mask/``) are split BY IMAGE into K folds (seeded). For each
   fold, the other images are tiled into patches with
   :func:`lpdseg.data.patches.build_patch_dataset` (labels from the masks:
   a class is present if it covers >= 2 % of the patch; mostly-background
   patches dropped) and the fold's images are copied whole to ``test/``. No
   pixel of a test image reaches training.
2. Weakly supervised methods train on the patches' image-level labels only:
   CAM (1x1-conv classifier), PBIP (fixed bank from the efficientnet-lite0
   encoder, ``lpdseg.bank``), LPD without diversity (``loss.div_weight=0``) and
   LPD, each with EfficientNet-Lite0 ImageNet weights and with MiT-B0 from
   scratch. Same steps, batch, optimiser and augmentation for all; the
   prototype methods use the frozen ImageNet EfficientNet-Lite0 as the
   similarity-loss encoder (PBIP's loss weights for PBIP, LPD's for LPD).
3. Upper bound: the stage-2 network (each backbone + MLP decoder,
   ``train.task=seg``) trained on the true masks of the same training patches.
   ``--methods lpd_stage2``: the same network trained on LPD's pseudo masks of
   those patches (``lpdseg pseudo`` of the fold's LPD run, its ``last.pt`` by
   default: ``--stage2-from``), with the same recipe.
4. Every run is scored on its fold's held-out images at full image size with
   :func:`lpdseg.inference.evaluate_checkpoint` (the code behind
   ``lpdseg eval``): classifier-gated masks (no labels at test time: the
   headline) and label-gated masks (the pseudo-mask quality given the true
   image labels); stage-2 networks need no gate and are scored in windows of
   the patch size (``--seg-windows``: the scale they learned at).

The default protocol (no flags): EfficientNet-Lite0 (ImageNet), 96-px patches,
stride 48, 600 steps x batch 12, 3 folds; CAM, PBIP and LPD with seeds 0 and 1;
LPD w/o diversity, LPD stage 2 and the supervised bound with seed 0
(``--first-seed-only``). Finished runs in ``--work`` are reused, so an
interrupted benchmark continues where it stopped.

Results: mean +- std over folds x seeds of mIoU / mDice over the 3 tissue
classes, FwIoU and boundary IoU, written to ``benchmarks/results/wsss4luad_results.md``
and ``.json``. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "wsss4luad-val"
BACKBONES = {
    "effnet": ["model.backbone=efficientnet_lite0", "model.weights=imagenet"],
    "mit_b0": ["model.backbone=mit_b0", "model.weights=null"],
}
BACKBONE_LABEL = {"effnet": "EfficientNet-Lite0 (ImageNet)", "mit_b0": "MiT-B0 (scratch)"}
PBIP_LOSS = [
    "loss.sim_weight=0.5",
    "loss.sim_temperature=1.0",
    "loss.sim_threshold=0.15",
    "loss.sim_bg_weight=0.5",
    "loss.div_weight=0.0",
    "model.merge=mean",
]
METHODS = {
    "cam": ["model.head=cam", "loss.sim_mode=off", "loss.div_weight=0"],
    "pbip": ["model.head=pbip", *PBIP_LOSS],
    "lpd_nodiv": ["model.head=lpd", "loss.div_weight=0"],
    "lpd": ["model.head=lpd"],
}
# stage 2: a segmentation network trained on the pseudo masks of a stage-1 method's run
STAGE2 = {"lpd_stage2": "lpd"}
METHOD_LABEL = {
    "cam": "CAM baseline",
    "pbip": "PBIP",
    "lpd_nodiv": "LPD w/o diversity",
    "lpd": "LPD",
    "lpd_stage2": "LPD stage 2",
    "supervised": "Fully supervised (true masks)",
}
METRICS = ("mIoU", "mDice", "FwIoU", "bIoU")
#: overlap of the windows the segmentation networks are scored in (--seg-windows)
SEG_WINDOW_OVERLAP = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with img/ + mask/")
    p.add_argument("--work", type=Path, default=Path("runs/wsss4luad_bench"), help="run folders")
    p.add_argument(
        "--results", type=Path, default=HERE / "results" / "wsss4luad_results", help="output stem"
    )
    p.add_argument("--folds", type=int, default=3, help="K folds by image")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument(
        "--first-seed-only",
        default="lpd_nodiv,lpd_stage2,supervised",
        help="methods run with the first seed only (the protocol's ablation and bounds)",
    )
    p.add_argument(
        "--only-folds", default="", help="comma-separated fold indices to run (default: all)"
    )
    p.add_argument(
        "--methods",
        default="cam,pbip,lpd_nodiv,lpd,lpd_stage2",
        help=", ".join([*METHODS, *STAGE2]),
    )
    p.add_argument(
        "--stage2-from",
        choices=("last", "best"),
        default="last",
        help="stage-1 checkpoint whose pseudo masks stage 2 trains on (last: the fixed-step "
        "weights, which scored better than best-by-validation here)",
    )
    p.add_argument(
        "--stage2-ignore-margin",
        type=float,
        default=0.0,
        help="pseudo-mask pixels whose best label score leads the next by less than this "
        "are ignored by stage 2 (lpdseg pseudo --ignore-margin); 0: none",
    )
    p.add_argument("--backbones", default="effnet", help=", ".join(BACKBONES))
    p.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--size", type=int, default=96, help="patch side (px)")
    p.add_argument("--stride", type=int, default=48, help="patch stride (px)")
    p.add_argument("--min-fraction", type=float, default=0.02, help="label rule")
    p.add_argument(
        "--max-background",
        type=float,
        default=0.8,
        help="patch rule: drop training patches with more background (+ padding) than this",
    )
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--prototypes", type=int, default=4, help="prototypes per class (LPD)")
    p.add_argument(
        "--input-scale",
        type=float,
        default=1.0,
        help="model.input_scale for every run: images resized by this factor inside the model",
    )
    p.add_argument("--bank-keep", type=int, default=20, help="PBIP bank: patches per cluster")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--eval-overrides",
        nargs="*",
        default=[],
        help="eval.* settings for scoring only, e.g. eval.glass_background=true (finished "
        "runs in --work are re-scored, not re-trained)",
    )
    p.add_argument(
        "--val-images",
        type=int,
        default=3,
        help="training images of each fold held out whole as val/ (best.pt and early "
        "stopping by their mIoU; 0: none, best.pt = last weights)",
    )
    p.add_argument(
        "--score-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score last.pt when it differs from best.pt (results '<gate>@last')",
    )
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stopping: validations without a better val mIoU (default: none)",
    )
    p.add_argument("--color-jitter", type=float, default=0.1, help="data.color_jitter")
    p.add_argument("--stain-jitter", type=float, default=0.0, help="data.stain_jitter (HED)")
    p.add_argument("--cutmix", type=float, default=0.0, help="data.cutmix (share of patches mixed)")
    p.add_argument(
        "--repeat-threshold", type=float, default=None, help="data.repeat_threshold (balance)"
    )
    p.add_argument(
        "--tissue-pooling",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="model.tissue_pooling: class logits pool over tissue pixels only",
    )
    p.add_argument(
        "--seg-windows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the segmentation networks (supervised, stage 2) in sliding windows of "
        f"the patch size (overlap {SEG_WINDOW_OVERLAP}) instead of whole images: the scale "
        "they learned at",
    )
    p.add_argument("--scale-min", type=float, default=1.0, help="data.scale_min")
    p.add_argument("--scale-max", type=float, default=1.0, help="data.scale_max")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the by-image folds")
    return p.parse_args(argv)


def protocol_jobs(
    methods: list[str],
    backbones: list[str],
    seeds: list[int],
    supervised: bool,
    first_seed_only: set[str],
) -> list[tuple[int, str, str]]:
    """``(seed, method, backbone)`` of one fold, in the order they run.

    Every method with every backbone and seed, the supervised bound of every
    backbone last; methods in ``first_seed_only`` (the ablation and the bounds)
    with the first seed only.
    """
    jobs = []
    names = [*methods, *(["supervised"] if supervised else [])]
    for i, seed in enumerate(seeds):
        for method in names:
            if i > 0 and method in first_seed_only:
                continue
            jobs += [(seed, method, b) for b in backbones]
    return jobs


def make_folds(stems: list[str], k: int, seed: int) -> list[list[str]]:
    """K disjoint groups of image stems (seeded permutation, sizes differ by <= 1)."""
    order = [str(s) for s in np.random.default_rng(seed).permutation(sorted(stems))]
    return [sorted(part.tolist()) for part in np.array_split(np.array(order), k)]


#: A validation image is taken only from images whose every class stays in at least
#: this many training images: a rare class (normal tissue is in 4 of the 31 images)
#: is not taken from training to be validated on.
VAL_KEEP_PER_CLASS = 3


def split_val(
    stems: list[str], n: int, seed: int, classes: dict[str, set[int]] | None = None
) -> tuple[list[str], list[str]]:
    """(training stems, ``n`` validation stems) drawn from a fold's training images (seeded).

    With ``classes`` (stem -> classes in its mask), images are drawn in a seeded
    order and skipped when taking one would leave one of its classes in fewer than
    ``VAL_KEEP_PER_CLASS`` training images.
    """
    if n <= 0:
        return sorted(stems), []
    if n >= len(stems):
        raise SystemExit(f"--val-images {n} leaves no training image (the fold has {len(stems)})")
    order = [str(s) for s in np.random.default_rng(seed).permutation(sorted(stems))]
    classes = classes or {}
    count: dict[int, int] = {}
    for s in stems:
        for c in classes.get(s, ()):
            count[c] = count.get(c, 0) + 1
    val: list[str] = []
    for s in order:
        if len(val) == n:
            break
        if all(count[c] - 1 >= VAL_KEEP_PER_CLASS for c in classes.get(s, ())):
            val.append(s)
            for c in classes.get(s, ()):
                count[c] -= 1
    if len(val) < n:
        raise SystemExit(
            f"--val-images {n}: only {len(val)} images can be held out without leaving a class "
            f"in fewer than {VAL_KEEP_PER_CLASS} training images"
        )
    return sorted(s for s in stems if s not in val), sorted(val)


def mask_classes(pairs, num_classes: int) -> dict[str, set[int]]:
    """Stem -> tissue classes (``0..C-1``) present in its mask."""
    from lpdseg.imageio import read_mask

    out = {}
    for img, msk in pairs:
        values = np.unique(read_mask(msk, num_classes))
        out[img.stem] = {int(v) for v in values if v < num_classes}
    return out


def prepare_fold(img_dir, mask_dir, root, rule, train_stems, val_stems, test_stems) -> dict:
    """Tile one fold's data into ``root``, or reuse it when an earlier call built the same.

    A benchmark that was interrupted continues with its finished runs, so the fold's
    patches are kept; a folder built with other splits or another patch rule is refused
    (the runs in it were trained on other data).
    """
    from lpdseg.data.patches import build_patch_dataset

    info_path = root / "patches.json"
    wanted = {"train": train_stems, "val": val_stems, "test": test_stems}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        have = {k: list(info.get("splits", {}).get(k) or []) for k in wanted}
        same_rule = all(info.get("rule", {}).get(f) == getattr(rule, f) for f in
                        ("size", "stride", "min_fraction", "max_background"))  # fmt: skip
        if info.get("status") != "incomplete" and have == wanted and same_rule:
            return info
        if info.get("status") != "incomplete":
            raise SystemExit(
                f"{root} holds patches of other splits or another patch rule; use another "
                "--work folder or delete that fold"
            )
    return build_patch_dataset(
        img_dir, mask_dir, root, fmt="wsss4luad", rule=rule, train_stems=train_stems,
        val_stems=val_stems, test_stems=test_stems, progress=False, overwrite=True,
    )  # fmt: skip


def common_overrides(args: argparse.Namespace, root: Path, out: Path, seed: int) -> list[str]:
    return [
        f"data.root={root}",
        "data.format=wsss4luad",
        f"data.crop_size={args.size}",
        "data.num_workers=0",
        f"data.color_jitter={args.color_jitter}",
        f"data.stain_jitter={args.stain_jitter}",
        f"data.cutmix={args.cutmix}",
        f"data.scale_min={args.scale_min}",
        f"data.scale_max={args.scale_max}",
        f"data.repeat_threshold={'null' if args.repeat_threshold is None else args.repeat_threshold}",
        "model.drop_path=0.0",
        "model.merge=mean",  # class logits as the mean over prototypes (docs/demo_ablation.md)
        f"model.prototypes_per_class={args.prototypes}",
        f"model.input_scale={args.input_scale}",
        f"model.tissue_pooling={str(args.tissue_pooling).lower()}",
        "model.embed_dim=320",  # the efficientnet-lite0 similarity encoder's space
        "loss.encoder=efficientnet-lite0",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        "train.head_lr_mult=5.0",
        "train.warmup_fraction=0.05",
        f"train.seed={seed}",
        f"train.threads={args.threads}",
        f"train.val_every={args.val_every}",
        f"train.patience={'null' if args.patience is None else args.patience}",
        f"train.out_dir={out}",
        "eval.tta_scales=[1.0]",
        "eval.tta_flip=true",
    ]


def check_finished_run(out: Path, overrides: list[str]) -> None:
    """Refuse to reuse ``out`` when it was trained with other values of ``overrides``.

    Finished runs are reused (not retrained) by folder name alone, so a second call
    with, e.g., another ``--input-scale`` or ``--steps`` into the same ``--work`` would
    silently score the old checkpoints. Keys the saved config lacks (runs older than
    the key) and ``train.threads`` (not a property of the run) are not compared.
    """
    import yaml

    from lpdseg.config import load_config

    wanted = load_config("wsss4luad", overrides).to_dict()
    saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    for item in overrides:
        section, key = item.split("=", 1)[0].split(".", 1)
        have = (saved.get(section) or {}).get(key)
        if f"{section}.{key}" == "train.threads" or have is None:
            continue
        if have != wanted[section][key]:
            raise SystemExit(
                f"{out} holds a run trained with {section}.{key}={have!r}, this call asks "
                f"for {wanted[section][key]!r}; use another --work folder or delete that run"
            )


def run_one(
    overrides: list[str],
    out: Path,
    modes: tuple[str, ...],
    tta: bool,
    eval_overrides: list[str] | None = None,
    score_last: bool = False,
) -> dict:
    """Train one config, score best.pt on the fold's test images; return metrics + seconds.

    ``score_last`` also scores ``last.pt`` (keys ``<gate>@last``).

    A finished run (``best.pt`` present) is not trained again; scores with other
    ``eval_overrides`` go to their own sub-folder, so runs can be re-scored.
    """
    from lpdseg.config import load_config
    from lpdseg.engine.train import train
    from lpdseg.inference import evaluate_checkpoint

    t0 = time.perf_counter()
    eval_dir = out
    if eval_overrides:
        tag = hashlib.sha1(" ".join(sorted(eval_overrides)).encode()).hexdigest()[:8]
        eval_dir = out / f"eval_{tag}"
    cached = eval_dir / "test_metrics.json"
    t_train = None
    if (out / "best.pt").is_file():
        check_finished_run(out, overrides)
    if cached.is_file() and (out / "best.pt").is_file():
        # a finished run of an interrupted benchmark: reuse its scores (same overrides)
        res = json.loads(cached.read_text())
    else:
        if not (out / "best.pt").is_file():
            # an interrupted run continues from its last checkpoint
            last = out / "last.pt"
            train(
                load_config("wsss4luad", overrides),
                progress=False,
                evaluate_test=False,
                resume=last if last.is_file() else None,
            )
            t_train = time.perf_counter() - t0
        res = evaluate_checkpoint(
            out / "best.pt",
            split="test",
            gates=tuple(m for m in modes if m != "seg") or ("labels",),
            tta=tta,
            progress=False,
            out_dir=eval_dir,
            eval_overrides=eval_overrides,
        )
    scores = _scores(res, modes)
    summary = out / "summary.json"
    by_val = summary.is_file() and json.loads(summary.read_text()).get("best_by") == "val_mIoU"
    if score_last and by_val and (out / "last.pt").is_file():
        # the last weights too: with a small validation split, best-by-validation may
        # pick a worse checkpoint than simply the last one
        last_dir = eval_dir / "last"
        cached_last = last_dir / "test_metrics.json"
        res_last = (
            json.loads(cached_last.read_text())
            if cached_last.is_file()
            else evaluate_checkpoint(
                out / "last.pt",
                split="test",
                gates=tuple(m for m in modes if m != "seg") or ("labels",),
                tta=tta,
                progress=False,
                out_dir=last_dir,
                eval_overrides=eval_overrides,
            )
        )
        scores |= {f"{k}@last": v for k, v in _scores(res_last, modes).items()}
    return {
        "scores": scores,
        "train_s": round(t_train, 1) if t_train is not None else None,
        "total_s": round(time.perf_counter() - t0, 1),
        **training_record(out),
    }


def _scores(res: dict, modes: tuple[str, ...]) -> dict:
    """Per gate: the benchmark's metrics of one ``evaluate_checkpoint`` result."""
    if "seg" in res:
        return {
            "seg": {m: float(res["seg"][m]) for m in METRICS}
            | {"per_class_IoU": res["seg"].get("iou")}
        }
    return {
        mode: {m: float(res[mode][m]) for m in (*METRICS, "pixel_acc")}
        | {"per_class_IoU": res[mode].get("iou")}
        for mode in modes
        if mode in res
    }


def training_record(out: Path) -> dict:
    """The run's validation curve, steps trained and whether it stopped early."""
    curve = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "val_mIoU" in rec:
                curve.append([rec["step"], rec["val_mIoU"]])
    summary = (
        json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    )
    best = max(curve, key=lambda c: c[1] if c[1] is not None else -1.0, default=None)
    return {
        "val_curve": curve,
        "best_step": best[0] if best else None,
        "steps": summary.get("step"),
        "early_stopped": summary.get("early_stopped"),
    }


def pseudo_masks(checkpoint: Path, out: Path, ignore_margin: float = 0.0) -> Path:
    """Pseudo masks of the fold's training patches from ``checkpoint`` in ``out``, or the
    ones a finished earlier call left there (``pseudo.json`` is written last)."""
    from lpdseg.inference import write_pseudo_masks

    if (out / "pseudo.json").is_file():
        done = json.loads((out / "pseudo.json").read_text())
        if Path(done.get("checkpoint", "")) == checkpoint and float(
            done.get("ignore_margin", 0.0)
        ) == float(ignore_margin):
            return out
    # none yet, made from another checkpoint or margin, or cut short: (re)made
    write_pseudo_masks(
        checkpoint, out, progress=False, overwrite=out.exists(), ignore_margin=ignore_margin
    )
    return out


def run_job(
    args: argparse.Namespace,
    root: Path,
    fold_dir: Path,
    method: str,
    backbone: str,
    seed: int,
    bank: Path | None,
) -> dict:
    """Train (or reuse) and score one run of the fold: ``run_one`` with its overrides.

    A stage-2 method first runs (or reuses) its stage-1 run, the same way, and
    trains on that run's pseudo masks from ``args.stage2_from`` (``last.pt`` or
    ``best.pt``).
    """
    # stage 2 on masks with an ignore margin is another run (and other pseudo masks)
    margin = f"_m{args.stage2_ignore_margin:g}" if args.stage2_ignore_margin else ""
    tag = margin if method in STAGE2 else ""
    out = fold_dir / f"{method}{tag}_{backbone}_s{seed}"
    ov = common_overrides(args, root, out, seed) + BACKBONES[backbone]
    if method == "supervised":
        ov += ["train.task=seg", f"data.pseudo={root / 'supervised'}"]
        modes: tuple[str, ...] = ("seg",)
    elif method in STAGE2:
        first = STAGE2[method]
        run_job(args, root, fold_dir, first, backbone, seed, bank)
        pseudo = pseudo_masks(
            fold_dir / f"{first}_{backbone}_s{seed}" / f"{args.stage2_from}.pt",
            fold_dir / f"pseudo_{first}_{backbone}_s{seed}_{args.stage2_from}{margin}",
            args.stage2_ignore_margin,
        )
        ov += ["train.task=seg", f"data.pseudo={pseudo}"]
        modes = ("seg",)
    else:
        ov += METHODS[method]
        modes = ("classifier", "labels")
        if method == "pbip":
            ov.append(f"model.bank={bank}")
    scoring = list(args.eval_overrides or [])
    if modes == ("seg",) and args.seg_windows:
        scoring += seg_window_overrides(args.size)
    return run_one(ov, out, modes, args.tta, scoring or None, args.score_last)


def seg_window_overrides(size: int) -> list[str]:
    """Eval settings that score a segmentation network in windows of its ``size``-px patches.

    A network trained on small patches and run on a whole image sees far more
    context than it learned with; windows of the patch size keep it at that scale
    (the fully supervised bound: 54.7 vs 49.8 mIoU whole, docs/results.md). The
    classifier-gated methods stay whole: their gate is an image-level decision.
    """
    return [f"eval.max_side={size}", f"eval.tile={size}", f"eval.overlap={SEG_WINDOW_OVERLAP}"]


def build_bank(root: Path, out: Path, args: argparse.Namespace) -> Path:
    """The fold's PBIP bank in ``out``, or the one an earlier call built with the same settings."""
    from lpdseg.engine.bank import build_bank_from_config
    from lpdseg.io import atomic_write_json

    settings = {"bank_keep": args.bank_keep, "clusters": 3, "seed": 0, "data": str(root)}
    # the stamp records what the bank is built with: the call below takes its values
    stamp = out.with_suffix(".settings.json")
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out
    bank = build_bank_from_config(
        "wsss4luad",
        [f"data.root={root}", "loss.encoder=efficientnet-lite0", "model.weights=imagenet",
         "model.backbone=efficientnet_lite0"],
        out,
        clusters=settings["clusters"],
        n_keep=settings["bank_keep"],
        seed=settings["seed"],
        allow_fewer=True,
        sheet=False,
        progress=False,
    )  # fmt: skip
    atomic_write_json(stamp, settings)  # after the bank: a stamp means a finished bank
    return bank


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v == v], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def aggregate(runs: list[dict]) -> dict:
    """Per (method, backbone, mode): mean and std of each metric over folds x seeds."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        for mode, s in r["scores"].items():
            groups.setdefault((r["method"], r["backbone"], mode), []).append(s)
    out = {}
    for (method, backbone, mode), scores in groups.items():
        out[f"{method}|{backbone}|{mode}"] = {
            "method": method,
            "backbone": backbone,
            "mode": mode,
            "n": len(scores),
            **{m: dict(zip(("mean", "std"), mean_std([s[m] for s in scores]))) for m in METRICS},
        }
    return out


def _fmt(entry: dict, metric: str) -> str:
    m, s = entry[metric]["mean"], entry[metric]["std"]
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def markdown(summary: dict) -> str:
    agg = summary["aggregate"]
    lines = [
        "| Method | Backbone | mIoU | mDice | FwIoU | bIoU | mIoU (label-gated) "
        "| mIoU (last.pt) | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = [(m, b) for m in (*METHODS, *STAGE2, "supervised") for b in BACKBONES]
    for method, backbone in order:
        pred = agg.get(f"{method}|{backbone}|classifier") or agg.get(f"{method}|{backbone}|seg")
        if pred is None:
            continue
        gated = agg.get(f"{method}|{backbone}|labels")
        last = agg.get(f"{method}|{backbone}|classifier@last") or agg.get(
            f"{method}|{backbone}|seg@last"
        )
        lines.append(
            f"| {METHOD_LABEL[method]} | {BACKBONE_LABEL[backbone]} | "
            + " | ".join(_fmt(pred, m) for m in METRICS)
            + f" | {_fmt(gated, 'mIoU') if gated else '–'}"
            + f" | {_fmt(last, 'mIoU') if last else '–'} | {pred['n']} |"
        )
    s = summary["settings"]
    lines += [
        "",
        f"Held-out WSSS4LUAD images at full size, {s['folds']}-fold by image x seeds "
        f"{s['seeds']}; mean ± std (%) over {s['folds'] * len(s['seeds'])} runs. mIoU/mDice "
        "over tumor, stroma, normal; FwIoU and boundary IoU as lpdseg eval. Columns 3-6: "
        "classifier-gated masks (no labels at test time; the stage-2 network needs none); "
        "'label-gated': masks gated by the true image labels (pseudo-mask quality); 'last.pt': "
        "the classifier-gated (or stage-2) mIoU of the last weights, when best.pt was chosen "
        "on a validation split.",
        f"Patches {s['size']} px, stride {s['stride']}, label rule >= {s['min_fraction']:.0%} "
        f"of the patch; {s['steps']} steps x batch {s['batch_size']}, lr {s['lr']}; "
        + (f"input scale {s['input_scale']}; " if s.get("input_scale", 1.0) != 1.0 else "")
        + f"{s['threads']} threads. Wall time {summary['wall_s'] / 60:.1f} min."
        + (f" Scored with {' '.join(s['eval_overrides'])}." if s.get("eval_overrides") else "")
        + (
            f" Segmentation networks scored in {s['size']}-px windows "
            f"(overlap {SEG_WINDOW_OVERLAP})."
            if s.get("seg_windows")
            else ""
        ),
        f"Command: `{summary['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    img_dir, mask_dir = args.data / "img", args.data / "mask"
    if not (img_dir.is_dir() and mask_dir.is_dir()):
        print(
            f"skipped: {args.data} (img/ + mask/) not found; this benchmark needs the shared data"
        )
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from lpdseg.data.patches import PatchRule, pair_files

    methods = [m for m in args.methods.split(",") if m]
    backbones = [b for b in args.backbones.split(",") if b]
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    for m in methods:
        if m not in METHODS and m not in STAGE2:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join([*METHODS, *STAGE2])}")
    for b in backbones:
        if b not in BACKBONES:
            raise SystemExit(f"unknown backbone {b!r}; choose from {', '.join(BACKBONES)}")
    pairs = pair_files(img_dir, mask_dir)
    stems = [img.stem for img, _ in pairs]
    classes = mask_classes(pairs, 3) if args.val_images > 0 else None
    folds = make_folds(stems, args.folds, args.split_seed)
    rule = PatchRule(args.size, args.stride, args.min_fraction, args.max_background)
    t_start = time.perf_counter()
    runs: list[dict] = []
    data_info = []
    only = {int(f) for f in args.only_folds.split(",") if f != ""}
    for k, test_stems in enumerate(folds):
        if only and k not in only:
            continue
        fold_dir = args.work / f"fold{k}"
        root = fold_dir / "data"
        train_stems, val_stems = split_val(
            [s for s in stems if s not in test_stems], args.val_images, args.split_seed + k, classes
        )
        info = prepare_fold(img_dir, mask_dir, root, rule, train_stems, val_stems, test_stems)
        data_info.append(
            {
                "fold": k,
                "test_images": test_stems,
                "val_images": val_stems,
                "train_patches": info["patches"],
                "patches_with_class": info["patches_with_class"],
            }
        )
        print(f"fold {k}: {info['patches']} training patches, test images {test_stems}", flush=True)
        bank = None
        if "pbip" in methods:
            bank = build_bank(root, fold_dir / "bank.pt", args)
        first_only = {m for m in args.first_seed_only.split(",") if m}
        for seed, method, backbone in protocol_jobs(
            methods, backbones, seeds, args.supervised, first_only
        ):
            res = run_job(args, root, fold_dir, method, backbone, seed, bank)
            runs.append({"fold": k, "seed": seed, "method": method, "backbone": backbone, **res})
            head = next(iter(res["scores"].values()))
            print(
                f"  fold {k} seed {seed} {method:10s} {backbone:7s} mIoU {head['mIoU']:.3f} "
                f"mDice {head['mDice']:.3f} ({res['total_s']:.0f} s)",
                flush=True,
            )
    wall = time.perf_counter() - t_start
    summary = {
        "command": "python benchmarks/wsss4luad.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "folds": args.folds,
            "seeds": seeds,
            "methods": methods,
            "backbones": backbones,
            "size": args.size,
            "stride": args.stride,
            "min_fraction": args.min_fraction,
            "max_background": args.max_background,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "prototypes_per_class": args.prototypes,
            "input_scale": args.input_scale,
            "bank_keep": args.bank_keep,
            "tta": args.tta,
            "eval_overrides": args.eval_overrides,
            "seg_windows": args.seg_windows,
            "threads": args.threads,
            "split_seed": args.split_seed,
            "only_folds": sorted(only),
            "val_images": args.val_images,
            "val_every": args.val_every,
            "patience": args.patience,
            "score_last": args.score_last,
            "color_jitter": args.color_jitter,
            "stain_jitter": args.stain_jitter,
            "cutmix": args.cutmix,
            "scale": [args.scale_min, args.scale_max],
            "repeat_threshold": args.repeat_threshold,
            "tissue_pooling": args.tissue_pooling,
            "stage2_from": args.stage2_from,
            "stage2_ignore_margin": args.stage2_ignore_margin,
            "first_seed_only": args.first_seed_only,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "wall_s": round(wall, 1),
        "folds": data_info,
        "aggregate": aggregate(runs),
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    # --results is a stem: "r_m0.1" -> r_m0.1.json (with_suffix would make r_m0.json)
    stem = str(args.results).removesuffix(".json").removesuffix(".md")
    Path(stem + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    Path(stem + ".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
