"""The daemon's malloc setting (``memory.keep_large_buffers_in_the_heap``), measured in fresh processes:
the buffers ssefs churns through (1 MiB blocks made in worker threads, joined into 8 MiB parts on the
main thread, a few alive at once) stop costing a page fault per page each time."""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
from typing import Any

import trio

from ssefs.memory import give_back_memory_when_idle

PROBE = """
import queue, resource, sys, threading
from ssefs.memory import keep_large_buffers_in_the_heap
if sys.argv[1] == "tuned":
    assert keep_large_buffers_in_the_heap()
MiB = 1 << 20

def churn():
    made = queue.Queue()
    def seal():
        for _ in range(64):
            made.put(b"x" * MiB)
    workers = [threading.Thread(target=seal) for _ in range(2)]
    for worker in workers:
        worker.start()
    parts, pieces = [], []
    for _ in range(128):
        pieces.append(made.get())
        if len(pieces) == 8:
            parts.append(b"".join(pieces))
            pieces = []
            if len(parts) > 3:
                parts.pop(0)
    for worker in workers:
        worker.join()

churn()  # the first round grows the heap either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout)


def test_large_buffers_are_reused_from_the_heap_instead_of_mapped_afresh() -> None:
    # Medians of three (threads land on malloc arenas differently from run to run): 128 MiB through
    # glibc's defaults faulted in 26,000-35,000 pages here, 4,900-16,000 with the setting (mostly 6,000-8,000).
    default = statistics.median(page_faults("default") for _ in range(3))
    tuned = statistics.median(page_faults("tuned") for _ in range(3))
    assert tuned < default / 2, (tuned, default)


TRIM_PROBE = """
import threading
from ssefs.memory import give_back_freed_memory, keep_large_buffers_in_the_heap
assert keep_large_buffers_in_the_heap()
MiB = 1 << 20

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

def hold_and_free():
    held = [b"x" * MiB for _ in range(48)]  # 48 MiB alive at once, then freed: below the trim threshold
    del held

workers = [threading.Thread(target=hold_and_free) for _ in range(2)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
hold_and_free()
before = rss()
assert give_back_freed_memory()
print(before, rss())
"""


def test_freed_memory_kept_in_the_heap_goes_back_to_the_kernel_when_given_back() -> None:
    done = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=60, check=True)
    before, after = (int(value) for value in done.stdout.split())
    assert before - after >= 32 * 1024 * 1024, (before, after)  # 48 MiB here (168 -> 120 MiB)


async def test_memory_is_given_back_once_per_busy_spell_when_the_daemon_goes_idle(autojump_clock: Any) -> None:
    started = trio.current_time()
    clock = {"cpu": 0.0}
    # CPU seconds the process uses in each 5 s interval: busy, busy, idle, idle, busy, idle.
    spent = iter([2.0, 1.5, 0.01, 0.0, 3.0, 0.02])
    trims: list[float] = []

    def cpu_seconds() -> float:
        return clock["cpu"]

    def trim() -> bool:
        trims.append(trio.current_time())
        return True

    async def use_cpu() -> None:
        for seconds in spent:
            await trio.sleep(5.0)
            clock["cpu"] += seconds

    with trio.move_on_after(31.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(use_cpu)
            await trio.sleep(0.5)  # each check sees the interval's CPU already spent
            nursery.start_soon(functools.partial(give_back_memory_when_idle, 5.0, cpu_seconds=cpu_seconds,
                                                 trim=trim))
    # Checks at 5.5, 10.5, ... s: trimmed at the first idle one after each busy spell, not at the second.
    assert [round(moment - started, 1) for moment in trims] == [15.5, 30.5]
