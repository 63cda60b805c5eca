"""Config presets, overrides, validation and error messages."""

from __future__ import annotations

import pytest

from lpdseg.config import config_from_dict, load_config, preset_names, save_config
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
