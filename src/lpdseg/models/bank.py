"""PBIP's prototype bank as stored: the prototypes and where each came from.

Storage only (no data or encoder code): :mod:`lpdseg.engine.bank` builds a
bank from training patches; models and explanations read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lpdseg.errors import CheckpointError
from lpdseg.io import atomic_save_with, unsafe_pickle_globals

BANK_FORMAT = 1


@dataclass
class PrototypeBank:
    """Fixed prototypes for PBIP.

    Attributes:
        prototypes: C x K x D mean embeddings (L2-normalised).
        members: per class, per cluster, the file names of the kept patches.
        class_names: tissue classes.
        encoder: name of the frozen encoder that embedded them.
        settings: K, n_keep, seed, the white rule, counts per class.
    """

    prototypes: torch.Tensor
    members: list[list[list[str]]]
    class_names: list[str]
    encoder: str
    settings: dict[str, Any] = field(default_factory=dict)


def save_bank(bank: PrototypeBank, path: str | Path) -> None:
    """Write the bank atomically (plain tensors and values: loads with weights_only)."""
    payload = {
        "bank_format": BANK_FORMAT,
        "prototypes": bank.prototypes,
        "members": bank.members,
        "class_names": bank.class_names,
        "encoder": bank.encoder,
        "settings": bank.settings,
    }
    atomic_save_with(path, lambda handle: torch.save(payload, handle))


def load_bank(path: str | Path) -> PrototypeBank:
    """Read a bank written by :func:`save_bank`.

    Raises:
        CheckpointError: missing, corrupt / not a torch file, unsafe (a pickle
            importing Python objects) or not a bank.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"prototype bank {path} does not exist; build it with `lpdseg bank`")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"could not read {path}: {exc.strerror or exc}") from None
    except Exception:  # say what the file is, never torch's "retry with weights_only=False"
        unsafe = unsafe_pickle_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path} was refused for safety: it is a pickle that imports Python objects "
                f"({', '.join(unsafe[:5])}), and banks load as tensors and plain values only "
                "(torch.load(weights_only=True)); rebuild it with `lpdseg bank`"
            ) from None
        raise CheckpointError(
            f"{path} is not a prototype bank (corrupt or not a torch file); rebuild it with "
            "`lpdseg bank`"
        ) from None
    if not isinstance(d, dict) or d.get("bank_format") != BANK_FORMAT:
        raise CheckpointError(
            f"{path} is not a prototype bank of format {BANK_FORMAT} (a torch file without "
            "lpdseg's bank entries); rebuild it with `lpdseg bank`"
        )
    return PrototypeBank(
        d["prototypes"], d["members"], d["class_names"], d["encoder"], d["settings"]
    )
