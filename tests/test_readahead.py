"""Read-ahead decisions, against an in-memory object (pure logic)."""

from __future__ import annotations

import secrets

from ssefs.readahead import MAX_WINDOW, MIN_WINDOW, SequentialReader

OBJECT = secrets.token_bytes(40 * 1024 * 1024 + 17)
KERNEL_READ = 128 * 1024


class RecordingFetch:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return OBJECT[offset:offset + length]


async def test_sequential_reads_fetch_growing_windows_and_return_exact_bytes() -> None:
    reader, fetch = SequentialReader(), RecordingFetch()
    received = bytearray()
    offset = 0
    while True:
        chunk = await reader.read(offset, KERNEL_READ, 0, fetch)
        if not chunk:
            break
        received += chunk
        offset += len(chunk)
    assert bytes(received) == OBJECT
    lengths = [length for _offset, length in fetch.calls]
    assert lengths[0] == MIN_WINDOW and max(lengths) == MAX_WINDOW
    assert len(fetch.calls) < len(OBJECT) // MAX_WINDOW + 6  # instead of one per 128 KiB


async def test_random_reads_fetch_only_what_is_asked() -> None:
    reader, fetch = SequentialReader(), RecordingFetch()
    await reader.read(0, 4096, 0, fetch)
    fetch.calls.clear()
    for offset in (30_000_000, 5_000_000, 12_345_678):
        assert await reader.read(offset, 4096, 0, fetch) == OBJECT[offset:offset + 4096]
    assert fetch.calls == [(30_000_000, 4096), (5_000_000, 4096), (12_345_678, 4096)]


async def test_a_change_discards_the_buffer() -> None:
    reader, fetch = SequentialReader(), RecordingFetch()
    await reader.read(0, 4096, 0, fetch)
    await reader.read(4096, 4096, 0, fetch)
    assert len(fetch.calls) == 1
    await reader.read(8192, 4096, 1, fetch)  # generation moved on: fetch again
    assert len(fetch.calls) == 2


async def test_reads_past_the_end_are_short_and_cached() -> None:
    reader, fetch = SequentialReader(), RecordingFetch()
    tail_offset = len(OBJECT) - 100
    reader._next_offset = tail_offset  # as if we had read sequentially up to here
    assert await reader.read(tail_offset, 4096, 0, fetch) == OBJECT[tail_offset:]
    assert await reader.read(len(OBJECT), 4096, 0, fetch) == b""
    assert len(fetch.calls) == 1
