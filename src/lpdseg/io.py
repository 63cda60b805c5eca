"""Atomic file writes: a result on disk is either the old one or the new one.

Every output (checkpoints, masks, tables, reports) goes through these helpers:
write to a temporary file in the destination folder, flush + fsync, then
``os.replace``. If writing fails (disk full, killed process), the temporary
file is removed and the previous file is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lpdseg.errors import LpdsegError


class WriteError(LpdsegError):
    """An output could not be written; earlier files are intact."""


def _umask() -> int:
    """The process umask (reading it needs setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the block succeeds.

    Raises:
        WriteError: if writing fails (e.g. ENOSPC); ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the usual permissions (umask applied)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        hint = " (disk full: free space and retry)" if exc.errno == errno.ENOSPC else ""
        raise WriteError(
            f"could not write {path}: {exc.strerror or exc}{hint}; the previous "
            "file (if any) is unchanged"
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON (indented, NaN kept as null-safe strings by the caller) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_save_with(path: str | Path, writer: Callable[[IO], None]) -> None:
    """Atomically write whatever ``writer(handle)`` writes (torch.save, PIL.save...)."""
    with atomic_open(path, "wb") as handle:
        writer(handle)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
