"""Class-balanced (repeat-factor) sampling of training images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lpdseg.config import load_config
from lpdseg.data.loaders import ResumableSampler, repeat_factors
from lpdseg.errors import ConfigError


def _factors_reference(labels, t):
    """Image by image, class by class: max over its classes of max(1, sqrt(t / share))."""
    n, c = len(labels), len(labels[0])
    share = [sum(labels[i][k] for i in range(n)) / n for k in range(c)]
    out = []
    for i in range(n):
        r = 1.0
        for k in range(c):
            if labels[i][k] and share[k] > 0:
                r = max(r, math.sqrt(t / share[k]))
        out.append(r)
    return out


def test_repeat_factors_match_the_reference():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 4)) < [0.9, 0.6, 0.1, 0.02]).astype(np.uint8)
    labels[0, 3] = 1  # class 3 in at least one image
    for t in (0.05, 0.3, 1.0):
        assert np.allclose(repeat_factors(labels, t), _factors_reference(labels.tolist(), t))
    # one image in ten with the rare class, t = 0.4: drawn twice as often
    rare = np.zeros((10, 2), np.uint8)
    rare[:, 0] = 1
    rare[0, 1] = 1
    assert repeat_factors(rare, 0.4) == pytest.approx([2.0] + [1.0] * 9)


def test_sampler_draws_rare_images_as_often_as_their_factor():
    n = 50
    repeats = np.ones(n)
    repeats[:5] = 2.5
    draws = np.zeros(n)
    for epoch in range(400):
        order = ResumableSampler(n, seed=3, epoch=epoch, repeats=repeats).order()
        assert len(order) == n and all(0 <= i < n for i in order)
        draws += np.bincount(order, minlength=n)
    # expected share of a draw: r_i / sum(r)
    expected = 400 * n * repeats / repeats.sum()
    assert draws[:5].sum() / expected[:5].sum() == pytest.approx(1.0, rel=0.05)
    assert draws[5:].sum() / expected[5:].sum() == pytest.approx(1.0, rel=0.05)
    # same seed and epoch, same order (a resumed run continues it); start skips a prefix
    a = ResumableSampler(n, seed=3, epoch=7, repeats=repeats).order()
    assert a == ResumableSampler(n, seed=3, epoch=7, repeats=repeats).order()
    assert list(ResumableSampler(n, seed=3, epoch=7, start=20, repeats=repeats)) == a[20:]
    # without repeats: the plain permutation
    assert sorted(ResumableSampler(n, seed=3, epoch=7).order()) == list(range(n))


def test_repeat_threshold_is_validated():
    assert load_config("demo", ["data.repeat_threshold=0.3"]).data.repeat_threshold == 0.3
    with pytest.raises(ConfigError, match="repeat_threshold"):
        load_config("demo", ["data.repeat_threshold=0"])


def test_training_loader_uses_the_repeat_factors(tmp_path):
    from lpdseg.data.loaders import make_train_loader, resolve_data
    from lpdseg.data.synthetic import write_dataset

    write_dataset(tmp_path, n_train=12, n_val=0, n_test=0, size=32, seed=0, progress=False)
    cfg = load_config(
        "demo",
        [
            f"data.root={tmp_path}",
            "data.num_workers=0",
            "data.repeat_threshold=0.9",
            "train.batch_size=4",
        ],
    )
    bundle = resolve_data(cfg)
    loader = make_train_loader(cfg, bundle, epoch=0)
    labels = np.stack([s.label for s in bundle.train])
    assert np.allclose(loader.sampler.repeats.numpy(), repeat_factors(labels, 0.9))
    assert next(iter(loader))["image"].shape[0] == cfg.train.batch_size
