"""End to end: rename of files and directories through the mount, checked in the mount and in S3."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, fsync_directory, keys, sse_params, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))




def test_directory_rename_moves_every_object_and_keeps_content(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    sse = sse_params(key_bytes)
    contents = {f"project/f{index:02d}.txt": secrets.token_bytes(100 + index) for index in range(50)}
    contents["project/sub/deep/data.bin"] = secrets.token_bytes(3 * 1024 * 1024)
    for key, data in contents.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"mode": str(0o100600)}, **sse)
    config = write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600")
    mount = mount_ssefs(config)
    root = mount.mountpoint
    # One file changed and one created through the mount, not uploaded yet (write-back delay 600 s).
    (root / "project/f00.txt").write_bytes(b"changed locally")
    contents["project/f00.txt"] = b"changed locally"
    (root / "project/sub/new.txt").write_bytes(b"new, only in the cache")
    contents["project/sub/new.txt"] = b"new, only in the cache"
    (root / "project/emptydir").mkdir()

    subprocess.run(["mv", str(root / "project"), str(root / "renamed")], check=True, timeout=120)

    assert not (root / "project").exists()
    for key, data in contents.items():
        moved = "renamed/" + key.removeprefix("project/")
        assert (root / moved).read_bytes() == data, moved
        assert bytes(s3.get_object(Bucket=bucket, Key=moved, **sse)["Body"].read()) == data, moved
    assert (root / "renamed/emptydir").is_dir()
    assert (root / "renamed/f01.txt").stat().st_mode & 0o7777 == 0o600  # metadata went along
    assert not keys(s3, bucket, "project/")
    # After a remount with an empty cache, S3 alone tells the same story.
    mount.stop()
    fresh = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="fresh"))
    for key, data in contents.items():
        assert (fresh.mountpoint / "renamed" / key.removeprefix("project/")).read_bytes() == data
    assert sorted(os.listdir(fresh.mountpoint)) == ["renamed"]


def test_directory_rename_errors_and_replacing_an_empty_directory(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    root = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file)).mountpoint
    (root / "a").mkdir()
    (root / "a/file").write_bytes(b"in a")
    (root / "full").mkdir()
    (root / "full/x").write_bytes(b"x")
    (root / "empty").mkdir()
    (root / "plain").write_bytes(b"plain file")
    with pytest.raises(OSError) as caught:
        os.rename(root / "a", root / "full")
    assert caught.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as caught:
        os.rename(root / "a", root / "plain")
    assert caught.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as caught:
        os.rename(root / "plain", root / "empty")
    assert caught.value.errno == errno.EISDIR
    with pytest.raises(OSError) as caught:
        os.rename(root / "a", root / "a/inside")
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(OSError) as caught:
        renameat2(root / "plain", root / "a/file", RENAME_EXCHANGE)
    assert caught.value.errno == errno.EINVAL
    os.rename(root / "a", root / "empty")
    assert (root / "empty/file").read_bytes() == b"in a"
    assert not (root / "a").exists()
    assert (root / "full/x").read_bytes() == b"x"
    assert (root / "plain").read_bytes() == b"plain file"


def test_file_rename_replaces_the_target(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    sse = sse_params(key_bytes)
    s3.put_object(Bucket=bucket, Key="old.txt", Body=b"old content", **sse)
    s3.put_object(Bucket=bucket, Key="target.txt", Body=b"to be replaced", **sse)
    root = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file)).mountpoint
    os.rename(root / "old.txt", root / "target.txt")
    assert (root / "target.txt").read_bytes() == b"old content"
    assert not (root / "old.txt").exists()
    assert bytes(s3.get_object(Bucket=bucket, Key="target.txt", **sse)["Body"].read()) == b"old content"
    fsync_directory(root)  # the old name's delete is queued; fsync of the directory waits for it
    assert keys(s3, bucket) == {"target.txt"}
    # An editor's save: write a temporary file, fsync, rename it over the original.
    with open(root / ".target.txt.swp", "wb") as temporary:
        temporary.write(b"saved by the editor")
        temporary.flush()
        os.fsync(temporary.fileno())
    os.rename(root / ".target.txt.swp", root / "target.txt")
    assert (root / "target.txt").read_bytes() == b"saved by the editor"
    assert bytes(s3.get_object(Bucket=bucket, Key="target.txt", **sse)["Body"].read()) == b"saved by the editor"
    fsync_directory(root)
    assert keys(s3, bucket) == {"target.txt"}


def test_symlinks_in_s3fs_form_and_hard_links_refused(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    sse = sse_params(key_bytes)
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    root = mount.mountpoint
    (root / "real.txt").write_bytes(b"the real file")
    os.symlink("real.txt", root / "link")
    os.symlink("../elsewhere/ünïcode target", root / "dangling")
    assert os.readlink(root / "link") == "real.txt"
    assert (root / "link").read_bytes() == b"the real file"
    assert os.path.islink(root / "dangling") and not (root / "dangling").exists()
    with pytest.raises(OSError) as caught:
        os.symlink("x", root / "link")
    assert caught.value.errno == errno.EEXIST
    with pytest.raises(OSError) as caught:
        os.link(root / "real.txt", root / "hard")
    assert caught.value.errno == errno.EPERM
    # In S3 as s3fs keeps them: the target is the (encrypted) body, the mode says S_IFLNK.
    head = s3.head_object(Bucket=bucket, Key="link", **sse)
    assert int(head["Metadata"]["mode"]) == 0o120777
    assert bytes(s3.get_object(Bucket=bucket, Key="link", **sse)["Body"].read()) == b"real.txt"
    # A link written by s3fs (or anyone) reads the same, and survives a remount.
    s3.put_object(Bucket=bucket, Key="foreign-link", Body=b"real.txt", Metadata={"mode": str(0o120777)}, **sse)
    mount.stop()
    fresh = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="fresh")).mountpoint
    assert os.readlink(fresh / "link") == "real.txt"
    assert os.readlink(fresh / "foreign-link") == "real.txt"
    assert os.readlink(fresh / "dangling") == "../elsewhere/ünïcode target"
    assert (fresh / "foreign-link").read_bytes() == b"the real file"
    os.rename(fresh / "link", fresh / "moved-link")
    assert os.readlink(fresh / "moved-link") == "real.txt"
    os.unlink(fresh / "moved-link")
    assert (fresh / "real.txt").read_bytes() == b"the real file"


@pytest.mark.parametrize("uploaded_first", [True, False])
def test_a_file_renamed_under_its_writer_keeps_what_is_written_after(
    uploaded_first: bool, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path,
    mount_ssefs: Callable[..., Mount], s3: Any, key_bytes: bytes,
) -> None:
    """A log renamed by logrotate while its writer goes on: the writes after the rename land under the new
    name (they used to go to a dropped cache entry, and close failed with ENOENT)."""
    root = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file)).mountpoint
    with open(root / "app.log", "wb") as writer:
        writer.write(b"before the rename\n")
        writer.flush()
        if uploaded_first:
            os.fsync(writer.fileno())  # clean in the cache: the rename copies the object on the server
        os.rename(root / "app.log", root / "app.log.1")
        writer.write(b"after the rename\n")
    fd = os.open(root / "app.log.1", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    stored = s3.get_object(Bucket=bucket, Key="app.log.1", **sse_params(key_bytes))["Body"].read()
    assert stored == b"before the rename\nafter the rename\n"
    assert (root / "app.log.1").read_bytes() == stored
    assert not (root / "app.log").exists()
