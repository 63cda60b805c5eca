"""Self-contained checkpoints: every command works after the pretrained-weights file is gone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lpdseg.cli import app
from lpdseg.config import load_config
from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.train import train
from lpdseg.errors import CheckpointError
from lpdseg.inference import load_model
from lpdseg.models.backbones import build_backbone


@pytest.fixture(scope="module")
def run_without_weights(tmp_path_factory):
    """A 2-step run started from a local MiT-B0 weights file that is then deleted."""
    root = tmp_path_factory.mktemp("selfcontained")
    torch.manual_seed(0)
    weights = root / "mit_b0_local.pth"
    torch.save(build_backbone("mit_b0").state_dict(), weights)
    data = root / "data"
    write_dataset(data, n_train=8, n_val=2, n_test=2, size=32, seed=0, progress=False)
    overrides = [
        f"data.root={data}",
        "data.crop_size=32",
        "data.num_workers=0",
        "model.backbone=mit_b0",
        f"model.weights={weights}",
        "model.prototypes_per_class=2",
        "model.proj_hidden=16",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.ckpt_every=1",
        "train.threads=2",
        f"train.out_dir={root / 'run'}",
        "eval.tta_scales=[1.0]",
        "eval.tta_flip=false",
    ]
    train(load_config("demo", overrides), progress=False, evaluate_test=False)
    reference = {
        k: v.clone() for k, v in load_model(root / "run" / "best.pt")[0].state_dict().items()
    }
    weights.unlink()
    return root, overrides, reference


def test_model_loads_without_its_weights_file(run_without_weights):
    root, _, reference = run_without_weights
    model, cfg = load_model(root / "run" / "best.pt")
    assert cfg.model.weights.endswith("mit_b0_local.pth")  # recorded, not needed
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    # the checkpoint's statistics (ImageNet, from the weights table) travel with the model
    assert model.preprocess.mean.flatten().tolist() == pytest.approx(cfg.data.mean)


def test_every_command_works_without_the_weights_file(run_without_weights, tmp_path):
    root, _, _ = run_without_weights
    ckpt = str(root / "run" / "best.pt")
    runner = CliRunner()
    image = root / "data" / "test" / "img"
    first = sorted(image.iterdir())[0]
    commands = {
        "eval": ["eval", ckpt, "--no-tta", "--out", str(tmp_path / "eval"), "-q"],
        "predict": ["predict", ckpt, str(first), "--out", str(tmp_path / "pred"), "-q"],
        "explain": ["explain", ckpt, str(first), "--out", str(tmp_path / "explain"), "-q"],
        "pseudo": ["pseudo", ckpt, "--no-tta", "--out", str(tmp_path / "pseudo"), "-q"],
    }
    slide = tmp_path / "slide.png"
    Image.fromarray(np.tile(np.asarray(Image.open(first).convert("RGB")), (3, 3, 1))).save(slide)
    commands["slide"] = [
        "slide",
        ckpt,
        str(slide),
        "--downsample",
        "1",
        "--out",
        str(tmp_path / "slide"),
        "-q",
    ]
    for name, args in commands.items():
        res = runner.invoke(app, args)
        assert res.exit_code == 0, f"{name}: {res.output}"
    assert (tmp_path / "eval" / "test_metrics.json").is_file()
    assert list((tmp_path / "pred").glob("*_mask.png"))
    assert list((tmp_path / "explain").glob("*_prototypes.png"))
    assert (tmp_path / "pseudo" / "manifest.csv").is_file()
    assert list((tmp_path / "slide").glob("*.geojson"))


def test_resume_works_without_the_weights_file(run_without_weights):
    root, overrides, _ = run_without_weights
    more = [o for o in overrides if not o.startswith("train.max_steps")] + ["train.max_steps=3"]
    summary = train(
        load_config("demo", more),
        resume=root / "run" / "last.pt",
        progress=False,
        evaluate_test=False,
    )
    assert summary["step"] == 3


def test_weights_that_do_not_fit_are_reported_key_by_key(run_without_weights, tmp_path):
    root, _, _ = run_without_weights
    ckpt = torch.load(root / "run" / "best.pt", weights_only=True)
    ckpt["model"]["head.extra"] = torch.zeros(1)
    del ckpt["model"]["backbone.patch_embed1.proj.weight"]
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError) as err:
        load_model(bad)
    message = str(err.value)
    assert "bad.pt" in message
    assert "backbone.patch_embed1.proj.weight" in message and "head.extra" in message
