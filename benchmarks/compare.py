"""Side-by-side comparison on synthetic H&E: CAM, PBIP, LPD k=1, LPD without diversity, LPD.

For every seed and method: stage 1 (weak labels) -> test metrics of the stage-1
masks in ``pseudo`` gating (how the papers score pseudo masks) -> pseudo masks of
the training set -> stage 2 (MiT + all-MLP decoder, fully supervised on them) ->
test metrics. Writes ``compare_results.md`` / ``.json`` with mean +- std over seeds.

    python benchmarks/compare.py --scale small --seeds 0 1 2 --out runs/compare

The runs quoted in ``docs/results.md`` are kept in ``benchmarks/results/``
(``compare_results.*``, ``compare_sim_results.*``: copies of ``--out``'s files).

All methods share the backbone, data, steps and optimiser; PBIP and the LPD
variants share the frozen encoder of the similarity loss (``--encoder``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from lpdseg.config import load_config
from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.bank import build_bank_from_config, cluster_purity
from lpdseg.engine.train import train
from lpdseg.inference import evaluate_checkpoint, write_pseudo_masks
from lpdseg.models.bank import load_bank

METHODS = {
    "CAM": ["model.head=cam"],
    "PBIP": None,  # pbip_demo preset + bank
    "LPD k=1": ["model.prototypes_per_class=1"],
    "LPD no-div": ["loss.div_weight=0"],
    "LPD": [],
    # not in the default list: the faithful (slow) similarity mode, for benchmark figure 2
    "LPD image-sim": ["loss.sim_mode=image"],
    # not in the default list: the frozen encoder at half size (benchmark figure 3's option)
    "LPD enc-half": ["loss.encoder_scale=0.5"],
}
DEFAULT_METHODS = ["CAM", "PBIP", "LPD k=1", "LPD no-div", "LPD"]
SCALES = {
    # patch px, train, val, test, epochs, stage-2 epochs
    "tiny": (64, 160, 16, 32, 1, 1),
    "small": (64, 800, 40, 100, 3, 2),
    "full": (96, 1600, 40, 100, 6, 3),
}
METRICS = ("mIoU", "mDice", "FwIoU", "bIoU")


def run(args: argparse.Namespace) -> dict:
    size, n_train, n_val, n_test, epochs, seg_epochs = SCALES[args.scale]
    out = Path(args.out)
    data = out / "data"
    if not (data / "synthetic.json").exists():
        write_dataset(
            data,
            n_train,
            n_val,
            n_test,
            size=size,
            seed=0,
            single_class_fraction=0.3,
            progress=False,
        )
    common = [
        f"data.root={data}",
        f"data.crop_size={size}",
        f"train.epochs={epochs}",
        f"loss.encoder={args.encoder}",
        f"train.threads={args.threads}",
    ]
    results: dict = {m: {"stage1": [], "stage2": []} for m in args.methods}
    extra: dict = {}
    bank_path = out / "bank.pt"
    if "PBIP" in args.methods:
        build_bank_from_config(
            "pbip_demo",
            common,
            bank_path,
            clusters=3,
            n_keep=args.n_keep,
            allow_fewer=True,
            progress=False,
        )
        truth = _subtype_truth(data)
        extra["bank_purity"] = cluster_purity(load_bank(bank_path), truth)
    start = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            tag = f"{method.replace(' ', '_').replace('=', '')}_s{seed}"
            run_dir = out / "runs" / tag
            if METHODS[method] is None:
                cfg = load_config(
                    "pbip_demo",
                    common
                    + [f"model.bank={bank_path}", f"train.seed={seed}", f"train.out_dir={run_dir}"],
                )
            else:
                cfg = load_config(
                    args.preset,
                    common + METHODS[method] + [f"train.seed={seed}", f"train.out_dir={run_dir}"],
                )
            logging.info("stage 1: %s seed %d", method, seed)
            s1 = train(cfg, progress=False, overwrite=True)  # a comparison re-runs all
            results[method]["stage1"].append({k: s1["test"]["labels"][k] for k in METRICS})
            if not args.stage2:
                _write(out, args, results, extra, time.perf_counter() - start)
                continue
            pseudo_dir = out / "pseudo" / tag
            write_pseudo_masks(run_dir / "best.pt", pseudo_dir, progress=False, overwrite=True)
            seg_cfg = load_config(
                args.preset,
                common
                + [
                    "train.task=seg",
                    f"data.pseudo={pseudo_dir}",
                    f"train.epochs={seg_epochs}",
                    f"train.seed={seed}",
                    f"train.out_dir={out / 'seg' / tag}",
                ],
            )
            logging.info("stage 2: %s seed %d", method, seed)
            train(seg_cfg, progress=False, evaluate_test=False, overwrite=True)
            s2 = evaluate_checkpoint(out / "seg" / tag / "best.pt", split="test", progress=False)
            results[method]["stage2"].append({k: s2["seg"][k] for k in METRICS})
            _write(out, args, results, extra, time.perf_counter() - start)
    return results


def _subtype_truth(data: Path) -> dict[str, int]:
    """File name -> sub-type of its single class (from training_subtypes.csv)."""
    import csv

    truth = {}
    with (data / "training_subtypes.csv").open() as handle:
        for row in csv.DictReader(handle):
            subs = [int(v) for k, v in row.items() if k.endswith("_subtype") and int(v) >= 0]
            if len(subs) == 1:
                truth[row["file"]] = subs[0]
    return truth


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (defaults left out)."""
    parts = [
        "python benchmarks/compare.py",
        f"--scale {args.scale}",
        "--seeds " + " ".join(map(str, args.seeds)),
    ]
    if args.methods != DEFAULT_METHODS:
        parts.append("--methods " + " ".join(f'"{m}"' if " " in m else m for m in args.methods))
    if args.preset != "demo":
        parts.append(f"--preset {args.preset}")
    if args.encoder != "efficientnet-lite0":
        parts.append(f"--encoder {args.encoder}")
    if not args.stage2:
        parts.append("--no-stage2")
    if args.out != "runs/compare":
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def _write(out: Path, args, results: dict, extra: dict, seconds: float) -> None:
    from lpdseg.io import atomic_write_json, atomic_write_text

    lines = [
        f"Synthetic H&E, scale `{args.scale}`, preset `{args.preset}`, seeds {args.seeds}, "
        f"encoder `{args.encoder}`, {seconds / 60:.1f} min. Command: "
        f"`{_command(args)}`",
        "",
    ]
    if "bank_purity" in extra:
        lines += [
            f"PBIP bank cluster purity w.r.t. the generator's sub-types: "
            f"{100 * extra['bank_purity']:.1f} %",
            "",
        ]
    stages = (
        ("stage1", "Stage 1 (pseudo masks, label-gated)"),
        ("stage2", "Stage 2 (segmentation net on pseudo masks)"),
    )
    for stage, title in stages if args.stage2 else stages[:1]:
        lines += [
            f"**{title}**, test split, mean ± std over seeds (%)",
            "",
            "| method | n | " + " | ".join(METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS),
        ]
        for method, res in results.items():
            rows = res[stage]
            lines.append(
                f"| {method} | {len(rows)} | "
                + " | ".join(_mean_std([r[m] for r in rows]) for m in METRICS)
                + " |"
            )
        lines.append("")
    atomic_write_text(out / "compare_results.md", "\n".join(lines))
    atomic_write_json(
        out / "compare_results.json",
        {
            "scale": args.scale,
            "preset": args.preset,
            "seeds": args.seeds,
            "encoder": args.encoder,
            "command": _command(args),
            "seconds": seconds,
            "results": results,
            **extra,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--n-keep", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument(
        "--preset",
        default="demo",
        help="config preset of every method (demo: MiT-B0 from scratch; "
        "demo_pretrained: EfficientNet-Lite0 ImageNet; PBIP always uses pbip_demo)",
    )
    parser.add_argument(
        "--stage2",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train and score the stage-2 network on each method's pseudo masks",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    run(args)
    print((Path(args.out) / "compare_results.md").read_text())


if __name__ == "__main__":
    main()
