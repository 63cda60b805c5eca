"""Prototype head against a loop reference; CAM head shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lpdseg.models.prototypes import CamHead, PrototypeHead, merge_prototype_scores

torch.set_num_threads(1)


def test_prototype_maps_match_loop_reference():
    torch.manual_seed(0)
    c, k, d = 3, 2, 8
    channels = (4, 5, 6, 7)
    head = PrototypeHead(c, k, d, channels, proj_hidden=16, merge="softmax")
    feats = [torch.randn(2, ch, 3, 4) for ch in channels]
    out = head(feats)
    for i, f in enumerate(feats):
        p = head.projected(i)
        a = out.proto_maps[i]
        assert a.shape == (2, c, k, 3, 4)
        for n in range(2):
            for cls in range(c):
                for j in range(k):
                    for y in range(3):
                        for x in range(4):
                            ref = head.scale * F.cosine_similarity(f[n, :, y, x], p[cls, j], dim=0)
                            assert torch.allclose(a[n, cls, j, y, x], ref, atol=1e-5)
        assert torch.allclose(out.class_maps[i], a.mean(2))
        scores = a.mean((3, 4))
        w = torch.softmax(scores, -1)
        assert torch.allclose(out.logits[i], (w * scores).sum(-1), atol=1e-6)


def test_merge_modes():
    s = torch.tensor([[1.0, 3.0]])
    assert torch.allclose(merge_prototype_scores(s, "mean"), torch.tensor([2.0]))
    w = torch.softmax(s, -1)
    assert torch.allclose(merge_prototype_scores(s, "softmax"), (w * s).sum(-1))


def test_only_requested_stages_computed_and_bank_is_fixed():
    bank = torch.randn(2, 3, 8)
    head = PrototypeHead(2, 3, 8, (4, 4, 4, 4), proj_hidden=8, bank=bank)
    assert not head.learnable
    assert "prototypes" not in dict(head.named_parameters())
    out = head([torch.randn(1, 4, 2, 2)] * 4, stages=(2, 3))
    assert out.proto_maps[0] is None and out.logits[1] is None
    assert out.class_maps[3].shape == (1, 2, 2, 2)
    assert torch.equal(head.prototypes, bank)


def test_gradients_reach_prototypes_projections_and_scale():
    head = PrototypeHead(2, 2, 8, (4, 4, 4, 4), proj_hidden=8)
    out = head([torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(4)])
    sum(lg.sum() for lg in out.logits).backward()
    assert head.prototypes.grad.abs().sum() > 0
    assert head.scale.grad is not None
    assert all(p.grad is not None for p in head.projections.parameters())


def test_cam_head():
    head = CamHead(3, (4, 5, 6, 7))
    out = head([torch.randn(2, ch, 3, 3) for ch in (4, 5, 6, 7)])
    assert out.logits[3].shape == (2, 3)
    assert torch.allclose(out.logits[3], out.class_maps[3].mean((2, 3)))


@pytest.mark.parametrize("merge,bias", [("mean", False), ("softmax", True)])
def test_window_logits_match_per_window_reference(merge, bias):
    # each window's logit = the head's own logit (GAP, merge, bias) of the cropped maps
    torch.manual_seed(0)
    head = PrototypeHead(3, 2, 8, (4, 4, 4, 4), proj_hidden=8, merge=merge, logit_bias=bias)
    if bias:
        torch.nn.init.normal_(head.logit_bias)
    feats = [torch.randn(2, 4, 7, 9) for _ in range(4)]
    out = head(feats)
    got = head.window_logits(out, 3, (4, 4), (2, 2))  # B x C x n
    a = out.proto_maps[3]
    want = []
    for i in range(0, 7 - 4 + 1, 2):
        for j in range(0, 9 - 4 + 1, 2):
            scores = a[..., i : i + 4, j : j + 4].mean((3, 4))
            logit = merge_prototype_scores(scores, merge)
            want.append(logit + head.logit_bias[3] if bias else logit)
    assert torch.allclose(got, torch.stack(want, -1), atol=1e-5)
    whole = head.window_logits(out, 3, (7, 9), (1, 1))[..., 0]
    assert torch.allclose(whole, out.logits[3], atol=1e-5)  # one window = the whole map
    cam = CamHead(3, (4, 4, 4, 4))
    cam_out = cam(feats)
    cam_got = cam.window_logits(cam_out, 3, (4, 4), (2, 2))
    assert torch.allclose(cam_got[..., 0], cam_out.class_maps[3][..., :4, :4].mean((2, 3)))
    assert torch.allclose(cam.window_logits(cam_out, 3, (7, 9), (1, 1))[..., 0], cam_out.logits[3])


def test_tissue_weighted_pooling_matches_a_pixel_loop():
    from lpdseg.models.prototypes import pool_maps

    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 4, 4, generator=g)  # B x C x h x w
    weight = torch.zeros(2, 1, 8, 8)
    weight[0, :, :4, :] = 1.0  # image 0: tissue in the top half (input px)
    weight[0, :, 4:6, :2] = 1.0  # and one 2 x 2 input block -> a quarter... of a cell
    # image 1: all glass -> plain mean
    got = pool_maps(maps, weight)
    cell = F.avg_pool2d(weight, 2)[:, 0]  # tissue share per map cell
    for c in range(3):
        num = sum(float(maps[0, c, y, x] * cell[0, y, x]) for y in range(4) for x in range(4))
        den = sum(float(cell[0, y, x]) for y in range(4) for x in range(4))
        assert float(got[0, c]) == pytest.approx(num / den, rel=1e-5)
    assert torch.allclose(got[1], maps[1].mean((-2, -1)))
    assert torch.allclose(pool_maps(maps, torch.ones(2, 1, 8, 8)), maps.mean((-2, -1)), atol=1e-6)
    assert torch.equal(pool_maps(maps, None), maps.mean((-2, -1)))


@pytest.mark.parametrize("head", ["lpd", "cam"])
def test_model_with_tissue_pooling_pools_its_logits_over_tissue(head):
    from lpdseg.config import load_config
    from lpdseg.models.lpd import build_model
    from lpdseg.models.prototypes import merge_prototype_scores, pool_maps

    overrides = [
        "model.backbone=mit_b0",
        f"model.head={head}",
        "model.prototypes_per_class=2",
        "model.proj_hidden=8",
        "model.embed_dim=16",
        "loss.sim_mode=off",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
    ]
    torch.manual_seed(0)
    plain = build_model(load_config("demo", overrides), 3).eval()
    torch.manual_seed(0)
    tissue = build_model(load_config("demo", [*overrides, "model.tissue_pooling=true"]), 3).eval()
    x = torch.rand(1, 3, 64, 64) * 0.5  # dark: tissue
    x[:, :, :, 32:] = 1.0  # right half white glass
    with torch.no_grad():
        a, b = plain(x), tissue(x)
    assert torch.allclose(a.class_maps[3], b.class_maps[3])  # the maps do not change
    w = torch.zeros(1, 1, 64, 64)
    w[..., :32] = 1.0
    if head == "cam":
        expect = pool_maps(b.class_maps[3], w)
    else:
        expect = merge_prototype_scores(pool_maps(b.proto_maps[3], w), tissue.head.merge)
    assert torch.allclose(b.logits[3], expect, atol=1e-5)
    assert not torch.allclose(a.logits[3], b.logits[3])
