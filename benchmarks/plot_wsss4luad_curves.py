"""Validation learning curves of ``benchmarks/wsss4luad.py`` runs, one panel per result file.

    python benchmarks/plot_wsss4luad_curves.py RESULTS.json [RESULTS.json ...] --out docs/curves.png

Each run's ``val_curve`` (validation mIoU after every epoch, written by the
benchmark when ``--val-images`` > 0) is drawn per fold, with the test mIoU of
``best.pt`` (circle, at the step validation chose) and of ``last.pt`` (cross,
at the last step) on the held-out images, so one sees whether the validation
split picks the better checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _gate(scores: dict, suffix: str = "") -> float | None:
    for gate in ("classifier", "seg"):
        if f"{gate}{suffix}" in scores:
            return scores[f"{gate}{suffix}"]["mIoU"]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="wsss4luad.py result .json files")
    p.add_argument("--labels", nargs="*", default=None, help="one panel title per file")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(args.results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, path in enumerate(args.results):
        ax = axes[0][i]
        runs = json.loads(path.read_text())["runs"]
        for run in runs:
            c = colors[run["fold"] % len(colors)]
            curve = run.get("val_curve") or []
            if curve:
                ax.plot([s for s, _ in curve], [100 * v for _, v in curve], color=c, lw=1.2,
                        label=f"fold {run['fold']} {run['method']} (val)")  # fmt: skip
            best, last = _gate(run["scores"]), _gate(run["scores"], "@last")
            if best is not None and run.get("best_step") is not None:
                ax.plot(run["best_step"], 100 * best, "o", color=c)
            if last is not None and run.get("steps") is not None:
                ax.plot(run["steps"], 100 * last, "x", color=c, ms=8, mew=2)
        title = args.labels[i] if args.labels and i < len(args.labels) else path.stem
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mIoU (%)")
    fig.suptitle(
        "lines: validation mIoU; o: best.pt, x: last.pt on the held-out images", fontsize=8
    )
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
