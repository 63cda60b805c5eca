"""From a config to data loaders: resolved classes, normalisation and seeded batches.

Training batches are deterministic and resumable: the order of epoch ``e`` is a
permutation seeded by ``(seed, e)``, and the augmentation of sample ``i`` in
epoch ``e`` draws from a generator seeded by ``(seed, e, i)``, whichever
worker loads it. A resumed run skips the batches its epoch already consumed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lpdseg.config import Config
from lpdseg.data.datasets import (
    BadFile,
    MaskedDataset,
    Sample,
    get_format,
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
        bad: files skipped with ``data.skip_bad``.
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

    def has_split(self, split: str) -> bool:
        """Whether an evaluation split (``val``/``test``) exists on disk."""
        names = {"val": ("val", "valid"), "test": ("test",)}[split]
        if self.format == "csv":
            return any((self.root / f"{n}.csv").is_file() for n in names)
        if any((self.root / n / "img").is_dir() for n in names):
            return True
        # list_split's fallback: val images in root/img + root/mask (e.g. WSSS4LUAD's val release)
        return (
            split == "val"
            and not any((self.root / n).is_dir() for n in names)
            and ((self.root / "img").is_dir() and (self.root / "mask").is_dir())
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // batch_size)


def resolve_data(cfg: Config, need_train: bool = True) -> DataBundle:
    """Resolve classes, normalisation and the training list of ``cfg.data``.

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
            "or set data.root to your dataset"
        )
    fmt = get_format(d.format) if d.format != "csv" else None
    train: list[Sample] = []
    bad: list[BadFile] = []
    if need_train and cfg.train.task == "seg":
        if not d.pseudo:
            raise ConfigError(
                "train.task=seg needs data.pseudo=<folder written by `lpdseg pseudo`>"
            )
        train = read_pseudo_manifest(d.pseudo)
    elif need_train:
        train, bad = list_split(root, d.format, "train", skip_bad=d.skip_bad, csv_path=d.csv)
        if bad:
            log.warning(
                "skipped %d bad training files (data.skip_bad=true): %s",
                len(bad),
                "; ".join(f"{b.path}: {b.reason}" for b in bad[:20]),
            )
        if not train:
            raise DataError(f"no usable training images under {root}")
    if d.class_names:
        names = tuple(d.class_names)
    elif fmt is not None:
        names = fmt.class_names
    else:
        raise ConfigError("format=csv needs data.class_names (the label columns)")
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
    return DataBundle(root, d.format, names, mean, std, colors, train, bad, d.csv)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededWeakDataset(Dataset):
    """Training samples with augmentation seeded by ``(seed, epoch, index)``."""

    def __init__(
        self, samples: list[Sample], transform: TrainTransform, seed: int, epoch: int
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self._takes_rng = "rng" in inspect.signature(transform.__call__).parameters

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image)
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

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = read_mask(sample.mask, self.num_classes, expected_hw=image.shape[:2])
        s = sample_seed(self.seed, self.epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            if self._takes_rng:
                tensor, mask_t = self.transform(image, mask, rng=np.random.default_rng(s))
            else:
                tensor, mask_t = self.transform(image, mask)
        return {"image": tensor, "mask": torch.as_tensor(mask_t).long(), "name": sample.image.name}


def read_pseudo_manifest(folder: str | Path) -> list[Sample]:
    """Samples of a pseudo-mask folder (``manifest.csv``: image,mask,labels)."""
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
        for row in csv.DictReader(handle):
            label = np.array([int(v) for v in row["label"].split()], np.uint8)
            samples.append(Sample(Path(row["image"]), label, folder / row["mask"]))
    if not samples:
        raise DataError(f"{manifest} lists no images")
    return samples


class ResumableSampler(Sampler[int]):
    """Permutation of epoch ``epoch`` (seeded), starting after ``start`` samples."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def order(self) -> list[int]:
        # two-element seed sequence: never equal to a per-sample (seed, epoch, index) one
        key = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        g = torch.Generator().manual_seed(key)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.n - self.start)


def augment_config(cfg: Config) -> AugmentConfig:
    d = cfg.data
    return AugmentConfig(
        crop_size=d.crop_size, color_jitter=d.color_jitter, scale=(d.scale_min, d.scale_max)
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
    if cfg.train.task == "seg":
        dataset: SeededWeakDataset = SeededMaskDataset(
            bundle.train, transform, cfg.train.seed, epoch
        )
        dataset.num_classes = len(bundle.class_names)
    else:
        dataset = SeededWeakDataset(bundle.train, transform, cfg.train.seed, epoch)
    bs = cfg.train.batch_size
    sampler: Sampler[int] = ResumableSampler(
        len(dataset), cfg.train.seed, epoch, start_batch * bs * world_size
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


def collate_eval(items: list[dict]) -> dict:
    """Stack same-size images; keep lists when sizes differ."""
    shapes = {tuple(it["image"].shape) for it in items}
    out: dict = {"name": [it["name"] for it in items]}
    for key in ("image", "mask", "label"):
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if len(shapes) == 1 else vals
    return out


def make_eval_loader(
    cfg: Config, bundle: DataBundle, split: str, batch_size: int | None = None
) -> DataLoader:
    """Loader over a split with pixel masks (images at full size)."""
    samples, bad = list_split(
        bundle.root, bundle.format, split, skip_bad=cfg.data.skip_bad, csv_path=bundle.csv
    )
    if bad:
        log.warning(
            "skipped %d bad %s files: %s",
            len(bad),
            split,
            "; ".join(f"{b.path}: {b.reason}" for b in bad[:20]),
        )
    dataset = MaskedDataset(
        samples, len(bundle.class_names), EvalTransform()
    )
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.train.batch_size,
        shuffle=False,
        num_workers=min(cfg.data.num_workers, 2),
        collate_fn=collate_eval,
        generator=torch.Generator().manual_seed(0),
    )  # keep the global RNG untouched
