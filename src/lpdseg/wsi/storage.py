"""Slide-sized arrays on disk, so a run's memory does not grow with the slide.

A slide's canvas (``K x h x w`` int64 sums, e.g. 29 raw channels of a prototype
model) grows with the slide's area: gigabytes for a large slide at the model's
resolution. :class:`DiskArrays` keeps such arrays in files of a private folder,
mapped into memory (``MAP_SHARED``), and :meth:`DiskArrays.release` drops their
pages from this process's resident set (``madvise(MADV_DONTNEED)``; the data stay
in the page cache and the file). Code that walks a canvas in bands calls it after
each band, so resident memory holds about one band whatever the slide size.
"""

from __future__ import annotations

import logging
import mmap
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CANVAS_PREFIX",
    "DiskArrays",
    "ReleasingView",
    "release_pages",
    "remove_stale",
]

#: Name prefix of the folders :class:`DiskArrays` makes in a slide's output folder.
CANVAS_PREFIX = ".lpdseg-canvas-"

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_RANDOM = getattr(mmap, "MADV_RANDOM", None)


class DiskArrays:
    """Zero-initialised arrays backed by files in a temporary folder under ``parent``.

    Use as a context manager (or call :meth:`close`): the folder and its
    files are removed at the end, also after an error.

    Args:
        parent: folder the temporary folder is made in (e.g. the run's output
            folder, which has room for its outputs); None: the system's temp.
        prefix: name prefix of the temporary folder.
    """

    def __init__(self, parent: str | Path | None = None, prefix: str = CANVAS_PREFIX) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._maps: list[mmap.mmap] = []

    def zeros(self, name: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A new writable array of zeros, stored in :func:`array_file` ``(folder, name)``."""
        dtype = np.dtype(dtype)
        size = _nbytes(shape, dtype)
        path = array_file(self.folder, name)
        with open(path, "w+b") as handle:
            if size == 0:
                return np.zeros(shape, dtype)
            handle.truncate(size)  # sparse: zeros, no disk used until written
            mm = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_WRITE)
        _advise_random(mm)
        self._maps.append(mm)
        return np.frombuffer(mm, dtype=dtype).reshape(tuple(shape))

    def flush(self) -> None:
        """Write every array's changed pages to its file (for another process to read)."""
        for mm in self._maps:
            mm.flush()

    def release(self) -> None:
        """Drop every array's pages from resident memory (contents kept)."""
        for mm in self._maps:
            release_pages(mm)

    def close(self) -> None:
        """Unmap what can be unmapped and remove the folder."""
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # an array still refers to it: unmapped when it is freed
                release_pages(mm)
        self._maps.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> DiskArrays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale(parent: str | Path, prefix: str = CANVAS_PREFIX) -> int:
    """Remove canvas folders a killed run left in ``parent``; return how many.

    Call it only while holding ``parent``'s output lock: no other run can then be
    using them (a run that ends normally, or by an error, removes its own).
    """
    stale = (
        [p for p in Path(parent).glob(f"{prefix}*") if p.is_dir()] if Path(parent).is_dir() else []
    )
    for folder in stale:
        size = sum(f.stat().st_blocks * 512 for f in folder.glob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s (%.0f MiB on disk), left by an interrupted run", folder, size / 2**20)
    return len(stale)


def _advise(mm: mmap.mmap, advice: int | None, why: str) -> None:
    """``madvise(advice)`` on a mapping; a no-op where unsupported or closed.

    A failure is not fatal (``why``: what it costs), only logged.
    """
    if advice is None or mm.closed:
        return
    try:
        mm.madvise(advice)
    except (OSError, ValueError) as exc:
        log.debug("madvise(%s) failed (%s): %s", advice, why, exc)


def _advise_random(mm: mmap.mmap) -> None:
    """``madvise(MADV_RANDOM)``: fault in only the page touched.

    A tile's update touches a few hundred bytes in each of many canvas rows.
    Without the advice the kernel maps a large block of neighbouring pages on
    each fault (read-around, large page-cache folios): measured 112 KiB
    resident per touch instead of 4 KiB, so between two releases a 16k x 16k
    slide's canvas held 50-90 MiB, growing with the slide's width.
    """
    _advise(mm, _RANDOM, "more pages stay resident")


def release_pages(mm: mmap.mmap) -> None:
    """``madvise(MADV_DONTNEED)`` on a shared file mapping (no-op where unsupported or closed)."""
    _advise(mm, _DONTNEED, "memory is only not returned early")


class ReleasingView:
    """A sliceable array (``shape``, ``dtype``, ``[...]``) that releases ``storage`` every N reads.

    For readers that walk a file-backed array tile by tile (the OME-TIFF
    writer): each read maps pages in; releasing now and then keeps them from
    piling up.
    """

    def __init__(self, array: Any, storage: DiskArrays | None, every: int = 16) -> None:
        self.array, self.storage, self.every = array, storage, max(1, int(every))
        self.shape, self.dtype = tuple(array.shape), np.dtype(array.dtype)
        self._reads = 0

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.array(self.array[key])  # a copy: nothing keeps the mapped pages
        self._reads += 1
        if self.storage is not None and self._reads % self.every == 0:
            self.storage.release()
        return out


def array_file(folder: str | Path, name: str) -> Path:
    """Where :meth:`DiskArrays.zeros` keeps the array ``name`` of ``folder``."""
    return Path(folder) / f"{name}.bin"


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def open_array(folder: str | Path, name: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A read-only view of the array ``name`` another process made in ``folder``
    with :meth:`DiskArrays.zeros`.

    Raises:
        ValueError: the file is missing or not the expected size (another process's
            folder not visible here, e.g. ranks on machines without a shared disk).
    """
    path = array_file(folder, name)
    dtype = np.dtype(dtype)
    size = _nbytes(shape, dtype)
    have = path.stat().st_size if path.is_file() else None
    if have != size:
        raise ValueError(
            f"{path}: expected a canvas file of {size} bytes, found "
            f"{'none' if have is None else f'{have} bytes'}; every rank must see the output "
            "folder (a disk shared by the ranks)"
        )
    if size == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape))
