"""torch.distributed helpers for training and slide inference under ``torchrun``.

``torchrun`` (``python -m torch.distributed.run``) starts one process per
device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_distributed` reads them and joins the process
group (NCCL on GPUs, Gloo on CPU); without them (a plain ``lpdseg train``)
everything here is a no-op for one process, so the same code runs both ways.

Conventions of a distributed run (see docs/usage.md, "Several processes, GPUs and machines"):

- ``train.batch_size`` is per process: the effective batch is
  ``batch_size x world_size``.
- Every rank takes every ``world_size``-th sample of the same seeded
  permutation (``make_train_loader(rank=, world_size=)``), so the ranks'
  batches together are the batch one process with ``batch_size x world_size``
  would see.
- Gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`.
- Only rank 0 logs progress, writes ``metrics.jsonl``, checkpoints and runs
  validation; the others wait at a barrier. On resume every rank loads the
  checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lpdseg.errors import ConfigError

log = logging.getLogger(__name__)

#: How long ranks wait for each other (validation + checkpoint on rank 0 included).
DEFAULT_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: global index of this process (0 for a single process).
        world_size: number of processes.
        local_rank: index on this machine (selects the GPU).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when not distributed.
        owns_group: this context created the process group (and destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer; launch with "
            "`torchrun --nproc_per_node N ...` or unset it for a single process"
        ) from None


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment ``torchrun`` sets.

    Raises:
        ConfigError: a value is not an integer or the rank is out of range.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(
            f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent "
            "(need 0 <= RANK < WORLD_SIZE); launch with torchrun or unset both"
        )
    return rank, world, local


def init_distributed(device: torch.device | str = "cpu") -> DistContext:
    """Join the process group described by the environment (no-op for one process).

    Args:
        device: the training device; CUDA devices use NCCL (and this
            process's GPU is ``cuda:LOCAL_RANK``), CPU uses Gloo.

    Returns:
        The context of this process.
    """
    rank, world, local = env_ranks()
    if world == 1:
        return DistContext()
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    owns = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={world} is set but MASTER_ADDR/MASTER_PORT are not; "
                "launch with `torchrun --nproc_per_node N -m lpdseg.cli train ...`"
            )
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=DEFAULT_TIMEOUT)
        owns = True
    else:
        backend = dist.get_backend()
    log.info("distributed: rank %d of %d (local %d), backend %s", rank, world, local, backend)
    return DistContext(rank, world, local, backend, owns)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={name} but no CUDA device is available; use train.device=cpu"
        )
    return torch.device(name)


def training_device(name: str, ctx: DistContext) -> str:
    """The device name for this rank: ``cuda``/``auto`` on a GPU machine -> ``cuda:LOCAL_RANK``."""
    if ctx.enabled and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{ctx.local_rank}"
    return name


def barrier(ctx: DistContext) -> None:
    """Wait until every rank arrives (no-op for one process)."""
    if ctx.enabled:
        dist.barrier()


def all_ranks_true(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank (e.g. "my loss is finite")."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a picklable value)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list for one process)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def has_training_batchnorm(model: nn.Module) -> bool:
    """Whether a batch-norm layer would update running statistics in training mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return True
    return False


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The module to run forward passes through: DDP-wrapped when distributed.

    ``find_unused_parameters=True`` because stages with a zero loss weight are
    not computed (their projection heads get no gradient). The wrapped module
    stays reachable as ``.module`` (and the caller keeps the plain model for
    state dicts, the EMA encoder, evaluation and checkpoints).
    """
    if not ctx.enabled:
        return model
    if has_training_batchnorm(model):
        log.warning(
            "the model has batch-norm layers: under DDP their batch statistics are "
            "per process (batch_size each), not over the global batch; freeze them "
            "(pretrained backbones) or use a larger per-process batch"
        )
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=True
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
