"""Shared helpers of the benchmark suite: timing, machine info, trainers, results.

Timing rules (the machines are shared and noisy): every figure compares two
or more *sides* measured in the same process, interleaved (side A, side B,
side A, ... with the order reversed on every other repeat), after warm-up
calls, and reports the median of the repeats. Figures are ratios of medians;
absolute seconds are recorded but never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"  # every result file of the suite lives here
RESULTS = RESULTS_DIR / "results.json"
if str(ROOT) not in sys.path:  # so ``import wsi_memory`` works from any cwd
    sys.path.insert(0, str(ROOT))

CLASS_NAMES = ("TUM", "STR", "LYM", "NEC")


@dataclass(frozen=True)
class Scale:
    """How big a run is: ``tiny`` (smoke test), ``bench`` (``make bench``), ``full`` (issue sizes).

    Attributes:
        name: the profile name.
        repeats: timed repeats per side for the cheap figures.
        heavy_repeats: timed repeats for training-step figures.
        warmup: untimed calls per side before timing.
    """

    name: str = "bench"
    repeats: int = 5
    heavy_repeats: int = 3
    warmup: int = 1

    @property
    def tiny(self) -> bool:
        return self.name == "tiny"

    @property
    def full(self) -> bool:
        return self.name == "full"


SCALES = {
    "tiny": Scale("tiny", repeats=2, heavy_repeats=1, warmup=1),
    "bench": Scale("bench", repeats=5, heavy_repeats=3, warmup=1),
    "full": Scale("full", repeats=7, heavy_repeats=5, warmup=2),
}


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def time_interleaved(
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time each side ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    The order of the sides is reversed on every other repeat so that a slow
    period of the machine hits both sides alike.

    Args:
        sides: name -> zero-argument callable (one unit of work).
        repeats: timed calls per side.
        warmup: untimed calls per side before timing (interleaved too).
        sync: called after each call before the clock stops (e.g. CUDA sync).

    Returns:
        name -> list of seconds, one per repeat.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            sides[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times


def side(times: Sequence[float], **extra: Any) -> dict[str, Any]:
    """One side of a figure: median and all repeats (seconds), plus any extra fields."""
    return {"median_s": median(times), "times_s": [round(t, 5) for t in times], **extra}


@dataclass
class Figure:
    """One benchmark figure: what was compared, how, and whether the target is met.

    Attributes:
        id: figure number (1-8 as in the issue).
        title: short name.
        setting: the sizes and options used (recorded so the run is reproducible).
        sides: side name -> ``side(...)`` dicts.
        ratio: the headline ratio (e.g. slow median / fast median); ``None`` if none.
        ratio_meaning: what the ratio is, in words.
        target: the target, in words (e.g. ``>= 50x``).
        met: whether the target is met; ``None`` when the figure has no target.
        notes: free text (profile summaries, caveats).
        extra: anything else worth keeping (profile tables, curves).
    """

    id: int
    title: str
    setting: dict[str, Any] = field(default_factory=dict)
    sides: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratio: float | None = None
    ratio_meaning: str = ""
    target: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "setting": self.setting,
            "sides": self.sides,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "ratio_meaning": self.ratio_meaning,
            "target": self.target,
            "met": self.met,
            "notes": self.notes,
            "extra": self.extra,
            "seconds": round(self.seconds, 1),
        }


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads, memory, versions, load."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "mkldnn_bf16_supported": bool(getattr(torch.backends.mkldnn, "is_available", bool)())
        and _cpu_has_flag("avx512_bf16", "amx_bf16"),
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _cpu_has_flag(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return any(f in have for f in flags)
    return False


def vm_hwm_mib() -> float:
    """Peak resident memory of this process so far (MiB, ``VmHWM``; Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


# ----------------------------------------------------------------------------- trainers


def make_config(overrides: Sequence[str] = ()) -> Any:
    """The ``demo`` preset with benchmark defaults (MiT-B1, k=10, 224 px, B=10) + overrides."""
    from lpdseg.config import load_config

    base = [
        "model.backbone=mit_b1",
        "model.prototypes_per_class=10",
        "model.drop_path=0.0",
        "data.crop_size=224",
        "train.batch_size=10",
        "train.amp=off",
        "loss.div_warmup=0",  # the diversity term at full weight from step 0
    ]
    return load_config("demo", [*base, *overrides])


def step_setting(scale: Scale) -> dict[str, Any]:
    """The training-step size the issue names (MiT-B1, B = 10, 224 px, k = 10); tiny for smoke runs."""
    if scale.tiny:
        return {"backbone": "mit_b0", "B": 2, "size": 64, "k": 2}
    return {"backbone": "mit_b1", "B": 10, "size": 224, "k": 10}


def step_overrides(setting: dict[str, Any]) -> list[str]:
    """Config overrides that build a trainer of a ``step_setting``-style size."""
    return [
        f"model.backbone={setting['backbone']}",
        f"model.prototypes_per_class={setting['k']}",
        f"data.crop_size={setting['size']}",
        f"train.batch_size={setting['B']}",
    ]


def make_trainer(overrides: Sequence[str] = (), seed: int = 0, total_steps: int = 1000) -> Any:
    """A :class:`lpdseg.engine.train.Trainer` on CPU without a dataset on disk."""
    from lpdseg.data.loaders import DataBundle
    from lpdseg.engine.train import Trainer

    torch.manual_seed(seed)
    cfg = make_config(overrides)
    bundle = DataBundle(
        Path("."),
        "bcss_wsss",
        CLASS_NAMES,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        [(0, 0, 0)] * (len(CLASS_NAMES) + 1),
    )
    trainer = Trainer(cfg, bundle, torch.device("cpu"))
    trainer.make_scheduler(total_steps)
    return trainer


def fake_batch(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised random images and image-level labels with 1-3 classes per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = (torch.rand(batch, len(CLASS_NAMES), generator=g) < 0.4).float()
    labels[torch.arange(batch), torch.randint(len(CLASS_NAMES), (batch,), generator=g)] = 1.0
    return images, labels


def profile_top(fn: Callable[[], Any], rows: int = 12, sort_by: str = "self_cpu_time_total") -> str:
    """Run ``fn`` once under ``torch.profiler`` and return its top-``rows`` operator table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=40)


# ----------------------------------------------------------------------------- output


def fmt_s(seconds: float | None) -> str:
    """Seconds in a readable unit."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def markdown_table(figures: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table: one row per figure."""
    lines = [
        "| # | figure | sides (median) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        sides = "; ".join(
            f"{name}: {s['display'] if 'display' in s else fmt_s(s.get('median_s'))}"
            for name, s in f.get("sides", {}).items()
        )
        ratio = "-" if f.get("ratio") is None else f"{f['ratio']:.2f}"
        met = {True: "yes", False: "**no**", None: "-"}[f.get("met")]
        if f.get("error"):
            sides, met = f"error: {f['error']}", "error"
        lines.append(
            f"| {f['id']} | {f['title']} | {sides} | {ratio} {f.get('ratio_meaning', '')} "
            f"| {f.get('target', '')} | {met} |"
        )
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
