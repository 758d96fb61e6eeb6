"""Byte-level reads and writes of one cache entry.

``CachedFile`` turns offsets into blocks: a block comes from the one "hot"
block kept in memory while a file is being written (so sequential writes seal
each block once, not once per ``write()``), else from the cache, else, inside
``base_valid``, from the S3 object the entry is based on (one ranged GET), else
it is zeros. A partial write into a block not yet cached fetches just that
block; a write covering a whole block fetches nothing. In memory a block is
kept without its trailing zeros (as the disk cache stores it, and as the last
block of an object arrives): a small file costs a few KiB, not 1 MiB, and
``read`` puts the zeros back.

Which fetched blocks go to the disk cache: blocks a read asks for one at a
time (random reads, the start of a file) and everything of a small file are
stored there as clean blocks. Blocks read ahead for a sequential reader of a
larger file are a stream: they are kept in memory only, so a big sequential
read neither pays for sealing and writing every block nor pushes out of the
cache what other files put there.

Callers hold ``entry.lock`` around writes, truncates and uploads; reads may
run beside them, which is why a fetched block is kept (on disk or in memory)
only if nothing wrote that block while the GET was in flight.

A writer moving on to the next block does not wait for the previous one to be
sealed and written to disk: given a nursery, that block is sealed in the
background (one at a time) while the next write is already being answered, so
FUSE's work and the disk's overlap on two cores. Everything else that needs the
blocks on disk (``seal_hot``: close, fsync, upload, truncate) first waits for it,
and a background seal that failed is tried once more there, its error reported
to that caller, as a local filesystem reports write-back errors at close.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from .cache import BLOCK_SIZE, BlockCache, Entry
from .errors import SsefsError

# (object key, offset, length) -> those bytes in pieces of BLOCK_SIZE (the last may be shorter).
FetchBlocks = Callable[[str, int, int], Awaitable[list[bytes]]]

log = logging.getLogger(__name__)

# Read-ahead GETs of 8 MiB, aligned to 8 MiB, up to 24 blocks (three GETs) in
# flight per file: several GETs at once are what gets a single reader near the
# server's parallel throughput, and large aligned ranges are what servers serve
# cheaply (SeaweedFS spends 2.6x the CPU on 1 MiB ranges as on 8 MiB ones: it
# decrypts whole stored chunks, which multipart uploads make 8 MiB).
PREFETCH_BLOCKS_PER_GET = 8
MAX_PREFETCH_IN_FLIGHT = 24
# Files up to this size are small: what is read ahead of them goes to the disk
# cache too, so reading one again later needs no GET. Larger files are streamed.
SMALL_FILE_BYTES = PREFETCH_BLOCKS_PER_GET * BLOCK_SIZE
# Of the blocks kept in memory, this many are left for blocks being read
# (decrypted from the disk cache, or read once); the rest may be blocks
# fetched ahead that no one has read yet.
BLOCKS_FOR_READING = 8
# A block fetched ahead and still unread after this long was abandoned (its
# reader closed the file or went elsewhere): it stops holding read-ahead room.
UNREAD_PATIENCE = 10.0

BlockKey = tuple[bytes, int]


class PlaintextBlocks:
    """Recently decrypted or fetched blocks in memory, shared by all files, least-recently-used out.

    The kernel reads 128 KiB at a time, so one remembered block serves eight
    reads without decrypting it again, and a block fetched ahead is served
    without a round trip through the disk. Each copy is tagged with the entry
    generation it is valid for. The shared bound keeps memory fixed however
    many files are open.

    Blocks streamed ahead of a reader live only here until read, so they are
    evicted last (losing one costs a GET), and read-ahead starts a GET only if
    ``room_ahead`` says its blocks fit beside the other unread ones.
    """

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[BlockKey, tuple[int, bytes]] = OrderedDict()
        # Streamed blocks not read yet, with when they arrived, oldest first.
        self._unread: OrderedDict[BlockKey, float] = OrderedDict()
        # Blocks being fetched ahead (all files): they land here soon.
        self.fetching = 0

    def get(self, uid: bytes, index: int, generation: int) -> bytes | None:
        found = self._blocks.get((uid, index))
        if found is None or found[0] != generation:
            return None
        self._blocks.move_to_end((uid, index))
        self._unread.pop((uid, index), None)
        return found[1]

    def holds(self, uid: bytes, index: int, generation: int) -> bool:
        """Whether a copy valid for ``generation`` is here (without counting as a use)."""
        found = self._blocks.get((uid, index))
        return found is not None and found[0] == generation

    def put(self, uid: bytes, index: int, generation: int, plaintext: bytes, *, unread: bool = False) -> None:
        key = (uid, index)
        self._blocks[key] = (generation, plaintext)
        self._blocks.move_to_end(key)
        self._unread.pop(key, None)
        if unread:
            self._unread[key] = time.monotonic()
        while len(self._blocks) > self.max_blocks:
            self._evict_one()

    def forget(self, uid: bytes, index: int) -> None:
        self._blocks.pop((uid, index), None)
        self._unread.pop((uid, index), None)

    def room_ahead(self) -> int:
        """How many more blocks read-ahead may fetch now, beside those unread or in flight."""
        self._expire_unread()
        return self.max_blocks - BLOCKS_FOR_READING - len(self._unread) - self.fetching

    def _evict_one(self) -> None:
        self._expire_unread()
        # Blocks already read go first; unread ones (oldest first) only when nothing else is left.
        victim = next((key for key in self._blocks if key not in self._unread), None)
        if victim is None:
            victim = next(iter(self._blocks))
        del self._blocks[victim]
        self._unread.pop(victim, None)

    def _expire_unread(self) -> None:
        abandoned_before = time.monotonic() - UNREAD_PATIENCE
        while self._unread and next(iter(self._unread.values())) < abandoned_before:
            self._unread.popitem(last=False)


class CachedFile:
    """Reads and writes over one entry's blocks."""

    def __init__(
        self, cache: BlockCache, entry: Entry, fetch_blocks: FetchBlocks,
        plaintext_blocks: PlaintextBlocks | None = None, background: trio.Nursery | None = None,
    ) -> None:
        self.cache = cache
        self.entry = entry
        self._fetch_from_object = fetch_blocks
        # Where blocks a writer left behind are sealed; without one (tests), the writer seals them itself.
        self._background = background
        # The block being sealed in the background, set when that is over (however it ended), and the
        # block it failed to store (still in ``_sealing``) with its error.
        self._sealed_behind: trio.Event | None = None
        self._failed_behind: tuple[int, int, BaseException] | None = None
        self._hot_index: int | None = None
        # Like every block in memory, the hot block may stop short: the rest reads as zeros.
        # A whole block written at once is held as the write's own bytes (no copy) until changed in part.
        self._hot: bytes | bytearray = bytearray()
        # Blocks on their way from the hot block into the cache (as short as the hot block was).
        self._sealing: dict[int, bytes | bytearray] = {}
        # Fetched blocks on their way into the cache, with the generation they were fetched at.
        self._landing: dict[int, tuple[int, bytes]] = {}
        # Blocks being fetched ahead, and an event set when each fetch ends (however it ends).
        self._inflight: dict[int, trio.Event] = {}
        # Without a shared store (tests), a private one of two blocks.
        self._plaintext = plaintext_blocks if plaintext_blocks is not None else PlaintextBlocks(max_blocks=2)

    # ------------------------------------------------------------------ blocks

    async def _store(self, index: int, plaintext: bytes | bytearray, *, dirty: bool,
                     still_wanted: Callable[[], bool] = lambda: True, size_on_disk: int | None = None) -> bool:
        # Never waits for space: callers hold the entry lock, which an upload
        # that would free space needs. Writers wait for space before taking the lock.
        self.cache.evict_clean(BLOCK_SIZE, storing_for=self.entry)
        stored = await self.cache.write_block(self.entry, index, plaintext, dirty=dirty, still_wanted=still_wanted,
                                              size_on_disk=size_on_disk)
        if stored and not dirty:
            # A fetched block stored only if untouched is the block's current
            # content: keep it in memory for the reader that asked for it (this
            # also replaces copies remembered while it was being stored).
            self._plaintext.put(self.entry.uid, index, self.entry.generation, bytes(plaintext))
        elif stored:
            # Written blocks are not kept (a writer rarely reads back); drop older copies.
            self._forget_plaintext(index)
        return stored

    def _untouched(self, index: int, generation: int) -> bool:
        """Nothing wrote block ``index`` since ``generation`` (so a fetched copy of it is current)."""
        return (self.entry.generation == generation and index != self._hot_index and index not in self._sealing
                and not self.cache.has_block(self.entry, index) and self.cache.is_live(self.entry))

    async def _fetch_blocks(self, first: int, count: int, *, keep: bool, to_disk: bool = True,
                            fetched_hook: Callable[[], None] | None = None) -> list[bytes]:
        """Blocks ``first .. first+count-1`` from the base object (zeros past ``base_valid``).

        With ``keep``, fetched blocks are remembered in memory at once (then
        ``fetched_hook`` runs, so waiting readers go on) and, with ``to_disk``,
        stored in the cache after; without it they are streamed blocks, kept
        in memory only until read.
        """
        entry = self.entry
        start = first * BLOCK_SIZE
        available = max(0, min(count * BLOCK_SIZE, entry.base_valid - start))
        pieces: list[bytes] = []
        generation = entry.generation
        if available and entry.base_key is not None:
            pieces = await self._fetch_from_object(entry.base_key, start, available)
        blocks = [pieces[number] if number < len(pieces) else b"" for number in range(count)]
        # A write or truncate while the GET was in flight may have changed some of these blocks.
        to_keep = [
            (first + number, block) for number, block in enumerate(blocks)
            if keep and available > number * BLOCK_SIZE and self._untouched(first + number, generation)
        ]
        for index, block in to_keep:
            self._plaintext.put(entry.uid, index, generation, block, unread=not to_disk)
            if to_disk:
                self._landing[index] = (generation, block)
        if fetched_hook is not None:
            fetched_hook()
        if not to_disk:
            return blocks
        try:
            for index, block in to_keep:
                still_current = functools.partial(self._untouched, index, generation)
                await self._store(index, block, dirty=False, still_wanted=still_current)
                self._landing.pop(index, None)
        finally:
            for index, _block in to_keep:
                self._landing.pop(index, None)
        return blocks

    async def _block(self, index: int, *, keep: bool = True) -> bytes:
        if index == self._hot_index:
            return bytes(self._hot)
        sealing = self._sealing.get(index)
        if sealing is not None:
            return bytes(sealing)
        fetching = self._inflight.get(index)
        if fetching is not None:
            await fetching.wait()
        landing = self._landing.get(index)
        if landing is not None and landing[0] == self.entry.generation:
            return landing[1]
        # Tagged with the generation from before any wait below: a copy that a
        # write made stale meanwhile is then never served.
        generation = self.entry.generation
        remembered = self._plaintext.get(self.entry.uid, index, generation)
        if remembered is not None:
            return remembered
        stored = await self.cache.read_block(self.entry, index)
        if stored is not None:
            if keep:
                self._plaintext.put(self.entry.uid, index, generation, stored)
            return stored
        if index * BLOCK_SIZE < self.entry.parked_bytes:
            # Callers finish the upload first (vfs.py); these bytes are not zeros.
            raise SsefsError(f"block {index} of {self.entry.object_key!r} is only in its unfinished upload")
        if index * BLOCK_SIZE >= self.entry.base_valid:
            return b""
        # Read-ahead is prefetch()'s job; a miss here fetches just this block.
        return (await self._fetch_blocks(index, 1, keep=keep))[0]

    async def _make_hot(self, index: int, *, overwrite_whole: bool) -> bytearray:
        if self._hot_index != index:
            await self._seal_behind()
            if overwrite_whole or index * BLOCK_SIZE >= self.entry.size:
                self._hot = bytearray()  # past the end of the file a block holds only zeros
            else:
                self._hot = bytearray(await self._block(index, keep=False))
            self._hot_index = index
            self._forget_plaintext(index)
        hot = self._hot
        if not isinstance(hot, bytearray):
            hot = self._hot = bytearray(hot)  # a whole block a write handed over, now changed in part
        return hot

    async def _hold_whole_block(self, index: int, content: bytes) -> None:
        """A write of exactly one whole block: its bytes become the hot block as they are."""
        if self._hot_index != index:
            await self._seal_behind()
            self._hot_index = index
            self._forget_plaintext(index)
        self._hot = content

    def _forget_plaintext(self, index: int) -> None:
        """The block is about to change within this generation: drop in-memory copies of it."""
        self._plaintext.forget(self.entry.uid, index)

    async def seal_hot(self) -> None:
        """Write the hot block, and any block still being sealed behind, to the cache (dirty): before
        sync, upload or truncate."""
        await self._settle()
        taken = self._take_hot()
        if taken is None:
            return
        index, content = taken
        try:
            await self._store(index, content, dirty=True)
        finally:
            del self._sealing[index]

    def _take_hot(self) -> tuple[int, bytes | bytearray] | None:
        """Hand the hot block over to ``_sealing``, where readers see it until it is in the cache."""
        if self._hot_index is None:
            return None
        index, content = self._hot_index, self._hot
        self._hot_index, self._hot = None, bytearray()
        self._sealing[index] = content
        return index, content

    async def _seal_behind(self) -> None:
        """The writer moves to another block: seal the hot one in the background, once the one
        before it is sealed (so at most one block is on its way besides the hot one)."""
        if self._background is None:
            await self.seal_hot()
            return
        await self._settle()
        taken = self._take_hot()
        if taken is None:
            return
        index, content = taken
        done = self._sealed_behind = trio.Event()
        # The size now covers this block but not the next one, which the writer is about to count.
        self._background.start_soon(self._seal_in_background, index, content, self.entry.size, done)

    async def _seal_in_background(self, index: int, content: bytes | bytearray, size_on_disk: int,
                                  done: trio.Event) -> None:
        # Shielded: a mount shutting down lets the block reach the disk rather than drop it.
        with trio.CancelScope(shield=True):
            try:
                await self._store(index, content, dirty=True, size_on_disk=size_on_disk)
            except Exception as error:  # noqa: BLE001 - kept for _settle, which tries again and reports it
                self._failed_behind = (index, size_on_disk, error)
            else:
                del self._sealing[index]
            finally:
                done.set()

    async def _settle(self) -> None:
        """Wait for the block being sealed in the background; store it here if that failed."""
        if self._sealed_behind is not None:
            await self._sealed_behind.wait()
            self._sealed_behind = None
        if self._failed_behind is None:
            return
        index, size_on_disk, error = self._failed_behind
        self._failed_behind = None
        log.debug("sealing block %d of %r in the background failed (%s); trying again", index,
                  self.entry.object_key, error)
        try:
            await self._store(index, self._sealing[index], dirty=True, size_on_disk=size_on_disk)
        finally:
            del self._sealing[index]

    def prefetch(self, first: int, count: int, nursery: trio.Nursery) -> None:
        """Start fetching blocks ``first..first+count-1`` in the background, several GETs at once.

        ``first`` is the block the reader is at. GETs cover aligned groups of
        ``PREFETCH_BLOCKS_PER_GET`` blocks (a run started inside a group
        extends to its end), skipping blocks already cached (on disk or in
        memory), being fetched, or past ``base_valid``; at most
        ``MAX_PREFETCH_IN_FLIGHT`` blocks per file are in flight. Blocks of a
        file larger than ``SMALL_FILE_BYTES`` are streamed: they live only in
        the shared memory until read, so a run past the reader's block starts
        only if that memory has room for it; the run holding ``first`` starts
        anyway, as the reader needs it now.
        """
        to_disk = self.entry.size <= SMALL_FILE_BYTES
        last_block = (self.entry.base_valid + BLOCK_SIZE - 1) // BLOCK_SIZE
        end = min(first + count, last_block)
        index = first
        while index < end and len(self._inflight) < MAX_PREFETCH_IN_FLIGHT:
            if not self._wants_fetch(index):
                index += 1
                continue
            group_end = min((index // PREFETCH_BLOCKS_PER_GET + 1) * PREFETCH_BLOCKS_PER_GET, last_block)
            run = 1
            while index + run < group_end and self._wants_fetch(index + run):
                run += 1
            if index > first and run > self._plaintext.room_ahead():
                break  # more once the reader has read some of what is in memory
            events = {number: trio.Event() for number in range(index, index + run)}
            self._inflight.update(events)
            nursery.start_soon(self._prefetch_run, index, run, events, to_disk)
            self._plaintext.fetching += run  # until the run ends (in _prefetch_run)
            index += run

    def _wants_fetch(self, index: int) -> bool:
        return not (self.cache.has_block(self.entry, index) or index in self._inflight or index == self._hot_index
                    or index in self._sealing or index in self._landing
                    or self._plaintext.holds(self.entry.uid, index, self.entry.generation))

    async def _prefetch_run(self, first: int, count: int, events: dict[int, trio.Event], to_disk: bool) -> None:
        def release_readers() -> None:
            for index, event in events.items():
                if self._inflight.get(index) is event:
                    del self._inflight[index]
                event.set()

        try:
            await self._fetch_blocks(first, count, keep=True, to_disk=to_disk, fetched_hook=release_readers)
        except Exception as error:  # noqa: BLE001 - a failed prefetch only means the read fetches itself
            log.debug("prefetch of blocks %d+%d of %r failed: %s", first, count, self.entry.object_key, error)
        finally:
            self._plaintext.fetching -= count
            release_readers()

    # ------------------------------------------------------------------ bytes

    async def read(self, offset: int, size: int, *, keep: bool = True) -> bytes:
        """``size`` bytes at ``offset`` (fewer at the end). Without ``keep`` (an upload reading its
        parts) the blocks read are not remembered in memory: an upload reads each once, and its
        blocks would push the ones readers use out of the shared store (and hold 40 MiB)."""
        end = min(offset + size, self.entry.size)
        pieces: list[bytes] = []
        position = offset
        while position < end:
            index, within = divmod(position, BLOCK_SIZE)
            count = min(end - position, BLOCK_SIZE - within)
            block = await self._block(index, keep=keep)
            piece = block[within:within + count]
            pieces.append(piece if len(piece) == count else piece + bytes(count - len(piece)))
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
            if whole and count == len(data) and isinstance(data, bytes):
                await self._hold_whole_block(index, data)
            else:
                hot = await self._make_hot(index, overwrite_whole=whole)
                if len(hot) < within:
                    hot.extend(bytes(within - len(hot)))  # the gap before the write reads as zeros
                hot[within:within + count] = view[:count]
            view = view[count:]
            position += count
            # Per block, so the size saved when this block is sealed already covers it.
            self.entry.size = max(self.entry.size, position)
        return len(data)

    async def make_local(self) -> None:
        """Hold every byte of the file in the cache as a change, so nothing depends on the object
        any more (it is about to be deleted while the file is still open) and nothing is evicted."""
        mtime_ns = self.entry.mtime_ns
        self.cache.record_change(self.entry)
        self.entry.mtime_ns = mtime_ns
        await self.seal_hot()
        for index in range((self.entry.size + BLOCK_SIZE - 1) // BLOCK_SIZE):
            await self._store(index, await self._block(index, keep=False), dirty=True)

    async def truncate(self, size: int) -> None:
        await self._settle()  # a block landing after the cut could bring back bytes past it
        self.cache.record_change(self.entry)
        if self._hot_index is not None and self._hot_index * BLOCK_SIZE >= size:
            self._hot_index, self._hot = None, bytearray()
        within = size % BLOCK_SIZE
        if size < self.entry.size and within:
            # Zero the tail of the last kept block so a later extension reads zeros.
            hot = await self._make_hot(size // BLOCK_SIZE, overwrite_whole=False)
            del hot[within:]
        self.cache.truncate(self.entry, size)
        self.entry.size = size
