"""inference.sliding: tile grids, blending windows, the sliding window (arrays and slide levels)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from lpdseg.inference.sliding import (
    LevelSource,
    TileGrid,
    TileWindows,
    blend_window,
    grid_for,
    predict_tiles,
    sliding_window_predict,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- grid
@pytest.mark.parametrize("shape_hw", [(1000, 1000), (225, 224), (100, 50), (500, 333), (224, 900)])
def test_grid_covers_every_pixel_and_last_tile_is_flush(shape_hw):
    tile = 224
    grid = TileGrid.from_overlap(shape_hw, tile, 0.25)
    origins = grid_for(shape_hw, tile, 0.25)
    assert origins == grid.origins and len(grid) == len(origins)
    hp, wp = grid.padded_hw
    cover = np.zeros((hp, wp), int)
    for y, x in origins:
        assert 0 <= y and 0 <= x and y + tile <= hp and x + tile <= wp
        cover[y : y + tile, x : x + tile] += 1
    assert (cover[: shape_hw[0], : shape_hw[1]] >= 1).all()
    assert max(y for y, _ in origins) + tile == hp
    assert max(x for _, x in origins) + tile == wp


def test_tile_grid_validation():
    with pytest.raises(ValueError, match=r"stride must be in \[1, tile=64\]"):
        TileGrid((100, 100), 64, 65)  # stride > tile leaves gaps
    with pytest.raises(ValueError, match="image shape must be positive"):
        TileGrid((0, 100), 64, 32)
    with pytest.raises(ValueError, match=r"tile must be >= 1"):
        TileGrid((100, 100), 0, 1)
    with pytest.raises(ValueError, match=r"overlap is a fraction of the tile in \[0, 1\)"):
        TileGrid.from_overlap((100, 100), 64, 1.0)


# ---------------------------------------------------------------- sliding window
PERIOD = 700.0


def encode_position(h: int, w: int) -> np.ndarray:
    """An image whose pixels spell their own (y, x): R/G = coarse x/y, B = fine bits."""
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs // 8, ys // 8, (xs % 8) * 16 + (ys % 8) * 2], -1)
    return img.astype(np.uint8)


def decode_position(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.round(x * 255.0)
    fine = v[:, 2]
    gx = v[:, 0] * 8 + torch.div(fine, 16, rounding_mode="floor")
    gy = v[:, 1] * 8 + torch.div(torch.remainder(fine, 16), 2, rounding_mode="floor")
    return gy, gx


def smooth_fn(x: torch.Tensor) -> torch.Tensor:
    gy, gx = decode_position(x)
    a = torch.sin(2 * math.pi * gx / PERIOD)
    b = torch.cos(2 * math.pi * gy / PERIOD)
    return torch.stack([a, b, a * b], 1)


def border_and_interior_jumps(scores: torch.Tensor, borders: set[int]) -> tuple[float, float]:
    """Max |difference between neighbouring columns| across tile borders and elsewhere."""
    diff = (scores[..., 1:] - scores[..., :-1]).abs().amax(dim=(0, 1))  # per column pair
    at = torch.tensor(sorted(b - 1 for b in borders if 0 < b < scores.shape[-1]))
    mask = torch.zeros(diff.shape[0], dtype=torch.bool)
    mask[at] = True
    return float(diff[mask].max()), float(diff[~mask].max())


def test_sliding_window_reproduces_full_image_without_seams():
    img = encode_position(2000, 2000)
    full = smooth_fn(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0]
    out = sliding_window_predict(
        img, smooth_fn, 3, tile=224, overlap=0.25, batch_size=16, progress=False
    )
    assert out.shape == (3, 2000, 2000) and out.dtype == torch.float32
    assert float((out - full).abs().max()) < 1e-5
    borders = {x + b for _, x in grid_for((2000, 2000), 224, 0.25) for b in (0, 224)}
    across, elsewhere = border_and_interior_jumps(out, borders)
    assert across <= 1.05 * elsewhere


def test_blending_hides_per_tile_bias_seams():
    img = encode_position(900, 900)

    def biased_fn(x: torch.Tensor) -> torch.Tensor:
        gy, gx = decode_position(x)
        y0, x0 = gy[:, 0, 0], gx[:, 0, 0]  # the tile origin, from its top-left pixel
        bias = torch.remainder(x0 * 7 + y0 * 13, 10) / 10  # a different offset per tile
        base = torch.sin(2 * math.pi * gx / PERIOD)
        return torch.stack([base + bias[:, None, None], -base], 1)

    borders = {x + b for _, x in grid_for((900, 900), 128, 0.25) for b in (0, 128)}
    seams = {}
    for weight in ("cosine", "uniform"):
        out = sliding_window_predict(
            img, biased_fn, 2, tile=128, overlap=0.25, batch_size=32, weight=weight, progress=False
        )
        seams[weight], _ = border_and_interior_jumps(out[:1], borders)
    assert seams["uniform"] > 0.1  # plain averaging shows the tile bias as steps
    assert seams["cosine"] < 0.25 * seams["uniform"]


def test_sliding_window_small_image_and_output_resize():
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)

    def coarse_fn(x: torch.Tensor) -> torch.Tensor:  # a model with stride-4 output
        m = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)
        return torch.cat([m, 1 - m], 1)

    out = sliding_window_predict(img, coarse_fn, 2, tile=64, overlap=0.5, progress=False)
    assert out.shape == (2, 50, 70)
    assert torch.allclose(out.sum(0), torch.ones(50, 70), atol=1e-5)
    with pytest.raises(ValueError, match=r"expected 2 x 3 \(num_labels\) x h x w"):
        sliding_window_predict(img, coarse_fn, 3, tile=64, progress=False)


def test_sliding_window_rejects_bad_inputs():
    img = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sliding_window_predict(img, smooth_fn, 3, tile=32, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="H x W x 3 uint8 RGB"):
        sliding_window_predict(img[..., 0], smooth_fn, 3, tile=32, progress=False)
    with pytest.raises(ValueError, match="level_dimensions, level_downsamples and read_region"):
        sliding_window_predict([[0]], smooth_fn, 3, tile=32, progress=False)  # type: ignore[arg-type]


def test_blend_window():
    w = blend_window(16)
    assert w.shape == (16, 16)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    assert float(w.min()) > 0 and float(w.max()) <= 1.0
    assert torch.equal(blend_window(8, "uniform"), torch.ones(8, 8))
    with pytest.raises(ValueError, match="weight must be 'cosine' or 'uniform'"):
        blend_window(8, "gauss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"floor must be in \(0, 1\]"):
        blend_window(8, floor=0.0)


def test_tile_windows_are_flat_on_image_borders_and_cached():
    windows = TileWindows(16, "cosine", (40, 40))
    corner = windows(0, 0)
    assert float(corner[0, 0]) == 1.0 and float(corner[-1, -1]) < 0.01  # flat top-left only
    inner = windows(12, 12)
    assert torch.equal(inner, blend_window(16))
    assert windows(0, 0) is corner  # one tensor per border case
    last = windows(24, 24)  # flush with the bottom-right border
    assert float(last[-1, -1]) == 1.0 and float(last[0, 0]) < 0.01


def test_predict_tiles_checks_the_model_output():
    batch = np.zeros((2, 8, 8, 3), np.uint8)
    out = predict_tiles(lambda x: torch.zeros(2, 3, 4, 4), batch, 3)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32  # resized to the tile
    with pytest.raises(ValueError, match="must return a tensor B x L x h x w"):
        predict_tiles(lambda x: x.numpy(), batch, 3)
    with pytest.raises(ValueError, match="non-finite"):
        predict_tiles(lambda x: torch.full((2, 3, 8, 8), float("nan")), batch, 3)


# ---------------------------------------------------------------- duck-typed slide levels
class ArrayLevels:
    """A two-level "slide" held in memory: anything with these members is a LevelSource."""

    def __init__(self, level0: np.ndarray) -> None:
        self.levels = [level0, level0[::2, ::2].copy()]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(a.shape[1], a.shape[0]) for a in self.levels]

    @property
    def level_downsamples(self) -> list[float]:
        return [1.0, 2.0]

    def read_region(self, location_level0, level, size) -> np.ndarray:
        x0, y0 = (round(v / self.level_downsamples[level]) for v in location_level0)
        w, h = size
        a = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)  # white outside, as slides are
        part = a[y0 : y0 + h, x0 : x0 + w]
        out[: part.shape[0], : part.shape[1]] = part
        return out


def test_sliding_window_on_a_level_source_equals_the_level_array():
    img = encode_position(300, 260)
    source = ArrayLevels(img)
    assert isinstance(source, LevelSource)
    for level in (0, 1):
        level_img = source.levels[level]
        a = sliding_window_predict(
            source, smooth_fn, 3, tile=64, overlap=0.25, progress=False, level=level
        )
        b = sliding_window_predict(level_img, smooth_fn, 3, tile=64, overlap=0.25, progress=False)
        assert a.shape == (3, *level_img.shape[:2])
        torch.testing.assert_close(a, b)


def test_inference_sliding_does_not_import_wsi():
    code = (
        "import sys, lpdseg.inference.sliding, lpdseg.inference.predictor\n"
        "bad = sorted(m for m in sys.modules if m.startswith('lpdseg.wsi'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
