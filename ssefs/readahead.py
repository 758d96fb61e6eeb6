"""Per-handle read-ahead: how many blocks a read should fetch at once.

A reader that keeps asking for the byte after the last one it got is reading
sequentially; for it one ranged GET fetches a window of blocks larger than the
kernel's 128 KiB request, starting at one block (1 MiB) and doubling up to 8,
so a sequential read costs one request per window instead of one per kernel
request. Any jump resets the window to one block, so random reads fetch only
the block they touch. Fetched blocks go to the cache, whose size bound also
bounds read-ahead memory and disk.
"""

from __future__ import annotations

# 1 MiB is where a GET's fixed cost (a round trip, TLS record setup, the
# server's lookup) stops dominating; 8 MiB keeps a window's memory small while
# already giving a single stream most of a loopback server's throughput.
MIN_WINDOW_BLOCKS = 1
MAX_WINDOW_BLOCKS = 8


class SequentialReader:
    """Tracks one handle's access pattern."""

    def __init__(self) -> None:
        self._next_offset = 0
        self._window = MIN_WINDOW_BLOCKS

    def blocks_ahead(self, offset: int, size: int) -> int:
        """How many blocks to fetch if this read misses the cache."""
        if offset == self._next_offset:
            self._window = min(self._window * 2, MAX_WINDOW_BLOCKS) if offset else MIN_WINDOW_BLOCKS
        else:
            self._window = MIN_WINDOW_BLOCKS
        self._next_offset = offset + size
        return self._window
