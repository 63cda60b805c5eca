"""Mix Transformer: shapes, sizes, release key names, attention layout, factories."""

from __future__ import annotations

import math

import pytest
import torch

from lpdseg.errors import CheckpointError, ConfigError
from lpdseg.models.backbones import build_backbone
from lpdseg.models.mit import (
    MIT_CONFIGS,
    DWConv,
    EfficientSelfAttention,
    build_mit,
    mit_b0,
)
from lpdseg.models.pretrained import IMAGENET_MEAN, IMAGENET_STD

torch.set_num_threads(1)

# Encoder parameters (no ImageNet classifier) as the SegFormer paper's model table
# rounds them, in millions; B0 is quoted as 3.3M in lpdseg's brief (see report).
PAPER_PARAMS_M = {
    "mit_b0": 3.3,
    "mit_b1": 13.1,
    "mit_b2": 24.2,
    "mit_b3": 44.0,
    "mit_b4": 60.8,
    "mit_b5": 81.4,
}
# Exact counts of this implementation (regression guard).
EXACT_PARAMS = {"mit_b0": 3_319_392, "mit_b1": 13_151_424}


def _meta(name: str, **kwargs):
    with torch.device("meta"):
        return build_mit(name, **kwargs)


@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(0)
    return mit_b0().eval()


@pytest.mark.parametrize(("last_stride", "sizes"), [(1, (56, 28, 14, 14)), (2, (56, 28, 14, 7))])
def test_stage_shapes_224(last_stride, sizes):
    torch.manual_seed(0)
    model = mit_b0(last_stride=last_stride).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, s, s) for c, s in zip((32, 64, 160, 256), sizes, strict=True)
    ]
    assert model.stage_strides == ((4, 8, 16, 16) if last_stride == 1 else (4, 8, 16, 32))
    assert all(f.is_contiguous() for f in feats)


def test_sizes_not_multiple_of_32(b0):
    with torch.no_grad():
        feats = b0(torch.randn(2, 3, 50, 37))
    expect = [(math.ceil(50 / s), math.ceil(37 / s)) for s in b0.stage_strides]
    assert [tuple(f.shape[-2:]) for f in feats] == expect


def test_too_small_input_says_which_size(b0):
    assert b0.min_input_size == 29
    b0(torch.randn(1, 3, 29, 29))  # smallest accepted
    with pytest.raises(ValueError, match="at least 29 px"):
        b0(torch.randn(1, 3, 28, 64))


@pytest.mark.parametrize("name", sorted(MIT_CONFIGS))
def test_channels_and_strides_match_config(name):
    model = _meta(name, last_stride=2)
    cfg = MIT_CONFIGS[name]
    assert model.stage_channels == cfg.embed_dims
    assert model.stage_strides == (4, 8, 16, 32)
    for i, (embed, blocks, norm) in enumerate(model.stages()):
        assert embed.proj.out_channels == cfg.embed_dims[i]
        assert len(blocks) == cfg.depths[i]
        assert norm.normalized_shape == (cfg.embed_dims[i],)
    assert model.patch_embed4.proj.stride == (2, 2)
    assert _meta(name).patch_embed4.proj.stride == (1, 1)
    assert MIT_CONFIGS["mit_b1"].embed_dims == (64, 128, 320, 512)


@pytest.mark.parametrize("name", sorted(MIT_CONFIGS))
def test_parameter_counts_match_paper(name):
    n = sum(p.numel() for p in _meta(name).parameters())
    assert abs(n / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.01, n
    if name in EXACT_PARAMS:
        assert n == EXACT_PARAMS[name]


def test_official_key_names():
    keys = set(_meta("mit_b0").state_dict())
    for key in [
        "patch_embed1.proj.weight",
        "patch_embed1.norm.bias",
        "patch_embed4.proj.weight",
        "block1.0.norm1.weight",
        "block1.0.attn.q.weight",
        "block1.0.attn.kv.weight",
        "block1.0.attn.sr.weight",
        "block1.0.attn.norm.weight",
        "block1.1.attn.proj.bias",
        "block2.1.norm2.weight",
        "block3.0.mlp.fc1.weight",
        "block4.0.mlp.dwconv.dwconv.weight",
        "block4.1.mlp.fc2.bias",
        "norm1.weight",
        "norm4.weight",
    ]:
        assert key in keys, key
    assert not any(k.startswith("head.") for k in keys)
    # sr ratio 1 in stage 4 -> no sr conv and no attn.norm there, as the release
    for stage in (1, 2, 3):
        assert f"block{stage}.0.attn.sr.weight" in keys
    assert not any(
        k.startswith("block4.") and (".attn.sr." in k or ".attn.norm." in k) for k in keys
    )
    # 4 per patch embed, 2 per stage norm, 20 per block with sr (16 without): 176
    assert len(keys) == 4 * 4 + 4 * 2 + 6 * 20 + 2 * 16


def test_layer_norm_eps_as_release():
    model = _meta("mit_b0")
    assert model.block1[0].norm1.eps == 1e-6
    assert model.norm4.eps == 1e-6
    assert model.patch_embed1.norm.eps == 1e-5
    assert model.block1[0].attn.norm.eps == 1e-5


def test_attention_matches_explicit_reference():
    """Head layout of q/kv (k rows first, then v; head-major) against a per-head loop."""
    torch.manual_seed(0)
    dim, heads, sr, h, w = 12, 3, 2, 4, 6
    attn = EfficientSelfAttention(dim, heads, sr).eval()
    x = torch.randn(2, h * w, dim)
    out = attn(x, h, w)

    hd = dim // heads
    red = attn.sr(x.transpose(1, 2).reshape(2, dim, h, w)).flatten(2).transpose(1, 2)
    red = attn.norm(red)
    wk, wv = attn.kv.weight[:dim], attn.kv.weight[dim:]
    bk, bv = attn.kv.bias[:dim], attn.kv.bias[dim:]
    heads_out = []
    for j in range(heads):
        rows = slice(j * hd, (j + 1) * hd)
        q = x @ attn.q.weight[rows].T + attn.q.bias[rows]
        k = red @ wk[rows].T + bk[rows]
        v = red @ wv[rows].T + bv[rows]
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
        heads_out.append(a @ v)
    ref = attn.proj(torch.cat(heads_out, dim=-1))
    assert torch.allclose(out, ref, atol=1e-5)


def test_init_as_release():
    torch.manual_seed(0)
    model = mit_b0()
    fc1 = model.block3[0].mlp.fc1.weight
    assert abs(fc1.std().item() - 0.02) < 0.002 and fc1.abs().max() < 2.0
    conv = model.patch_embed1.proj.weight  # fan-out normal: std sqrt(2 / (7 * 7 * 32))
    assert abs(conv.std().item() / math.sqrt(2 / (7 * 7 * 32)) - 1) < 0.1
    dw = model.block1[0].mlp.dwconv.dwconv.weight  # groups = channels: fan-out 3 * 3
    assert abs(dw.std().item() / math.sqrt(2 / 9) - 1) < 0.1
    assert torch.all(model.norm1.weight == 1) and torch.all(model.block1[0].attn.q.bias == 0)


def test_drop_path_schedule_and_eval_noop(b0):
    rates = [blk.drop_path.rate for _, blocks, _ in b0.stages() for blk in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == sorted(rates) and len(rates) == 8
    model = mit_b0(drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x)[-1], model(x)[-1]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c, d = model(x)[-1], model(x)[-1]
    assert not torch.equal(c, d)
    model.set_drop_path(0.0)
    assert all(blk.drop_path.rate == 0.0 for _, bs, _ in model.stages() for blk in bs)
    with pytest.raises(ConfigError):
        model.set_drop_path(1.5)


def test_gradients_flow():
    model = mit_b0()
    out = model(torch.randn(2, 3, 32, 32))
    sum(f.mean() for f in out).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_registry_builds_mit_and_lists_valid_names():
    model = build_backbone("mit_b0")
    assert model.stage_channels == (32, 64, 160, 256)
    assert model.stage_strides == (4, 8, 16, 16)
    assert model.pretrained_cfg.source == "random" and model.pretrained_cfg.mean is None
    with pytest.raises(ConfigError, match="mit_b0.*mit_b5"):
        build_backbone("mit_b9")


@pytest.mark.parametrize("weights", ["imagenet", "https://example.org/mit_b0.pth", 3])
def test_factory_refuses_non_local_weights(weights):
    with pytest.raises(ConfigError, match="Only local paths"):
        mit_b0(weights=weights)


def test_factory_refuses_bad_last_stride():
    with pytest.raises(ConfigError, match="last_stride"):
        mit_b0(last_stride=4)


def test_factory_loads_release_style_file(tmp_path, b0):
    # a release file: bare state dict plus the ImageNet classifier head.*
    state = dict(b0.state_dict())
    state["head.weight"] = torch.randn(1000, 256)
    state["head.bias"] = torch.zeros(1000)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)

    model = build_backbone("mit_b0", weights=str(path)).eval()
    assert model.pretrained_cfg.source == str(path)
    assert model.pretrained_cfg.mean == IMAGENET_MEAN and model.pretrained_cfg.std == IMAGENET_STD
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        for a, b in zip(model(x), b0(x), strict=True):
            assert torch.equal(a, b)


def test_factory_names_the_right_size_for_a_wrong_file(tmp_path):
    # B1-shaped weights (zeros, built from a meta model: no 13M-parameter init)
    state = {k: torch.zeros(v.shape) for k, v in _meta("mit_b1").state_dict().items()}
    path = tmp_path / "mit_b1.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="looks like mit_b1") as err:
        mit_b0(weights=path)
    assert "patch_embed1.proj.weight (model [32, 3, 7, 7], file [64, 3, 7, 7])" in str(err.value)


def test_batch_items_are_independent(b0):
    # no cross-sample mixing in attention or norms
    x = torch.randn(3, 3, 32, 40)
    with torch.no_grad():
        full = b0(x)
        single = b0(x[1:2])
    for f, s in zip(full, single, strict=True):
        assert torch.allclose(f[1:2], s, atol=1e-5)


def test_cpu_depthwise_conv_path_matches_module():
    torch.manual_seed(0)
    dw = DWConv(8)
    x = torch.randn(2, 4 * 5, 8)
    ref = dw.dwconv(x.transpose(1, 2).reshape(2, 8, 4, 5)).flatten(2).transpose(1, 2)
    assert torch.allclose(dw(x, 4, 5), ref, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dw(x.bfloat16(), 4, 5).dtype == torch.bfloat16
