"""End-to-end training on a tiny synthetic set: learning, exact resume, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import _tiny_overrides
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.data.mixing import apply_cutmix, cutmix_boxes, cutmix_generator
from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.checkpoint import load_checkpoint
from lpdseg.engine.train import Trainer, lr_factor, train
from lpdseg.errors import DataError, TrainingError
from lpdseg.inference import load_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n_train=24, n_val=4, n_test=4, size=32, seed=0, progress=False)
    return root


def tiny_cfg(root: Path, out: Path, *extra: str):
    return load_config("demo", _tiny_overrides(root, out, "train.max_steps=8", *extra))


def test_lr_schedule_warmup_then_poly():
    total = 100
    f = [lr_factor(s, total, 0.1, 1.0) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] < 0.02


@pytest.mark.parametrize("extra", [[], ["data.cutmix=0.5"]], ids=["plain", "cutmix"])
def test_resume_equals_uninterrupted_run(tiny_data, tmp_path, extra):
    straight = train(
        tiny_cfg(tiny_data, tmp_path / "a", *extra), progress=False, evaluate_test=False
    )
    assert straight["step"] == 8
    part = train(
        tiny_cfg(tiny_data, tmp_path / "b", *extra),
        progress=False,
        stop_after=3,
        evaluate_test=False,
    )
    assert part["stopped"] and part["step"] == 3
    resumed = train(
        tiny_cfg(tiny_data, tmp_path / "b", *extra),
        progress=False,
        resume=tmp_path / "b" / "last.pt",
        evaluate_test=False,
    )
    assert resumed["step"] == 8
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    # the EMA encoder, optimiser moments and schedule follow too
    for key, value in a["encoder"].items():
        assert torch.allclose(value.float(), b["encoder"][key].float(), atol=1e-6), key
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def _scripted_validation(monkeypatch, scores: list[float]) -> list[int]:
    """Validation returns ``scores`` in turn; the returned list collects the calls."""
    calls: list[int] = []

    def fake_evaluate(*args, **kwargs):
        calls.append(len(calls))
        return {"mIoU": scores[len(calls) - 1], "mDice": 0.0, "bIoU": 0.0}

    monkeypatch.setattr("lpdseg.engine.train.evaluate", fake_evaluate)
    return calls


@pytest.mark.parametrize("interrupt_at", [None, 15])
def test_patience_stops_early_and_keeps_the_best_validated_weights(
    tiny_data, tmp_path, monkeypatch, interrupt_at
):
    # 24 images / batch 4 = 6 steps an epoch; val mIoU per epoch as scripted: best at
    # epoch 1 (step 12), then two worse ones -> with patience 2 the run ends at step 24
    calls = _scripted_validation(monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.7])
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, "train.max_steps=30", "train.patience=2")
    if interrupt_at is not None:  # the count of stale validations survives a resume
        train(cfg, progress=False, evaluate_test=False, stop_after=interrupt_at)
        summary = train(cfg, progress=False, evaluate_test=False, resume=out / "last.pt")
    else:
        summary = train(cfg, progress=False, evaluate_test=False)
    assert len(calls) == 4
    assert summary["step"] == 24 and summary["early_stopped"] is True
    assert summary["best_val_mIoU"] == pytest.approx(0.6)
    assert load_checkpoint(out / "best.pt")["step"] == 12
    assert load_checkpoint(out / "last.pt")["step"] == 24
    # without patience the same scores train every step
    calls.clear()
    full = train(
        tiny_cfg(tiny_data, tmp_path / "full", "train.max_steps=30"),
        progress=False,
        evaluate_test=False,
    )
    assert full["step"] == 30 and full["early_stopped"] is False and len(calls) == 5
    assert load_checkpoint(tmp_path / "full" / "best.pt")["step"] == 30


def test_lpd_training_lowers_the_loss_and_writes_the_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_cfg(tiny_data, out, "train.max_steps=30", "train.lr=1e-3"), progress=False)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "cls" in r]
    first = sum(r["cls"] for r in steps[:5]) / 5
    last = sum(r["cls"] for r in steps[-5:]) / 5
    assert last < first, (first, last)
    assert all("sim" in r and "div" in r for r in steps)
    assert any("val_mIoU" in r for r in recs)
    for name in (
        "config.yaml",
        "last.pt",
        "best.pt",
        "curves.png",
        "summary.json",
        "test_metrics.json",
        "test_metrics.md",
    ):
        assert (out / name).is_file(), name
    # the test metrics of summary.json are those of best.pt, scored again from the file
    from lpdseg.inference import evaluate_checkpoint

    again = evaluate_checkpoint(out / "best.pt", progress=False)
    for gate in ("labels", "classifier"):
        assert summary["test"][gate]["confusion"] == again[gate]["confusion"], gate
        assert summary["test"][gate]["mIoU"] == pytest.approx(again[gate]["mIoU"])
    model, cfg = load_model(out / "best.pt")
    assert cfg.data.class_names == ["TUM", "STR", "LYM", "NEC"]
    assert model.head.prototypes.shape[:2] == (4, 2)


def test_cam_baseline_trains(tiny_data, tmp_path):
    out = tmp_path / "cam"
    summary = train(
        tiny_cfg(tiny_data, out, "model.head=cam", "train.max_steps=3", "train.lr=1e-3"),
        progress=False,
    )
    assert summary["step"] == 3 and "test" in summary
    # a CAM model: a 1x1-conv classifier per stage, no prototypes, and it learned something
    from lpdseg.models.prototypes import CamHead

    model, cfg = load_model(out / "best.pt")
    assert isinstance(model.head, CamHead) and not hasattr(model.head, "prototypes")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "cls" in r]
    assert len(steps) == 3 and "sim" not in steps[0] and "div" not in steps[0]
    first = torch.load(out / "last.pt", weights_only=True)["model"]
    fresh = build_cam_like(cfg)
    changed = [k for k in first if k.startswith("head.") and not torch.equal(first[k], fresh[k])]
    assert changed, "the CAM classifiers did not move"


def build_cam_like(cfg):
    """A freshly initialised model of the same config (seeded as training seeds it)."""
    from lpdseg.models.lpd import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg, len(cfg.data.class_names), load_weights=False).state_dict()


def test_nonfinite_losses_stop_with_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_cfg(
        tiny_data,
        tmp_path / "nan",
        "train.max_nonfinite=3",
        "train.ckpt_every=2",
        "train.max_steps=20",
    )
    real = Trainer.compute_loss

    def flaky(self, images, labels):
        loss, terms = real(self, images, labels)
        if self.step >= 4:
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(Trainer, "compute_loss", flaky)
    with pytest.raises(
        TrainingError,
        match=r"3 non-finite losses in a row.*Last good checkpoint: .*(last|best)\.pt",
    ):
        train(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["step"] == 4  # the last good one, still loadable


def test_bad_label_string_names_the_file(tiny_data, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(tiny_data, root)
    victim = sorted((root / "training").glob("*.png"))[0]
    victim.rename(victim.with_name("000999+bad[10x1].png"))
    with pytest.raises(DataError, match=r"000999\+bad\[10x1\]\.png"):
        train(tiny_cfg(root, tmp_path / "r"), progress=False)


def test_cli_train_eval_predict(tiny_data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app,
        [
            "train",
            "demo",
            f"data.root={tiny_data}",
            "data.crop_size=32",
            "data.num_workers=0",
            "model.prototypes_per_class=2",
            "train.batch_size=4",
            "train.max_steps=2",
            f"train.out_dir={out}",
            "eval.tta_scales=[1.0]",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "mIoU" in res.output
    res = runner.invoke(
        app, ["eval", str(out / "best.pt"), "--split", "val", "--no-tta", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert "mIoU" in res.output and (out / "val_metrics.json").is_file()
    pred = tmp_path / "pred"
    res = runner.invoke(
        app,
        [
            "predict",
            str(out / "best.pt"),
            str(tiny_data / "test" / "img"),
            "--out",
            str(pred),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list(pred.glob("*_mask.png"))) == 4
    res = runner.invoke(app, ["train", "demo", "train.epoch=2"])
    assert res.exit_code == 2 and "Did you mean 'epochs'" in res.output


def test_pretrained_similarity_encoder_sets_the_prototype_space(tiny_data, tmp_path):
    """A null model.embed_dim takes the external encoder's size, saved in the checkpoint."""
    out = tmp_path / "eff"
    cfg = tiny_cfg(tiny_data, out, "loss.encoder=efficientnet-lite0", "train.max_steps=2")
    assert cfg.model.embed_dim is None
    train(cfg, progress=False, evaluate_test=False)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["model"]["embed_dim"] == 320
    assert ckpt["model"]["head.prototypes"].shape[-1] == 320
    model, _ = load_model(out / "best.pt")  # rebuilds the same head from the saved config
    assert model.head.prototypes.shape[-1] == 320


def test_input_scale_resizes_inside_the_model_and_maps_come_back_finer(tiny_data, tmp_path):
    # model.input_scale=2: the backbone sees 64 px for a 32-px input, so every stage map
    # has twice the side; the trained checkpoint keeps the setting (load_model rebuilds it)
    from lpdseg.data.loaders import resolve_data
    from lpdseg.engine.train import prepare_config
    from lpdseg.errors import ConfigError
    from lpdseg.models.lpd import build_model

    x = torch.rand(2, 3, 32, 32)
    sides = {}
    for scale in (1.0, 2.0):
        cfg = tiny_cfg(tiny_data, tmp_path / f"s{scale}", f"model.input_scale={scale}")
        cfg = prepare_config(cfg, resolve_data(cfg))
        model = build_model(cfg, num_classes=4).eval()
        with torch.no_grad():
            sides[scale] = model(x).class_maps[3].shape[-1]
    assert sides[2.0] == 2 * sides[1.0]
    cfg = tiny_cfg(tiny_data, tmp_path / "run", "model.input_scale=2", "train.max_steps=2")
    train(cfg, progress=False, evaluate_test=False)
    model, loaded = load_model(tmp_path / "run" / "best.pt")
    assert loaded.model.input_scale == 2.0 and model.preprocess.input_scale == 2.0
    with pytest.raises(ConfigError, match="input_scale"):
        tiny_cfg(tiny_data, tmp_path / "bad", "model.input_scale=8")


def test_encoder_scale_feeds_the_frozen_encoder_smaller_images(tiny_data, tmp_path):
    from lpdseg.data.loaders import make_train_loader, resolve_data

    seen = []
    # 32-px patches upscaled to 64-px crops, so the half-size encoder input is MiT's 32
    cfg = tiny_cfg(
        tiny_data,
        tmp_path / "e",
        "loss.encoder_scale=0.5",
        "data.scale_min=2",
        "data.scale_max=2",
        "data.crop_size=64",
    )
    bundle = resolve_data(cfg)
    trainer = Trainer(cfg, bundle, torch.device("cpu"))
    dense = trainer.encoder.dense
    trainer.encoder.dense = lambda images: seen.append(images.shape[-1]) or dense(images)
    batch = next(iter(make_train_loader(cfg, bundle, epoch=0)))
    loss, terms = trainer.compute_loss(batch["image"], batch["label"].float())
    assert seen == [32]  # 64-px crops at half size
    assert torch.isfinite(loss) and terms["sim"].item() > 0
    loss.backward()  # the similarity term still reaches the prototypes
    assert trainer.model.head.prototypes.grad.abs().sum() > 0


def test_tissue_pooling_trains_and_is_rebuilt_from_the_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(
        tiny_cfg(tiny_data, out, "model.tissue_pooling=true"), progress=False, evaluate_test=False
    )
    assert summary["step"] == 8
    model, cfg = load_model(out / "best.pt")
    assert cfg.model.tissue_pooling and model.tissue_pooling == (
        cfg.eval.glass_brightness,
        cfg.eval.glass_spread,
    )
    x = torch.ones(1, 3, 32, 32)
    x[..., :16] = 0.3
    assert model.pool_weight(x)[0, 0, 0].tolist() == [1.0] * 16 + [0.0] * 16


def test_train_step_with_cutmix_trains_on_the_mixed_batch(tiny_data, tmp_path):
    """data.cutmix=1: the step's loss is the loss of the batch mixed by the step's boxes."""
    from lpdseg.data.loaders import make_train_loader, resolve_data

    runs = (("m", ["data.cutmix=1.0"]), ("p", []), ("q", []))
    cfgs = [tiny_cfg(tiny_data, tmp_path / name, *extra) for name, extra in runs]
    bundle = resolve_data(cfgs[0])
    trainers = []
    for cfg in cfgs:
        torch.manual_seed(0)  # the same initial weights
        trainers.append(Trainer(cfg, bundle, torch.device("cpu")))
        trainers[-1].make_scheduler(8)
    batch = next(iter(make_train_loader(cfgs[0], bundle, epoch=0)))
    images, labels = batch["image"], batch["label"].float()
    boxes = cutmix_boxes(len(images), *images.shape[-2:], 1.0, cutmix_generator(0, 0))
    mixed_images, union = apply_cutmix(images, labels, boxes)
    assert (union >= labels).all() and not torch.equal(mixed_images, images)
    losses = []
    for trainer, (x, y) in zip(
        trainers, ((images, labels), (mixed_images, union), (images, labels))
    ):
        torch.manual_seed(1)
        losses.append(trainer.train_step(x, y).loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # trained on the mixed batch
    assert losses[0] != pytest.approx(losses[2], rel=1e-5)  # not on the batch as given
