"""Typed configuration: one dataclass per concern, YAML presets, dotted overrides.

A run is described by one :class:`Config`. It is built from a preset in
``lpdseg/configs/*.yaml`` (or any YAML file), then ``section.key=value``
overrides from the command line. Unknown keys are rejected with the closest
valid key suggested; values are validated when the dataclasses are built. The
resolved config is saved in every run folder and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from lpdseg.errors import ConfigError


def _check_choice(section: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(
            f"{section}.{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}"
        )


def _check_positive(section: str, key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key}={value!r} must be {bound}")


@dataclass
class DataConfig:
    """Where the data is and how it is augmented."""

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
    crop_size: int = 224  # training crop (px)
    color_jitter: float = 0.1  # strength of colour jitter; 0 disables
    scale_min: float = 1.0  # random-resize range before cropping
    scale_max: float = 1.0
    num_workers: int = 2  # DataLoader workers
    skip_bad: bool = False  # skip (and list) bad files instead of stopping
    label_min_fraction: float = 0.02  # class present in a patch if it covers this fraction
    synthetic_train: int = 600  # patch counts when `lpdseg synth` / the demo writes data
    synthetic_val: int = 60
    synthetic_test: int = 120
    synthetic_size: int = 224

    def __post_init__(self) -> None:
        _check_choice(
            "data", "format", self.format, ("bcss_wsss", "luad_histoseg", "wsss4luad", "csv")
        )
        _check_positive("data", "crop_size", self.crop_size)
        _check_positive("data", "num_workers", self.num_workers, allow_zero=True)
        if not 0 <= self.color_jitter <= 1:
            raise ConfigError(f"data.color_jitter={self.color_jitter} must be in [0, 1]")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError("data.scale_min must be > 0 and <= data.scale_max")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ConfigError(f"data.{key} needs 3 values (RGB), got {value!r}")


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

    def __post_init__(self) -> None:
        _check_choice("model", "head", self.head, ("lpd", "pbip", "cam"))
        _check_choice("model", "merge", self.merge, ("mean", "softmax"))
        _check_choice("model", "last_stride", self.last_stride, (1, 2))
        _check_positive("model", "prototypes_per_class", self.prototypes_per_class)
        if not 0.25 <= self.input_scale <= 4:
            raise ConfigError(f"model.input_scale={self.input_scale} must be in [0.25, 4]")
        if self.head == "pbip" and not self.bank:
            raise ConfigError(
                "model.head=pbip needs model.bank=<bank file>; build one with `lpdseg bank`"
            )


@dataclass
class LossConfig:
    """Loss terms and their weights (METHOD.md, LPD defaults)."""

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
        if len(self.stage_weights) != 4:
            raise ConfigError(f"loss.stage_weights needs 4 values, got {self.stage_weights!r}")
        for key in ("sim_weight", "div_weight", "sim_fg_weight", "sim_bg_weight"):
            _check_positive("loss", key, getattr(self, key), allow_zero=True)
        if not 0.25 <= self.encoder_scale <= 1:
            raise ConfigError(f"loss.encoder_scale={self.encoder_scale} must be in [0.25, 1]")
        for key in ("sim_temperature", "div_temperature"):
            _check_positive("loss", key, getattr(self, key))
        if not 0 <= self.div_warmup < 1:
            raise ConfigError(f"loss.div_warmup={self.div_warmup} must be in [0, 1)")
        if not 0 < self.sim_threshold < 1:
            raise ConfigError(f"loss.sim_threshold={self.sim_threshold} must be in (0, 1)")


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
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    ckpt_every: int | None = None  # also write last.pt every N steps (None: each epoch)
    out_dir: str = "runs/lpd"
    threads: int | None = None  # torch CPU threads (None: torch default)

    def __post_init__(self) -> None:
        _check_choice("train", "task", self.task, ("wsss", "seg"))
        _check_choice("train", "amp", self.amp, ("auto", "bf16", "fp16", "off"))
        for key in ("epochs", "batch_size", "lr", "max_nonfinite"):
            _check_positive("train", key, getattr(self, key))
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"train.warmup_fraction={self.warmup_fraction} must be in [0, 1)")


@dataclass
class EvalConfig:
    """Maps to masks (METHOD.md, "Turning maps into masks")."""

    gating: str = "pseudo"  # pseudo (label-gated) | predict (classifier-gated)
    cls_threshold: float = 0.5  # predict mode: keep a class when its probability exceeds this
    # predict mode: a class's probability is the max over sliding windows of this many input
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
        _check_choice("eval", "gating", self.gating, ("pseudo", "predict"))
        _check_choice("eval", "inference_merge", self.inference_merge, ("mean", "softmax"))
        if len(self.fuse_weights) != 4:
            raise ConfigError(f"eval.fuse_weights needs 4 values, got {self.fuse_weights!r}")
        if not self.tta_scales:
            raise ConfigError("eval.tta_scales needs at least one scale, e.g. [1.0]")
        if self.gate_window is not None:
            _check_positive("eval", "gate_window", self.gate_window)


@dataclass
class Config:
    """A whole run."""

    name: str = "lpd"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what is saved to YAML and checkpoints)."""
        return asdict(self)


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
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
                return "on" if value else "off"
            return str(value)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            (inner,) = get_args(base)
            return [_coerce(section, key, v, inner) for v in value]
    except (TypeError, ValueError):
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


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    return _build(Config, "", values or {})


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
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
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
        node[parts[-1]] = value
    return values


def load_config(preset: str = "demo", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML path, apply dotted overrides, validate.

    Args:
        preset: a preset name (see :func:`preset_names`) or a path to a YAML file.
        overrides: ``section.key=value`` strings, e.g. ``["train.epochs=2"]``.

    Returns:
        The validated config.

    Raises:
        ConfigError: unknown preset, file, key or invalid value.
    """
    values = _read_yaml(preset)
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from lpdseg.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
