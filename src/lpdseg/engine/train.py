"""Training loop: AdamW, warm-up + poly, AMP, clipping, validation, atomic resume.

One function, :func:`train`, runs a whole stage-1 (weakly supervised) training
described by a :class:`~lpdseg.config.Config`. The run folder receives the
resolved config, ``metrics.jsonl``, ``last.pt``, ``best.pt`` (by validation
mIoU), a loss/mIoU curve and, when a test split exists, the test metrics of
``best.pt``.

Determinism: batches come from a per-epoch permutation seeded by
``(seed, epoch)`` and every sample's augmentation from ``(seed, epoch, index)``,
so a resumed run (which skips the batches already consumed in its epoch and
restores model, optimiser, scheduler, scaler, EMA encoder and RNG states)
continues exactly where it stopped.

Safety of a run folder (docs/reliability.md):

- a folder that holds a run (``summary.json``, ``best.pt`` or ``last.pt``) is
  never trained into again silently: :func:`train` refuses unless it resumes
  that run (``resume=<folder>/last.pt``) or is told to ``overwrite`` it (the
  old run's files are deleted first, so none is left mixed with the new run's);
- SIGINT / SIGTERM stop at the next step boundary: ``last.pt`` is saved at that
  step and :class:`TrainingInterrupted` says how to resume (the CLI exits
  130 / 143); a second signal stops at once (writes are atomic);
- a resumed run drops the ``metrics.jsonl`` records after the checkpoint's step
  before appending, and refuses a config that differs from the checkpoint's in
  a key that changes what is trained (only :data:`RESUME_MAY_CHANGE` may);
- stage 2 refuses pseudo masks made from another dataset (``pseudo.json``
  records its data root and classes; the manifest's images must lie under
  ``data.root``) unless ``allow_other_pseudo``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lpdseg.config import Config, config_from_dict, save_config
from lpdseg.data.loaders import DataBundle, make_eval_loader, make_train_loader, resolve_data
from lpdseg.data.mixing import apply_cutmix, cutmix_boxes, cutmix_generator
from lpdseg.engine.calibration import choose_thresholds, collect_outputs
from lpdseg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lpdseg.engine.distributed import (
    DistContext,
    all_gather_objects,
    all_ranks_true,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    resolve_device,
    training_device,
    wrap_model,
)
from lpdseg.engine.evaluate import evaluate, score_split
from lpdseg.errors import ConfigError, DataError, TrainingError
from lpdseg.heap import keep_freed_memory
from lpdseg.io import append_jsonl, atomic_write_json, atomic_write_text
from lpdseg.losses import classification_loss, diversity_loss, diversity_ramp, similarity_loss
from lpdseg.models.encoders import build_encoder
from lpdseg.models.frozen_encoder import FrozenEncoder
from lpdseg.models.lpd import WSSSModel, build_model, needed_stages
from lpdseg.models.preprocess import choose_statistics, rescale
from lpdseg.models.prototypes import PrototypeHead
from lpdseg.models.segnet import build_segnet

log = logging.getLogger(__name__)

#: Config keys a resumed run may change: how long it trains, how often it validates and
#: saves, where and with how many threads/workers it runs, how it is evaluated, the
#: training images' pixel size (metadata for ``slide``) and the pretrained-weights file
#: (the checkpoint supplies every weight). Any other difference
#: from the checkpoint's config (architecture, batch size, data, loss, optimiser, seed,
#: precision...) is refused, naming the key and both values. ``train.out_dir`` must be
#: the checkpoint's own folder.
RESUME_MAY_CHANGE = (
    "name",
    "train.max_steps",
    "train.epochs",
    "train.val_every",
    "train.val_limit",
    "train.patience",
    "train.ckpt_every",
    "train.max_nonfinite",
    "train.threads",
    "train.device",
    "train.out_dir",
    "train.num_workers",
    "data.num_workers",
    "data.mpp",
    "data.allow_other_pseudo",
    "model.weights",
    "eval.*",
)
#: Any of these in ``train.out_dir`` means the folder holds a run (refused without
#: ``resume`` / ``overwrite``).
RUN_MARKERS = ("summary.json", "best.pt", "last.pt")
#: What ``lpdseg train`` (and ``eval`` / ``report`` by default) write in a run folder:
#: removed by ``overwrite`` before the new run starts.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "summary.json",
    "curves.png",
    "report.html",
)
RUN_GLOBS = ("*_metrics.json", "*_metrics.md", ".*.tmp")


class RunExistsError(ConfigError):
    """``train.out_dir`` already holds a run and neither resume nor overwrite was asked."""


class TrainingInterrupted(TrainingError):
    """SIGINT / SIGTERM stopped training at a step boundary.

    Attributes:
        signum: the signal; ``exit_code`` is ``128 + signum`` (130 / 143).
        step: the step training stopped at.
        checkpoint: the checkpoint to resume from (``last.pt``), or ``None``.
        saved: whether ``checkpoint`` was written at ``step`` (not when the
            run was inside a streak of non-finite losses: then it is the last
            good one).
        command: the command that resumes (the CLI fills in the exact one).
    """

    def __init__(
        self, signum: int, step: int, checkpoint: str | None, saved: bool, saved_step: int
    ) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        self.step = step
        self.checkpoint = checkpoint
        self.saved = saved
        self.saved_step = saved_step
        self.command: str | None = None
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.checkpoint is None:
            return (
                f"interrupted at step {self.step}; no checkpoint was written yet (non-finite "
                "losses since the start), so the run starts again from step 0"
            )
        command = self.command or f"lpdseg train ... --resume {self.checkpoint}"
        if self.saved:
            return f"interrupted at step {self.step}; resume with: {command}"
        return (
            f"interrupted at step {self.step} inside a streak of non-finite losses; "
            f"{self.checkpoint} holds the last good step ({self.saved_step}); resume with: "
            f"{command}"
        )


class StopSignals:
    """SIGINT / SIGTERM -> a request to stop at the next step boundary.

    Installed only in the main thread (elsewhere signals cannot be caught). A
    second signal stops at once: ``KeyboardInterrupt`` for SIGINT,
    ``SystemExit(143)`` for SIGTERM (checkpoint writes are atomic, so the
    previous ``last.pt`` stays whole).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def restore(self) -> None:
        for sig, old in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        log.warning(
            "%s received: saving last.pt at the end of this step, then stopping "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` on this device (fp16 only on CUDA)."""
    if cfg.train.amp == "off" or (cfg.train.amp == "auto" and device.type != "cuda"):
        # auto: fp32 on CPU, where bf16 matmuls measured slower (benchmarks/), bf16 on GPU
        return None
    if cfg.train.amp == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.bfloat16


def lr_factor(step: int, total: int, warmup_fraction: float, power: float) -> float:
    """Linear warm-up to 1, then poly decay ``(1 - progress)^power`` to 0."""
    warmup = int(round(warmup_fraction * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) ** power


def param_groups(model: WSSSModel, cfg: Config) -> list[dict[str, Any]]:
    """Backbone at ``lr``; head (prototypes, projections, scale) at ``lr * head_lr_mult``.

    Norm weights, biases and prototypes get no weight decay.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "head"
        no_decay = p.ndim <= 1 or name.endswith("prototypes")
        groups.setdefault((part, no_decay), []).append(p)
    out = []
    for (part, no_decay), params in sorted(groups.items()):
        lr = cfg.train.lr * (cfg.train.head_lr_mult if part == "head" else 1.0)
        out.append(
            {
                "params": params,
                "lr": lr,
                "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
                "name": f"{part}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


@dataclass
class StepResult:
    """Losses of one training step (floats, for logging)."""

    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    finite: bool = True


class Trainer:
    """Holds the model, optimiser and state of one run. See :func:`train`."""

    def __init__(
        self,
        cfg: Config,
        bundle: DataBundle,
        device: torch.device,
        ctx: DistContext | None = None,
        *,
        load_weights: bool = True,
    ) -> None:
        """``load_weights=False`` (resuming): the checkpoint supplies every weight, so
        the pretrained file named by ``model.weights`` need not exist any more."""
        self.ctx = ctx or DistContext()
        keep_freed_memory()  # CPU steps reuse their activations' memory (lpdseg.heap)
        cfg = prepare_config(cfg, bundle)  # idempotent: _train has usually done it
        self.cfg = cfg
        self.bundle = bundle
        self.device = device
        self.amp = amp_dtype(cfg, device)
        c = len(bundle.class_names)
        self.seg = cfg.train.task == "seg"
        lc = cfg.loss
        wants_sim = (
            not self.seg and cfg.model.head != "cam" and lc.sim_mode != "off" and lc.sim_weight > 0
        )
        self.encoder: FrozenEncoder | None = None
        if wants_sim and lc.encoder != "backbone-ema":
            # an external encoder fixes the prototype space D: build it first so that a
            # null model.embed_dim takes its size (recorded in the saved config)
            self.encoder = self._build_encoder(cfg, bundle, None).to(device)
            if cfg.model.embed_dim is None and cfg.model.head == "lpd":
                d = cfg.to_dict()
                d["model"]["embed_dim"] = int(self.encoder.embed_dim)
                cfg = self.cfg = config_from_dict(d)
        build = build_segnet if self.seg else build_model
        self.model = build(cfg, c, load_weights=load_weights).to(device)
        head = getattr(self.model, "head", None)
        self.is_proto = isinstance(head, PrototypeHead)
        if wants_sim and self.encoder is None:
            self.encoder = self._build_encoder(cfg, bundle, self.model.backbone).to(device)
        if self.encoder is not None and self.encoder.embed_dim != head.embed_dim:
            raise ConfigError(
                f"prototype space has {head.embed_dim} dims but encoder {lc.encoder!r} "
                f"embeds in {self.encoder.embed_dim}; set model.embed_dim={self.encoder.embed_dim} "
                "(or leave it null)"
            )
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.train.lr)
        # forward passes of training go through `net` (DDP under torchrun); `model` stays the
        # plain module for state dicts, the EMA encoder, validation and checkpoints
        self.net = wrap_model(self.model, self.ctx, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.stages = needed_stages(cfg.loss.stage_weights)
        self.step = 0
        self.epoch = 0
        self.best = -math.inf
        self.stale_validations = 0  # validations in a row without a better val mIoU
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.total_steps = 0  # set by train()
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.last_good: str | None = None
        self.saved_step: dict[str, int] = {}  # file name -> step it was last written at

    @staticmethod
    def _build_encoder(
        cfg: Config, bundle: DataBundle, backbone: nn.Module | None
    ) -> FrozenEncoder:
        return build_encoder(
            cfg.loss.encoder,
            backbone=backbone,
            model_mean=cfg.data.mean,
            model_std=cfg.data.std,
            ema_decay=cfg.loss.encoder_ema_decay,
            allow_random=cfg.loss.allow_random_encoder,
        )

    def make_scheduler(self, total_steps: int) -> None:
        self.total_steps = total_steps
        t = self.cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, t.warmup_fraction, t.poly_power)
        )

    def compute_loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward + all loss terms (docs/method.md step 6); stage 2: pixel cross-entropy."""
        lc = self.cfg.loss
        if self.seg:  # labels are pseudo masks (B x H x W, 255 = ignore)
            with torch.autocast(
                self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
            ):
                logits = self.net(images)
            ce = F.cross_entropy(logits.float(), labels.long(), ignore_index=255)
            return ce, {"seg": ce}
        with torch.autocast(
            self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        ):
            out = self.net(images, stages=self.stages)
            dense = None
            if self.encoder is not None and lc.sim_mode == "feature":
                # encoder_scale < 1: a cheaper encoder pass (benchmarks, figure 3)
                dense = self.encoder.dense(rescale(images, lc.encoder_scale))
        terms: dict[str, Tensor] = {
            "cls": classification_loss(out.logits, labels, lc.stage_weights)
        }
        total = terms["cls"]
        if self.encoder is not None:
            with torch.autocast(
                self.device.type,
                dtype=self.amp or torch.float32,
                enabled=self.amp is not None and lc.sim_mode == "image",
            ):
                sim, stats = similarity_loss(
                    out.proto_maps[3],
                    out.logits[3],
                    labels,
                    self.model.head.prototypes,
                    mode=lc.sim_mode,
                    dense_features=dense,
                    images=images,
                    embed_images=self.encoder.embed,
                    fill=self.model.preprocess.mean,
                    threshold=lc.sim_threshold,
                    temperature=lc.sim_temperature,
                    fg_weight=lc.sim_fg_weight,
                    bg_weight=lc.sim_bg_weight,
                    activation_reg=lc.sim_activation_reg,
                )
            terms["sim"] = sim
            total = total + lc.sim_weight * sim
        if self.is_proto and self.model.head.learnable and lc.div_weight > 0:
            weight = diversity_ramp(self.step, self.total_steps, lc.div_weight, lc.div_warmup)
            div = diversity_loss(out.proto_maps[3], out.class_maps[3], labels, lc.div_temperature)
            terms["div"] = div
            total = total + weight * div
        return total, terms

    def train_step(self, images: Tensor, labels: Tensor) -> StepResult:
        """One optimisation step; a non-finite loss skips the step (counted).

        ``labels`` are image-level labels (B x C) in stage 1, masks (B x H x W) in stage 2.
        """
        self.model.train()
        if not self.seg:
            labels = labels.float()
        if self.cfg.data.cutmix > 0:
            # boxes drawn from (seed, step, rank): a resumed run mixes as an unbroken one
            g = cutmix_generator(self.cfg.train.seed, self.step, self.ctx.rank)
            h, w = images.shape[-2:]
            boxes = cutmix_boxes(images.shape[0], h, w, self.cfg.data.cutmix, g)
            images, labels = apply_cutmix(images, labels, boxes)
        images, labels = images.to(self.device), labels.to(self.device)
        loss, terms = self.compute_loss(images, labels)
        floats = {k: float(v.detach()) for k, v in terms.items()}
        # under DDP every rank skips when any rank's loss is non-finite (they stay in step)
        if not all_ranks_true(self.ctx, bool(torch.isfinite(loss)), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.skipped_steps += 1
            log.warning(
                "step %d: non-finite loss %s (%s); step skipped (%d in a row)",
                self.step,
                float(loss.detach()),
                floats,
                self.nonfinite_in_row,
            )
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}; "
                    f"stopping. Last good checkpoint: {self.last_good or 'none written yet'}. "
                    "Lower train.lr, check the data, or set train.amp=off."
                )
            self.step += 1
            self.scheduler.step()
            return StepResult(float(loss.detach()), floats, finite=False)
        self.nonfinite_in_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.encoder is not None:
            self.encoder.update(self.model)
        self.step += 1
        return StepResult(float(loss.detach()), floats)

    def state(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "encoder": self.encoder.state_dict() if self.encoder is not None else None,
            "rng": rng_state(),
            # one RNG state per rank under DDP (a collective: every rank calls state())
            "rng_ranks": all_gather_objects(self.ctx, rng_state()) if self.ctx.enabled else None,
            "world_size": self.ctx.world_size,
            "step": self.step,
            "epoch": self.epoch,
            "best": self.best,
            "stale_validations": self.stale_validations,
            "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.encoder is not None and ckpt.get("encoder") is not None:
            self.encoder.load_state_dict(ckpt["encoder"])
        per_rank = ckpt.get("rng_ranks")
        if per_rank is not None and len(per_rank) == self.ctx.world_size:
            set_rng_state(per_rank[self.ctx.rank])
        else:
            set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.best = float(ckpt["best"])
        self.stale_validations = int(ckpt.get("stale_validations", 0))
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))

    def save(self, path: Path) -> None:
        """Write a checkpoint (rank 0 writes; under DDP every rank must call this)."""
        state = self.state()
        if self.ctx.is_main:
            save_checkpoint(path, state)
        barrier(self.ctx)
        self.last_good = str(path)
        self.saved_step[Path(path).name] = self.step


def prepare_config(cfg: Config, bundle: DataBundle) -> Config:
    """Record what the data resolved (class names, the model's normalisation) in the config."""
    d = cfg.to_dict()
    mean, std = choose_statistics(cfg, bundle.mean, bundle.std)
    d["data"]["class_names"] = list(bundle.class_names)
    d["data"]["mean"] = mean
    d["data"]["std"] = std
    d["data"]["colors"] = [list(c) for c in bundle.colors]
    return config_from_dict(d)


def _log_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append a record as strict JSON (NaN / Infinity become null)."""
    append_jsonl(path, record)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (configs round-trip through YAML and torch.save)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _may_change_on_resume(key: str) -> bool:
    return any(
        key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1]))
        for allowed in RESUME_MAY_CHANGE
    )


def resume_changes(saved: dict[str, Any], current: Config) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, current value)`` of every change a resume may not make."""
    old = _flat(config_from_dict(saved).to_dict())
    new = _flat(current.to_dict())
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        if _may_change_on_resume(key):
            continue
        a, b = old.get(key, missing), new.get(key, missing)
        if _plain(a) != _plain(b):
            changes.append((key, None if a is missing else a, None if b is missing else b))
    return changes


def check_resume_config(resume: str | Path, saved: dict[str, Any], current: Config) -> None:
    """Refuse a resume whose config changes what is trained (names the keys, both values).

    Raises:
        ConfigError: a key outside :data:`RESUME_MAY_CHANGE` differs.
    """
    changes = resume_changes(saved, current)
    if not changes:
        return
    listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in changes[:8])
    more = f" (+{len(changes) - 8} more)" if len(changes) > 8 else ""
    raise ConfigError(
        f"--resume {resume}: the config changes what is trained: {listed}{more}. A resumed "
        "run must keep these settings: drop the override(s) (or set them back), or start a "
        f"new run in another train.out_dir. Keys that may change on resume: "
        f"{', '.join(RESUME_MAY_CHANGE)}"
    )


def check_run_folder(run_dir: Path, resume: str | Path | None, overwrite: bool) -> list[Path]:
    """Refuse to train into a folder that holds a run, unless resuming it or overwriting it.

    Returns:
        With ``overwrite``, the old run's files (:data:`RUN_FILES`, :data:`RUN_GLOBS`)
        for :func:`remove_run_files` to delete once the new run is ready to start, so
        none of them is left mixed with the new run's; else ``[]``.

    Raises:
        ConfigError: the folder holds a run (names it and the fixes), ``resume`` is
            not in ``train.out_dir``, or both ``resume`` and ``overwrite`` were given.
    """
    if resume is not None:
        if overwrite:
            raise ConfigError(
                "--overwrite starts train.out_dir afresh and --resume continues the run in "
                "it; pass only one of them"
            )
        folder = Path(resume).resolve().parent
        if folder != run_dir.resolve():
            raise ConfigError(
                f"--resume {resume} continues the run in {folder}, but train.out_dir="
                f"{run_dir}; a resumed run writes into its own folder: set "
                f"train.out_dir={folder}"
            )
        return []
    found = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if not found:
        return []
    if not overwrite:
        last = run_dir / "last.pt"
        resume_hint = f"continue it with --resume {last}, " if last.exists() else ""
        raise RunExistsError(
            f"train.out_dir={run_dir} already holds a run ({', '.join(found)}); "
            f"{resume_hint}pass --overwrite to replace it (its files are deleted first), or "
            "set another train.out_dir"
        )
    doomed = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    for pattern in RUN_GLOBS:
        doomed += [p for p in sorted(run_dir.glob(pattern)) if p.is_file()]
    return doomed


def remove_run_files(paths: list[Path]) -> None:
    """Delete the earlier run's files (``--overwrite``), logged."""
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        log.warning(
            "--overwrite: removed the earlier run's %s from %s",
            ", ".join(sorted({p.name for p in paths})),
            paths[0].parent,
        )


def trim_metrics(path: Path, step: int) -> int:
    """Drop the ``metrics.jsonl`` records after ``step`` (and lines cut short by a kill).

    A resumed run replays the steps after its checkpoint; without this they
    would be logged twice. Returns the number of records dropped.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0) or 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        log.info(
            "%s: dropped %d records after step %d (replayed by the resume)", path, dropped, step
        )
    return dropped


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def check_pseudo_source(cfg: Config, bundle: DataBundle, allow_other: bool = False) -> None:
    """Stage 2: refuse pseudo masks made from another dataset than ``data.root``.

    The folder's ``pseudo.json`` (written by ``lpdseg pseudo``) records the data
    root and class names it was made from; the manifest's images must lie under
    ``data.root``. Other class names are always refused; another data root only
    without ``allow_other`` (``--allow-other-pseudo``).

    Raises:
        DataError: names the pseudo folder, both data roots or both class sets, and the fix.
    """
    folder = Path(cfg.data.pseudo)
    root = Path(bundle.root).resolve()
    info_path = folder / "pseudo.json"
    info: dict[str, Any] = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            info = {}
    names = info.get("class_names")
    if names is not None and list(names) != list(bundle.class_names):
        raise DataError(
            f"{info_path}: pseudo masks of the classes {', '.join(names)}, but data.root={root} "
            f"(data.format={cfg.data.format}) has {', '.join(bundle.class_names)}; make pseudo "
            f"masks with a checkpoint of these classes (lpdseg pseudo CHECKPOINT --data {root} "
            "--out FOLDER), or set data.format / data.class_names to the masks' classes"
        )
    if allow_other:
        return
    fix = (
        f"write pseudo masks of this data (lpdseg pseudo CHECKPOINT --data {root} --out "
        "FOLDER), point data.root at the data they were made from, or pass "
        "--allow-other-pseudo to train on them anyway"
    )
    recorded = info.get("data_root")
    if recorded and Path(recorded).resolve() != root:
        raise DataError(
            f"{info_path}: pseudo masks of the data in {recorded}, but data.root={root}; {fix}"
        )
    outside = [s.image for s in bundle.train if not _is_under(Path(s.image), root)]
    if outside:
        raise DataError(
            f"{folder / 'manifest.csv'}: {len(outside)} of {len(bundle.train)} images are not "
            f"under data.root={root} (e.g. {outside[0]}): the pseudo masks were made from "
            f"another dataset; {fix}"
        )


def train(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    evaluate_test: bool = True,
    overwrite: bool = False,
    allow_other_pseudo: bool = False,
) -> dict[str, Any]:
    """Train stage 1 (or stage 2 with ``train.task=seg``) as ``cfg`` describes.

    Args:
        cfg: the run config.
        resume: a ``last.pt`` in ``train.out_dir`` to continue from. ``cfg`` must
            match the checkpoint's config except for :data:`RESUME_MAY_CHANGE`
            (e.g. ``train.max_steps``/``epochs`` may extend the run).
        progress: show a progress bar.
        stop_after: stop after this global step (simulates an interrupted run).
        evaluate_test: score ``best.pt`` on the test split at the end.
        overwrite: replace a run already in ``train.out_dir`` (its files are
            deleted first); without it (or ``resume``) such a folder is refused.
        allow_other_pseudo: stage 2: accept pseudo masks made from another data
            root than ``data.root``.

    Returns:
        Summary dict with the run folder, steps, best validation mIoU and test metrics.

    Raises:
        RunExistsError: ``train.out_dir`` holds a run (see ``resume`` / ``overwrite``).
        ConfigError: a resume with a changed config key (named, with both values).
        TrainingInterrupted: SIGINT / SIGTERM; ``last.pt`` holds the step it stopped at.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    ctx = init_distributed(resolve_device(cfg.train.device))
    try:
        return _train(
            cfg, ctx, resume, progress, stop_after, evaluate_test, overwrite, allow_other_pseudo
        )
    finally:
        cleanup(ctx)


def _train(
    cfg: Config,
    ctx: DistContext,
    resume: str | Path | None,
    progress: bool,
    stop_after: int | None,
    evaluate_test: bool,
    overwrite: bool = False,
    allow_other_pseudo: bool = False,
) -> dict[str, Any]:
    """Body of :func:`train` for one process (rank ``ctx.rank`` of ``ctx.world_size``)."""
    device = resolve_device(training_device(cfg.train.device, ctx))
    main = ctx.is_main
    bundle = resolve_data(cfg)
    cfg = prepare_config(cfg, bundle)
    if cfg.train.task == "seg" and cfg.data.pseudo:
        check_pseudo_source(
            cfg, bundle, allow_other_pseudo or bool(getattr(cfg.data, "allow_other_pseudo", False))
        )
    run_dir = Path(cfg.train.out_dir)
    problem, doomed = None, []
    if main:  # rank 0 decides (and deletes with overwrite); every rank raises the same error
        try:
            doomed = check_run_folder(run_dir, resume, overwrite)
        except ConfigError as exc:
            problem = (type(exc), str(exc))
    problem = broadcast_object(ctx, problem)
    if problem is not None:
        raise problem[0](problem[1])
    saved = load_checkpoint(resume, map_location=device) if resume else None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, bundle, device, ctx, load_weights=not resume)
    if saved is not None:
        check_resume_config(resume, saved["config"], trainer.cfg)
    if ctx.enabled:  # same initial weights (seeded above), then per-rank dropout/drop-path
        torch.manual_seed(cfg.train.seed + 1_000_003 * ctx.rank)
        log.info(
            "DDP: %d processes x batch %d = global batch %d",
            ctx.world_size,
            cfg.train.batch_size,
            cfg.train.batch_size * ctx.world_size,
        )
    steps_per_epoch = bundle.steps_per_epoch(cfg.train.batch_size * ctx.world_size)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    trainer.make_scheduler(total)
    if saved is not None:
        trainer.load_state(saved)
        trainer.saved_step["last.pt"] = trainer.step
        log.info("resumed from %s at step %d (epoch %d)", resume, trainer.step, trainer.epoch)
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        remove_run_files(doomed)  # only now: a run refused above keeps the old one whole
        save_config(trainer.cfg, run_dir / "config.yaml")
        if saved is not None:
            trim_metrics(metrics_path, trainer.step)
        elif metrics_path.exists():
            metrics_path.unlink()
    has_val = bundle.has_split("val")
    if not has_val and main:
        log.warning(
            "no val split under %s (val/img + val/mask): nothing to choose best.pt by, so "
            "best.pt will be the last weights",
            bundle.root,
        )
    val_loader = make_eval_loader(cfg, bundle, "val") if has_val and main else None
    barrier(ctx)
    bar = tqdm(
        total=total,
        initial=trainer.step,
        desc=cfg.name,
        disable=not progress or not main,
        unit="step",
        dynamic_ncols=True,
    )
    last = run_dir / "last.pt"
    t_last, n_last = time.perf_counter(), 0
    stop = False
    interrupted = False
    early_stop = False
    with StopSignals() as signals:

        def stop_requested() -> bool:
            # under DDP every rank must agree (a collective), so all stop at the same step
            if not ctx.enabled:
                return signals.signum is not None
            return not all_ranks_true(ctx, signals.signum is None, device)

        while trainer.step < total and not stop and not interrupted:
            epoch = trainer.step // steps_per_epoch
            trainer.epoch = epoch
            offset = trainer.step - epoch * steps_per_epoch
            loader = make_train_loader(
                cfg,
                bundle,
                epoch=epoch,
                start_batch=offset,
                rank=ctx.rank,
                world_size=ctx.world_size,
            )
            batches = iter(loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except RuntimeError:
                    # DataLoader workers killed by the same Ctrl-C: stop at this boundary
                    if signals.signum is None or ctx.enabled:
                        raise
                    interrupted = True
                    break
                key = "mask" if trainer.seg else "label"
                result = trainer.train_step(batch["image"], batch[key])
                n_last += batch["image"].shape[0] * ctx.world_size
                rec = {
                    "step": trainer.step,
                    "epoch": epoch,
                    "loss": result.loss,
                    **result.terms,
                    "lr": trainer.optimizer.param_groups[0]["lr"],
                    "finite": result.finite,
                }
                if main:
                    _log_jsonl(metrics_path, rec)
                elapsed = time.perf_counter() - t_last
                bar.set_postfix(
                    loss=f"{result.loss:.3f}", img_s=f"{n_last / max(elapsed, 1e-9):.1f}"
                )
                bar.update(1)
                at_epoch_end = trainer.step % steps_per_epoch == 0 or trainer.step >= total
                # no checkpoint inside a non-finite streak: last.pt stays the last good state.
                # An epoch's last step is saved after its validation (below): a run resumed
                # from it never skips that validation.
                if (
                    cfg.train.ckpt_every
                    and trainer.step % cfg.train.ckpt_every == 0
                    and result.finite
                    and not at_epoch_end
                ):
                    trainer.save(last)
                if trainer.step >= total or (stop_after is not None and trainer.step >= stop_after):
                    stop = trainer.step < total
                    break
                if not at_epoch_end and stop_requested():
                    interrupted = True
                    break
            if stop or interrupted:
                break
            end_of_epoch = trainer.step % steps_per_epoch == 0 or trainer.step >= total
            if end_of_epoch:
                ep = trainer.step // steps_per_epoch - (0 if trainer.step % steps_per_epoch else 1)
                if has_val and ((ep + 1) % cfg.train.val_every == 0 or trainer.step >= total):
                    improved = _validate(trainer, val_loader, cfg, bundle, device, metrics_path, ep)
                    improved = broadcast_object(ctx, improved)
                    trainer.stale_validations = 0 if improved else trainer.stale_validations + 1
                    if improved:
                        trainer.save(run_dir / "best.pt")
                    patience = cfg.train.patience
                    if patience is not None and trainer.stale_validations >= patience:
                        early_stop = trainer.step < total
                trainer.epoch = ep + 1
                if trainer.nonfinite_in_row == 0:
                    trainer.save(last)
                if early_stop:
                    log.info(
                        "early stop at step %d: %d validations without a better val mIoU "
                        "(train.patience=%d)",
                        trainer.step,
                        trainer.stale_validations,
                        cfg.train.patience,
                    )
                    break
            if stop_requested():  # after the epoch's validation and last.pt
                interrupted = True
        if interrupted:
            bar.close()
            is_saved = trainer.nonfinite_in_row == 0
            if is_saved and trainer.saved_step.get("last.pt") != trainer.step:
                trainer.save(last)
            checkpoint = str(last) if is_saved or last.exists() else None
            raise TrainingInterrupted(
                signals.signum or signal.SIGTERM,
                trainer.step,
                checkpoint,
                is_saved,
                trainer.saved_step.get("last.pt", trainer.step),
            )
    bar.close()
    if stop_after is not None and trainer.step < total:
        trainer.save(last)
        return {"run_dir": str(run_dir), "step": trainer.step, "stopped": True}
    if not broadcast_object(ctx, (run_dir / "best.pt").exists()):
        trainer.save(run_dir / "best.pt")
    if not main:
        return {"run_dir": str(run_dir), "step": trainer.step, "rank": ctx.rank}
    return _finish(trainer, run_dir, metrics_path, bundle, evaluate_test, progress, has_val)


def _validate(
    trainer: Trainer,
    val_loader: Any,
    cfg: Config,
    bundle: DataBundle,
    device: torch.device,
    metrics_path: Path,
    ep: int,
) -> bool | None:
    """Rank 0: score the val split, log it, update ``best``; True when ``best.pt`` is due.

    Other ranks (no loader) return ``None`` and learn the decision by broadcast.
    """
    if val_loader is None:
        return None
    run_dir = metrics_path.parent
    res = evaluate(
        trainer.model,
        val_loader,
        cfg.eval,
        list(bundle.class_names),
        tta=False,
        limit=cfg.train.val_limit,
        device=device,
        progress=False,
        desc="val",
    )
    miou = res["mIoU"]
    _log_jsonl(
        metrics_path,
        {
            "step": trainer.step,
            "epoch": ep,
            "val_mIoU": miou,
            "val_mDice": res["mDice"],
            "val_bIoU": res["bIoU"],
        },
    )
    log.info("epoch %d: val mIoU %.4f", ep, miou)
    if miou > trainer.best or not (run_dir / "best.pt").exists():
        trainer.best = max(miou, trainer.best) if math.isfinite(miou) else trainer.best
        return True
    return False


def _finish(
    trainer: Trainer,
    run_dir: Path,
    metrics_path: Path,
    bundle: DataBundle,
    evaluate_test: bool,
    progress: bool,
    has_val: bool = True,
) -> dict[str, Any]:
    """Rank 0 after the last step: curves, test metrics of ``best.pt``, ``summary.json``.

    ``best_val_mIoU`` is null when nothing was validated (no val split: ``best.pt``
    is then the last weights, ``best_by`` says so).
    """
    from lpdseg.viz import plot_training_curves

    plot_training_curves(metrics_path, run_dir / "curves.png")
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "step": trainer.step,
        "best_val_mIoU": trainer.best if math.isfinite(trainer.best) else None,
        "best_by": "val_mIoU" if has_val else "last_step (no val split)",
        "skipped_steps": trainer.skipped_steps,
        # fewer steps than planned: ended by train.patience
        "early_stopped": trainer.step < trainer.total_steps,
    }
    if has_val:
        calibration = _calibrate_gate(trainer, run_dir / "best.pt", bundle)
        if calibration is not None:
            summary["gate_calibration"] = calibration
    if evaluate_test and bundle.has_split("test"):
        best = run_dir / "best.pt"
        trainer.model.load_state_dict(load_checkpoint(best, map_location=trainer.device)["model"])
        summary["test"] = score_split(
            trainer.model,
            trainer.cfg,
            make_eval_loader(trainer.cfg, bundle, "test"),
            "test",
            progress=progress,
            out_dir=run_dir,
            source=str(best),
        )
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _calibrate_gate(trainer: Trainer, best: Path, bundle: DataBundle) -> dict[str, Any] | None:
    """Per-class classifier-gate thresholds of ``best.pt``, chosen on the val split.

    They are stored in ``best.pt``'s config (``eval.cls_thresholds``, rewritten
    atomically) only when they raise the val mIoU of the classifier gate over the
    fixed ``eval.cls_threshold``; either way the record goes into summary.json.
    """
    cfg = trainer.cfg
    if trainer.seg or not cfg.eval.calibrate_gate or not best.is_file():
        return None
    ckpt = load_checkpoint(best, map_location=trainer.device)
    trainer.model.load_state_dict(ckpt["model"])
    loader = make_eval_loader(cfg, bundle, "val")
    outputs = collect_outputs(trainer.model, loader, cfg.eval, trainer.device)
    if not outputs:
        return None
    thresholds, fixed, calibrated = choose_thresholds(outputs, cfg.eval, bundle.class_names)
    used = calibrated > fixed
    if used:
        ckpt["config"]["eval"]["cls_thresholds"] = thresholds
        save_checkpoint(best, ckpt)
        trainer.cfg = config_from_dict(ckpt["config"])
    log.info(
        "classifier gate on val (%d images): mIoU %.4f at threshold %.2f, %.4f with per-class "
        "thresholds %s%s",
        len(outputs),
        fixed,
        cfg.eval.cls_threshold,
        calibrated,
        thresholds,
        " (stored in best.pt)" if used else " (not better: best.pt keeps the fixed threshold)",
    )
    return {
        "images": len(outputs),
        "val_mIoU_fixed_threshold": fixed,
        "val_mIoU_calibrated": calibrated,
        "cls_thresholds": thresholds if used else None,
    }
