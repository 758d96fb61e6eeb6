"""Tests for ssefs.cache: the encrypted scratch area used to stage file data."""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssefs.cache import (
    BLOCK_SIZE,
    NONCE_BYTES,
    SLOT_SIZE,
    CorruptBlock,
    EncryptedScratchFile,
    ScratchArea,
)
from ssefs.errors import SsefsError

MiB = 1024 * 1024


@pytest.fixture
def area(tmp_path: Path) -> ScratchArea:
    return ScratchArea(tmp_path / "scratch")


@pytest.fixture
def scratch(area: ScratchArea) -> Iterator[EncryptedScratchFile]:
    file = area.new_file()
    yield file
    file.close()


def disk_bytes(file: EncryptedScratchFile) -> bytes:
    """Everything in the underlying (unlinked) temporary file."""
    fd = file._file.fileno()
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(4 * MiB, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def flip_byte(file: EncryptedScratchFile, position: int) -> None:
    fd = file._file.fileno()
    original = os.pread(fd, 1, position)
    assert len(original) == 1
    os.pwrite(fd, bytes([original[0] ^ 0x01]), position)


# ------------------------------------------------------------------ the scratch area


def test_scratch_directory_created_mode_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        directory = tmp_path / "a" / "b" / "scratch"
        ScratchArea(directory)
    finally:
        os.umask(old)
    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_existing_scratch_directory_tightened_to_0700(tmp_path: Path) -> None:
    directory = tmp_path / "scratch"
    directory.mkdir()
    os.chmod(directory, 0o755)
    ScratchArea(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_scratch_file_is_unlinked_and_private(area: ScratchArea) -> None:
    file = area.new_file()
    try:
        file.write(0, b"hello")
        # An unlinked temporary file: nothing named in the directory.
        assert os.listdir(area.directory) == []
        info = os.fstat(file._file.fileno())
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_nlink == 0
    finally:
        file.close()


def test_files_are_independent(area: ScratchArea) -> None:
    first, second = area.new_file(), area.new_file()
    try:
        first.write(0, b"a" * 100)
        second.write(50, b"b" * 10)
        assert first.read(0, 200) == b"a" * 100
        assert second.read(0, 200) == bytes(50) + b"b" * 10
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------ basic semantics


def test_new_file_is_empty(scratch: EncryptedScratchFile) -> None:
    assert scratch.size == 0
    assert scratch.read(0, 100) == b""


def test_write_returns_length_and_sets_size(scratch: EncryptedScratchFile) -> None:
    assert scratch.write(0, b"hello world") == 11
    assert scratch.size == 11
    assert scratch.read(0, 11) == b"hello world"
    assert scratch.read(6, 5) == b"world"


def test_reads_past_end_are_short(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"0123456789")
    assert scratch.read(5, 100) == b"56789"
    assert scratch.read(10, 5) == b""
    assert scratch.read(1000, 5) == b""
    assert scratch.read(3 * BLOCK_SIZE, 5) == b""
    assert scratch.read(0, 0) == b""


def test_empty_write_does_not_change_size(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"abc")
    assert scratch.write(1000, b"") == 0
    assert scratch.size == 3
    assert scratch.read(0, 2000) == b"abc"


def test_sparse_gap_reads_as_zeros(scratch: EncryptedScratchFile) -> None:
    far = 5 * BLOCK_SIZE + 123
    scratch.write(far, b"tail")
    assert scratch.size == far + 4
    assert scratch.read(0, 10) == bytes(10)
    assert scratch.read(2 * BLOCK_SIZE - 5, 10) == bytes(10)
    assert scratch.read(far - 3, 7) == bytes(3) + b"tail"
    # Untouched blocks take no space on disk (nothing sealed for them).
    assert len(disk_bytes(scratch)) <= (5 + 1) * SLOT_SIZE


def test_write_spanning_block_boundary(scratch: EncryptedScratchFile) -> None:
    data = os.urandom(300)
    offset = BLOCK_SIZE - 100
    scratch.write(offset, data)
    assert scratch.read(offset, 300) == data
    assert scratch.read(BLOCK_SIZE, 200) == data[100:]
    assert scratch.read(BLOCK_SIZE - 100, 100) == data[:100]
    assert scratch.read(0, BLOCK_SIZE - 100) == bytes(BLOCK_SIZE - 100)


def test_write_spanning_several_blocks(scratch: EncryptedScratchFile) -> None:
    data = random.Random(7).randbytes(3 * BLOCK_SIZE + 17)
    offset = BLOCK_SIZE // 2
    scratch.write(offset, data)
    assert scratch.size == offset + len(data)
    assert scratch.read(offset, len(data)) == data
    # Read back across each boundary separately.
    for boundary in (BLOCK_SIZE, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE):
        assert scratch.read(boundary - 8, 16) == data[boundary - 8 - offset:boundary + 8 - offset]


def test_write_exactly_one_block_at_boundary(scratch: EncryptedScratchFile) -> None:
    data = random.Random(8).randbytes(BLOCK_SIZE)
    scratch.write(BLOCK_SIZE, data)
    assert scratch.size == 2 * BLOCK_SIZE
    assert scratch.read(BLOCK_SIZE, BLOCK_SIZE) == data
    assert scratch.read(0, BLOCK_SIZE) == bytes(BLOCK_SIZE)


def test_overwrite_in_sealed_block(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"a" * 1000)
    scratch.write(BLOCK_SIZE, b"b")  # seals block 0
    scratch.write(10, b"XYZ")  # reopens block 0
    assert scratch.read(0, 20) == b"a" * 10 + b"XYZ" + b"a" * 7
    assert scratch.size == BLOCK_SIZE + 1


# ------------------------------------------------------------------ truncation


def test_truncate_shrink_then_grow_reads_zeros(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"x" * 1000)
    scratch.truncate(100)
    assert scratch.size == 100
    assert scratch.read(0, 1000) == b"x" * 100
    scratch.truncate(1000)
    assert scratch.size == 1000
    assert scratch.read(0, 1000) == b"x" * 100 + bytes(900)


def test_truncate_shrink_then_write_beyond_reads_zeros(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"x" * 1000)
    scratch.truncate(100)
    scratch.write(500, b"y")
    assert scratch.read(0, 501) == b"x" * 100 + bytes(400) + b"y"


def test_truncate_shrink_of_sealed_block_then_grow(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"x" * (BLOCK_SIZE + 100))
    scratch.write(5 * BLOCK_SIZE, b"z")  # blocks 0 and 1 sealed, block 5 hot
    scratch.truncate(BLOCK_SIZE + 10)
    assert scratch.size == BLOCK_SIZE + 10
    scratch.truncate(6 * BLOCK_SIZE)
    assert scratch.read(BLOCK_SIZE, 200) == b"x" * 10 + bytes(190)
    assert scratch.read(5 * BLOCK_SIZE, 10) == bytes(10)
    assert scratch.read(0, 10) == b"x" * 10


def test_truncate_to_block_boundary_drops_whole_blocks(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"x" * (3 * BLOCK_SIZE))
    scratch.truncate(BLOCK_SIZE)
    assert len(disk_bytes(scratch)) <= SLOT_SIZE
    scratch.truncate(3 * BLOCK_SIZE)
    assert scratch.read(0, BLOCK_SIZE) == b"x" * BLOCK_SIZE
    assert scratch.read(BLOCK_SIZE, 2 * BLOCK_SIZE) == bytes(2 * BLOCK_SIZE)


def test_truncate_to_zero(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, os.urandom(2 * BLOCK_SIZE + 5))
    scratch.truncate(0)
    assert scratch.size == 0
    assert scratch.read(0, 10) == b""
    assert disk_bytes(scratch) == b""
    scratch.truncate(10)
    assert scratch.read(0, 10) == bytes(10)


def test_truncate_grow_only(scratch: EncryptedScratchFile) -> None:
    scratch.truncate(2 * BLOCK_SIZE + 3)
    assert scratch.size == 2 * BLOCK_SIZE + 3
    assert scratch.read(BLOCK_SIZE - 1, 2) == bytes(2)
    assert len(scratch.read(0, 3 * BLOCK_SIZE)) == 2 * BLOCK_SIZE + 3


# ------------------------------------------------------------------ model-based random test


def run_against_model(file: EncryptedScratchFile, rng: random.Random, steps: int, span: int) -> None:
    model = bytearray()
    for step in range(steps):
        action = rng.random()
        if action < 0.55:
            offset = rng.randrange(span)
            # Mostly small writes, some crossing block boundaries, a few near a boundary.
            if rng.random() < 0.2:
                offset = rng.randrange(1, span // BLOCK_SIZE + 1) * BLOCK_SIZE - rng.randrange(64)
            length = rng.choice([1, 7, 100, 4096, rng.randrange(1, 2 * BLOCK_SIZE)])
            data = rng.randbytes(length)
            assert file.write(offset, data) == length
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + length] = data
        elif action < 0.80:
            offset = rng.randrange(span + BLOCK_SIZE)
            length = rng.choice([0, 1, 100, 5000, rng.randrange(3 * BLOCK_SIZE)])
            got = file.read(offset, length)
            assert got == bytes(model[offset:offset + length]), f"step {step}: read({offset}, {length})"
        else:
            size = rng.choice([0, rng.randrange(span), rng.randrange(span) // BLOCK_SIZE * BLOCK_SIZE])
            file.truncate(size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        assert file.size == len(model), f"step {step}"
    assert file.read(0, len(model) + 10) == bytes(model)


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_bytearray_model(area: ScratchArea, seed: int) -> None:
    file = area.new_file()
    try:
        run_against_model(file, random.Random(seed), steps=250, span=4 * BLOCK_SIZE)
    finally:
        file.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_small_operations_near_one_boundary(area: ScratchArea, seed: int) -> None:
    rng = random.Random(1000 + seed)
    file = area.new_file()
    model = bytearray()
    try:
        for _ in range(400):
            offset = BLOCK_SIZE - 2048 + rng.randrange(4096)
            if rng.random() < 0.15:
                size = BLOCK_SIZE - 2048 + rng.randrange(4096)
                file.truncate(size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            else:
                data = rng.randbytes(rng.randrange(1, 3000))
                file.write(offset, data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + len(data)] = data
            start = BLOCK_SIZE - 4096
            assert file.read(start, 8192) == bytes(model[start:start + 8192])
            assert file.size == len(model)
    finally:
        file.close()


# ------------------------------------------------------------------ no plaintext on disk


def assert_pattern_absent(disk: bytes, pattern: bytes, *, windows: int = 64) -> None:
    rng = random.Random(99)
    starts = [0, len(pattern) - 32, BLOCK_SIZE - 16, BLOCK_SIZE, 2 * BLOCK_SIZE + 5]
    starts += [rng.randrange(len(pattern) - 32) for _ in range(windows)]
    for start in starts:
        window = pattern[start:start + 32]
        assert len(window) == 32
        assert window not in disk, f"plaintext window at {start} found on disk"


def test_no_plaintext_on_disk(scratch: EncryptedScratchFile) -> None:
    pattern = random.Random(20240501).randbytes(3 * MiB)
    # Write in small pieces, the way a FUSE client would.
    for offset in range(0, len(pattern), 128 * 1024):
        scratch.write(offset, pattern[offset:offset + 128 * 1024])
    # Touch another block so the last data block gets sealed too.
    scratch.write(10 * BLOCK_SIZE, b"\x00")
    disk = disk_bytes(scratch)
    # All three data blocks were sealed: their slots are on disk.
    assert len(disk) >= 3 * SLOT_SIZE
    assert_pattern_absent(disk, pattern)
    # And the data is still there, decrypted on read.
    assert scratch.read(0, len(pattern)) == pattern


def test_no_plaintext_on_disk_for_low_entropy_data(scratch: EncryptedScratchFile) -> None:
    text = b"SECRET-PAYROLL-ROW;" * 200_000
    scratch.write(0, text)
    scratch.write(5 * BLOCK_SIZE, b"x")
    disk = disk_bytes(scratch)
    assert b"SECRET-PAYROLL" not in disk
    assert b"PAYROLL-ROW;SECRET" not in disk


def test_hot_block_is_kept_in_memory_until_another_block_is_touched(scratch: EncryptedScratchFile) -> None:
    data = random.Random(5).randbytes(64 * 1024)
    scratch.write(0, data)
    # Only the hot block has been written: nothing on disk yet, and certainly no plaintext.
    assert data[:32] not in disk_bytes(scratch)
    assert os.fstat(scratch._file.fileno()).st_size == 0

    scratch.write(BLOCK_SIZE + 10, b"next block")
    disk = disk_bytes(scratch)
    # Block 0 is now sealed on disk: a nonce, ciphertext and tag in slot 0.
    assert len(disk) >= SLOT_SIZE
    slot = disk[:SLOT_SIZE]
    assert slot[:NONCE_BYTES] != bytes(NONCE_BYTES)
    assert data[:32] not in disk
    assert data[1000:1032] not in disk
    # The slot is ciphertext, not the zero-padded plaintext block.
    assert slot[NONCE_BYTES:NONCE_BYTES + len(data)] != data
    assert scratch.read(0, len(data)) == data


def test_resealing_uses_a_fresh_nonce(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"same")
    scratch.write(BLOCK_SIZE, b"a")  # seal block 0
    first = disk_bytes(scratch)[:SLOT_SIZE]
    scratch.write(0, b"same")  # block 0 hot again, unchanged content
    scratch.write(BLOCK_SIZE, b"a")  # seal again
    second = disk_bytes(scratch)[:SLOT_SIZE]
    assert first[:NONCE_BYTES] != second[:NONCE_BYTES]
    assert first != second


def test_same_data_in_two_files_encrypts_differently(area: ScratchArea) -> None:
    first, second = area.new_file(), area.new_file()
    try:
        for file in (first, second):
            file.write(0, b"identical" * 1000)
            file.write(BLOCK_SIZE, b"z")
        assert disk_bytes(first)[NONCE_BYTES:SLOT_SIZE] != disk_bytes(second)[NONCE_BYTES:SLOT_SIZE]
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------ tampering


def seal_two_blocks(file: EncryptedScratchFile) -> bytes:
    data = random.Random(3).randbytes(BLOCK_SIZE)
    file.write(0, data)
    file.write(BLOCK_SIZE, b"other block")  # seals block 0; block 1 is hot
    return data


@pytest.mark.parametrize(
    "position",
    [
        0,  # nonce
        NONCE_BYTES,  # first ciphertext byte
        NONCE_BYTES + 12345,  # ciphertext
        SLOT_SIZE - 1,  # tag
    ],
)
def test_tampered_block_raises_corrupt_block(scratch: EncryptedScratchFile, position: int) -> None:
    seal_two_blocks(scratch)
    flip_byte(scratch, position)
    with pytest.raises(CorruptBlock) as info:
        scratch.read(0, 10)
    assert isinstance(info.value, SsefsError)
    assert "block 0" in str(info.value)


def test_tampered_block_refused_when_reopened_for_writing(scratch: EncryptedScratchFile) -> None:
    seal_two_blocks(scratch)
    flip_byte(scratch, NONCE_BYTES + 99)
    with pytest.raises(CorruptBlock):
        scratch.write(5, b"x")


def test_tampering_does_not_affect_other_blocks(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"a" * 10)
    scratch.write(BLOCK_SIZE, b"b" * 10)
    scratch.write(2 * BLOCK_SIZE, b"c" * 10)  # blocks 0 and 1 sealed
    flip_byte(scratch, SLOT_SIZE + NONCE_BYTES + 3)  # damage block 1 only
    assert scratch.read(0, 10) == b"a" * 10
    assert scratch.read(2 * BLOCK_SIZE, 10) == b"c" * 10
    with pytest.raises(CorruptBlock):
        scratch.read(BLOCK_SIZE, 10)


def test_swapped_blocks_are_detected(scratch: EncryptedScratchFile) -> None:
    scratch.write(0, b"a" * 10)
    scratch.write(BLOCK_SIZE, b"b" * 10)
    scratch.write(2 * BLOCK_SIZE, b"c" * 10)  # blocks 0 and 1 sealed
    fd = scratch._file.fileno()
    slot0 = os.pread(fd, SLOT_SIZE, 0)
    slot1 = os.pread(fd, SLOT_SIZE, SLOT_SIZE)
    os.pwrite(fd, slot1, 0)
    os.pwrite(fd, slot0, SLOT_SIZE)
    with pytest.raises(CorruptBlock):
        scratch.read(0, 10)
    with pytest.raises(CorruptBlock):
        scratch.read(BLOCK_SIZE, 10)


def test_block_copied_between_files_is_detected(area: ScratchArea) -> None:
    first, second = area.new_file(), area.new_file()
    try:
        for file, letter in ((first, b"a"), (second, b"b")):
            file.write(0, letter * 10)
            file.write(BLOCK_SIZE, b"z")
        slot = os.pread(first._file.fileno(), SLOT_SIZE, 0)
        os.pwrite(second._file.fileno(), slot, 0)
        with pytest.raises(CorruptBlock):
            second.read(0, 10)
    finally:
        first.close()
        second.close()


def test_blocks_from_another_area_key_are_refused(tmp_path: Path) -> None:
    # Each ScratchArea has its own in-memory key: a slot sealed by one cannot be
    # opened by another, even at the same position.
    one, two = ScratchArea(tmp_path / "one"), ScratchArea(tmp_path / "two")
    first, second = one.new_file(), two.new_file()
    try:
        for file in (first, second):
            file.write(0, b"q" * 10)
            file.write(BLOCK_SIZE, b"z")
        os.pwrite(second._file.fileno(), os.pread(first._file.fileno(), SLOT_SIZE, 0), 0)
        with pytest.raises(CorruptBlock):
            second.read(0, 10)
    finally:
        first.close()
        second.close()


def test_close_releases_the_file(area: ScratchArea) -> None:
    file = area.new_file()
    file.write(0, b"data")
    fd = file._file.fileno()
    file.close()
    with pytest.raises(OSError):
        os.fstat(fd)
