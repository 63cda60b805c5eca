"""Figure 6: data pipeline throughput vs training consumption.

- ``generator``: :func:`lpdseg.data.synthetic.generate_patch` patches/s in one
  process (= per worker), at 224 px;
- ``loading``: one DataLoader worker's work per sample -- PNG decode +
  training augmentation + normalisation (:class:`SeededWeakDataset`) -- on a
  synthetic BCSS-WSSS folder written to a temporary directory, patches/s;
- ``consumption``: images/s a training step eats, for the default training
  setting (MiT-B1, 224 px, B = 10; figure 3's LPD step when available) and
  for the demo (MiT-B0, 96 px, B = 16, k = 4).

Headroom = workers x loading patches/s / consumption images/s with the
worker count of each setting (``DataConfig`` default 2; demo preset 1).
Loading is not the bottleneck when the headroom is >= 1.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import Figure, Scale, fake_batch, make_trainer, median, side, time_interleaved


def loading_fn(root: Path, crop: int):
    """A callable loading every training sample of ``root`` once; returns the sample count."""
    from lpdseg.config import load_config
    from lpdseg.data.loaders import SeededWeakDataset, augment_config, resolve_data
    from lpdseg.data.transforms import TrainTransform

    cfg = load_config("demo", [f"data.root={root}", f"data.crop_size={crop}"])
    bundle = resolve_data(cfg)
    dataset = SeededWeakDataset(bundle.train, TrainTransform(augment_config(cfg)), 0, 0)

    def load_all() -> None:
        for i in range(len(dataset)):
            dataset[i]

    return load_all, len(dataset)


def run(scale: Scale, context: dict | None = None) -> Figure:
    """Measure generator, loading and consumption rates and return the figure."""
    from lpdseg.config import DataConfig
    from lpdseg.data.synthetic import generate_patch, write_dataset

    t_start = time.perf_counter()
    n_gen, n_files = (2, 4) if scale.tiny else (12, 24)
    size_main, size_demo = (64, 64) if scale.tiny else (224, 96)
    counter = iter(range(10**9))

    def gen() -> None:
        for _ in range(n_gen):
            generate_patch(next(counter), size_main)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        write_dataset(Path(tmp) / "main", n_files, 0, 0, size=size_main, progress=False)
        write_dataset(Path(tmp) / "demo", n_files, 0, 0, size=size_demo, progress=False)
        load_main, n_main = loading_fn(Path(tmp) / "main", size_main)
        load_demo, n_demo = loading_fn(Path(tmp) / "demo", size_demo)
        times = time_interleaved(
            {"generator": gen, "loading": load_main, "loading_demo": load_demo},
            repeats=scale.repeats,
            warmup=scale.warmup,
        )
    rate = {
        "generator": n_gen / median(times["generator"]),
        "loading": n_main / median(times["loading"]),
        "loading_demo": n_demo / median(times["loading_demo"]),
    }
    # consumption: the default setting's LPD step (figure 3) and the demo's step
    main_step = (context or {}).get("lpd_step")
    if scale.tiny:
        demo_over = ["model.backbone=mit_b0", "model.prototypes_per_class=2"]
        demo_b, demo_size = 2, 64
    else:
        demo_over = ["model.backbone=mit_b0", "model.prototypes_per_class=4"]
        demo_b, demo_size = 16, 96
    demo_trainer = make_trainer(
        [*demo_over, f"data.crop_size={demo_size}", f"train.batch_size={demo_b}"]
    )
    demo_batch = fake_batch(demo_b, demo_size)
    steps = {"demo": lambda: demo_trainer.train_step(*demo_batch)}
    if main_step is None:
        b, size = (2, 64) if scale.tiny else (10, 224)
        over = ["model.backbone=mit_b0", "model.prototypes_per_class=2"] if scale.tiny else []
        main_trainer = make_trainer([*over, f"data.crop_size={size}", f"train.batch_size={b}"])
        main_batch = fake_batch(b, size)
        steps["main"] = lambda: main_trainer.train_step(*main_batch)
    step_times = time_interleaved(steps, repeats=scale.heavy_repeats, warmup=scale.warmup)
    if main_step is None:
        main_step = {"B": b, "size": size, "median_s": median(step_times["main"])}
    consume_main = main_step["B"] / main_step["median_s"]
    consume_demo = demo_b / median(step_times["demo"])
    workers_main = DataConfig().num_workers
    workers_demo = 1  # demo preset
    headroom_main = workers_main * rate["loading"] / consume_main
    headroom_demo = workers_demo * rate["loading_demo"] / consume_demo
    fig = Figure(
        id=6,
        title="data pipeline vs training consumption",
        setting={
            "patch_px": size_main,
            "demo_px": size_demo,
            "workers_default": workers_main,
            "workers_demo": workers_demo,
        },
        sides={
            "generator": side(times["generator"], patches_per_s=round(rate["generator"], 2)),
            "loading/worker": side(times["loading"], patches_per_s=round(rate["loading"], 2)),
            "loading/worker (demo px)": side(
                times["loading_demo"], patches_per_s=round(rate["loading_demo"], 2)
            ),
            "training consumes": {
                "median_s": main_step["median_s"],
                "images_per_s": round(consume_main, 2),
                "display": f"{consume_main:.2f} img/s",
            },
            "demo consumes": side(step_times["demo"], images_per_s=round(consume_demo, 2)),
        },
        ratio_meaning="x headroom (min of default, demo)",
        target=">= 1x (loading never the bottleneck)",
    )
    for key in ("generator", "loading/worker", "loading/worker (demo px)"):
        fig.sides[key]["display"] = f"{fig.sides[key]['patches_per_s']:.1f} patch/s"
    fig.sides["demo consumes"]["display"] = f"{consume_demo:.1f} img/s"
    fig.ratio = min(headroom_main, headroom_demo)
    fig.met = fig.ratio >= 1
    fig.extra["headroom"] = {
        "default": round(headroom_main, 2),
        "demo": round(headroom_demo, 2),
    }
    fig.notes.append(
        "per-worker rates are measured in one process; on 2 cores workers share the CPU "
        "with the training step, so the headroom is an upper bound there"
    )
    fig.seconds = time.perf_counter() - t_start
    return fig


if __name__ == "__main__":
    import json

    from common import SCALES

    print(json.dumps(run(SCALES["bench"]).to_dict(), indent=2))
