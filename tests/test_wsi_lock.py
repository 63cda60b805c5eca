"""wsi.lock: one run per output folder; stale locks taken over; released on error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from lpdseg.wsi.lock import LOCK_NAME, OutputLock, OutputLockedError, pid_alive


def dead_pid() -> int:
    """The pid of a process that has already exited."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(proc.stdout)
    assert not pid_alive(pid)
    return pid


def test_lock_is_exclusive_holds_pid_and_is_released(tmp_path):
    out = tmp_path / "a" / "out"
    lock = OutputLock(out).acquire()
    assert lock.held and lock.created_folder and out.is_dir()
    assert lock.path == out / LOCK_NAME
    pid, host = lock.path.read_text().split()
    assert int(pid) == os.getpid() and host == socket.gethostname()
    with pytest.raises(OutputLockedError) as err:
        OutputLock(out).acquire()
    msg = str(err.value)
    assert str(out) in msg and str(lock.path) in msg and f"pid {os.getpid()}" in msg
    assert err.value.folder == out and err.value.lock_path == lock.path
    lock.release()
    assert not lock.path.exists() and not lock.held
    lock.release()  # twice is harmless
    with OutputLock(out) as again:  # free again
        assert again.held
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(f"{pid} {socket.gethostname()}\n")
    with OutputLock(tmp_path) as lock:
        assert lock.path.read_text().split()[0] == str(os.getpid())
    assert f"pid {pid} is not running" in caplog.text and "stale lock" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()
    assert not list(tmp_path.glob(f"{LOCK_NAME}.stale-*"))  # nothing left aside


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()} some-other-host.example\n")
    with pytest.raises(OutputLockedError, match="on some-other-host.example"):
        OutputLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()  # left alone


def test_unreadable_lock_is_held_while_fresh_and_stale_when_old(tmp_path, caplog):
    path = tmp_path / LOCK_NAME
    path.write_text("")  # an owner that has not written its pid yet
    with pytest.raises(OutputLockedError, match="unknown owner"):
        OutputLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    with OutputLock(tmp_path) as lock:
        assert lock.held
    assert "it holds no pid" in caplog.text


def test_lock_released_and_new_folder_removed_on_error(tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="boom"), OutputLock(out):
        raise RuntimeError("boom")
    assert not out.exists()  # created by the lock, nothing written: removed again
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(RuntimeError, match="boom"), OutputLock(existing):
        raise RuntimeError("boom")
    assert existing.is_dir() and not (existing / LOCK_NAME).exists()


def test_release_leaves_a_lock_taken_over_by_someone_else(tmp_path, caplog):
    lock = OutputLock(tmp_path).acquire()
    lock.path.write_text(f"{os.getpid() + 1} {socket.gethostname()}\n")  # not ours any more
    lock.release()
    assert lock.path.exists() and "taken over" in caplog.text
