"""Crash safety: SIGKILL mid-training, SIGKILL mid-checkpoint-write, disk full.

The kill tests run real ``lpdseg train`` processes (tiny model, 32 px) and
kill them with SIGKILL, which no handler can intercept: what survives is only
what was already on disk.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import RUN_STEPS as STEPS
from conftest import lpdseg_cmd
from conftest import run_overrides as overrides

from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.checkpoint import load_checkpoint, save_checkpoint
from lpdseg.engine.train import Trainer, train
from lpdseg.io import WriteError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash_data")
    write_dataset(root, n_train=24, n_val=4, n_test=2, size=32, seed=3, progress=False)
    return root


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line]
    return max(steps, default=0)


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(data, tmp_path):
    from lpdseg.config import load_config

    straight = tmp_path / "straight"
    train(load_config("demo", overrides(data, straight)), progress=False, evaluate_test=False)

    run = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(2, STEPS - 2)  # a different step each run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        lpdseg_cmd("train", "demo", "-q", *overrides(data, run)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while steps_logged(run) < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run / "last.pt")["step"]
    assert 1 <= killed_at < STEPS, killed_at

    resumed = subprocess.run(
        lpdseg_cmd("train", "demo", "-q", *overrides(data, run), "--resume", str(run / "last.pt")),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["step"] == b["step"] == STEPS
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from lpdseg.engine.checkpoint import save_checkpoint
    print("writing", flush=True)
    # ~800 MB: the write takes long enough to be killed in the middle
    save_checkpoint(sys.argv[1], {"model": {"w": torch.ones(200_000_000)}, "config": {}})
    print("done", flush=True)
    """
)


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    old = {"model": {"w": torch.arange(5.0)}, "config": {"name": "old"}, "step": 3}
    save_checkpoint(path, old)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    deadline = time.monotonic() + 60
    # wait until the temporary file exists and holds part of the new checkpoint
    while time.monotonic() < deadline:
        tmps = list(tmp_path.glob(".last.pt.*.tmp"))
        if tmps and tmps[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.005)
    else:
        pytest.fail("the writer never started its temporary file")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3
    torch.testing.assert_close(ckpt["model"]["w"], torch.arange(5.0))


def test_disk_full_while_saving_keeps_earlier_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 1})

    def no_space(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(WriteError, match=r"best\.pt.*disk full"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob("*.tmp")), "the partial temporary file must be removed"


def test_disk_full_during_training_stops_clearly_and_keeps_last_good(data, tmp_path, monkeypatch):
    from lpdseg.config import load_config

    out = tmp_path / "run"
    cfg = load_config("demo", overrides(data, out))
    real_save = Trainer.save

    def save_until_step_4(self, path):
        if self.step >= 4:
            raise WriteError(f"could not write {path}: No space left on device (disk full)")
        real_save(self, path)

    monkeypatch.setattr(Trainer, "save", save_until_step_4)
    with pytest.raises(WriteError, match="disk full"):
        train(cfg, progress=False, evaluate_test=False)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 3


def test_atomic_writes_get_normal_permissions(tmp_path):
    """Temp files are 0600 (mkstemp); the written result follows the umask like open()."""
    from lpdseg.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "b.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
