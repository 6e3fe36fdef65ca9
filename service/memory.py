"""Giving freed heap memory back to the OS while serving.

Under a long mixed load the process's RSS kept growing although Python-level memory did not (docs/reliability.md):
glibc's malloc raises its mmap threshold as large blocks are freed, so later tensors come from the heap, and a heap
returns memory to the OS only from its top. `malloc_trim(0)` also releases the free pages inside the heaps of every
arena (glibc >= 2.8, with madvise). The scheduler's worker calls `maybe_trim()` between steps; it trims at most
once per `every_s` seconds. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger(__name__)


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    def __init__(self, every_s: float):
        self.every_s = every_s
        self._trim = _malloc_trim() if every_s > 0 else None
        self._next = time.monotonic() + every_s
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> None:
        if self._trim is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._trim(0)
            self.trims += 1
            self._next = now + self.every_s
