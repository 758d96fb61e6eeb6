"""A read-only mount (``[mount] read_only = true``): reads work, and no write request ever reaches S3.

Every kind of change is tried through the mount and must fail with EROFS; the
bucket is compared before and after, object by object (listing, ETag, size,
metadata, as HEAD with the SSE-C key reports them). A read-only mount over a
cache that still holds data an earlier read-write mount did not upload must not
upload it either, and must leave it for the next read-write mount.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, eventually_on_server, keys, sse_params, unmount, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]

OBJECTS = {
    "a.txt": b"alpha",
    "dir/b.txt": b"beta",
    "empty/": b"",  # the marker of an empty directory, as ssefs writes it
}


def populate(s3: Any, bucket: str, key_bytes: bytes) -> None:
    for key, body in OBJECTS.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body, **sse_params(key_bytes))


def bucket_snapshot(s3: Any, bucket: str, key_bytes: bytes) -> dict[str, tuple[object, ...]]:
    """Every object with what HEAD says of it (with the key; without it for an unencrypted one)."""
    snapshot: dict[str, tuple[object, ...]] = {}
    for key in sorted(keys(s3, bucket)):
        try:
            head = s3.head_object(Bucket=bucket, Key=key, **sse_params(key_bytes))
        except botocore.exceptions.ClientError:
            head = s3.head_object(Bucket=bucket, Key=key)
        snapshot[key] = (
            head["ETag"], head["ContentLength"], head.get("Metadata", {}), head["LastModified"],
            head.get("SSECustomerKeyMD5"),
        )
    return snapshot


def changes(mountpoint: Path) -> dict[str, Callable[[], object]]:
    """Each way of changing the filesystem, tried on objects that exist (or a new name)."""
    m = mountpoint
    return {
        "create": lambda: os.close(os.open(m / "new.txt", os.O_CREAT | os.O_WRONLY, 0o644)),
        "open existing O_WRONLY": lambda: os.close(os.open(m / "a.txt", os.O_WRONLY)),
        "open existing O_RDWR": lambda: os.close(os.open(m / "a.txt", os.O_RDWR)),
        "open existing O_APPEND": lambda: os.close(os.open(m / "a.txt", os.O_WRONLY | os.O_APPEND)),
        "open existing O_TRUNC": lambda: os.close(os.open(m / "a.txt", os.O_WRONLY | os.O_TRUNC)),
        "mkdir": lambda: os.mkdir(m / "newdir"),
        "rmdir": lambda: os.rmdir(m / "empty"),
        "unlink": lambda: os.unlink(m / "a.txt"),
        "rename file": lambda: os.rename(m / "a.txt", m / "renamed.txt"),
        "rename directory": lambda: os.rename(m / "dir", m / "moved"),
        "chmod": lambda: os.chmod(m / "a.txt", 0o600),
        "chown": lambda: os.chown(m / "a.txt", 1, 1),
        "utime": lambda: os.utime(m / "a.txt", (1, 1)),
        "setxattr": lambda: os.setxattr(m / "a.txt", "user.note", b"x"),
        "removexattr": lambda: os.removexattr(m / "a.txt", "user.note"),
        "symlink": lambda: os.symlink("a.txt", m / "link"),
        "hard link": lambda: os.link(m / "a.txt", m / "hardlink"),
        "truncate": lambda: os.truncate(m / "a.txt", 0),
        "mkfifo": lambda: os.mkfifo(m / "fifo"),
    }


def refusals_other_than_erofs(mountpoint: Path) -> dict[str, str]:
    """``{operation: what happened}`` for every change that did not fail with EROFS."""
    wrong: dict[str, str] = {}
    for name, change in changes(mountpoint).items():
        try:
            change()
        except OSError as error:
            if error.errno != errno.EROFS:
                wrong[name] = errno.errorcode.get(error.errno or 0, str(error.errno))
        else:
            wrong[name] = "succeeded"
    return wrong


def test_read_only_mount_reads_and_refuses_every_change(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any,
    mount_ssefs: MountFactory,
) -> None:
    populate(s3, bucket, key_bytes)
    config = write_config(tmp_path, endpoint, bucket, key_file, mount_extra="read_only = true")
    before = bucket_snapshot(s3, bucket, key_bytes)
    mount = mount_ssefs(config)
    m = mount.mountpoint

    assert sorted(os.listdir(m)) == ["a.txt", "dir", "empty"]
    assert (m / "a.txt").read_bytes() == b"alpha"
    assert (m / "dir" / "b.txt").read_bytes() == b"beta"
    assert os.listdir(m / "empty") == []
    assert os.statvfs(m).f_flag & os.ST_RDONLY

    assert refusals_other_than_erofs(m) == {}
    # Nothing changed as seen through the mount either.
    assert sorted(os.listdir(m)) == ["a.txt", "dir", "empty"]
    assert (m / "a.txt").read_bytes() == b"alpha"

    assert mount.stop() == 0  # the unmount's final upload pass runs too
    assert bucket_snapshot(s3, bucket, key_bytes) == before


def test_read_only_mount_leaves_data_not_yet_uploaded_in_the_cache(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any,
    mount_ssefs: MountFactory,
) -> None:
    populate(s3, bucket, key_bytes)
    # A read-write mount writes a file, then dies before its upload is due.
    read_write = write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600")
    mount = mount_ssefs(read_write)
    (mount.mountpoint / "pending.txt").write_bytes(b"not uploaded yet")  # closed: durable in the cache
    mount.process.kill()
    mount.process.wait(timeout=30)
    unmount(mount.mountpoint)
    before = bucket_snapshot(s3, bucket, key_bytes)
    assert "pending.txt" not in before

    # The same cache, mounted read-only (same config file name, so the same cache directory).
    write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600",
                 mount_extra="read_only = true")
    read_only = mount_ssefs(read_write, tmp_path / "ro")
    assert (read_only.mountpoint / "a.txt").read_bytes() == b"alpha"
    assert read_only.stop() == 0
    assert bucket_snapshot(s3, bucket, key_bytes) == before

    # Not lost: the next read-write mount uploads it.
    write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600")
    mount_ssefs(read_write, tmp_path / "rw-again")
    eventually_on_server(s3, bucket, "pending.txt", key_bytes, b"not uploaded yet")
