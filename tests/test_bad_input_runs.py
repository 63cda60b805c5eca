"""Principles 1 and 4: finished work is never overwritten silently; interruptions keep the work.

1. ``train`` into a folder holding a run, ``predict`` / ``pseudo`` / ``patches`` into
   a folder holding earlier outputs: refused (exit 2, naming the folder and the fix)
   with the earlier files byte-identical, unless ``--resume`` / ``--overwrite``;
   ``--overwrite`` leaves none of the old run's files mixed with the new ones;
   ``predict`` names outputs uniquely when inputs share a stem.
2. SIGINT / SIGTERM during ``train``: ``last.pt`` saved at the current step, the
   resume command printed, exit 130 / 143; ``--resume`` continues to the same final
   weights as an uninterrupted run, with every step logged once; a resume that
   changes a key altering the run is refused naming the key and both values.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RUN_STEPS as STEPS
from conftest import lpdseg_cmd
from conftest import run_overrides as overrides
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.checkpoint import load_checkpoint
from lpdseg.engine.train import Trainer, train

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs_data")
    write_dataset(root, n_train=24, n_val=4, n_test=2, size=32, seed=3, progress=False)
    return root


@pytest.fixture
def tiny(overrides):
    """``tiny(root, out, steps, *extra)``: CLI overrides of a tiny 32-px run of ``steps`` steps."""

    def make(root: Path, out: Path, steps: int = 2, *extra: str) -> list[str]:
        return overrides(root, out, f"train.max_steps={steps}", *extra)  # later keys win

    return make


def step_records(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)]


# ---------------------------------------------------------------- 1. no silent overwrite
def test_train_into_a_finished_run_is_refused_and_overwrite_replaces_it_whole(
    data, tmp_path, snapshot, tiny
):
    runner = CliRunner()
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", "demo", *tiny(data, out, 3), "-q"])
    assert first.exit_code == 0, first.output
    (out / "val_metrics.json").write_text("{}\n")  # what `lpdseg eval` leaves in a run
    before = snapshot(out)

    again = runner.invoke(app, ["train", "demo", *tiny(data, out, 2), "-q"])
    assert again.exit_code == 2, again.output
    text = " ".join(again.output.split())
    assert str(out) in text and "already holds a run" in text
    assert f"--resume {out / 'last.pt'}" in text and "--overwrite" in text
    assert snapshot(out) == before, "a refused run must leave the old files byte-identical"

    both = runner.invoke(
        app, ["train", "demo", *tiny(data, out, 2), "--overwrite", "--resume", str(out / "last.pt")]
    )
    assert both.exit_code == 2 and "pass only one" in both.output
    assert snapshot(out) == before

    replaced = runner.invoke(app, ["train", "demo", *tiny(data, out, 2), "--overwrite", "-q"])
    assert replaced.exit_code == 0, replaced.output
    assert step_records(out) == [1, 2], "old metrics.jsonl lines left mixed with the new run"
    assert all(r.get("step", 0) <= 2 for r in map(json.loads, (out / "metrics.jsonl").open()))
    assert not (out / "val_metrics.json").exists(), "an old eval result outlived --overwrite"
    assert json.loads((out / "summary.json").read_text())["step"] == 2
    assert load_checkpoint(out / "best.pt")["step"] == 2


@pytest.fixture
def same_stem(tmp_path) -> Path:
    """``a.png`` and ``a.jpg`` (different pictures) and ``b.png`` in one folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((48, 32, 3), 230, np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "b.png")
    return folder


def test_predict_names_same_stem_inputs_apart_and_never_overwrites_silently(
    tiny_run_dir, same_stem, tmp_path, snapshot
):
    runner = CliRunner()
    out = tmp_path / "pred"
    args = ["predict", str(tiny_run_dir / "best.pt"), str(same_stem), "--out", str(out), "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "for 3 images" in res.output
    png, jpg = (
        np.asarray(Image.open(out / "a_png_mask.png")),
        np.asarray(Image.open(out / "a_jpg_mask.png")),
    )
    assert png.shape == (40, 40) and jpg.shape == (48, 32), (
        "one image's outputs replaced the other's"
    )
    assert (out / "b_mask.png").is_file() and not (out / "a_mask.png").exists()
    assert len(list(out.glob("*_mask.png"))) == 3
    before = snapshot(out)

    again = runner.invoke(app, args)  # the same command again: finished outputs exist
    assert again.exit_code == 2, again.output
    text = " ".join(again.output.split())
    assert str(out) in text and "a_png_mask.png" in text and "--overwrite" in text
    assert snapshot(out) == before

    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(other / "b.png")  # another b.png
    res = runner.invoke(
        app,
        ["predict", str(tiny_run_dir / "best.pt"), str(other / "b.png"), "--out", str(out), "-q"],
    )
    assert res.exit_code == 2 and "b_mask.png" in res.output
    assert snapshot(out) == before

    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "a_png_mask.png" in " ".join(runner.invoke(app, ["predict", "--help"]).output.split())


def test_pseudo_and_patches_refuse_an_earlier_output_folder(tiny_run_dir, tmp_path, snapshot):
    from lpdseg.data.patches import build_patch_dataset
    from lpdseg.errors import DataError
    from lpdseg.inference import write_pseudo_masks

    runner = CliRunner()
    out = tmp_path / "pseudo"
    args = ["pseudo", str(tiny_run_dir / "best.pt"), "--no-tta", "--out", str(out), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    before = snapshot(out)
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and str(out) in res.output and "--overwrite" in res.output
    assert snapshot(out) == before
    (out / "masks" / "stale.png").write_bytes(next(iter((out / "masks").iterdir())).read_bytes())
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert not (out / "masks" / "stale.png").exists(), "a mask of the old run outlived --overwrite"
    assert len(list((out / "masks").glob("*.png"))) == 12
    with pytest.raises(DataError, match="already holds pseudo masks"):
        write_pseudo_masks(tiny_run_dir / "best.pt", out, tta=False, progress=False)

    # patches: an earlier dataset is refused; --overwrite leaves no patch of the old rule
    src = tmp_path / "src"
    for d in ("img", "mask"):
        (src / d).mkdir(parents=True)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 1
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(src / "img" / "s.png")
    Image.fromarray(mask).save(src / "mask" / "s.png")
    ds = tmp_path / "ds"
    build_patch_dataset(
        src / "img", src / "mask", ds, fmt="wsss4luad", rule=_rule(16), progress=False
    )
    before = snapshot(ds)
    args = ["patches", str(src / "img"), str(src / "mask"), "--out", str(ds)]
    args += ["--size", "32", "--stride", "32", "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and str(ds) in res.output and "--overwrite" in res.output
    assert snapshot(ds) == before
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert len(list((ds / "train").glob("*.png"))) == 4  # 2 x 2 tiles of 32, none of the 16s left
    # a call killed half-way (patches.json still 'incomplete') is retried without --overwrite
    info = json.loads((ds / "patches.json").read_text())
    (ds / "patches.json").write_text(json.dumps({**info, "status": "incomplete"}))
    (ds / "train" / next(iter(sorted((ds / "train").glob("*.png")))).name).unlink()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(list((ds / "train").glob("*.png"))) == 4
    assert json.loads((ds / "patches.json").read_text()).get("status") != "incomplete"


def test_eval_does_not_replace_the_metrics_of_another_evaluation(tiny_run_dir, tmp_path, snapshot):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "test_metrics.json", "test_metrics.md"):
        shutil.copy(tiny_run_dir / name, run / name)  # a finished run and its test metrics
    other = tmp_path / "other"
    shutil.copytree(tiny_run_dir.parent / "data", other)  # same classes, another folder
    runner = CliRunner()
    ckpt = str(run / "best.pt")

    same = runner.invoke(app, ["eval", ckpt, "-q"])  # what training scored: same result
    assert same.exit_code == 0, same.output
    record = json.loads((run / "test_metrics.json").read_text())["evaluated"]
    assert record["data_root"] == str((tiny_run_dir.parent / "data").resolve())
    before = snapshot(run)

    for args, what in (
        (["--data", str(other)], "data_root"),
        (["--no-tta"], "tta"),
        (["eval.glass_background=true"], "eval_overrides"),
    ):
        res = runner.invoke(app, ["eval", ckpt, *args, "-q"])
        assert res.exit_code == 2, (args, res.output)
        text = " ".join(res.output.split())
        assert str(run / "test_metrics.json") in text and f"{what}:" in text, text
        assert "--out" in text and "--overwrite" in text
        assert snapshot(run) == before, args
    res = runner.invoke(app, ["eval", ckpt, "--data", str(other), "--overwrite", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "test_metrics.json").read_text())["evaluated"]["data_root"] == str(
        other.resolve()
    )


def _rule(size: int):
    from lpdseg.data.patches import PatchRule

    return PatchRule(size=size, stride=size)


# ---------------------------------------------------------------- 2. interruptions keep the work
SLOW_CLI = textwrap.dedent(
    """
    import sys, time
    from lpdseg.engine import train as t

    real = t.Trainer.train_step

    def slow(self, *args, **kwargs):  # same maths, more time: a signal lands mid-run
        time.sleep(0.4)
        return real(self, *args, **kwargs)

    t.Trainer.train_step = slow
    from lpdseg.cli import app

    sys.argv = ["lpdseg", *sys.argv[1:]]
    app()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_sigterm_saves_the_current_step_and_resume_equals_uninterrupted(data, tmp_path):
    straight = tmp_path / "straight"
    train(load_config("demo", overrides(data, straight)), progress=False, evaluate_test=False)

    run = tmp_path / "stopped"
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), "train", "demo", "-q", *overrides(data, run)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before the signal: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr)
    message = [ln for ln in stderr.splitlines() if ln.startswith("interrupted at step")]
    assert message, stderr
    step = int(message[0].split()[3].rstrip(";"))
    assert 1 <= step < STEPS
    assert f"--resume {run / 'last.pt'}" in message[0]
    assert load_checkpoint(run / "last.pt")["step"] == step, "last.pt is not at the step it stopped"
    assert max(step_records(run)) == step

    command = shlex.split(message[0].split("resume with: ", 1)[1])
    assert command[:2] == ["lpdseg", "train"]
    resumed = subprocess.run(
        lpdseg_cmd(*command[1:]), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["step"] == b["step"] == STEPS
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert step_records(run) == list(range(1, STEPS + 1)), "a step is logged twice or missing"


def _train_with_sigint(runner, args, monkeypatch, at_step: int, times: int):
    """``lpdseg train args`` with ``times`` SIGINTs (Ctrl-C) in the middle of step ``at_step``."""
    real = Trainer.train_step

    def interrupt(self, *a, **k):
        result = real(self, *a, **k)
        if self.step == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", interrupt)
    try:
        return runner.invoke(app, args)
    finally:
        monkeypatch.undo()


def test_a_second_sigint_stops_at_once_with_130_and_keeps_the_last_checkpoint(
    data, tmp_path, monkeypatch, tiny
):
    out = tmp_path / "run"
    args = ["train", "demo", *tiny(data, out, 6, "train.ckpt_every=1"), "-q"]
    # the first asks to stop at the step's end, the impatient second one stops at once
    res = _train_with_sigint(CliRunner(), args, monkeypatch, at_step=3, times=2)
    assert res.exit_code == 130, res.output
    assert "stopped at once" in res.output and "Aborted" not in res.output
    # step 3's checkpoint was not reached: the one of step 2 is there, whole
    assert load_checkpoint(out / "last.pt")["step"] == 2


def test_sigint_saves_and_resume_drops_replayed_records_and_refuses_changed_keys(
    data, tmp_path, monkeypatch, tiny
):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "demo", *tiny(data, out, 5, "train.ckpt_every=1"), "-q"]
    res = _train_with_sigint(runner, args, monkeypatch, at_step=2, times=1)
    assert res.exit_code == 130, res.output
    assert "interrupted at step 2; resume with: lpdseg train demo" in res.output
    assert f"--resume {out / 'last.pt'}" in res.output
    assert load_checkpoint(out / "last.pt")["step"] == 2
    last = (out / "last.pt").read_bytes()

    # what a kill after the checkpoint leaves: records past its step and a cut-short line
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')

    for change, key, old, new in (
        ("train.batch_size=2", "train.batch_size", "4", "2"),
        ("model.head=cam", "model.head", "'lpd'", "'cam'"),
        ("loss.sim_weight=0.5", "loss.sim_weight", "0.1", "0.5"),
    ):
        bad = runner.invoke(app, [*args, change, "--resume", str(out / "last.pt")])
        assert bad.exit_code == 2, (change, bad.output)
        text = " ".join(bad.output.split())
        assert f"{key}: {old} in the checkpoint, {new} now" in text, text
        assert "drop the override" in text and "train.max_steps" in text
        assert (out / "last.pt").read_bytes() == last
    moved = runner.invoke(
        app,
        ["train", "demo", *tiny(data, tmp_path / "elsewhere", 5), "--resume", str(out / "last.pt")],
    )
    assert moved.exit_code == 2 and f"train.out_dir={out}" in " ".join(moved.output.split())

    # allowed changes (a longer run, other thread count) resume; every step is logged once
    ok = runner.invoke(
        app, [*args, "train.max_steps=6", "train.threads=1", "--resume", str(out / "last.pt")]
    )
    assert ok.exit_code == 0, ok.output
    assert step_records(out) == [1, 2, 3, 4, 5, 6]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no cut-short line left
