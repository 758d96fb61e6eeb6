"""Byte-level reads and writes of one cache entry.

``CachedFile`` turns offsets into blocks: a block comes from the one "hot"
block kept in memory while a file is being written (so sequential writes seal
each block once, not once per ``write()``), else from the cache, else, inside
``base_valid``, from the S3 object the entry is based on (one ranged GET, stored
as a clean block), else it is zeros. A partial write into a block not yet cached
fetches just that block; a write covering a whole block fetches nothing.

Callers hold ``entry.lock`` around writes, truncates and uploads; reads may
run beside them, which is why a fetched block is stored only if nothing wrote
that block while the GET was in flight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .cache import BLOCK_SIZE, BlockCache, Entry

FetchRange = Callable[[str, int, int], Awaitable[bytes]]


class CachedFile:
    """Reads and writes over one entry's blocks."""

    def __init__(self, cache: BlockCache, entry: Entry, fetch_range: FetchRange) -> None:
        self.cache = cache
        self.entry = entry
        self._fetch_range = fetch_range
        self._hot_index: int | None = None
        self._hot = bytearray()

    # ------------------------------------------------------------------ blocks

    async def _store(self, index: int, plaintext: bytes, *, dirty: bool) -> None:
        # Never waits: callers hold the entry lock, which an upload that would
        # free space needs. Writers wait for space before taking the lock.
        self.cache.evict_clean(BLOCK_SIZE)
        self.cache.write_block(self.entry, index, plaintext, dirty=dirty)
        await trio.lowlevel.checkpoint()

    async def _fetch_blocks(self, first: int, count: int, *, keep: bool) -> list[bytes]:
        """Blocks ``first .. first+count-1`` from the base object (zeros past ``base_valid``)."""
        entry = self.entry
        start = first * BLOCK_SIZE
        available = max(0, min(count * BLOCK_SIZE, entry.base_valid - start))
        data = b""
        generation = entry.generation
        if available and entry.base_key is not None:
            data = await self._fetch_range(entry.base_key, start, available)
        # A write or truncate while the GET was in flight may have changed these blocks.
        unchanged = entry.generation == generation
        data = data[:available]
        blocks = []
        for number in range(count):
            block = data[number * BLOCK_SIZE:(number + 1) * BLOCK_SIZE]
            block += bytes(BLOCK_SIZE - len(block))
            index = first + number
            # Store only if no write landed in this block while the GET was in flight.
            fetched = available > number * BLOCK_SIZE
            untouched = not self.cache.has_block(entry, index) and index != self._hot_index
            if keep and fetched and untouched and unchanged and self.cache.is_live(entry):
                await self._store(index, block, dirty=False)
            blocks.append(block)
        return blocks

    async def _block(self, index: int, *, keep: bool = True, readahead: int = 1) -> bytes:
        if index == self._hot_index:
            return bytes(self._hot)
        stored = self.cache.read_block(self.entry, index)
        if stored is not None:
            return stored
        if index * BLOCK_SIZE >= self.entry.base_valid:
            return bytes(BLOCK_SIZE)
        return (await self._fetch_blocks(index, max(1, readahead), keep=keep))[0]

    async def _make_hot(self, index: int, *, overwrite_whole: bool) -> bytearray:
        if self._hot_index != index:
            await self.seal_hot()
            content = bytes(BLOCK_SIZE) if overwrite_whole else await self._block(index, keep=False)
            self._hot = bytearray(content)
            self._hot_index = index
        return self._hot

    async def seal_hot(self) -> None:
        """Write the hot block to the cache (dirty); before sync, upload or switching blocks."""
        if self._hot_index is None:
            return
        index, content = self._hot_index, bytes(self._hot)
        self._hot_index, self._hot = None, bytearray()
        await self._store(index, content, dirty=True)

    # ------------------------------------------------------------------ bytes

    async def read(self, offset: int, size: int, *, keep: bool = True, readahead_blocks: int = 1) -> bytes:
        end = min(offset + size, self.entry.size)
        pieces: list[bytes] = []
        position = offset
        while position < end:
            index, within = divmod(position, BLOCK_SIZE)
            count = min(end - position, BLOCK_SIZE - within)
            block = await self._block(index, keep=keep, readahead=readahead_blocks)
            pieces.append(block[within:within + count])
            position += count
        return b"".join(pieces)

    async def write(self, offset: int, data: bytes) -> int:
        if not data:
            return 0
        # Count the change first: blocks sealed while this write moves across
        # blocks must carry the new generation, or they would count as clean.
        self.cache.record_change(self.entry)
        view = memoryview(data)
        position = offset
        while view:
            index, within = divmod(position, BLOCK_SIZE)
            count = min(len(view), BLOCK_SIZE - within)
            whole = within == 0 and count == BLOCK_SIZE
            hot = await self._make_hot(index, overwrite_whole=whole)
            hot[within:within + count] = view[:count]
            view = view[count:]
            position += count
            # Per block, so the size saved when this block is sealed already covers it.
            self.entry.size = max(self.entry.size, position)
        return len(data)

    async def truncate(self, size: int) -> None:
        self.cache.record_change(self.entry)
        if self._hot_index is not None and self._hot_index * BLOCK_SIZE >= size:
            self._hot_index, self._hot = None, bytearray()
        within = size % BLOCK_SIZE
        if size < self.entry.size and within:
            # Zero the tail of the last kept block so a later extension reads zeros.
            hot = await self._make_hot(size // BLOCK_SIZE, overwrite_whole=False)
            hot[within:] = bytes(BLOCK_SIZE - within)
        self.cache.truncate(self.entry, size)
        self.entry.size = size
