"""Streamed reads: what a sequential reader fetches ahead stays in memory, not in the disk cache.

The unit tests drive ``CachedFile`` the way ``vfs.read`` does (a
``SequentialReader`` per handle, ``prefetch`` then ``read``) against the
in-memory fake S3; the last tests do the same through a real FUSE mount.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ssefs import cachedfile
from ssefs.cache import BLOCK_SIZE, BlockCache, Entry
from ssefs.cachedfile import BLOCKS_FOR_READING, SMALL_FILE_BYTES, UNREAD_PATIENCE, CachedFile, PlaintextBlocks
from ssefs.readahead import MAX_WINDOW_BLOCKS, SequentialReader
from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, eventually_on_server, sse_params, write_config
from .test_cache import OBJECT, FakeS3, based_entry, make_cache

MiB = 1024 * 1024
# What the filesystem shares between all files (vfs.Filesystem).
SHARED_BLOCKS = 40
BIG = 40 * MiB


def file_over(cache: BlockCache, base: bytes) -> tuple[FakeS3, Entry, CachedFile]:
    """A cache entry based on ``base`` in a fake S3, and a CachedFile over it with its own shared memory."""
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    return fake, entry, CachedFile(cache, entry, fake.fetch_range, PlaintextBlocks(SHARED_BLOCKS))


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[BlockCache]:
    block_cache = make_cache(tmp_path / "cache")
    yield block_cache
    block_cache.close()


async def read_like_vfs(cached: CachedFile, reader: SequentialReader, nursery: trio.Nursery,
                        offset: int, size: int) -> bytes:
    """One ``read()`` as ``vfs.read`` serves it."""
    ahead = reader.blocks_ahead(offset, size)
    if ahead > 1:
        cached.prefetch(offset // BLOCK_SIZE, ahead, nursery)
    return await cached.read(offset, size)


async def stream(cached: CachedFile, nursery: trio.Nursery, start: int = 0, end: int | None = None) -> bytes:
    reader = SequentialReader()
    end = cached.entry.size if end is None else end
    pieces = [await read_like_vfs(cached, reader, nursery, offset, MiB) for offset in range(start, end, MiB)]
    return b"".join(pieces)


def stored_blocks(cache: BlockCache, entry_id: int, blocks: int) -> set[int]:
    entry = cache.entry_by_id(entry_id)
    assert entry is not None
    return {index for index in range(blocks) if cache.has_block(entry, index)}


def fetched_bytes(fake: FakeS3) -> int:
    return sum(length for _key, _offset, length in fake.calls)


async def test_big_sequential_read_stays_out_of_the_disk_cache(cache: BlockCache) -> None:
    base = secrets.token_bytes(BIG)
    fake = FakeS3({OBJECT: base})
    shared = PlaintextBlocks(SHARED_BLOCKS)
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range, shared)
    async with trio.open_nursery() as nursery:
        assert await stream(cached, nursery) == base
    # Only the first block, read before the reader counted as sequential, was stored.
    assert stored_blocks(cache, entry.id, BIG // BLOCK_SIZE) == {0}
    assert fetched_bytes(fake) == BIG  # every byte fetched once
    assert len(shared._blocks) <= SHARED_BLOCKS
    # Reading it again is correct (what is no longer in memory is fetched again).
    async with trio.open_nursery() as nursery:
        assert await stream(cached, nursery) == base


async def test_small_file_read_sequentially_is_cached_on_disk(cache: BlockCache) -> None:
    base = secrets.token_bytes(SMALL_FILE_BYTES - 123)
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    async with trio.open_nursery() as nursery:
        assert await stream(CachedFile(cache, entry, fake.fetch_range, PlaintextBlocks(SHARED_BLOCKS)), nursery) == base
    blocks = (len(base) + BLOCK_SIZE - 1) // BLOCK_SIZE
    assert stored_blocks(cache, entry.id, blocks) == set(range(blocks))
    # A later reader (fresh memory) needs no GET.
    calls = len(fake.calls)
    assert await CachedFile(cache, entry, fake.fetch_range).read(0, len(base)) == base
    assert len(fake.calls) == calls


async def test_random_reads_are_cached_on_disk(cache: BlockCache) -> None:
    base = secrets.token_bytes(BIG)
    fake, entry, cached = file_over(cache, base)
    reader = SequentialReader()
    rng = random.Random(7)
    offsets = [0]
    while len(offsets) < 30:  # each far enough from the one before not to count as sequential
        offset = rng.randrange(0, BIG // 4096) * 4096
        if abs(offset - offsets[-1]) > 2 * MiB:
            offsets.append(offset)
    async with trio.open_nursery() as nursery:
        for offset in offsets:
            assert await read_like_vfs(cached, reader, nursery, offset, 4096) == base[offset:offset + 4096]
    touched = {offset // BLOCK_SIZE for offset in offsets}
    assert stored_blocks(cache, entry.id, BIG // BLOCK_SIZE) == touched
    assert fetched_bytes(fake) == len(touched) * BLOCK_SIZE


async def test_truncate_while_read_ahead_is_in_flight_serves_no_stale_bytes(cache: BlockCache) -> None:
    base = secrets.token_bytes(BIG)
    fake, entry, cached = file_over(cache, base)
    reader = SequentialReader()
    async with trio.open_nursery() as nursery:
        assert await read_like_vfs(cached, reader, nursery, 0, MiB) == base[:MiB]
        fake.gate = trio.Event()
        fake.started = trio.Event()
        cached.prefetch(1, 16, nursery)  # blocks 1..16, held in flight
        await fake.started.wait()
        # Shrink to the start of block 3 and grow again, neither waiting for the GET: everything
        # past the cut must read as zeros, not as the bytes that GET brings.
        cut = 3 * MiB
        await cached.truncate(cut)
        await cached.write(BIG - 10, b"0123456789")
        fake.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        expected = base[:cut] + bytes(BIG - 10 - cut) + b"0123456789"
        assert await stream(cached, nursery, start=MiB) == expected[MiB:]
    assert await cached.read(0, BIG) == expected


async def test_write_during_a_streamed_read_is_never_lost(cache: BlockCache) -> None:
    base = secrets.token_bytes(BIG)
    fake, entry, cached = file_over(cache, base)
    model = bytearray(base)
    reader = SequentialReader()
    async with trio.open_nursery() as nursery:
        for offset in range(0, BIG, MiB):
            if offset == 5 * MiB:
                # A partial write into a block fetched ahead (it needs the base block), and one
                # into a block whose GET is still in flight.
                for position in (6 * MiB + 17, 20 * MiB - 3):
                    await cached.write(position, b"written")
                    model[position:position + 7] = b"written"
            assert await read_like_vfs(cached, reader, nursery, offset, MiB) == model[offset:offset + MiB]
    await cached.seal_hot()
    # From the disk cache alone (fresh memory): the written blocks are there, the rest comes from S3.
    assert await CachedFile(cache, entry, fake.fetch_range).read(0, BIG, keep=False) == model


async def test_two_streams_share_memory_without_fetching_twice(cache: BlockCache) -> None:
    shared = PlaintextBlocks(SHARED_BLOCKS)
    fake = FakeS3()
    files = []
    for number in range(2):
        data = secrets.token_bytes(BIG)
        fake.objects[f"f{number}"] = data
        files.append((CachedFile(cache, based_entry(cache, f"f{number}", data), fake.fetch_range, shared), data))
    results: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        async def one(number: int) -> None:
            results[number] = await stream(files[number][0], nursery)

        for number in range(2):
            nursery.start_soon(one, number)
    assert [results[0], results[1]] == [data for _file, data in files]
    assert fetched_bytes(fake) == 2 * BIG
    assert len(shared._blocks) <= SHARED_BLOCKS


async def test_abandoned_read_ahead_stops_holding_room(cache: BlockCache, monkeypatch: pytest.MonkeyPatch) -> None:
    base = secrets.token_bytes(BIG)
    fake = FakeS3({OBJECT: base})
    shared = PlaintextBlocks(SHARED_BLOCKS)
    cached = CachedFile(cache, based_entry(cache, OBJECT, base), fake.fetch_range, shared)
    async with trio.open_nursery() as nursery:
        await stream(cached, nursery, end=8 * MiB)  # then the reader goes away
    assert shared.room_ahead() < SHARED_BLOCKS - BLOCKS_FOR_READING
    later = time.monotonic() + UNREAD_PATIENCE + 1
    monkeypatch.setattr(cachedfile.time, "monotonic", lambda: later)
    assert shared.room_ahead() == SHARED_BLOCKS - BLOCKS_FOR_READING


def test_unread_blocks_are_evicted_after_read_ones() -> None:
    shared = PlaintextBlocks(4)
    shared.put(b"u", 0, 1, b"ahead", unread=True)
    for index in range(1, 8):
        shared.put(b"u", index, 1, b"read")
    assert shared.get(b"u", 0, 1) == b"ahead"  # survived seven newer blocks
    assert shared.get(b"u", 1, 1) is None
    assert shared.get(b"u", 0, 2) is None  # another generation: never served


def test_window_fits_the_memory_left_for_read_ahead() -> None:
    assert MAX_WINDOW_BLOCKS <= SHARED_BLOCKS - BLOCKS_FOR_READING


# ------------------------------------------------------------------ through a real mount

MountFactory = Callable[..., Mount]


def cached_block_count(cache_dir: Path) -> int:
    """Blocks the cache holds, in files or (small ones) in their journal rows: the journal's block rows."""
    with contextlib.closing(sqlite3.connect(f"file:{cache_dir / 'journal.sqlite'}?mode=ro", uri=True)) as journal:
        return int(journal.execute("SELECT COUNT(*) FROM blocks").fetchone()[0])


def settled_blocks(cache_dir: Path) -> int:
    """How many blocks the cache holds once blocks fetched ahead have been stored (in the background)."""
    count, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        count, previous = cached_block_count(cache_dir), count
        if count == previous:
            break
    return count


@pytest.mark.fuse
def test_cold_sequential_read_through_the_mount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    big = secrets.token_bytes(64 * MiB)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=big, **sse_params(key_bytes))
    s3.put_object(Bucket=bucket, Key="random.bin", Body=big, **sse_params(key_bytes))
    small = secrets.token_bytes(3 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="small.bin", Body=small, **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    cache_blocks = tmp_path / "mount-cache"

    assert (mount.mountpoint / "big.bin").read_bytes() == big
    # At most the first few blocks (read before the stream counted as sequential) reached the disk.
    of_big = settled_blocks(cache_blocks)
    assert of_big <= 2
    # A small file read sequentially is cached whole: its 4 blocks.
    assert (mount.mountpoint / "small.bin").read_bytes() == small
    assert settled_blocks(cache_blocks) == of_big + 4

    # Random reads (kernel read-ahead off, a file not in the page cache) are cached on disk.
    before = settled_blocks(cache_blocks)
    fd = os.open(mount.mountpoint / "random.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for index in (50, 20, 33):
            assert os.pread(fd, 4096, index * MiB + 100) == big[index * MiB + 100:index * MiB + 4196]
    finally:
        os.close(fd)
    assert settled_blocks(cache_blocks) >= before + 3


@pytest.mark.fuse
def test_write_while_streaming_through_the_mount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    data = bytearray(secrets.token_bytes(48 * MiB))
    s3.put_object(Bucket=bucket, Key="rw.bin", Body=bytes(data), **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    with open(mount.mountpoint / "rw.bin", "r+b", buffering=0) as handle:
        got = bytearray()
        for offset in range(0, len(data), MiB):
            if offset == 10 * MiB:
                for position in (12 * MiB + 7, 30 * MiB - 2):  # ahead of the reader: fetched or in flight
                    handle.seek(position)
                    handle.write(b"changed!")
                    data[position:position + 8] = b"changed!"
                handle.seek(offset)
            got += handle.read(MiB)
        assert got == data
        os.fsync(handle.fileno())
    eventually_on_server(s3, bucket, "rw.bin", key_bytes, data)
    assert (mount.mountpoint / "rw.bin").read_bytes() == data
