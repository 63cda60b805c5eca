"""A lock file that keeps two runs from writing into the same output folder at once.

``OutputLock(folder)`` creates ``folder/.lpdseg.lock`` with
``O_CREAT | O_EXCL`` (atomic: only one process can create it) holding the
owner's pid and host name, and deletes it on release - also when the run
fails. A second run finds the file and stops with ``OutputLockedError``,
naming the folder, the lock file and its owner. A lock whose owner is no
longer running on this host (the run was killed) is stale: it is taken over
with a warning.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from lpdseg.errors import LpdsegError

log = logging.getLogger(__name__)

#: Name of the lock file inside the output folder.
LOCK_NAME = ".lpdseg.lock"
# An unreadable lock file younger than this may be one whose owner is still
# writing its pid; older, it is taken as stale.
_UNREADABLE_GRACE_S = 30.0
_TAKEOVER_ATTEMPTS = 5


class OutputLockedError(LpdsegError):
    """Another live run holds the output folder's lock file.

    Attributes:
        folder: the output folder.
        lock_path: the lock file.
        owner: ``"pid N on HOST"`` as written by the holder (or ``"unknown"``).
    """

    def __init__(self, folder: Path, lock_path: Path, owner: str) -> None:
        self.folder, self.lock_path, self.owner = folder, lock_path, owner
        super().__init__(
            f"output folder {folder} is in use by another run ({owner}): lock file "
            f"{lock_path} exists; wait for that run to finish or write elsewhere (delete "
            "the lock file only if no such run is alive)"
        )


def _read_owner(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in a lock file, or None when unreadable or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    parts = text.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (``kill(pid, 0)``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


class OutputLock:
    """Exclusive lock on an output folder (a context manager).

    Args:
        folder: the output folder; created (with parents) on ``acquire``.

    Attributes:
        path: the lock file, ``folder / LOCK_NAME``.
        created_folder: ``acquire`` created the folder (so an empty one can be
            removed again on failure).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.created_folder = False
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._held

    def acquire(self) -> OutputLock:
        """Create the lock file, taking over a stale one.

        Raises:
            OutputLockedError: a live process holds the lock.
            OSError: the folder cannot be created or written.
        """
        if self._held:
            return self
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created_folder = True
        me = f"{os.getpid()} {socket.gethostname()}\n".encode()
        for _ in range(_TAKEOVER_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
            self._held = True
            return self
        owner = _read_owner(self.path)
        raise OutputLockedError(self.folder, self.path, _describe(owner))

    def _clear_if_stale(self) -> None:
        """Remove the existing lock file if its owner is gone; raise if it is alive."""
        owner = _read_owner(self.path)
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return  # released meanwhile: try again
            if age < _UNREADABLE_GRACE_S:
                raise OutputLockedError(self.folder, self.path, "unknown owner")
            reason = "it holds no pid"
        else:
            pid, host = owner
            if host != socket.gethostname():
                # A pid of another machine cannot be checked from here.
                raise OutputLockedError(self.folder, self.path, _describe(owner))
            if pid_alive(pid):
                raise OutputLockedError(self.folder, self.path, _describe(owner))
            reason = f"pid {pid} is not running"
        log.warning("taking over the stale lock file %s (%s)", self.path, reason)
        # Move it aside first, then check that what was moved is still the stale
        # file: a third process may have taken over between the read and the move.
        grave = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        if _read_owner(grave) != owner:
            try:  # a fresh lock of someone else: put it back
                os.link(grave, self.path)
            except OSError:
                pass
        grave.unlink(missing_ok=True)

    def release(self) -> None:
        """Delete the lock file (if this object holds it)."""
        if not self._held:
            return
        self._held = False
        owner = _read_owner(self.path)
        if owner is not None and owner[0] != os.getpid():
            log.warning("lock file %s was taken over by %s; leaving it", self.path, owner)
            return
        self.path.unlink(missing_ok=True)

    def remove_folder_if_empty(self) -> None:
        """Remove the folder again when ``acquire`` created it and nothing was written."""
        if self.created_folder and not self._held:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if exc_type is not None:
            self.remove_folder_if_empty()


def _describe(owner: tuple[int, str] | None) -> str:
    return "unknown owner" if owner is None else f"pid {owner[0]} on {owner[1]}"
