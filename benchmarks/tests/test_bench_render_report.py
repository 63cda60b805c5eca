"""benchmarks/render_report.py: an `lpdseg report` page renders in headless Chromium.

Moved from tests/test_report.py (tests/ does not import benchmarks/). Skips
when no Chromium is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import load_script, tiny_run
from PIL import Image

torch.set_num_threads(2)


def test_report_renders_in_headless_chromium(tmp_path_factory, tmp_path):
    render = load_script("render_report")
    if render.find_chromium() is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    from lpdseg.report import write_report

    run_dir = tiny_run(tmp_path_factory.mktemp("tinyrun"))
    report = write_report(run_dir, tmp_path / "report.html", n_images=2, progress=False)
    png = render.render(report, tmp_path / "shot.png", width=1000, height=2400)
    shot = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    assert shot.shape[:2] == (2400, 1000)
    # the page drew pictures: many non-white pixels, several distinct colours
    assert (shot.sum(-1) < 600).mean() > 0.05
    assert len(np.unique(shot.reshape(-1, 3)[::97], axis=0)) > 50
