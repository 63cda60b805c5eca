"""Per-class thresholds of the classifier gate, chosen on validation outputs."""

from __future__ import annotations

import itertools

import torch

from lpdseg.config import EvalConfig
from lpdseg.engine.calibration import _miou, choose_thresholds
from lpdseg.models.decode import class_gate

NAMES = ["A", "B"]


def _outputs(seed: int = 0):
    """Images where class k is present with probability p_k(present) and fills its half."""
    g = torch.Generator().manual_seed(seed)
    outputs = []
    for i in range(8):
        present = torch.tensor([i % 2 == 0, i % 4 < 2])
        # class A's classifier is shy (0.3 when present), class B's over-confident (0.7 absent)
        probs = torch.where(
            present, torch.tensor([0.3, 0.9]), torch.tensor([0.1, 0.7])
        ) + 0.01 * torch.rand(2, generator=g)
        truth = torch.full((8, 8), 2)
        truth[:, :4] = 0 if present[0] else 2
        truth[:, 4:] = 1 if present[1] else 2
        # each class map fires on its half whether or not the class is there: only the
        # gate can tell, so every wrongly gated class costs pixels
        fused = torch.zeros(2, 8, 8)
        fused[0, :, :4] = 1.0
        fused[1, :, 4:] = 1.0
        outputs.append((fused, probs, None, truth))
    return outputs


def test_thresholds_separate_each_class_and_beat_the_fixed_one():
    cfg = EvalConfig(bg_gamma=1.0)
    outputs = _outputs()
    thresholds, base, best = choose_thresholds(outputs, cfg, NAMES)
    probs = torch.stack([o[1] for o in outputs])
    present = torch.stack([torch.tensor([i % 2 == 0, i % 4 < 2]) for i in range(8)])
    for k in range(2):  # every image's presence is decided right
        assert probs[~present[:, k], k].max() <= thresholds[k] < probs[present[:, k], k].min()
    assert best == 1.0 and base < best


def test_coordinate_ascent_finds_the_brute_force_optimum_on_a_grid():
    cfg = EvalConfig(bg_gamma=1.0)
    outputs = _outputs(1)
    grid = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]
    brute = max(_miou(outputs, torch.tensor(t), cfg, NAMES) for t in itertools.product(grid, grid))
    _, _, best = choose_thresholds(outputs, cfg, NAMES)
    assert best >= brute


def test_the_gate_uses_per_class_thresholds_when_set():
    probs = torch.tensor([[0.25, 0.75]])
    assert class_gate(EvalConfig(), probs, None, "classifier").tolist() == [[False, True]]
    per_class = EvalConfig(cls_thresholds=[0.2, 0.8])
    assert class_gate(per_class, probs, None, "classifier").tolist() == [[True, False]]


def test_training_calibrates_the_gate_on_val_and_stores_it_in_best_pt(
    tiny_run_dir, tiny_run_factory
):
    import json

    from lpdseg.data.loaders import make_eval_loader, resolve_data
    from lpdseg.engine.calibration import collect_outputs
    from lpdseg.inference import load_model

    assert "gate_calibration" not in json.loads((tiny_run_dir / "summary.json").read_text())
    run = tiny_run_factory("eval.calibrate_gate=true", evaluate_test=True)  # opt-in
    record = json.loads((run / "summary.json").read_text())["gate_calibration"]
    model, cfg = load_model(run / "best.pt")
    assert record["images"] == 2  # the tiny set's val split
    assert record["val_mIoU_calibrated"] >= record["val_mIoU_fixed_threshold"]
    assert cfg.eval.cls_thresholds == record["cls_thresholds"]  # stored only when better
    # the record is reproducible from best.pt's weights and the val split
    fixed = EvalConfig(**{**cfg.eval.__dict__, "cls_thresholds": None})
    loader = make_eval_loader(cfg, resolve_data(cfg, need_train=False), "val")
    outputs = collect_outputs(model, loader, fixed, torch.device("cpu"))
    _, base, best = choose_thresholds(outputs, fixed, cfg.data.class_names)
    assert base == record["val_mIoU_fixed_threshold"] and best == record["val_mIoU_calibrated"]
