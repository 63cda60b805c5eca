"""Config presets, overrides, validation and error messages."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import yaml

from lpdseg.config import (
    GATES,
    DataConfig,
    EvalConfig,
    SyntheticConfig,
    apply_overrides,
    config_from_dict,
    gate_name,
    load_config,
    load_synthetic_config,
    preset_names,
    save_config,
)
from lpdseg.errors import ConfigError


def test_presets_load():
    names = preset_names()
    for required in ("demo", "bcss_wsss", "luad_histoseg", "wsss4luad"):
        assert required in names
    for name in names:
        if name.startswith("pbip"):
            continue  # need a bank file
        cfg = load_config(name)
        assert cfg.model.prototypes_per_class >= 1
    assert load_config("luad_histoseg").data.format == "luad_histoseg"
    assert load_config("luad_histoseg").model.backbone == "mit_b1"  # inherited from base


def test_dotted_overrides_are_typed():
    cfg = load_config(
        "bcss_wsss",
        [
            "train.epochs=2",
            "model.head=cam",
            "eval.tta_scales=[1.0]",
            "data.skip_bad=true",
            "train.lr=1e-4",
        ],
    )
    assert cfg.train.epochs == 2 and cfg.model.head == "cam"
    assert cfg.eval.tta_scales == [1.0] and cfg.data.skip_bad is True
    assert cfg.train.lr == pytest.approx(1e-4)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_config("bcss_wsss", ["train.epoch=2"])
    with pytest.raises(ConfigError, match="Did you mean 'model'"):
        config_from_dict({"modle": {}})


def test_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match="model.head='foo'.*lpd, pbip, cam"):
        load_config("bcss_wsss", ["model.head=foo"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config("bcss_wsss", ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="stage_weights needs 4"):
        load_config("bcss_wsss", ["loss.stage_weights=[1,1]"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(ConfigError, match="needs model.bank"):
        load_config("bcss_wsss", ["model.head=pbip"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("demo", ["train.seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


# ---------------------------------------------------------------- deprecated keys
CONFIG_LOG = "lpdseg.config"


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_synthetic_keys_are_not_in_a_run_config(tmp_path):
    cfg = load_config("demo")
    assert not any(k.startswith("synthetic") for k in cfg.to_dict()["data"])
    assert "synthetic" not in cfg.to_dict()
    save_config(cfg, tmp_path / "c.yaml")
    assert "synthetic" not in (tmp_path / "c.yaml").read_text()
    # the demo's counts come from the preset's own synthetic: section
    assert load_synthetic_config("demo") == SyntheticConfig(train=1600, val=40, test=100, size=96)
    assert load_synthetic_config("demo_pretrained").size == 96  # inherited through base
    assert load_synthetic_config("bcss_wsss") == SyntheticConfig()  # defaults
    assert load_synthetic_config("demo", ["synthetic.train=7"]).train == 7
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        load_config("demo", ["synthetic.trian=7"])  # the section is still validated


def test_old_synthetic_keys_load_and_are_dropped_with_a_warning(tmp_path, caplog):
    old = load_config("demo").to_dict()
    old["data"].update(synthetic_train=5, synthetic_val=1, synthetic_test=2, synthetic_size=64)
    snapshot = {**old["data"]}
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOG):
        cfg = config_from_dict(old)  # what a checkpoint's saved dict goes through
    assert cfg == load_config("demo")
    assert old["data"] == snapshot  # the caller's dict is left alone
    text = _warnings(caplog)
    assert "deprecated" in text and "data.synthetic_train" in text and "data.synthetic_size" in text
    # an old YAML file and an old-style override: the run drops them, the demo still reads them
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"base": "demo", "data": {"synthetic_train": 11}}))
    assert not hasattr(load_config(str(path)).data, "synthetic_train")
    assert load_synthetic_config(str(path)).train == 11
    assert load_synthetic_config("demo", ["data.synthetic_size=64"]).size == 64


def test_old_gating_key_and_values_map_to_gate(tmp_path, caplog):
    assert load_config("bcss_wsss").eval.gate == "labels"
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOG):
        cfg = load_config("bcss_wsss", ["eval.gating=predict"])
    assert cfg.eval.gate == "classifier"
    assert "eval.gating" in _warnings(caplog) and "deprecated" in _warnings(caplog)
    assert "gating" not in cfg.to_dict()["eval"]
    # a checkpoint's saved dict from before the rename
    saved = load_config("bcss_wsss").to_dict()
    saved["eval"].pop("gate")
    saved["eval"]["gating"] = "pseudo"
    assert config_from_dict(saved).eval.gate == "labels"
    # ... and an old-style override on top of it (what `lpdseg eval ... eval.gating=x` does)
    again = config_from_dict(apply_overrides(saved, ["eval.gating=predict"]))
    assert again.eval.gate == "classifier"
    # the new key over an old file: written later, it wins
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"base": "bcss_wsss", "eval": {"gating": "predict"}}))
    assert load_config(str(path)).eval.gate == "classifier"
    assert load_config(str(path), ["eval.gate=labels"]).eval.gate == "labels"
    # old values under the new key
    assert load_config("bcss_wsss", ["eval.gate=predict"]).eval.gate == "classifier"
    assert EvalConfig(gate="pseudo").gate == "labels"


def test_gate_name():
    assert gate_name("pseudo") == "labels"
    assert gate_name("predict") == "classifier"
    assert gate_name("labels") == "labels" and gate_name("classifier") == "classifier"
    assert GATES == ("labels", "classifier")
    for bad in ("clasifier", "both", "", None):
        with pytest.raises(ConfigError, match="labels, classifier"):
            gate_name(bad)
    with pytest.raises(ConfigError, match="--mode='x'"):
        gate_name("x", "--mode")


def test_gate_typo_lists_the_valid_values():
    with pytest.raises(ConfigError) as err:
        load_config("bcss_wsss", ["eval.gate=clasifier"])
    msg = str(err.value)
    assert "eval.gate='clasifier'" in msg and "labels" in msg and "classifier" in msg
    assert "did you mean 'classifier'" in msg


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "override, key, says",
    [
        ("train.max_steps=0", "train.max_steps=0", "use null for the full epochs"),
        ("train.lr=nan", "train.lr=nan", "> 0"),
        ("train.lr=.inf", "train.lr=inf", "> 0"),
        ("train.lr=0", "train.lr=0", "> 0"),
        ("data.crop_size=100000", "data.crop_size=100000", "[16, 4096]"),
        ("data.crop_size=8", "data.crop_size=8", "[16, 4096]"),
        ("eval.cls_threshold=1.5", "eval.cls_threshold=1.5", "[0, 1]"),
        ("eval.cls_threshold=-0.1", "eval.cls_threshold=-0.1", "[0, 1]"),
        ("data.label_min_fraction=1", "data.label_min_fraction=1", "[0, 1)"),
        ("train.amp=fp8", "train.amp='fp8'", "auto, bf16, fp16, off"),
        ("train.task=segm", "train.task='segm'", "wsss, seg"),
        ("train.device=gpu", "train.device='gpu'", "auto, cpu, cuda, cuda:N"),
        ("loss.sim_mode=faithful", "loss.sim_mode='faithful'", "feature, image, off"),
        ("loss.encoder=resnet", "loss.encoder='resnet'", "backbone-ema, efficientnet-lite0"),
        ("model.backbone=mit_b9", "model.backbone='mit_b9'", "mit_b0"),
        ("data.format=bcss", "data.format='bcss'", "bcss_wsss, luad_histoseg, wsss4luad, csv"),
        ("eval.inference_merge=max", "eval.inference_merge='max'", "mean, softmax"),
        ("model.merge=max", "model.merge='max'", "mean, softmax"),
        ("model.last_stride=4", "model.last_stride=4", "1, 2"),
        ("model.weights=imagenet", "model.weights=imagenet", "efficientnet_lite0"),
        ("train.epochs=0", "train.epochs=0", ">= 1"),
        ("train.batch_size=true", "train.batch_size=True", "wrong type"),
        ("train.seed=-1", "train.seed=-1", ">= 0"),
        ("train.weight_decay=-1", "train.weight_decay=-1", ">= 0"),
        ("train.val_limit=0", "train.val_limit=0", ">= 1 or null"),
        ("loss.sim_temperature=0", "loss.sim_temperature=0", "> 0"),
        ("loss.stage_weights=[0,0,0,nan]", "loss.stage_weights[3]=nan", ">= 0"),
        ("eval.tta_scales=[1.0,0]", "eval.tta_scales[1]=0", "[0.25, 4]"),
        ("eval.gate_window=4", "eval.gate_window=4", "[16, 4096]"),
        ("eval.overlap=1", "eval.overlap=1", "[0, 1)"),
        ("eval.tile=100000", "eval.tile=100000", "[16, 4096]"),
        ("model.drop_path=1", "model.drop_path=1", "[0, 1)"),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_valid_range(override, key, says):
    with pytest.raises(ConfigError) as err:
        load_config("bcss_wsss", [override])
    msg = str(err.value)
    assert key in msg and says in msg, msg


def test_encoder_prefix_needs_a_folder():
    with pytest.raises(ConfigError, match="loss.encoder='hf:' .*hf:<local folder>"):
        config_from_dict({"loss": {"encoder": "hf:"}})
    with pytest.raises(ConfigError, match="wrong type"):
        load_config("bcss_wsss", ["loss.encoder=hf:"])  # YAML reads `hf:` as a mapping


def test_good_edge_values_pass():
    cfg = load_config(
        "bcss_wsss",
        [
            "train.max_steps=null",
            "train.max_steps=1",
            "data.crop_size=16",
            "eval.cls_threshold=0",
            "eval.cls_threshold=1",
            "train.device=cuda:1",
            "loss.encoder=hf:/some/folder",
            "model.backbone=efficientnet_lite0",
            "model.weights=imagenet",
        ],
    )
    assert cfg.train.max_steps == 1 and cfg.loss.encoder == "hf:/some/folder"
    assert load_config("bcss_wsss", ["train.max_steps=null"]).train.max_steps is None


def test_backbone_names_come_from_the_registry_without_torch():
    code = (
        "import sys; from lpdseg.config import backbone_names, encoder_names; "
        "print(','.join(backbone_names())); print(','.join(encoder_names()[0])); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    from lpdseg.models.backbones import BACKBONES
    from lpdseg.models.encoders import ENCODERS

    assert out[0].split(",") == sorted(BACKBONES)
    assert set(out[1].split(",")) == {e for e in ENCODERS if "<" not in e}
    assert out[2] == "False"


# ---------------------------------------------------------------- label rule
def test_label_fraction_has_one_default_read_everywhere():
    from lpdseg.catalog import LABEL_MIN_FRACTION
    from lpdseg.data import synthetic
    from lpdseg.data.patches import PatchRule

    assert DataConfig().label_min_fraction == LABEL_MIN_FRACTION == 0.02
    assert PatchRule().min_fraction == LABEL_MIN_FRACTION
    assert synthetic.MIN_LABEL_FRACTION == LABEL_MIN_FRACTION


def test_patch_builder_reads_the_label_fraction_key(tmp_path):
    from lpdseg.data.patches import PatchRule, tile_pair

    mask = np.zeros((100, 100), np.uint8)  # 3 classes, 3 = background
    mask[0, :100] = 1  # stroma: 100 / 10000 px = 1 %
    image = np.zeros((100, 100, 3), np.uint8)

    def label(rule: PatchRule) -> list[int]:
        ((_, _, _, _, lab, _),) = tile_pair(image, mask, 3, rule)
        return lab.tolist()

    kw = {"size": 100, "stride": 100}
    assert label(PatchRule.from_config(load_config("wsss4luad"), **kw)) == [1, 0, 0]
    cfg = load_config("wsss4luad", ["data.label_min_fraction=0.005"])
    assert label(PatchRule.from_config(cfg, **kw)) == [1, 1, 0]
    assert label(PatchRule.from_config(cfg.data, **kw, min_fraction=0.02)) == [1, 0, 0]
    # the command line: --preset reads the key, --min-fraction wins, else the default
    from PIL import Image
    from typer.testing import CliRunner

    from lpdseg.cli import app

    for sub in ("img", "mask"):
        (tmp_path / sub).mkdir()
    Image.fromarray(image).save(tmp_path / "img" / "a.png")
    Image.fromarray(mask).save(tmp_path / "mask" / "a.png")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        yaml.safe_dump({"base": "wsss4luad", "data": {"label_min_fraction": 0.005}})
    )

    def cli(*extra: str) -> list[str]:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        args = ["patches", str(tmp_path / "img"), str(tmp_path / "mask"), "--out", str(out)]
        res = CliRunner().invoke(app, [*args, "--size", "100", "--stride", "100", "-q", *extra])
        assert res.exit_code == 0, res.output
        return sorted(p.name for p in (out / "train").iterdir())

    assert cli() == ["a-0-0-[1, 0, 0].png"]
    assert cli("--preset", str(yaml_path)) == ["a-0-0-[1, 1, 0].png"]
    assert cli("--preset", str(yaml_path), "--min-fraction", "0.02") == ["a-0-0-[1, 0, 0].png"]


def test_synthetic_writer_takes_the_label_fraction(tmp_path):
    import json

    from lpdseg.data import synthetic

    # the same seeds under a looser and a stricter rule: labels follow the rule exactly
    for fraction in (0.0, 0.05):
        p = synthetic.generate_patch(3, 64, min_label_fraction=fraction)
        frac = np.bincount(p.mask.ravel(), minlength=5)[:4] / p.mask.size
        assert p.label.tolist() == ((frac > 0) & (frac >= fraction)).astype(int).tolist()
    synthetic.write_dataset(
        tmp_path / "d", 2, 1, 1, size=32, progress=False, min_label_fraction=0.05
    )
    meta = json.loads((tmp_path / "d" / "synthetic.json").read_text())
    assert meta["min_label_fraction"] == 0.05 and "0.05" in meta["label_rule"]
    with pytest.raises(ConfigError, match="data.label_min_fraction"):
        synthetic.write_dataset(tmp_path / "e", 1, 0, 0, progress=False, min_label_fraction=0.5)
