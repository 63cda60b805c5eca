"""The weights loader: file formats, containers, prefixes, strictness and its errors."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lpdseg.errors import CheckpointError
from lpdseg.models.mit import mit_b0, mit_b1
from lpdseg.models.weights import LoadReport, load_into, read_state_dict, strip_wrapper_prefixes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained():
    """A B0 with non-default weights and its output on a fixed input."""
    torch.manual_seed(0)
    model = mit_b0().eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(x)
    return model, x, out


def _fresh():
    torch.manual_seed(123)  # a different init than `trained`
    return mit_b0().eval()


def _same_outputs(model, x, ref) -> bool:
    with torch.no_grad():
        return all(torch.equal(a, b) for a, b in zip(model(x), ref, strict=True))


@pytest.mark.parametrize("fmt", ["pth", "pt", "bin", "safetensors"])
def test_round_trip_gives_identical_outputs(tmp_path, trained, fmt):
    model, x, out = trained
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    fresh = _fresh()
    assert not _same_outputs(fresh, x, out)
    report = load_into(fresh, read_state_dict(path), source=str(path))
    assert report.clean and report.loaded == len(model.state_dict())
    assert _same_outputs(fresh, x, out)


def test_wrapped_prefixed_file_with_head_loads(tmp_path, trained):
    model, x, out = trained
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.head.weight"] = torch.randn(1000, 256)
    state["module.head.bias"] = torch.randn(1000)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": state, "epoch": 300, "arch": "mit_b0"}, path)

    read = read_state_dict(path)
    assert "patch_embed1.proj.weight" in read and "head.weight" in read
    assert not any(k.startswith("module.") for k in read)
    fresh = _fresh()
    report = load_into(fresh, read, ignore_prefixes=("head.",))
    assert report.clean and sorted(report.ignored) == ["head.bias", "head.weight"]
    assert _same_outputs(fresh, x, out)
    # the same file through the backbone factory
    assert _same_outputs(mit_b0(weights=path).eval(), x, out)


def test_nested_containers_and_compile_prefix(tmp_path, trained):
    model, x, out = trained
    state = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "nested.pt"
    torch.save({"model": {"module": state}, "step": 7}, path)
    fresh = _fresh()
    load_into(fresh, read_state_dict(path))
    assert _same_outputs(fresh, x, out)


def test_strip_wrapper_prefixes():
    assert strip_wrapper_prefixes("module._orig_mod.a.b") == "a.b"
    assert strip_wrapper_prefixes("block1.module.x") == "block1.module.x"


def test_a_weight_called_model_is_not_unwrapped(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"model": torch.ones(2), "b": torch.zeros(1)}, path)
    assert set(read_state_dict(path)) == {"model", "b"}


def test_shape_mismatch_always_refused(trained):
    model, _, _ = trained
    state = dict(model.state_dict())
    state["block1.0.mlp.fc1.weight"] = torch.zeros(64, 32)  # expected 128 x 32
    for strict in (True, False):
        fresh = _fresh()
        before = fresh.state_dict()["patch_embed1.proj.weight"].clone()
        with pytest.raises(CheckpointError) as err:
            load_into(fresh, state, strict=strict, source="b1.pth")
        msg = str(err.value)
        assert "b1.pth" in msg and "block1.0.mlp.fc1.weight" in msg
        assert "model [128, 32]" in msg and "file [64, 32]" in msg
        assert err.value.report.mismatched == [("block1.0.mlp.fc1.weight", (128, 32), (64, 32))]
        # nothing was loaded
        assert torch.equal(fresh.state_dict()["patch_embed1.proj.weight"], before)


def test_b1_file_into_b0_names_keys_and_shapes(tmp_path):
    with torch.device("meta"):
        b1_state = mit_b1().state_dict()
    path = tmp_path / "mit_b1.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in b1_state.items()}, path)
    with pytest.raises(
        CheckpointError,
        match=r"patch_embed1\.proj\.weight \(model \[32, 3, 7, 7\], file \[64, 3, 7, 7\]\)",
    ):
        load_into(_fresh(), read_state_dict(path), source=str(path))


def test_missing_keys_strict_lists_them_and_suggests_fix(trained):
    model, _, _ = trained
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("block4.")}
    missing = [k for k in model.state_dict() if k.startswith("block4.")]
    assert len(missing) > 10
    with pytest.raises(CheckpointError) as err:
        load_into(_fresh(), state, source="partial.pth")
    msg = str(err.value)
    assert f"missing keys {len(missing)}: " in msg
    assert all(k in msg for k in missing[:10]) and missing[10] not in msg
    assert f"(+{len(missing) - 10} more)" in msg
    assert "strict=False" in msg and "backbone name" in msg


def test_unexpected_keys_strict_refused(trained):
    model, _, _ = trained
    state = dict(model.state_dict(), **{"decoder.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys 1: decoder\.weight"):
        load_into(_fresh(), state)
    # ignored prefixes are neither refused nor reported
    report = load_into(_fresh(), state, ignore_prefixes=("decoder.",))
    assert report.clean and report.ignored == ["decoder.weight"]


def test_non_strict_loads_what_matches_and_reports(trained, caplog):
    model, _, _ = trained
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("norm4.")}
    state["extra.bias"] = torch.zeros(2)
    fresh = _fresh()
    with caplog.at_level(logging.WARNING, logger="lpdseg.models.weights"):
        report = load_into(fresh, state, strict=False, source="partial.pth")
    assert report.missing == ["norm4.weight", "norm4.bias"]
    assert report.unexpected == ["extra.bias"]
    assert report.mismatched == [] and report.loaded == len(state) - 1
    assert torch.equal(fresh.block4[1].mlp.fc2.weight, model.block4[1].mlp.fc2.weight)
    assert "partial.pth" in caplog.text and "norm4.weight" in caplog.text


def test_report_summary():
    report = LoadReport(
        missing=[f"k{i}" for i in range(12)],
        unexpected=["u"],
        mismatched=[("m", (2,), (3,))],
        loaded=5,
        ignored=["head.weight"],
    )
    text = report.summary()
    assert text.startswith("loaded 5 tensors")
    assert "missing 12: k0," in text and "(+2 more)" in text and "k11" not in text
    assert "unexpected 1: u" in text and "m [2] vs [3]" in text and "ignored 1" in text
    assert str(report) == text and not report.clean


def test_buffers_are_loaded_too():
    src, dst = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    src.running_mean.fill_(2.0)
    report = load_into(dst, src.state_dict())
    assert torch.equal(dst.running_mean, src.running_mean) and report.loaded == 5


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such weights file"):
        read_state_dict(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_unreadable_file_names_it_and_the_fix(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(b"this is not a weights file")
    with pytest.raises(CheckpointError, match=r"junk.*cannot read weights.*state_dict\(\)"):
        read_state_dict(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(nn.Linear(2, 2), path)  # a module object, not a state dict
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_no_tensors_and_non_tensor_entries(tmp_path, caplog):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no tensors found.*epoch"):
        read_state_dict(path)
    path2 = tmp_path / "mixed.pth"
    torch.save(OrderedDict(w=torch.ones(1), note="hi"), path2)
    with caplog.at_level(logging.WARNING, logger="lpdseg.models.weights"):
        assert set(read_state_dict(path2)) == {"w"}
    assert "note" in caplog.text


def test_tensor_list_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(path)
