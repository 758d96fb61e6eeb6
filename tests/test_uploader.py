"""Tests for ssefs.uploader.part_size_for: keeping multipart uploads within S3's limits."""

from __future__ import annotations

import math

import pytest

from ssefs.config import MAX_PART_SIZE, MIN_PART_SIZE, MiB
from ssefs.uploader import MAX_PARTS, part_size_for

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
