"""Tests for ssefs.cache (BlockCache) and ssefs.cachedfile (CachedFile) against an in-memory fake S3."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from ssefs.cache import (
    BLOCK_MAGIC,
    BLOCK_SIZE,
    INLINE_LIMIT,
    NONCE_BYTES,
    BlockCache,
    CacheMismatch,
    CorruptBlock,
    Entry,
)
from ssefs.cachedfile import CachedFile, PlaintextBlocks
from ssefs.errors import SsefsError
from ssefs.keys import SseKey

MiB = 1024 * 1024
KEY = SseKey(bytes(range(32)))
OTHER_KEY = SseKey(bytes(range(1, 33)))
IDENTITY = "https://s3.test/bucket/"
OBJECT = "dir/object.bin"
# A sealed block: magic, nonce, ciphertext, GCM tag.
def sealed_size(stored_bytes: int) -> int:
    """A block file holding ``stored_bytes`` of plaintext (trailing zeros are not stored)."""
    return len(BLOCK_MAGIC) + NONCE_BYTES + stored_bytes + 16


SEALED_BLOCK = sealed_size(BLOCK_SIZE)


class FakeS3:
    """Objects in a dict; records every ranged GET."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})
        self.calls: list[tuple[str, int, int]] = []
        # When set, GETs wait for it (to hold one in flight).
        self.gate: trio.Event | None = None
        self.started = trio.Event()

    async def fetch_range(self, key: str, offset: int, length: int) -> list[bytes]:
        """The range in block-sized pieces, as ``ObjectStore.get_pieces`` returns it."""
        self.calls.append((key, offset, length))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        data = self.objects[key][offset:offset + length]
        return [data[start:start + BLOCK_SIZE] for start in range(0, len(data), BLOCK_SIZE)]


class RoomRecorder:
    """A ``make_room`` that counts calls and optionally marks every dirty entry uploaded."""

    def __init__(self, cache: BlockCache, fake: FakeS3 | None = None,
                 files: dict[int, CachedFile] | None = None) -> None:
        self.cache = cache
        self.fake = fake
        self.files = files
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.fake is None or self.files is None:
            await trio.lowlevel.checkpoint()
            return
        for entry in self.cache.dirty_entries():
            cached = self.files[entry.id]
            await cached.seal_hot()
            await self.cache.sync(entry)
            self.fake.objects[entry.object_key] = await cached.read(0, entry.size, keep=False)
            self.cache.mark_uploaded(entry, entry.generation, etag=f"up{entry.generation}", size=entry.size)


async def no_room() -> None:
    await trio.lowlevel.checkpoint()


def make_cache(directory: Path, key: SseKey = KEY, identity: str = IDENTITY, max_size: int = 1 << 40,
               inline_limit: int = 0) -> BlockCache:
    """A cache that keeps every block in a file: most tests here examine block files. Blocks kept in
    their journal row (the default for small ones) have tests of their own below, and every test
    through a mount uses the default."""
    return BlockCache(directory, key, identity=identity, max_size=max_size, inline_limit=inline_limit)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(cache_dir: Path) -> Iterator[BlockCache]:
    block_cache = make_cache(cache_dir)
    yield block_cache
    block_cache.close()


def based_entry(cache: BlockCache, key: str, data: bytes) -> Entry:
    return cache.create_entry(key, base_etag="e1", base_size=len(data), mtime_ns=0, exists_in_s3=True)


def new_entry(cache: BlockCache, key: str) -> Entry:
    """A new file, as ``vfs.create`` makes it: dirty from the start."""
    entry = cache.create_entry(key, base_etag="", base_size=0, mtime_ns=0, exists_in_s3=False)
    cache.record_change(entry, size=0)
    return entry


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, every ``os.fsync`` (still done) is recorded in the returned list."""
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return fsyncs


def block_file(cache: BlockCache, entry: Entry, index: int) -> Path:
    return cache.directory / "blocks" / str(entry.id) / str(index)


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def all_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


# ------------------------------------------------------------------ byte-level behaviour against a model


@pytest.mark.parametrize("sealing", ["by the writer", "behind the writer"])
async def test_random_operations_match_model(cache: BlockCache, sealing: str) -> None:
    async with trio.open_nursery() as background:
        await _random_operations_match_model(cache, background if sealing == "behind the writer" else None)


async def _random_operations_match_model(cache: BlockCache, background: trio.Nursery | None) -> None:
    rng = random.Random(20240601)
    base = rng.randbytes(5 * MiB + 12345)
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range, background=background)
    model = bytearray(base)

    for _step in range(200):
        op = rng.random()
        if op < 0.45:
            kind = rng.random()
            if kind < 0.35:  # around a block boundary, usually spanning it
                boundary = rng.randrange(1, 7) * BLOCK_SIZE
                offset = max(0, boundary - rng.randrange(1, 5000))
                length = rng.randrange(1, 10000)
            elif kind < 0.5:  # large, spanning several blocks
                offset = rng.randrange(0, len(model) + 1)
                length = rng.randrange(BLOCK_SIZE, 5 * BLOCK_SIZE // 2)
            elif kind < 0.65:  # sparse: past the end
                offset = len(model) + rng.randrange(1, 2 * MiB)
                length = rng.randrange(1, 70000)
            else:
                offset = rng.randrange(0, len(model) + 1)
                length = rng.randrange(1, 70000)
            data = rng.randbytes(length)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + length] = data
            assert await cached.write(offset, data) == length
        elif op < 0.75:
            offset = rng.randrange(0, len(model) + MiB)
            size = rng.randrange(0, 3 * MiB)
            got = await cached.read(offset, size)
            assert got == bytes(model[offset:offset + size]), f"read({offset}, {size})"
        elif op < 0.92:
            choice = rng.random()
            if choice < 0.4 or len(model) > 9 * MiB:
                new_size = rng.randrange(0, len(model) + 1)
            elif choice < 0.7:
                new_size = len(model) + rng.randrange(0, 2 * MiB)
            else:
                new_size = rng.randrange(0, 8) * BLOCK_SIZE
            if new_size < len(model):
                del model[new_size:]
            else:
                model.extend(bytes(new_size - len(model)))
            await cached.truncate(new_size)
        else:
            await cached.seal_hot()
            await cache.sync(entry)
        assert entry.size == len(model)

    assert await cached.read(0, len(model) + 100) == bytes(model)
    # A fresh CachedFile (no hot block) sees the same bytes once the hot block is sealed.
    await cached.seal_hot()
    assert await CachedFile(cache, entry, fake.fetch_range).read(0, len(model)) == bytes(model)
    assert entry.dirty


async def test_blocks_left_behind_are_sealed_in_the_background(cache: BlockCache) -> None:
    """A writer moving on does not wait for the block it left; the block reads back meanwhile, and
    seal_hot (close, upload) waits for it."""
    entry = new_entry(cache, OBJECT)
    first, second = os.urandom(BLOCK_SIZE), os.urandom(BLOCK_SIZE)
    async with trio.open_nursery() as background:
        cached = CachedFile(cache, entry, FakeS3().fetch_range, background=background)
        await cached.write(0, first)
        await cached.write(BLOCK_SIZE, second)  # hands block 0 to the background, returns at once
        assert not cache.has_block(entry, 0)
        assert await cached.read(0, 2 * BLOCK_SIZE) == first + second
        await cached.seal_hot()
        assert cache.has_block(entry, 0) and cache.has_block(entry, 1)
    await cache.sync(entry)
    assert await CachedFile(cache, entry, FakeS3().fetch_range).read(0, 2 * BLOCK_SIZE) == first + second


async def test_the_size_saved_with_a_block_sealed_behind_stops_at_that_block(cache_dir: Path) -> None:
    """Killed while the writer is in the next block: the journal's size must not count the lost hot
    block, or the recovered file would end in zeros the writer never wrote."""
    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    data = os.urandom(2 * BLOCK_SIZE + 5000)
    async with trio.open_nursery() as background:
        cached = CachedFile(cache, entry, FakeS3().fetch_range, background=background)
        await cached.write(0, data[:BLOCK_SIZE])
        # Blocks 0 and 1 are sealed behind as this write moves on; block 2 stays hot.
        await cached.write(BLOCK_SIZE, data[BLOCK_SIZE:])
        await cached._settle()  # noqa: SLF001 - the background seals are over; the process "dies" here
        assert entry.size == len(data)
    await cache.make_durable()
    cache.close()
    reopened = make_cache(cache_dir)
    again = reopened.entry(OBJECT)
    assert again is not None and again.dirty
    assert again.size == 2 * BLOCK_SIZE
    assert await CachedFile(reopened, again, FakeS3().fetch_range).read(0, len(data)) == data[:2 * BLOCK_SIZE]
    reopened.close()


async def test_a_failed_background_seal_is_tried_again_and_its_error_returned(
    cache: BlockCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = new_entry(cache, OBJECT)
    data = os.urandom(2 * BLOCK_SIZE)
    real_write_block = cache.write_block
    failures = {"left": 1}

    async def failing_write_block(*args: object, **kwargs: object) -> bool:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return await real_write_block(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "write_block", failing_write_block)
    async with trio.open_nursery() as background:
        cached = CachedFile(cache, entry, FakeS3().fetch_range, background=background)
        await cached.write(0, data[:BLOCK_SIZE])
        await cached.write(BLOCK_SIZE, data[BLOCK_SIZE:])  # block 0's seal fails in the background
        await trio.testing.wait_all_tasks_blocked()
        assert not cache.has_block(entry, 0)
        assert await cached.read(0, BLOCK_SIZE) == data[:BLOCK_SIZE]  # still there for readers
        await cached.seal_hot()  # tries block 0 again: it succeeds now
        assert await CachedFile(cache, entry, FakeS3().fetch_range).read(0, len(data)) == data

        failures["left"] = 2  # the background seal and its second try both fail
        await cached.write(2 * BLOCK_SIZE, data[:BLOCK_SIZE])
        await cached.write(3 * BLOCK_SIZE, data[:BLOCK_SIZE])
        with pytest.raises(OSError, match="No space"):
            await cached.seal_hot()


async def test_an_uploads_reads_are_not_remembered_in_memory(cache: BlockCache) -> None:
    """Reading parts for an upload (keep=False) leaves the shared in-memory blocks to readers."""
    entry = new_entry(cache, OBJECT)
    data = os.urandom(3 * BLOCK_SIZE)
    writer = CachedFile(cache, entry, FakeS3().fetch_range)
    await writer.write(0, data)
    await writer.seal_hot()
    shared = PlaintextBlocks(max_blocks=40)
    cached = CachedFile(cache, entry, FakeS3().fetch_range, shared)
    assert await cached.read(0, len(data), keep=False) == data
    assert not any(shared.holds(entry.uid, index, entry.generation) for index in range(3))
    assert await cached.read(0, len(data)) == data
    assert all(shared.holds(entry.uid, index, entry.generation) for index in range(3))


async def test_whole_block_writes_then_partial_changes_in_the_same_block(cache: BlockCache) -> None:
    """A write of exactly one block is held as it is; a later partial write into it works on a copy."""
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    first, second = random.Random(3).randbytes(BLOCK_SIZE), random.Random(4).randbytes(BLOCK_SIZE)
    kept = bytes(first)
    await cached.write(0, first)
    await cached.write(100, b"patch")  # into the held block
    await cached.write(BLOCK_SIZE, second)  # seals block 0, holds block 1
    await cached.write(2 * BLOCK_SIZE - 3, b"end")
    model = bytearray(first + second)
    model[100:105] = b"patch"
    model[2 * BLOCK_SIZE - 3:] = b"end"
    assert first == kept  # the caller's bytes were not changed
    assert await cached.read(0, 2 * BLOCK_SIZE) == bytes(model)
    await cached.seal_hot()
    assert await CachedFile(cache, entry, FakeS3().fetch_range).read(0, 2 * BLOCK_SIZE) == bytes(model)


async def test_reads_past_the_end_are_short(cache: BlockCache) -> None:
    base = random.Random(1).randbytes(BLOCK_SIZE + 1000)
    fake = FakeS3({OBJECT: base})
    cached = CachedFile(cache, based_entry(cache, OBJECT, base), fake.fetch_range)
    assert await cached.read(len(base) - 10, 100) == base[-10:]
    assert await cached.read(len(base), 100) == b""
    assert await cached.read(len(base) + 5 * MiB, 100) == b""
    assert await cached.read(0, 0) == b""
    await cached.write(len(base) + 10, b"tail")
    assert await cached.read(len(base) - 2, 100) == base[-2:] + bytes(10) + b"tail"


@pytest.mark.parametrize("before", ["nothing", "read", "written", "sealed"])
@pytest.mark.parametrize("shrink_to", [BLOCK_SIZE + 100, 2 * BLOCK_SIZE, 0, 100])
async def test_shrink_then_grow_reads_zeros(cache: BlockCache, before: str, shrink_to: int) -> None:
    base = random.Random(2).randbytes(3 * BLOCK_SIZE + 500)
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range)
    model = bytearray(base)
    if before == "read":
        assert await cached.read(0, len(base)) == base  # every block stored clean
    elif before in ("written", "sealed"):
        for index in range(4):  # one byte into every block: all dirty
            await cached.write(index * BLOCK_SIZE + 7, b"W")
            model[index * BLOCK_SIZE + 7] = ord("W")
        if before == "sealed":
            await cached.seal_hot()

    await cached.truncate(shrink_to)
    assert entry.size == shrink_to
    assert await cached.read(0, 4 * MiB) == bytes(model[:shrink_to])
    await cached.truncate(len(base))
    expected = bytes(model[:shrink_to]) + bytes(len(base) - shrink_to)
    assert await cached.read(0, len(base)) == expected
    # Growing by a write past the end also leaves zeros in the gap.
    await cached.truncate(shrink_to)
    await cached.write(len(base) + 3, b"end")
    assert await cached.read(0, len(base) + 10) == expected + bytes(3) + b"end"
    # And after sealing, from a fresh CachedFile.
    await cached.seal_hot()
    fresh = CachedFile(cache, entry, fake.fetch_range)
    assert await fresh.read(0, len(base) + 10) == expected + bytes(3) + b"end"


# ------------------------------------------------------------------ what gets fetched


async def test_partial_write_fetches_only_the_touched_block(cache: BlockCache) -> None:
    base = random.Random(3).randbytes(20 * MiB)
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range)

    await cached.write(10 * MiB + 100, b"x" * 4096)
    assert fake.calls == [(OBJECT, 10 * MiB, BLOCK_SIZE)]

    fake.calls.clear()
    whole = random.Random(4).randbytes(BLOCK_SIZE)
    await cached.write(5 * BLOCK_SIZE, whole)
    await cached.seal_hot()
    assert fake.calls == []

    # Two whole blocks in one write: still nothing fetched.
    await cached.write(12 * BLOCK_SIZE, whole + whole)
    assert fake.calls == []

    # A write spanning a boundary fetches exactly the two blocks it touches partially.
    await cached.write(15 * BLOCK_SIZE - 10, b"y" * 20)
    assert fake.calls == [(OBJECT, 14 * BLOCK_SIZE, BLOCK_SIZE), (OBJECT, 15 * BLOCK_SIZE, BLOCK_SIZE)]

    # Sparse writes past the object fetch nothing.
    fake.calls.clear()
    await cached.write(25 * MiB + 17, b"z" * 5000)
    assert fake.calls == []

    model = bytearray(base)
    model[10 * MiB + 100:10 * MiB + 100 + 4096] = b"x" * 4096
    model[5 * BLOCK_SIZE:6 * BLOCK_SIZE] = whole
    model[12 * BLOCK_SIZE:14 * BLOCK_SIZE] = whole + whole
    model[15 * BLOCK_SIZE - 10:15 * BLOCK_SIZE + 10] = b"y" * 20
    model.extend(bytes(25 * MiB + 17 - len(model)))
    model.extend(b"z" * 5000)
    assert await cached.read(0, len(model)) == bytes(model)
    # Only blocks neither written nor fetched before were fetched for that read.
    fetched = sorted(offset // BLOCK_SIZE for _key, offset, _length in fake.calls)
    assert fetched == [i for i in range(20) if i not in (5, 10, 12, 13, 14, 15)]
    assert all(length == BLOCK_SIZE for _key, _offset, length in fake.calls)


async def test_truncate_fetches_at_most_the_partially_kept_block(cache: BlockCache) -> None:
    base = random.Random(5).randbytes(20 * MiB)
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range)

    await cached.truncate(7 * MiB + 500)
    assert fake.calls == [(OBJECT, 7 * MiB, BLOCK_SIZE)]
    fake.calls.clear()
    await cached.truncate(3 * MiB)  # aligned: nothing to keep partially
    await cached.truncate(30 * MiB)  # growing needs no data
    assert fake.calls == []
    assert await cached.read(3 * MiB, 27 * MiB) == bytes(27 * MiB)
    assert fake.calls == []
    assert await cached.read(0, 3 * MiB) == base[:3 * MiB]
    assert [offset for _key, offset, _length in fake.calls] == [0, MiB, 2 * MiB]

    # A partially kept block that is already cached is not fetched again.
    fake.calls.clear()
    await cached.truncate(2 * MiB + 1)
    assert fake.calls == []
    assert await cached.read(0, 30 * MiB) == base[:2 * MiB + 1]


async def test_new_entry_never_fetches(cache: BlockCache) -> None:
    fake = FakeS3()
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, fake.fetch_range)
    await cached.write(3 * MiB + 5, b"hello")
    await cached.truncate(MiB + 3)
    await cached.truncate(4 * MiB)
    assert await cached.read(0, 5 * MiB) == bytes(4 * MiB)
    assert fake.calls == []


# ------------------------------------------------------------------ confidentiality and permissions


async def test_no_plaintext_on_disk_and_private_modes(cache_dir: Path) -> None:
    previous_umask = os.umask(0)  # the modes must not depend on a lax umask
    try:
        cache = make_cache(cache_dir)
        pattern = random.Random(6).randbytes(3 * MiB)
        entry = new_entry(cache, OBJECT)
        cached = CachedFile(cache, entry, FakeS3().fetch_range)
        for offset in range(0, len(pattern), 128 * 1024):
            await cached.write(offset, pattern[offset:offset + 128 * 1024])
        await cached.seal_hot()
        await cache.sync(entry)
        assert await cached.read(0, len(pattern)) == pattern

        files = all_files(cache_dir)
        names = {path.relative_to(cache_dir).as_posix() for path in files}
        assert {"journal.sqlite", f"blocks/{entry.id}/0", f"blocks/{entry.id}/1", f"blocks/{entry.id}/2"} <= names
        blob = b"".join(path.read_bytes() for path in files)
        assert len(blob) >= len(pattern)
        windows = [pattern[start:start + 32] for start in range(0, len(pattern) - 32, 9973)]
        assert len(windows) > 300
        leaked = [window for window in windows if window in blob]
        assert leaked == []
        assert pattern[:32] in pattern + blob  # the check itself can see a window

        assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
        for directory in [cache_dir / "blocks", cache_dir / "blocks" / str(entry.id)]:
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        cache.close()
    finally:
        os.umask(previous_umask)


async def test_existing_directory_is_made_private(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o755)
    os.chmod(cache_dir, 0o755)
    make_cache(cache_dir).close()
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


# ------------------------------------------------------------------ persistence


async def test_synced_data_survives_reopening(cache_dir: Path) -> None:
    rng = random.Random(7)
    base = rng.randbytes(3 * MiB + 777)
    fake = FakeS3({OBJECT: base})
    cache = make_cache(cache_dir)
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range)
    model = bytearray(base)
    for offset, length in [(100, 5000), (2 * MiB + 3, 70000), (len(base) + 1000, 3000)]:
        data = rng.randbytes(length)
        await cached.write(offset, data)
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset:offset + length] = data
    await cached.truncate(len(model) - 1000)
    del model[-1000:]
    await cached.seal_hot()
    await cache.sync(entry)
    generation = entry.generation
    cache.close()

    reopened = make_cache(cache_dir)
    again = reopened.entry(OBJECT)
    assert again is not None
    assert again.id == entry.id and again.uid == entry.uid
    assert again.dirty
    assert again.generation == generation and again.uploaded_generation == 0
    assert again.size == len(model)
    assert again.base_key == OBJECT and again.base_etag == "e1"
    assert reopened.dirty_entries() == [again]
    assert reopened.used_bytes == cache.used_bytes
    fake.calls.clear()
    assert await CachedFile(reopened, again, fake.fetch_range).read(0, len(model) + 10) == bytes(model)
    # Only the untouched block 1 came from S3.
    assert fake.calls == [(OBJECT, MiB, BLOCK_SIZE)]
    reopened.close()


async def test_a_sync_with_nothing_new_writes_and_fsyncs_nothing(cache_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """close() syncs at flush and again at release: the second one has nothing to do (small-file creates)."""
    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"small file")
    await cached.seal_hot()
    fsyncs = count_fsyncs(monkeypatch)
    changes = cache._db.total_changes
    await cache.sync(entry)  # flush
    # The block file, its directory and the journal's log, which holds the entry's row: storing the
    # block committed it already, so it is not written again.
    assert len(fsyncs) == 3 and cache._db.total_changes == changes
    await cache.sync(entry)  # release
    assert len(fsyncs) == 3 and cache._db.total_changes == changes
    other = new_entry(cache, "other")  # anything committed since: the journal's log is fsynced again
    changes = cache._db.total_changes
    await cache.sync(entry)
    assert len(fsyncs) == 3 + 1 and cache._db.total_changes == changes
    await cached.write(0, b"changed")  # and of course a change
    await cached.seal_hot()
    await cache.sync(entry)
    assert len(fsyncs) == 3 + 1 + 3
    cache.close()
    reopened = make_cache(cache_dir)
    again = reopened.entry(OBJECT)
    assert again is not None and again.size == len(b"small file") and again.generation == entry.generation
    assert await CachedFile(reopened, again, FakeS3().fetch_range).read(0, 100) == b"changed" + b"small file"[7:]
    assert reopened.entry(other.object_key) is not None
    reopened.close()


async def test_close_commits_at_once_and_leaves_one_fsync_for_many_to_the_background(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sync(wait=False), as close() calls it: committed when it returns (a killed process loses
    nothing), without an fsync; ``keep_durable`` then fsyncs the journal's log once for every close
    made meanwhile (a group commit), and ``make_durable`` has nothing left to do."""
    cache = make_cache(cache_dir)
    entries = []
    for number in range(20):
        entry = new_entry(cache, f"small/{number}")
        cached = CachedFile(cache, entry, FakeS3().fetch_range)
        await cached.write(0, b"file %d" % number)
        await cached.seal_hot()
        entries.append(entry)
    fsyncs = count_fsyncs(monkeypatch)
    async with trio.open_nursery() as background:
        await background.start(cache.keep_durable)
        for entry in entries:  # twenty close()s while no fsync runs
            await cache.sync(entry, wait=False)
        assert fsyncs == []
        # Another connection, as the next mount after a kill -9 would, finds every close committed.
        journal = sqlite3.connect(cache_dir / "journal.sqlite")
        committed = dict(journal.execute("SELECT object_key, size FROM entries"))
        journal.close()
        assert committed == {f"small/{number}": len(b"file %d" % number) for number in range(20)}
        with trio.fail_after(10):
            while not fsyncs:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert len(fsyncs) == 2 * 20 + 1  # each block file and its directory, and the journal's log once
        await cache.make_durable()
        assert len(fsyncs) == 2 * 20 + 1
        background.cancel_scope.cancel()
    cache.close()
    reopened = make_cache(cache_dir)
    for number in range(20):
        again = reopened.entry(f"small/{number}")
        assert again is not None and again.dirty
        assert await CachedFile(reopened, again, FakeS3().fetch_range).read(0, 100) == b"file %d" % number
    reopened.close()


async def test_a_failed_background_fsync_is_logged_and_done_by_the_next_pass(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The disk refuses the background fsync (EIO): close() has returned already, so the error is
    logged, nothing is forgotten, and the next pass (the next close, upload or fsync) does it."""
    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"x" * 5000)
    await cached.seal_hot()
    real_fsync, failures_left = os.fsync, [1]

    def fsync_failing_once(fd: int) -> None:
        if failures_left[0]:
            failures_left[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    with caplog.at_level(logging.ERROR, logger="ssefs.cache"):
        async with trio.open_nursery() as background:
            await background.start(cache.keep_durable)
            await cache.sync(entry, wait=False)
            with trio.fail_after(10):
                while "cannot make the cache durable" not in caplog.text:
                    await trio.sleep(0.01)
            background.cancel_scope.cancel()
    assert "Input/output error" in caplog.text
    fsyncs = count_fsyncs(monkeypatch)
    await cache.make_durable()  # what the failed pass left: the block file, its directory, the journal's log
    assert len(fsyncs) == 3
    await cache.make_durable()
    assert len(fsyncs) == 3
    cache.close()


async def test_a_small_file_create_costs_two_journal_commits(cache_dir: Path) -> None:
    """Each commit costs ~50 µs of sqlite and WAL writes on the trio thread: create, write and close of
    a small file commit the new row once and the block with the row's new size once, nothing more."""
    cache = make_cache(cache_dir)
    statements: list[str] = []
    cache._db.set_trace_callback(statements.append)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"small file")
    await cached.seal_hot()
    await cache.sync(entry)  # flush
    await cache.sync(entry)  # release
    commits, in_transaction = 0, False
    for statement in statements:
        verb = statement.split()[0].upper()
        if verb == "BEGIN":
            in_transaction = True
        elif verb == "COMMIT":
            in_transaction, commits = False, commits + 1
        elif verb in ("INSERT", "UPDATE", "DELETE") and not in_transaction:
            commits += 1
    assert commits == 2, statements
    cache.close()
    reopened = make_cache(cache_dir)
    again = reopened.entry(OBJECT)
    assert again is not None and again.size == len(b"small file") and again.dirty
    assert await CachedFile(reopened, again, FakeS3().fetch_range).read(0, 100) == b"small file"
    reopened.close()


async def test_uploaded_state_survives_reopening(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"a" * (MiB + 10))
    await cached.seal_hot()
    await cache.sync(entry)
    cache.mark_uploaded(entry, entry.generation, etag="etag-1", size=entry.size)
    cache.close()

    reopened = make_cache(cache_dir)
    again = reopened.entry(OBJECT)
    assert again is not None and not again.dirty
    assert again.base_key == OBJECT and again.base_etag == "etag-1" and again.base_valid == MiB + 10
    assert reopened.dirty_entries() == [] and reopened.dirty_bytes == 0
    # Its blocks are clean after reopening, so they may be evicted.
    reopened.evict_clean(reopened.max_size)
    assert reopened.used_bytes == 0
    reopened.close()


async def test_unsynced_writes_read_back_in_process(cache: BlockCache) -> None:
    base = random.Random(8).randbytes(2 * MiB)
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range)
    await cached.write(MiB + 10, b"hot data")
    assert not cache.has_block(entry, 1)  # still only in memory
    assert await cached.read(MiB, 20) == base[MiB:MiB + 10] + b"hot data" + base[MiB + 18:MiB + 20]
    await cached.write(20, b"other block")  # seals block 1, makes block 0 hot
    assert cache.has_block(entry, 1)
    assert await cached.read(0, 2 * MiB) == (
        base[:20] + b"other block" + base[31:MiB + 10] + b"hot data" + base[MiB + 18:]
    )


# ------------------------------------------------------------------ eviction and backpressure


async def test_mark_uploaded_makes_blocks_evictable_lru_first(cache_dir: Path) -> None:
    max_size = 4 * MiB + 4096
    cache = make_cache(cache_dir, max_size=max_size)
    fake = FakeS3()
    room = RoomRecorder(cache)
    rng = random.Random(9)

    first = new_entry(cache, "first")
    first_file = CachedFile(cache, first, fake.fetch_range)
    first_data = rng.randbytes(3 * BLOCK_SIZE)
    for index in range(3):
        await cache.ensure_space(BLOCK_SIZE, room)
        await first_file.write(index * BLOCK_SIZE, first_data[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE])
    await first_file.seal_hot()
    await cache.sync(first)
    assert cache.dirty_bytes == 3 * SEALED_BLOCK
    cache.evict_clean(max_size)  # nothing is clean yet
    assert cache.used_bytes == 3 * SEALED_BLOCK

    fake.objects["first"] = first_data
    cache.mark_uploaded(first, first.generation, etag="f1", size=len(first_data))
    assert not first.dirty and cache.dirty_bytes == 0
    assert await first_file.read(0, 10) == first_data[:10]  # block 0 becomes most recently used

    second = new_entry(cache, "second")
    second_file = CachedFile(cache, second, fake.fetch_range)
    second_data = rng.randbytes(3 * BLOCK_SIZE)
    for index in range(3):
        await cache.ensure_space(BLOCK_SIZE, room)
        await second_file.write(index * BLOCK_SIZE, second_data[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE])
        assert cache.used_bytes <= max_size
    await cache.ensure_space(BLOCK_SIZE, room)
    await second_file.seal_hot()
    assert cache.used_bytes <= max_size
    assert room.calls == 0  # clean blocks sufficed
    assert [cache.has_block(first, i) for i in range(3)] == [True, False, False]
    assert all(cache.has_block(second, i) for i in range(3))

    # The evicted clean blocks come back from S3; dirty ones are never evicted for them.
    fake.calls.clear()
    assert await first_file.read(0, len(first_data)) == first_data
    assert sorted(offset for _key, offset, _length in fake.calls) == [BLOCK_SIZE, 2 * BLOCK_SIZE]
    assert all(cache.has_block(second, i) for i in range(3))
    assert cache.used_bytes <= max_size + SEALED_BLOCK
    assert await second_file.read(0, len(second_data)) == second_data
    cache.close()


async def test_ensure_space_waits_while_only_dirty_data_is_left(cache_dir: Path) -> None:
    max_size = 4 * MiB + 4096
    cache = make_cache(cache_dir, max_size=max_size)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, bytes(range(256)) * (4 * BLOCK_SIZE // 256))
    await cached.seal_hot()
    used = cache.used_bytes
    assert used == 4 * SEALED_BLOCK

    room = RoomRecorder(cache)
    with trio.move_on_after(0.3) as scope:
        await cache.ensure_space(BLOCK_SIZE, room)
    assert scope.cancelled_caught
    assert room.calls >= 1
    assert cache.used_bytes == used
    assert all(cache.has_block(entry, i) for i in range(4))

    # Space freed elsewhere (an upload finishing) wakes the waiter up.
    async def finish_upload() -> None:
        await trio.sleep(0.05)
        cache.mark_uploaded(entry, entry.generation, etag="x", size=entry.size)

    with trio.fail_after(0.9):  # well before the waiter's own one-second poll
        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish_upload)
            await cache.ensure_space(BLOCK_SIZE, RoomRecorder(cache))
    assert cache.used_bytes + BLOCK_SIZE <= max_size
    cache.close()


async def test_writing_more_than_max_size_with_uploads_stays_bounded(cache_dir: Path) -> None:
    max_size = 4 * MiB + 4096
    cache = make_cache(cache_dir, max_size=max_size)
    fake = FakeS3()
    files: dict[int, CachedFile] = {}
    room = RoomRecorder(cache, fake, files)
    rng = random.Random(10)
    models: dict[str, bytearray] = {}
    entries: dict[str, Entry] = {}
    for name in ("a", "b", "c"):
        entries[name] = new_entry(cache, name)
        entries[name].open_writers = 1  # open for writing, as vfs keeps them: never forgotten
        files[entries[name].id] = CachedFile(cache, entries[name], fake.fetch_range)
        models[name] = bytearray()
    for _step in range(40):
        name = rng.choice(list(models))
        entry = entries[name]
        model = models[name]
        offset = rng.randrange(0, len(model) + 1)
        data = rng.randbytes(rng.randrange(1, BLOCK_SIZE))
        await cache.ensure_space(2 * BLOCK_SIZE, room)
        await files[entry.id].write(offset, data)
        model[offset:offset + len(data)] = data
        assert cache.used_bytes <= max_size
    assert room.calls > 0
    assert sum(len(model) for model in models.values()) > max_size
    for name, model in models.items():
        assert cache.entry(name) is entries[name]
        assert await files[entries[name].id].read(0, len(model), keep=False) == bytes(model)
    cache.close()


# ------------------------------------------------------------------ identity


async def test_reopening_with_another_key_is_refused_while_uploads_are_pending(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    await cache.sync(new_entry(cache, OBJECT))
    cache.close()
    with pytest.raises(CacheMismatch, match="another SSE-C key and holds 1 file"):
        make_cache(cache_dir, key=OTHER_KEY)
    reopened = make_cache(cache_dir)  # the refusal changed nothing
    assert reopened.entry(OBJECT) is not None
    reopened.close()


async def test_clean_cache_under_a_dropped_key_starts_afresh(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    entry = based_entry(cache, OBJECT, b"x" * 10)
    await cache.write_block(entry, 0, b"x" * 10, dirty=False)
    cache.mark_uploaded(entry, entry.generation, etag="e2", size=10)
    await cache.sync(entry)
    cache.close()
    assert any((cache_dir / "blocks").iterdir())
    reopened = make_cache(cache_dir, key=OTHER_KEY)
    assert reopened.entry(OBJECT) is None
    assert reopened.used_bytes == 0 and not any((cache_dir / "blocks").iterdir())
    reopened.close()
    make_cache(cache_dir, key=OTHER_KEY).close()  # now it is the other key's cache
    with pytest.raises(CacheMismatch):
        await _reopen_with_pending_under(cache_dir, KEY, OTHER_KEY)


async def _reopen_with_pending_under(cache_dir: Path, writer: SseKey, reader: SseKey) -> None:
    cache = make_cache(cache_dir, key=writer)
    await cache.sync(new_entry(cache, "pending"))
    cache.close()
    make_cache(cache_dir, key=reader).close()


async def test_cache_written_under_a_previous_key_stays_readable_after_rotation(cache_dir: Path) -> None:
    from ssefs.keys import KeyRing

    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    await cache.write_block(entry, 0, b"written before the rotation", dirty=True)
    cache.record_change(entry, size=27)
    await cache.sync(entry)
    cache.close()
    rotated = BlockCache(cache_dir, KeyRing(OTHER_KEY, (KEY,)), identity=IDENTITY, max_size=1 << 40)
    reopened_entry = rotated.entry(OBJECT)
    assert reopened_entry is not None and reopened_entry.dirty
    block = await rotated.read_block(reopened_entry, 0)
    assert block is not None and block.startswith(b"written before the rotation")
    rotated.close()


async def test_reopening_for_another_bucket_is_refused(cache_dir: Path) -> None:
    make_cache(cache_dir).close()
    with pytest.raises(CacheMismatch, match="https://s3.test/bucket/") as caught:
        make_cache(cache_dir, identity="https://s3.test/other/")
    assert "https://s3.test/other/" in str(caught.value)
    assert isinstance(caught.value, SsefsError)
    make_cache(cache_dir).close()


# ------------------------------------------------------------------ tampering


@pytest.mark.parametrize("damage", ["magic", "nonce", "ciphertext", "tag", "truncated", "deleted"])
async def test_damaged_dirty_block_raises(cache: BlockCache, damage: str) -> None:
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(10, b"precious" * 1000)
    await cached.seal_hot()
    path = block_file(cache, entry, 0)
    assert path.stat().st_size == sealed_size(10 + 8000)  # the zeros after the data are not stored
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "deleted":
        path.unlink()
    else:
        position = {"magic": 0, "nonce": len(BLOCK_MAGIC) + 3, "ciphertext": 4000, "tag": sealed_size(8010) - 1}
        flip_byte(path, position[damage])
    # (A fresh CachedFile: the writer's own remembers the block it sealed, intact, in memory.)
    with pytest.raises(CorruptBlock) as caught:
        await CachedFile(cache, entry, FakeS3().fetch_range).read(0, 100)
    assert isinstance(caught.value, SsefsError)
    assert OBJECT in str(caught.value)
    # It stays an error: the damaged data is never served, nor silently replaced.
    with pytest.raises(CorruptBlock):
        await CachedFile(cache, entry, FakeS3().fetch_range).read(0, 100)


async def test_damaged_clean_block_is_fetched_again(cache: BlockCache, caplog: pytest.LogCaptureFixture) -> None:
    base = random.Random(11).randbytes(2 * MiB + 5)
    fake = FakeS3({OBJECT: base})
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range)
    assert await cached.read(MiB, 100) == base[MiB:MiB + 100]
    assert fake.calls == [(OBJECT, MiB, BLOCK_SIZE)]
    assert cache.has_block(entry, 1) and not entry.dirty

    flip_byte(block_file(cache, entry, 1), 5000)
    fake.calls.clear()
    # A new view of the entry: the first one still remembers the block it decrypted last.
    cached = CachedFile(cache, entry, fake.fetch_range)
    with caplog.at_level(logging.WARNING, logger="ssefs.cache"):
        assert await cached.read(MiB, MiB + 5) == base[MiB:]
    # Block 1 again, and the first time block 2 (only the 5 bytes the object has there).
    assert fake.calls == [(OBJECT, MiB, BLOCK_SIZE), (OBJECT, 2 * MiB, 5)]
    assert any(record.levelno == logging.WARNING and "damaged" in record.getMessage() for record in caplog.records)
    # Stored again, intact.
    fake.calls.clear()
    assert await CachedFile(cache, entry, fake.fetch_range).read(MiB, MiB + 5) == base[MiB:]
    assert fake.calls == []


async def test_uploaded_block_damaged_is_fetched_again(cache: BlockCache) -> None:
    entry = new_entry(cache, OBJECT)
    fake = FakeS3()
    cached = CachedFile(cache, entry, fake.fetch_range)
    data = random.Random(12).randbytes(MiB + 100)
    await cached.write(0, data)
    await cached.seal_hot()
    await cache.sync(entry)
    fake.objects[OBJECT] = data
    cache.mark_uploaded(entry, entry.generation, etag="u1", size=len(data))
    flip_byte(block_file(cache, entry, 0), 1234)
    # A fresh CachedFile: the writer's own still remembers the intact block in memory.
    assert await CachedFile(cache, entry, fake.fetch_range).read(0, len(data)) == data
    assert fake.calls == [(OBJECT, 0, BLOCK_SIZE)]


async def test_block_moved_to_another_index_fails(cache: BlockCache) -> None:
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"A" * BLOCK_SIZE + b"B" * BLOCK_SIZE)
    await cached.seal_hot()
    zero, one = block_file(cache, entry, 0), block_file(cache, entry, 1)
    sealed_zero, sealed_one = zero.read_bytes(), one.read_bytes()
    zero.write_bytes(sealed_one)
    one.write_bytes(sealed_zero)
    with pytest.raises(CorruptBlock):
        await CachedFile(cache, entry, FakeS3().fetch_range).read(0, 10)
    with pytest.raises(CorruptBlock):
        await CachedFile(cache, entry, FakeS3().fetch_range).read(BLOCK_SIZE, 10)


async def test_block_moved_to_another_entry_fails(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    first, second = new_entry(cache, "first"), new_entry(cache, "second")
    for entry, fill in [(first, b"1"), (second, b"2")]:
        cached = CachedFile(cache, entry, FakeS3().fetch_range)
        await cached.write(0, fill * 1000)
        await cached.seal_hot()
        await cache.sync(entry)
    block_file(cache, second, 0).write_bytes(block_file(cache, first, 0).read_bytes())
    with pytest.raises(CorruptBlock):
        await CachedFile(cache, second, FakeS3().fetch_range).read(0, 10)
    cache.close()
    # Also after reopening (the entry's id used for authentication is persistent).
    reopened = make_cache(cache_dir)
    first_again, second_again = reopened.entry("first"), reopened.entry("second")
    assert first_again is not None and second_again is not None
    assert await CachedFile(reopened, first_again, FakeS3().fetch_range).read(0, 10) == b"1" * 10
    with pytest.raises(CorruptBlock):
        await CachedFile(reopened, second_again, FakeS3().fetch_range).read(0, 10)
    reopened.close()


async def test_blocks_sealed_under_another_key_fail(tmp_path: Path) -> None:
    ours, theirs = make_cache(tmp_path / "ours"), make_cache(tmp_path / "theirs", key=OTHER_KEY)
    mine, foreign = new_entry(ours, OBJECT), new_entry(theirs, OBJECT)
    for cache, entry in [(ours, mine), (theirs, foreign)]:
        cached = CachedFile(cache, entry, FakeS3().fetch_range)
        await cached.write(0, b"data")
        await cached.seal_hot()
    block_file(ours, mine, 0).write_bytes(block_file(theirs, foreign, 0).read_bytes())
    with pytest.raises(CorruptBlock):
        await CachedFile(ours, mine, FakeS3().fetch_range).read(0, 4)
    ours.close()
    theirs.close()


# ------------------------------------------------------------------ entries


async def test_rename_entry(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    entry = new_entry(cache, "old")
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"renamed data")
    await cached.seal_hot()
    victim = new_entry(cache, "taken")
    victim_file = CachedFile(cache, victim, FakeS3().fetch_range)
    await victim_file.write(0, b"v" * 100)
    await victim_file.seal_hot()
    used_before = cache.used_bytes

    cache.rename_entry(entry, "new")
    assert cache.entry("old") is None and cache.entry("new") is entry and entry.object_key == "new"
    cache.rename_entry(entry, "taken")  # replaces what was there
    assert cache.entry("new") is None and cache.entry("taken") is entry
    assert not cache.is_live(victim) and cache.is_live(entry)
    assert not (cache_dir / "blocks" / str(victim.id)).exists()
    assert cache.used_bytes == used_before - sealed_size(100)
    assert await cached.read(0, 100) == b"renamed data"
    await cache.sync(entry)
    cache.close()

    reopened = make_cache(cache_dir)
    again = reopened.entry("taken")
    assert again is not None and again.id == entry.id
    assert reopened.entry("old") is None and reopened.entry("new") is None
    assert len(reopened.entries()) == 1
    assert await CachedFile(reopened, again, FakeS3().fetch_range).read(0, 100) == b"renamed data"
    reopened.close()


async def test_drop_entry_removes_blocks(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    keep, dropped = new_entry(cache, "keep"), new_entry(cache, "drop")
    for entry in (keep, dropped):
        cached = CachedFile(cache, entry, FakeS3().fetch_range)
        await cached.write(0, b"q" * (2 * BLOCK_SIZE + 10))
        await cached.seal_hot()
        await cache.sync(entry)
    per_entry = 2 * SEALED_BLOCK + sealed_size(10)
    assert cache.used_bytes == 2 * per_entry
    cache.drop_entry(dropped)
    assert cache.used_bytes == per_entry
    assert cache.dirty_bytes == per_entry
    assert not (cache_dir / "blocks" / str(dropped.id)).exists()
    assert cache.entry("drop") is None and not cache.is_live(dropped)
    assert cache.dirty_entries() == [keep]
    cache.close()

    reopened = make_cache(cache_dir)
    assert reopened.entry("drop") is None
    assert [entry.object_key for entry in reopened.entries()] == ["keep"]
    assert reopened.used_bytes == per_entry
    reopened.close()


async def test_create_entry_replaces_existing(cache: BlockCache) -> None:
    old = new_entry(cache, OBJECT)
    cached = CachedFile(cache, old, FakeS3().fetch_range)
    await cached.write(0, b"old contents")
    await cached.seal_hot()
    assert cache.used_bytes == sealed_size(len(b"old contents"))

    base = b"fresh object in S3"
    fake = FakeS3({OBJECT: base})
    replacement = based_entry(cache, OBJECT, base)
    assert replacement is not old and replacement.uid != old.uid
    assert cache.entry(OBJECT) is replacement
    assert not cache.is_live(old) and cache.is_live(replacement)
    assert cache.used_bytes == 0
    assert not (cache.directory / "blocks" / str(old.id)).exists()
    assert not replacement.dirty and replacement.size == len(base)
    assert await CachedFile(cache, replacement, fake.fetch_range).read(0, 100) == base


async def test_orphan_block_files_are_removed_at_start(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"kept")
    await cached.seal_hot()
    await cache.sync(entry)
    used = cache.used_bytes
    cache.close()

    blocks = cache_dir / "blocks"
    real = blocks / str(entry.id) / "0"
    orphans = [blocks / str(entry.id) / "7", blocks / str(entry.id) / ".3.tmp", blocks / "99999" / "0"]
    (blocks / "99999").mkdir()
    for orphan in orphans:
        orphan.write_bytes(real.read_bytes())

    reopened = make_cache(cache_dir)
    assert [orphan for orphan in orphans if orphan.exists()] == []
    assert not (blocks / "99999").exists()
    assert real.exists()
    assert reopened.used_bytes == used
    again = reopened.entry(OBJECT)
    assert again is not None
    assert await CachedFile(reopened, again, FakeS3().fetch_range).read(0, 10) == b"kept"
    reopened.close()


async def test_journal_rows_without_files_are_dropped_at_start(cache_dir: Path) -> None:
    base = random.Random(13).randbytes(2 * MiB)
    fake = FakeS3({OBJECT: base})
    cache = make_cache(cache_dir)
    entry = based_entry(cache, OBJECT, base)
    assert await CachedFile(cache, entry, fake.fetch_range).read(0, 2 * MiB) == base  # two clean blocks
    cache.close()
    block_file(cache, entry, 1).unlink()

    reopened = make_cache(cache_dir)
    again = reopened.entry(OBJECT)
    assert again is not None
    assert reopened.used_bytes == SEALED_BLOCK
    assert not reopened.has_block(again, 1)
    fake.calls.clear()
    assert await CachedFile(reopened, again, fake.fetch_range).read(0, 2 * MiB) == base
    assert fake.calls == [(OBJECT, MiB, BLOCK_SIZE)]
    reopened.close()


# ------------------------------------------------------------------ regressions (bugs found and fixed)


@pytest.mark.parametrize("then", ["counted", "evicted after reopening", "damaged"])
@pytest.mark.parametrize("clean_because", ["existing object", "just uploaded"])
async def test_blocks_of_a_multi_block_write_into_a_clean_entry_are_dirty(
    cache_dir: Path, clean_because: str, then: str
) -> None:
    base = random.Random(14).randbytes(3 * MiB)
    fake = FakeS3({OBJECT: base})
    cache = make_cache(cache_dir)
    if clean_because == "existing object":
        entry = based_entry(cache, OBJECT, base)
    else:
        entry = new_entry(cache, OBJECT)
        uploader = CachedFile(cache, entry, fake.fetch_range)
        await uploader.write(0, base)
        await uploader.seal_hot()
        await cache.sync(entry)
        cache.mark_uploaded(entry, entry.generation, etag="u1", size=len(base))
    assert not entry.dirty
    cached = CachedFile(cache, entry, fake.fetch_range)
    await cached.write(BLOCK_SIZE - 10, b"N" * 20)  # spans blocks 0 and 1; block 0 is sealed by it
    await cached.seal_hot()
    await cache.sync(entry)
    if then == "counted":
        dirty_bytes = cache.dirty_bytes
        cache.close()
        assert dirty_bytes == 2 * SEALED_BLOCK  # fails: block 0 is counted as clean
        return
    if then == "damaged":
        flip_byte(block_file(cache, entry, 0), 1000)
        try:
            with pytest.raises(CorruptBlock):  # fails: the old bytes are fetched again, with a warning
                await CachedFile(cache, entry, fake.fetch_range).read(BLOCK_SIZE - 10, 20)
        finally:
            cache.close()
        return
    cache.close()
    reopened = make_cache(cache_dir)
    again = reopened.entry(OBJECT)
    assert again is not None and again.dirty
    reopened.evict_clean(reopened.max_size)  # may drop clean blocks only
    data = await CachedFile(reopened, again, fake.fetch_range).read(BLOCK_SIZE - 10, 20)
    reopened.close()
    assert data == b"N" * 20  # fails: block 0 was evicted and the old bytes came back from S3


async def test_read_racing_truncate_does_not_resurrect_old_bytes(cache: BlockCache) -> None:
    base = random.Random(15).randbytes(3 * MiB)
    fake = FakeS3({OBJECT: base})
    fake.gate = trio.Event()
    entry = based_entry(cache, OBJECT, base)
    cached = CachedFile(cache, entry, fake.fetch_range)

    async def reader() -> None:
        await cached.read(2 * MiB, 10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await fake.started.wait()  # the GET of block 2 is in flight
        await cached.truncate(MiB)  # drops block 2 (aligned: fetches nothing)
        fake.gate.set()
    await cached.truncate(3 * MiB)
    assert await cached.read(2 * MiB, 10) == bytes(10)  # fails: base bytes of block 2


async def test_entry_ids_are_not_reused(cache: BlockCache) -> None:
    first = new_entry(cache, "a")
    cache.drop_entry(first)
    second = new_entry(cache, "b")
    assert second.id != first.id


async def test_writes_never_synced_before_a_crash_still_count_as_dirty(cache_dir: Path) -> None:
    """The daemon died before close(): blocks already on disk must be uploaded, not forgotten."""
    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    for offset in range(0, 2 * MiB + 128 * 1024, 128 * 1024):  # as FUSE delivers writes
        await cached.write(offset, b"a" * 128 * 1024)  # blocks 0 and 1 get sealed; block 2 stays hot
    cache.close()  # no seal_hot, no sync: like kill -9
    reopened = make_cache(cache_dir)
    try:
        recovered = reopened.entry(OBJECT)
        assert recovered is not None and recovered.dirty
        assert reopened.dirty_entries() == [recovered]
        assert reopened.has_dirty_blocks(recovered, 0, 1)
        assert recovered.size == 2 * MiB  # everything that reached the disk; the hot block did not
        data = await CachedFile(reopened, recovered, FakeS3().fetch_range).read(0, recovered.size)
        assert data == b"a" * (2 * MiB)
    finally:
        reopened.close()


def test_one_daemon_per_cache_directory(cache: BlockCache, cache_dir: Path) -> None:
    with pytest.raises(CacheMismatch, match="in use by another ssefs daemon"):
        make_cache(cache_dir)


async def test_block_rewritten_within_one_write_is_not_served_from_memory(cache: BlockCache) -> None:
    """A block decrypted, then changed and sealed in the same generation, must be read as changed."""
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"a" * (2 * MiB))
    await cached.seal_hot()
    await cached.read(0, 10)  # block 0 is now the last block decrypted
    await cached.write(MiB - 5, b"b" * 10)  # changes block 0 and seals it, moving on to block 1
    assert await cached.read(MiB - 5, 10) == b"b" * 10
    await cached.seal_hot()
    assert await cached.read(MiB - 5, 10) == b"b" * 10


async def test_entries_without_blocks_or_changes_are_forgotten(cache_dir: Path) -> None:
    """The journal must not grow with every file ever read."""
    cache = make_cache(cache_dir, max_size=2 * MiB + 4096)
    base = random.Random(20).randbytes(MiB)
    fake = FakeS3({f"file-{n}": base for n in range(5)})
    for n in range(5):
        entry = based_entry(cache, f"file-{n}", base)
        await CachedFile(cache, entry, fake.fetch_range).read(0, MiB)
    # Only about two blocks fit: the entries whose blocks were evicted are gone too.
    assert len(cache.entries()) <= 3
    assert cache.entry("file-4") is not None
    dirty = new_entry(cache, "dirty")
    await CachedFile(cache, dirty, fake.fetch_range).write(0, b"x")
    cache.drop_if_empty(dirty)
    assert cache.entry("dirty") is dirty  # changes not uploaded: kept
    cache.close()


async def test_dropped_entries_lose_their_files_in_the_background(cache: BlockCache) -> None:
    entry = based_entry(cache, OBJECT, b"x" * 10)
    await cache.write_block(entry, 0, b"x" * 10, dirty=False)
    directory = block_file(cache, entry, 0).parent
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.remove_dropped_files)
        cache.drop_entry(entry)
        assert cache.entry(OBJECT) is None and cache.used_bytes == 0
        with trio.fail_after(10):
            while directory.exists():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # Without the background task (as at shutdown) the files go at once.
    second = based_entry(cache, "other", b"y")
    await cache.write_block(second, 0, b"y", dirty=False)
    cache.drop_entry(second)
    assert not block_file(cache, second, 0).parent.exists()


async def test_trailing_zeros_are_not_stored_and_whole_blocks_of_older_caches_still_read(cache: BlockCache) -> None:
    from ssefs import cache as cache_module

    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"small file")
    await cached.write(3 * BLOCK_SIZE + 5, b"\0\0\0")  # a block of zeros only
    await cached.seal_hot()
    assert block_file(cache, entry, 0).stat().st_size == sealed_size(len(b"small file"))
    assert block_file(cache, entry, 3).stat().st_size == sealed_size(0)
    assert await cached.read(0, 20) == b"small file" + bytes(10)
    assert (await cache.read_block(entry, 0)) == b"small file"  # the rest of the block reads as zeros
    assert (await cache.read_block(entry, 3)) == b""
    assert await cached.read(3 * BLOCK_SIZE, 10) == bytes(8)  # the file ends 8 bytes into block 3
    # A block as an earlier version wrote it: whole, under the old tag.
    path = block_file(cache, entry, 0)
    nonce = b"\1" * NONCE_BYTES
    whole = b"older" + bytes(BLOCK_SIZE - 5)
    sealed = cache._cipher(entry).encrypt(nonce, whole, cache._associated_data(entry, 0))
    path.write_bytes(cache_module.WHOLE_BLOCK_MAGIC + nonce + sealed)
    assert (await cache.read_block(entry, 0)) == whole


# ---------------------------------------------------------------- blocks kept in their journal row


def inline_data(cache: BlockCache, entry: Entry, index: int) -> bytes | None:
    row = cache._db.execute("SELECT data FROM blocks WHERE entry_id = ? AND block_index = ?",
                            (entry.id, index)).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def set_inline_data(cache: BlockCache, entry: Entry, index: int, data: bytes) -> None:
    cache._db.execute("UPDATE blocks SET data = ? WHERE entry_id = ? AND block_index = ?", (data, entry.id, index))


async def test_small_blocks_live_in_the_journal_sealed_and_need_one_fsync(cache_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache(cache_dir, inline_limit=INLINE_LIMIT)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    secret = b"small secret file " * 100
    await cached.write(0, secret)
    await cached.seal_hot()
    fsyncs = count_fsyncs(monkeypatch)
    await cache.sync(entry)
    assert len(fsyncs) == 1  # the journal's log: no block file, no directory
    assert not (cache_dir / "blocks" / str(entry.id)).exists()
    sealed = inline_data(cache, entry, 0)
    assert sealed is not None and sealed.startswith(BLOCK_MAGIC) and len(sealed) == sealed_size(len(secret))
    assert cache.used_bytes == len(sealed)
    cache.close()
    for path in cache_dir.rglob("*"):  # no plaintext anywhere: journal, its log, blocks
        if path.is_file():
            assert b"small secret" not in path.read_bytes(), path
    reopened = make_cache(cache_dir, inline_limit=INLINE_LIMIT)
    again = reopened.entry(OBJECT)
    assert again is not None and again.dirty and reopened.used_bytes == len(sealed)
    assert await CachedFile(reopened, again, FakeS3().fetch_range).read(0, 10_000) == secret
    reopened.close()


@pytest.mark.parametrize("damage", ["flipped", "moved to another block", "emptied"])
async def test_a_damaged_inline_block_is_an_error_when_dirty_and_fetched_again_when_clean(
    cache_dir: Path, damage: str
) -> None:
    cache = make_cache(cache_dir, inline_limit=INLINE_LIMIT)
    entry = new_entry(cache, OBJECT)
    cached = CachedFile(cache, entry, FakeS3().fetch_range)
    await cached.write(0, b"precious" * 100)
    await cached.write(BLOCK_SIZE, b"second block")
    await cached.seal_hot()
    first, second = inline_data(cache, entry, 0), inline_data(cache, entry, 1)
    assert first is not None and second is not None
    if damage == "flipped":
        set_inline_data(cache, entry, 0, first[:100] + bytes([first[100] ^ 1]) + first[101:])
    elif damage == "moved to another block":
        set_inline_data(cache, entry, 0, second)  # sealed for block 1: its associated data does not fit
    else:
        set_inline_data(cache, entry, 0, b"")
    with pytest.raises(CorruptBlock, match="journal.sqlite"):
        await CachedFile(cache, entry, FakeS3().fetch_range).read(0, 100)
    # Once uploaded, a damaged copy is dropped and the bytes come from S3 again.
    fake = FakeS3({OBJECT: b"precious" * 100 + bytes(BLOCK_SIZE - 800) + b"second block"})
    cache.mark_uploaded(entry, entry.generation, etag="e", size=BLOCK_SIZE + 12)
    assert await CachedFile(cache, entry, fake.fetch_range).read(0, 16) == b"preciousprecious"
    assert fake.calls == [(OBJECT, 0, BLOCK_SIZE)]
    cache.close()


async def test_a_block_moves_between_file_and_journal_row_as_it_grows_and_shrinks(cache_dir: Path) -> None:
    cache = make_cache(cache_dir, inline_limit=INLINE_LIMIT)
    entry = new_entry(cache, OBJECT)
    small, large = b"s" * 1000, random.Random(5).randbytes(INLINE_LIMIT + 1)
    for content, in_file in ((small, False), (large, True), (small, False)):
        await cache.write_block(entry, 0, content, dirty=True)
        await cache.sync(entry)
        assert block_file(cache, entry, 0).exists() == in_file
        assert (inline_data(cache, entry, 0) is None) == in_file
        assert await cache.read_block(entry, 0) == content
        assert cache.used_bytes == sealed_size(len(content))
    # A crash between a row taking the block inline and the removal of the old file: the next
    # start removes the stale file and keeps the row.
    await cache.write_block(entry, 1, large, dirty=True)
    stale = block_file(cache, entry, 1).read_bytes()
    await cache.write_block(entry, 1, small, dirty=True)
    block_file(cache, entry, 1).write_bytes(stale)
    await cache.sync(entry)
    cache.close()
    reopened = make_cache(cache_dir, inline_limit=INLINE_LIMIT)
    again = reopened.entry(OBJECT)
    assert again is not None and not block_file(reopened, again, 1).exists()
    assert await reopened.read_block(again, 1) == small
    assert reopened.used_bytes == 2 * sealed_size(len(small))
    reopened.close()


async def test_inline_blocks_are_evicted_like_files(cache_dir: Path) -> None:
    cache = make_cache(cache_dir, max_size=3 * sealed_size(5000), inline_limit=INLINE_LIMIT)
    entries = []
    for number in range(3):
        entry = based_entry(cache, f"clean{number}", bytes(5000))
        await cache.write_block(entry, 0, bytes([number + 1]) * 5000, dirty=False)
        entries.append(entry)
    assert cache.used_bytes == 3 * sealed_size(5000)
    cache.evict_clean(sealed_size(5000))  # the least recently used goes: its row and its bytes
    assert cache.used_bytes == 2 * sealed_size(5000)
    assert cache._db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0] == 2
    assert await cache.read_block(entries[1], 0) == bytes([2]) * 5000
    cache.close()


async def test_a_format_2_cache_is_upgraded_in_place_and_older_formats_are_refused(cache_dir: Path) -> None:
    """A cache of the previous version (blocks only in files, no ``data`` column) keeps its dirty data."""
    import sqlite3

    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    await cache.write_block(entry, 0, b"written by the previous version", dirty=True)
    await cache.sync(entry)
    cache.close()
    with contextlib.closing(sqlite3.connect(cache_dir / "journal.sqlite")) as db:
        db.execute("ALTER TABLE blocks DROP COLUMN data")
        db.execute("ALTER TABLE entries DROP COLUMN parked_bytes")
        for column in ("entry_id", "part_size", "completed_etag"):
            db.execute(f"ALTER TABLE multipart_uploads DROP COLUMN {column}")
        db.execute("DROP TABLE parked_parts")
        db.execute("UPDATE meta SET value = '2' WHERE name = 'format'")
        db.commit()
    upgraded = make_cache(cache_dir, inline_limit=INLINE_LIMIT)
    again = upgraded.entry(OBJECT)
    assert again is not None and again.dirty
    assert await upgraded.read_block(again, 0) == b"written by the previous version"
    await upgraded.write_block(again, 1, b"small, now inline", dirty=True)
    assert inline_data(upgraded, again, 1) is not None
    assert upgraded._db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()[0] == "4"
    assert upgraded.parked_uploads() == [] and again.parked_bytes == 0
    upgraded.close()
    with contextlib.closing(sqlite3.connect(cache_dir / "journal.sqlite")) as db:
        db.execute("UPDATE meta SET value = '1' WHERE name = 'format'")
        db.commit()
    with pytest.raises(CacheMismatch, match="format '1'"):
        make_cache(cache_dir)


async def test_dropped_clean_entries_leave_the_journal_in_batches_dirty_ones_at_once(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A clean entry dropped (an uploaded file deleted) keeps its journal rows until a batch of them goes
    in one commit: lost in a crash, they bring back only a clean copy, never an upload. A dirty entry's
    rows go at once. The key can be used again at once, and what a crash finds is read from the journal
    as another connection sees it."""
    from ssefs import cache as cache_module

    monkeypatch.setattr(cache_module, "DROPPED_ROWS_BATCH", 3)
    cache = make_cache(cache_dir, inline_limit=64 * 1024)
    journal = sqlite3.connect(cache_dir / "journal.sqlite")  # what a crash now would leave

    def rows(object_key: str) -> list[tuple[int, int]]:
        return journal.execute("SELECT generation, uploaded_generation FROM entries WHERE object_key = ?",
                               (object_key,)).fetchall()

    def uploaded(object_key: str, data: bytes) -> Entry:
        entry = new_entry(cache, object_key)
        cache.record_change(entry, size=len(data))
        cache.mark_uploaded(entry, entry.generation, etag="e-" + object_key, size=len(data))
        return entry

    dirty = new_entry(cache, "dirty")
    cache.drop_entry(dirty)
    assert rows("dirty") == []
    cache.drop_entry(uploaded("a", b"aa"))
    cache.drop_entry(uploaded("b", b"bb"))
    assert [len(rows(key)) for key in ("a", "b")] == [1, 1]
    assert all(generation == uploaded_at for generation, uploaded_at in rows("a") + rows("b"))  # clean
    new_entry(cache, "a")  # the key is used again before its old rows are gone: the pending rows go first
    assert len(rows("a")) == 1 and rows("b") == []
    cache.drop_entry(uploaded("c", b"cc"))
    cache.drop_entry(uploaded("d", b"dd"))
    assert [len(rows(key)) for key in ("c", "d")] == [1, 1]
    cache.drop_entry(uploaded("e", b"ee"))  # the third pending drop: one commit for all three
    assert [rows(key) for key in ("c", "d", "e")] == [[], [], []]
    cache.drop_entry(uploaded("f", b"ff"))
    assert len(rows("f")) == 1
    cache.close()
    assert rows("f") == [] and len(rows("a")) == 1
    journal.close()
    reopened = make_cache(cache_dir)
    assert [entry.object_key for entry in reopened.entries()] == ["a"]
    reopened.close()


async def test_parked_parts_leave_the_cache_and_come_back_from_the_journal_until_the_upload_is_marked(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parking records the parts and lets their blocks go only after an fsync of the journal; a restart
    finds the upload to resume (never to abort); a completion survives in the journal with its ETag until
    the entry is marked uploaded, in the same commit that forgets the parts; an abort forgets them at once."""
    part = 2 * BLOCK_SIZE
    cache = make_cache(cache_dir)
    entry = new_entry(cache, OBJECT)
    for index in range(5):
        await cache.write_block(entry, index, bytes([index + 1]) * BLOCK_SIZE, dirty=True)
    cache.record_change(entry, size=5 * BLOCK_SIZE)
    await cache.sync(entry)
    cache.multipart_started(OBJECT, "upload-1")
    fsyncs = count_fsyncs(monkeypatch)
    removed_before_fsync: list[bool] = []
    real_fsync = os.fsync

    def fsync_noting_files(fd: int) -> None:
        removed_before_fsync.append(not block_file(cache, entry, 0).exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_noting_files)
    cache.record_change(entry, size=5 * BLOCK_SIZE + 100)  # a writer's hot block, counted but not stored
    await cache.park(entry, "upload-1", part, {0: "etag-1", 1: "etag-2"})
    assert fsyncs and removed_before_fsync == [False]  # the journal was durable before the first file went
    assert entry.parked_bytes == 2 * part and entry.dirty
    assert sorted(index for index in range(5) if cache.has_block(entry, index)) == [4]
    assert not block_file(cache, entry, 0).exists() and block_file(cache, entry, 4).exists()
    assert cache.used_bytes == sealed_size(BLOCK_SIZE)
    cache.close()

    cache = make_cache(cache_dir)
    again = cache.entry(OBJECT)
    assert again is not None and again.parked_bytes == 2 * part
    assert again.size == 5 * BLOCK_SIZE  # the size saved before: a crash does not pad with the lost hot block
    [parked] = cache.parked_uploads()
    assert (parked.entry, parked.upload_id, parked.part_size, parked.etags, parked.completed_etag) == (
        again, "upload-1", part, {0: "etag-1", 1: "etag-2"}, None)
    # Completed (store.complete_multipart), then a crash before the entry was marked uploaded.
    cache.multipart_finished("upload-1", "final-etag")
    cache.close()
    cache = make_cache(cache_dir)
    again = cache.entry(OBJECT)
    assert again is not None
    [parked] = cache.parked_uploads()
    assert parked.completed_etag == "final-etag"
    cache.mark_uploaded(again, again.generation, etag="final-etag", size=again.size)
    assert again.parked_bytes == 0 and cache.parked_uploads() == [] and cache.unfinished_multiparts() == []
    assert cache._db.execute("SELECT COUNT(*) FROM parked_parts").fetchone()[0] == 0
    cache.close()
    cache = make_cache(cache_dir)
    again = cache.entry(OBJECT)
    assert again is not None and again.parked_bytes == 0 and not again.dirty
    # An aborted upload (the file was deleted) forgets its parked parts with it.
    cache.multipart_started("other.bin", "upload-2")
    other = new_entry(cache, "other.bin")
    await cache.write_block(other, 0, b"x" * BLOCK_SIZE, dirty=True)
    await cache.park(other, "upload-2", BLOCK_SIZE, {0: "etag-a"})
    cache.drop_entry(other)
    assert cache.parked_uploads() == []  # its entry is gone: nothing to resume, so the start aborts it
    assert [upload_id for _key, upload_id, _started in cache.unfinished_multiparts()] == ["upload-2"]
    cache.multipart_finished("upload-2")
    assert cache.unfinished_multiparts() == []
    assert cache._db.execute("SELECT COUNT(*) FROM parked_parts").fetchone()[0] == 0
    cache.close()
