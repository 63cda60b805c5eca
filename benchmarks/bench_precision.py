"""Figure 4: bf16 autocast vs fp32 training step on CPU, and the loss curves of both.

Timing: :meth:`Trainer.train_step` with ``train.amp=bf16`` and ``train.amp=off``
on the same batch (MiT-B1, B = 10, 224 px, k = 10), interleaved. One step of
each side is also run under ``torch.profiler`` and its top operators (by self
CPU time) are kept, which show where bf16 loses or wins on this CPU.

Curves: a small model (MiT-B0, 64 px synthetic H&E patches, B = 4, k = 4)
trained for 50 steps from the same seed on the same batches in each precision;
the curves agree when the mean relative difference of the losses is <= 5 %.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import (
    Figure,
    Scale,
    fake_batch,
    make_trainer,
    median,
    profile_top,
    side,
    step_overrides,
    step_setting,
    time_interleaved,
)

CURVE_TOLERANCE = 0.05


def synthetic_batches(n_batches: int, batch: int, size: int, seed: int = 0) -> list:
    """Batches of synthetic H&E patches (normalised) with their image-level labels."""
    from lpdseg.data.synthetic import generate_patch

    out = []
    for i in range(n_batches):
        patches = [generate_patch(seed * 100_000 + i * batch + j, size) for j in range(batch)]
        x = torch.from_numpy(np.stack([p.image for p in patches])).permute(0, 3, 1, 2)
        x = (x.float() / 255.0 - 0.5) / 0.25
        y = torch.from_numpy(np.stack([p.label for p in patches])).float()
        out.append((x, y))
    return out


def loss_curves(steps: int, batches: list) -> dict[str, list[float]]:
    """Train the small model in fp32 and in bf16 on the same batches; return both loss curves."""
    curves = {}
    for amp in ("off", "bf16"):
        trainer = make_trainer(
            [
                "model.backbone=mit_b0",
                "model.prototypes_per_class=4",
                "data.crop_size=64",
                "train.batch_size=4",
                "train.lr=4e-4",
                f"train.amp={amp}",
            ],
            seed=0,
            total_steps=steps,
        )
        curves[amp] = [trainer.train_step(*batches[i % len(batches)]).loss for i in range(steps)]
    return curves


def run(scale: Scale, context: dict | None = None) -> Figure:
    """Time fp32 vs bf16 steps, profile one of each, compare loss curves."""
    t_start = time.perf_counter()
    s = step_setting(scale)
    images, labels = fake_batch(s["B"], s["size"])
    common = step_overrides(s)
    trainers = {
        "fp32": make_trainer([*common, "train.amp=off"]),
        "bf16": make_trainer([*common, "train.amp=bf16"]),
    }
    sides = {name: (lambda t=t: t.train_step(images, labels)) for name, t in trainers.items()}
    times = time_interleaved(sides, repeats=scale.heavy_repeats, warmup=scale.warmup)
    profiles = {name: profile_top(fn, rows=12) for name, fn in sides.items()}
    steps = 5 if scale.tiny else 50
    curves = loss_curves(steps, synthetic_batches(4 if scale.tiny else 10, 4, 64))
    fp32, bf16 = np.array(curves["off"]), np.array(curves["bf16"])
    rel = np.abs(bf16 - fp32) / np.maximum(np.abs(fp32), 1e-6)
    fig = Figure(
        id=4,
        title="precision: bf16 autocast vs fp32 step (CPU)",
        setting={**s, "curve": {"backbone": "mit_b0", "size": 64, "B": 4, "k": 4, "steps": steps}},
        sides={"fp32": side(times["fp32"]), "bf16": side(times["bf16"])},
        ratio_meaning="x faster (fp32 / bf16)",
        target=">= 1.5x, curves within 5 %",
    )
    fig.ratio = median(times["fp32"]) / median(times["bf16"])
    curve_ok = bool(rel.mean() <= CURVE_TOLERANCE)
    fig.met = fig.ratio >= 1.5 and curve_ok
    fig.extra["curve"] = {
        "fp32": [round(v, 5) for v in curves["off"]],
        "bf16": [round(v, 5) for v in curves["bf16"]],
        "mean_rel_diff": round(float(rel.mean()), 5),
        "max_rel_diff": round(float(rel.max()), 5),
        "final_fp32": round(float(fp32[-5:].mean()), 5),
        "final_bf16": round(float(bf16[-5:].mean()), 5),
        "within_tolerance": curve_ok,
    }
    fig.extra["profile_top_self_cpu"] = profiles
    fig.seconds = time.perf_counter() - t_start
    return fig


if __name__ == "__main__":
    import json

    from common import SCALES

    f = run(SCALES["bench"]).to_dict()
    for name, table in f["extra"].pop("profile_top_self_cpu").items():
        print(name, table, sep="\n")
    print(json.dumps(f, indent=2))
