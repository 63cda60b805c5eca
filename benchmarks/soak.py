"""Soak test: a long training run on synthetic data must not leak memory.

Writes a small synthetic dataset (BCSS-WSSS layout), then runs the real
``lpdseg.engine.train.train`` for ``--steps`` steps (MiT-B0, LPD head with the
similarity and diversity losses, batch 8, 32 px crops, validation and
``last.pt`` every epoch, ``metrics.jsonl`` every step). Every ``--every``
steps it records the resident set size of the process (``VmRSS`` from
``/proc/self/status``). Memory is "flat" when the RSS at the end is at most
``--max-growth`` (5 %) above the RSS right after warm-up (the first
``--warmup`` steps: allocator pools, autograd caches and the first
checkpoint write settle there).

Usage::

    nice -n 10 python benchmarks/soak.py [--steps 2000] [--json benchmarks/results/soak.json]

Exit status 0 when memory is flat, 1 when it grew by more than the limit.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("soak")


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def run_soak(
    steps: int, every: int, warmup: int, work: Path, size: int, batch: int, threads: int
) -> dict[str, Any]:
    """Train ``steps`` steps and sample RSS every ``every`` steps.

    Args:
        steps: training steps.
        every: RSS sampling interval (steps).
        warmup: steps after which the baseline RSS is taken.
        work: folder for the dataset and the run.
        size: patch side (px).
        batch: batch size.
        threads: torch CPU threads.

    Returns:
        Settings, the RSS samples ``[(step, MiB)]``, the baseline, the final RSS
        and the growth after warm-up (fraction).
    """
    from lpdseg.config import load_config
    from lpdseg.data.synthetic import write_dataset
    from lpdseg.engine import train as train_mod

    data = work / "data"
    write_dataset(data, n_train=400, n_val=8, n_test=0, size=size, seed=0, progress=False)
    cfg = load_config(
        "demo",
        [
            f"data.root={data}",
            f"data.crop_size={size}",
            "data.num_workers=0",
            "model.backbone=mit_b0",
            f"train.batch_size={batch}",
            f"train.max_steps={steps}",
            f"train.threads={threads}",
            f"train.out_dir={work / 'run'}",
            "eval.tta_scales=[1.0]",
            "eval.tta_flip=false",
        ],
    )
    samples: list[tuple[int, float]] = [(0, rss_mib())]
    real_step = train_mod.Trainer.train_step
    t0 = time.perf_counter()

    def sampled_step(self: Any, images: torch.Tensor, labels: torch.Tensor) -> Any:
        result = real_step(self, images, labels)
        if self.step % every == 0:
            samples.append((self.step, rss_mib()))
            log.info(
                "step %d: RSS %.1f MiB (%.1f s)",
                self.step,
                samples[-1][1],
                time.perf_counter() - t0,
            )
        return result

    train_mod.Trainer.train_step = sampled_step  # type: ignore[method-assign]
    try:
        summary = train_mod.train(cfg, progress=False, evaluate_test=False)
    finally:
        train_mod.Trainer.train_step = real_step  # type: ignore[method-assign]
    wall = time.perf_counter() - t0
    base = next(m for s, m in samples if s >= warmup)
    after = [m for s, m in samples if s >= warmup]
    final = samples[-1][1]
    return {
        "steps": summary["step"],
        "wall_s": round(wall, 1),
        "settings": {
            "backbone": "mit_b0",
            "head": cfg.model.head,
            "batch_size": batch,
            "crop_px": size,
            "train_patches": 400,
            "steps_per_epoch": 400 // batch,
            "threads": threads,
            "every": every,
            "warmup_steps": warmup,
        },
        "rss_mib": [[s, round(m, 1)] for s, m in samples],
        "baseline_mib": round(base, 1),
        "final_mib": round(final, 1),
        "max_after_warmup_mib": round(max(after), 1),
        "growth": (final - base) / base,
        "max_growth": (max(after) - base) / base,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "soak.json"
    )
    parser.add_argument("--work", type=Path, default=None, help="Folder (default: a temp dir).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lpdseg").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lpdseg-soak-") as tmp:
        work = args.work or Path(tmp)
        res = run_soak(
            args.steps, args.every, args.warmup, work, args.size, args.batch, args.threads
        )
    res["limit"] = args.max_growth
    res["flat"] = res["max_growth"] <= args.max_growth
    res["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    from lpdseg.io import atomic_write_json

    atomic_write_json(args.json, res)
    log.info(
        "%d steps in %.0f s: RSS %.1f MiB after %d warm-up steps -> %.1f MiB at the end "
        "(%+.2f %%, max %+.2f %%); limit %.0f %%: %s",
        res["steps"],
        res["wall_s"],
        res["baseline_mib"],
        args.warmup,
        res["final_mib"],
        100 * res["growth"],
        100 * res["max_growth"],
        100 * args.max_growth,
        "flat" if res["flat"] else "GROWING",
    )
    return 0 if res["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
