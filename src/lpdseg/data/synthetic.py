"""Procedural H&E-like tissue patches with exact pixel masks (the embedded default data).

There is no public histology data that can ship with the package, so the demo,
the tests and the benchmarks run on patches drawn here. The generator makes
weakly supervised segmentation hard in the ways LPD is about:

- **Intra-class heterogeneity.** Every class has two sub-types that look
  quite different (``SUBTYPES``): tumour as glands around pale lumens or as
  solid sheets of large vesicular nuclei; stroma as loose wavy fibres or
  dense hyalinised collagen; lymphocytes as a dense carpet of small dark
  nuclei or scattered in loose tissue; necrosis as pale granular debris with
  ghost cells or purple nuclear dust. One prototype per class has to cover
  both looks; several prototypes can fit each.
- **Inter-class homogeneity.** Everything is rendered from two stain
  concentration maps (haematoxylin, eosin) through the Beer-Lambert optical
  density model with per-patch jittered stain vectors and intensities, so
  every class uses the same purple/pink palette and each class has a pinkish
  and a purplish sub-type: colour alone does not separate classes, texture
  and nuclear size, shape, density and arrangement do.
- Glass background at tissue edges and small holes (mask value
  ``BACKGROUND_INDEX``), blur and sensor noise.

Each patch holds 1-3 classes in irregular regions (argmax of smooth random
fields); a region uses one sub-type, two regions of one class may differ.
Label rule: a class is in the image-level label iff it covers at least
``min_label_fraction`` of the patch pixels (background pixels count in the
total); the default is ``MIN_LABEL_FRACTION`` (2 %, the package-wide
:data:`lpdseg.catalog.LABEL_MIN_FRACTION`), and the demo passes its config's
``data.label_min_fraction``. Regions of a class below that fraction are handed
to the neighbouring tissue regions before rendering, so mask and label always
agree.

Everything is vectorised numpy/OpenCV: nuclei are impulses (random or on a
jittered lattice) blurred into blobs and soft-thresholded; fibres are noise on
an anisotropic grid sampled through a rotated, wavy coordinate frame
(``cv2.remap``); large-scale fields are upsampled coarse noise. No Python loop
runs over nuclei or pixels; a 224 px patch takes a few milliseconds on one
core. Output is a pure function of the seed (``np.random.default_rng``).
``write_dataset`` writes the BCSS-WSSS folder layout so the package's normal
readers are exercised.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lpdseg.catalog import LABEL_MIN_FRACTION as MIN_LABEL_FRACTION
from lpdseg.errors import ConfigError, DataError
from lpdseg.io import atomic_write_json, atomic_write_text
from lpdseg.viz import add_legend, colorize, save_png

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("TUM", "STR", "LYM", "NEC")
BACKGROUND_INDEX: int = 4
# Largest label fraction allowed: tissue covers about >= 30 % of a patch (glass is capped
# at 70 %) in at most 3 classes, so the largest class keeps about >= 10 % and a patch
# (almost) never loses every class to the rule.
MAX_LABEL_FRACTION: float = 0.1
SUBTYPES: dict[str, tuple[str, ...]] = {
    "TUM": ("glands", "solid"),
    "STR": ("wavy_fibres", "dense_collagen"),
    "LYM": ("dense", "scattered"),
    "NEC": ("pale_debris", "nuclear_dust"),
}
GENERATOR_VERSION: str = "1.0"


def label_rule(min_label_fraction: float = MIN_LABEL_FRACTION) -> str:
    """The label rule in words (recorded in ``synthetic.json``)."""
    return (
        f"a class is in the image-level label iff its mask pixels cover >= "
        f"{min_label_fraction:g} of all patch pixels (background included); regions of "
        "classes below that fraction are reassigned to neighbouring tissue regions, so mask "
        "and label agree"
    )


LABEL_RULE: str = label_rule()
# Mask colours for pictures: TUM, STR, LYM, NEC, background.
MASK_COLORS: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),
    (60, 170, 60),
    (40, 90, 220),
    (240, 200, 30),
    (255, 255, 255),
)

_NUM_CLASSES = len(CLASS_NAMES)
_NUM_SUBTYPES = min(len(v) for v in SUBTYPES.values())
_MIN_SIZE = 32
_SPLIT_IDS = {"training": 0, "val": 1, "test": 2}
# Ruifrok & Johnston stain optical-density vectors (RGB), jittered per patch.
_H_VEC = np.array([0.650, 0.704, 0.286], np.float32)
_E_VEC = np.array([0.072, 0.990, 0.105], np.float32)

Maps = tuple[np.ndarray, np.ndarray]  # (haematoxylin, eosin) concentration, H x W float32


@dataclass
class SyntheticPatch:
    """One generated patch.

    Attributes:
        image: H x W x 3 uint8 RGB.
        mask: H x W uint8; 0..3 tissue class (``CLASS_NAMES`` order), 4 background.
        label: (4,) uint8 0/1; class present iff it covers >= ``min_label_fraction``
            of the patch (always consistent with ``mask``).
        subtypes: (4,) int8; sub-type index (into ``SUBTYPES[name]``) of each present
            class, the one covering most pixels if its regions differ; -1 if absent.
    """

    image: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    subtypes: np.ndarray


# --------------------------------------------------------------------------- noise helpers


def _white(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance uniform white noise (float32), from random bytes (fast)."""
    noise = np.frombuffer(rng.bytes(math.prod(shape)), np.uint8).reshape(shape).astype(np.float32)
    noise -= 127.5
    noise *= 1.0 / 73.9  # std of uniform 0..255
    return noise


@functools.lru_cache(maxsize=64)
def _blur_gain(sigma: float) -> float:
    """1 / std of unit white noise after cv2.GaussianBlur(sigma) (same kernel as OpenCV)."""
    k = cv2.getGaussianKernel(int(round(sigma * 8 + 1)) | 1, sigma, cv2.CV_32F)
    return float(1.0 / np.sum(k.astype(np.float64) ** 2))


def _fine_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-std noise blurred with a Gaussian of ``sigma`` px (grain, chromatin, fibrils)."""
    noise = cv2.GaussianBlur(_white(rng, shape), (0, 0), sigma)
    noise *= _blur_gain(sigma)
    return noise


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance random field with blobs about ``scale`` pixels across.

    Small scales: blurred full-size white noise. Larger scales: white noise on a
    grid of ``scale / 4`` px cells (with a margin, so borders are as random as
    the centre), blurred there and resized up; cheap at any scale.
    """
    if scale < 10:
        return _fine_noise(rng, shape, scale / 2.5)
    h, w = shape
    step = scale / 4.0
    ny, nx = int(math.ceil(h / step)) + 1, int(math.ceil(w / step)) + 1
    m = 6  # 3 sigma of the grid blur
    low = cv2.GaussianBlur(_white(rng, (ny + 2 * m, nx + 2 * m)), (0, 0), 2.0)
    low = low[m : m + ny, m : m + nx] * _blur_gain(2.0)
    # Linear is enough: the grid is already smooth (4 cells per blob), and 10x cheaper.
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)


def _impulses(
    rng: np.random.Generator,
    shape: tuple[int, int],
    density: float,
    amp: tuple[float, float],
    prob: np.ndarray | None = None,
) -> np.ndarray:
    """Random point impulses (``density`` per pixel), optionally thinned by a 0..1 map."""
    h, w = shape
    n = int(rng.poisson(density * h * w))
    ys = rng.integers(0, h, n)
    xs = rng.integers(0, w, n)
    amps = rng.uniform(amp[0], amp[1], n).astype(np.float32)
    if prob is not None:
        keep = rng.random(n, dtype=np.float32) < prob[ys, xs]
        ys, xs, amps = ys[keep], xs[keep], amps[keep]
    out = np.zeros(shape, np.float32)
    out[ys, xs] = amps
    return out


def _lattice(
    rng: np.random.Generator,
    shape: tuple[int, int],
    spacing: float,
    amp: tuple[float, float],
    prob: np.ndarray | float = 1.0,
    jitter: float = 0.4,
) -> np.ndarray:
    """Impulses on a jittered lattice (``spacing`` px): crowded cells that rarely overlap."""
    h, w = shape
    ny, nx = int(h / spacing) + 2, int(w / spacing) + 2
    gy, gx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    gx += 0.5 * (gy % 2)  # hexagonal-ish rows
    ys = (gy + rng.uniform(-jitter, jitter, gy.shape)) * spacing - spacing / 2
    xs = (gx + rng.uniform(-jitter, jitter, gx.shape)) * spacing - spacing / 2
    ys = np.rint(ys).astype(np.int64).ravel()
    xs = np.rint(xs).astype(np.int64).ravel()
    amps = rng.uniform(amp[0], amp[1], ys.size).astype(np.float32)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    u = rng.random(ys.size, dtype=np.float32)
    ys, xs, amps, u = ys[inside], xs[inside], amps[inside], u[inside]
    keep = u < (prob[ys, xs] if isinstance(prob, np.ndarray) else prob)
    out = np.zeros(shape, np.float32)
    out[ys[keep], xs[keep]] = amps[keep]
    return out


def _blobs(imp: np.ndarray, sigma_x: float, sigma_y: float | None = None) -> np.ndarray:
    """Blur impulses so that an impulse of amplitude ``a`` peaks at ``a`` (radius grows with a).

    Thresholding the result at 1 gives a disc of radius ``sigma * sqrt(2 ln a)``.
    """
    sy = sigma_x if sigma_y is None else sigma_y
    return cv2.GaussianBlur(imp, (0, 0), sigma_x, sigmaY=sy) * (2.0 * math.pi * sigma_x * sy)


def _soft(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear ramp 0 at ``lo`` to 1 at ``hi``, clipped."""
    return np.clip((x - lo) * (1.0 / (hi - lo)), 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _centred_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy - (h - 1) / 2.0, xx - (w - 1) / 2.0


class _FibreFrame:
    """Coordinates along (``u``) and across (``v``) a wavy fibre direction, per pixel.

    Textures of fibrous tissue are drawn on small axis-aligned grids in this
    frame (coarse along the fibres, fine across them) and sampled with
    ``cv2.remap``: orientation, waviness and anisotropy for the price of one
    remap per layer.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        shape: tuple[int, int],
        wave_amp: float,
        wave_len: float,
        jitter: float,
    ) -> None:
        yy, xx = _centred_grid(*shape)
        theta = rng.uniform(0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        self.u = c * xx + s * yy
        v = c * yy - s * xx
        # wave_amp * sin(k u + phase) with u = c x + s y, as a sum of outer products
        # (sin(a + b) = sin a cos b + cos a sin b): 1-D trig only.
        phase = rng.uniform(0, 2 * math.pi)
        k = 2 * math.pi / wave_len
        ax = k * c * xx[0] + phase
        by = k * s * yy[:, 0]
        wave = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
        # Amplitude varies over the patch so the waves are not a regular pattern.
        wave *= 1.0 + 0.5 * _smooth_noise(rng, shape, 70.0)
        v = v + (wave_amp * wave).astype(np.float32)
        if jitter > 0:
            v = v + jitter * _smooth_noise(rng, shape, 40.0)
        self.v = v
        # Half-extent of |u| and |v| (with margin), to size the grids.
        self.extent = 0.5 * math.hypot(*shape) + wave_amp + 3 * jitter + 4

    def grid_shape(self, step_u: float, step_v: float) -> tuple[int, int]:
        """Shape (rows = across, cols = along) of a grid covering the frame."""
        return (int(2 * self.extent / step_v) + 4, int(2 * self.extent / step_u) + 4)

    def sample(
        self, grid: np.ndarray, step_u: float, step_v: float, cubic: bool = False
    ) -> np.ndarray:
        """Sample a frame grid (cell ``step_u`` px along x ``step_v`` px across) per pixel."""
        map_x = self.u * (1.0 / step_u) + (grid.shape[1] - 1) / 2.0
        map_y = self.v * (1.0 / step_v) + (grid.shape[0] - 1) / 2.0
        interp = cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR
        return cv2.remap(grid, map_x, map_y, interp, borderMode=cv2.BORDER_REFLECT)


def _nuclei(blob: np.ndarray, rng: np.random.Generator, grain: float = 0.15) -> np.ndarray:
    """Soft nucleus mask from a blob map (edge 1..1.35) with chromatin grain."""
    nuc = _soft(blob, 1.0, 1.35)
    if grain > 0:
        # Unblurred grain: the final optical blur of the patch softens it.
        nuc = nuc * (1.0 + 0.6 * grain * _white(rng, blob.shape))
    return nuc


# --------------------------------------------------------------------------- textures
# Each texture returns haematoxylin and eosin concentration maps (H x W float32).
# Sizes are in pixels at a fixed magnification (lymphocyte nucleus ~5 px across).


def _tum_glands(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Glands: epithelial rings with basal nuclei around pale lumens, thin stroma between."""
    field = _smooth_noise(rng, shape, rng.uniform(16, 24))
    # At least one lumen, also in a small region (else it would look like plain stroma).
    lumen = field > min(rng.uniform(0.5, 0.8), float(field.max()) - 0.3)
    dist = cv2.distanceTransform((~lumen).astype(np.uint8), cv2.DIST_L2, 3)
    np.minimum(dist, 100.0, out=dist)
    width = rng.uniform(12, 16)
    lum = lumen.astype(np.float32)
    epi = _soft(width + 1.5 - dist, 0, 3) * (1 - lum)
    # Nuclei sit in a band near the basal side of the epithelium (away from the lumen).
    band = cv2.exp(-(((dist - 0.62 * width) / (0.2 * width)) ** 2))
    imp = _lattice(rng, shape, 5.5, (1.8, 4.0), 0.9 * band)
    nuc = _nuclei(_blobs(imp, 1.9, 2.3), rng, 0.25)
    stroma = 1.0 - epi - lum
    fibres = _fine_noise(rng, shape, 1.2)
    secretion = _smooth_noise(rng, shape, 7.0)
    h = 0.16 * epi + 0.03 * stroma + 1.5 * nuc + 0.03 * lum
    e = 0.62 * epi + stroma * (0.36 + 0.10 * fibres) + lum * (0.10 + 0.04 * secretion) - 0.4 * nuc
    return h, e


def _tum_solid(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Solid sheets: crowded large pleomorphic vesicular nuclei, amphophilic cytoplasm."""
    imp = _lattice(rng, shape, rng.uniform(12, 14), (1.8, 9.0), 0.92, jitter=0.3)
    blob = _blobs(imp, 3.0)
    nuc = _nuclei(blob, rng, 0.35)
    # Vesicular chromatin: paler centre, dark membrane, dark nucleolus.
    core = _soft(blob, 1.8, 2.8)
    nucleolus = _soft(blob, 5.5, 6.5)
    mottle = _smooth_noise(rng, shape, 10.0)
    h = 0.32 + 0.05 * mottle + 1.25 * nuc - 0.3 * core + 0.7 * nucleolus
    e = 0.45 + 0.06 * mottle - 0.3 * nuc
    return h, e


def _str_wavy(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Loose stroma: thin pink wavy fibres with pale gaps and sparse spindle nuclei."""
    frame = _FibreFrame(rng, shape, rng.uniform(3, 7), rng.uniform(30, 60), 4.0)
    # Fibres: white noise on a grid 12 px along x 1.5 px across, cubic-interpolated.
    streaks = frame.sample(_white(rng, frame.grid_shape(12, 1.5)), 12, 1.5, cubic=True)
    fibres = _soft(streaks, -0.2, 1.2)
    # Spindle nuclei: blobs on a grid of 2 px along x 1 px across (elongated 2:1 more).
    imp = _impulses(rng, frame.grid_shape(2, 1), 2 * rng.uniform(0.0012, 0.0020), (1.5, 4.0))
    spindle = _nuclei(frame.sample(_blobs(imp, 2.5, 1.1), 2, 1), rng, 0.1)
    e = 0.10 + 0.62 * fibres - 0.3 * spindle
    h = 0.02 + 0.03 * fibres + 1.1 * spindle
    return h, e


def _str_dense(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Dense collagen: broad, deeply eosinophilic hyalinised bundles with clefts, few nuclei."""
    frame = _FibreFrame(rng, shape, rng.uniform(0, 2), 90.0, 2.0)
    bundles = frame.sample(_white(rng, frame.grid_shape(16, 3)), 16, 3, cubic=True)
    # Thin clefts where the bundle field crosses zero.
    clefts = _soft(0.25 - np.abs(bundles), 0.0, 0.25)
    imp = _impulses(rng, frame.grid_shape(2, 1), 2 * rng.uniform(0.0003, 0.0006), (1.5, 3.0))
    spindle = _nuclei(frame.sample(_blobs(imp, 2.8, 0.9), 2, 1), rng, 0.0)
    e = (1.0 + 0.08 * bundles) * (1.0 - 0.75 * clefts) - 0.3 * spindle
    h = 0.05 + 1.2 * spindle
    return h, e


def _lym_dense(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Dense lymphocytes: a carpet of small, round, uniformly dark nuclei."""
    imp = _lattice(rng, shape, rng.uniform(6.3, 7.3), (2.4, 3.6), 0.92, jitter=0.42)
    nuc = np.minimum(_nuclei(_blobs(imp, 1.55), rng, 0.1), 1.1)
    h = 0.14 + 1.9 * nuc
    e = 0.24 - 0.15 * nuc
    return h, e


def _lym_scattered(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Scattered lymphocytes: small dark round nuclei in loose, pale pink tissue."""
    cluster = _soft(_smooth_noise(rng, shape, 25.0), -1.0, 1.0)
    imp = _lattice(rng, shape, 8.0, (2.4, 3.6), (0.05 + 0.35 * cluster), jitter=0.45)
    nuc = np.minimum(_nuclei(_blobs(imp, 1.55), rng, 0.1), 1.1)
    loose = _fine_noise(rng, shape, 1.5)
    h = 0.05 + 1.9 * nuc
    e = 0.32 + 0.10 * loose - 0.2 * nuc
    return h, e


def _nec_pale(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Pale debris: granular, smudgy pink material with ghost cells and rare pyknotic specks."""
    grain = _fine_noise(rng, shape, 0.8)
    clumps = _smooth_noise(rng, shape, 12.0)
    ghosts = _soft(
        _blobs(_impulses(rng, shape, rng.uniform(0.006, 0.009), (1.5, 4.0)), 3.0), 1.0, 1.5
    )
    specks = _nuclei(_blobs(_impulses(rng, shape, 0.0008, (1.5, 3.0)), 1.2), rng, 0.0)
    e = 0.42 + 0.10 * grain + 0.10 * clumps - 0.18 * ghosts
    h = 0.06 + 0.03 * grain + 0.06 * ghosts + 0.8 * specks
    return h, e


def _nec_dust(rng: np.random.Generator, shape: tuple[int, int]) -> Maps:
    """Nuclear dust (karyorrhexis): many tiny irregular dark fragments on purple-pink debris."""
    cluster = _soft(_smooth_noise(rng, shape, 20.0), -1.2, 0.8)
    dust = _impulses(rng, shape, rng.uniform(0.04, 0.06), (1.3, 3.0), cluster)
    clumps = _impulses(rng, shape, 0.002, (1.5, 4.0), cluster)
    frag = _blobs(dust, 0.8) + _blobs(clumps, 1.4)
    frag = _soft(frag * (1.0 + 0.5 * _fine_noise(rng, shape, 0.6)), 1.0, 1.3)
    grain = _fine_noise(rng, shape, 1.0)
    e = 0.42 + 0.08 * grain - 0.2 * frag
    h = 0.18 + 0.05 * grain + 0.15 * cluster + 1.4 * frag
    return h, e


_TEXTURES: dict[tuple[int, int], Callable[[np.random.Generator, tuple[int, int]], Maps]] = {
    (0, 0): _tum_glands,
    (0, 1): _tum_solid,
    (1, 0): _str_wavy,
    (1, 1): _str_dense,
    (2, 0): _lym_dense,
    (2, 1): _lym_scattered,
    (3, 0): _nec_pale,
    (3, 1): _nec_dust,
}


# --------------------------------------------------------------------------- layout


def _check_fraction(min_label_fraction: float) -> float:
    if (
        isinstance(min_label_fraction, bool)
        or not isinstance(min_label_fraction, (int, float, np.floating))
        or not 0.0 <= min_label_fraction <= MAX_LABEL_FRACTION
    ):
        raise ConfigError(
            f"min_label_fraction={min_label_fraction!r} (data.label_min_fraction) must be in "
            f"[0, {MAX_LABEL_FRACTION:g}] for synthetic data (default {MIN_LABEL_FRACTION:g})"
        )
    return float(min_label_fraction)


def _check_args(size: int, classes: Sequence[int] | None, subtype: int | None) -> list[int] | None:
    if not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ConfigError(
            f"synthetic patch size {size!r} is too small; use an int >= {_MIN_SIZE} "
            "(224 mirrors BCSS-WSSS)"
        )
    if subtype is not None and not 0 <= subtype < _NUM_SUBTYPES:
        raise ConfigError(
            f"subtype={subtype!r} is out of range; use None (random) or 0.."
            f"{_NUM_SUBTYPES - 1} (sub-types: {SUBTYPES})"
        )
    if classes is None:
        return None
    cls = [int(c) for c in classes]
    valid = ", ".join(f"{i}={n}" for i, n in enumerate(CLASS_NAMES))
    if not cls or len(set(cls)) != len(cls) or any(not 0 <= c < _NUM_CLASSES for c in cls):
        raise ConfigError(
            f"classes={list(classes)!r} is invalid; give 1..{_NUM_CLASSES} distinct "
            f"class indices ({valid}) or None for a random 1-3"
        )
    return cls


def _layout(
    rng: np.random.Generator, size: int, classes: list[int] | None, subtype: int | None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Region fields (R of H x W), class and sub-type of each region."""
    if classes is None:
        k = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
        classes = sorted(rng.choice(_NUM_CLASSES, size=k, replace=False).tolist())
    region_cls = list(classes)
    if rng.random() < 0.3:  # an extra region of a present class (maybe another sub-type)
        region_cls.append(int(rng.choice(classes)))
    n = len(region_cls)
    if subtype is None:
        region_sub = rng.integers(0, _NUM_SUBTYPES, n)
    else:
        region_sub = np.full(n, subtype)
    shape = (size, size)
    coarse = rng.uniform(size / 3.5, size / 1.8)
    # Coarse blobs plus a shared finer field with a different weight per region (any two
    # weights differ by >= 2 / (n - 1)), so borders between regions are irregular.
    if n == 1:
        return [np.zeros(shape, np.float32)], np.asarray(region_cls), region_sub.astype(np.int64)
    fine = _smooth_noise(rng, shape, 12.0)
    weights = rng.permutation(np.linspace(-0.25, 0.25, n))
    fields = [_smooth_noise(rng, shape, coarse) + float(wt) * fine for wt in weights]
    return fields, np.asarray(region_cls, np.int64), region_sub.astype(np.int64)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Glass at a tissue edge (about 5-60 % of the patch) in half the patches, small holes."""
    shape = (size, size)
    bg = np.zeros(shape, bool)
    if rng.random() < 0.5:
        field = _smooth_noise(rng, shape, rng.uniform(size / 2.5, size / 1.2))
        field += 0.1 * _smooth_noise(rng, shape, 6.0)  # frayed edge
        # The field is ~N(0, 1): threshold at the normal quantile of the wanted fraction.
        bg = field > NormalDist().inv_cdf(1.0 - rng.uniform(0.05, 0.6))
        if bg.mean() > 0.7:  # keep at least 30 % tissue
            bg = field > np.quantile(field, 0.7)
    if rng.random() < 0.5:
        imp = _impulses(rng, shape, rng.uniform(2, 6) / (224 * 224), (1.5, 20.0))
        holes = _blobs(imp, rng.uniform(3, 5)) * (1.0 + 0.3 * _smooth_noise(rng, shape, 4.0))
        bg |= holes > 1.0
    if bg.any():  # no specks of glass in tissue or of tissue on glass
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        bg8 = cv2.morphologyEx(bg.astype(np.uint8), cv2.MORPH_OPEN, kernel)
        bg = cv2.morphologyEx(bg8, cv2.MORPH_CLOSE, kernel).astype(bool)
    return bg


def _resolve(
    fields: list[np.ndarray], region_cls: np.ndarray, bg: np.ndarray, min_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Region index per pixel (R = background) after dropping classes below the label rule.

    Returns:
        region: H x W uint8, index into ``fields`` or ``len(fields)`` for background.
        counts: (R + 1,) pixels per region (background last).
    """
    n = len(fields)
    alive = np.ones(n, bool)
    while True:
        # argmax over the live fields; a loop over R <= 4 maps beats np.argmax(axis=0).
        live = np.flatnonzero(alive)
        region = np.full(bg.shape, live[0], np.uint8)
        best = fields[live[0]].copy()
        for r in live[1:]:
            np.copyto(region, np.uint8(r), where=fields[r] > best)
            np.maximum(best, fields[r], out=best)
        np.copyto(region, np.uint8(n), where=bg)
        counts = np.array([np.count_nonzero(region == r) for r in range(n + 1)])
        class_px = np.bincount(region_cls, weights=counts[:n], minlength=_NUM_CLASSES)
        small = (class_px > 0) & (class_px < min_fraction * bg.size)
        if not small.any():
            return region, counts
        alive &= ~small[region_cls]
        # With glass capped at 70 % some class (almost) always keeps >= MAX_LABEL_FRACTION;
        # if not, all glass.
        if not alive.any():
            region[:] = n
            counts = np.zeros(n + 1, np.int64)
            counts[n] = region.size
            return region, counts


# --------------------------------------------------------------------------- rendering


def _stain_to_rgb(
    rng: np.random.Generator, h: np.ndarray, e: np.ndarray, bg: np.ndarray
) -> np.ndarray:
    """Beer-Lambert rendering with per-patch stain vectors, intensities, glass, blur, noise.

    ``h`` and ``e`` (stain concentrations, H x W float32) are modified in place.
    """
    hv = _H_VEC + rng.normal(0, 0.05, 3).astype(np.float32)
    ev = _E_VEC + rng.normal(0, 0.05, 3).astype(np.float32)
    hv = np.abs(hv) / np.linalg.norm(hv) * rng.uniform(0.7, 1.3)
    ev = np.abs(ev) / np.linalg.norm(ev) * rng.uniform(0.7, 1.3)
    glass = rng.uniform(0.02, 0.09) * (1 + rng.normal(0, 0.15, 3))
    # Python floats keep the float32 maps float32 (a numpy float64 scalar would promote).
    hv, ev, glass = hv.tolist(), ev.tolist(), glass.tolist()
    np.maximum(h, 0, out=h)
    np.maximum(e, 0, out=e)
    if bg.any():
        tissue = (~bg).astype(np.float32)
        h *= tissue
        e *= tissue
        # Tissue edges take up more eosin (drying artefact): + 0.25 exp(-d / 2.5 px).
        edge = cv2.exp(cv2.distanceTransform((~bg).astype(np.uint8), cv2.DIST_L2, 3) * -0.4)
        edge *= tissue
        cv2.scaleAdd(edge, 0.25, e, dst=e)
    # Optical density per channel (H x W x 3), transmitted light exp(-OD) in 0..1. The
    # 3-channel steps run in place: fresh large temporaries cost page faults each time.
    rgb = cv2.merge([cv2.addWeighted(h, -hv[c], e, -ev[c], -glass[c]) for c in range(3)])
    cv2.exp(rgb, dst=rgb)
    cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.35, 1.0), dst=rgb)
    # Sensor noise, uniform on [-m/2, m/2] grey levels for m = 3, 7 or 15 (std 1.1, 2.3
    # or 4.6), added in uint8: round(255 * rgb - m/2) plus uniform 0..m, saturating. (The
    # darkest pixels are ~20, so the abs() of convertScaleAbs never applies.)
    mask = int(rng.choice([3, 7, 15]))
    image = cv2.convertScaleAbs(rgb, alpha=255.0, beta=-mask / 2.0)
    noise = np.frombuffer(rng.bytes(image.size), np.uint8).reshape(image.shape) & mask
    return cv2.add(image, noise)


def _span(used: np.ndarray, min_len: int) -> slice:
    """Slice from the first to the last True of ``used``, widened to ``min_len`` if shorter."""
    idx = np.flatnonzero(used)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if hi - lo < min_len:
        lo = max(0, min(lo - (min_len - (hi - lo)) // 2, used.size - min_len))
        hi = min(used.size, lo + min_len)
    return slice(lo, hi)


def generate_patch(
    seed: int,
    size: int = 224,
    *,
    classes: Sequence[int] | None = None,
    subtype: int | None = None,
    background: bool = True,
    min_label_fraction: float = MIN_LABEL_FRACTION,
) -> SyntheticPatch:
    """Draw one H&E-like patch with its exact mask, image-level label and sub-types.

    Args:
        seed: any int; the same seed (and arguments) gives byte-identical output.
        size: patch side in pixels (structures have a fixed size in pixels, like a
            fixed magnification).
        classes: ``None`` for 1-3 random classes; a list of class indices (0 TUM,
            1 STR, 2 LYM, 3 NEC) for exactly those, e.g. ``[c]`` for a single-class
            patch (prototype banks). A listed class that ends up below
            ``min_label_fraction`` is reassigned and absent from the label.
        subtype: force this sub-type index for every region; ``None`` draws one per region.
        background: ``False`` for no glass and no holes (all pixels tissue).
        min_label_fraction: label rule, in ``[0, MAX_LABEL_FRACTION]``; 0: any pixel.

    Returns:
        The patch; ``label`` follows ``min_label_fraction`` exactly.

    Raises:
        ConfigError: on a negative seed, a size below 32, an unknown class index or
            sub-type, or a label fraction out of range.
    """
    cls = _check_args(size, classes, subtype)
    fraction = _check_fraction(min_label_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid; use an int >= 0")
    rng = np.random.default_rng(int(seed))
    fields, region_cls, region_sub = _layout(rng, size, cls, subtype)
    bg = _background(rng, size) if background else np.zeros((size, size), bool)
    region, counts = _resolve(fields, region_cls, bg, fraction)
    n = len(region_cls)
    bg = region == n

    shape = (size, size)
    h = np.zeros(shape, np.float32)
    e = np.zeros(shape, np.float32)
    looks: dict[tuple[int, int], list[int]] = {}  # regions sharing a look share one texture
    for r in range(n):
        if counts[r] > 0:  # 0: dropped by the label rule
            looks.setdefault((int(region_cls[r]), int(region_sub[r])), []).append(r)
    for key, regions in looks.items():
        sel = region == regions[0]
        for r in regions[1:]:
            sel |= region == r
        # Draw the texture only over the bounding box of its pixels (textures are stationary).
        ys, xs = _span(sel.any(axis=1), 16), _span(sel.any(axis=0), 16)
        tex_h, tex_e = _TEXTURES[key](rng, (ys.stop - ys.start, xs.stop - xs.start))
        np.copyto(h[ys, xs], tex_h, where=sel[ys, xs])
        np.copyto(e[ys, xs], tex_e, where=sel[ys, xs])
    image = _stain_to_rgb(rng, h, e, bg)

    lut = np.append(region_cls, BACKGROUND_INDEX).astype(np.uint8)
    mask = lut[region]
    class_px = np.bincount(region_cls, weights=counts[:n], minlength=_NUM_CLASSES)
    label = ((class_px > 0) & (class_px >= fraction * mask.size)).astype(np.uint8)
    # Sub-type per class: the one covering most pixels (regions of a class may differ).
    area = np.zeros((_NUM_CLASSES, _NUM_SUBTYPES), np.int64)
    np.add.at(area, (region_cls, region_sub), counts[:n])
    subtypes = np.where(label > 0, area.argmax(axis=1), -1).astype(np.int8)
    return SyntheticPatch(image=image, mask=mask, label=label, subtypes=subtypes)


# --------------------------------------------------------------------------- dataset


def _patch_seed(seed: int, split: str, index: int, attempt: int = 0) -> int:
    """Independent seed for patch ``index`` of ``split`` (splits never share a stream)."""
    ss = np.random.SeedSequence([int(seed), _SPLIT_IDS[split], int(index), int(attempt)])
    return int(
        ss.generate_state(2, np.uint32).astype(np.uint64) @ np.array([1 << 32, 1], np.uint64)
    )


_PNG_LEVEL = 3  # zlib level of the dataset PNGs: fast to write, same pixels


def _label_str(label: np.ndarray) -> str:
    return "".join(str(int(v)) for v in label)


def write_dataset(
    root: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    size: int = 224,
    seed: int = 0,
    single_class_fraction: float = 0.3,
    progress: bool = True,
    min_label_fraction: float = MIN_LABEL_FRACTION,
) -> dict:
    """Write a synthetic dataset in the BCSS-WSSS folder layout.

    Layout::

        root/training/<id>+synth<group>[TSLN].png   e.g. 000123+synth07[1010].png
        root/val/img/<id>.png   root/val/mask/<id>.png   (mask: 'L' PNG, 0..3 class, 4 bg)
        root/test/img/<id>.png  root/test/mask/<id>.png
        root/synthetic.json          generator version, seed, size, counts, label rule, names
        root/training_subtypes.csv   file, label, sub-type index per class (-1 absent)

    Training patches always have at least one class (a patch without one is
    redrawn from the next sub-seed); ``round(single_class_fraction * n_train)``
    of them are drawn as single-class patches (classes in turn), the rest with
    1-3 random classes. ``<group>`` is a pseudo-slide id (20 contiguous groups).
    Patch ``i`` of split ``s`` uses ``SeedSequence([seed, s, i, attempt])``, so the
    splits never share a patch and the same arguments write identical files.
    Files are written atomically; a rerun with the same arguments rewrites the
    same files.

    Args:
        root: output folder (created).
        n_train: training patches (image-level label in the file name).
        n_val: validation patches with masks.
        n_test: test patches with masks.
        size: patch side in pixels.
        seed: dataset seed.
        single_class_fraction: fraction of training patches with exactly one class.
        progress: show a tqdm progress bar.
        min_label_fraction: label rule (a run config's ``data.label_min_fraction``),
            in ``[0, MAX_LABEL_FRACTION]``; recorded in ``synthetic.json``.

    Returns:
        A summary: root, counts, seed, size, version, training label frequency per
        class, number of single-class training patches, seconds taken.

    Raises:
        ConfigError: on negative counts, a bad size or fraction.
        DataError: if ``root`` already holds patches of another synthetic dataset.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid; use an int >= 0")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"{name}={n!r} must be an int >= 0")
    if not 0.0 <= single_class_fraction <= 1.0:
        raise ConfigError(f"single_class_fraction={single_class_fraction!r} must be in [0, 1]")
    _check_args(size, None, None)
    fraction = _check_fraction(min_label_fraction)
    root = Path(root)
    start = time.perf_counter()

    n_single = round(single_class_fraction * n_train)
    meta = {
        "generator": "lpdseg.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": int(size),
        "counts": {"training": n_train, "val": n_val, "test": n_test},
        "single_class_training": int(n_single),
        "single_class_fraction": float(single_class_fraction),
        "class_names": list(CLASS_NAMES),
        "background_index": BACKGROUND_INDEX,
        "subtypes": {k: list(v) for k, v in SUBTYPES.items()},
        "min_label_fraction": fraction,
        "label_rule": label_rule(fraction),
        "label_order": "TUM STR LYM NEC (BCSS-WSSS)",
        "seed_rule": "patch i of split s (training=0, val=1, test=2) uses "
        "SeedSequence([seed, s, i, attempt]); attempt > 0 only for redrawn "
        "training patches without any class",
    }
    _refuse_foreign(root, meta)

    order = np.random.default_rng(np.random.SeedSequence([int(seed), 99])).permutation(n_train)
    single_class = np.full(n_train, -1, np.int64)
    single_class[order[:n_single]] = np.arange(n_single) % _NUM_CLASSES
    group_len = max(1, math.ceil(n_train / 20))
    (root / "training").mkdir(parents=True, exist_ok=True)
    for split in ("val", "test"):
        for sub in ("img", "mask"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)

    bar = tqdm(
        total=n_train + n_val + n_test, desc="synthetic H&E", unit="patch", disable=not progress
    )
    rows = []
    freq = np.zeros(_NUM_CLASSES, np.int64)
    for i in range(n_train):
        cls = None if single_class[i] < 0 else [int(single_class[i])]
        for attempt in range(100):  # glass is capped at 70 %: a redraw is (almost) never needed
            patch = generate_patch(
                _patch_seed(seed, "training", i, attempt),
                size,
                classes=cls,
                min_label_fraction=fraction,
            )
            if patch.label.any():
                break
        assert patch.label.any(), "no tissue class in 100 draws"
        name = f"{i:06d}+synth{i // group_len:02d}[{_label_str(patch.label)}].png"
        save_png(root / "training" / name, patch.image, _PNG_LEVEL)
        rows.append([name, _label_str(patch.label), *(int(s) for s in patch.subtypes)])
        freq += patch.label
        bar.update()
    for split, n in (("val", n_val), ("test", n_test)):
        for i in range(n):
            patch = generate_patch(_patch_seed(seed, split, i), size, min_label_fraction=fraction)
            save_png(root / split / "img" / f"{i:06d}.png", patch.image, _PNG_LEVEL)
            save_png(root / split / "mask" / f"{i:06d}.png", patch.mask, _PNG_LEVEL)
            bar.update()
    bar.close()

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "label", *(f"{c}_subtype" for c in CLASS_NAMES)])
    writer.writerows(rows)
    atomic_write_text(root / "training_subtypes.csv", buf.getvalue())

    atomic_write_json(root / "synthetic.json", meta)
    seconds = time.perf_counter() - start
    log.info(
        "wrote %d/%d/%d synthetic patches (%d px) to %s in %.1f s",
        n_train,
        n_val,
        n_test,
        size,
        root,
        seconds,
    )
    return {
        "root": str(root),
        "training": n_train,
        "val": n_val,
        "test": n_test,
        "size": int(size),
        "seed": int(seed),
        "version": GENERATOR_VERSION,
        "class_frequency": {c: int(f) for c, f in zip(CLASS_NAMES, freq, strict=True)},
        "single_class_training": int(n_single),
        "seconds": round(seconds, 2),
    }


def _refuse_foreign(root: Path, meta: dict) -> None:
    """Raise if ``root`` holds patches that this call would not (fully) overwrite.

    Rewriting a folder made with identical settings is allowed (same files);
    anything else would mix two datasets.
    """
    folders = [root / "training", root / "val" / "img", root / "test" / "img"]
    has_png = any(f.is_dir() and any(f.glob("*.png")) for f in folders)
    if not has_png:
        return
    json_path = root / "synthetic.json"
    old = None
    if json_path.is_file():
        try:
            old = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
    keys = (
        "generator_version",
        "seed",
        "size",
        "counts",
        "single_class_fraction",
        "min_label_fraction",
    )
    if old is None or any(old.get(k) != meta[k] for k in keys):
        found = (
            "no readable synthetic.json"
            if old is None
            else (
                "a synthetic.json with "
                + ", ".join(f"{k}={old.get(k)!r}" for k in keys if old.get(k) != meta[k])
            )
        )
        raise DataError(
            f"{root} already holds PNG patches ({found}) that this synthetic dataset would not "
            f"exactly overwrite; write to an empty folder or delete {root} first, so old and "
            "new patches do not mix"
        )


# --------------------------------------------------------------------------- pictures


def sample_sheet(path: str | Path, n: int = 8, seed: int = 0, size: int = 224) -> Path:
    """Save a PNG sheet: ``n`` random patches over their coloured masks, then one
    single-class patch per class and sub-type (two rows: sub-type 0 and 1).

    Args:
        path: output PNG.
        n: random patches in the first two rows.
        seed: sheet seed.
        size: patch size.

    Returns:
        The path written.
    """
    pad, text_h = 4, 14
    cell = size + pad
    cols = max(n, 2 * _NUM_CLASSES)
    rows_h = [size + text_h, size, size + text_h, size + text_h]
    sheet = Image.new("RGB", (cols * cell + pad, sum(rows_h) + pad * 5), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for i in range(n):
        p = generate_patch(int(np.random.SeedSequence([seed, 7, i]).generate_state(1)[0]), size)
        x = pad + i * cell
        text = " ".join(
            f"{CLASS_NAMES[c]}:{SUBTYPES[CLASS_NAMES[c]][p.subtypes[c]]}"
            for c in range(_NUM_CLASSES)
            if p.label[c]
        )
        draw.text((x, y), text[: size // 6], fill=(0, 0, 0))
        sheet.paste(Image.fromarray(p.image), (x, y + text_h))
        sheet.paste(Image.fromarray(colorize(p.mask, MASK_COLORS)), (x, y + text_h + size + pad))
    y += rows_h[0] + rows_h[1] + 2 * pad
    for s in range(_NUM_SUBTYPES):
        for c in range(_NUM_CLASSES):
            for k in range(2):
                p = generate_patch(
                    int(np.random.SeedSequence([seed, 8, c, s, k]).generate_state(1)[0]),
                    size,
                    classes=[c],
                    subtype=s,
                    background=False,
                )
                x = pad + (2 * c + k) * cell
                draw.text((x, y), f"{CLASS_NAMES[c]} {SUBTYPES[CLASS_NAMES[c]][s]}", fill=(0, 0, 0))
                sheet.paste(Image.fromarray(p.image), (x, y + text_h))
        y += rows_h[2 + s] + pad
    path = Path(path)
    names = (*CLASS_NAMES, "background")  # the mask colours
    save_png(path, add_legend(np.asarray(sheet), names, MASK_COLORS), _PNG_LEVEL)
    return path
