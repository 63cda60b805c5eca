"""`lpdseg demo --quick`: the whole README demo pipeline in seconds."""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app


def _rows(report: str) -> dict[tuple[str, str], float]:
    """(method, gate) -> mIoU from the report's table."""
    rows = {}
    for m in re.finditer(r"^\| (LPD|CAM) \| (labels|classifier) \| ([\d.]+) \|", report, re.M):
        rows[(m.group(1), m.group(2))] = float(m.group(3))
    return rows


def test_quick_demo_trains_both_methods_and_writes_report_and_overlays(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    rows = _rows(report)
    assert set(rows) == {(m, g) for m in ("LPD", "CAM") for g in ("labels", "classifier")}
    # the table prints each run's own test metrics (summary.json), rounded to 2 decimals
    for (method, gate), value in rows.items():
        summary = json.loads((out / "runs" / method.lower() / "summary.json").read_text())
        assert value == round(100 * summary["test"][gate]["mIoU"], 2), (method, gate)
    assert "efficientnet_lite0 with imagenet weights" in report
    for run in ("lpd", "cam"):
        assert (out / "runs" / run / "best.pt").is_file()
    sheet = np.asarray(Image.open(out / "overlays.png"))
    # 8 quick test images, 6 panels shown: image | truth | LPD | CAM, each 96 px wide + gaps
    assert sheet.shape[1] == 4 * 96 + 3 * 3
    assert sheet.shape[0] > 6 * 96


def test_demo_preset_and_overrides_reach_both_runs(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out), "-q", "--preset", "demo"]
    res = CliRunner().invoke(app, [*args, "model.prototypes_per_class=3"])
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    assert "mit_b0 from scratch" in report
    assert "--preset demo model.prototypes_per_class=3" in report
    lpd_cfg = (out / "runs" / "lpd" / "config.yaml").read_text()
    cam_cfg = (out / "runs" / "cam" / "config.yaml").read_text()
    assert "prototypes_per_class: 3" in lpd_cfg and "prototypes_per_class: 3" in cam_cfg
    assert "head: cam" in cam_cfg and "head: lpd" in lpd_cfg


def test_demo_rejects_a_bad_override(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "-q", "model.nope=1"])
    assert res.exit_code != 0
    assert "nope" in res.output
