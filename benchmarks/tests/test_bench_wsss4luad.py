"""benchmarks/wsss4luad.py: re-scoring finished runs, refusing mismatched ones, folds by image.

Moved from tests/test_wsss4luad.py (tests/ does not import benchmarks/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _tiny import load_script, tiny_run

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def bench():
    return load_script("wsss4luad")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("tinyrun"))


def test_benchmark_rescores_a_finished_run_with_eval_overrides(bench, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    stamp = (out / "best.pt").stat().st_mtime_ns
    plain = bench.run_one([], out, ("labels",), False, ["eval.glass_background=false"])
    glass = bench.run_one([], out, ("labels",), False, ["eval.glass_background=true"])
    assert plain["train_s"] is None and glass["train_s"] is None  # nothing retrained
    assert (out / "best.pt").stat().st_mtime_ns == stamp
    scored = sorted(out.glob("eval_*/test_metrics.json"))
    assert len(scored) == 2  # one folder per set of eval overrides
    accs = {json.loads(f.read_text())["labels"]["pixel_acc"] for f in scored}
    assert accs == {plain["scores"]["labels"]["pixel_acc"], glass["scores"]["labels"]["pixel_acc"]}
    # synthetic background is white glass: the rule finds background the maps miss
    bg_plain = plain["scores"]["labels"]["per_class_IoU"][-1]
    bg_glass = glass["scores"]["labels"]["per_class_IoU"][-1]
    assert bg_glass > bg_plain
    stamps = [f.stat().st_mtime_ns for f in scored]
    again = bench.run_one([], out, ("labels",), False, ["eval.glass_background=true"])
    assert again["scores"]["labels"]["mIoU"] == glass["scores"]["labels"]["mIoU"]
    assert [f.stat().st_mtime_ns for f in scored] == stamps  # cached, not scored twice


def test_benchmark_refuses_a_finished_run_trained_with_other_settings(
    bench, finished_run, tmp_path
):
    # runs are reused by folder name: another --input-scale/--steps into the same --work
    # must stop, naming the folder and the key, instead of scoring the old checkpoint
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    steps = yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"]
    bench.check_finished_run(out, [f"train.max_steps={steps}", "train.threads=1"])  # same run
    with pytest.raises(SystemExit, match="model.input_scale=1.0.*2.0"):
        bench.run_one(["model.input_scale=2"], out, ("labels",), False)
    with pytest.raises(SystemExit, match=f"train.max_steps={steps}"):
        bench.check_finished_run(out, [f"train.max_steps={steps + 1}"])


def test_benchmark_folds_are_disjoint_by_image(bench):
    stems = [f"{i:02d}" for i in range(31)]
    folds = bench.make_folds(stems, 3, seed=0)
    assert sorted(s for f in folds for s in f) == stems
    assert [len(f) for f in folds] == [11, 10, 10]
    assert folds == bench.make_folds(stems, 3, seed=0)


def test_results_default_to_the_results_folder(bench):
    args = bench.parse_args([])
    assert args.results.parent == Path(bench.__file__).resolve().parent / "results"


def test_validation_images_come_from_the_training_images_of_the_fold(bench):
    train = [f"{i:02d}" for i in range(20)]
    rest, val = bench.split_val(train, 3, seed=1)
    assert len(val) == 3 and not set(val) & set(rest) and sorted(rest + val) == train
    assert (rest, val) == bench.split_val(train, 3, seed=1)
    assert bench.split_val(train, 0, seed=1) == (train, [])
    with pytest.raises(SystemExit, match="no training image"):
        bench.split_val(train[:2], 2, seed=1)
    # a class in few images (here class 2 in 4 of 20) keeps 3 of them in training
    classes = {s: ({0, 2} if i < 4 else {0, 1}) for i, s in enumerate(train)}
    for seed in range(10):
        rest, val = bench.split_val(train, 5, seed=seed, classes=classes)
        assert len(val) == 5 and sum(2 in classes[s] for s in val) <= 1
        assert sum(2 in classes[s] for s in rest) >= bench.VAL_KEEP_PER_CLASS
    # class 1 (16 images) lets 13 go, class 2 one more
    with pytest.raises(SystemExit, match="only 14 images"):
        bench.split_val(train, 18, seed=0, classes=classes)


def test_fold_data_is_reused_when_identical_and_refused_when_not(bench, tmp_path):
    import numpy as np
    from PIL import Image

    from lpdseg.data.patches import PatchRule

    img_dir, mask_dir = tmp_path / "img", tmp_path / "mask"
    img_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)).save(
            img_dir / f"{stem}.png"
        )
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 32:] = 1
        Image.fromarray(mask).save(mask_dir / f"{stem}.png")
    rule = PatchRule(32, 32, 0.02, 0.5)
    root = tmp_path / "fold0"
    first = bench.prepare_fold(img_dir, mask_dir, root, rule, ["a", "b"], ["c"], ["d"])
    assert (root / "val" / "img").is_dir() and first["patches"] == 8
    stamp = (root / "patches.json").stat().st_mtime_ns
    again = bench.prepare_fold(img_dir, mask_dir, root, rule, ["a", "b"], ["c"], ["d"])
    assert again == first and (root / "patches.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="other splits"):
        bench.prepare_fold(img_dir, mask_dir, root, rule, ["a"], ["b", "c"], ["d"])
    with pytest.raises(SystemExit, match="another patch rule"):
        bench.prepare_fold(
            img_dir, mask_dir, root, PatchRule(16, 16, 0.02, 0.5), ["a", "b"], ["c"], ["d"]
        )


def test_stage2_pseudo_masks_are_reused_when_finished_and_remade_when_not(
    bench, finished_run, tmp_path
):
    out = tmp_path / "pseudo"
    best, last = finished_run / "best.pt", finished_run / "last.pt"
    assert bench.pseudo_masks(best, out) == out
    masks = sorted((out / "masks").iterdir())
    assert masks, "no pseudo masks written"
    stamp = (out / "pseudo.json").stat().st_mtime_ns
    bench.pseudo_masks(best, out)  # finished from the same checkpoint: reused
    assert (out / "pseudo.json").stat().st_mtime_ns == stamp
    bench.pseudo_masks(last, out)  # another checkpoint: made again from it
    assert json.loads((out / "pseudo.json").read_text())["checkpoint"] == str(last)
    (out / "pseudo.json").unlink()  # what a run cut short leaves: masks, no pseudo.json
    bench.pseudo_masks(best, out)
    assert json.loads((out / "pseudo.json").read_text())["checkpoint"] == str(best)
    assert sorted(p.name for p in (out / "masks").iterdir()) == [p.name for p in masks]
    bench.pseudo_masks(best, out, 0.2)  # another ignore margin: made again with it
    assert json.loads((out / "pseudo.json").read_text())["ignore_margin"] == 0.2


def test_default_protocol_runs_the_ablation_and_bounds_with_the_first_seed_only(bench):
    args = bench.parse_args([])
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    first_only = set(args.first_seed_only.split(","))
    jobs = bench.protocol_jobs(methods, ["effnet"], seeds, args.supervised, first_only)
    per_method = {}
    for seed, method, _ in jobs:
        per_method.setdefault(method, []).append(seed)
    assert per_method == {
        "cam": [0, 1],
        "pbip": [0, 1],
        "lpd": [0, 1],
        "lpd_nodiv": [0],
        "lpd_stage2": [0],
        "supervised": [0],
    }
    # stage 2 after its stage-1 method in the order they run; the bound last
    order = [m for s, m, _ in jobs if s == 0]
    assert order.index("lpd_stage2") > order.index("lpd") and order[-1] == "supervised"


def test_segmentation_networks_are_scored_in_windows_of_the_patch_size(bench, monkeypatch):
    # what run_job hands to run_one: the user's eval overrides, plus the window rule for
    # the seg networks only (the gated methods' image-level decision needs the whole image)
    seen = {}
    monkeypatch.setattr(
        bench, "run_one", lambda ov, out, modes, tta, scoring, last: seen.update({modes: scoring})
    )
    monkeypatch.setattr(bench, "pseudo_masks", lambda *a: Path("pseudo"))
    root = Path("fold")
    for windows in (True, False):
        seen.clear()
        flag = "--seg-windows" if windows else "--no-seg-windows"
        args = bench.parse_args(["--size", "64", "--eval-overrides", "eval.bg_gamma=5", flag])
        for method in ("supervised", "lpd"):
            bench.run_job(args, root, root, method, "effnet", 0, None)
        window = ["eval.max_side=64", "eval.tile=64", "eval.overlap=0.5"] if windows else []
        assert seen[("seg",)] == ["eval.bg_gamma=5", *window]
        assert seen[("classifier", "labels")] == ["eval.bg_gamma=5"]
    # the window settings are valid eval settings of the preset
    from lpdseg.config import load_config

    cfg = load_config("wsss4luad", bench.seg_window_overrides(64))
    assert (cfg.eval.max_side, cfg.eval.tile, cfg.eval.overlap) == (64, 64, 0.5)
