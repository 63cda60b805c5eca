"""Figure 8: peak resident memory of one training step (fp32 and bf16).

Each measurement runs in a fresh Python process (``--child``) so that peaks do
not carry over: it imports lpdseg, builds the trainer (MiT-B1, k = 10,
backbone-EMA encoder, feature mode), records ``VmHWM``, runs one
:meth:`Trainer.train_step` at B = 10, 224 px and records ``VmHWM`` again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import Figure, Scale, fake_batch, make_trainer, vm_hwm_mib


def child(amp: str, backbone: str, batch: int, size: int, k: int) -> None:
    """In a fresh process: build, measure, step, measure; print one JSON line."""
    base_import = vm_hwm_mib()
    trainer = make_trainer(
        [
            f"model.backbone={backbone}",
            f"model.prototypes_per_class={k}",
            f"data.crop_size={size}",
            f"train.batch_size={batch}",
            f"train.amp={amp}",
        ]
    )
    images, labels = fake_batch(batch, size)
    built = vm_hwm_mib()
    t0 = time.perf_counter()
    trainer.train_step(images, labels)
    step_s = time.perf_counter() - t0
    peak = vm_hwm_mib()
    print(
        json.dumps(
            {
                "after_import_mib": round(base_import, 1),
                "after_build_mib": round(built, 1),
                "peak_mib": round(peak, 1),
                "step_peak_above_build_mib": round(peak - built, 1),
                "step_s": round(step_s, 2),
            }
        )
    )


def measure(amp: str, backbone: str, batch: int, size: int, k: int) -> dict:
    """Run :func:`child` in a fresh interpreter and parse its result."""
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            amp,
            "--backbone",
            backbone,
            "--batch",
            str(batch),
            "--size",
            str(size),
            "--k",
            str(k),
        ],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(scale: Scale, context: dict | None = None) -> Figure:
    """Peak RSS of one step in fp32 and in bf16 (fresh process each)."""
    t_start = time.perf_counter()
    backbone, batch, size, k = ("mit_b0", 2, 64, 2) if scale.tiny else ("mit_b1", 10, 224, 10)
    res = {amp: measure(amp, backbone, batch, size, k) for amp in ("off", "bf16")}
    fig = Figure(
        id=8,
        title="training-step peak RSS (fresh process, VmHWM)",
        setting={"backbone": backbone, "B": batch, "size": size, "k": k, "sim_mode": "feature"},
        sides={
            name: {**r, "display": f"{r['peak_mib']:.0f} MiB"}
            for name, r in (("fp32", res["off"]), ("bf16", res["bf16"]))
        },
        ratio_meaning="bf16 / fp32 peak",
        target="(measured, no target)",
    )
    fig.ratio = res["bf16"]["peak_mib"] / res["off"]["peak_mib"]
    fig.seconds = time.perf_counter() - t_start
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help="amp setting (off|bf16): child mode")
    parser.add_argument("--backbone", default="mit_b1")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.backbone, args.batch, args.size, args.k)
        return
    from common import SCALES

    print(json.dumps(run(SCALES["bench"]).to_dict(), indent=2))


if __name__ == "__main__":
    main()
