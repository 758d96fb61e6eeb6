"""End to end: ssefs mounted with FUSE over SeaweedFS (HTTPS), driven by real tools and syscalls.

Every test checks real outcomes: bytes read back through the mount, what the
server holds (with the key, without it, with a wrong key), errno values, and
that neither the server's disk nor the local cache ever holds the plaintext.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ssefs.seaweed import SeaweedEndpoint, SeaweedServer

from .conftest import Mount, eventually_on_server, fsync_directory, send_signal_and_wait, sse_params, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]


def run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} failed: {result.stderr}"
    return result.stdout


def cat(path: Path) -> bytes:
    result = subprocess.run(["cat", str(path)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout






def client_error_status(call: Callable[[], Any]) -> int:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    return int(caught.value.response["ResponseMetadata"]["HTTPStatusCode"])


def test_cp_ls_cat_mkdir_rm_round_trip(
    config_file: Path, mount_ssefs: MountFactory, tmp_path: Path, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    mount = mount_ssefs(config_file)
    mnt = mount.mountpoint
    source = tmp_path / "source.bin"
    payload = secrets.token_bytes(300_000)
    source.write_bytes(payload)

    run("cp", str(source), str(mnt / "copy.bin"))
    run("mkdir", str(mnt / "docs"))
    run("cp", str(source), str(mnt / "docs" / "inner.bin"))

    assert sorted(os.listdir(mnt)) == ["copy.bin", "docs"]
    assert os.listdir(mnt / "docs") == ["inner.bin"]
    assert (mnt / "copy.bin").read_bytes() == payload
    assert cat(mnt / "docs" / "inner.bin") == payload
    info = os.stat(mnt / "copy.bin")
    assert info.st_size == len(payload)
    assert info.st_uid == os.getuid() and info.st_gid == os.getgid()
    assert oct(info.st_mode & 0o777) == oct(0o644)
    assert os.stat(mnt / "docs").st_mode & 0o777 == 0o755
    listing = run("ls", "-l", str(mnt))
    assert "copy.bin" in listing and "docs" in listing

    # The server holds the same bytes under the key, at the expected keys.
    eventually_on_server(s3, bucket, "copy.bin", key_bytes, payload)
    eventually_on_server(s3, bucket, "docs/inner.bin", key_bytes, payload)

    run("rm", str(mnt / "copy.bin"))
    with pytest.raises(OSError) as caught:
        os.rmdir(mnt / "docs")
    assert caught.value.errno == errno.ENOTEMPTY
    run("rm", "-r", str(mnt / "docs"))
    assert os.listdir(mnt) == []
    fsync_directory(mnt)  # the deletes are queued; this returns once S3 has them
    assert client_error_status(lambda: s3.head_object(Bucket=bucket, Key="copy.bin", **sse_params(key_bytes))) == 404


def test_server_enforces_key_and_holds_no_plaintext(
    config_file: Path, mount_ssefs: MountFactory, seaweed: SeaweedServer, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    mount = mount_ssefs(config_file)
    payload = secrets.token_bytes(256 * 1024)
    (mount.mountpoint / "secret.bin").write_bytes(payload)
    eventually_on_server(s3, bucket, "secret.bin", key_bytes, payload)

    # Without a key: 400. With another key: 403.
    assert client_error_status(lambda: s3.get_object(Bucket=bucket, Key="secret.bin")) == 400
    other = sse_params(secrets.token_bytes(32))
    assert client_error_status(lambda: s3.get_object(Bucket=bucket, Key="secret.bin", **other)) == 403

    # Neither SeaweedFS's data nor our cache directory contains any slice of the plaintext.
    windows = [payload[i:i + 48] for i in range(0, len(payload) - 48, len(payload) // 16)]
    for root in (seaweed.volume_dir, config_file.parent / "mount-cache"):
        for path in root.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert not any(window in content for window in windows), f"plaintext found in {path}"


def test_interoperability_with_boto3_both_ways(
    config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    written_by_boto3 = secrets.token_bytes(70_000)
    s3.put_object(Bucket=bucket, Key="from-boto3/data.bin", Body=written_by_boto3, **sse_params(key_bytes))
    mount = mount_ssefs(config_file)
    assert cat(mount.mountpoint / "from-boto3" / "data.bin") == written_by_boto3
    assert os.stat(mount.mountpoint / "from-boto3" / "data.bin").st_size == len(written_by_boto3)

    written_by_mount = secrets.token_bytes(90_000)
    (mount.mountpoint / "to-boto3.bin").write_bytes(written_by_mount)
    eventually_on_server(s3, bucket, "to-boto3.bin", key_bytes, written_by_mount)


def test_large_file_multipart_and_partial_updates(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, mount_ssefs: MountFactory,
    s3: Any, key_bytes: bytes,
) -> None:
    config = write_config(tmp_path, endpoint, bucket, key_file,
                          s3_extra='multipart_threshold = "5MiB"\npart_size = "5MiB"')
    mount = mount_ssefs(config)
    big = tmp_path / "big.bin"
    payload = bytearray(secrets.token_bytes(13 * 1024 * 1024 + 12345))
    big.write_bytes(payload)
    target = mount.mountpoint / "big.bin"
    run("cp", str(big), str(target))
    eventually_on_server(s3, bucket, "big.bin", key_bytes, payload)
    head = s3.head_object(Bucket=bucket, Key="big.bin", **sse_params(key_bytes))
    assert head["ContentLength"] == len(payload)
    assert "-" in head["ETag"], "expected a multipart ETag"

    # A write in the middle (dd conv=notrunc), an append, then a truncate.
    patch = secrets.token_bytes(4096)
    (tmp_path / "patch").write_bytes(patch)
    run("dd", f"if={tmp_path / 'patch'}", f"of={target}", "bs=4096", "seek=1000", "conv=notrunc", "status=none")
    payload[4096 * 1000:4096 * 1001] = patch
    with open(target, "ab") as appender:
        appender.write(b"tail")
    payload += b"tail"
    assert target.read_bytes() == payload
    eventually_on_server(s3, bucket, "big.bin", key_bytes, payload)
    os.truncate(target, 1000)
    eventually_on_server(s3, bucket, "big.bin", key_bytes, payload[:1000])
    assert target.read_bytes() == payload[:1000]
    # Random read of a range.
    with open(target, "rb") as reader:
        reader.seek(10)
        assert reader.read(20) == payload[10:30]


def test_errno_values(
    config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    s3.put_object(Bucket=bucket, Key="mine.txt", Body=b"mine", **sse_params(key_bytes))
    mount = mount_ssefs(config_file)
    # Written by other tools after the start-up check, which would refuse a foreign key.
    s3.put_object(Bucket=bucket, Key="foreign.txt", Body=b"other key", **sse_params(secrets.token_bytes(32)))
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"not encrypted")
    mnt = mount.mountpoint

    def errno_of(call: Callable[[], Any]) -> int:
        with pytest.raises(OSError) as caught:
            call()
        return int(caught.value.errno or 0)

    assert errno_of(lambda: open(mnt / "missing.txt", "rb")) == errno.ENOENT
    assert errno_of(lambda: (mnt / "foreign.txt").read_bytes()) == errno.EACCES
    assert errno_of(lambda: (mnt / "plain.txt").read_bytes()) == errno.EIO
    os.mkdir(mnt / "dir")
    assert errno_of(lambda: os.mkdir(mnt / "dir")) == errno.EEXIST
    assert errno_of(lambda: os.unlink(mnt / "dir")) == errno.EISDIR
    assert errno_of(lambda: os.rmdir(mnt / "mine.txt")) == errno.ENOTDIR
    assert errno_of(lambda: os.link(mnt / "mine.txt", mnt / "hard")) == errno.EPERM
    assert errno_of(lambda: open(mnt / ("x" * 256), "wb")) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.open(mnt / "mine.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST
    # The readable file still reads fine next to the broken ones.
    assert (mnt / "mine.txt").read_bytes() == b"mine"
    log = mount.log()
    assert "foreign.txt" in log and "plain.txt" in log
    # Each failure is logged once, not once per kernel retry.
    assert log.count("'foreign.txt'") == 1


def test_implicit_directories_markers_and_rename(
    config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    s3.put_object(Bucket=bucket, Key="a/b/c.txt", Body=b"deep", **sse_params(key_bytes))
    s3.put_object(Bucket=bucket, Key="marker/", Body=b"")
    mount = mount_ssefs(config_file)
    mnt = mount.mountpoint
    assert sorted(os.listdir(mnt)) == ["a", "marker"]
    assert os.listdir(mnt / "a") == ["b"]
    assert (mnt / "a" / "b" / "c.txt").read_bytes() == b"deep"
    assert os.listdir(mnt / "marker") == []
    assert (mnt / "a" / "b").is_dir()

    os.rename(mnt / "a" / "b" / "c.txt", mnt / "marker" / "moved.txt")
    assert (mnt / "marker" / "moved.txt").read_bytes() == b"deep"
    eventually_on_server(s3, bucket, "marker/moved.txt", key_bytes, b"deep")
    fsync_directory(mnt / "a" / "b")
    assert client_error_status(lambda: s3.head_object(Bucket=bucket, Key="a/b/c.txt", **sse_params(key_bytes))) == 404
    run("mv", str(mnt / "marker"), str(mnt / "renamed-dir"))
    assert (mnt / "renamed-dir" / "moved.txt").read_bytes() == b"deep"


def emptied_implicit_directories(s3: Any, bucket: str, key_bytes: bytes, mnt: Path) -> list[str]:
    """Directories another tool made implicitly (no marker), each emptied through the mount in one of the
    four ways something leaves a directory; returns their names."""
    for key in ("unlinked/only.txt", "moved-from/only.txt", "sub-removed/sub/", "dir-moved/sub/inner.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x", **sse_params(key_bytes))
    os.unlink(mnt / "unlinked" / "only.txt")
    os.rename(mnt / "moved-from" / "only.txt", mnt / "moved.txt")
    os.rmdir(mnt / "sub-removed" / "sub")
    os.rename(mnt / "dir-moved" / "sub", mnt / "moved-dir")
    fsync_directory(mnt)
    return ["dir-moved", "moved-from", "sub-removed", "unlinked"]


def test_emptied_directories_stay_until_rmdir(
    config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    # S3 drops a directory without a marker with its last object (AWS at once, SeaweedFS minutes later);
    # POSIX keeps it until rmdir. What the server holds decides, so each must now have its marker.
    mount = mount_ssefs(config_file)
    emptied = emptied_implicit_directories(s3, bucket, key_bytes, mount.mountpoint)
    for name in emptied:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=name + "/")
        assert [item["Key"] for item in listed.get("Contents", [])] == [name + "/"]
    assert mount.stop() == 0
    mnt = mount_ssefs(config_file).mountpoint
    assert sorted(os.listdir(mnt)) == sorted([*emptied, "moved-dir", "moved.txt"])
    for name in emptied:
        assert os.listdir(mnt / name) == []
        os.rmdir(mnt / name)
    fsync_directory(mnt)
    assert sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])) == [
        "moved-dir/", "moved-dir/inner.txt", "moved.txt"]


@pytest.mark.slow
def test_emptied_directories_outlive_the_servers_empty_folder_cleanup(
    config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    # SeaweedFS deletes a folder left empty and without a marker two minutes or more after its last delete.
    mount = mount_ssefs(config_file)
    emptied = emptied_implicit_directories(s3, bucket, key_bytes, mount.mountpoint)
    s3.put_object(Bucket=bucket, Key="control/only.txt", Body=b"x", **sse_params(key_bytes))
    s3.delete_object(Bucket=bucket, Key="control/only.txt")  # emptied by another tool: it does go
    deadline = time.monotonic() + 240
    while "control/" in prefixes_at_top(s3, bucket) and time.monotonic() < deadline:
        time.sleep(5)
    assert "control/" not in prefixes_at_top(s3, bucket), "the server kept an empty folder: nothing was tested"
    assert mount.stop() == 0
    mnt = mount_ssefs(config_file).mountpoint
    assert sorted(os.listdir(mnt)) == sorted([*emptied, "moved-dir", "moved.txt"])


def prefixes_at_top(s3: Any, bucket: str) -> list[str]:
    return [common["Prefix"] for common in s3.list_objects_v2(Bucket=bucket, Delimiter="/").get("CommonPrefixes", [])]


def test_prefix_mount_sees_only_its_folder(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, mount_ssefs: MountFactory,
    s3: Any, key_bytes: bytes,
) -> None:
    s3.put_object(Bucket=bucket, Key="outside.txt", Body=b"no", **sse_params(key_bytes))
    s3.put_object(Bucket=bucket, Key="team/inside.txt", Body=b"yes", **sse_params(key_bytes))
    config = write_config(tmp_path, endpoint, bucket, key_file, s3_extra='prefix = "team"')
    mount = mount_ssefs(config)
    assert os.listdir(mount.mountpoint) == ["inside.txt"]
    (mount.mountpoint / "new.txt").write_bytes(b"new")
    eventually_on_server(s3, bucket, "team/new.txt", key_bytes, b"new")


def test_key_not_in_cmdline_logs_or_errors(
    config_file: Path, mount_ssefs: MountFactory, key_bytes: bytes, s3: Any, bucket: str
) -> None:
    mount = mount_ssefs(config_file, None, "--log-level", "debug")
    s3.put_object(Bucket=bucket, Key="foreign.txt", Body=b"x", **sse_params(secrets.token_bytes(32)))
    (mount.mountpoint / "f.txt").write_bytes(b"data")
    with pytest.raises(OSError):
        (mount.mountpoint / "foreign.txt").read_bytes()
    import base64

    encodings = [key_bytes, base64.b64encode(key_bytes), key_bytes.hex().encode()]
    cmdline = Path(f"/proc/{mount.process.pid}/cmdline").read_bytes()
    for encoding in encodings:
        assert encoding not in cmdline
    assert "DEBUG" in mount.log()  # debug logging really was on; the fixture checks the log for the key


def test_sigterm_unmounts_cleanly(config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str,
                                  key_bytes: bytes) -> None:
    mount = mount_ssefs(config_file)
    (mount.mountpoint / "before-stop.txt").write_bytes(b"kept")
    assert send_signal_and_wait(mount, signal.SIGTERM) == 0
    from .conftest import is_mounted

    assert not is_mounted(mount.mountpoint)
    eventually_on_server(s3, bucket, "before-stop.txt", key_bytes, b"kept")
    assert "received SIGTERM" in mount.log()


def test_refuses_wrong_key_unless_told(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, mount_ssefs: MountFactory,
    key_bytes: bytes,
) -> None:
    from .conftest import MountFailed, is_mounted, write_key_file

    s3.put_object(Bucket=bucket, Key="existing.txt", Body=b"x", **sse_params(key_bytes))
    wrong_key_file = write_key_file(tmp_path / "wrong.key", secrets.token_bytes(32))
    config = write_config(tmp_path, endpoint, bucket, wrong_key_file, name="wrong")
    with pytest.raises(MountFailed) as caught:
        mount_ssefs(config, tmp_path / "wrong-mnt")
    assert caught.value.code == 1
    assert "another SSE-C key" in caught.value.stderr and "existing.txt" in caught.value.stderr
    assert not is_mounted(tmp_path / "wrong-mnt")
    mount = mount_ssefs(config, tmp_path / "forced-mnt", "--skip-key-check")
    with pytest.raises(OSError) as read_error:
        (mount.mountpoint / "existing.txt").read_bytes()
    assert read_error.value.errno == errno.EACCES


@pytest.mark.parametrize(
    "case, expected",
    [
        ("http", "plain http"),
        ("group-readable-key", "readable or writable by group or others"),
        ("short-key", "neither 32 raw bytes"),
        ("missing-key", "does not exist"),
        ("missing-bucket", "does not exist"),
        ("unreachable", "cannot reach"),
        ("bad-toml", "not valid TOML"),
    ],
)
def test_bad_input_is_refused_with_one_clear_line(
    case: str, expected: str, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path
) -> None:
    from .conftest import is_mounted, ssefs_command, write_key_file

    kwargs: dict[str, Any] = {}
    key = key_file
    target_bucket = bucket
    if case == "http":
        kwargs["endpoint_url"] = endpoint.endpoint.replace("https://", "http://")
    elif case == "group-readable-key":
        key = write_key_file(tmp_path / "open.key", secrets.token_bytes(32), mode=0o640)
    elif case == "short-key":
        key = write_key_file(tmp_path / "short.key", secrets.token_bytes(31))
    elif case == "missing-key":
        key = tmp_path / "nope.key"
    elif case == "missing-bucket":
        target_bucket = "no-such-bucket-" + secrets.token_hex(4)
    elif case == "unreachable":
        kwargs["endpoint_url"] = "https://127.0.0.1:9"
    config = write_config(tmp_path, endpoint, target_bucket, key, **kwargs)
    if case == "bad-toml":
        config.write_text("[s3\nendpoint = ")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(ssefs_command("mount", str(config), str(mountpoint)), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ssefs: ")]
    assert len(error_lines) == 1, result.stderr
    assert expected in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not is_mounted(mountpoint)


def test_background_mount_and_umount(
    config_file: Path, tmp_path: Path, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    from .conftest import is_mounted, ssefs_command, unmount

    mountpoint = tmp_path / "bg"
    mountpoint.mkdir()
    log_file = tmp_path / "bg.log"
    try:
        result = subprocess.run(
            ssefs_command("mount", "--background", "--log-file", str(log_file), str(config_file), str(mountpoint)),
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        # Returned only once the mount is live.
        assert is_mounted(mountpoint)
        (mountpoint / "bg.txt").write_bytes(b"background")
        result = subprocess.run(ssefs_command("umount", str(mountpoint)), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mountpoint)
        eventually_on_server(s3, bucket, "bg.txt", key_bytes, b"background")
        assert "unmounted" in log_file.read_text()
    finally:
        unmount(mountpoint)

    # A background mount that cannot start says why and exits non-zero.
    bad_mountpoint = tmp_path / "does-not-exist"
    result = subprocess.run(
        ssefs_command("mount", "--background", "--log-file", str(log_file), str(config_file), str(bad_mountpoint)),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_restart_after_kill_9_clears_the_stale_mount(
    config_file: Path, mount_ssefs: MountFactory, tmp_path: Path
) -> None:
    from .conftest import is_mounted

    mountpoint = tmp_path / "crash-mnt"
    first = mount_ssefs(config_file, mountpoint)
    (mountpoint / "closed-before-crash.txt").write_bytes(b"survives")
    first.process.kill()
    first.process.wait(timeout=30)
    assert is_mounted(mountpoint)  # the kernel keeps the dead mount: ENOTCONN
    with pytest.raises(OSError) as caught:
        os.listdir(mountpoint)
    assert caught.value.errno == errno.ENOTCONN
    second = mount_ssefs(config_file, mountpoint)
    assert (second.mountpoint / "closed-before-crash.txt").read_bytes() == b"survives"
    assert "stale FUSE mount" in second.log()


def test_listed_names_can_be_looked_up(
    config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    import time

    s3.put_object(Bucket=bucket, Key="ok.txt", Body=b"x", **sse_params(key_bytes))
    s3.put_object(Bucket=bucket, Key="sub/inner.txt", Body=b"x", **sse_params(key_bytes))
    mount = mount_ssefs(config_file)
    names = os.listdir(mount.mountpoint)
    assert sorted(names) == ["ok.txt", "sub"]
    for name in names:
        os.stat(mount.mountpoint / name)
    # Directories have a real time, not 1970.
    assert abs(os.stat(mount.mountpoint / "sub").st_mtime - time.time()) < 3600


def test_missing_names_are_remembered_briefly(
    config_file: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes
) -> None:
    mount = mount_ssefs(config_file)
    mnt = mount.mountpoint
    assert not (mnt / "later.txt").exists()
    # Created elsewhere: visible once the negative entry expires (attr_timeout = 1 s here).
    s3.put_object(Bucket=bucket, Key="later.txt", Body=b"remote", **sse_params(key_bytes))
    time.sleep(1.5)
    assert (mnt / "later.txt").read_bytes() == b"remote"
    # Created through the mount right after a negative lookup: visible at once.
    assert not (mnt / "local.txt").exists()
    (mnt / "local.txt").write_bytes(b"local")
    assert (mnt / "local.txt").read_bytes() == b"local"
