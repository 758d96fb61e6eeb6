"""Tests for ssefs.uploader: keeping multipart uploads within S3's limits (part_size_for), and when the
write-back starts uploads (WriteBack's scheduling, with the uploads themselves left out)."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing

from ssefs.config import MAX_PART_SIZE, MIN_PART_SIZE, MiB
from ssefs.uploader import MAX_PARTS, WriteBack, part_size_for

GiB = 1024 * MiB
TiB = 1024 * GiB


def test_s3_limits() -> None:
    assert MAX_PARTS == 10_000
    assert MAX_PART_SIZE == 5 * GiB
    assert MIN_PART_SIZE == 5 * MiB


@pytest.mark.parametrize("total", [0, 1, 8 * MiB, 17 * MiB, GiB, 10 * GiB, 8 * MiB * MAX_PARTS])
@pytest.mark.parametrize("configured", [5 * MiB, 8 * MiB, 64 * MiB])
def test_small_files_keep_configured_part_size(total: int, configured: int) -> None:
    if math.ceil(total / configured) > MAX_PARTS:
        # 80,000 MiB in 5 MiB parts would be 16,000 parts: this one must grow.
        assert part_size_for(total, configured) == 8 * MiB
    else:
        assert part_size_for(total, configured) == configured


def test_exactly_ten_thousand_parts_keeps_part_size() -> None:
    assert part_size_for(8 * MiB * MAX_PARTS, 8 * MiB) == 8 * MiB
    # One byte more would need 10,001 parts: the part size grows by 1 MiB.
    assert part_size_for(8 * MiB * MAX_PARTS + 1, 8 * MiB) == 9 * MiB


def test_configured_part_size_need_not_be_whole_mib() -> None:
    configured = 5 * MiB + 12345
    assert part_size_for(GiB, configured) == configured


def test_hundred_gib_with_8mib_parts_grows() -> None:
    total = 100 * GiB
    part = part_size_for(total, 8 * MiB)
    assert part > 8 * MiB
    assert math.ceil(total / part) <= MAX_PARTS
    assert part % MiB == 0
    # The smallest whole-MiB part size that fits: 100 GiB / 10,000 is about 10.24 MiB.
    assert part == 11 * MiB
    assert math.ceil(total / (part - MiB)) > MAX_PARTS


@pytest.mark.parametrize(
    "total",
    [80 * GiB, 100 * GiB, 500 * GiB, TiB, 3 * TiB + 7, 5 * TiB, 10_000 * 8 * MiB + 1, 123_456_789_012],
)
@pytest.mark.parametrize("configured", [5 * MiB, 8 * MiB, 16 * MiB])
def test_part_count_never_exceeds_limit(total: int, configured: int) -> None:
    part = part_size_for(total, configured)
    assert part >= configured
    assert part <= MAX_PART_SIZE
    assert math.ceil(total / part) <= MAX_PARTS
    if part != configured:
        assert part % MiB == 0
        # Minimal: one MiB less would not fit (or the configured size would have).
        assert math.ceil(total / (part - MiB)) > MAX_PARTS


@pytest.mark.parametrize("total", [50 * TiB, 51 * TiB, 100 * TiB, 2**63])
def test_part_size_never_exceeds_5gib(total: int) -> None:
    assert part_size_for(total, 8 * MiB) == MAX_PART_SIZE
    assert part_size_for(total, MAX_PART_SIZE) == MAX_PART_SIZE


def test_just_below_the_cap() -> None:
    total = MAX_PARTS * (MAX_PART_SIZE - MiB)
    assert part_size_for(total, 8 * MiB) == MAX_PART_SIZE - MiB
    assert part_size_for(total + 1, 8 * MiB) == MAX_PART_SIZE


class _RecordingWriteBack(WriteBack):
    """The write-back's scheduling alone: an "upload" takes ``upload_seconds`` and is recorded."""

    def __init__(self, upload_seconds: float) -> None:
        super().__init__(cast(Any, None), cast(Any, None), cast(Any, None), delay=3.0, cached_file=cast(Any, None))
        self.upload_seconds = upload_seconds
        self.started: list[tuple[int, float]] = []

    async def _background_upload(self, entry_id: int) -> None:
        self.started.append((entry_id, trio.current_time()))
        try:
            await trio.sleep(self.upload_seconds)
        finally:
            self._in_flight.discard(entry_id)
            self._wakeup.set()


def _entry(entry_id: int) -> Any:
    return SimpleNamespace(id=entry_id, unlinked=False)


async def test_uploads_start_in_due_order_once_each_at_their_latest_schedule(
        autojump_clock: trio.testing.MockClock) -> None:
    """Thousands of closes scheduled, some again later, some forgotten: each remaining entry starts
    once, no sooner than its last due time and within a pass (10 ms) of it, in due order."""
    rng = random.Random(4)
    writeback = _RecordingWriteBack(upload_seconds=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(writeback.run)
        expected: dict[int, float] = {}
        for entry_id in range(3000):
            delay = rng.uniform(0, 5)
            writeback.schedule(_entry(entry_id), delay)
            expected[entry_id] = trio.current_time() + delay
            if entry_id % 7 == 0:
                writeback.forget(_entry(entry_id))
                del expected[entry_id]
            if entry_id % 11 == 0:
                await trio.sleep(0.003)
        for entry_id in range(1, 3000, 13):  # closed again before their upload: it waits for the new delay
            if entry_id in expected and expected[entry_id] > trio.current_time():
                writeback.schedule(_entry(entry_id), 1.0)
                expected[entry_id] = trio.current_time() + 1.0
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert sorted(entry_id for entry_id, _at in writeback.started) == sorted(expected)
    for entry_id, at in writeback.started:
        assert expected[entry_id] <= at <= expected[entry_id] + 0.011, (entry_id, at, expected[entry_id])
    # In due order: an entry due earlier never starts later (trio runs the tasks one pass starts in any order).
    start_by_due = [at for _due, at in sorted((expected[entry_id], at) for entry_id, at in writeback.started)]
    assert start_by_due == sorted(start_by_due)


async def test_an_entry_due_again_while_uploading_starts_again_after_that_upload(
        autojump_clock: trio.testing.MockClock) -> None:
    writeback = _RecordingWriteBack(upload_seconds=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writeback.run)
        writeback.schedule(_entry(1), 0)
        await trio.sleep(0.5)  # uploading until 2.0
        writeback.schedule(_entry(1), 0.1)  # written again meanwhile, due at 0.6
        writeback.schedule(_entry(2), 0.2)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [(entry_id, round(at, 2)) for entry_id, at in writeback.started] == [(1, 0.0), (2, 0.7), (1, 2.0)]
