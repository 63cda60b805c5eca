"""Figure 2: similarity loss in ``feature`` mode vs ``image`` mode (full training steps).

Both sides are :meth:`lpdseg.engine.train.Trainer.train_step` on the same batch
(MiT-B1, k = 10, backbone-EMA encoder, fp32). ``feature`` mode pools one dense
encoder map per image for all active prototypes; ``image`` mode embeds every
masked image (foreground and background of every active prototype) with the
encoder, with gradients through the masks -- its cost grows with the number of
active prototypes. The same run also times the *reference design* step used
by figure 5 (image mode with one encoder call per prototype + looped
diversity loss), so figures 2 and 5 share one interleaved measurement.

``make bench`` uses B = 2 (an image-mode step at B = 10 takes minutes on 2
cores: one such step measured 369 s); both sides scale linearly in B, so the
ratio is representative. ``--scale full`` uses the issue's B = 10.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import torch
from common import Figure, Scale, fake_batch, make_trainer, side, step_overrides, time_interleaved


def setting_for(scale: Scale) -> dict[str, Any]:
    """Sizes of the training-step comparison for a scale."""
    if scale.tiny:
        return {"backbone": "mit_b0", "B": 1, "size": 64, "k": 2}
    return {"backbone": "mit_b1", "B": 10 if scale.full else 2, "size": 224, "k": 10}


@contextlib.contextmanager
def reference_design() -> Iterator[None]:
    """Patch the trainer's losses to the public implementation's structure.

    Image-mode similarity with one encoder call per masked image (``image_chunk=1``)
    and the looped diversity loss of figure 1.
    """
    from bench_diversity import looped_diversity

    import lpdseg.engine.train as train_mod

    saved = train_mod.similarity_loss, train_mod.diversity_loss
    train_mod.similarity_loss = functools.partial(saved[0], image_chunk=1)
    train_mod.diversity_loss = looped_diversity
    try:
        yield
    finally:
        train_mod.similarity_loss, train_mod.diversity_loss = saved


def measure_steps(scale: Scale, with_reference: bool = True) -> dict[str, Any]:
    """Interleaved train_step timings of feature mode, image mode and the reference design."""
    s = setting_for(scale)
    common = step_overrides(s)
    images, labels = fake_batch(s["B"], s["size"])
    trainers = {
        "feature": make_trainer([*common, "loss.sim_mode=feature"]),
        "image": make_trainer([*common, "loss.sim_mode=image"]),
    }
    if with_reference:
        trainers["reference"] = make_trainer([*common, "loss.sim_mode=image"])
    # same seed -> same initial weights: count once, outside the timed steps
    n_active = _count_active(trainers["feature"], images, labels)

    def step_fn(name: str):
        trainer = trainers[name]

        def step() -> None:
            ctx = reference_design() if name == "reference" else contextlib.nullcontext()
            with ctx:
                trainer.train_step(images, labels)

        return step

    # image-mode steps are long and self-warming (dozens of encoder calls per step):
    # one warm-up step for the cheap feature side only keeps `make bench` short
    step_fn("feature")()
    times = time_interleaved(
        {name: step_fn(name) for name in trainers}, repeats=scale.heavy_repeats - 1 or 1, warmup=0
    )
    return {"setting": s, "times": times, "n_active": n_active}


@torch.no_grad()
def _count_active(trainer: Any, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Active prototypes of this batch (image mode embeds fg + bg of each)."""
    from lpdseg.losses import active_prototypes

    out = trainer.model(images, stages=(3,))
    return int(active_prototypes(out.proto_maps[3], out.logits[3], labels).sum())


def run(scale: Scale, context: dict | None = None) -> Figure:
    """Figure 2 (and the measurement figure 5 reuses, stored in ``context``)."""
    t_start = time.perf_counter()
    res = measure_steps(scale)
    if context is not None:
        context["similarity_steps"] = res
    times = res["times"]
    fig = Figure(
        id=2,
        title="similarity: feature vs image mode (train step)",
        setting={**res["setting"], "encoder": "backbone-ema", "amp": "fp32"},
        sides={
            "image": side(times["image"]),
            "feature": side(times["feature"]),
        },
        ratio_meaning="x faster",
        target=">= 5x (accuracy half: compare.py --methods LPD 'LPD image-sim')",
    )
    fig.ratio = fig.sides["image"]["median_s"] / fig.sides["feature"]["median_s"]
    fig.met = fig.ratio >= 5
    fig.notes.append(
        f"image mode embeds 2 x n_active masked images per step; n_active = {res['n_active']} "
        f"active prototypes in this batch at initialisation (it depends on training state)"
    )
    fig.seconds = time.perf_counter() - t_start
    return fig


if __name__ == "__main__":
    import json

    from common import SCALES

    print(json.dumps(run(SCALES["bench"]).to_dict(), indent=2))
