"""Flat-memory slides: canvases on disk, band-wise finishing, overlapped reading and pooling.

Each piece against the in-memory, one-piece path it replaces: the same canvas
(exact integers), the same class map, the same probabilities.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lpdseg.data.synthetic import generate_patch
from lpdseg.inference import Predictor
from lpdseg.inference.sliding import TileWindows
from lpdseg.wsi import SlideJob, open_image, run_slide_job, stitch_slide
from lpdseg.wsi.finish import finish_per_tile, finish_seamless
from lpdseg.wsi.ometiff import CanvasProbabilities
from lpdseg.wsi.storage import DiskArrays, ReleasingView
from lpdseg.wsi.tiling import _pool_tile, pool_batch

torch.set_num_threads(2)

SIDE, TILE, DS = 160, 64, 2


def _resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status (Linux only)")


@pytest.fixture(scope="module")
def predictor(tiny_run_dir) -> Predictor:
    return Predictor.from_checkpoint(tiny_run_dir / "best.pt", device="cpu")


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("streaming") / "synthetic.png"
    image = generate_patch(7, SIDE).image
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def _stitch(predictor, path, **kw):
    with open_image(path) as reader:
        return stitch_slide(
            reader,
            0,
            predictor.slide_raw,
            predictor.slide_channels,
            tile=TILE,
            overlap=0.25,
            output_downsample=DS,
            batch_size=3,
            progress=False,
            **kw,
        )


# ---------------------------------------------------------------- storage
def test_disk_arrays_keep_data_after_release_and_clean_up(tmp_path):
    store = DiskArrays(tmp_path)
    a = store.zeros("a", (3, 400, 500), np.int64)
    assert a.sum() == 0 and a.shape == (3, 400, 500)
    a[1, 10:20, 30:40] = 7
    store.release()
    before = _resident_kib()
    a[:] += 1  # touches every page: ~4.6 MiB resident
    touched = _resident_kib()
    store.release()
    released = _resident_kib()
    assert touched - before > 3000
    assert touched - released > 3000  # the pages left the resident set ...
    assert int(a[1, 15, 35]) == 8 and int(a.sum()) == a.size + 7 * 100  # ... the data did not
    folder = store.folder
    assert folder.parent == tmp_path and folder.name.startswith(".lpdseg-canvas-")
    view = ReleasingView(a, store, every=2)
    assert view.shape == a.shape and view.dtype == np.int64
    np.testing.assert_array_equal(view[1, 10:12], a[1, 10:12])
    del a, view
    store.close()
    assert not folder.exists()


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        pytest.skip("no /proc/self/smaps (Linux only)")
    total, current = 0, None
    for line in smaps.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
            current = parts[5] if len(parts) > 5 else None  # a mapping's header line
        elif parts[0] == "Rss:" and current == str(path):
            total += int(parts[1])
    return total


def test_sparse_canvas_updates_fault_in_only_the_pages_they_touch(tmp_path):
    # A tile's update touches a little of many rows; the kernel's read-around
    # made each touch cost ~112 KiB resident (canvas memory grew with the width).
    store = DiskArrays(tmp_path)
    a = store.zeros("a", (2048, 2048), np.int64)  # 32 MiB, rows of 16 KiB
    for y in range(0, 2048, 32):  # 64 touches, 512 KiB apart
        a[y, 7] += 1
    resident = _mapped_kib(store.folder / "a.bin")
    assert 0 < resident <= 64 * 8, f"{resident} KiB resident for 64 touched pages"
    assert int(a.sum()) == 64
    del a
    store.close()


# ---------------------------------------------------------------- stitching
def test_canvas_on_disk_and_threads_give_the_same_integers(predictor, slide_png, tmp_path):
    ref = _stitch(predictor, slide_png, read_workers=0)
    for workers in (1, 3):
        with DiskArrays(tmp_path) as store:
            got = _stitch(predictor, slide_png, read_workers=workers, storage=store)
            assert (store.folder / "score_sum.bin").stat().st_size == got.score_sum.nbytes
            np.testing.assert_array_equal(got.score_sum, ref.score_sum)
            np.testing.assert_array_equal(got.weight_sum, ref.weight_sum)
            assert got.tiles == ref.tiles
    assert not list(tmp_path.iterdir())  # the canvas files went with the store


def test_batched_pooling_matches_the_per_tile_reference():
    rng = np.random.default_rng(0)
    h, w, t, ds = 100, 90, 32, 4
    origins = [(0, 0), (32, 28), (68, 58), (8, 4), (64, 56)]  # aligned, cut, off-grid
    out = torch.from_numpy(rng.random((len(origins), 3, t, t)).astype(np.float32))
    windows = TileWindows(t, "cosine", (h, w))
    blocks = pool_batch(out.clone(), origins, windows, h, w, ds)
    for (y, x), (block, cy, cx), score in zip(origins, blocks, out, strict=True):
        win = windows(y, x)
        ref, ry, rx = _pool_tile((score * win).numpy(), win.numpy(), y, x, h, w, ds)
        assert (cy, cx) == (ry, rx) and block.shape == ref.shape
        # float32 cell sums vs float64: a few fixed-point units (2**-20) apart at most
        assert np.abs(block - ref).max() <= 8
    for bad in ((0, 0), (68, 58)):  # NaN in an aligned tile, then in a cut one
        nan = out.clone()
        nan[origins.index(bad), 1, 5, 5] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            pool_batch(nan, origins, windows, h, w, ds)


# ---------------------------------------------------------------- finishing
def test_seamless_in_bands_equals_one_piece(predictor, slide_png, tmp_path):
    canvas = _stitch(predictor, slide_png)
    h, w = canvas.shape_hw
    window = 9
    background = np.zeros((h, w), bool)
    background[:10, :20] = True
    one = finish_seamless(canvas, predictor, window, background, probabilities=True, band_rows=h)
    weight = np.maximum(canvas.weight_sum, 1)
    raw = torch.from_numpy((canvas.score_sum / weight).astype(np.float32))
    raw[:, canvas.weight_sum == 0] = 0
    scores = predictor.finish_slide(
        raw, torch.from_numpy(canvas.weight_sum > 0), window, torch.from_numpy(background)
    )
    np.testing.assert_array_equal(one.class_map(), scores.argmax(0).numpy())
    with DiskArrays(tmp_path) as store:
        disk = store.zeros("s", canvas.score_sum.shape, np.int64)
        disk[:] = canvas.score_sum
        canvas.score_sum = disk
        for rows in (1, 5, 16):
            banded = finish_seamless(
                canvas,
                predictor,
                window,
                background,
                probabilities=True,
                storage=store,
                band_rows=rows,
            )
            np.testing.assert_array_equal(banded.class_map(), one.class_map())
            diff = np.abs(
                banded.probabilities[:, :, :].astype(int) - one.probabilities[:, :, :].astype(int)
            )
            assert diff.max() <= 1
        assert banded.shape_hw == (h, w) and banded.tiles == canvas.tiles


def test_per_tile_in_bands_equals_the_canvas_argmax(tmp_path):
    rng = np.random.default_rng(1)
    from lpdseg.wsi import SlideCanvas

    score = rng.integers(0, 1000, (4, 37, 29)).astype(np.int64)
    weight = rng.integers(0, 3, (37, 29)).astype(np.int64)
    canvas = SlideCanvas(score, weight, 0, 1.0, 2, 5)
    for rows in (1, 7, 100):
        m = finish_per_tile(canvas, probabilities=True, band_rows=rows)
        np.testing.assert_array_equal(m.class_map(), canvas.class_map())
        np.testing.assert_array_equal(m.probabilities[:, 3:9], CanvasProbabilities(canvas)[:, 3:9])


# ---------------------------------------------------------------- the run
def test_slide_run_leaves_no_canvas_files(tiny_run_dir, slide_png, tmp_path):
    out = tmp_path / "out"
    # a killed run's canvas folder is removed by the next run (which holds the lock)
    stale = out / ".lpdseg-canvas-killed"
    stale.mkdir(parents=True)
    (stale / "score_sum.bin").write_bytes(b"\0" * 4096)
    (out / "notes.txt").write_text("kept")
    job = SlideJob(
        tiny_run_dir / "best.pt",
        slide_png,
        out,
        device="cpu",
        downsample_level0_px=1,
        ome_tiff=True,
        ome_probabilities=True,
    )
    summary = run_slide_job(job, progress=False)
    assert summary["tiles"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".lpdseg-canvas-")]
    assert (out / "notes.txt").read_text() == "kept"


def test_cell_maps_pool_as_their_pixels_would():
    rng = np.random.default_rng(2)
    h, w, t, ds = 100, 90, 32, 4
    origins = [(0, 0), (32, 28), (68, 58), (8, 4)]
    cells = torch.from_numpy(rng.random((len(origins), 3, t // ds, t // ds)).astype(np.float32))
    pixels = cells.repeat_interleave(ds, -2).repeat_interleave(ds, -1)  # constant in each cell
    windows = TileWindows(t, "cosine", (h, w))
    got = pool_batch(cells.clone(), origins, windows, h, w, ds, cells=True)
    ref = pool_batch(pixels.clone(), origins, windows, h, w, ds)
    for (a, ay, ax), (b, by, bx) in zip(got, ref, strict=True):
        assert (ay, ax) == (by, bx) and np.abs(a - b).max() <= 8
    with pytest.raises(ValueError, match="cell maps"):
        pool_batch(pixels.clone(), origins, windows, h, w, ds, cells=True)


def test_slide_from_cell_maps_agrees_with_full_resolution(predictor, slide_png):
    full = _stitch(predictor, slide_png)
    cells = _stitch(predictor, slide_png, cell_maps=True)
    window = 9
    a = finish_seamless(full, predictor, window).class_map()
    b = finish_seamless(cells, predictor, window).class_map()
    assert (a == b).mean() >= 0.9
    with open_image(slide_png) as reader, pytest.raises(ValueError, match="multiple of"):
        stitch_slide(
            reader,
            0,
            predictor.slide_raw,
            predictor.slide_channels,
            tile=63,
            output_downsample=DS,
            cell_maps=True,
            progress=False,
        )
