"""Building PBIP's prototype bank: K-Means clusters of frozen-encoder embeddings.

docs/method.md, "PBIP baseline": take the training patches whose label has exactly
one class, drop mostly-white ones, embed them with a frozen encoder, run
K-Means per class on the L2-normalised embeddings, keep the ``n_keep`` patches
nearest each centre, and average their embeddings into one prototype per
cluster. The bank file records the prototypes, the member files of every
cluster, the encoder and every setting, so training and explanations can show
where each prototype came from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lpdseg.data.datasets import API_HINTS, CONFIG_HINTS, FixHints, Sample, read_image
from lpdseg.data.glass import DEFAULT_BRIGHTNESS, DEFAULT_SPREAD, glass_mask_np
from lpdseg.errors import DataError
from lpdseg.models.bank import PrototypeBank, save_bank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WhiteRule:
    """A patch is dropped when more than ``max_fraction`` of its pixels are white glass.

    Glass is the white-glass rule of :mod:`lpdseg.data.glass` (mean RGB above
    ``brightness``, channel spread below ``spread``, both in [0, 1]): the rule
    evaluation and slide tissue detection use, so the three agree on a pixel.
    """

    brightness: float = DEFAULT_BRIGHTNESS
    spread: float = DEFAULT_SPREAD
    max_fraction: float = 0.5

    def white_fraction(self, image: np.ndarray) -> float:
        """Fraction of the glass pixels of an ``H x W x 3`` uint8 RGB image."""
        return float(glass_mask_np(image, self.brightness, self.spread).mean())

    def is_white(self, image: np.ndarray) -> bool:
        return self.white_fraction(image) > self.max_fraction


@torch.no_grad()
def embed_samples(
    samples: Sequence[Sample], encoder, transform, batch_size: int = 16, progress: bool = True
) -> torch.Tensor:
    """L2-normalised global embeddings (N x D) of the given patches."""
    out = []
    for start in tqdm(
        range(0, len(samples), batch_size), desc="embed", disable=not progress, unit="batch"
    ):
        batch = torch.stack(
            [transform(read_image(s.image)) for s in samples[start : start + batch_size]]
        )
        out.append(torch.nn.functional.normalize(encoder.embed(batch).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim)


def build_bank(
    samples: Sequence[Sample],
    class_names: Sequence[str],
    encoder,
    transform,
    *,
    encoder_name: str,
    clusters: int = 3,
    n_keep: int = 100,
    seed: int = 0,
    allow_fewer: bool = False,
    white_rule: WhiteRule = WhiteRule(),
    batch_size: int = 16,
    progress: bool = True,
    skip_bad: bool = False,
    hints: FixHints = API_HINTS,
) -> PrototypeBank:
    """Build the bank from weakly labelled training samples.

    Args:
        samples: training samples with image-level labels.
        class_names: tissue classes (C).
        encoder: frozen encoder with ``embed`` (see ``models.encoders``).
        transform: image (uint8 HxWx3) -> normalised tensor for the encoder.
        encoder_name: recorded in the bank.
        clusters: K clusters per class.
        n_keep: patches kept nearest each centre (N_K).
        seed: K-Means seed (the bank is deterministic for a seed).
        allow_fewer: use what there is when a class has fewer than K x N_K patches.
        white_rule: which patches count as mostly white.
        skip_bad: leave out (and log) a patch that fails to decode instead of raising.
        hints: how the caller's user skips bad files (said in the error).

    Raises:
        DataError: a class has fewer eligible patches than ``clusters * n_keep``
            (unless ``allow_fewer``), or fewer than ``clusters``; an unreadable
            patch without ``skip_bad`` (named, with how to skip it).
    """
    from sklearn.cluster import KMeans

    c = len(class_names)
    per_class: list[list[Sample]] = [[] for _ in range(c)]
    dropped_white = 0
    unreadable: list[Path] = []
    for s in tqdm(samples, desc="select", disable=not progress, unit="img"):
        if s.label is None or int(np.sum(s.label)) != 1:
            continue
        try:
            image = read_image(s.image)
        except DataError as exc:
            if not skip_bad:
                raise hints.with_skip_advice(exc) from exc
            log.warning("skipping %s: %s", s.image, exc)
            unreadable.append(s.image)
            continue
        if white_rule.is_white(image):
            dropped_white += 1
            continue
        per_class[int(np.argmax(s.label))].append(s)
    if unreadable:
        log.warning(
            "%d unreadable patches skipped: %s", len(unreadable), ", ".join(map(str, unreadable))
        )
    counts = [len(p) for p in per_class]
    need = clusters * n_keep
    short = [f"{class_names[i]}: {n}" for i, n in enumerate(counts) if n < need]
    if short and not allow_fewer:
        raise DataError(
            f"prototype bank needs {need} single-label, non-white patches per class "
            f"(clusters={clusters} x n_keep={n_keep}) but found {', '.join(short)}; "
            "lower --n-keep / --clusters (n_keep=, clusters=) or pass --allow-fewer "
            "(allow_fewer=True) to use what there is"
        )
    protos, members = [], []
    for ci, group in enumerate(per_class):
        if len(group) < clusters:
            raise DataError(
                f"class {class_names[ci]} has {len(group)} eligible patches, fewer "
                f"than clusters={clusters}; add single-label patches of this class"
            )
        emb = embed_samples(group, encoder, transform, batch_size, progress).numpy()
        km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(emb)
        class_protos, class_members = [], []
        for k in range(clusters):
            dist = np.linalg.norm(emb - km.cluster_centers_[k], axis=1)
            in_cluster = np.flatnonzero(km.labels_ == k)
            keep = in_cluster[np.argsort(dist[in_cluster], kind="stable")][:n_keep]
            if len(keep) == 0:  # empty cluster: nearest patches overall
                keep = np.argsort(dist, kind="stable")[:n_keep]
            mean = emb[keep].mean(0)
            class_protos.append(mean / max(np.linalg.norm(mean), 1e-12))
            class_members.append([group[i].image.name for i in keep])
        protos.append(np.stack(class_protos))
        members.append(class_members)
    settings = {
        "clusters": clusters,
        "n_keep": n_keep,
        "seed": seed,
        "allow_fewer": allow_fewer,
        "white_rule": asdict(white_rule),
        "eligible_per_class": counts,
        "dropped_white": dropped_white,
    }
    if unreadable:
        settings["skipped_unreadable"] = [str(p) for p in unreadable]
    return PrototypeBank(
        torch.from_numpy(np.stack(protos)).float(),
        members,
        list(class_names),
        encoder_name,
        settings,
    )


def contact_sheet(
    bank: PrototypeBank,
    image_dir: str | Path,
    path: str | Path,
    per_cluster: int = 8,
    thumb: int = 48,
) -> None:
    """PNG: one row per (class, cluster) with the first member patches."""
    from PIL import Image

    from lpdseg.viz import save_png, text_strip

    rows = []
    image_dir = Path(image_dir)
    for ci, name in enumerate(bank.class_names):
        for k, files in enumerate(bank.members[ci]):
            tiles = [text_strip(f"{name} #{k}", 90, thumb)]
            for f in files[:per_cluster]:
                img = Image.fromarray(read_image(image_dir / f)).resize((thumb, thumb))
                tiles.append(np.asarray(img))
            while len(tiles) < per_cluster + 1:
                tiles.append(np.full((thumb, thumb, 3), 255, np.uint8))
            rows.append(np.concatenate(tiles, axis=1))
    save_png(path, np.concatenate(rows, axis=0))


def build_bank_from_config(
    preset: str,
    overrides: list[str],
    out: str | Path,
    *,
    clusters: int = 3,
    n_keep: int = 100,
    seed: int = 0,
    allow_fewer: bool = False,
    sheet: bool = True,
    progress: bool = True,
    skip_bad: bool | None = None,
    hints: FixHints = CONFIG_HINTS,
) -> Path:
    """Build and save a bank for the data and encoder a config names (``lpdseg bank``).

    The config's ``model.head`` may be ``pbip`` with a bank that does not exist yet:
    the bank is what this writes. Every training patch's header is checked first
    (:func:`lpdseg.data.loaders.resolve_data`); bad patches stop it, naming the
    file, or with ``skip_bad`` (default: ``data.skip_bad``) are skipped and listed.
    """
    from lpdseg.config import _read_yaml, apply_overrides, config_from_dict
    from lpdseg.data.loaders import resolve_data
    from lpdseg.data.transforms import EvalTransform
    from lpdseg.errors import ConfigError
    from lpdseg.models.encoders import build_encoder

    values = apply_overrides(_read_yaml(preset), overrides)
    values.setdefault("model", {})["head"] = "lpd"  # the bank does not exist yet
    values["model"].pop("bank", None)
    cfg = config_from_dict(values)
    if cfg.loss.encoder == "backbone-ema":
        raise ConfigError(
            "a prototype bank needs a pretrained frozen encoder, not backbone-ema; "
            "set loss.encoder=efficientnet-lite0 or hf:<folder>"
        )
    skip = cfg.data.skip_bad if skip_bad is None else skip_bad
    bundle = resolve_data(cfg, eval_splits=(), skip_bad=skip, hints=hints)
    encoder = build_encoder(
        cfg.loss.encoder,
        backbone=None,
        model_mean=bundle.mean,
        model_std=bundle.std,
        allow_random=cfg.loss.allow_random_encoder,
    )
    bank = build_bank(
        bundle.train,
        bundle.class_names,
        encoder,
        EvalTransform(),
        encoder_name=cfg.loss.encoder,
        clusters=clusters,
        n_keep=n_keep,
        seed=seed,
        allow_fewer=allow_fewer,
        progress=progress,
        skip_bad=skip,
        hints=hints,
    )
    out = Path(out)
    save_bank(bank, out)
    if sheet:
        contact_sheet(bank, bundle.root / _train_folder(bundle.root), out.with_suffix(".png"))
    return out


def _train_folder(root: Path) -> str:
    return "training" if (root / "training").is_dir() else "train"


def cluster_purity(bank: PrototypeBank, truth: dict[str, int]) -> float:
    """Fraction of bank members whose cluster's majority ground-truth group is theirs.

    Args:
        bank: a built bank.
        truth: file name -> known group (e.g. the synthetic generator's sub-type).
    """
    agree = total = 0
    for class_members in bank.members:
        for files in class_members:
            groups = [truth[f] for f in files if f in truth]
            if groups:
                agree += max(groups.count(g) for g in set(groups))
                total += len(groups)
    return agree / total if total else float("nan")
