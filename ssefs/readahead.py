"""Per-handle read-ahead for objects read straight from S3.

A reader that keeps asking for the byte after the last one it got is reading
sequentially; for it one ranged GET fetches a window larger than the kernel's
128 KiB request, starting at 1 MiB and doubling up to 8 MiB, so a sequential
read costs one request per window instead of one per kernel request. Any jump
resets the window and reads fetch only what was asked. Memory is bounded by one
window per open handle. The buffer is tagged with the file's generation: a
change made through this mount discards it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

MiB = 1024 * 1024
# 1 MiB is where a GET's fixed cost (a round trip, TLS record setup, the
# server's lookup) stops dominating; 8 MiB keeps a handle's memory small while
# already giving a single stream most of a loopback server's throughput.
MIN_WINDOW = 1 * MiB
MAX_WINDOW = 8 * MiB

Fetch = Callable[[int, int], Awaitable[bytes]]


class SequentialReader:
    """Serves reads from a window fetched ahead while access is sequential."""

    def __init__(self) -> None:
        self._buffer = b""
        self._buffer_offset = 0
        self._buffer_generation = -1
        self._reached_end = False
        self._next_offset = 0
        self._window = MIN_WINDOW

    def _cached(self, offset: int, size: int, generation: int) -> bytes | None:
        if generation != self._buffer_generation:
            return None
        start = offset - self._buffer_offset
        end = start + size
        if start < 0 or start > len(self._buffer):
            return None
        if end <= len(self._buffer) or self._reached_end:
            return self._buffer[start:end]
        return None

    async def read(self, offset: int, size: int, generation: int, fetch: Fetch) -> bytes:
        cached = self._cached(offset, size, generation)
        sequential = offset == self._next_offset
        self._next_offset = offset + size
        if cached is not None:
            return cached
        if not sequential:
            self._window = MIN_WINDOW
            return await fetch(offset, size)
        length = max(size, self._window)
        data = await fetch(offset, length)
        self._buffer, self._buffer_offset, self._buffer_generation = data, offset, generation
        self._reached_end = len(data) < length
        self._window = min(self._window * 2, MAX_WINDOW)
        return data[:size]
