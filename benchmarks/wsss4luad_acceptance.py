"""The WSSS4LUAD acceptance figures of a ``benchmarks/wsss4luad.py`` result file.

Prints, at ``last.pt`` (the recipe's fixed-step weights) and at ``best.pt``
(best by validation): every method's classifier-gated mIoU (stage-2 networks
and the supervised bound: their plain mIoU), LPD's label-gated mIoU, the paired
differences LPD - PBIP and LPD - CAM (same fold and seed) with how many pairs
LPD leads, LPD / supervised, stage 2 - stage 1 and the diversity term (seed 0),
LPD's background and normal-tissue IoU. The numbers quoted in docs/results.md.

    python benchmarks/wsss4luad_acceptance.py benchmarks/results/wsss4luad_protocol.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

NORMAL, BACKGROUND = 2, -1  # per_class_IoU indices: TUM, STR, NOR, background


def _score(run: dict, last: bool) -> dict | None:
    """The run's main score at ``last.pt`` / ``best.pt``: classifier-gated, or seg."""
    s = run["scores"]
    key = "seg" if "seg" in s else "classifier"
    return s.get(f"{key}@last" if last else key)


def _miou(run: dict, last: bool) -> float | None:
    s = _score(run, last)
    return None if s is None else 100 * s["mIoU"]


def _runs(data: dict, method: str) -> dict[tuple[int, int], dict]:
    return {(r["fold"], r["seed"]): r for r in data["runs"] if r["method"] == method}


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    std = f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else ""
    return f"{np.mean(values):.1f}{std} (n={len(values)})"


def paired(a: dict, b: dict, last: bool) -> tuple[float, int, int, list[float]]:
    """Mean of a - b over the (fold, seed) pairs both have, pairs where a leads, pairs, diffs."""
    diffs = []
    for key in sorted(set(a) & set(b)):
        x, y = _miou(a[key], last), _miou(b[key], last)
        if x is not None and y is not None:
            diffs.append(x - y)
    lead = sum(d > 0 for d in diffs)
    return (float(np.mean(diffs)) if diffs else float("nan"), lead, len(diffs), diffs)


def summarise(data: dict) -> list[str]:
    methods = sorted({r["method"] for r in data["runs"]})
    lines = []
    for last in (True, False):
        tag = "last.pt" if last else "best.pt"
        lines.append(f"== {tag}")
        means = {}
        for m in methods:
            vals = [v for r in _runs(data, m).values() if (v := _miou(r, last)) is not None]
            means[m] = float(np.mean(vals)) if vals else float("nan")
            lines.append(f"  {m:12s} {_mean(vals)}")
        lpd = _runs(data, "lpd")
        label_key = "labels@last" if last else "labels"
        labels = [
            100 * r["scores"][label_key]["mIoU"] for r in lpd.values() if label_key in r["scores"]
        ]
        lines.append(f"  lpd label-gated {_mean(labels)}")
        for other in ("pbip", "cam", "lpd_nodiv", "lpd_stage2"):
            if other in methods and "lpd" in methods:
                mean, lead, n, diffs = paired(lpd, _runs(data, other), last)
                shown = " ".join(f"{d:+.1f}" for d in diffs)
                lines.append(f"  lpd - {other}: {mean:+.1f}, lpd ahead in {lead} of {n} ({shown})")
        if "supervised" in means and "lpd" in means:
            lines.append(f"  lpd / supervised: {means['lpd'] / means['supervised']:.2f}")
        for name, idx in (("background", BACKGROUND), ("normal", NORMAL)):
            vals = []
            for r in lpd.values():
                s = _score(r, last)
                if s is not None:
                    vals.append(100 * s["per_class_IoU"][idx])
            if vals:
                lines.append(
                    f"  lpd {name} IoU: {min(vals):.0f}-{max(vals):.0f} % (mean {np.mean(vals):.1f})"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a wsss4luad.py result .json")
    args = p.parse_args(argv)
    print("\n".join(summarise(json.loads(args.results.read_text()))))


if __name__ == "__main__":
    main()
