"""Typed configuration: one dataclass per concern, YAML presets, dotted overrides.

A run is described by one :class:`Config`. It is built from a preset in
``lpdseg/configs/*.yaml`` (or any YAML file), then ``section.key=value``
overrides from the command line. Unknown keys are rejected with the closest
valid key suggested; values are validated when the dataclasses are built:
every option with a fixed set of values lists the valid ones, every number is
checked against its range, and each error names the key and the bad value.
The resolved config is saved in every run folder and every checkpoint.

Settings that only say how much synthetic data ``lpdseg demo`` / ``lpdseg
synth`` write are not part of a run: they are a :class:`SyntheticConfig`, read
from the top-level ``synthetic:`` section of the demo presets by
:func:`load_synthetic_config`, and never saved with a run.

Old keys still load, with a logged deprecation warning (:func:`config_from_dict`
is also how checkpoints' saved configs are rebuilt):

- ``data.synthetic_train|val|test|size`` -> dropped from the run config
  (``synthetic.train|val|test|size`` for the demo);
- ``eval.gating`` -> ``eval.gate``, values ``pseudo`` -> ``labels`` and
  ``predict`` -> ``classifier`` (see :func:`gate_name`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.resources
import importlib.util
import logging
import math
import re
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from lpdseg import catalog
from lpdseg.catalog import LABEL_MIN_FRACTION
from lpdseg.errors import ConfigError

log = logging.getLogger(__name__)

# Class gating of maps -> masks (eval.gate): the image's labels, or the model's classifier.
GATES: tuple[str, ...] = ("labels", "classifier")
# Old eval.gating values -> eval.gate values.
OLD_GATES: dict[str, str] = {"pseudo": "labels", "predict": "classifier"}
# Old data.* keys -> SyntheticConfig fields (demo-only settings, no longer in a run's config).
OLD_SYNTHETIC_KEYS: dict[str, str] = {
    "synthetic_train": "train",
    "synthetic_val": "val",
    "synthetic_test": "test",
    "synthetic_size": "size",
}
CROP_RANGE = (16, 4096)  # data.crop_size, eval.tile, eval.gate_window (px)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _deprecated(old: str, new: str) -> None:
    log.warning("config: %s is deprecated; use %s (read as such this time)", old, new)


# ------------------------------------------------------------------ validation helpers
def _check_choice(section: str, key: str, value: Any, choices: tuple, hint: str = "") -> None:
    """Raise unless ``value`` is one of ``choices``; the message lists them all."""
    if value not in choices:
        close = (
            difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            if isinstance(value, str)
            else []
        )
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{section}.{key}={value!r} is not valid; choose one of: "
            f"{', '.join(map(str, choices))}{suggestion}{hint}"
        )


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def _check_range(
    section: str,
    key: str,
    value: float | None,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> None:
    """Raise unless ``value`` is finite and within the range (``None`` only if allowed)."""
    if value is None and allow_none:
        return
    text = _range_text(lo, hi, lo_open, hi_open)
    if allow_none:
        text += " or null"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{section}.{key}={value!r} must be a number {text}{hint}")
    bad = not math.isfinite(value)
    if lo is not None:
        bad = bad or value < lo or (lo_open and value == lo)
    if hi is not None:
        bad = bad or value > hi or (hi_open and value == hi)
    if bad:
        finite = "" if math.isfinite(value) else " (and finite)"
        raise ConfigError(f"{section}.{key}={value!r} must be {text}{finite}{hint}")


def _check_positive(section: str, key: str, value: float, allow_zero: bool = False) -> None:
    _check_range(section, key, value, 0, lo_open=not allow_zero)


def _check_values(
    section: str,
    key: str,
    values: list | None,
    length: int | None = None,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    positive_sum: bool = False,
) -> None:
    """A list of numbers: its length, every item in range, optionally a sum > 0."""
    if values is None:
        return
    if length is not None and len(values) != length:
        raise ConfigError(f"{section}.{key} needs {length} values, got {values!r}")
    if not values:
        raise ConfigError(f"{section}.{key} needs at least one value, got {values!r}")
    for i, v in enumerate(values):
        _check_range(section, f"{key}[{i}]", v, lo, hi, lo_open=lo_open)
    if positive_sum and not sum(values) > 0:
        raise ConfigError(f"{section}.{key}={values!r} needs a positive sum")


# ------------------------------------------------------------------ registries (no torch)
@functools.cache
def backbone_names() -> tuple[str, ...]:
    """Valid ``model.backbone`` values (the registry in ``lpdseg.catalog``)."""
    return tuple(sorted(catalog.BACKBONES))


def encoder_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Valid ``loss.encoder`` values from ``lpdseg.catalog.ENCODERS``.

    Returns:
        ``(names, prefixes)``: exact names (``backbone-ema``, ...) and prefixes of
        the entries written with a placeholder (``hf:<local folder>`` -> ``hf:``).
    """
    entries = catalog.ENCODERS
    names = tuple(e for e in entries if "<" not in e)
    prefixes = tuple(e.split("<", 1)[0] for e in entries if "<" in e)
    return names, prefixes


def gate_name(value: str, key: str = "eval.gate") -> str:
    """The class gate a value names: ``labels`` or ``classifier``.

    ``labels`` keeps the image's labelled classes; ``classifier`` keeps the
    classes whose probability exceeds ``eval.cls_threshold``. The old names
    ``pseudo`` (-> ``labels``) and ``predict`` (-> ``classifier``) are accepted
    with a logged deprecation warning.

    Args:
        value: a new or old gate name.
        key: how to name the setting in messages (e.g. ``--mode``).

    Returns:
        ``"labels"`` or ``"classifier"``.

    Raises:
        ConfigError: anything else; the message lists the valid values.
    """
    if isinstance(value, str) and value in GATES:
        return value
    if isinstance(value, str) and value in OLD_GATES:
        new = OLD_GATES[value]
        _deprecated(f"{key}={value}", f"{key}={new}")
        return new
    old = ", ".join(f"{o} = {n}" for o, n in OLD_GATES.items())
    close = difflib.get_close_matches(value, GATES, n=1) if isinstance(value, str) else []
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{key}={value!r} is not valid; choose one of: {', '.join(GATES)}{suggestion} "
        f"(old names: {old})"
    )


# ------------------------------------------------------------------ sections
@dataclass
class DataConfig:
    """Where the data is, how it is augmented and how labels are derived from masks."""

    format: str = "bcss_wsss"  # bcss_wsss | luad_histoseg | wsss4luad | csv
    root: str | None = None  # dataset folder (for csv: folder the CSV paths are relative to)
    csv: str | None = None  # manifest for format=csv
    pseudo: str | None = None  # stage 2: folder written by `lpdseg pseudo` (masks + manifest)
    class_names: list[str] | None = None  # None: the format's own names
    colors: list[list[int]] | None = (
        None  # RGB per tissue class (+ background last); None: defaults
    )
    mean: list[float] | None = None  # RGB normalisation; None: backbone pretraining, else format
    std: list[float] | None = None
    crop_size: int = 224  # training crop (px), in [16, 4096]
    color_jitter: float = 0.1  # strength of colour jitter; 0 disables
    stain_jitter: float = 0.0  # strength of the H&E stain jitter (HED space); 0 disables
    # CutMix: the share of training patches that get a box of another patch of the batch
    # pasted in, labels = union (lpdseg.data.mixing); 0 disables
    cutmix: float = 0.0
    # class-balanced sampling: images of a class in fewer than this fraction of the training
    # images are drawn up to sqrt(threshold / fraction) times as often (null: uniform)
    repeat_threshold: float | None = None
    scale_min: float = 1.0  # random-resize range before cropping
    scale_max: float = 1.0
    num_workers: int = 2  # DataLoader workers
    skip_bad: bool = False  # skip (and list) bad files instead of stopping
    # A class is in the image-level label of a patch derived from a mask (`lpdseg patches`,
    # synthetic data) when it covers at least this fraction of the labelled pixels.
    label_min_fraction: float = LABEL_MIN_FRACTION
    # Pixel size of the training images in micrometres per pixel (null: unknown). Recorded in
    # the checkpoint; `lpdseg slide` works at this resolution unless --mpp / --downsample.
    mpp: float | None = None

    def __post_init__(self) -> None:
        _check_choice(
            "data", "format", self.format, ("bcss_wsss", "luad_histoseg", "wsss4luad", "csv")
        )
        _check_range(
            "data",
            "mpp",
            self.mpp,
            0,
            100,
            lo_open=True,
            hi_open=True,
            allow_none=True,
            hint=" (micrometres per pixel of the training images, e.g. 0.25 at 40x, 0.5 at 20x)",
        )
        _check_range("data", "crop_size", self.crop_size, *CROP_RANGE)
        _check_range("data", "num_workers", self.num_workers, 0)
        _check_range("data", "color_jitter", self.color_jitter, 0, 1)
        _check_range("data", "stain_jitter", self.stain_jitter, 0, 1, hi_open=True)
        _check_range("data", "cutmix", self.cutmix, 0, 1)
        _check_range(
            "data", "repeat_threshold", self.repeat_threshold, 0, 1, lo_open=True, allow_none=True
        )
        _check_range("data", "scale_min", self.scale_min, 0, 4, lo_open=True)
        _check_range("data", "scale_max", self.scale_max, 0, 4, lo_open=True)
        if self.scale_min > self.scale_max:
            raise ConfigError(
                f"data.scale_min={self.scale_min} must be <= data.scale_max={self.scale_max}"
            )
        _check_range("data", "label_min_fraction", self.label_min_fraction, 0, 1, hi_open=True)
        _check_values("data", "mean", self.mean, 3, 0, 1)
        _check_values("data", "std", self.std, 3, 0, 1, lo_open=True)
        if self.class_names is not None:
            if not self.class_names or len(set(self.class_names)) != len(self.class_names):
                raise ConfigError(
                    f"data.class_names={self.class_names!r} needs distinct names, at least one"
                )
        for i, rgb in enumerate(self.colors or []):
            if len(rgb) != 3 or any(not 0 <= v <= 255 for v in rgb):
                raise ConfigError(f"data.colors[{i}]={rgb!r} must be 3 RGB values in [0, 255]")


@dataclass
class ModelConfig:
    """Backbone and head."""

    backbone: str = "mit_b1"  # see lpdseg.models.backbones.BACKBONES
    weights: str | None = None  # None: random init; a local file; "imagenet" for efficientnet_lite0
    last_stride: int = 1  # stride of the last stage (1 keeps stage 4 at 1/16)
    # Images are resized by this factor inside the model, before the backbone (training,
    # validation and inference alike); maps come back at input size. > 1 gives an
    # ImageNet backbone objects nearer the sizes it was pretrained on and finer maps.
    input_scale: float = 1.0
    head: str = "lpd"  # lpd (learnable prototypes) | pbip (fixed bank) | cam (1x1 conv)
    prototypes_per_class: int = 10
    embed_dim: int | None = None  # prototype space D; None: the frozen encoder's size
    proj_hidden: int = 256  # hidden width of the per-stage projection MLPs
    scale_init: float = 1 / 0.07  # initial value of the learnable cosine scale s
    merge: str = "softmax"  # how sub-prototype scores form class logits: mean | softmax
    logit_bias: bool = False  # learnable per-stage, per-class bias on prototype-head logits
    bank: str | None = None  # prototype bank file (head=pbip)
    drop_path: float = 0.1
    # class logits pool over tissue only: the glass rule (eval.glass_brightness/spread)
    # weights out white glass in the GAP of every head, in training and inference alike
    tissue_pooling: bool = False

    def __post_init__(self) -> None:
        _check_choice("model", "backbone", self.backbone, backbone_names())
        _check_choice("model", "head", self.head, ("lpd", "pbip", "cam"))
        _check_choice("model", "merge", self.merge, ("mean", "softmax"))
        _check_choice("model", "last_stride", self.last_stride, (1, 2))
        if isinstance(self.weights, str) and self.weights.lower() == "imagenet":
            packaged = sorted(catalog.PACKAGED_IMAGENET)
            if self.backbone not in packaged:
                raise ConfigError(
                    f"model.weights=imagenet is only available for model.backbone "
                    f"{' or '.join(packaged)}, not {self.backbone}; give a local weights file "
                    "or null (random init)"
                )
        _check_range("model", "prototypes_per_class", self.prototypes_per_class, 1)
        _check_range("model", "input_scale", self.input_scale, 0.25, 4)
        _check_range("model", "embed_dim", self.embed_dim, 1, allow_none=True)
        _check_range("model", "proj_hidden", self.proj_hidden, 1)
        _check_range("model", "scale_init", self.scale_init, 0, lo_open=True)
        _check_range("model", "drop_path", self.drop_path, 0, 1, hi_open=True)
        if self.head == "pbip" and not self.bank:
            raise ConfigError(
                "model.head=pbip needs model.bank=<bank file>; build one with `lpdseg bank`"
            )


@dataclass
class LossConfig:
    """Loss terms and their weights (docs/method.md, LPD defaults)."""

    stage_weights: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0, 1.0])
    sim_mode: str = "feature"  # feature (one encoder pass) | image (faithful) | off
    sim_weight: float = 0.1  # lambda_sim
    sim_temperature: float = 0.07  # T
    sim_threshold: float = 0.5  # delta: foreground where A_hat >= delta * max
    sim_fg_weight: float = 1.0  # theta_fg
    sim_bg_weight: float = 1.0  # theta_bg
    sim_activation_reg: float = 5e-4  # weight of mean(A_4)
    encoder: str = "backbone-ema"  # frozen encoder: backbone-ema | efficientnet-lite0 | hf:<folder>
    encoder_ema_decay: float = 0.99
    # feature mode: images are resized by this factor for the frozen encoder's pass only
    # (0.5 costs about a quarter of a full-size pass; the pooled masks follow its map size)
    encoder_scale: float = 1.0
    allow_random_encoder: bool = False  # permit a randomly initialised frozen encoder
    div_weight: float = 0.5  # lambda_div
    div_temperature: float = 1.0  # T_div
    div_warmup: float = 0.3  # fraction of iterations over which lambda_div ramps from 0

    def __post_init__(self) -> None:
        _check_choice("loss", "sim_mode", self.sim_mode, ("feature", "image", "off"))
        names, prefixes = encoder_names()
        if not any(self.encoder.startswith(p) and len(self.encoder) > len(p) for p in prefixes):
            _check_choice(
                "loss",
                "encoder",
                self.encoder,
                names,
                hint="".join(f", or {p}<local folder>" for p in prefixes),
            )
        _check_values("loss", "stage_weights", self.stage_weights, 4, 0, positive_sum=True)
        for key in (
            "sim_weight",
            "div_weight",
            "sim_fg_weight",
            "sim_bg_weight",
            "sim_activation_reg",
        ):
            _check_range("loss", key, getattr(self, key), 0)
        for key in ("sim_temperature", "div_temperature"):
            _check_range("loss", key, getattr(self, key), 0, lo_open=True)
        _check_range("loss", "encoder_ema_decay", self.encoder_ema_decay, 0, 1, hi_open=True)
        _check_range("loss", "encoder_scale", self.encoder_scale, 0.25, 1)
        _check_range("loss", "div_warmup", self.div_warmup, 0, 1, hi_open=True)
        _check_range("loss", "sim_threshold", self.sim_threshold, 0, 1, lo_open=True, hi_open=True)


@dataclass
class TrainConfig:
    """Optimisation and run control."""

    task: str = "wsss"  # wsss (image-level labels) | seg (stage 2, pixel masks)
    epochs: int = 8
    max_steps: int | None = None  # stop after this many steps (None: epochs x batches)
    batch_size: int = 10
    lr: float = 5e-5
    head_lr_mult: float = 10.0  # prototypes and heads learn this much faster
    weight_decay: float = 1e-3
    warmup_fraction: float = 0.05  # linear warm-up, then poly decay
    poly_power: float = 1.0
    grad_clip: float = 1.0  # max grad norm; 0 disables
    amp: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | off
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    val_every: int = 1  # validate every N epochs
    val_limit: int | None = None  # validate on at most this many images
    # early stopping: end the run after this many validations in a row without a better
    # val mIoU (null: train all steps). best.pt is the best validated state either way.
    patience: int | None = None
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    ckpt_every: int | None = None  # also write last.pt every N steps (None: each epoch)
    out_dir: str = "runs/lpd"
    threads: int | None = None  # torch CPU threads (None: torch default)

    def __post_init__(self) -> None:
        _check_choice("train", "task", self.task, ("wsss", "seg"))
        _check_choice("train", "amp", self.amp, ("auto", "bf16", "fp16", "off"))
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"train.device={self.device!r} is not valid; choose one of: auto, cpu, cuda, "
                "cuda:N (N = GPU index)"
            )
        for key in ("epochs", "batch_size", "max_nonfinite", "val_every"):
            _check_range("train", key, getattr(self, key), 1)
        _check_range(
            "train",
            "max_steps",
            self.max_steps,
            1,
            allow_none=True,
            hint="; use null for the full epochs",
        )
        for key in ("val_limit", "ckpt_every", "threads", "patience"):
            _check_range("train", key, getattr(self, key), 1, allow_none=True)
        _check_range("train", "lr", self.lr, 0, lo_open=True)
        _check_range("train", "head_lr_mult", self.head_lr_mult, 0, lo_open=True)
        for key in ("weight_decay", "poly_power", "grad_clip"):
            _check_range("train", key, getattr(self, key), 0)
        _check_range("train", "warmup_fraction", self.warmup_fraction, 0, 1, hi_open=True)
        _check_range("train", "seed", self.seed, 0)
        if not self.out_dir:
            raise ConfigError("train.out_dir must name a folder, e.g. runs/lpd")


@dataclass
class EvalConfig:
    """Maps to masks (docs/method.md, "Turning maps into masks")."""

    # which classes may appear in a mask: labels (the image's labelled classes) |
    # classifier (classes whose probability exceeds cls_threshold)
    gate: str = "labels"
    cls_threshold: float = 0.5  # classifier gate: keep a class when its probability exceeds this
    # classifier gate, per class (overrides cls_threshold when set): chosen on the validation
    # split at the end of training when calibrate_gate is on, and stored in best.pt. Off by
    # default: on the demo's 40 val images it moved CAM's test mIoU by -0.75 (docs/results.md)
    cls_thresholds: list[float] | None = None
    calibrate_gate: bool = False
    # classifier gate: a class's probability is the max over sliding windows of this many input
    # px (e.g. the training crop) of the window's pooled logit, instead of the whole
    # image's; null: the whole image (the training definition)
    gate_window: int | None = None
    tta_scales: list[float] = field(default_factory=lambda: [0.9, 1.0, 1.1])
    tta_flip: bool = True
    fuse_weights: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.3, 0.4])
    bg_gamma: float = 10.0  # background channel (1 - max_c M_c)^gamma
    inference_merge: str = "mean"  # class map from sub-prototype maps: mean | softmax
    max_side: int = 1024  # larger images are processed by sliding window
    tile: int = 224
    overlap: float = 0.25
    boundary_ratio: float = 0.02  # boundary IoU band: this fraction of the diagonal
    # White glass -> background: pixels brighter than glass_brightness (mean RGB in [0, 1])
    # whose channels differ by less than glass_spread are labelled background whatever
    # the maps say (the background channel alone does not find glass; off by default)
    glass_background: bool = False
    glass_brightness: float = 0.78
    glass_spread: float = 0.12

    def __post_init__(self) -> None:
        self.gate = gate_name(self.gate, "eval.gate")
        _check_choice("eval", "inference_merge", self.inference_merge, ("mean", "softmax"))
        _check_range("eval", "cls_threshold", self.cls_threshold, 0, 1)
        if self.cls_thresholds is not None:
            _check_values("eval", "cls_thresholds", self.cls_thresholds, None, 0, 1)
        _check_range("eval", "gate_window", self.gate_window, *CROP_RANGE, allow_none=True)
        if not self.tta_scales:
            raise ConfigError("eval.tta_scales needs at least one scale, e.g. [1.0]")
        _check_values("eval", "tta_scales", self.tta_scales, None, 0.25, 4)
        _check_values("eval", "fuse_weights", self.fuse_weights, 4, 0, positive_sum=True)
        _check_range("eval", "bg_gamma", self.bg_gamma, 0, lo_open=True)
        _check_range("eval", "tile", self.tile, *CROP_RANGE)
        _check_range("eval", "max_side", self.max_side, CROP_RANGE[0])
        _check_range("eval", "overlap", self.overlap, 0, 1, hi_open=True)
        _check_range("eval", "boundary_ratio", self.boundary_ratio, 0, 0.5, lo_open=True)
        _check_range("eval", "glass_brightness", self.glass_brightness, 0, 1)
        _check_range("eval", "glass_spread", self.glass_spread, 0, 1)


@dataclass
class Config:
    """A whole run."""

    name: str = "lpd"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name={self.name!r} must be a non-empty run name")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what is saved to YAML and checkpoints)."""
        return asdict(self)


@dataclass
class SyntheticConfig:
    """How much synthetic data ``lpdseg demo`` (and ``lpdseg synth --preset``) writes.

    Not part of a run's :class:`Config`: the demo presets keep it in a top-level
    ``synthetic:`` section, read by :func:`load_synthetic_config`. The label rule
    of the patches is the run config's ``data.label_min_fraction``.
    """

    train: int = 600  # training patches (image-level labels in the file names)
    val: int = 60  # validation patches with masks
    test: int = 120  # test patches with masks
    size: int = 224  # patch side (px)

    def __post_init__(self) -> None:
        for key in ("train", "val", "test"):
            _check_range("synthetic", key, getattr(self, key), 0)
        _check_range("synthetic", "size", self.size, 32, 4096)


# ------------------------------------------------------------------ building
def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError."""
    is_union = get_origin(hint) in (Union, types.UnionType)
    args = get_args(hint) if is_union else ()
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{section}.{key} cannot be null")
    base = next(a for a in args if a is not type(None)) if is_union else hint
    origin = get_origin(base)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # true/false is not a number
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
                return "on" if value else "off"
            if isinstance(value, (dict, list, tuple)):
                raise ValueError(value)
            return str(value)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            (inner,) = get_args(base)
            return [_coerce(section, key, v, inner) for v in value]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"{section}.{key}={value!r} has the wrong type; expected {getattr(base, '__name__', base)}"
        ) from None
    return value


def _unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown config key {where}{key!r}.{hint} Valid keys: {', '.join(sorted(valid))}"
    )


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(f"{section}." if section else "", key, names)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
            kwargs[key] = _build(hint, key, value)
        else:
            kwargs[key] = _coerce(section, key, value, hint)
    return cls(**kwargs)


def _section(values: dict[str, Any], name: str) -> dict[str, Any] | None:
    node = values.get(name)
    if node is not None and not isinstance(node, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {node!r}")
    return node


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    """Old keys -> current ones, each with a logged deprecation warning (input untouched).

    - the top-level ``synthetic`` section (demo presets) is validated and set aside;
    - ``data.synthetic_*`` are dropped (demo-only settings, now ``synthetic.*``);
    - ``eval.gating`` becomes ``eval.gate``, ``pseudo`` -> ``labels`` and
      ``predict`` -> ``classifier``; when both keys are given, the later one wins.
    """
    values = dict(values)
    synthetic = _section(values, "synthetic")
    values.pop("synthetic", None)
    if synthetic is not None:
        _build(SyntheticConfig, "synthetic", synthetic)  # typos fail here too
    data = _section(values, "data")
    if data is not None and any(k in data for k in OLD_SYNTHETIC_KEYS):
        data = dict(data)
        dropped = [k for k in OLD_SYNTHETIC_KEYS if k in data]
        for key in dropped:
            data.pop(key, None)
        log.warning(
            "config: %s deprecated and no longer part of a run's config: dropped (the demo "
            "reads %s from the synthetic: section of its preset)",
            ", ".join(f"data.{k}" for k in dropped) + (" is" if len(dropped) == 1 else " are"),
            ", ".join(f"synthetic.{OLD_SYNTHETIC_KEYS[k]}" for k in dropped),
        )
        values["data"] = data
    ev = _section(values, "eval")
    if ev is not None and "gating" in ev:
        order = list(ev)
        ev = dict(ev)
        old = ev.pop("gating")
        if "gate" in ev and order.index("gate") > order.index("gating"):
            log.warning(
                "config: eval.gating is deprecated and ignored here: eval.gate, given after it, wins"
            )
        else:
            ev["gate"] = _old_gate(old)
        values["eval"] = ev
    return values


def _old_gate(value: Any) -> Any:
    """Value of the deprecated ``eval.gating`` key -> ``eval.gate`` value (warned once)."""
    new = OLD_GATES.get(value, value) if isinstance(value, str) else value
    _deprecated(f"eval.gating={value}", f"eval.gate={new}")
    return new


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict.

    Also how checkpoints' saved configs are rebuilt: deprecated keys are
    accepted with a logged warning (see the module docstring).
    """
    return _build(Config, "", _migrate(values or {}))


def synthetic_from_dict(values: dict[str, Any]) -> SyntheticConfig:
    """The :class:`SyntheticConfig` of a preset's nested dict (its ``synthetic`` section).

    Old ``data.synthetic_*`` keys are read too (with a deprecation warning) and
    win over the section, as they can only come from the user's own files or
    overrides.
    """
    section = dict(_section(values or {}, "synthetic") or {})
    data = _section(values or {}, "data") or {}
    for old, new in OLD_SYNTHETIC_KEYS.items():
        if old in data:
            _deprecated(f"data.{old}", f"synthetic.{new}")
            section[new] = data[old]
    return _build(SyntheticConfig, "synthetic", section)


def preset_names() -> list[str]:
    """Names of the presets shipped in ``lpdseg/configs``."""
    root = importlib.resources.files("lpdseg") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path_or_preset: str) -> dict[str, Any]:
    path = Path(path_or_preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        source = str(path)
    else:
        resource = importlib.resources.files("lpdseg") / "configs" / f"{path_or_preset}.yaml"
        if not resource.is_file():
            raise ConfigError(
                f"unknown preset {path_or_preset!r}; presets: {', '.join(preset_names())}, "
                "or give a path to a .yaml file"
            )
        text = resource.read_text()
        source = f"preset {path_or_preset}"
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must hold a mapping of config sections")
    base = values.pop("base", None)
    if base:  # presets may extend another preset
        merged = _read_yaml(base)
        _deep_update(merged, values)
        return merged
    return values


def _deep_update(target: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict.

    ``eval.gating=...`` (deprecated) is written as ``eval.gate``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        if parts == ["eval", "gating"]:
            parts, value = ["eval", "gate"], _old_gate(value)
        if parts == ["eval", "gate"]:
            node.pop("gating", None)  # an override beats the old key of the file
        node[parts[-1]] = value
    return values


def load_config(preset: str = "demo", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML path, apply dotted overrides, validate.

    Args:
        preset: a preset name (see :func:`preset_names`) or a path to a YAML file.
        overrides: ``section.key=value`` strings, e.g. ``["train.epochs=2"]``.

    Returns:
        The validated config (a preset's ``synthetic:`` section is validated
        but not part of it: see :func:`load_synthetic_config`).

    Raises:
        ConfigError: unknown preset, file, key or invalid value.
    """
    values = _read_yaml(preset)
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def load_synthetic_config(
    preset: str = "demo", overrides: list[str] | None = None
) -> SyntheticConfig:
    """The synthetic-data settings of a preset (its ``synthetic:`` section) + overrides.

    Args:
        preset: a preset name or YAML path (e.g. ``demo``).
        overrides: dotted overrides; only ``synthetic.*`` (and the deprecated
            ``data.synthetic_*``) matter here.

    Raises:
        ConfigError: unknown preset, file, key or invalid value.
    """
    values = _read_yaml(preset)
    apply_overrides(values, list(overrides or []))
    return synthetic_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from lpdseg.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
