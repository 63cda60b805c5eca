"""From a config to data loaders: resolved classes, normalisation and seeded batches.

Every file a run will read is checked before the work starts (:func:`resolve_data`):
the header of each training image (no pixels decoded), and each val/test image
header with its mask decoded. A bad file stops the run there, naming the file
and the fix, or with ``data.skip_bad=true`` is skipped, logged and listed in
:attr:`DataBundle.bad`. A file that passes these checks but still fails to
decode later (e.g. truncated pixel data) is handled the same way when read.

Training batches are deterministic and resumable: the order of epoch ``e`` is a
permutation seeded by ``(seed, e)``, and the augmentation of sample ``i`` in
epoch ``e`` draws from a generator seeded by ``(seed, e, i)``, whichever
worker loads it. A resumed run skips the batches its epoch already consumed.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lpdseg.config import Config
from lpdseg.data.datasets import (
    CONFIG_HINTS,
    MIN_IMAGE_SIDE,
    BadFile,
    FixHints,
    MaskedDataset,
    Sample,
    _file_problem,
    _Problems,
    check_masked_samples,
    get_format,
    image_header_size,
    list_split,
    read_image,
    read_mask,
)
from lpdseg.data.transforms import AugmentConfig, EvalTransform, TrainTransform
from lpdseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Default colours: tissue classes in order, background last (white).
DEFAULT_COLORS = [
    (220, 20, 60),
    (46, 139, 87),
    (65, 105, 225),
    (255, 165, 0),
    (148, 0, 211),
    (0, 206, 209),
    (255, 105, 180),
    (128, 128, 0),
    (139, 69, 19),
    (112, 128, 144),
]
BACKGROUND_COLOR = (255, 255, 255)


@dataclass
class DataBundle:
    """What a run needs to know about its data.

    Attributes:
        root: dataset folder.
        format: dataset format name.
        class_names: tissue class names (background is index ``len(class_names)``).
        mean, std: the dataset's RGB statistics (``data.mean/std``, else the
            format's); pretrained weights may override them for the model, see
            ``models.preprocess.choose_statistics``.
        colors: RGB per class, background last.
        train: training samples (image-level labels).
        bad: files skipped with ``data.skip_bad`` (training, val and test).
        csv: the CSV manifest (``data.csv``).
        eval_samples: checked val/test samples by split (see :func:`resolve_data`).
        skip_bad: whether bad files are skipped (``None``: the config's ``data.skip_bad``).
        hints: how the user of the caller fixes what an error names.
    """

    root: Path
    format: str
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    colors: list[tuple[int, int, int]]
    train: list[Sample] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)
    csv: str | None = None
    eval_samples: dict[str, list[Sample]] = field(default_factory=dict)
    skip_bad: bool | None = None
    hints: FixHints = CONFIG_HINTS

    def has_split(self, split: str) -> bool:
        """Whether an evaluation split (``val``/``test``) with images exists on disk.

        The folder is the one :func:`list_split` reads (``val/`` before ``valid/``);
        an empty ``img/`` folder (e.g. ``lpdseg synth --n-test 0``) is no split.
        """
        names = {"val": ("val", "valid"), "test": ("test",)}[split]
        if self.format == "csv":
            return any((self.root / f"{n}.csv").is_file() for n in names)
        base = next((self.root / n for n in names if (self.root / n).is_dir()), None)
        if base is not None:
            return _holds_files(base / "img")
        # list_split's fallback: val images in root/img + root/mask (e.g. WSSS4LUAD's val release)
        return split == "val" and (self.root / "mask").is_dir() and _holds_files(self.root / "img")

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // batch_size)


def resolve_data(
    cfg: Config,
    need_train: bool = True,
    *,
    eval_splits: Sequence[str] | None = None,
    skip_bad: bool | None = None,
    hints: FixHints = CONFIG_HINTS,
) -> DataBundle:
    """Resolve classes and normalisation, and list and check the files of ``cfg.data``.

    Checked here, before any work starts: the header of every training image
    (readable, not a decompression bomb, at least 8 px; pixels not decoded;
    stage 2: its pseudo mask's header too) and, for each split of
    ``eval_splits`` on disk, every image header and decoded mask (values in the
    class set, the image's size). Bad files raise, naming the file and the fix,
    or with ``skip_bad`` are left out, logged and listed in ``DataBundle.bad``.

    Args:
        cfg: the run config.
        need_train: list the training samples.
        eval_splits: evaluation splits to check now (those present on disk);
            default: ``val`` and ``test`` when ``need_train`` (a training run
            scores both), else none (:func:`make_eval_loader` checks its split).
        skip_bad: skip bad files (default: ``data.skip_bad``).
        hints: how the caller's user skips bad files or points at the data (default:
            the config's keys, e.g. ``data.skip_bad=true``).

    Raises:
        ConfigError: no data root given.
        DataError: the folder or its files are unusable (names the file).
    """
    d = cfg.data
    if not d.root:
        raise ConfigError(
            "data.root is not set; point it at a dataset folder "
            "(e.g. data.root=data/synthetic, written by `lpdseg synth`)"
        )
    root = Path(d.root)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; create it with `lpdseg synth {root}` "
            f"or {hints.root}"
        )
    skip = d.skip_bad if skip_bad is None else bool(skip_bad)
    fmt = get_format(d.format) if d.format != "csv" else None
    if d.class_names:
        names = tuple(d.class_names)
    elif fmt is not None:
        names = fmt.class_names
    else:
        raise ConfigError("format=csv needs data.class_names (the label columns)")
    train: list[Sample] = []
    bad: list[BadFile] = []
    if need_train and cfg.train.task == "seg":
        if not d.pseudo:
            raise ConfigError(
                "train.task=seg needs data.pseudo=<folder written by `lpdseg pseudo`>"
            )
        t0 = time.perf_counter()
        train, bad = check_pseudo_samples(read_pseudo_manifest(d.pseudo), skip, hints)
        log.info("checked %d pseudo-mask pairs in %.1f s", len(train) + len(bad), _since(t0))
        _log_skipped("pseudo-mask training", bad, hints)
        if not train:
            raise DataError(f"{Path(d.pseudo) / 'manifest.csv'}: no usable training pairs")
    elif need_train:
        t0 = time.perf_counter()
        train, bad = list_split(
            root, d.format, "train", skip_bad=skip, csv_path=d.csv, check_images=True, hints=hints
        )
        log.info("checked %d training image headers in %.1f s", len(train) + len(bad), _since(t0))
        _log_skipped("training", bad, hints)
        if not train:
            raise DataError(f"no usable training images under {root}")
    if train and train[0].label is not None and len(train[0].label) != len(names):
        raise DataError(
            f"{train[0].image}: label has {len(train[0].label)} classes but the config "
            f"names {len(names)} ({', '.join(names)}); fix data.class_names"
        )
    fmt_mean = fmt.mean if fmt else (0.5, 0.5, 0.5)
    fmt_std = fmt.std if fmt else (0.25, 0.25, 0.25)
    # explicit data.mean/std, else the format's; the model layer may prefer its
    # pretrained weights' statistics (models.preprocess.choose_statistics)
    mean, std = (
        (tuple(cfg.data.mean), tuple(cfg.data.std))
        if cfg.data.mean is not None and cfg.data.std is not None
        else (tuple(fmt_mean), tuple(fmt_std))
    )
    colors = (
        [tuple(c) for c in d.colors]
        if d.colors
        else (
            [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(names))]
            + [BACKGROUND_COLOR]
        )
    )
    if len(colors) != len(names) + 1:
        raise ConfigError(f"data.colors needs {len(names) + 1} RGB triples (classes + background)")
    bundle = DataBundle(
        root, d.format, names, mean, std, colors, train, bad, d.csv, skip_bad=skip, hints=hints
    )
    if eval_splits is None:
        eval_splits = ("val", "test") if need_train else ()
    for split in eval_splits:
        if bundle.has_split(split):
            bundle.eval_samples[split] = check_eval_split(bundle, split)
    return bundle


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` exists and holds a file that is not hidden."""
    return folder.is_dir() and any(
        p.is_file() and not p.name.startswith(".") for p in folder.iterdir()
    )


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def _log_skipped(what: str, bad: Sequence[BadFile], hints: FixHints) -> None:
    if bad:
        log.warning(
            "skipped %d bad %s files (%s): %s%s",
            len(bad),
            what,
            hints.skip_bad.removeprefix("set ").removeprefix("pass "),
            "; ".join(f"{b.path}: {b.reason}" for b in bad[:20]),
            f"; ... ({len(bad) - 20} more)" if len(bad) > 20 else "",
        )


def check_pseudo_samples(
    samples: Sequence[Sample], skip_bad: bool, hints: FixHints = CONFIG_HINTS
) -> tuple[list[Sample], list[BadFile]]:
    """Stage-2 pairs whose image and pseudo mask headers are readable and of one size.

    Headers only (no pixels decoded): readable, not a decompression bomb, the
    image at least 8 px, the mask the image's size (either orientation: the
    image's EXIF orientation is not read here, :func:`read_mask` checks exactly).
    """
    problems = _Problems(skip_bad, hints)
    good = []
    for s in samples:
        if s.mask is None:
            problems.add(s.image, "has no pseudo mask in the manifest")
            continue
        image_wh, reason = _header(s.image, "image", MIN_IMAGE_SIDE)
        if reason is not None:
            problems.add(s.image, reason)
            continue
        mask_wh, reason = _header(s.mask, "mask", 1)
        if reason is not None:
            problems.add(s.mask, reason)
            continue
        (iw, ih), (mw, mh) = image_wh, mask_wh
        if (mw, mh) not in ((iw, ih), (ih, iw)):
            problems.add(
                s.mask,
                f"pseudo mask is {mh}x{mw} (H x W) but its image {s.image} is {ih}x{iw}; "
                "write the pseudo masks again (lpdseg pseudo)",
            )
            continue
        good.append(s)
    return good, problems.bad


def _header(path: Path, what: str, min_side: int) -> tuple[tuple[int, int], str | None]:
    """``((width, height), None)`` from the header, or ``(_, why it is unusable)``."""
    reason = _file_problem(path, False)
    if reason is not None:
        return (0, 0), reason
    try:
        w, h = image_header_size(path, what)
    except DataError as exc:
        return (0, 0), str(exc).removeprefix(f"{path}: ")
    if min(w, h) < min_side:
        return (w, h), (
            f"{what} is {h}x{w} pixels (H x W); {what}s must be at least {min_side} px on "
            "each side - remove it or use a larger crop"
        )
    return (w, h), None


def check_eval_split(bundle: DataBundle, split: str, skip_bad: bool | None = None) -> list[Sample]:
    """List and check one evaluation split of ``bundle`` (see :func:`resolve_data`).

    Bad files are skipped (logged, added to ``bundle.bad``) when ``skip_bad``
    (default: the bundle's); else the first raises, naming the file and the fix.

    Raises:
        DataError: a bad file without ``skip_bad``, or no usable image left.
    """
    skip = bool(bundle.skip_bad) if skip_bad is None else skip_bad
    t0 = time.perf_counter()
    samples, bad = list_split(
        bundle.root,
        bundle.format,
        split,
        skip_bad=skip,
        csv_path=bundle.csv,
        check_images=True,
        hints=bundle.hints,
    )
    good, bad_masks = check_masked_samples(
        samples, len(bundle.class_names), skip_bad=skip, hints=bundle.hints
    )
    bad = [*bad, *bad_masks]
    log.info("checked %d %s images and masks in %.1f s", len(samples), split, _since(t0))
    _log_skipped(split, bad, bundle.hints)
    bundle.bad.extend(bad)
    if not good:
        raise DataError(
            f"no usable {split} images under {bundle.root}: all {len(bad)} were bad "
            f"(first: {bad[0].path}: {bad[0].reason}); fix them or remove the {split} split"
        )
    return good


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededWeakDataset(Dataset):
    """Training samples with augmentation seeded by ``(seed, epoch, index)``.

    With ``skip_bad`` a sample that fails to decode (its header passed
    :func:`resolve_data`'s check, its pixels did not) is logged and replaced by
    the next readable sample, augmented with the same seed: batches keep their
    size and stay deterministic. Without it the error names the file and how to skip it.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: TrainTransform,
        seed: int,
        epoch: int,
        *,
        skip_bad: bool = False,
        hints: FixHints = CONFIG_HINTS,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.skip_bad = skip_bad
        self.hints = hints
        self._takes_rng = "rng" in inspect.signature(transform.__call__).parameters

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, sample: Sample):
        return read_image(sample.image)

    def _read(self, index: int):
        """``(sample, pixels)`` of ``index``, or with ``skip_bad`` of the next readable one."""
        n = len(self.samples)
        for k in range(n):
            sample = self.samples[(index + k) % n]
            try:
                return sample, self._decode(sample)
            except DataError as exc:
                if not self.skip_bad:
                    raise self.hints.with_skip_advice(exc) from exc
                log.warning(
                    "skipping %s (the next sample is used in its place): %s", sample.image, exc
                )
        raise DataError(f"none of the {n} training images could be read; see the warnings above")

    def __getitem__(self, index: int) -> dict:
        sample, image = self._read(index)
        s = sample_seed(self.seed, self.epoch, index)
        # fork_rng keeps the caller's torch RNG untouched (num_workers=0 shares it)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            if self._takes_rng:
                tensor = self.transform(image, rng=np.random.default_rng(s))
            else:
                tensor = self.transform(image)
        if isinstance(tensor, tuple):
            tensor = tensor[0]
        return {
            "image": tensor,
            "label": torch.as_tensor(sample.label, dtype=torch.float32),
            "name": sample.image.name,
        }


class SeededMaskDataset(SeededWeakDataset):
    """Stage 2: images with (pseudo) masks, geometry applied to both, seeded like above."""

    def _decode(self, sample: Sample):
        image = read_image(sample.image)
        return image, read_mask(sample.mask, self.num_classes, expected_hw=image.shape[:2])

    def __getitem__(self, index: int) -> dict:
        sample, (image, mask) = self._read(index)
        s = sample_seed(self.seed, self.epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            if self._takes_rng:
                tensor, mask_t = self.transform(image, mask, rng=np.random.default_rng(s))
            else:
                tensor, mask_t = self.transform(image, mask)
        return {"image": tensor, "mask": torch.as_tensor(mask_t).long(), "name": sample.image.name}


def read_pseudo_manifest(folder: str | Path) -> list[Sample]:
    """Samples of a pseudo-mask folder (``manifest.csv``: image,mask,label).

    Stage 2 checks where the images come from (``lpdseg.engine.train.check_pseudo_source``:
    they must lie under ``data.root``, and ``pseudo.json`` must record this data root and
    its class names).

    Raises:
        DataError: no manifest, missing columns, a malformed label (row named),
            labels of different lengths, a missing mask file, or no rows.
    """
    import csv

    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise DataError(
            f"{manifest} not found; write pseudo masks with `lpdseg pseudo CHECKPOINT "
            f"--out {folder}`"
        )
    samples = []
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("image", "mask", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{manifest}: no {', '.join(missing)} column (header: {reader.fieldnames}); a "
                "pseudo-mask manifest has the columns image,mask,label (written by "
                "`lpdseg pseudo`)"
            )
        for row_number, row in enumerate(reader, start=2):
            try:
                label = np.array([int(v) for v in (row["label"] or "").split()], np.uint8)
            except ValueError:
                label = np.zeros(0, np.uint8)
            if label.size == 0 or not set(label.tolist()) <= {0, 1}:
                raise DataError(
                    f"{manifest}, row {row_number}: label {row['label']!r} is not 0/1 values "
                    "separated by spaces (e.g. '1 0 1'); rewrite it with `lpdseg pseudo`"
                )
            if samples and label.size != samples[0].label.size:
                raise DataError(
                    f"{manifest}, row {row_number}: label has {label.size} classes but row 2 "
                    f"has {samples[0].label.size}; every row needs the same classes"
                )
            mask = folder / row["mask"]
            if not mask.is_file():
                raise DataError(
                    f"{manifest}, row {row_number}: mask {mask} does not exist; the folder is "
                    f"incomplete: write it again with `lpdseg pseudo CHECKPOINT --out {folder} "
                    "--overwrite`"
                )
            samples.append(Sample(Path(row["image"]), label, mask))
    if not samples:
        raise DataError(f"{manifest} lists no images")
    return samples


def repeat_factors(labels: np.ndarray, threshold: float) -> np.ndarray:
    """Per image: how many times as often it is drawn (repeat-factor sampling).

    A class in a fraction ``f`` of the training images gets ``max(1, sqrt(t / f))``
    (Gupta et al., 2019, LVIS); an image takes the largest factor of its classes.
    So an image with a rare class (normal tissue in one patch of ten) is seen more
    often, without the many-fold repeats of full inverse-frequency weighting.

    Args:
        labels: ``N x C`` image-level labels (0/1).
        threshold: ``t`` in (0, 1]: classes in at least this fraction are not repeated.
    """
    present = np.asarray(labels) > 0
    freq = present.mean(axis=0) if len(present) else np.zeros(present.shape[1])
    per_class = np.where(freq > 0, np.sqrt(threshold / np.maximum(freq, 1e-12)), 1.0)
    per_class = np.maximum(per_class, 1.0)
    return np.where(present, per_class[None, :], 1.0).max(axis=1, initial=1.0)


class ResumableSampler(Sampler[int]):
    """Permutation of epoch ``epoch`` (seeded), starting after ``start`` samples.

    With ``repeats`` (see :func:`repeat_factors`) sample ``i`` enters the epoch's pool
    ``floor(r_i)`` times plus once more with probability ``r_i - floor(r_i)``; the
    epoch is the first ``n`` of the shuffled pool, so its length does not change.
    """

    def __init__(
        self, n: int, seed: int, epoch: int, start: int = 0, repeats: np.ndarray | None = None
    ) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.repeats = None if repeats is None else torch.as_tensor(repeats, dtype=torch.float64)
        if self.repeats is not None and self.repeats.shape != (n,):
            raise ValueError(f"repeats has shape {tuple(self.repeats.shape)}, expected ({n},)")

    def order(self) -> list[int]:
        # two-element seed sequence: never equal to a per-sample (seed, epoch, index) one
        key = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        g = torch.Generator().manual_seed(key)
        if self.repeats is None:
            return torch.randperm(self.n, generator=g).tolist()
        whole = torch.floor(self.repeats)
        extra = torch.rand(self.n, generator=g, dtype=torch.float64) < self.repeats - whole
        pool = torch.repeat_interleave(torch.arange(self.n), (whole + extra).long())
        return pool[torch.randperm(len(pool), generator=g)][: self.n].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.n - self.start)


def augment_config(cfg: Config) -> AugmentConfig:
    d = cfg.data
    return AugmentConfig(
        crop_size=d.crop_size,
        color_jitter=d.color_jitter,
        scale=(d.scale_min, d.scale_max),
        stain_jitter=d.stain_jitter,
    )


def make_train_loader(
    cfg: Config,
    bundle: DataBundle,
    epoch: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Loader of epoch ``epoch`` starting at batch ``start_batch``.

    With ``world_size > 1`` each rank takes every ``world_size``-th sample of the
    same permutation (a distributed sampler that stays resumable).
    """
    transform = TrainTransform(augment_config(cfg))
    skip = cfg.data.skip_bad if bundle.skip_bad is None else bundle.skip_bad
    kinds = {"skip_bad": skip, "hints": bundle.hints}
    if cfg.train.task == "seg":
        dataset: SeededWeakDataset = SeededMaskDataset(
            bundle.train, transform, cfg.train.seed, epoch, **kinds
        )
        dataset.num_classes = len(bundle.class_names)
    else:
        dataset = SeededWeakDataset(bundle.train, transform, cfg.train.seed, epoch, **kinds)
    bs = cfg.train.batch_size
    repeats = None
    if cfg.data.repeat_threshold is not None:
        labels = np.stack([np.asarray(s.label) for s in bundle.train])
        repeats = repeat_factors(labels, cfg.data.repeat_threshold)
    sampler: Sampler[int] = ResumableSampler(
        len(dataset), cfg.train.seed, epoch, start_batch * bs * world_size, repeats
    )
    if world_size > 1:
        sampler = _RankSlice(sampler, rank, world_size)
    drop_last = len(bundle.train) >= bs * world_size
    # the loader's own generator: creating an iterator must not draw from the global RNG
    # (that would shift dropout/drop-path randomness after a resume)
    generator = torch.Generator().manual_seed(sample_seed(cfg.train.seed, epoch, 0))
    return DataLoader(
        dataset,
        batch_size=bs,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )


class _RankSlice(Sampler[int]):
    def __init__(self, base: ResumableSampler, rank: int, world_size: int) -> None:
        self.base, self.rank, self.world_size = base, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.base), self.world_size))


def collate_eval(items: list[dict | None]) -> dict:
    """Stack same-size images; keep lists when sizes differ; drop skipped (``None``) items."""
    items = [it for it in items if it is not None]
    out: dict = {"name": [it["name"] for it in items]}
    if not items:
        return {**out, "image": [], "mask": [], "label": []}
    shapes = {tuple(it["image"].shape) for it in items}
    for key in ("image", "mask", "label"):
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if len(shapes) == 1 else vals
    return out


def make_eval_loader(
    cfg: Config, bundle: DataBundle, split: str, batch_size: int | None = None
) -> DataLoader:
    """Loader over a split with pixel masks (images at full size).

    The split's samples are those :func:`resolve_data` checked, else they are
    listed and checked now (:func:`check_eval_split`), before any is scored.
    """
    samples = bundle.eval_samples.get(split)
    if samples is None:
        samples = bundle.eval_samples[split] = check_eval_split(bundle, split)
    skip = cfg.data.skip_bad if bundle.skip_bad is None else bundle.skip_bad
    dataset = MaskedDataset(
        samples, len(bundle.class_names), EvalTransform(), skip_bad=skip, hints=bundle.hints
    )
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.train.batch_size,
        shuffle=False,
        num_workers=min(cfg.data.num_workers, 2),
        collate_fn=collate_eval,
        generator=torch.Generator().manual_seed(0),
    )  # keep the global RNG untouched
