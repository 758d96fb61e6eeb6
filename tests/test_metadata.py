"""Unit tests: s3fs-compatible attribute encoding, the sealed xattrs, and the metadata index."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from ssefs.metadata import (
    FileAttributes,
    MetadataIndex,
    XattrSealer,
    format_nanoseconds,
    from_metadata,
    metadata_size,
    to_metadata,
)


def test_s3fs_encodings_round_trip_to_the_nanosecond() -> None:
    attributes = FileAttributes(stat.S_IFREG | 0o640, 1000, 100, 1_700_000_000_123_456_789)
    metadata = to_metadata(attributes)
    assert metadata == {"mode": "33184", "uid": "1000", "gid": "100", "mtime": "1700000000.123456789"}
    assert from_metadata(metadata) == attributes
    # The last nanosecond of a second stays in that second; whole seconds have no fraction.
    assert format_nanoseconds(1_700_000_000_999_999_999) == "1700000000.999999999"
    assert format_nanoseconds(1_600_000_000 * 10**9) == "1600000000"
    assert from_metadata({"mtime": "1700000000.999999999"}).mtime_ns == 1_700_000_000_999_999_999


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"Mode": "33188", "UID": "7"}, FileAttributes(0o100644, 7, None, None)),  # any case
        ({"mode": "420"}, FileAttributes(0o100644, None, None, None)),  # permission bits only
        ({"mode": "abc", "uid": "-1", "gid": "99999999999", "mtime": "x"}, FileAttributes()),
        ({"mtime": "1600000000"}, FileAttributes(mtime_ns=1_600_000_000 * 10**9)),
        ({"mtime": "1600000000.5"}, FileAttributes(mtime_ns=1_600_000_000_500_000_000)),
        ({"other": "kept out"}, FileAttributes()),
        ({"mode": "²", "uid": "١٢", "mtime": "³.5"}, FileAttributes()),  # digits, but not ASCII ones
    ],
)
def test_malformed_or_partial_metadata_falls_back(metadata: dict[str, str], expected: FileAttributes) -> None:
    assert from_metadata(metadata) == expected


def test_xattrs_sealed_and_opened_only_with_the_key() -> None:
    sealer = XattrSealer(os.urandom(32))
    xattrs = {b"user.a": b"\x00\xff", b"user.long": b"v" * 500}
    blob = sealer.seal(xattrs)
    assert blob is not None and "user.a" not in blob
    assert sealer.open(blob) == xattrs
    assert sealer.seal({}) is None and sealer.open(None) == {}
    assert sealer.seal(xattrs) != blob  # a fresh nonce each time
    with pytest.raises(ValueError, match="another key"):
        XattrSealer(os.urandom(32)).open(blob)
    with pytest.raises(ValueError):
        sealer.open(blob[:-8] + "AAAAAAAA")
    assert metadata_size({"mode": "33188"}) == len("x-amz-meta-mode") + 5


def test_index_answers_only_for_the_same_etag_and_survives_reopening(tmp_path: Path) -> None:
    index = MetadataIndex(tmp_path)
    attributes = FileAttributes(0o100600, 1, 2, 3_500_000_000, "sealed")
    index.put("dir/file", "etag-1", attributes)  # our own upload: LastModified not known yet
    assert index.get("dir/file", "etag-1", 1000.4) == attributes  # the first listing supplies it
    assert index.get("dir/file", "etag-1", 1000.9) == attributes  # same second
    assert index.get("dir/file", "etag-1", 1002.0) is None  # same data, metadata rewritten later
    assert index.get("dir/file", "etag-2", 1000.4) is None
    assert index.get("dir/file", "", 1000.4) is None
    index.close()
    reopened = MetadataIndex(tmp_path)
    assert reopened.get("dir/file", "etag-1", 1000.0) == attributes
    assert oct(os.stat(tmp_path / "metadata.sqlite").st_mode & 0o777) == "0o600"
    reopened.forget("dir/file")
    assert reopened.get("dir/file", "etag-1", 1000.0) is None


def test_forgotten_rows_are_deleted_in_batches_and_a_new_put_survives_them(tmp_path: Path) -> None:
    from ssefs.metadata import WRITE_BATCH as FORGET_BATCH

    index = MetadataIndex(tmp_path)
    attributes = FileAttributes(0o100644, 0, 0, 1, None)
    index.put_many([(f"f{number}", "etag", attributes, 1000.0) for number in range(FORGET_BATCH + 2)])
    index.forget("f0")
    index.forget("f1")
    index.put("f1", "etag-new", attributes)  # re-created before the batch went out
    index.close()
    reopened = MetadataIndex(tmp_path)
    assert reopened.get("f0", "etag", 1000.0) is None
    assert reopened.get("f1", "etag-new", 1000.0) == attributes
    for number in range(2, FORGET_BATCH + 2):
        reopened.forget(f"f{number}")  # the batch fills and is written without a close
    rows = sqlite3.connect(tmp_path / "metadata.sqlite").execute("SELECT object_key FROM attributes").fetchall()
    assert ("f1",) in rows and len(rows) < 10
    reopened.close()
    rows = sqlite3.connect(tmp_path / "metadata.sqlite").execute("SELECT object_key FROM attributes").fetchall()
    assert sorted(rows) == [("f1",)]


def test_forget_now_removes_the_row_on_disk_before_a_change_that_keeps_the_etag(tmp_path: Path) -> None:
    """A chmod's self-copy keeps the ETag (the data's MD5) and may land in the same second: if the
    daemon is killed before the batched new row is written, the old row must not be there to match."""
    index = MetadataIndex(tmp_path)
    before = FileAttributes(0o100644, 0, 0, 1, None)
    index.put_many([("file", "etag", before, 1000.2)])  # written at once, as after a listing
    index.forget_now("file")
    index.put("file", "etag", FileAttributes(0o100500, 0, 0, 1, None))  # batched: lost by the "kill"
    killed = MetadataIndex(tmp_path)  # what a restart reads (no close(): nothing flushed)
    assert killed.get("file", "etag", 1000.7) is None  # a HEAD learns the truth
    killed.close()
    index.forget("file")
    index.forget_now("file")  # a forget still waiting for its batch is written too
    index.forget_now("never-known")  # nothing to do, no error


def test_attributes_are_written_in_batches(tmp_path: Path) -> None:
    """One transaction per lookup that learnt a LastModified made a cold stat twice as slow."""
    from ssefs.metadata import WRITE_BATCH

    def rows() -> int:
        database = sqlite3.connect(tmp_path / "metadata.sqlite")
        try:
            return int(database.execute("SELECT COUNT(*) FROM attributes").fetchone()[0])
        finally:
            database.close()

    index = MetadataIndex(tmp_path)
    attributes = FileAttributes(0o100644, 0, 0, 1, None)
    for number in range(WRITE_BATCH - 1):
        index.put(f"f{number}", "etag", attributes)
        assert index.get(f"f{number}", "etag", 1000.0) == attributes  # answers at once, from memory
    assert rows() == 0
    index.put("one-more", "etag", attributes)
    assert rows() == WRITE_BATCH
    index.put("after", "etag", attributes)
    index.put_many([("listed", "etag", attributes, 1000.0)])  # a listing's worth goes out at once
    assert rows() == WRITE_BATCH + 2
    index.put("at-close", "etag", attributes)
    index.close()
    reopened = MetadataIndex(tmp_path)
    assert reopened.get("at-close", "etag", 1000.0) == attributes
    assert reopened.get("f0", "etag", 1000.0) == attributes
    reopened.close()


def test_stored_key_index_survives_reopening(tmp_path: Path) -> None:
    from ssefs.metadata import StoredKeyIndex

    index = StoredKeyIndex(tmp_path)
    index.remember("old/a", "0123456789abcdef")
    index.remember("old/b", "0123456789abcdef")
    index.forget("old/b")
    index.close()
    reopened = StoredKeyIndex(tmp_path)
    assert reopened.get("old/a") == "0123456789abcdef"
    assert reopened.get("old/b") is None
