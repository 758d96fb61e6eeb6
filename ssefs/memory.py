"""How the daemon uses the C library's allocator (glibc's malloc).

While busy, the blocks and parts ssefs moves (1-32 MiB buffers) are served
from malloc's heap rather than mapped afresh for each one: by default glibc
maps every such buffer and unmaps it when freed, and the page faults, zeroed
pages and TLB flushes across the daemon's threads cost a GiB written 1-2 s of
system CPU (``docs/benchmarks.md``). The price is freed heap kept resident, so
once the daemon has been idle for a few seconds after a busy spell it hands
the free pages back to the kernel (``malloc_trim``): a mount that sits idle
after a large copy does not keep what the copy needed. Without glibc (no
``mallopt``/``malloc_trim``) nothing here does anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

# glibc mallopt parameters, and the values set (see keep_large_buffers_in_the_heap).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
# The daemon counts as idle over an interval in which it used less than this share of one core.
IDLE_CHECK_SECONDS = 5.0
IDLE_CPU_SHARE = 0.02


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_large_buffers_in_the_heap() -> bool:
    """Have malloc serve blocks and parts (1-32 MiB) from its heap, keeping up to 64 MiB free there.

    Measured: 3.5-5.5 s of system CPU per GiB written by default, against 2.3-3.6 s with this (1 GiB
    written until durable: 0.60-0.77 of boto3's multipart upload against 0.70-0.82, five alternating
    pairs). The suite's RSS peak went from 158-164 to 185-193 MiB. Keeping only 16 or 32 MiB brought
    the page faults of ``tests/test_malloc.py``'s churn back to the default's. Returns whether it was set.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt answers 1 on success.
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1


def give_back_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the kernel; whether it could."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True


async def give_back_memory_when_idle(
    check_every: float = IDLE_CHECK_SECONDS, *, cpu_seconds: Callable[[], float] = time.process_time,
    trim: Callable[[], bool] = give_back_freed_memory,
) -> None:
    """Run for the life of the mount: after each busy spell, once an interval passes with the process
    nearly idle, give the freed memory back (a trim walks the arenas: milliseconds, so once per spell)."""
    busy_since_trim = True
    used_before = cpu_seconds()
    while True:
        await trio.sleep(check_every)
        used = cpu_seconds()
        idle = used - used_before < check_every * IDLE_CPU_SHARE
        if not idle:
            busy_since_trim = True
        elif busy_since_trim:
            busy_since_trim = False
            trim()
            log.debug("idle: freed memory given back to the kernel")
            used = cpu_seconds()  # the trim itself is not activity
        used_before = used
