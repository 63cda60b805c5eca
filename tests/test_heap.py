"""lpdseg.heap: freed blocks stay in the heap for reuse (glibc), the user's settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lpdseg import heap

pytestmark = pytest.mark.skipif(
    heap._function("mallopt") is None or heap._function("mallinfo2") is None,
    reason="glibc's mallopt and mallinfo2 only",
)

# A 40 MiB block (a batch's larger activations are of this size): above glibc's
# largest dynamic mmap threshold (32 MiB), so by default it is a fresh mapping,
# returned to the OS when freed and zero-filled again on the next batch.
_SCRIPT = """
import ctypes, sys
import numpy as np
from lpdseg.heap import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
a = np.ones(5 * 2**20); del a  # 40 MiB, freed
free_after_first = mallinfo2().fordblks
arena = mallinfo2().arena
a = np.ones(5 * 2**20); del a
print(applied, free_after_first >> 20, (mallinfo2().arena - arena) >> 20)
"""


def _run(mode: str, **env: str) -> tuple[str, int, int]:
    clean = {k: v for k, v in os.environ.items() if k not in heap._USER_SETTINGS}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **env},
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_freed_blocks_stay_in_the_heap_and_are_reused():
    applied, free_mib, grown_mib = _run("keep")
    assert applied == "True"
    assert free_mib >= 40  # the freed block is kept in the heap ...
    assert grown_mib == 0  # ... and the next one reuses it (the heap did not grow)
    _, free_default, _ = _run("default")
    assert free_default < 40  # glibc's default: unmapped on free, faulted in anew


def test_the_users_malloc_settings_are_left_alone():
    applied, free_mib, _ = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    assert free_mib < 40
