"""Checkpoints: everything needed to resume bit-for-bit, written atomically.

A checkpoint is a dict of tensors and plain Python values only, so it loads
with ``torch.load(weights_only=True)`` (no code runs from an untrusted file):
model, optimizer, scheduler, grad-scaler, EMA encoder, RNG states, step and
epoch, the best validation score, and the resolved config that built the
model (a checkpoint rebuilds its own model, nanoGPT style).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

import lpdseg
from lpdseg.errors import CheckpointError
from lpdseg.io import atomic_save_with, unsafe_pickle_globals

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """RNG states of the main process (torch CPU/CUDA, Python)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(_flatten_py_state(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten_py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file + fsync + rename).

    Raises:
        lpdseg.io.WriteError: when the write fails ("file too large / disk full" for
            a full disk or a file-size limit); the previous file stays byte-identical.
    """
    payload = {"format_version": FORMAT_VERSION, "lpdseg_version": lpdseg.__version__, **payload}
    atomic_save_with(path, lambda handle: torch.save(payload, handle))


def unloadable_message(path: Path, what: str) -> str:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, in words that are true.

    "Refused for safety" only for a real pickle that imports Python objects
    (named); anything else is "not <what> (corrupt or not a torch file)". torch's
    own advice (retry with ``weights_only=False``) is never relayed: that would
    run code from the file.
    """
    unsafe = unsafe_pickle_globals(path)
    if unsafe:
        shown = ", ".join(unsafe[:5]) + (f" (+{len(unsafe) - 5} more)" if len(unsafe) > 5 else "")
        return (
            f"{path} was refused for safety: it is a pickle that imports Python objects "
            f"({shown}), and lpdseg loads only tensors and plain values "
            "(torch.load(weights_only=True)) so that no code from a file runs; use a file "
            "written by lpdseg, or re-save just the tensors and plain values"
        )
    return (
        f"{path} is not {what} (corrupt or not a torch file); it may be truncated (a copy or "
        "write cut short) or another kind of file: copy it again or give a best.pt/last.pt "
        "written by `lpdseg train`"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format.

    Raises:
        CheckpointError: missing, unreadable (corrupt / not a torch file), unsafe
            (a pickle importing Python objects) or from another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; give the path to a .pt file "
            "written by `lpdseg train` (e.g. runs/<name>/best.pt)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"could not read {path}: {exc.strerror or exc}") from None
    except Exception:  # the reason comes from the file itself, never from torch's advice
        raise CheckpointError(unloadable_message(path, "an lpdseg checkpoint")) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(
            f"{path} is not an lpdseg checkpoint (a torch file without lpdseg's model and "
            "config entries); give a best.pt/last.pt written by `lpdseg train`"
        )
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, this lpdseg "
            f"({lpdseg.__version__}) reads format {FORMAT_VERSION}; retrain or "
            "use the lpdseg version that wrote it"
        )
    return ckpt
