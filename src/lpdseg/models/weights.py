"""One loader for every weights file: read a state dict, check it, load it.

Two steps, kept apart so that a backbone can rename keys in between
(``efficientnet_lite.convert_package_state_dict`` does):

1. :func:`read_state_dict` turns a file into a flat ``{key: tensor}`` dict.
   ``.safetensors`` files are read with ``safetensors``; anything else
   (``.pth``, ``.pt``, ``.bin``) with ``torch.load(weights_only=True)``, so no
   code from the file runs. Common containers are unwrapped (``{"state_dict":
   ...}``, ``{"model": ...}``, ``{"module": ...}``, nested in any order) and the
   prefixes that DistributedDataParallel (``module.``) and ``torch.compile``
   (``_orig_mod.``) add to every key are stripped.
2. :func:`load_into` compares the dict with the model's own state dict and
   copies what fits. A tensor whose shape differs is always refused; missing or
   unexpected keys are refused when ``strict`` (the default) and reported
   otherwise. Keys under ``ignore_prefixes`` (e.g. an ImageNet classifier
   ``head.`` a backbone has no use for) are neither loaded nor reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lpdseg.errors import CheckpointError
from lpdseg.io import unsafe_pickle_globals

log = logging.getLogger(__name__)

# container keys a state dict is commonly wrapped in (training scripts, DDP, lpdseg checkpoints)
CONTAINER_KEYS = ("state_dict", "model", "module")
# prefixes added to every key by DistributedDataParallel / torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# how many keys an error message lists before it just counts
MAX_LISTED = 10


@dataclass
class LoadReport:
    """What :func:`load_into` did with a state dict.

    Attributes:
        missing: model keys the state dict does not have (they keep their values).
        unexpected: state-dict keys the model does not have (not loaded).
        mismatched: ``(key, expected shape, found shape)`` of refused tensors.
        loaded: number of tensors copied into the model.
        ignored: keys under ``ignore_prefixes``, left out of the other lists.
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]
    loaded: int
    ignored: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every model key was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: counts, then the first keys of each non-empty list."""
        parts = [f"loaded {self.loaded} tensors"]
        if self.missing:
            parts.append(f"missing {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {_listing(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} {list(e)} vs {list(f)}" for k, e, f in self.mismatched]
            parts.append(f"shape-mismatched {_listing(shapes)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)}")
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()


def _listing(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``"3: a, b, c"`` or ``"25: a, ..., j (+15 more)"``."""
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)}: {shown}{more}"


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file into a flat ``{key: tensor}`` dict on the CPU.

    Args:
        path: ``.safetensors`` file, or a PyTorch file (``.pth``/``.pt``/``.bin``)
            holding a state dict, possibly wrapped in ``"state_dict"``,
            ``"model"`` or ``"module"`` entries.

    Returns:
        The state dict, with ``module.`` / ``_orig_mod.`` key prefixes removed.
        Non-tensor entries next to the tensors are dropped (with a warning).

    Raises:
        CheckpointError: the file is missing, not a weights file (corrupt or not
            a torch/safetensors file), refused for safety (a pickle importing
            Python objects, named), or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such weights file; pass the path of a local .pth/.pt/.bin/.safetensors "
            "file (lpdseg never downloads weights)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"could not read {path}: {err.strerror or err}") from None
    except Exception:  # the reason comes from the file, never torch's "weights_only=False"
        raise CheckpointError(_unreadable_weights(path)) from None
    return _flatten(obj, path)


def _unreadable_weights(path: Path) -> str:
    """Why a weights file did not load: unsafe pickle (named globals) or not a weights file."""
    resave = (
        "re-save just the tensors with torch.save(model.state_dict(), path) or "
        "safetensors.torch.save_file(state, path)"
    )
    if path.suffix == ".safetensors":
        return (
            f"{path}: cannot read weights: not a weights file (corrupt or not a safetensors "
            f"file); it may be truncated: copy it again, or {resave}"
        )
    unsafe = unsafe_pickle_globals(path)
    if unsafe:
        return (
            f"{path}: cannot read weights: refused for safety: it is a pickle that imports "
            f"Python objects ({_listing(unsafe, 5)}), and weights load with "
            f"torch.load(weights_only=True) so that no code from a file runs; {resave}"
        )
    return (
        f"{path}: cannot read weights: not a weights file (corrupt or not a torch file); it "
        f"may be truncated: copy it again, or {resave}"
    )


def _flatten(obj: Any, path: Path) -> dict[str, Tensor]:
    """Unwrap containers, keep the tensors and strip wrapper prefixes."""
    # unwrap {"state_dict": {...}}, {"model": {"module": {...}}}, ...: only when the entry is
    # itself a mapping, so a real weight that happens to be called "model" is not mistaken
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to "
            "tensors); re-save it with torch.save(model.state_dict(), path)"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path}: no tensors found (top-level keys: {_listing([str(k) for k in obj])}); "
            f"expected a state dict, possibly under one of {list(CONTAINER_KEYS)}"
        )
    dropped = [str(k) for k in obj if str(k) not in tensors]
    if dropped:
        log.warning("%s: ignoring non-tensor entries %s", path, _listing(dropped))

    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        new = strip_wrapper_prefixes(key)
        if new in out:
            raise CheckpointError(
                f"{path}: keys {key!r} and another one both become {new!r} once the "
                f"{'/'.join(WRAPPER_PREFIXES)} prefixes are removed; the file mixes wrapped and "
                "unwrapped copies of one model, re-save a single state dict"
            )
        out[new] = value
    return out


def strip_wrapper_prefixes(key: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` (any order, any number)."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


# --------------------------------------------------------------------------- loading


def load_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    strict: bool = True,
    ignore_prefixes: Sequence[str] = (),
    source: str = "",
) -> LoadReport:
    """Copy a state dict into ``model``, refusing anything that does not fit.

    Args:
        model: the module to load into (its parameters and persistent buffers).
        state: ``{key: tensor}``, e.g. from :func:`read_state_dict`.
        strict: refuse missing or unexpected keys (default). With ``False`` the
            matching tensors are loaded, the rest keep their values, and the
            report is logged as a warning.
        ignore_prefixes: keys (of the file or the model) starting with one of
            these are neither loaded nor reported, e.g. ``("head.",)`` for the
            ImageNet classifier of a backbone's release file.
        source: how to name the weights in messages (e.g. the file path).

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointError: a tensor's shape differs from the model's (always),
            or keys are missing/unexpected and ``strict`` is set. The error's
            ``report`` attribute holds the :class:`LoadReport` (nothing loaded).
    """
    source = source or "state dict"
    prefixes = tuple(ignore_prefixes)
    expected = model.state_dict()

    # str.startswith(()) is False, so no prefixes means nothing is ignored
    ignored = [k for k in state if k.startswith(prefixes)]
    ignored += [k for k in expected if k.startswith(prefixes) and k not in state]
    missing = [k for k in expected if k not in state and not k.startswith(prefixes)]
    unexpected = [k for k in state if k not in expected and not k.startswith(prefixes)]
    mismatched = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state.items()
        if k in expected
        and not k.startswith(prefixes)
        and tuple(v.shape) != tuple(expected[k].shape)
    ]

    to_load = {k: v for k, v in state.items() if k in expected and not k.startswith(prefixes)}
    report = LoadReport(missing, unexpected, mismatched, loaded=0, ignored=ignored)

    if mismatched:
        shapes = [f"{k} (model {list(e)}, file {list(f)})" for k, e, f in mismatched]
        raise _refuse(
            report,
            f"{source}: {len(mismatched)} tensors have the wrong shape: {_listing(shapes)}. "
            "The weights are for a different architecture or size (e.g. mit_b1 weights into "
            "mit_b0); build the backbone the file was trained as",
        )
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"missing keys {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listing(unexpected)}")
        raise _refuse(
            report,
            f"{source}: does not match the model: {'; '.join(problems)}. Check that the backbone "
            "name matches the file (e.g. mit_b1 for mit_b1.pth), or load with strict=False to "
            "keep only the matching tensors",
        )

    # every remaining key exists in the model with the right shape, so this cannot fail
    model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    if not report.clean:
        log.warning("%s: partial load (strict=False): %s", source, report.summary())
    if not to_load:
        log.warning("%s: no tensor matched the model; it keeps its initial weights", source)
    return report


def _refuse(report: LoadReport, message: str) -> CheckpointError:
    """A CheckpointError carrying the report (``err.report``) for callers that want details."""
    err = CheckpointError(message)
    err.report = report  # type: ignore[attr-defined]
    return err
