"""End to end: directory mode, owner, time and xattrs survive a remount (kept in .ssefs-dirs)."""

from __future__ import annotations

import errno
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ssefs.dirattrs import SIDECAR_NAME
from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, sse_params, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]


def test_directory_attributes_persist_and_the_sidecar_stays_hidden(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    root = mount.mountpoint
    (root / "top").mkdir()
    (root / "top/private").mkdir(mode=0o700)
    (root / "top/shared").mkdir()
    os.chmod(root / "top/shared", 0o2775)
    os.chown(root / "top/shared", 1234, 5678)
    os.utime(root / "top/shared", (1_500_000_000, 1_500_000_000.25))
    os.setxattr(root / "top/shared", "user.purpose", b"team files")
    (root / "top/shared/file.txt").write_bytes(b"inside")
    assert sorted(os.listdir(root / "top")) == ["private", "shared"]
    with pytest.raises(OSError) as caught:
        (root / "top" / SIDECAR_NAME).write_bytes(b"x")
    assert caught.value.errno == errno.EINVAL
    # The map is an SSE-C object like any other.
    sidecar = s3.get_object(Bucket=bucket, Key=f"top/{SIDECAR_NAME}", **sse_params(key_bytes))["Body"].read()
    assert b"shared" in sidecar
    mount.stop()

    root = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="again")).mountpoint
    shared = os.stat(root / "top/shared")
    assert (shared.st_mode & 0o7777, shared.st_uid, shared.st_gid) == (0o2775, 1234, 5678)
    assert abs(shared.st_mtime_ns - 1_500_000_000_250_000_000) < 1000
    assert os.stat(root / "top/private").st_mode & 0o7777 == 0o700
    assert os.getxattr(root / "top/shared", "user.purpose") == b"team files"
    assert sorted(os.listdir(root / "top")) == ["private", "shared"]
    # Renamed, the directory keeps its attributes; removed, its entry goes with it.
    os.rename(root / "top/shared", root / "top/moved")
    assert os.stat(root / "top/moved").st_mode & 0o7777 == 0o2775
    os.rmdir(root / "top/private")
    os.unlink(root / "top/moved/file.txt")
    os.rmdir(root / "top/moved")
    assert os.listdir(root / "top") == []
    os.rmdir(root / "top")
    assert os.listdir(root) == []


def test_tar_round_trip_is_clean_after_a_remount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    source = tmp_path / "src"
    for directory, mode in (("src", 0o755), ("src/bin", 0o750), ("src/secret", 0o700), ("src/doc", 0o2775)):
        (tmp_path / directory).mkdir(exist_ok=True)
        os.chmod(tmp_path / directory, mode)
    for name, mode, data in (("bin/tool", 0o755, b"#!/bin/sh\necho hi\n"), ("secret/key", 0o600, b"k" * 300),
                             ("doc/readme", 0o644, b"read me\n" * 100), ("top.txt", 0o640, b"top")):
        (source / name).write_bytes(data)
        os.chmod(source / name, mode)
        os.utime(source / name, (1_600_000_000, 1_600_000_123))
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="tree")
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    subprocess.run(["tar", "-xpf", str(archive), "-C", str(mount.mountpoint)], check=True, timeout=120)
    diff = subprocess.run(["tar", "-df", str(archive), "-C", str(mount.mountpoint)], capture_output=True,
                          text=True, timeout=120)
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, "", "")
    mount.stop()
    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="again"))
    diff = subprocess.run(["tar", "-df", str(archive), "-C", str(again.mountpoint)], capture_output=True,
                          text=True, timeout=120)
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, "", "")
