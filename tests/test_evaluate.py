"""Maps -> masks: normalisation, fusion, gating, background channel, TTA."""

from __future__ import annotations

import pytest
import torch

from lpdseg.config import EvalConfig
from lpdseg.data.glass import glass_mask
from lpdseg.models.decode import (
    class_gate,
    force_background,
    fuse_maps,
    infer_maps,
    label_scores,
    minmax_normalise,
    predict_scores,
    window_probs,
)
from lpdseg.models.prototypes import CamHead, HeadOutput


def test_minmax_per_image_and_class():
    m = torch.tensor([[[[1.0, 3.0]], [[-2.0, -2.0]]]])  # 1 x 2 x 1 x 2
    n = minmax_normalise(m)
    assert torch.allclose(n[0, 0], torch.tensor([[0.0, 1.0]]))
    assert torch.all(n[0, 1] == 0)  # constant map -> zeros, no NaN


def test_fusion_weights_and_renormalisation():
    a = torch.tensor([[[[0.0, 1.0, 2.0]]]])
    b = torch.tensor([[[[2.0, 1.0, 0.0]]]])
    fused = fuse_maps([None, a, b, None], [0.0, 0.75, 0.25, 0.0])
    # 0.75*[0, .5, 1] + 0.25*[1, .5, 0] = [.25, .5, .75] -> renormalised [0, .5, 1]
    assert torch.allclose(fused[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_mask_background_and_gating_by_hand():
    fused = torch.tensor([[[[0.9, 0.2, 0.0]], [[0.1, 0.8, 0.05]]]])  # 1 x 2 x 1 x 3
    keep = torch.tensor([[True, True]])
    # background (1 - max)^1: [0.1, 0.2, 0.95] -> labels [0, 1, 2]
    assert label_scores(fused, keep, gamma=1.0).argmax(1).tolist() == [[[0, 1, 2]]]
    # class 1 gated off: pixel 1 -> bg (0.8 > 0.2)
    keep = torch.tensor([[True, False]])
    assert label_scores(fused, keep, gamma=1.0).argmax(1).tolist() == [[[0, 2, 2]]]
    # gamma = 10 shrinks the background: (1 - 0.2)^10 = 0.107 < 0.2
    assert label_scores(fused, keep, gamma=10.0).argmax(1).tolist() == [[[0, 0, 2]]]


def test_gating_modes():
    cfg = EvalConfig(cls_threshold=0.5)
    probs = torch.tensor([[0.9, 0.3]])
    labels = torch.tensor([[0.0, 1.0]])
    assert class_gate(cfg, probs, labels, "labels").tolist() == [[False, True]]
    assert class_gate(cfg, probs, labels, "classifier").tolist() == [[True, False]]


class _Shifty(torch.nn.Module):
    """Class map = the red channel; logits = its mean. Equivariant to flips and resizing."""

    def forward(self, x, stages=(3,), inference_merge="mean"):
        maps = [None, x[:, :1], x[:, :1], x[:, :1]]
        return HeadOutput([None] * 4, maps, [None, None, None, x[:, :1].mean((2, 3))])


def test_tta_undoes_flips_and_scales():
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    cfg = EvalConfig(tta_scales=[0.75, 1.0, 1.25], tta_flip=True)
    out = infer_maps(_Shifty(), x, cfg)
    assert out.stage_maps[3].shape == (1, 1, 32, 32)
    # averaged maps still increase left to right (flips were undone)
    row = out.stage_maps[3][0, 0, 16]
    assert torch.all(row[1:] >= row[:-1] - 1e-4)
    assert torch.allclose(row, x[0, 0, 16], atol=0.05)


def test_glass_pixels_become_background_and_tissue_is_untouched():
    cfg = EvalConfig(glass_background=True)
    rgb = torch.tensor(
        [[0.95, 0.95, 0.95], [0.85, 0.55, 0.75], [0.97, 0.90, 0.95], [0.30, 0.30, 0.32]]
    ).T.reshape(1, 3, 1, 4)  # glass | pink tissue | pale pink (spread 0.07) | dark grey
    assert glass_mask(rgb, cfg.glass_brightness, cfg.glass_spread).tolist() == [
        [[True, False, True, False]]
    ]
    scores = torch.tensor([[[[0.9, 0.9, 0.9, 0.9]], [[0.0, 0.0, 0.0, 0.0]]]])  # class 0 wins
    forced = force_background(scores, glass_mask(rgb, cfg.glass_brightness, cfg.glass_spread))
    assert forced.argmax(1).tolist() == [[[1, 0, 1, 0]]]
    assert torch.equal(scores[:, 0], forced[:, 0])  # tissue scores are not changed


def test_window_gate_finds_a_class_confined_to_one_corner():
    from types import SimpleNamespace

    maps = torch.full((1, 2, 8, 8), -4.0)
    maps[0, 0] = 3.0  # class 0 everywhere
    maps[0, 1, :2, :2] = 6.0  # class 1 in one 2 x 2 corner only
    out = HeadOutput([None] * 4, [None, None, None, maps], [None, None, None, maps.mean((2, 3))])
    model = SimpleNamespace(head=CamHead(2, (1, 1, 1, 1)))
    whole = torch.sigmoid(out.logits[3])
    assert whole[0, 1] < 0.05  # (4 * 6 - 60 * 4) / 64 = -3.4: diluted by the other pixels
    p = window_probs(model, out, 16, (64, 64))  # 16 of 64 px = 2 of 8 cells
    assert p[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item())
    assert p[0, 0] == pytest.approx(whole[0, 0].item())
    # a window as large as the image is the whole-image probability
    assert torch.allclose(window_probs(model, out, 64, (64, 64)), whole)
    assert torch.allclose(window_probs(model, out, 500, (64, 64)), whole)


def test_gate_window_reaches_inference(tmp_path_factory, tiny_run_dir):
    # a window as large as the 32-px test images: the same probabilities as no window;
    # a smaller one changes them (through lpdseg eval's override path)
    from lpdseg.inference import evaluate_checkpoint, load_model

    run = tiny_run_dir
    model, cfg = load_model(run / "best.pt")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    base = infer_maps(model, x, cfg.eval).probs
    same = infer_maps(model, x, EvalConfig(**{**cfg.eval.__dict__, "gate_window": 32})).probs
    small = infer_maps(model, x, EvalConfig(**{**cfg.eval.__dict__, "gate_window": 16})).probs
    assert torch.allclose(base, same, atol=1e-6)
    assert not torch.allclose(base, small, atol=1e-4)
    res = evaluate_checkpoint(
        run / "best.pt",
        eval_overrides=["eval.gate_window=16"],
        gates=("classifier",),
        progress=False,
        out_dir=tmp_path_factory.mktemp("gw"),
    )
    # the override reached the scoring: the same confusion as the library path with the window
    from lpdseg.data.loaders import make_eval_loader, resolve_data
    from lpdseg.engine.evaluate import evaluate

    windowed = EvalConfig(**{**cfg.eval.__dict__, "gate_window": 16})
    loader = make_eval_loader(cfg, resolve_data(cfg, need_train=False), "test")
    direct = evaluate(
        model, loader, windowed, list(cfg.data.class_names), gate="classifier", progress=False
    )
    assert res["classifier"]["confusion"] == direct["confusion"]


def test_evaluate_with_glass_rule(tmp_path_factory, tiny_run_dir):
    from lpdseg.config import config_from_dict
    from lpdseg.data.loaders import make_eval_loader, resolve_data
    from lpdseg.engine.evaluate import evaluate
    from lpdseg.inference import evaluate_checkpoint, load_model

    run = tiny_run_dir
    ckpt = run / "best.pt"
    model, cfg = load_model(ckpt)
    d = cfg.to_dict()
    d["eval"]["glass_background"] = True
    glass_cfg = config_from_dict(d)
    off = evaluate_checkpoint(
        ckpt, gates=("labels",), progress=False, out_dir=tmp_path_factory.mktemp("off")
    )
    on = evaluate_checkpoint(
        ckpt,
        eval_overrides=["eval.glass_background=true"],
        gates=("labels",),
        progress=False,
        out_dir=tmp_path_factory.mktemp("on"),
    )
    c = len(cfg.data.class_names)
    # synthetic background is white glass: the rule can only add correct background pixels there
    assert on["labels"]["iou"][c] > off["labels"]["iou"][c]
    cm_off = torch.tensor(off["labels"]["confusion"])
    cm_on = torch.tensor(on["labels"]["confusion"])
    assert cm_on.sum() == cm_off.sum()
    assert cm_on[:, c].sum() > cm_off[:, c].sum()  # more pixels predicted background
    # the library path scores the same as the checkpoint path (models take RGB: no side channel)
    loader = make_eval_loader(glass_cfg, resolve_data(glass_cfg, need_train=False), "test")
    direct = evaluate(
        model, loader, glass_cfg.eval, list(cfg.data.class_names), gate="labels", progress=False
    )
    assert direct["confusion"] == on["labels"]["confusion"]


def test_eval_cli_takes_eval_overrides_only(tmp_path_factory, tiny_run_dir):
    from typer.testing import CliRunner

    from lpdseg.cli import app

    ckpt = tiny_run_dir / "best.pt"
    out = tmp_path_factory.mktemp("cli_eval")
    args = ["eval", str(ckpt), "--mode", "labels", "--out", str(out), "-q"]
    res = CliRunner().invoke(app, [*args, "eval.glass_background=true"])
    assert res.exit_code == 0, res.output
    assert "background" in res.output
    res = CliRunner().invoke(app, [*args, "model.head=cam"])
    assert res.exit_code == 2
    assert "only eval.*" in res.output


def test_eval_at_full_size_tiles_large_images_through_the_sliding_window(tiny_run_dir, monkeypatch):
    from lpdseg.inference import evaluation, load_model
    from lpdseg.models.decode import decode_scores

    model, cfg = load_model(tiny_run_dir / "best.pt")
    small = EvalConfig(**{**cfg.eval.__dict__, "max_side": 40, "tile": 32, "overlap": 0.5})
    score = evaluation.full_size_scorer(model, small, 5, tta=False)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    x = torch.rand(1, 3, 40, 40)
    whole = score(x, labels, ("labels", "classifier"))
    ref, _ = decode_scores(model, x, small, labels, ("labels", "classifier"), tta=False)
    assert all(torch.equal(whole[g], ref[g]) for g in ref)  # up to max_side: the image at once
    calls = []
    real = evaluation.sliding_window_predict
    monkeypatch.setattr(
        evaluation, "sliding_window_predict", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    image = torch.rand(1, 3, 72, 56)
    big = score(image, labels, ("labels", "classifier"))
    assert len(calls) == 1 and calls[0]["tile"] == 32 and calls[0]["overlap"] == 0.5
    assert big["labels"].shape == big["classifier"].shape == (1, 5, 72, 56)
    # the labels gate holds in every tile: absent classes never appear
    assert set(big["labels"].argmax(1).unique().tolist()) <= {0, 2, 4}
    # one forward per tile for both gates, the same scores as one sliding pass per gate
    one_pass = len(forwards)
    rgb = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
    for gate in ("labels", "classifier"):

        def per_gate(tiles, gate=gate):
            lab = labels.expand(tiles.shape[0], -1)
            return predict_scores(model, tiles, small, lab, gate, tta=False)

        ref = real(rgb, per_gate, 5, tile=32, overlap=0.5, progress=False)
        torch.testing.assert_close(big[gate][0], ref, rtol=1e-5, atol=1e-6)
    assert one_pass * 2 == len(forwards) - one_pass  # the reference ran the network twice
