"""`lpdseg report`: one self-contained HTML page with embedded pictures.

Rendering it in headless Chromium (benchmarks/render_report.py) is tested in
benchmarks/tests/ (`make bench-test`).
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.errors import DataError
from lpdseg.report import confusion_png, write_report

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory) -> Path:
    return write_report(
        run_dir, tmp_path_factory.mktemp("report") / "report.html", n_images=2, progress=False
    )


def embedded_pngs(page: str) -> list[np.ndarray]:
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u)))) for u in uris]


def test_report_is_one_self_contained_file(report):
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # no external references of any kind
    assert not re.search(r"https?://", page)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,"), src[:40]
    pngs = embedded_pngs(page)
    # curves + 2 confusion matrices (pseudo, predict) + 2 overlays + 2 heatmaps
    assert len(pngs) == 7
    assert all(p.ndim == 3 and p.shape[0] > 50 and p.shape[1] > 50 for p in pngs)
    assert all(p.std() > 0 for p in pngs)  # not blank
    # sections and content from the run
    for heading in ("Training curves", "Test metrics", "Confusion matrices", "Prototype heatmaps"):
        assert heading in page
    assert "prototypes_per_class: 2" in page  # the resolved config
    assert "mIoU" in page and "TUM" in page and "classifier-gated" in page


def test_confusion_plot_and_errors(tmp_path):
    png = confusion_png([[5, 1, 0], [0, 3, 3], [0, 0, 0]], ["A", "B", "bg"], "t")
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert img.shape[0] > 100 and img.std() > 0
    with pytest.raises(ValueError, match="labels"):
        confusion_png([[1, 0], [0, 1]], ["A", "B", "bg"], "t")
    with pytest.raises(DataError, match="not a run folder"):
        write_report(tmp_path)


def test_report_without_test_metrics_says_what_to_run(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("test_metrics.*"))
    page = write_report(copy, n_images=1, progress=False).read_text()
    assert "lpdseg eval" in page
    assert (copy / "report.html").is_file()


def test_cli_report(run_dir, tmp_path):
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out), "--images", "1"])
    assert result.exit_code == 0, result.output
    assert len(embedded_pngs(out.read_text())) == 5  # curves, 2 confusions, 1 overlay, 1 heatmap
