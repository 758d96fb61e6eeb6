"""Read-ahead decisions (pure logic)."""

from __future__ import annotations

from ssefs.readahead import MAX_WINDOW_BLOCKS, MIN_WINDOW_BLOCKS, SequentialReader

KERNEL_READ = 128 * 1024


def test_sequential_reads_grow_the_window_to_its_cap() -> None:
    reader = SequentialReader()
    windows = [reader.blocks_ahead(n * KERNEL_READ, KERNEL_READ) for n in range(20)]
    assert windows[0] == MIN_WINDOW_BLOCKS
    assert windows == sorted(windows)
    assert windows[-1] == MAX_WINDOW_BLOCKS


def test_a_jump_resets_the_window() -> None:
    reader = SequentialReader()
    for n in range(10):
        reader.blocks_ahead(n * KERNEL_READ, KERNEL_READ)
    assert reader.blocks_ahead(50 * 1024 * 1024, 4096) == MIN_WINDOW_BLOCKS
    assert reader.blocks_ahead(7 * 1024 * 1024, 4096) == MIN_WINDOW_BLOCKS
