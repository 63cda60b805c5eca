"""Atomic file writes, strict JSON, and why a torch file would not load.

Every output (checkpoints, masks, tables, reports) goes through these helpers:
write to a temporary file in the destination folder, flush + fsync, then
``os.replace``. If writing fails (disk full, a file-size limit, killed
process), the temporary file is removed and the previous file is untouched;
the error says so (:class:`WriteError`).

JSON is strict everywhere: :func:`finite_or_none` turns NaN and +-Infinity
into ``null`` (recursively) and :func:`dumps_strict` refuses anything else
that is not JSON, so every ``.json``/``.jsonl`` lpdseg writes parses with any
JSON reader.

:func:`unsafe_pickle_globals` tells a checkpoint that holds Python objects
(refused for safety by ``torch.load(weights_only=True)``) from a file that is
simply not a torch file (corrupt, truncated, other bytes).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import pickletools
import tempfile
import zipfile
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


# errno values that mean "no room for this file": disk full, file-size limit, quota
_NO_ROOM = tuple(
    getattr(errno, name) for name in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, name)
)
# what torch.save's C++ writer says when a write comes up short (ENOSPC / EFBIG underneath)
_TORCH_SHORT_WRITE = (
    "unexpected pos",
    "inline_container",
    "PytorchStreamWriter failed",
    "file write failed",
)


def _is_short_write(exc: BaseException) -> bool:
    """Whether ``exc`` means the file could not grow: disk full, quota or file-size limit."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_ROOM
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(marker in text for marker in _TORCH_SHORT_WRITE)
    return False


def _previous_intact(path: Path) -> str:
    return (
        "the previous checkpoints are intact"
        if path.suffix == ".pt"
        else "the previous file (if any) is intact"
    )


def write_error(path: Path, exc: BaseException) -> WriteError:
    """The :class:`WriteError` for a failed write of ``path`` (disk full, limit, I/O error)."""
    if _is_short_write(exc):
        detail = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
        return WriteError(
            f"could not write {path}: file too large / disk full{detail}; free space or raise "
            f"the file-size limit (ulimit -f) and retry; {_previous_intact(path)}"
        )
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return WriteError(f"could not write {path}: {reason}; {_previous_intact(path)}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the block succeeds.

    Raises:
        WriteError: if writing fails (disk full, file-size limit, I/O error, or
            ``torch.save``'s "unexpected pos" for the same); ``path`` keeps its
            old content and the temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the usual permissions (umask applied)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) or _is_short_write(exc):
            raise write_error(path, exc) from exc
        raise
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
    """Write strict JSON (indented; NaN and +-Infinity become null) atomically."""
    atomic_write_text(path, dumps_strict(obj, indent=2) + "\n")


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one strict-JSON line (NaN and +-Infinity become null) to ``path``."""
    line = dumps_strict(record) + "\n"
    try:
        with Path(path).open("a") as handle:
            handle.write(line)
    except OSError as exc:
        raise write_error(Path(path), exc) from exc


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by ``None``, recursively.

    Dicts, lists and tuples are walked; numpy arrays/scalars and tensors become
    lists/Python numbers (``tolist``); paths become strings.
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return finite_or_none(obj.tolist())
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_or_none` (obj) with ``allow_nan=False``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, default=_json_default, **kwargs)


def atomic_save_with(path: str | Path, writer: Callable[[IO], None]) -> None:
    """Atomically write whatever ``writer(handle)`` writes (torch.save, PIL.save...).

    Raises:
        WriteError: the write failed ("file too large / disk full" when the disk,
            a quota or the file-size limit stopped it); ``path`` is unchanged.
    """
    with atomic_open(path, "wb") as handle:
        writer(handle)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- reading torch files
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
# largest non-zip file scanned for globals (legacy torch files keep their pickles first)
_SCAN_LIMIT = 64 << 20


def _globals_in_pickle(stream: IO[bytes]) -> set[str]:
    """``module.name`` of every global one pickle in ``stream`` imports (static scan).

    Raises:
        ValueError: the bytes are not one complete pickle (unknown opcode, cut short).
    """
    found: set[str] = set()
    strings: list[str | None] = []  # strings pushed so far (module and name of STACK_GLOBAL)
    memo: dict[int, str | None] = {}
    top_is_string = False
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.add(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL":
            mod, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
            found.add(f"{mod}.{attr}" if mod and attr else "<unknown global>")
        if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):  # the stack is unchanged
            key = len(memo) if name == "MEMOIZE" else int(arg)
            memo[key] = strings[-1] if top_is_string else None
            continue
        top_is_string = False
        if name in _STRING_OPS:
            strings.append(str(arg))
            top_is_string = True
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(int(arg))
            if value is not None:
                strings.append(value)
                top_is_string = True
    return found


def _allowed_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler as unpickler

        allowed = set(unpickler._get_allowed_globals())
        allowed |= set(unpickler._get_user_allowed_globals())
        return allowed
    except Exception:  # private API moved: be conservative, only the basics are safe
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}


def unsafe_pickle_globals(path: str | Path) -> list[str] | None:
    """Why ``torch.load(weights_only=True)`` would refuse ``path``, found without loading it.

    Returns:
        The Python globals (``module.name``) the file's pickle imports that
        weights-only loading does not allow: a non-empty list means a real
        pickle with objects that would run code ("refused for safety"). ``[]``
        for a well-formed file without such globals, and ``None`` when the file
        is not a readable torch or pickle file at all (corrupt, truncated,
        random bytes, another format).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            if zipfile.is_zipfile(handle):
                import torch

                try:
                    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
                except Exception:
                    return None
            handle.seek(0)
            data = handle.read(_SCAN_LIMIT)
    except OSError:
        return None
    if not data.startswith(b"\x80"):  # pickles of protocol >= 2 (all torch files) start so
        return None
    stream = io.BytesIO(data)
    found: set[str] = set()
    # a legacy torch file is several pickles in a row (magic, version, info, object)
    for index in range(4):
        if stream.tell() >= len(data) or data[stream.tell() : stream.tell() + 1] != b"\x80":
            break
        try:
            found |= _globals_in_pickle(stream)
        except Exception:
            if index == 0:
                return None
            break
    return sorted(found - _allowed_globals())
