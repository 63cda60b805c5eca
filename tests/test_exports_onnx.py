"""`lpdseg export` / ``lpdseg.exports.onnx``: ONNX graphs that score like PyTorch.

The reference is ``predict_scores(model, tiles, cfg.eval, gate="classifier",
tta=False)``. Tolerance: scores within ``ATOL`` = 1e-4 (absolute; measured
about 5e-6 on these tiny runs) and argmax masks equal on at least 99.9 % of
pixels, on batches of other sizes than the one exported with. Thresholds are
chosen so that the classifier gate keeps some classes and drops others, with a
margin, so the gate is exercised rather than all-background.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'lpdseg[onnx]')"
)
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'lpdseg[onnx]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'lpdseg[onnx]')")


import lpdseg  # noqa: E402
from lpdseg.cli import app  # noqa: E402
from lpdseg.exports.onnx import (  # noqa: E402
    INSTALL_HINT,
    META_PREFIX,
    OnnxError,
    OnnxPredictor,
    export_model,
    onnx_metadata,
)
from lpdseg.inference import Predictor, load_model  # noqa: E402
from lpdseg.inference.sliding import sliding_window_predict  # noqa: E402
from lpdseg.models.decode import (  # noqa: E402
    GateHead,
    SeamlessDecoder,
    infer_maps,
    predict_scores,
    seamless_scores,
)

torch.set_num_threads(2)

ATOL = 1e-4
MASK_AGREEMENT = 0.999
TILE = 64
BATCHES = (1, 3, 5)  # exported with a batch of 2


def _tiles(n: int, seed: int) -> torch.Tensor:
    """``n`` RGB tiles in [0, 1]: smooth colour blobs + noise, with a glass corner."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(TILE, TILE), mode="bilinear")
    x = (0.7 * x + 0.3 * torch.rand(n, 3, TILE, TILE, generator=g)).clamp(0, 1)
    x[:, :, :16, :16] = 0.93 + 0.02 * torch.rand(n, 1, 16, 16, generator=g)  # white glass
    return x


def _batches(seed: int) -> list[torch.Tensor]:
    return [_tiles(b, seed + b) for b in BATCHES]


def _mixed_threshold(model, eval_cfg, batches: list[torch.Tensor]) -> float:
    """A threshold between two of the batches' class probabilities, far from all of them."""
    probs = torch.cat([infer_maps(model, x, eval_cfg, tta=False).probs for x in batches])
    p = probs.flatten().sort().values
    lo, hi = len(p) // 4, 3 * len(p) // 4
    gaps = p[lo + 1 : hi + 1] - p[lo:hi]
    i = lo + int(gaps.argmax())
    assert gaps.max() > 2e-4, "class probabilities too close together to gate robustly"
    return float((p[i] + p[i + 1]) / 2)


@pytest.fixture(scope="module")
def runs(tiny_run_dir, tiny_run_factory) -> dict[str, Path]:
    """The shared tiny LPD run and a CAM one (``model.head=cam``), 2 steps at 32 px."""
    return {
        "lpd": tiny_run_dir / "best.pt",
        "cam": tiny_run_factory("model.head=cam") / "best.pt",
    }


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, dict]:
    """Each head exported once: CAM through the CLI (its own threshold gates), LPD by API."""
    out = tmp_path_factory.mktemp("onnx")
    result: dict[str, dict] = {}

    cam_path = out / "cam.onnx"
    res = CliRunner().invoke(
        app, ["export", str(runs["cam"]), str(cam_path), "--tile", str(TILE), "-q"]
    )
    assert res.exit_code == 0, res.output
    assert str(cam_path) in res.output and cam_path.is_file()
    model, cfg = load_model(runs["cam"])
    result["cam"] = {"path": cam_path, "model": model, "eval": cfg.eval, "cfg": cfg}

    model, cfg = load_model(runs["lpd"])
    batches = _batches(0)
    eval_cfg = dataclasses.replace(
        cfg.eval, cls_threshold=_mixed_threshold(model, cfg.eval, batches)
    )
    cfg = dataclasses.replace(cfg, eval=eval_cfg)
    lpd_path = export_model(model, cfg, out / "lpd.onnx", tile=TILE, checkpoint=runs["lpd"])
    result["lpd"] = {"path": lpd_path, "model": model, "eval": eval_cfg, "cfg": cfg}
    return result


def _compare(session: OnnxPredictor, model, eval_cfg, batches) -> float:
    """Assert ONNX == PyTorch on every batch; the largest absolute difference."""
    worst = 0.0
    kept = []
    for x in batches:
        got = session(x)
        want = predict_scores(model, x, eval_cfg, gate="classifier", tta=False)
        assert got.shape == want.shape == (x.shape[0], session.num_labels, TILE, TILE)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
        assert agree >= MASK_AGREEMENT, f"masks agree on {agree:.4%} of pixels"
        worst = max(worst, (got - want).abs().max().item())
        kept.append(want[:, :-1].amax((2, 3)) > 0)
    kept = torch.cat(kept)
    assert kept.any() and not kept.all(), "the classifier gate kept all or no classes"
    return worst


@pytest.mark.parametrize("head", ["lpd", "cam"])
def test_scores_match_pytorch(exports, head):
    e = exports[head]
    worst = _compare(OnnxPredictor(e["path"], threads=2), e["model"], e["eval"], _batches(10))
    print(f"{head}: max |onnx - torch| = {worst:.2e}")


def test_glass_rule_and_gate_window_replace_existing_file(runs, tmp_path):
    """eval.glass_background + eval.gate_window in the graph; overwrite=True replaces a file."""
    model, cfg = load_model(runs["lpd"])
    batches = _batches(20)
    eval_cfg = dataclasses.replace(cfg.eval, glass_background=True, gate_window=32)
    eval_cfg = dataclasses.replace(
        eval_cfg, cls_threshold=_mixed_threshold(model, eval_cfg, batches)
    )
    cfg = dataclasses.replace(cfg, eval=eval_cfg)
    path = tmp_path / "glass.onnx"
    path.write_bytes(b"an older file")
    with pytest.raises(OnnxError, match="already exists"):
        export_model(model, cfg, path, tile=TILE)
    assert path.read_bytes() == b"an older file"
    export_model(model, cfg, path, tile=TILE, overwrite=True)
    session = OnnxPredictor(path, threads=2)
    assert session.metadata["glass_background"] == "true"
    _compare(session, model, eval_cfg, batches)
    glass_label = session(batches[1]).argmax(1)[:, :16, :16]
    assert (glass_label == session.num_labels - 1).all()


def test_metadata_round_trips(exports, runs):
    e = exports["cam"]
    session = OnnxPredictor(e["path"])
    reference = Predictor(e["model"], e["cfg"])
    assert session.class_names == reference.class_names
    assert session.colors == reference.colors
    assert session.num_labels == reference.num_labels
    assert session.tile == TILE
    assert session.mpp is None  # the tiny run's config has no data.mpp
    assert session.threshold == e["cfg"].eval.cls_threshold
    assert (session.gate, session.tta) == ("classifier", False)
    meta = session.metadata
    assert meta["version"] == lpdseg.__version__
    assert meta["checkpoint"] == str(runs["cam"].resolve())
    assert "RGB in [0, 1]" in meta["input"] and "NCHW float32" in meta["input"]
    assert "background last" in meta["output"]

    proto = onnx.load(str(e["path"]))
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[META_PREFIX + "class_names"]) == reference.class_names
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "images" and dims[0].dim_param  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [3, TILE, TILE]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].name == "scores"


def test_metadata_has_mpp_when_the_config_does(exports):
    cfg = copy.deepcopy(exports["cam"]["cfg"])
    cfg.data.mpp = 0.5
    meta = onnx_metadata(cfg, TILE, "x.pt")
    assert json.loads(meta[META_PREFIX + "mpp"]) == 0.5
    assert META_PREFIX + "mpp" not in onnx_metadata(exports["cam"]["cfg"], TILE)


def test_drop_in_for_the_sliding_window(exports):
    """OnnxPredictor works as ``predict_fn`` where Predictor does, with the same result."""
    e = exports["cam"]
    session = OnnxPredictor(e["path"], threads=2)
    reference = Predictor(e["model"], e["cfg"])
    image = (np.random.default_rng(0).random((100, 90, 3)) * 255).astype(np.uint8)
    got, want = (
        sliding_window_predict(
            image, fn, session.num_labels, tile=TILE, batch_size=3, progress=False
        )
        for fn in (session, reference)
    )
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_predictor_rejects_other_tile_sizes_and_labels(exports):
    session = OnnxPredictor(exports["cam"]["path"])
    with pytest.raises(ValueError, match=f"3 x {TILE} x {TILE}"):
        session(torch.rand(1, 3, TILE + 8, TILE))
    with pytest.raises(ValueError, match="classifier gate"):
        session(torch.rand(1, 3, TILE, TILE), labels=torch.ones(1, 4))
    assert session(torch.rand(0, 3, TILE, TILE)).shape == (0, session.num_labels, TILE, TILE)


def test_cli_refuses_an_existing_output(exports, runs):
    path = exports["cam"]["path"]
    before = path.read_bytes()
    res = CliRunner().invoke(app, ["export", str(runs["cam"]), str(path), "-q"])
    assert res.exit_code == 2
    assert str(path) in res.output and "--overwrite" in res.output
    assert path.read_bytes() == before


def test_cli_missing_checkpoint(tmp_path):
    missing = tmp_path / "nowhere" / "best.pt"
    res = CliRunner().invoke(app, ["export", str(missing), str(tmp_path / "m.onnx"), "-q"])
    assert res.exit_code == 2
    assert str(missing) in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnxruntime_names_the_extra(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import -> ImportError
    with pytest.raises(OnnxError, match="onnxruntime") as info:
        OnnxPredictor(exports["cam"]["path"])
    assert INSTALL_HINT in str(info.value)


def test_missing_or_foreign_onnx_file(tmp_path):
    with pytest.raises(OnnxError, match="does not exist"):
        OnnxPredictor(tmp_path / "none.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), foreign
    )
    with pytest.raises(OnnxError, match="not an lpdseg export"):
        OnnxPredictor(foreign)


@pytest.mark.parametrize("head", ["lpd", "cam"])
def test_raw_outputs_give_the_seamless_maps_of_pytorch(exports, head):
    """The export's raw outputs -> the same stitchable maps and canvas decision as PyTorch."""
    e = exports[head]
    session = OnnxPredictor(e["path"], threads=2)
    reference = Predictor(e["model"], e["cfg"], tta=False)
    assert session.supports_seamless and reference.supports_seamless
    assert session.slide_channels == reference.slide_channels
    assert session.gate_window_px == reference.gate_window_px
    assert session.gate_head == GateHead.of(e["model"])
    x = _tiles(3, 5)
    for size in (None, (TILE // 4, TILE // 4)):  # full resolution and the canvas grid
        got, want = session.slide_raw(x, size), reference.slide_raw(x, size)
        assert got.shape == want.shape and got.shape[1] == session.slide_channels
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # one canvas decided by each predictor's decoder (the ONNX one has no nn.Module)
    raw = reference.slide_raw(x)[0]
    valid = torch.ones(raw.shape[-2:], dtype=torch.bool)
    window = 9
    want = seamless_scores(raw, valid, e["model"], reference.eval_cfg, window)
    decoder = session.seamless_decoder(window)
    assert isinstance(decoder, SeamlessDecoder)
    lo, hi = decoder.stage_extremes(raw, valid)
    flo, fhi = decoder.fused_extremes(raw, valid, lo, hi)
    from lpdseg.models.decode import SeamlessNorm

    got = decoder.scores(raw, valid, SeamlessNorm(lo, hi, flo, fhi))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_gate_head_carries_merge_and_bias(exports):
    """A head with a logit bias and the softmax merge: GateHead's logits equal the module's."""
    from lpdseg.models.decode import gate_logits

    model = copy.deepcopy(exports["lpd"]["model"])
    head = model.head
    head.merge = "softmax"
    head.logit_bias = torch.nn.Parameter(torch.randn(4, head.num_classes))
    spec = GateHead.of(model)
    assert spec.merge == "softmax" and spec.logit_bias == tuple(head.logit_bias[3].tolist())
    assert GateHead.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    pooled = torch.randn(2, head.num_classes * head.prototypes_per_class, 3, 4)
    torch.testing.assert_close(gate_logits(spec, pooled), gate_logits(model, pooled))
    # the module's own window logits (GAP, merge, bias over the whole map) agree too
    out = model(_tiles(2, 1))
    cells = out.proto_maps[3].flatten(1, 2)
    whole = gate_logits(spec, cells.mean((-2, -1), keepdim=True))[..., 0, 0]
    torch.testing.assert_close(whole, out.logits[3], atol=1e-5, rtol=0)
