"""Tests of the synthetic H&E generator (lpdseg.data.synthetic)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lpdseg.data import synthetic as S
from lpdseg.errors import ConfigError, DataError

NAME_RE = re.compile(r"^(\d{6})\+synth(\d{2})\[([01]{4})\]\.png$")


def _label_from_mask(mask: np.ndarray) -> np.ndarray:
    frac = np.bincount(mask.ravel(), minlength=5)[:4] / mask.size
    return (frac >= S.MIN_LABEL_FRACTION).astype(np.uint8)


def _features(image: np.ndarray) -> np.ndarray:
    """Mean RGB, local variance (texture) and fraction of nuclear (dark, blue) pixels."""
    x = image.astype(np.float32) / 255.0
    grey = x.mean(axis=-1)
    local_var = cv2.blur(grey * grey, (5, 5)) - cv2.blur(grey, (5, 5)) ** 2
    nuclear = ((grey < 0.55) & (x[..., 2] > x[..., 1] + 0.15)).mean()
    return np.array([*x.reshape(-1, 3).mean(axis=0), 20 * local_var.mean(), nuclear])


@pytest.fixture(scope="module")
def single_class_features() -> dict[tuple[int, int], np.ndarray]:
    """Features of 8 single-class, glass-free 128 px patches per (class, sub-type)."""
    out = {}
    for c in range(4):
        for s in range(2):
            patches = [
                S.generate_patch(
                    10_000 + 100 * (2 * c + s) + i, 128, classes=[c], subtype=s, background=False
                )
                for i in range(8)
            ]
            for p in patches:  # the requested class and sub-type are what we got
                assert p.label.tolist() == [int(k == c) for k in range(4)]
                assert p.subtypes[c] == s
            out[c, s] = np.stack([_features(p.image) for p in patches])
    return out


def test_constants() -> None:
    assert S.CLASS_NAMES == ("TUM", "STR", "LYM", "NEC")
    assert S.BACKGROUND_INDEX == 4
    assert S.MIN_LABEL_FRACTION == 0.02
    assert set(S.SUBTYPES) == set(S.CLASS_NAMES)
    assert all(len(v) >= 2 and len(set(v)) == len(v) for v in S.SUBTYPES.values())
    assert isinstance(S.GENERATOR_VERSION, str) and S.GENERATOR_VERSION


def test_deterministic_from_seed() -> None:
    a, b, c = S.generate_patch(123), S.generate_patch(123), S.generate_patch(124)
    for field in ("image", "mask", "label", "subtypes"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
    assert a.image.tobytes() != c.image.tobytes()
    assert a.mask.tobytes() != c.mask.tobytes()


@pytest.mark.parametrize("size", [224, 96, 33])
def test_shapes_and_dtypes(size: int) -> None:
    p = S.generate_patch(5, size)
    assert p.image.shape == (size, size, 3) and p.image.dtype == np.uint8
    assert p.mask.shape == (size, size) and p.mask.dtype == np.uint8
    assert p.label.shape == (4,) and p.label.dtype == np.uint8
    assert p.subtypes.shape == (4,) and p.subtypes.dtype == np.int8
    assert set(np.unique(p.mask).tolist()) <= {0, 1, 2, 3, 4}


@pytest.mark.filterwarnings("error")  # e.g. no overflow in any texture
def test_label_follows_mask_rule_over_many_seeds() -> None:
    n_classes, has_glass = [], []
    for seed in range(80):
        p = S.generate_patch(seed, 96)
        frac = np.bincount(p.mask.ravel(), minlength=5)[:4] / p.mask.size
        np.testing.assert_array_equal(p.label, _label_from_mask(p.mask))
        # Mask and label agree: no class has pixels below the rule (they are reassigned).
        np.testing.assert_array_equal(frac > 0, p.label.astype(bool))
        np.testing.assert_array_equal(p.subtypes >= 0, p.label.astype(bool))
        assert np.all(p.subtypes < 2)
        if (p.mask == 4).any():  # glass and holes are bright
            assert p.image[p.mask == 4].mean() > 200
        n_classes.append(int(p.label.sum()))
        has_glass.append(bool((p.mask == 4).any()))
    assert set(n_classes) == {1, 2, 3}
    assert 0.2 < np.mean(has_glass) < 0.95  # glass/holes in some patches, not all


def test_single_class_and_no_background() -> None:
    for c in range(4):
        p = S.generate_patch(40 + c, 96, classes=[c], background=False)
        assert p.label.tolist() == [int(k == c) for k in range(4)]
        assert np.all(p.mask == c)
        assert p.subtypes[c] in (0, 1) and np.all(np.delete(p.subtypes, c) == -1)
    # With background allowed a single-class patch still keeps its class (>= 30 % tissue).
    for seed in range(20):
        p = S.generate_patch(seed, 64, classes=[2])
        assert p.label.tolist() == [0, 0, 1, 0]
        assert set(np.unique(p.mask).tolist()) <= {2, 4}


def test_forced_subtype_is_recorded() -> None:
    for s in (0, 1):
        for seed in range(10):
            p = S.generate_patch(seed, 64, subtype=s)
            assert np.all(p.subtypes[p.label == 1] == s)
            assert np.all(p.subtypes[p.label == 0] == -1)


def test_explicit_classes() -> None:
    p = S.generate_patch(3, 128, classes=[0, 3], background=False)
    assert p.label[1] == 0 and p.label[2] == 0
    assert set(np.unique(p.mask).tolist()) <= {0, 3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"classes": [4]},
        {"classes": []},
        {"classes": [1, 1]},
        {"subtype": 2},
        {"subtype": -1},
        {"size": 8},
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict) -> None:
    size = kwargs.pop("size", 64)
    with pytest.raises(ConfigError):
        S.generate_patch(0, size, **kwargs)


def test_negative_seed_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="seed"):
        S.generate_patch(-1, 64)


def test_subtypes_differ_more_than_patches_within_a_subtype(
    single_class_features: dict[tuple[int, int], np.ndarray],
) -> None:
    allf = np.concatenate(list(single_class_features.values()))
    scale = allf.std(axis=0)
    for c in range(4):
        a = single_class_features[c, 0] / scale
        b = single_class_features[c, 1] / scale
        between = np.linalg.norm(a.mean(axis=0) - b.mean(axis=0))
        # Typical distance of a patch to its own sub-type's mean.
        within = np.mean([np.linalg.norm(x - x.mean(axis=0), axis=1).mean() for x in (a, b)])
        assert between > 2.0 * within, (S.CLASS_NAMES[c], between, within)


def test_classes_not_separable_by_mean_colour(
    single_class_features: dict[tuple[int, int], np.ndarray],
) -> None:
    rgb = {
        c: np.concatenate([single_class_features[c, s][:, :3] for s in (0, 1)]) for c in range(4)
    }
    # Every pair of classes overlaps in the range of mean R, G and B.
    for c in range(4):
        for d in range(c + 1, 4):
            lo = np.maximum(rgb[c].min(axis=0), rgb[d].min(axis=0))
            hi = np.minimum(rgb[c].max(axis=0), rgb[d].max(axis=0))
            assert np.all(lo < hi), (S.CLASS_NAMES[c], S.CLASS_NAMES[d])
    # A nearest-centroid classifier on mean colour is far from perfect.
    x = np.concatenate([rgb[c] for c in range(4)])
    y = np.repeat(np.arange(4), [len(rgb[c]) for c in range(4)])
    centroids = np.stack([rgb[c].mean(axis=0) for c in range(4)])
    pred = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y).mean() < 0.7


def test_splits_use_distinct_seeds() -> None:
    seeds = {S._patch_seed(0, split, i) for split in ("training", "val", "test") for i in range(50)}
    assert len(seeds) == 150
    assert S._patch_seed(0, "val", 3) != S._patch_seed(1, "val", 3)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_write_dataset_layout(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    summary = S.write_dataset(root, n_train=12, n_val=3, n_test=4, size=48, seed=7, progress=False)
    assert summary["training"] == 12 and summary["val"] == 3 and summary["test"] == 4

    names = sorted(p.name for p in (root / "training").iterdir())
    assert len(names) == 12
    labels = {}
    for name in names:
        m = NAME_RE.match(name)
        assert m, name
        label = np.array([int(ch) for ch in m.group(3)])
        assert label.sum() >= 1  # no all-zero training label
        labels[name] = label
        im = Image.open(root / "training" / name)
        assert im.mode == "RGB" and im.size == (48, 48)
    assert sum(int(v.sum() == 1) for v in labels.values()) >= round(0.3 * 12)

    with open(root / "training_subtypes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == names
    for r in rows:
        assert r["label"] == NAME_RE.match(r["file"]).group(3)
        for k, cname in enumerate(S.CLASS_NAMES):
            sub = int(r[f"{cname}_subtype"])
            assert (sub >= 0) == (r["label"][k] == "1") and sub < 2

    for split, n in (("val", 3), ("test", 4)):
        imgs = sorted((root / split / "img").iterdir())
        masks = sorted((root / split / "mask").iterdir())
        assert (
            [p.name for p in imgs] == [p.name for p in masks] == [f"{i:06d}.png" for i in range(n)]
        )
        for p in masks:
            with Image.open(p) as m:
                assert m.mode == "L" and m.size == (48, 48)
                assert set(np.unique(np.asarray(m)).tolist()) <= {0, 1, 2, 3, 4}
    assert not list(root.rglob("*.tmp"))

    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["generator_version"] == S.GENERATOR_VERSION and meta["seed"] == 7
    assert meta["size"] == 48 and meta["counts"] == {"training": 12, "val": 3, "test": 4}
    assert meta["class_names"] == list(S.CLASS_NAMES) and "0.02" in meta["label_rule"]
    assert meta["subtypes"] == {k: list(v) for k, v in S.SUBTYPES.items()}

    # Same arguments -> identical files (also when rewriting the same folder).
    other = tmp_path / "again"
    S.write_dataset(other, n_train=12, n_val=3, n_test=4, size=48, seed=7, progress=False)
    assert _tree_bytes(root) == _tree_bytes(other)
    S.write_dataset(root, n_train=12, n_val=3, n_test=4, size=48, seed=7, progress=False)
    assert _tree_bytes(root) == _tree_bytes(other)
    # A different dataset in the same folder would mix patches: refused.
    with pytest.raises(DataError, match="already holds"):
        S.write_dataset(root, n_train=5, n_val=1, n_test=1, size=48, seed=8, progress=False)


def test_write_dataset_is_read_by_the_bcss_reader(tmp_path: Path) -> None:
    from lpdseg.data.datasets import list_split, parse_label, read_mask

    root = tmp_path / "synth"
    S.write_dataset(root, n_train=6, n_val=2, n_test=2, size=40, seed=1, progress=False)
    train, bad = list_split(root, "bcss_wsss", "train")
    assert len(train) == 6 and not bad
    for sample in train:
        np.testing.assert_array_equal(parse_label(sample.image.name, "bcss_wsss"), sample.label)
    test, _ = list_split(root, "bcss_wsss", "test")
    assert len(test) == 2
    for sample in test:
        mask = read_mask(sample.mask, 4, expected_hw=(40, 40))
        assert mask.max() <= 4


def test_write_dataset_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        S.write_dataset(tmp_path / "a", n_train=-1, n_val=0, n_test=0, progress=False)
    with pytest.raises(ConfigError):
        S.write_dataset(tmp_path / "b", 1, 0, 0, single_class_fraction=1.5, progress=False)


def test_sample_sheet(tmp_path: Path) -> None:
    out = S.sample_sheet(tmp_path / "sheet.png", n=2, seed=0, size=48)
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size[0] > 8 * 48 and im.size[1] > 4 * 48


def test_one_prototype_per_class_is_worse_than_one_per_subtype() -> None:
    """Nearest-prototype classification of single-class patches on simple features."""

    def draw(base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats, cls, sub = [], [], []
        for c in range(4):
            for i in range(16):
                p = S.generate_patch(base + 100 * c + i, 96, classes=[c], background=False)
                feats.append(_features(p.image))
                cls.append(c)
                sub.append(p.subtypes[c])
        return np.stack(feats), np.array(cls), np.array(sub)

    x_tr, c_tr, s_tr = draw(20_000)
    x_te, c_te, _ = draw(30_000)
    mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd

    def accuracy(protos: np.ndarray, owners: np.ndarray) -> float:
        d = ((x_te[:, None] - protos[None]) ** 2).sum(-1)
        return float((owners[d.argmin(axis=1)] == c_te).mean())

    one = np.stack([x_tr[c_tr == c].mean(axis=0) for c in range(4)])
    keys = [(c, s) for c in range(4) for s in range(2) if np.any((c_tr == c) & (s_tr == s))]
    several = np.stack([x_tr[(c_tr == c) & (s_tr == s)].mean(axis=0) for c, s in keys])
    acc_one = accuracy(one, np.arange(4))
    acc_several = accuracy(several, np.array([c for c, _ in keys]))
    assert acc_several >= acc_one + 0.1, (acc_one, acc_several)
