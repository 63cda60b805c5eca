"""Principles 3 and 5: messages say the true thing; every JSON file is strict JSON.

3. A file that is not a torch file is "not an lpdseg checkpoint (corrupt or not a
   torch file)", never "refused for safety" and never torch's advice to retry with
   ``weights_only=False``; "refused for safety" only for a real pickle importing
   Python objects (checkpoints, prototype banks, weights files alike). A write
   stopped by a file-size limit or a full disk says so, and the previous file is
   byte-identical. ``eval`` on a folder with only a val split suggests ``--split val``.
5. No NaN / Infinity in any JSON lpdseg writes (``null`` instead); a run without a
   val split says at the start that ``best.pt`` will be the last weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.engine.checkpoint import load_checkpoint, save_checkpoint
from lpdseg.errors import CheckpointError
from lpdseg.io import WriteError, append_jsonl, atomic_save_with, atomic_write_json
from lpdseg.models.bank import load_bank
from lpdseg.models.weights import read_state_dict

ADVICE = ("weights_only=False", "weights_only` set to `False", "Re-running", "trusted source")


def flat(text: str) -> str:
    return " ".join(text.split())


class NotAllowed:
    """A Python object a checkpoint may not hold."""


def strict(text: str):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def not_torch_files(tmp_path: Path, real: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {
        "random bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "pickle-looking random bytes": b"\x80\x02"
        + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"hello, not a checkpoint\n",
        "empty": b"",
        "truncated checkpoint": real.read_bytes()[: real.stat().st_size // 2],
    }
    out = {}
    for i, (kind, data) in enumerate(files.items()):
        out[kind] = tmp_path / f"file{i}.pt"
        out[kind].write_bytes(data)
    return out


def test_a_file_that_is_not_a_torch_file_is_called_that_not_unsafe(tiny_run_dir, tmp_path):
    runner = CliRunner()
    for kind, path in not_torch_files(tmp_path, tiny_run_dir / "best.pt").items():
        res = runner.invoke(app, ["eval", str(path), "--no-tta", "-q"])
        assert res.exit_code == 2, (kind, res.output)
        text = flat(res.output)
        assert f"{path} is not an lpdseg checkpoint (corrupt or not a torch file)" in text, kind
        assert "refused for safety" not in text, kind
        assert not any(a in text for a in ADVICE), (kind, text)
        for loader in (load_bank, read_state_dict):
            with pytest.raises(CheckpointError) as err:
                loader(path)
            message = str(err.value)
            assert str(path) in message and "corrupt or not a torch file" in message, kind
            assert "refused for safety" not in message and not any(a in message for a in ADVICE)


def test_only_a_pickle_of_python_objects_is_refused_for_safety(tiny_run_dir, tmp_path):
    ckpt = torch.load(tiny_run_dir / "best.pt", weights_only=True)
    ckpt["extra"] = NotAllowed()
    unsafe = tmp_path / "unsafe.pt"
    torch.save(ckpt, unsafe)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": NotAllowed()}, legacy, _use_new_zipfile_serialization=False)
    runner = CliRunner()
    for path in (unsafe, legacy):
        res = runner.invoke(app, ["predict", str(path), str(tmp_path), "-q"])
        assert res.exit_code == 2, res.output
        text = flat(res.output)
        assert f"{path} was refused for safety" in text and "NotAllowed" in text
        assert not any(a in text for a in ADVICE), text
        for loader in (load_bank, read_state_dict):
            with pytest.raises(CheckpointError, match="refused for safety.*NotAllowed") as err:
                loader(path)
            assert not any(a in str(err.value) for a in ADVICE)
    assert load_checkpoint(tiny_run_dir / "best.pt")["step"] >= 1  # real ones still load


FSIZE_WRITER = textwrap.dedent(
    """
    import resource, sys, torch
    from lpdseg.engine.checkpoint import save_checkpoint
    from lpdseg.io import WriteError

    path = sys.argv[1]
    save_checkpoint(path, {"model": {"w": torch.zeros(10)}, "config": {}, "step": 1})
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        save_checkpoint(path, {"model": {"w": torch.ones(1_000_000)}, "config": {}, "step": 2})
    except WriteError as exc:
        print("WriteError:", exc)
        sys.exit(3)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE")
def test_checkpoint_write_over_the_file_size_limit_says_so_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "run" / "last.pt"
    script = tmp_path / "writer.py"
    script.write_text(FSIZE_WRITER)
    res = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 3, (res.stdout, res.stderr)
    text = flat(res.stdout)
    assert f"could not write {path}: file too large / disk full" in text
    assert "the previous checkpoints are intact" in text
    assert "enforce fail" not in text and "unexpected pos" not in text
    assert load_checkpoint(path)["step"] == 1
    assert not list(path.parent.glob("*.tmp")), "the partial temporary file must be removed"


TORCH_SHORT_WRITE = RuntimeError(
    "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
)


@pytest.mark.parametrize(
    "error",
    [TORCH_SHORT_WRITE, OSError(27, "File too large"), OSError(28, "No space left on device")],
    ids=["torch-unexpected-pos", "EFBIG", "ENOSPC"],
)
def test_a_short_checkpoint_write_says_file_too_large_or_disk_full(tmp_path, monkeypatch, error):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 1})
    before = path.read_bytes()

    def short(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise error

    monkeypatch.setattr(torch, "save", short)
    with pytest.raises(WriteError) as err:
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}, "step": 2})
    monkeypatch.undo()
    message = str(err.value)
    assert f"could not write {path}: file too large / disk full" in message
    assert "the previous checkpoints are intact" in message and "enforce fail" not in message
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_training_stopped_by_a_full_disk_names_the_file_and_keeps_the_previous(
    tmp_path, monkeypatch, overrides
):
    from lpdseg.data.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, n_train=8, n_val=0, n_test=0, size=32, seed=0, progress=False)
    shutil.rmtree(data / "val", ignore_errors=True)
    shutil.rmtree(data / "test", ignore_errors=True)
    out = tmp_path / "run"
    real = torch.save
    before: dict[str, bytes] = {}

    def fail_from_step_2(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step", 0) >= 2:
            before.setdefault("last", (out / "last.pt").read_bytes())
            handle.write(b"partial")
            raise TORCH_SHORT_WRITE
        return real(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_from_step_2)
    res = CliRunner().invoke(
        app,
        [
            "train",
            "demo",
            *overrides(data, out, "train.max_steps=3", "train.ckpt_every=1"),
            "-q",
        ],
    )
    monkeypatch.undo()
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert f"could not write {out / 'last.pt'}: file too large / disk full" in text, text
    assert "the previous checkpoints are intact" in text and "Traceback" not in text
    assert (out / "last.pt").read_bytes() == before["last"], "the previous last.pt changed"
    assert load_checkpoint(out / "last.pt")["step"] == 1
    assert not list(out.glob("*.tmp"))


def test_eval_of_a_folder_with_only_img_and_mask_suggests_split_val(tiny_run_dir, tmp_path):
    data = tmp_path / "flat"
    shutil.copytree(tiny_run_dir.parent / "data" / "val" / "img", data / "img")
    shutil.copytree(tiny_run_dir.parent / "data" / "val" / "mask", data / "mask")
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tiny_run_dir / "best.pt"), "--data", str(data), "-q"])
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert f"{data} has no test split" in text and "use --split val" in text
    res = runner.invoke(
        app,
        ["eval", str(tiny_run_dir / "best.pt"), "--data", str(data), "--split", "val", "--no-tta"]
        + ["--out", str(tmp_path / "m"), "-q"],
    )
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- 5. strict JSON
def test_json_writers_turn_nan_and_infinity_into_null(tmp_path):
    obj = {
        "nan": float("nan"),
        "inf": [float("inf"), -math.inf, 1.5],
        "np": np.array([1.0, np.nan], np.float32),
        "np_scalar": np.float32("nan"),
        "tensor": torch.tensor([math.inf, 2.0]),
        "nested": {"t": (float("nan"), 3)},
    }
    atomic_write_json(tmp_path / "a.json", obj)
    got = strict((tmp_path / "a.json").read_text())
    assert got == {
        "nan": None,
        "inf": [None, None, 1.5],
        "np": [1.0, None],
        "np_scalar": None,
        "tensor": [None, 2.0],
        "nested": {"t": [None, 3]},
    }
    append_jsonl(tmp_path / "m.jsonl", {"step": 1, "loss": float("nan")})
    append_jsonl(tmp_path / "m.jsonl", {"step": 2, "loss": float("-inf")})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [strict(x)["loss"] for x in lines] == [None, None]


def test_a_run_without_val_writes_strict_json_and_says_best_is_the_last(
    tmp_path, monkeypatch, caplog, overrides
):
    import logging

    from lpdseg.config import load_config
    from lpdseg.data.synthetic import write_dataset
    from lpdseg.engine.train import Trainer, train

    data = tmp_path / "data"
    write_dataset(data, n_train=8, n_val=0, n_test=0, size=32, seed=0, progress=False)
    shutil.rmtree(data / "val", ignore_errors=True)
    shutil.rmtree(data / "test", ignore_errors=True)
    out = tmp_path / "run"
    real = Trainer.compute_loss

    def nan_at_first_step(self, images, labels):  # one non-finite loss: logged as null
        loss, terms = real(self, images, labels)
        return (loss * float("nan"), terms) if self.step == 0 else (loss, terms)

    monkeypatch.setattr(Trainer, "compute_loss", nan_at_first_step)
    cfg = load_config(
        "demo",
        overrides(data, out),
    )
    with caplog.at_level(logging.WARNING, logger="lpdseg.engine.train"):
        summary = train(cfg, progress=False)
    assert "no val split" in caplog.text and "best.pt will be the last weights" in caplog.text
    assert summary["best_val_mIoU"] is None
    saved = strict((out / "summary.json").read_text())
    assert saved["best_val_mIoU"] is None and "last_step" in saved["best_by"]
    records = [strict(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] is None and records[0]["finite"] is False
    assert load_checkpoint(out / "best.pt")["step"] == load_checkpoint(out / "last.pt")["step"]
    for path in out.rglob("*.json"):
        strict(path.read_text())


def test_atomic_save_with_keeps_a_non_storage_error_as_it_is(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def broken(handle):
        raise RuntimeError("a bug in the writer")

    with pytest.raises(RuntimeError, match="a bug in the writer"):
        atomic_save_with(path, broken)
    assert path.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp"))

    def no_space(handle):
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="x.bin: file too large / disk full"):
        atomic_save_with(path, no_space)
    assert path.read_bytes() == b"old"
    save_checkpoint(tmp_path / "ok.pt", {"model": {}, "config": {}, "step": 0})
    assert os.path.getsize(tmp_path / "ok.pt") > 0
