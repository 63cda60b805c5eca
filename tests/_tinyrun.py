"""A tiny trained run (a few steps at 32 px) shared by the inference tests.

Not a test module: imported by test_slide / test_predict / test_explain /
test_report. ``cached_tiny_run`` trains once per pytest session and setting
(in the session's base temp folder), so the modules share one run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lpdseg.config import load_config
from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.train import train


def tiny_run(root: Path, *extra: str, steps: int = 2, evaluate_test: bool = False) -> Path:
    """Write a 32-px synthetic set under ``root/data`` and train ``steps`` steps into ``root/run``.

    Args:
        root: an empty temp folder.
        extra: more config overrides (e.g. ``model.head=cam``).
        steps: training steps.
        evaluate_test: also score ``best.pt`` on the test split (test_metrics.json).

    Returns:
        The run folder (``best.pt``, ``last.pt``, ``config.yaml``, ...).
    """
    data = root / "data"
    if not (data / "training").is_dir():
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
            *extra,
        ],
    )
    train(cfg, progress=False, evaluate_test=evaluate_test)
    return out


def cached_tiny_run(
    factory: pytest.TempPathFactory, *extra: str, steps: int = 2, evaluate_test: bool = False
) -> Path:
    """``tiny_run`` once per session for each setting; later calls return the same folder."""
    key = hashlib.sha1(repr((extra, steps, evaluate_test)).encode()).hexdigest()[:10]
    root = factory.getbasetemp() / f"tinyrun-{key}"
    if not (root / "run" / "best.pt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tiny_run(root, *extra, steps=steps, evaluate_test=evaluate_test)
    return root / "run"
