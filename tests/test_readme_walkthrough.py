"""The README walkthrough runs as written.

The command lines between ``<!-- walkthrough:start -->`` and
``<!-- walkthrough:end -->`` in README.md are run one after another in a
temporary folder, each exactly as printed with only size overrides appended
(fewer and smaller synthetic patches, two training steps, no TTA), so the
whole walkthrough takes well under a minute on 2 CPU cores. Each must exit 0,
and the files the README says appear must be there.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"
MAX_README_LINES = 200

# Appended to a command line to make it tiny; later values win over the README's.
TINY_TRAIN = [
    "data.crop_size=32",
    "data.num_workers=0",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.threads=2",
    "eval.tta_scales=[1.0]",
    "eval.tta_flip=false",
]
TINY = {
    "synth": ["--n-train", "40", "--n-val", "2", "--n-test", "16", "--size", "32", "-q"],
    "train": [*TINY_TRAIN, "-q"],
    "bank": ["-q"],
    "eval": ["-q"],
    "pseudo": ["-q"],
    "predict": ["-q"],
    "explain": ["-q"],
    "report": ["-q"],
    "slide": ["-q"],
}

# Files the README's walkthrough says each step leaves behind.
EXPECTED = [
    "data/synth/training",
    "data/synth/test/img/000000.png",
    "data/synth/synthetic.json",
    "runs/lpd/best.pt",
    "runs/lpd/last.pt",
    "runs/lpd/config.yaml",
    "runs/lpd/metrics.jsonl",
    "runs/lpd/curves.png",
    "runs/lpd/test_metrics.md",
    "runs/lpd/test_metrics.json",
    "runs/cam/best.pt",
    "runs/cam/test_metrics.md",
    "runs/bank.pt",
    "runs/bank.png",
    "runs/pbip/best.pt",
    "runs/lpd_pseudo/manifest.csv",
    "runs/lpd_pseudo/masks",
    "runs/seg/best.pt",
    "predictions/000000_mask.png",
    "predictions/000000_overlay.png",
    "predictions/000000_areas.csv",
    "predictions/000000_areas.json",
    "explain/000000_prototypes.png",
    "runs/lpd/report.html",
    "slides/slide.tif",
    "slides/slide_flipped.tif",
    "slide_out/slide.geojson",
    "slide_out/slide_overlay.png",
    "slide_out/slide_classmap.png",
    "slide_out/slide_areas.csv",
    "slide_out/slide_areas.json",
    "slide_out/slide_summary.json",
    "slides_out/slides_summary.csv",
    "slides_out/slide/slide.geojson",
    "slides_out/slide_flipped/slide_flipped_summary.json",
]


def walkthrough_lines(text: str) -> list[str]:
    """The command lines of the fenced block between the walkthrough markers."""
    assert START in text and END in text, f"README.md lacks the {START} / {END} markers"
    block = text.split(START, 1)[1].split(END, 1)[0]
    fence = re.search(r"```[^\n]*\n(.*?)```", block, re.S)
    assert fence, "no fenced code block between the walkthrough markers"
    lines = [ln.strip() for ln in fence.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def to_argv(line: str) -> list[str]:
    """A README line -> argv with the venv's lpdseg / python and the tiny overrides appended."""
    words = shlex.split(line, comments=True)
    program, args = words[0], words[1:]
    if program == "python":
        return [sys.executable, *args]
    assert program == "lpdseg", f"unexpected program in the walkthrough: {line}"
    exe = Path(sys.executable).with_name("lpdseg")
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "lpdseg.cli"]
    return [*head, *args, *TINY.get(args[0], [])]


def test_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (max {MAX_README_LINES})"
    )


def test_walkthrough_train_runs_have_their_own_folders():
    text = README.read_text(encoding="utf-8")
    lines = walkthrough_lines(text)
    outs = [re.search(r"train\.out_dir=(\S+)", ln) for ln in lines if ln.startswith("lpdseg train")]
    assert outs and all(outs), "every `lpdseg train` line must set train.out_dir"
    folders = [m.group(1) for m in outs]
    assert len(set(folders)) == len(folders), f"two train lines share a run folder: {folders}"


@pytest.mark.timeout(600)
def test_walkthrough_runs_as_written(tmp_path):
    lines = walkthrough_lines(README.read_text(encoding="utf-8"))
    assert lines[0].startswith("lpdseg synth") and lines[-1].startswith("lpdseg slide")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", MPLBACKEND="Agg")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    took = []
    for line in lines:
        argv = to_argv(line)
        start = time.perf_counter()
        proc = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        took.append((round(time.perf_counter() - start, 1), line[:60]))
        assert proc.returncode == 0, (
            f"README line failed (exit {proc.returncode}):\n  {line}\nrun as: {shlex.join(argv)}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
    missing = [rel for rel in EXPECTED if not (tmp_path / rel).exists()]
    assert not missing, f"files the README promises are missing: {missing}; times {took}"
    assert any((tmp_path / "runs/lpd_pseudo/masks").iterdir()), "pseudo wrote no masks"
    n_test = len(list((tmp_path / "data/synth/test/img").glob("*.png")))
    assert len(list((tmp_path / "predictions").glob("*_mask.png"))) == n_test
