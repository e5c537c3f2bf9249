"""Stop glibc from handing XLA's per-step scratch memory back to the OS (Linux CPU runs).

Why: XLA's CPU runtime allocates one temporary buffer per executable run (936 MB for a paper-size
training step at batch 64) with ``posix_memalign`` on one of its worker threads. A request that large
does not fit a per-thread glibc arena, so glibc serves it with a fresh ``mmap`` and unmaps it at
``free``: every step then touches ~230,000 new pages, each a page fault plus a zeroed page. Measured
on the 2-core VM (``ru_minflt`` / ``ru_stime`` around one step): 230k faults and 0.7-0.9 s of
system time per step, ~20% of the step's CPU time.

:func:`keep_freed_memory` sets, through ``mallopt``: a single arena (so every thread allocates from the
main heap, which can grow with ``brk`` past 64 MB), no ``mmap`` for large blocks, no trimming of the
heap top, and a 1 GiB top pad. Freed scratch memory then stays mapped and the next step reuses it
without a fault. The heap first grows for a few steps (a freed block is often just too small for the
next request with its alignment padding, so that one goes above it) and then nearly every step faults
nothing; an occasional step still gets fresh pages. Measured with ``benchmarks/train_step.py``
(``--default_malloc`` for the comparison): paper size, batch 64: 323k faults and ~2.5 s per step
before, ~22k faults on average over 10 steps and ~2.0-2.2 s after; tiny preset, batch 128: 21.7k
faults and 174-177 ms before, 1.8k-2.9k faults and 123-138 ms after. The cost is that the process
keeps its peak heap size; nothing is returned to the OS until exit.

It must run before JAX starts its CPU thread pools (before the first computation), because a thread
keeps the arena it got at its first allocation. The launchers and ``benchmarks/train_step.py`` call it
first thing; in a notebook call it before anything touches a device. Set
``SAFETY_MECH_KEEP_FREED_MEMORY=0`` to leave the allocator alone. Elsewhere than glibc (macOS, musl)
it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_INT_MAX = 2**31 - 1
ENV_SWITCH = "SAFETY_MECH_KEEP_FREED_MEMORY"

_applied = False


def keep_freed_memory(top_pad_bytes: int = 1 << 30) -> bool:
    """Configure glibc malloc as described in the module docstring; True if it was applied (now or by an
    earlier call), False where it does not apply (not Linux/glibc, or switched off by the env var)."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX),
                (_M_TOP_PAD, min(int(top_pad_bytes), _INT_MAX)))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)  # mallopt returns 1 on success
    return _applied
