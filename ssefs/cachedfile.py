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

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from .cache import BLOCK_SIZE, BlockCache, Entry

FetchRange = Callable[[str, int, int], Awaitable[bytes]]

log = logging.getLogger(__name__)

# Read-ahead GETs of 2 MiB, up to 16 blocks in flight per file: several GETs at
# once are what gets a single reader near the server's parallel throughput.
PREFETCH_BLOCKS_PER_GET = 2
MAX_PREFETCH_IN_FLIGHT = 16


class PlaintextBlocks:
    """Recently decrypted or fetched blocks in memory, shared by all files, least-recently-used out.

    The kernel reads 128 KiB at a time, so one remembered block serves eight
    reads without decrypting it again, and a block fetched ahead is served
    without a round trip through the disk. Each copy is tagged with the entry
    generation it is valid for. The shared bound keeps memory fixed however
    many files are open.
    """

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[tuple[bytes, int], tuple[int, bytes]] = OrderedDict()

    def get(self, uid: bytes, index: int, generation: int) -> bytes | None:
        found = self._blocks.get((uid, index))
        if found is None or found[0] != generation:
            return None
        self._blocks.move_to_end((uid, index))
        return found[1]

    def put(self, uid: bytes, index: int, generation: int, plaintext: bytes) -> None:
        self._blocks[(uid, index)] = (generation, plaintext)
        self._blocks.move_to_end((uid, index))
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def forget(self, uid: bytes, index: int) -> None:
        self._blocks.pop((uid, index), None)


class CachedFile:
    """Reads and writes over one entry's blocks."""

    def __init__(
        self, cache: BlockCache, entry: Entry, fetch_range: FetchRange,
        plaintext_blocks: PlaintextBlocks | None = None,
    ) -> None:
        self.cache = cache
        self.entry = entry
        self._fetch_range = fetch_range
        self._hot_index: int | None = None
        self._hot = bytearray()
        # Blocks being fetched ahead, and an event set when each fetch ends (however it ends).
        self._inflight: dict[int, trio.Event] = {}
        # Without a shared store (tests), a private one of two blocks.
        self._plaintext = plaintext_blocks if plaintext_blocks is not None else PlaintextBlocks(max_blocks=2)

    # ------------------------------------------------------------------ blocks

    async def _store(self, index: int, plaintext: bytes, *, dirty: bool) -> None:
        # Never waits: callers hold the entry lock, which an upload that would
        # free space needs. Writers wait for space before taking the lock.
        self.cache.evict_clean(BLOCK_SIZE, storing_for=self.entry)
        self.cache.write_block(self.entry, index, plaintext, dirty=dirty)
        self._forget_plaintext(index)
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
                self._plaintext.put(entry.uid, index, generation, block)
            blocks.append(block)
        return blocks

    async def _block(self, index: int, *, keep: bool = True) -> bytes:
        if index == self._hot_index:
            return bytes(self._hot)
        fetching = self._inflight.get(index)
        if fetching is not None:
            await fetching.wait()
        remembered = self._plaintext.get(self.entry.uid, index, self.entry.generation)
        if remembered is not None:
            return remembered
        stored = self.cache.read_block(self.entry, index)
        if stored is not None:
            self._plaintext.put(self.entry.uid, index, self.entry.generation, stored)
            return stored
        if index * BLOCK_SIZE >= self.entry.base_valid:
            return bytes(BLOCK_SIZE)
        # Read-ahead is prefetch()'s job; a miss here fetches just this block.
        return (await self._fetch_blocks(index, 1, keep=keep))[0]

    async def _make_hot(self, index: int, *, overwrite_whole: bool) -> bytearray:
        if self._hot_index != index:
            await self.seal_hot()
            content = bytes(BLOCK_SIZE) if overwrite_whole else await self._block(index, keep=False)
            self._hot = bytearray(content)
            self._hot_index = index
            self._forget_plaintext(index)
        return self._hot

    def _forget_plaintext(self, index: int) -> None:
        """The block is about to change within this generation: drop in-memory copies of it."""
        self._plaintext.forget(self.entry.uid, index)

    async def seal_hot(self) -> None:
        """Write the hot block to the cache (dirty); before sync, upload or switching blocks."""
        if self._hot_index is None:
            return
        index, content = self._hot_index, bytes(self._hot)
        self._hot_index, self._hot = None, bytearray()
        await self._store(index, content, dirty=True)

    def prefetch(self, first: int, count: int, nursery: trio.Nursery) -> None:
        """Start fetching blocks ``first..first+count-1`` in the background, several GETs at once.

        Blocks already cached, being fetched, or past ``base_valid`` are skipped;
        at most ``MAX_PREFETCH_IN_FLIGHT`` blocks per file are in flight.
        """
        end = min(first + count, (self.entry.base_valid + BLOCK_SIZE - 1) // BLOCK_SIZE)
        index = first
        while index < end and len(self._inflight) < MAX_PREFETCH_IN_FLIGHT:
            if self.cache.has_block(self.entry, index) or index in self._inflight or index == self._hot_index:
                index += 1
                continue
            run = 1
            while (run < PREFETCH_BLOCKS_PER_GET and index + run < end and index + run not in self._inflight
                   and not self.cache.has_block(self.entry, index + run)):
                run += 1
            events = {number: trio.Event() for number in range(index, index + run)}
            self._inflight.update(events)
            nursery.start_soon(self._prefetch_run, index, run, events)
            index += run

    async def _prefetch_run(self, first: int, count: int, events: dict[int, trio.Event]) -> None:
        try:
            await self._fetch_blocks(first, count, keep=True)
        except Exception as error:  # noqa: BLE001 - a failed prefetch only means the read fetches itself
            log.debug("prefetch of blocks %d+%d of %r failed: %s", first, count, self.entry.object_key, error)
        finally:
            for index, event in events.items():
                if self._inflight.get(index) is event:
                    del self._inflight[index]
                event.set()

    # ------------------------------------------------------------------ bytes

    async def read(self, offset: int, size: int, *, keep: bool = True) -> bytes:
        end = min(offset + size, self.entry.size)
        pieces: list[bytes] = []
        position = offset
        while position < end:
            index, within = divmod(position, BLOCK_SIZE)
            count = min(end - position, BLOCK_SIZE - within)
            block = await self._block(index, keep=keep)
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
