"""End to end: what ssefs asks of the kernel — page cache kept across opens, read-ahead size.

Page residency is read with mincore(2) on a mapping of the file, so these tests
see the kernel's own state rather than timing anything.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, sse_params, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache now (opening it is the only side effect)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ, mmap.MAP_SHARED, fd, ctypes.c_long(0))
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (size + PAGE - 1) // PAGE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(byte & 1 for byte in vector)
        finally:
            _libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def test_unchanged_file_keeps_its_pages_and_a_remote_change_drops_them(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    first = secrets.token_bytes(3 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key="kept.bin", Body=first, **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    path = mount.mountpoint / "kept.bin"
    assert path.read_bytes() == first
    pages = len(first) // PAGE
    # Opened again (mincore needs an open file): the pages read before are still cached.
    assert resident_pages(path) == pages
    assert resident_pages(path) == pages

    # Another client replaces the object with the same size: once ssefs sees the new ETag,
    # the next open drops the old pages and reads return the new bytes.
    second = secrets.token_bytes(len(first))
    s3.put_object(Bucket=bucket, Key="kept.bin", Body=second, **sse_params(key_bytes))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1.1)  # attr_timeout 1 s: then ssefs asks S3 again
        os.listdir(mount.mountpoint)
        content = path.read_bytes()
        if content == second:
            break
        assert content == first, "a mix of old and new bytes"
    assert content == second


def test_files_written_through_the_mount_stay_cached_after_upload(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    path = mount.mountpoint / "written.bin"
    data = secrets.token_bytes(2 * 1024 * 1024)
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())  # uploaded: the object's ETag is now ours
    time.sleep(1.2)
    os.listdir(mount.mountpoint)  # a fresh listing shows that same ETag: not another client's change
    assert path.read_bytes() == data
    assert resident_pages(path) == len(data) // PAGE
    assert bytes(s3.get_object(Bucket=bucket, Key="written.bin", **sse_params(key_bytes))["Body"].read()) == data


def kernel_read_ahead_kb(mountpoint: Path) -> int:
    device = os.stat(mountpoint).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a mount's read-ahead")
def test_kernel_read_ahead_follows_the_config(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    default = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="default"), tmp_path / "a b")
    assert kernel_read_ahead_kb(default.mountpoint) == 4096
    custom = mount_ssefs(
        write_config(tmp_path, endpoint, bucket, key_file, name="custom", mount_extra='read_ahead = "16MiB"'),
    )
    assert kernel_read_ahead_kb(custom.mountpoint) == 16384
