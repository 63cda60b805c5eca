"""PBIP: prototype bank (determinism, purity, errors), stage 1 with the fixed bank, stage 2."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from lpdseg.config import load_config
from lpdseg.data.datasets import Sample
from lpdseg.data.synthetic import CLASS_NAMES, generate_patch, write_dataset
from lpdseg.data.transforms import EvalTransform
from lpdseg.engine.bank import WhiteRule, build_bank, cluster_purity
from lpdseg.engine.train import train
from lpdseg.errors import DataError
from lpdseg.inference import evaluate_checkpoint, load_model, write_pseudo_masks
from lpdseg.models.bank import load_bank, save_bank
from lpdseg.models.encoders import build_encoder
from lpdseg.viz import save_png

torch.set_num_threads(2)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("efficientnet-lite0", backbone=None, model_mean=MEAN, model_std=STD)


@pytest.fixture(scope="module")
def subtype_patches(tmp_path_factory):
    """Single-class patches of known sub-type: 5 per (class, sub-type)."""
    root = tmp_path_factory.mktemp("subtypes")
    samples, truth = [], {}
    for c in range(len(CLASS_NAMES)):
        for sub in (0, 1):
            for i in range(5):
                p = generate_patch(
                    1000 * c + 100 * sub + i, size=64, classes=[c], subtype=sub, background=False
                )
                name = f"{c}_{sub}_{i}.png"
                save_png(root / name, p.image)
                label = np.zeros(len(CLASS_NAMES), np.uint8)
                label[c] = 1
                samples.append(Sample(root / name, label, None))
                truth[name] = sub
    return samples, truth


def test_bank_is_deterministic_and_clusters_follow_subtypes(encoder, subtype_patches, tmp_path):
    samples, truth = subtype_patches
    kw = dict(encoder_name="efficientnet-lite0", clusters=2, n_keep=5, seed=0, progress=False)
    bank = build_bank(samples, CLASS_NAMES, encoder, EvalTransform(), **kw)
    again = build_bank(samples, CLASS_NAMES, encoder, EvalTransform(), **kw)
    assert bank.prototypes.shape == (4, 2, encoder.embed_dim)
    assert torch.equal(bank.prototypes, again.prototypes)
    assert bank.members == again.members
    assert torch.allclose(bank.prototypes.norm(dim=-1), torch.ones(4, 2), atol=1e-5)
    # sub-morphologies of the generator fall into separate clusters
    purity = cluster_purity(bank, truth)
    assert purity >= 0.9, purity
    save_bank(bank, tmp_path / "bank.pt")
    loaded = load_bank(tmp_path / "bank.pt")
    assert torch.equal(loaded.prototypes, bank.prototypes)
    assert loaded.settings["white_rule"]["max_fraction"] == WhiteRule().max_fraction


def test_bank_refuses_too_few_patches_and_says_how_many(encoder, subtype_patches):
    samples, _ = subtype_patches
    build = functools.partial(
        build_bank,
        samples,
        CLASS_NAMES,
        encoder,
        EvalTransform(),
        encoder_name="e",
        clusters=3,
        n_keep=10,
        progress=False,
    )
    with pytest.raises(DataError, match=r"needs 30 .*found TUM: 10, STR: 10, LYM: 10, NEC: 10"):
        build()
    bank = build(allow_fewer=True)
    assert sum(len(m) for m in bank.members[0]) == 10


def test_white_patches_are_dropped():
    rule = WhiteRule()
    assert rule.is_white(np.full((8, 8, 3), 245, np.uint8))
    assert not rule.is_white(generate_patch(3, size=32, background=False).image)


def test_pbip_stage1_then_stage2_end_to_end(tmp_path: Path):
    data = tmp_path / "data"
    write_dataset(
        data,
        n_train=40,
        n_val=4,
        n_test=4,
        size=32,
        seed=1,
        single_class_fraction=0.5,
        progress=False,
    )
    common = [
        f"data.root={data}",
        "data.crop_size=32",
        "data.num_workers=0",
        "train.batch_size=4",
        "eval.tta_scales=[1.0]",
        "eval.tta_flip=false",
    ]
    from lpdseg.engine.bank import build_bank_from_config

    bank_path = build_bank_from_config(
        "pbip_demo",
        common,
        tmp_path / "bank.pt",
        clusters=2,
        n_keep=2,
        allow_fewer=True,
        progress=False,
    )
    assert bank_path.with_suffix(".png").is_file()  # contact sheet
    bank = load_bank(bank_path)
    cfg = load_config(
        "pbip_demo",
        common
        + [f"model.bank={bank_path}", "train.max_steps=3", f"train.out_dir={tmp_path / 'pbip'}"],
    )
    summary = train(cfg, progress=False)
    assert "test" in summary
    model, _ = load_model(tmp_path / "pbip" / "best.pt")
    assert torch.equal(model.head.prototypes, bank.prototypes)  # the bank stayed fixed
    assert "head.prototypes" not in dict(model.named_parameters())

    pseudo = write_pseudo_masks(
        tmp_path / "pbip" / "best.pt", tmp_path / "pseudo", tta=False, progress=False
    )
    assert pseudo["images"] == 40
    assert len(list((tmp_path / "pseudo" / "masks").glob("*.png"))) == 40
    seg = load_config(
        "demo",
        common
        + [
            f"data.pseudo={tmp_path / 'pseudo'}",
            "train.task=seg",
            "train.max_steps=4",
            f"train.out_dir={tmp_path / 'seg'}",
        ],
    )
    s2 = train(seg, progress=False)
    assert s2["step"] == 4
    res = evaluate_checkpoint(tmp_path / "seg" / "best.pt", split="test", tta=False, progress=False)
    # a stage-2 network is scored once (no class gate), on the same pixels as stage 1
    stage1 = evaluate_checkpoint(
        tmp_path / "pbip" / "best.pt", split="test", tta=False, progress=False
    )
    assert set(res) >= {"seg"} and not {"labels", "classifier"} & set(res)
    assert sum(map(sum, res["seg"]["confusion"])) == sum(map(sum, stage1["labels"]["confusion"]))
    assert res["seg"]["images"] == stage1["labels"]["images"] > 0
