"""Per-handle read-ahead: how many blocks a read should fetch at once.

A reader that keeps asking for the byte after the last one it got is reading
sequentially; for it the filesystem fetches a window of blocks ahead in the
background (several GETs in flight), starting at one block (1 MiB) and
doubling up to 32. Any jump resets the window to one block, so random reads
fetch only the block they touch.
"""

from __future__ import annotations

# Start at one block (a random reader pays for no more); double while the
# reader stays sequential, up to 32 MiB ahead: enough for three parallel 8 MiB
# read-ahead GETs to keep the line busy, and what the filesystem's 40 blocks in
# memory leave for blocks fetched ahead (``cachedfile.BLOCKS_FOR_READING``): a
# streamed file's blocks live only there until read, so one sequential reader
# gets its whole window, and several share that room.
MIN_WINDOW_BLOCKS = 1
MAX_WINDOW_BLOCKS = 32
# The kernel's own read-ahead sends several requests at once, and they may
# arrive out of order: a read this close to where the last one ended still
# counts as sequential.
SEQUENTIAL_SLACK = 1024 * 1024


class SequentialReader:
    """Tracks one handle's access pattern."""

    def __init__(self) -> None:
        self._next_offset = 0
        self._window = MIN_WINDOW_BLOCKS

    def blocks_ahead(self, offset: int, size: int) -> int:
        """How many blocks, starting with the one at ``offset``, to have fetched ahead."""
        if offset == 0 and self._next_offset == 0:
            self._window = MIN_WINDOW_BLOCKS
        elif abs(offset - self._next_offset) <= SEQUENTIAL_SLACK:
            self._window = min(self._window * 2, MAX_WINDOW_BLOCKS)
        else:
            self._window = MIN_WINDOW_BLOCKS
        self._next_offset = max(self._next_offset, offset + size) if self._window > 1 else offset + size
        return self._window
