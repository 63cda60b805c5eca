"""Helpers shared by the tests of the benchmark scripts (not a test module).

The benchmark scripts are files, not a package: ``load_script`` imports one by
path. ``tiny_run`` trains a few steps on a 32-px synthetic set, enough for
the scripts to have a finished run folder to work on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run(root: Path, steps: int = 2) -> Path:
    """Write a 32-px synthetic set under ``root/data``, train ``steps`` steps into ``root/run``.

    Args:
        root: an empty folder.
        steps: training steps.

    Returns:
        The run folder (``best.pt``, ``config.yaml``, ``test_metrics.json``, ...).
    """
    from lpdseg.config import load_config
    from lpdseg.data.synthetic import write_dataset
    from lpdseg.engine.train import train

    data = root / "data"
    write_dataset(data, n_train=12, n_val=2, n_test=3, size=32, seed=0, progress=False)
    out = root / "run"
    cfg = load_config(
        "demo",
        [
            f"data.root={data}",
            "data.crop_size=32",
            "data.num_workers=0",
            "model.prototypes_per_class=2",
            "model.proj_hidden=16",
            "train.batch_size=4",
            f"train.max_steps={steps}",
            "train.threads=2",
            f"train.out_dir={out}",
            "eval.tta_scales=[1.0]",
            "eval.tta_flip=false",
        ],
    )
    train(cfg, progress=False, evaluate_test=True)
    return out
