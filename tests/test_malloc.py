"""The daemon's malloc setting (``mount.keep_large_buffers_in_the_heap``), measured in fresh processes:
the buffers ssefs churns through (1 MiB blocks made in worker threads, joined into 8 MiB parts on the
main thread, a few alive at once) stop costing a page fault per page each time."""

from __future__ import annotations

import statistics
import subprocess
import sys

PROBE = """
import queue, resource, sys, threading
from ssefs.mount import keep_large_buffers_in_the_heap
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
