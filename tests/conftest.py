"""Fixtures shared by test modules: a tiny trained run, synthetic pyramidal slides, the CMU slide."""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from lpdseg.config import load_config
from lpdseg.data.synthetic import write_dataset
from lpdseg.engine.train import train
from lpdseg.errors import DataError

#: OpenSlide's CC0 test slide CMU-1-Small-Region, when the shared data is present.
CMU_SVS = Path(__file__).resolve().parents[1].parent / "shared/data/slides/cmu_small_region.svs"


@dataclass(frozen=True)
class SyntheticSlide:
    """A pyramidal TIFF written by ``wsi_pyramid`` and what is known about it.

    Attributes:
        path: the TIFF (levels as successive pages; OpenSlide reads it).
        rgb: level-0 pixels, ``H0 x W0 x 3`` uint8.
        truth: ``H0 x W0`` bool, True on the tissue-like blobs.
        mpp: micrometres per level-0 pixel written in the file.
        downsamples: level-0 pixels per pixel of each level.
    """

    path: Path
    rgb: np.ndarray
    truth: np.ndarray
    mpp: float
    downsamples: tuple[int, ...]

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


#: Colour of the tissue-like blobs of ``wsi_pyramid``.
TISSUE_RGB = (150, 60, 140)


def synthetic_slide_rgb(w0: int = 2048, h0: int = 1536) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 RGB (tissue-like blobs on white glass) and its tissue truth."""
    rng = np.random.default_rng(0)
    truth = np.zeros((h0, w0), np.uint8)
    cv2.ellipse(truth, (600, 520), (380, 300), 20, 0, 360, 1, -1)
    cv2.ellipse(truth, (1500, 1000), (350, 260), -30, 0, 360, 1, -1)
    cv2.circle(truth, (1600, 300), 120, 1, -1)
    img = np.full((h0, w0, 3), 245, np.uint8)
    noise = rng.integers(-20, 21, size=(h0, w0, 1))
    tissue = np.clip(np.array(TISSUE_RGB)[None, None] + noise, 0, 255).astype(np.uint8)
    img[truth > 0] = tissue[truth > 0]
    return img, truth.astype(bool)


def write_pyramid_tiff(
    path: Path,
    img: np.ndarray,
    downsamples: tuple[int, ...],
    mpp: float | None,
    tile: int = 128,
) -> None:
    """Write ``img`` as a tiled pyramidal TIFF, one page per downsample (OpenSlide reads it)."""
    h0, w0 = img.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate(downsamples):
            level = (
                img
                if ds == 1
                else cv2.resize(img, (w0 // ds, h0 // ds), interpolation=cv2.INTER_AREA)
            )
            kw = {}
            if mpp is not None:
                res = 1e4 / (mpp * ds)  # pixels per centimetre
                kw = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if i == 0 else 1,
                **kw,
            )


@pytest.fixture(scope="session")
def wsi_pyramid(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 2048 x 1536 pyramidal TIFF at 0.5 um/px with levels 1, 4, 16 and three tissue blobs."""
    img, truth = synthetic_slide_rgb()
    path = tmp_path_factory.mktemp("wsi_pyramid") / "synthetic.tif"
    downsamples = (1, 4, 16)
    write_pyramid_tiff(path, img, downsamples, mpp=0.5)
    return SyntheticSlide(path, img, truth, 0.5, downsamples)


@pytest.fixture(scope="session")
def pyramid_writer():
    """``write_pyramid_tiff(path, img, downsamples, mpp, tile=128)``, for modules' own slides."""
    return write_pyramid_tiff


@pytest.fixture
def cmu_svs() -> Path:
    """The shared CMU-1-Small-Region SVS (the test is skipped without it)."""
    if not CMU_SVS.is_file():
        pytest.skip(f"shared slide not available at {CMU_SVS}")
    return CMU_SVS


# ---------------------------------------------------------------- a tiny trained run
def tiny_run(root: Path, *extra: str, steps: int = 2, evaluate_test: bool = False) -> Path:
    """Write a 32-px synthetic set under ``root/data`` and train ``steps`` steps into ``root/run``.

    Args:
        root: an empty temp folder.
        extra: more config overrides (e.g. ``model.head=cam``).
        steps: training steps.
        evaluate_test: also score ``best.pt`` on the test split (test_metrics.json).

    Returns:
        The run folder (``best.pt``, ``last.pt``, ``config.yaml``, ...).
    """
    data = root / "data"
    if not (data / "training").is_dir():
        write_dataset(data, n_train=12, n_val=2, n_test=3, size=32, seed=0, progress=False)
    out = root / "run"
    cfg = load_config("demo", _tiny_overrides(data, out, f"train.max_steps={steps}", *extra))
    train(cfg, progress=False, evaluate_test=evaluate_test)
    return out


def cached_tiny_run(
    factory: pytest.TempPathFactory, *extra: str, steps: int = 2, evaluate_test: bool = False
) -> Path:
    """``tiny_run`` once per session for each setting; later calls return the same folder."""
    key = hashlib.sha1(repr((extra, steps, evaluate_test)).encode()).hexdigest()[:10]
    root = factory.getbasetemp() / f"tinyrun-{key}"
    if not (root / "run" / "best.pt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tiny_run(root, *extra, steps=steps, evaluate_test=evaluate_test)
    return root / "run"


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step LPD run at 32 px with test metrics, trained once per session."""
    return cached_tiny_run(tmp_path_factory, evaluate_test=True)


@pytest.fixture(scope="session")
def tiny_run_factory(tmp_path_factory: pytest.TempPathFactory):
    """``make(*overrides, steps=2, evaluate_test=False)`` -> a tiny run, trained once per setting."""

    def make(*extra: str, steps: int = 2, evaluate_test: bool = False) -> Path:
        return cached_tiny_run(tmp_path_factory, *extra, steps=steps, evaluate_test=evaluate_test)

    return make


# ---------------------------------------------------------------- helpers shared by test modules
def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes); {} when it does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _png_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG signature + IHDR claiming ``width x height``, no pixels (a decompression bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr))
    return path


def _tiny_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """Overrides of a 2-step training run at 32 px (the ``demo`` preset underneath)."""
    return [
        f"data.root={root}",
        "data.crop_size=32",
        "data.num_workers=0",
        "model.prototypes_per_class=2",
        "model.proj_hidden=16",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.threads=2",
        f"train.out_dir={out}",
        "eval.tta_scales=[1.0]",
        "eval.tta_flip=false",
        *extra,
    ]


#: Steps of the interrupted-run tests (test_crash, test_bad_input_runs).
RUN_STEPS = 10


def run_overrides(root: Path, out: Path) -> list[str]:
    """The interrupted-run tests' training: the tiny run with their steps, a checkpoint
    every step, one thread and its own seed (later keys win)."""
    return _tiny_overrides(
        root, out, f"train.max_steps={RUN_STEPS}", "train.ckpt_every=1", "train.threads=1",
        "train.seed=5",
    )  # fmt: skip


def lpdseg_cmd(*args: str) -> list[str]:
    """``lpdseg ARGS`` as a subprocess command line (this interpreter)."""
    return [sys.executable, "-m", "lpdseg.cli", *args]


def _raises_naming(fn, name: str, *words: str) -> str:
    """Call ``fn``; it must raise a DataError whose message names ``name`` and every word."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert name in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _bmp_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A BMP file + info header (24-bit) claiming ``width x height``, no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info)
    return path


@pytest.fixture(scope="session")
def raises_naming():
    """``raises_naming(fn, name, *words)``: a DataError naming the file and the fix."""
    return _raises_naming


@pytest.fixture(scope="session")
def bmp_bomb():
    """``bmp_bomb(path, width, height)``: a BMP header of a huge image, no pixels."""
    return _bmp_bomb


@pytest.fixture(scope="session")
def snapshot():
    """``snapshot(folder)``: every file's bytes, to show earlier outputs are untouched."""
    return _snapshot


@pytest.fixture(scope="session")
def png_bomb():
    """``png_bomb(path, width, height)``: a decompression-bomb PNG header."""
    return _png_bomb


@pytest.fixture(scope="session")
def overrides():
    """``overrides(root, out, *extra)``: a 2-step 32-px training run's config overrides."""
    return _tiny_overrides
