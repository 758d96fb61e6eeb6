"""End to end: file mode, owner, group and mtime, kept in S3 user metadata the way s3fs-fuse keeps them.

``x-amz-meta-mode`` is the decimal st_mode (type bits included), ``-uid`` and
``-gid`` decimal ids, ``-mtime`` seconds with an optional 9-digit fraction.
Every test drives a real FUSE mount over SeaweedFS with syscalls and real
tools (tar, rsync, cp) and checks what ``stat`` says, what the server holds
(with the SSE-C key, and refused without it), and what a fresh mount with an
empty cache sees afterwards.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, fsync_directory, sse_params, unmount, write_config
from .proxy import TcpProxy

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]

# An mtime with all nine fractional digits, and one that is a whole second.
FRACTIONAL_MTIME_NS = 1_600_000_000_123_456_789
WHOLE_MTIME_NS = 1_500_000_000_000_000_000
# How far a time read back may be from the one set: microsecond precision at least.
MTIME_TOLERANCE_NS = 1000


# ---------------------------------------------------------------------- helpers


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} exited {result.returncode}: {result.stderr}{result.stdout}"
    return result


def head(s3: Any, bucket: str, key: str, sse_key: bytes) -> dict[str, Any]:
    return dict(s3.head_object(Bucket=bucket, Key=key, **sse_params(sse_key)))


def server_bytes(s3: Any, bucket: str, key: str, sse_key: bytes) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key, **sse_params(sse_key))["Body"].read())


def exists_on_server(s3: Any, bucket: str, key: str, sse_key: bytes) -> bool:
    try:
        head(s3, bucket, key, sse_key)
    except botocore.exceptions.ClientError as error:
        if error.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return False
        raise
    return True


def wait_for_metadata(
    s3: Any, bucket: str, key: str, sse_key: bytes, wanted: Callable[[dict[str, str]], bool], timeout: float = 30.0
) -> dict[str, str]:
    """Write-back uploads a few seconds after close: wait until the object's metadata satisfies ``wanted``."""
    deadline = time.monotonic() + timeout
    last: dict[str, str] | str = "no object"
    while time.monotonic() < deadline:
        try:
            last = dict(head(s3, bucket, key, sse_key)["Metadata"])
            if wanted(last):
                return last
        except botocore.exceptions.ClientError as error:
            last = str(error)
        time.sleep(0.2)
    raise AssertionError(f"{key}: metadata never as wanted (last: {last!r})")


def mtime_ns_of(value: str) -> int:
    """x-amz-meta-mtime in nanoseconds, computed with integers only."""
    whole, _, fraction = value.partition(".")
    assert whole.lstrip("-").isdigit() and (not fraction or (fraction.isdigit() and len(fraction) == 9)), value
    return int(whole) * 10**9 + (int(fraction) if fraction else 0)


def assert_metadata(
    metadata: dict[str, str], *, mode: int, uid: int, gid: int, mtime_ns: int | None = None
) -> None:
    assert metadata.get("mode") == str(mode), (oct(mode), metadata)
    assert metadata.get("uid") == str(uid), metadata
    assert metadata.get("gid") == str(gid), metadata
    assert "mtime" in metadata, metadata
    if mtime_ns is not None:
        assert abs(mtime_ns_of(metadata["mtime"]) - mtime_ns) <= MTIME_TOLERANCE_NS, (mtime_ns, metadata)


def assert_stat(
    path: Path, *, mode: int, uid: int, gid: int, mtime_ns: int | None = None, size: int | None = None
) -> os.stat_result:
    info = os.stat(path)
    assert oct(info.st_mode) == oct(mode), path
    assert (info.st_uid, info.st_gid) == (uid, gid), path
    if mtime_ns is not None:
        assert abs(info.st_mtime_ns - mtime_ns) <= MTIME_TOLERANCE_NS, (path, info.st_mtime_ns, mtime_ns)
    if size is not None:
        assert info.st_size == size, path
    return info


def get_without_key_fails(s3: Any, bucket: str, key: str) -> None:
    with pytest.raises(botocore.exceptions.ClientError):
        s3.get_object(Bucket=bucket, Key=key)


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def proxy(endpoint: SeaweedEndpoint) -> Iterator[TcpProxy]:
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as running:
        yield running


@pytest.fixture
def public_mountpoint() -> Iterator[Path]:
    """A mountpoint other users can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ssefs-attributes-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        unmount(path)
        try:
            path.rmdir()
        except OSError:
            pass


def as_user(uid: int, gid: int, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script], user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, text=True,
        timeout=60,
    )


def require_rsync() -> None:
    if shutil.which("rsync") is None:
        installed = subprocess.run(["apt-get", "install", "-y", "rsync"], capture_output=True, timeout=300)
        if installed.returncode != 0 or shutil.which("rsync") is None:
            pytest.skip("rsync is not installed and apt-get could not install it")


# A tree with varied modes, owners and mtimes (directories stay 0755: persisted directory modes are
# not what these tests are about).
# relative path: (permission bits, uid, gid, mtime in ns, size)
TREE: dict[str, tuple[int, int, int, int, int]] = {
    "tool.sh": (0o755, 0, 0, WHOLE_MTIME_NS, 200),
    "secret.key": (0o600, 0, 0, FRACTIONAL_MTIME_NS, 70_000),
    "readonly.txt": (0o444, 0, 0, 1_400_000_000_500_000_000, 1234),
    "shared.txt": (0o640, 1234, 5678, 1_650_000_000_000_001_000, 5000),
    "empty": (0o600, 0, 0, 1_300_000_000_000_000_000, 0),
    "sub/deeper/data.bin": (0o644, 4321, 4321, 1_700_000_000_987_654_321, 1_300_000),
    "sub/run": (0o700, 0, 0, 1_100_000_000_250_000_000, 10),
}


def make_tree(root: Path) -> None:
    for relative, (mode, uid, gid, mtime_ns, size) in TREE.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_bytes(b"#!/bin/sh\n" + b"#" * (size - 10) if relative.endswith(".sh") else secrets.token_bytes(size))
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        os.utime(path, ns=(mtime_ns, mtime_ns))
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.chmod(directory, 0o755)


def assert_tree_copied(source: Path, copy: Path, *, mtime_tolerance_ns: int = MTIME_TOLERANCE_NS) -> None:
    """Same names, kinds, bytes (compared by cmp), modes, owners, sizes and file mtimes."""
    source_names = sorted(str(p.relative_to(source)) for p in source.rglob("*"))
    copy_names = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    assert copy_names == source_names
    for relative in source_names:
        original, copied = os.lstat(source / relative), os.lstat(copy / relative)
        assert stat.S_IFMT(copied.st_mode) == stat.S_IFMT(original.st_mode), relative
        if stat.S_ISDIR(original.st_mode):
            assert stat.S_IMODE(copied.st_mode) == stat.S_IMODE(original.st_mode), relative
            continue
        assert oct(copied.st_mode) == oct(original.st_mode), relative
        assert (copied.st_uid, copied.st_gid) == (original.st_uid, original.st_gid), relative
        assert copied.st_size == original.st_size, relative
        assert abs(copied.st_mtime_ns - original.st_mtime_ns) <= mtime_tolerance_ns, (
            relative, copied.st_mtime_ns, original.st_mtime_ns,
        )
        run("cmp", str(source / relative), str(copy / relative))


# ---------------------------------------------------------------------- new files


def test_new_file_gets_creators_mode_after_umask_and_owner_in_metadata(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, umask_027: None,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="first"))
    mnt = mount.mountpoint
    synced_data, later_data = secrets.token_bytes(100_000), secrets.token_bytes(3000)

    # open(O_CREAT, 0666) under umask 027: 0640, owned by the creator (root here). fsync uploads at once.
    fd = os.open(mnt / "synced.bin", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)
    try:
        os.write(fd, synced_data)
        os.fsync(fd)
    finally:
        os.close(fd)
    synced = assert_stat(mnt / "synced.bin", mode=0o100640, uid=0, gid=0, size=len(synced_data))
    metadata = dict(head(s3, bucket, "synced.bin", key_bytes)["Metadata"])
    assert set(metadata) == {"mode", "uid", "gid", "mtime"}, metadata
    assert_metadata(metadata, mode=0o100640, uid=0, gid=0, mtime_ns=synced.st_mtime_ns)
    assert metadata["mode"] == "33184"  # s3fs's encoding: decimal, type bits included

    # Closed without fsync: write-back uploads it a few seconds later, with the same metadata.
    fd = os.open(mnt / "later.sh", os.O_CREAT | os.O_WRONLY, 0o777)
    os.write(fd, later_data)
    os.close(fd)
    later = assert_stat(mnt / "later.sh", mode=0o100750, uid=0, gid=0, size=len(later_data))
    # touch creates an empty file (0666 & ~027) and sets its time through the still-open descriptor.
    run("touch", "-d", "@1600000000", str(mnt / "touched"))
    assert_stat(mnt / "touched", mode=0o100640, uid=0, gid=0, mtime_ns=1_600_000_000 * 10**9, size=0)
    metadata = wait_for_metadata(s3, bucket, "later.sh", key_bytes, lambda m: "mode" in m)
    assert_metadata(metadata, mode=0o100750, uid=0, gid=0, mtime_ns=later.st_mtime_ns)
    assert server_bytes(s3, bucket, "later.sh", key_bytes) == later_data
    metadata = wait_for_metadata(s3, bucket, "touched", key_bytes, lambda m: "mode" in m)
    assert_metadata(metadata, mode=0o100640, uid=0, gid=0, mtime_ns=1_600_000_000 * 10**9)
    assert server_bytes(s3, bucket, "touched", key_bytes) == b""
    assert mount.stop() == 0

    # A fresh mount with an empty cache reads it all back from S3.
    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="second"))
    assert_stat(again.mountpoint / "synced.bin", mode=0o100640, uid=0, gid=0, mtime_ns=synced.st_mtime_ns,
                size=len(synced_data))
    assert_stat(again.mountpoint / "later.sh", mode=0o100750, uid=0, gid=0, mtime_ns=later.st_mtime_ns,
                size=len(later_data))
    assert (again.mountpoint / "synced.bin").read_bytes() == synced_data
    assert_stat(again.mountpoint / "touched", mode=0o100640, uid=0, gid=0, mtime_ns=1_600_000_000 * 10**9, size=0)


def test_files_created_by_another_user_are_theirs_and_modes_are_enforced(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, public_mountpoint: Path,
) -> None:
    config = write_config(tmp_path, endpoint, bucket, key_file, mount_extra="allow_other = true")
    mount = mount_ssefs(config, public_mountpoint)
    mnt = mount.mountpoint
    os.chmod(mnt, 0o1777)  # let others create files here
    assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o1777

    created = as_user(1234, 5678, f"umask 077 && printf 'for 1234 only' > '{mnt}/private.txt'")
    assert created.returncode == 0, created.stderr
    assert_stat(mnt / "private.txt", mode=0o100600, uid=1234, gid=5678, size=13)
    metadata = wait_for_metadata(s3, bucket, "private.txt", key_bytes, lambda m: "uid" in m)
    assert_metadata(metadata, mode=0o100600, uid=1234, gid=5678)

    # The kernel checks permissions against these attributes (default_permissions).
    denied = as_user(4321, 4321, f"cat '{mnt}/private.txt'")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    owner = as_user(1234, 5678, f"cat '{mnt}/private.txt'")
    assert (owner.returncode, owner.stdout) == (0, "for 1234 only")
    os.chmod(mnt / "private.txt", 0o644)
    allowed = as_user(4321, 4321, f"cat '{mnt}/private.txt'")
    assert (allowed.returncode, allowed.stdout) == (0, "for 1234 only")
    assert_metadata(dict(head(s3, bucket, "private.txt", key_bytes)["Metadata"]), mode=0o100644, uid=1234, gid=5678)


# ---------------------------------------------------------------------- chmod, chown, utimens


def test_chmod_chown_utime_on_uploaded_file_rewrite_metadata_in_place(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    data = secrets.token_bytes(300_000)
    s3.put_object(Bucket=bucket, Key="dir/file.bin", Body=data, **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="first"))
    path = mount.mountpoint / "dir" / "file.bin"
    listed_time = os.stat(path).st_mtime_ns

    os.setxattr(path, "user.origin", b"boto3")
    os.chmod(path, 0o640)
    assert_stat(path, mode=0o100640, uid=0, gid=0, mtime_ns=listed_time)
    metadata = dict(head(s3, bucket, "dir/file.bin", key_bytes)["Metadata"])
    assert metadata["mode"] == str(0o100640)
    # The time the file showed is kept, although the copy gave the object a new LastModified.
    assert abs(mtime_ns_of(metadata["mtime"]) - listed_time) <= MTIME_TOLERANCE_NS

    os.chmod(path, 0o6750)
    assert_stat(path, mode=0o106750, uid=0, gid=0)
    assert head(s3, bucket, "dir/file.bin", key_bytes)["Metadata"]["mode"] == str(0o106750)
    # chown of a set-id file: the kernel clears the set-id bits in the same request.
    os.chown(path, 1234, 5678)
    assert_stat(path, mode=0o100750, uid=1234, gid=5678)
    os.chmod(path, 0o640)
    assert_stat(path, mode=0o100640, uid=1234, gid=5678)
    os.chown(path, -1, 4321)  # the group alone
    assert_stat(path, mode=0o100640, uid=1234, gid=4321)
    os.utime(path, ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    assert_stat(path, mode=0o100640, uid=1234, gid=4321, mtime_ns=FRACTIONAL_MTIME_NS)
    # Every change is in S3 at once (no upload is pending for a file that has no new data).
    assert_metadata(
        dict(head(s3, bucket, "dir/file.bin", key_bytes)["Metadata"]),
        mode=0o100640, uid=1234, gid=4321, mtime_ns=FRACTIONAL_MTIME_NS,
    )
    # touch -d, with a fraction, through coreutils' utimensat.
    run("touch", "-d", "2021-03-04 05:06:07.25 UTC", str(path))
    touched_ns = 1_614_834_367_250_000_000
    assert_stat(path, mode=0o100640, uid=1234, gid=4321, mtime_ns=touched_ns, size=len(data))
    metadata = dict(head(s3, bucket, "dir/file.bin", key_bytes)["Metadata"])
    assert_metadata(metadata, mode=0o100640, uid=1234, gid=4321, mtime_ns=touched_ns)
    assert metadata["mtime"].startswith("16148343")

    # The data is untouched and still encrypted under the key: readable with it, refused without.
    assert server_bytes(s3, bucket, "dir/file.bin", key_bytes) == data
    get_without_key_fails(s3, bucket, "dir/file.bin")
    assert path.read_bytes() == data
    assert mount.stop() == 0

    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="second"))
    fresh = again.mountpoint / "dir" / "file.bin"
    assert_stat(fresh, mode=0o100640, uid=1234, gid=4321, mtime_ns=touched_ns, size=len(data))
    assert fresh.read_bytes() == data
    assert "file.bin" in run("ls", "-l", str(again.mountpoint / "dir")).stdout
    assert os.getxattr(fresh, "user.origin") == b"boto3"  # metadata rewrites keep the extended attributes


def test_changes_to_a_file_not_yet_uploaded_ride_along_with_its_upload(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    # A 10-minute write-back delay: nothing reaches S3 before the unmount flushes it.
    config = write_config(tmp_path, endpoint, bucket, key_file, name="first", cache_extra="writeback_delay = 600")
    mount = mount_ssefs(config)
    mnt = mount.mountpoint
    closed_data, open_data = secrets.token_bytes(50_000), secrets.token_bytes(2_500_000)

    (mnt / "closed.bin").write_bytes(closed_data)
    os.chmod(mnt / "closed.bin", 0o600)
    os.chown(mnt / "closed.bin", 1234, 5678)
    os.utime(mnt / "closed.bin", ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    assert_stat(mnt / "closed.bin", mode=0o100600, uid=1234, gid=5678, mtime_ns=FRACTIONAL_MTIME_NS,
                size=len(closed_data))

    # As tar and cp do: futimens, fchown and fchmod on the still-open file, then close.
    fd = os.open(mnt / "open.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, open_data)
        os.utime(fd, ns=(WHOLE_MTIME_NS, WHOLE_MTIME_NS))
        os.fchown(fd, 4321, 4321)
        os.fchmod(fd, 0o751)
        assert_stat(mnt / "open.bin", mode=0o100751, uid=4321, gid=4321, mtime_ns=WHOLE_MTIME_NS)
    finally:
        os.close(fd)
    assert_stat(mnt / "open.bin", mode=0o100751, uid=4321, gid=4321, mtime_ns=WHOLE_MTIME_NS, size=len(open_data))
    assert not exists_on_server(s3, bucket, "closed.bin", key_bytes)
    assert not exists_on_server(s3, bucket, "open.bin", key_bytes)

    assert mount.stop() == 0  # the unmount uploads both, attributes included
    assert_metadata(dict(head(s3, bucket, "closed.bin", key_bytes)["Metadata"]),
                    mode=0o100600, uid=1234, gid=5678, mtime_ns=FRACTIONAL_MTIME_NS)
    assert_metadata(dict(head(s3, bucket, "open.bin", key_bytes)["Metadata"]),
                    mode=0o100751, uid=4321, gid=4321, mtime_ns=WHOLE_MTIME_NS)
    assert server_bytes(s3, bucket, "closed.bin", key_bytes) == closed_data
    assert server_bytes(s3, bucket, "open.bin", key_bytes) == open_data

    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="second"))
    assert_stat(again.mountpoint / "closed.bin", mode=0o100600, uid=1234, gid=5678, mtime_ns=FRACTIONAL_MTIME_NS,
                size=len(closed_data))
    assert_stat(again.mountpoint / "open.bin", mode=0o100751, uid=4321, gid=4321, mtime_ns=WHOLE_MTIME_NS,
                size=len(open_data))
    assert (again.mountpoint / "open.bin").read_bytes() == open_data


def test_rewriting_and_renaming_keep_mode_and_owner(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    s3fs_style = {"mode": str(0o100600), "uid": "1234", "gid": "5678", "mtime": "1600000000"}
    for key in ("rewritten.txt", "moved.txt", "tree/a.txt", "tree/sub/b.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"old contents", Metadata=s3fs_style, **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    mnt = mount.mountpoint

    # A shell's ">" opens with O_TRUNC: the data and time change; mode and owner stay.
    before = time.time_ns()
    run("sh", "-c", f"printf 'new contents' > '{mnt}/rewritten.txt'")
    rewritten = assert_stat(mnt / "rewritten.txt", mode=0o100600, uid=1234, gid=5678, size=12)
    assert rewritten.st_mtime_ns >= before - 10**9
    metadata = wait_for_metadata(s3, bucket, "rewritten.txt", key_bytes, lambda m: m.get("mtime") != "1600000000")
    assert_metadata(metadata, mode=0o100600, uid=1234, gid=5678, mtime_ns=rewritten.st_mtime_ns)
    assert server_bytes(s3, bucket, "rewritten.txt", key_bytes) == b"new contents"

    # mv copies the object server-side: the copy carries all four attributes.
    os.rename(mnt / "moved.txt", mnt / "renamed.txt")
    assert_stat(mnt / "renamed.txt", mode=0o100600, uid=1234, gid=5678, mtime_ns=1_600_000_000 * 10**9)
    assert_metadata(dict(head(s3, bucket, "renamed.txt", key_bytes)["Metadata"]),
                    mode=0o100600, uid=1234, gid=5678, mtime_ns=1_600_000_000 * 10**9)
    fsync_directory(mnt)  # the old name's delete is queued
    assert not exists_on_server(s3, bucket, "moved.txt", key_bytes)

    # chmod on a file open for writing but not yet written, then a write: the upload keeps the new mode.
    fd = os.open(mnt / "renamed.txt", os.O_RDWR)
    try:
        os.fchmod(fd, 0o640)
        os.pwrite(fd, b"NEW", 0)
    finally:
        os.close(fd)
    assert_stat(mnt / "renamed.txt", mode=0o100640, uid=1234, gid=5678, size=12)
    metadata = wait_for_metadata(s3, bucket, "renamed.txt", key_bytes, lambda m: m.get("mtime") != "1600000000")
    assert_metadata(metadata, mode=0o100640, uid=1234, gid=5678, mtime_ns=os.stat(mnt / "renamed.txt").st_mtime_ns)
    assert server_bytes(s3, bucket, "renamed.txt", key_bytes) == b"NEW contents"

    # A directory moved with a file in it that is not uploaded yet: every file keeps its attributes.
    (mnt / "tree" / "new.txt").write_bytes(b"not uploaded yet")
    os.chmod(mnt / "tree" / "new.txt", 0o751)
    os.utime(mnt / "tree" / "new.txt", ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    os.rename(mnt / "tree", mnt / "moved-tree")
    for relative in ("a.txt", "sub/b.txt"):
        assert_stat(mnt / "moved-tree" / relative, mode=0o100600, uid=1234, gid=5678, mtime_ns=1_600_000_000 * 10**9)
        assert_metadata(dict(head(s3, bucket, f"moved-tree/{relative}", key_bytes)["Metadata"]),
                        mode=0o100600, uid=1234, gid=5678, mtime_ns=1_600_000_000 * 10**9)
    assert_stat(mnt / "moved-tree" / "new.txt", mode=0o100751, uid=0, gid=0, mtime_ns=FRACTIONAL_MTIME_NS)
    metadata = wait_for_metadata(s3, bucket, "moved-tree/new.txt", key_bytes, lambda m: "mode" in m)
    assert_metadata(metadata, mode=0o100751, uid=0, gid=0, mtime_ns=FRACTIONAL_MTIME_NS)
    assert not exists_on_server(s3, bucket, "tree/a.txt", key_bytes)


def test_read_only_mount_refuses_attribute_changes(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    s3fs_style = {"mode": str(0o100600), "uid": "1234", "gid": "5678", "mtime": "1600000000"}
    s3.put_object(Bucket=bucket, Key="fixed.txt", Body=b"fixed", Metadata=s3fs_style, **sse_params(key_bytes))
    mnt = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, mount_extra="read_only = true")).mountpoint
    changes: list[Callable[[], None]] = [
        lambda: os.chmod(mnt / "fixed.txt", 0o644),
        lambda: os.chown(mnt / "fixed.txt", 0, 0),
        lambda: os.utime(mnt / "fixed.txt", ns=(WHOLE_MTIME_NS, WHOLE_MTIME_NS)),
    ]
    for change in changes:
        with pytest.raises(OSError) as caught:
            change()
        assert caught.value.errno == errno.EROFS
    assert_stat(mnt / "fixed.txt", mode=0o100600, uid=1234, gid=5678, mtime_ns=1_600_000_000 * 10**9)
    assert head(s3, bucket, "fixed.txt", key_bytes)["Metadata"] == s3fs_style


# ---------------------------------------------------------------------- objects from other tools


def test_objects_written_by_other_tools(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    objects: dict[str, dict[str, str]] = {
        "s3fs.txt": {"mode": str(0o100600), "uid": "1234", "gid": "5678", "mtime": "1600000000"},
        "fraction.txt": {"mode": str(0o100755), "uid": "0", "gid": "0", "mtime": "1700000000.123456789"},
        "bits-only.txt": {"mode": "416"},  # 0640 without the type bits, as some tools write it
        "plain.txt": {},
        "malformed.txt": {"mode": "abc", "uid": "-1", "gid": "12x", "mtime": "x"},
        "malformed-2.txt": {"mode": "", "uid": "99999999999", "gid": " ", "mtime": "1.2.3"},
    }
    for key, metadata in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode(), Metadata=metadata, **sse_params(key_bytes))
    last_modified = {
        key: int(head(s3, bucket, key, key_bytes)["LastModified"].timestamp())
        for key in ("bits-only.txt", "plain.txt", "malformed.txt", "malformed-2.txt")
    }
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    mnt = mount.mountpoint

    listing = run("ls", "-ln", "--time-style=+%s", str(mnt)).stdout
    lines = {line.split()[-1]: line.split() for line in listing.splitlines() if not line.startswith("total")}
    assert sorted(lines) == sorted(objects)
    assert lines["s3fs.txt"][0] == "-rw-------" and lines["s3fs.txt"][2:4] == ["1234", "5678"]
    assert lines["s3fs.txt"][5] == "1600000000"

    assert_stat(mnt / "s3fs.txt", mode=0o100600, uid=1234, gid=5678, mtime_ns=1_600_000_000 * 10**9)
    assert_stat(mnt / "fraction.txt", mode=0o100755, uid=0, gid=0, mtime_ns=1_700_000_000_123_456_789)
    bits_only = assert_stat(mnt / "bits-only.txt", mode=0o100640, uid=0, gid=0)
    assert abs(bits_only.st_mtime - last_modified["bits-only.txt"]) <= 1
    # No metadata, or values that do not parse: the mount's defaults (0644, the mounting user, LastModified).
    for key in ("plain.txt", "malformed.txt", "malformed-2.txt"):
        info = assert_stat(mnt / key, mode=0o100644, uid=os.getuid(), gid=os.getgid(), size=len(key))
        assert abs(info.st_mtime - last_modified[key]) <= 1, key
        assert (mnt / key).read_bytes() == key.encode()

    # Replaced by the other tool (new data, new metadata): the running mount shows it after attr_timeout.
    s3.put_object(
        Bucket=bucket, Key="s3fs.txt", Body=b"version two",
        Metadata={"mode": str(0o100700), "uid": "42", "gid": "43", "mtime": "1650000000"}, **sse_params(key_bytes),
    )
    time.sleep(1.2)
    run("ls", "-l", str(mnt))
    assert_stat(mnt / "s3fs.txt", mode=0o100700, uid=42, gid=43, mtime_ns=1_650_000_000 * 10**9, size=11)
    assert (mnt / "s3fs.txt").read_bytes() == b"version two"


def test_mount_defaults_apply_to_objects_without_attributes(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"plain", **sse_params(key_bytes))
    s3.put_object(Bucket=bucket, Key="bad.txt", Body=b"bad", Metadata={"mode": "0x1ff", "uid": "root"},
                  **sse_params(key_bytes))
    s3.put_object(Bucket=bucket, Key="own.txt", Body=b"own", Metadata={"mode": str(0o100755), "uid": "7"},
                  **sse_params(key_bytes))
    config = write_config(tmp_path, endpoint, bucket, key_file,
                          mount_extra='file_mode = "0600"\nuid = 1000\ngid = 1001')
    mnt = mount_ssefs(config).mountpoint
    assert_stat(mnt / "plain.txt", mode=0o100600, uid=1000, gid=1001)
    assert_stat(mnt / "bad.txt", mode=0o100600, uid=1000, gid=1001)
    assert_stat(mnt / "own.txt", mode=0o100755, uid=7, gid=1001)  # each value on its own
    os.chmod(mnt / "plain.txt", 0o640)
    assert_stat(mnt / "plain.txt", mode=0o100640, uid=1000, gid=1001)
    assert head(s3, bucket, "plain.txt", key_bytes)["Metadata"]["mode"] == str(0o100640)
    assert server_bytes(s3, bucket, "plain.txt", key_bytes) == b"plain"


# ---------------------------------------------------------------------- large files, crashes, precision, odd types


def test_multipart_objects_carry_metadata_and_survive_a_chmod_copy(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, umask_027: None,
) -> None:
    config = write_config(tmp_path, endpoint, bucket, key_file, name="first",
                          s3_extra='multipart_threshold = "5MiB"\npart_size = "5MiB"')
    mount = mount_ssefs(config)
    path = mount.mountpoint / "big.bin"
    data = secrets.token_bytes(11 * 1024 * 1024 + 123)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    uploaded = head(s3, bucket, "big.bin", key_bytes)
    assert_metadata(dict(uploaded["Metadata"]), mode=0o100600, uid=0, gid=0)
    os.chmod(path, 0o640)
    os.chown(path, 1234, 5678)
    os.utime(path, ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    copied = head(s3, bucket, "big.bin", key_bytes)
    assert_metadata(dict(copied["Metadata"]), mode=0o100640, uid=1234, gid=5678, mtime_ns=FRACTIONAL_MTIME_NS)
    assert copied["ContentLength"] == len(data)
    assert server_bytes(s3, bucket, "big.bin", key_bytes) == data
    get_without_key_fails(s3, bucket, "big.bin")
    assert mount.stop() == 0
    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="second"))
    assert_stat(again.mountpoint / "big.bin", mode=0o100640, uid=1234, gid=5678, mtime_ns=FRACTIONAL_MTIME_NS,
                size=len(data))
    assert (again.mountpoint / "big.bin").read_bytes() == data


def test_attribute_changes_not_yet_uploaded_survive_a_crash(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    config = write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600")
    mount = mount_ssefs(config)
    data = secrets.token_bytes(40_000)
    (mount.mountpoint / "pending.bin").write_bytes(data)  # close() made it durable in the cache
    os.chmod(mount.mountpoint / "pending.bin", 0o604)
    os.chown(mount.mountpoint / "pending.bin", 1234, 5678)
    os.utime(mount.mountpoint / "pending.bin", ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    mount.process.kill()  # no flush at unmount: only the cache knows the file and its attributes
    mount.process.wait(timeout=30)
    unmount(mount.mountpoint)
    assert not exists_on_server(s3, bucket, "pending.bin", key_bytes)

    recovered = mount_ssefs(config)  # same cache: what was left dirty is uploaded, attributes included
    metadata = wait_for_metadata(s3, bucket, "pending.bin", key_bytes, lambda m: "mode" in m)
    assert_metadata(metadata, mode=0o100604, uid=1234, gid=5678, mtime_ns=FRACTIONAL_MTIME_NS)
    assert server_bytes(s3, bucket, "pending.bin", key_bytes) == data
    assert_stat(recovered.mountpoint / "pending.bin", mode=0o100604, uid=1234, gid=5678,
                mtime_ns=FRACTIONAL_MTIME_NS, size=len(data))


def test_mtime_nanoseconds_are_kept_exactly(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    require_rsync()
    source = tmp_path / "src"
    source.mkdir()
    last_nanosecond = 1_700_000_000_999_999_999
    (source / "edge.txt").write_bytes(b"the last nanosecond of a second")
    os.utime(source / "edge.txt", ns=(last_nanosecond, last_nanosecond))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    target = mount.mountpoint / "dst"
    run("rsync", "-a", f"{source}/", f"{target}/")
    again = run("rsync", "-a", "--itemize-changes", f"{source}/", f"{target}/").stdout
    assert [line for line in again.splitlines() if line.startswith(">f")] == [], again
    assert os.stat(target / "edge.txt").st_mtime_ns == last_nanosecond
    metadata = wait_for_metadata(s3, bucket, "dst/edge.txt", key_bytes, lambda m: "mtime" in m)
    assert metadata["mtime"] == "1700000000.999999999"


@pytest.mark.parametrize("stored_type", [stat.S_IFIFO, stat.S_IFDIR], ids=["s3fs-fifo", "old-style-dir-object"])
def test_chmod_takes_effect_on_files_stored_with_another_type(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, stored_type: int,
) -> None:
    s3.put_object(Bucket=bucket, Key="odd", Body=b"odd", Metadata={"mode": str(stored_type | 0o644), "uid": "7"},
                  **sse_params(key_bytes))
    mnt = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file)).mountpoint
    assert_stat(mnt / "odd", mode=0o100644, uid=7, gid=0)  # shown as the regular file it is in this mount
    os.chmod(mnt / "odd", 0o600)
    assert_stat(mnt / "odd", mode=0o100600, uid=7, gid=0)


# ---------------------------------------------------------------------- directories


def test_chmod_and_chown_on_directories_hold_for_the_mount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    s3.put_object(Bucket=bucket, Key="implicit/child.txt", Body=b"x", **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    mnt = mount.mountpoint
    (mnt / "made").mkdir()
    assert stat.S_IMODE(os.stat(mnt / "made").st_mode) == 0o755

    os.chmod(mnt / "made", 0o700)
    os.chmod(mnt / "implicit", 0o750)
    os.chown(mnt / "implicit", 1234, 5678)
    for _round in range(2):
        assert oct(os.stat(mnt / "made").st_mode) == oct(stat.S_IFDIR | 0o700)
        implicit = os.stat(mnt / "implicit")
        assert oct(implicit.st_mode) == oct(stat.S_IFDIR | 0o750)
        assert (implicit.st_uid, implicit.st_gid) == (1234, 5678)
        time.sleep(1.2)  # past attr_timeout: listings are fetched again, the modes stay
        assert sorted(os.listdir(mnt)) == ["implicit", "made"]
        assert os.listdir(mnt / "implicit") == ["child.txt"]
    # Still directories that work.
    (mnt / "made" / "inside.txt").write_bytes(b"inside")
    assert (mnt / "made" / "inside.txt").read_bytes() == b"inside"


def test_mkdir_gives_the_creator_the_directory_with_the_mode_asked_for(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, public_mountpoint: Path,
) -> None:
    config = write_config(tmp_path, endpoint, bucket, key_file, mount_extra="allow_other = true")
    mnt = mount_ssefs(config, public_mountpoint).mountpoint
    os.chmod(mnt, 0o1777)
    made = as_user(1234, 5678, f"umask 022 && mkdir -m 700 '{mnt}/mine' && printf 'x' > '{mnt}/mine/file'")
    info = os.stat(mnt / "mine")
    assert (made.returncode, oct(info.st_mode), info.st_uid, info.st_gid) == (0, oct(stat.S_IFDIR | 0o700), 1234, 5678)
    assert (mnt / "mine" / "file").read_bytes() == b"x"


# ---------------------------------------------------------------------- the metadata index


def test_metadata_index_remembers_attributes_by_etag_across_remounts(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, proxy: TcpProxy,
) -> None:
    count = 50
    for index in range(count):
        s3.put_object(
            Bucket=bucket, Key=f"f{index:02d}", Body=f"object {index}".encode(),
            Metadata={"mode": str(0o100600 + index % 8), "uid": str(1000 + index), "gid": "5678",
                      "mtime": str(1_600_000_000 + index)},
            **sse_params(key_bytes),
        )
    config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint)

    def ls_and_count(mount: Mount) -> tuple[dict[str, list[str]], int]:
        proxy.reset_counters()
        listing = run("ls", "-ln", "--time-style=+%s", str(mount.mountpoint)).stdout
        sent = proxy.bytes_to_server
        return {line.split()[-1]: line.split() for line in listing.splitlines() if " f" in line}, sent

    first = mount_ssefs(config)
    lines, first_traffic = ls_and_count(first)
    assert len(lines) == count
    for index in range(count):
        fields = lines[f"f{index:02d}"]
        assert fields[2:4] == [str(1000 + index), "5678"] and fields[5] == str(1_600_000_000 + index)
        assert fields[0] == stat.filemode(0o100600 + index % 8)
    assert first.stop() == 0

    etags = {item["Key"]: item["ETag"].strip('"') for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    database = sqlite3.connect(f"file:{tmp_path / 'mount-cache' / 'metadata.sqlite'}?mode=ro", uri=True)
    try:
        rows = database.execute("SELECT object_key, etag, mode, uid, gid, mtime_ns FROM attributes").fetchall()
    finally:
        database.close()
    assert len(rows) == count
    for object_key, etag, mode, uid, gid, mtime_ns in rows:
        index = int(object_key[1:])
        assert etag == etags[object_key]
        assert (mode, uid, gid, mtime_ns) == (0o100600 + index % 8, 1000 + index, 5678, (1_600_000_000 + index) * 10**9)

    # Another client replaces one object (new data: new ETag, new mode): the index must not answer for it.
    s3.put_object(
        Bucket=bucket, Key="f07", Body=b"replaced by another client",
        Metadata={"mode": str(0o100700), "uid": "42", "gid": "43", "mtime": "1234567890"}, **sse_params(key_bytes),
    )
    second = mount_ssefs(config)
    lines, second_traffic = ls_and_count(second)
    assert lines["f07"][0] == "-rwx------" and lines["f07"][2:4] == ["42", "43"] and lines["f07"][5] == "1234567890"
    assert_stat(second.mountpoint / "f07", mode=0o100700, uid=42, gid=43, mtime_ns=1_234_567_890 * 10**9, size=26)
    assert_stat(second.mountpoint / "f08", mode=0o100600, uid=1008, gid=5678, mtime_ns=1_600_000_008 * 10**9)
    # One LIST and one HEAD instead of one LIST and 50 HEADs (each HEAD is several hundred bytes of headers).
    assert second_traffic * 5 < first_traffic, (first_traffic, second_traffic)


@pytest.mark.parametrize("how", ["s3fs-chmod-copy", "same-bytes-put"])
def test_metadata_only_change_by_another_client_is_seen(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, how: str,
) -> None:
    old = {"mode": str(0o100600), "uid": "1234", "gid": "5678", "mtime": "1600000000"}
    new = {"mode": str(0o100755), "uid": "4321", "gid": "8765", "mtime": "1700000000"}
    s3.put_object(Bucket=bucket, Key="shared.txt", Body=b"same bytes", Metadata=old, **sse_params(key_bytes))
    config = write_config(tmp_path, endpoint, bucket, key_file)
    mount = mount_ssefs(config)
    path = mount.mountpoint / "shared.txt"
    run("ls", "-l", str(mount.mountpoint))
    assert_stat(path, mode=0o100600, uid=1234, gid=5678, mtime_ns=1_600_000_000 * 10**9)

    before = head(s3, bucket, "shared.txt", key_bytes)
    params = sse_params(key_bytes)
    # The index tells such a change by LastModified, to the second: a change within the
    # same second as the previous write is not seen (docs/posix.md).
    time.sleep(1.1)
    if how == "s3fs-chmod-copy":
        s3.copy_object(
            Bucket=bucket, Key="shared.txt", CopySource={"Bucket": bucket, "Key": "shared.txt"},
            MetadataDirective="REPLACE", Metadata=new,
            CopySourceSSECustomerAlgorithm=params["SSECustomerAlgorithm"],
            CopySourceSSECustomerKey=params["SSECustomerKey"],
            CopySourceSSECustomerKeyMD5=params["SSECustomerKeyMD5"],
            **params,
        )
    else:
        s3.put_object(Bucket=bucket, Key="shared.txt", Body=b"same bytes", Metadata=new, **params)
    after = head(s3, bucket, "shared.txt", key_bytes)
    assert after["Metadata"] == new
    assert after["ETag"] == before["ETag"]  # what the index is keyed on

    def shows_new_attributes(mnt: Path) -> None:
        run("ls", "-l", str(mnt))
        assert_stat(mnt / "shared.txt", mode=0o100755, uid=4321, gid=8765, mtime_ns=1_700_000_000 * 10**9)

    time.sleep(1.2)  # past attr_timeout: the running mount lists and looks again
    shows_new_attributes(mount.mountpoint)
    assert mount.stop() == 0
    shows_new_attributes(mount_ssefs(config).mountpoint)  # same cache dir, same index


# ---------------------------------------------------------------------- real tools


def test_tar_extracts_modes_owners_and_mtimes_that_survive_a_remount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    source = tmp_path / "src"
    make_tree(source)
    archive = tmp_path / "tree.tar"
    run("tar", "-cf", str(archive), "-C", str(source), ".")
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="first"))
    target = mount.mountpoint / "unpacked"
    target.mkdir()

    run("tar", "-xf", str(archive), "-C", str(target))  # as root: modes, owners and times restored
    diff = run("tar", "-df", str(archive), "-C", str(target))
    assert diff.stdout == "" and diff.stderr == ""
    assert_tree_copied(source, target, mtime_tolerance_ns=10**9)  # tar's default format keeps whole seconds
    assert mount.stop() == 0

    metadata = dict(head(s3, bucket, "unpacked/shared.txt", key_bytes)["Metadata"])
    assert_metadata(metadata, mode=0o100640, uid=1234, gid=5678, mtime_ns=1_650_000_000 * 10**9)

    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="second"))
    diff = run("tar", "-df", str(archive), "-C", str(again.mountpoint / "unpacked"))
    assert diff.stdout == "" and diff.stderr == ""
    assert_tree_copied(source, again.mountpoint / "unpacked", mtime_tolerance_ns=10**9)


def test_rsync_a_twice_transfers_nothing_the_second_time(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    require_rsync()
    source = tmp_path / "src"
    make_tree(source)
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="first"))
    target = mount.mountpoint / "dst"

    run("rsync", "-a", f"{source}/", f"{target}/")  # temporary file, chmod/chown/utimens, rename
    assert_tree_copied(source, target)
    again = run("rsync", "-a", "--itemize-changes", f"{source}/", f"{target}/").stdout
    assert [line for line in again.splitlines() if line.startswith(">f")] == [], again
    assert mount.stop() == 0

    fresh = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="second"))
    target = fresh.mountpoint / "dst"
    assert_tree_copied(source, target)
    after_remount = run("rsync", "-a", "--itemize-changes", f"{source}/", f"{target}/").stdout
    assert [line for line in after_remount.splitlines() if line.startswith(">f")] == [], after_remount
    assert server_bytes(s3, bucket, "dst/secret.key", key_bytes) == (source / "secret.key").read_bytes()


def test_cp_a_preserves_modes_owners_and_mtimes(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    source = tmp_path / "src"
    make_tree(source)
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="first"))
    run("cp", "-a", str(source), str(mount.mountpoint / "copy"))
    assert_tree_copied(source, mount.mountpoint / "copy")
    assert mount.stop() == 0

    for relative, (mode, uid, gid, mtime_ns, size) in TREE.items():
        key = f"copy/{relative}"
        assert_metadata(dict(head(s3, bucket, key, key_bytes)["Metadata"]),
                        mode=stat.S_IFREG | mode, uid=uid, gid=gid, mtime_ns=mtime_ns)
        assert len(server_bytes(s3, bucket, key, key_bytes)) == size
    fresh = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="second"))
    assert_tree_copied(source, fresh.mountpoint / "copy")
