"""End to end: real tools (git, sqlite3, dd, truncate, mv) and edge cases of names, odd keys and unlinked files.

Each test checks what the mount shows, what S3 holds (read back with the SSE-C
key through boto3), and, where the brief of the test says so, that the same
story is told by a fresh mount with an empty cache directory: the data and the
metadata really are in S3, not only in the first mount's cache.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, fsync_directory, keys, server_bytes, sse_params, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]
MiB = 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def run(*command: str, cwd: Path | None = None, input_text: str | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, input=input_text)
    assert result.returncode == 0, f"{command} failed ({result.returncode}): {result.stdout}\n{result.stderr}"
    return result.stdout




def file_keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    """Object keys that are files, not directory markers."""
    return {key for key in keys(s3, bucket, prefix) if not key.endswith("/")}






def errno_of(call: Callable[[], Any]) -> int:
    with pytest.raises(OSError) as caught:
        call()
    return int(caught.value.errno or 0)


def fresh_mount(mount_ssefs: MountFactory, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str,
                key_file: Path, name: str) -> Mount:
    """A new mount of the same bucket with its own, empty cache directory."""
    config = write_config(tmp_path, endpoint, bucket, key_file, name=name)
    assert not (tmp_path / f"{name}-cache").exists()
    return mount_ssefs(config, tmp_path / f"{name}-mnt")


# ---------------------------------------------------------------------- git


def git(*args: str, cwd: Path) -> str:
    return run("git", "-c", "user.name=Test Author", "-c", "user.email=author@example.com",
               "-c", "safe.directory=*", "-c", "init.defaultBranch=main", *args, cwd=cwd)


def test_git_init_commit_clone_fsck_and_after_remount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed and could not be (apt-get install -y git)")
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    repo = mount.mountpoint / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    files = {
        "README.md": b"# project\n\nwith a readme\n",
        "src/main.py": b"print('hello')\n" * 200,
        "data/blob.bin": secrets.token_bytes(200_000),
        "run.sh": b"#!/bin/sh\necho run\n",
    }
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    os.chmod(repo / "run.sh", 0o755)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "first commit through ssefs", cwd=repo)
    (repo / "README.md").write_bytes(files["README.md"] + b"second line\n")
    files["README.md"] += b"second line\n"
    git("commit", "-q", "-a", "-m", "second commit", cwd=repo)

    # A branch with a rename, merged back; then gc packs the loose objects (renames and unlinks in .git).
    git("checkout", "-q", "-b", "topic", cwd=repo)
    git("mv", "src/main.py", "src/app.py", cwd=repo)
    git("commit", "-q", "-m", "rename on a branch", cwd=repo)
    git("checkout", "-q", "main", cwd=repo)
    assert (repo / "src/main.py").read_bytes() == files["src/main.py"] and not (repo / "src/app.py").exists()
    git("merge", "-q", "--ff-only", "topic", cwd=repo)
    files["src/app.py"] = files.pop("src/main.py")
    assert (repo / "src/app.py").read_bytes() == files["src/app.py"] and not (repo / "src/main.py").exists()
    git("gc", "-q", "--prune=now", cwd=repo)
    assert list((repo / ".git/objects/pack").glob("*.pack"))

    log = git("log", "--format=%s", cwd=repo)
    assert log.splitlines() == ["rename on a branch", "second commit", "first commit through ssefs"]
    assert git("status", "--porcelain", cwd=repo) == ""
    git("fsck", "--full", "--strict", cwd=repo)
    assert "100755" in git("ls-files", "-s", "run.sh", cwd=repo)
    assert os.stat(repo / "run.sh").st_mode & 0o777 == 0o755

    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone))
    git("fsck", "--full", "--strict", cwd=clone)
    assert git("log", "--format=%s", cwd=clone).splitlines() == log.splitlines()
    for name, data in files.items():
        assert (clone / name).read_bytes() == data, name
    assert os.stat(clone / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(clone / "README.md").st_mode & 0o111 == 0

    # S3 holds the working tree (after unmount, everything written is uploaded).
    mount.stop()
    stored = file_keys(s3, bucket, "repo/")
    for name, data in files.items():
        assert server_bytes(s3, bucket, "repo/" + name, key_bytes) == data, name
    assert "repo/.git/HEAD" in stored and "repo/.git/index" in stored
    assert not any(key.endswith(".lock") for key in stored), sorted(stored)
    assert "repo/src/main.py" not in stored  # renamed away
    loose = [key for key in stored if re.fullmatch(r"repo/\.git/objects/[0-9a-f]{2}/[0-9a-f]{38}", key)]
    assert not loose, f"gc --prune=now deleted these loose objects, yet S3 still has them: {loose}"
    head = s3.head_object(Bucket=bucket, Key="repo/run.sh", **sse_params(key_bytes))
    assert int(head["Metadata"]["mode"]) & 0o777 == 0o755

    again = fresh_mount(mount_ssefs, tmp_path, endpoint, bucket, key_file, "again").mountpoint / "repo"
    assert git("status", "--porcelain", cwd=again) == ""
    git("fsck", "--full", "--strict", cwd=again)
    assert git("log", "--format=%s", cwd=again).splitlines() == log.splitlines()
    assert os.stat(again / "run.sh").st_mode & 0o777 == 0o755
    assert subprocess.run([str(again / "run.sh")], capture_output=True, timeout=60).stdout == b"run\n"
    # A clone from the remounted repository is complete too.
    second_clone = tmp_path / "clone2"
    run("git", "clone", "-q", str(again), str(second_clone))
    git("fsck", "--full", cwd=second_clone)
    assert (second_clone / "data/blob.bin").read_bytes() == files["data/blob.bin"]


# ---------------------------------------------------------------------- sqlite


def check_database(path: Path, rows: int) -> None:
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("SELECT count(*), sum(id) FROM items").fetchone() == (rows, rows * (rows + 1) // 2)
        assert connection.execute("SELECT payload FROM items WHERE id = 4321").fetchone() == (f"row-{4321:06d}-" * 8,)
    finally:
        connection.close()


def test_sqlite_transactions_integrity_and_after_remount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    database = mount.mountpoint / "db" / "items.sqlite"
    database.parent.mkdir()
    transactions, per_transaction = 5, 1000
    rows = transactions * per_transaction
    script = ["CREATE TABLE items (id INTEGER PRIMARY KEY, payload TEXT NOT NULL);",
              "CREATE INDEX items_payload ON items (payload);"]
    for transaction in range(transactions):
        script.append("BEGIN;")
        for row in range(transaction * per_transaction + 1, (transaction + 1) * per_transaction + 1):
            script.append(f"INSERT INTO items VALUES ({row}, '{f'row-{row:06d}-' * 8}');")
        script.append("COMMIT;")
    use_cli = shutil.which("sqlite3") is not None
    if use_cli:
        run("sqlite3", str(database), input_text="\n".join(script))
        assert run("sqlite3", str(database), "PRAGMA integrity_check;").strip() == "ok"
        assert run("sqlite3", str(database), "SELECT count(*) FROM items;").strip() == str(rows)
    else:
        connection = sqlite3.connect(database, isolation_level=None)
        connection.executescript("\n".join(script))
        connection.close()
    check_database(database, rows)
    # An update and a delete in one more transaction, through Python's sqlite3 this time.
    connection = sqlite3.connect(database)
    with connection:
        connection.execute("UPDATE items SET payload = 'changed' WHERE id = 1")
        connection.execute("DELETE FROM items WHERE id = ?", (rows,))
    connection.close()
    # Write-ahead-log mode: a -wal file and a shared-memory -shm file (mmap'ed) next to the database.
    wal = sqlite3.connect(mount.mountpoint / "db" / "wal.sqlite")
    assert wal.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    wal.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, line TEXT)")
    for transaction in range(3):
        with wal:
            wal.executemany("INSERT INTO log (line) VALUES (?)", [(f"{transaction}-{i}",) for i in range(500)])
    assert wal.execute("SELECT count(*) FROM log").fetchone() == (1500,)
    assert wal.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    wal.close()  # the last connection checkpoints and removes -wal and -shm
    mount.stop()
    assert file_keys(s3, bucket) == {"db/items.sqlite", "db/wal.sqlite"}  # no journal, WAL or shm left behind
    local_copy = tmp_path / "from-s3.sqlite"
    local_copy.write_bytes(server_bytes(s3, bucket, "db/items.sqlite", key_bytes))
    connection = sqlite3.connect(local_copy)
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert connection.execute("SELECT count(*) FROM items").fetchone() == (rows - 1,)
    connection.close()

    again = fresh_mount(mount_ssefs, tmp_path, endpoint, bucket, key_file, "again").mountpoint / "db" / "items.sqlite"
    connection = sqlite3.connect(again)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("SELECT count(*) FROM items").fetchone() == (rows - 1,)
        assert connection.execute("SELECT payload FROM items WHERE id = 1").fetchone() == ("changed",)
        with connection:
            connection.execute("INSERT INTO items VALUES (?, ?)", (rows, "back"))
        assert connection.execute("SELECT count(*) FROM items").fetchone() == (rows,)
    finally:
        connection.close()
    if use_cli:
        assert run("sqlite3", str(again), "PRAGMA integrity_check;").strip() == "ok"
    wal = sqlite3.connect(again.parent / "wal.sqlite")
    try:
        assert wal.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert wal.execute("SELECT count(*), max(id) FROM log").fetchone() == (1500, 1500)
    finally:
        wal.close()


# ---------------------------------------------------------------------- dd


def test_dd_notrunc_into_the_middle_of_an_uploaded_file(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    model = bytearray(secrets.token_bytes(5 * MiB))
    s3.put_object(Bucket=bucket, Key="big.bin", Body=bytes(model), **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    target = mount.mountpoint / "big.bin"

    # Three 4 KiB blocks across the first 1 MiB cache block boundary, fsync'd by dd itself.
    patch = secrets.token_bytes(3 * 4096)
    (tmp_path / "patch").write_bytes(patch)
    run("dd", f"if={tmp_path / 'patch'}", f"of={target}", "bs=4096", "seek=255", "conv=notrunc,fsync",
        "status=none")
    model[255 * 4096:258 * 4096] = patch
    assert os.stat(target).st_size == 5 * MiB
    assert target.read_bytes() == model
    assert server_bytes(s3, bucket, "big.bin", key_bytes) == model  # fsync returned: it is in S3

    # An unaligned patch deep in the file, without fsync: in S3 after unmount.
    small = secrets.token_bytes(1000)
    (tmp_path / "small").write_bytes(small)
    offset = 3 * MiB + 12345
    run("dd", f"if={tmp_path / 'small'}", f"of={target}", "bs=1000", f"seek={offset}", "oflag=seek_bytes",
        "conv=notrunc", "status=none")
    model[offset:offset + len(small)] = small
    assert os.stat(target).st_size == 5 * MiB
    with open(target, "rb") as reader:
        reader.seek(offset - 10)
        assert reader.read(1020) == model[offset - 10:offset + 1010]
    assert target.read_bytes() == model
    mount.stop()
    assert server_bytes(s3, bucket, "big.bin", key_bytes) == model
    assert s3.head_object(Bucket=bucket, Key="big.bin", **sse_params(key_bytes))["ContentLength"] == 5 * MiB

    again = fresh_mount(mount_ssefs, tmp_path, endpoint, bucket, key_file, "again").mountpoint
    assert os.stat(again / "big.bin").st_size == 5 * MiB
    assert (again / "big.bin").read_bytes() == model


# ---------------------------------------------------------------------- truncate


def test_truncate_grow_and_shrink_uploaded_and_unuploaded_files(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    original = secrets.token_bytes(3 * MiB + 17)
    s3.put_object(Bucket=bucket, Key="uploaded.bin", Body=original, **sse_params(key_bytes))
    # Write-back delay of 10 minutes: files written through the mount stay in the cache until unmount.
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600"))
    mnt = mount.mountpoint

    uploaded = mnt / "uploaded.bin"
    run("truncate", "-s", str(5 * MiB + 5), str(uploaded))
    expected = original + bytes(5 * MiB + 5 - len(original))
    assert os.stat(uploaded).st_size == len(expected)
    assert uploaded.read_bytes() == expected
    run("truncate", "-s", str(MiB + 3), str(uploaded))
    expected = original[:MiB + 3]
    assert os.stat(uploaded).st_size == MiB + 3
    assert uploaded.read_bytes() == expected
    # Growing again shows zeros, not the bytes that were cut off (they are still in S3's old copy).
    run("truncate", "-s", str(2 * MiB), str(uploaded))
    expected = original[:MiB + 3] + bytes(MiB - 3)
    assert uploaded.read_bytes() == expected

    local = mnt / "local.bin"
    local_data = secrets.token_bytes(2 * MiB + 100)
    local.write_bytes(local_data)
    run("truncate", "-s", str(4 * MiB), str(local))
    assert local.read_bytes() == local_data + bytes(4 * MiB - len(local_data))
    run("truncate", "-s", "1000", str(local))
    run("truncate", "-s", "3000", str(local))
    local_expected = local_data[:1000] + bytes(2000)
    assert local.read_bytes() == local_expected
    assert os.stat(local).st_size == 3000
    # Nothing of the local file is in S3 yet, and the uploaded one still has its old content there.
    assert "local.bin" not in keys(s3, bucket)
    # A truncate of a closed file is scheduled like a close, so with a 600 s delay S3 still has the original.
    assert server_bytes(s3, bucket, "uploaded.bin", key_bytes) == original

    mount.stop()
    assert server_bytes(s3, bucket, "uploaded.bin", key_bytes) == expected
    assert server_bytes(s3, bucket, "local.bin", key_bytes) == local_expected
    again_mount = fresh_mount(mount_ssefs, tmp_path, endpoint, bucket, key_file, "again")
    again = again_mount.mountpoint
    assert os.stat(again / "uploaded.bin").st_size == len(expected)
    assert (again / "uploaded.bin").read_bytes() == expected
    assert (again / "local.bin").read_bytes() == local_expected
    # Truncating to 0 and growing through a fresh mount, then reading S3 after unmount.
    os.truncate(again / "local.bin", 0)
    os.truncate(again / "local.bin", 10)
    assert (again / "local.bin").read_bytes() == bytes(10)
    assert again_mount.stop() == 0
    assert server_bytes(s3, bucket, "local.bin", key_bytes) == bytes(10)
    assert server_bytes(s3, bucket, "uploaded.bin", key_bytes) == expected


# ---------------------------------------------------------------------- names and errno values


def fallocate(path: Path, length: int) -> int:
    """fallocate(2) itself (no glibc emulation); returns 0 or the errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, 0, 0, length) != 0:
            return ctypes.get_errno()
        return 0
    finally:
        os.close(fd)


def test_names_errno_values_fallocate_and_statvfs(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    mnt = mount.mountpoint
    directory = "dir with spaces ünïcødé"
    names = {
        "ünïcødé 文件 with spaces.txt": b"unicode",
        "  leading and trailing  ": b"spaces",
        "emoji \U0001f600.txt": b"emoji",
        "é" * 127 + "x": b"255 bytes of name",  # 2 * 127 + 1 = 255 bytes
        "n" * 255: b"255 ascii",
    }
    (mnt / directory).mkdir()
    for name, data in names.items():
        assert len(name.encode()) <= 255
        (mnt / directory / name).write_bytes(data)
    assert sorted(os.listdir(mnt / directory)) == sorted(names)
    listed = run("ls", "-1", "--quoting-style=literal", str(mnt / directory)).splitlines()
    assert sorted(listed) == sorted(names)
    for name, data in names.items():
        with open(mnt / directory / name, "rb") as reader:
            assert reader.read() == data
    directory_256 = "d" * 256
    assert errno_of(lambda: open(mnt / directory / ("é" * 128), "wb")) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.mkdir(mnt / directory_256)) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.stat(mnt / ("n" * 256))) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.rename(mnt / directory / ("n" * 255), mnt / ("m" * 256))) == errno.ENAMETOOLONG
    mkdir_255 = mnt / ("D" * 255)
    mkdir_255.mkdir()
    assert mkdir_255.is_dir()
    # S3 keys are at most 1024 bytes: a path whose key would be longer is refused, shorter ones work.
    deep = mnt.joinpath(*["p" * 200] * 4)  # a key prefix of 804 bytes
    deep.mkdir(parents=True)
    deep_key = "/".join(["p" * 200] * 4) + "/" + "f" * 219
    (mnt / deep_key).write_bytes(b"deep")
    assert errno_of(lambda: open(deep / ("f" * 250), "wb")) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.mkdir(deep / ("g" * 250))) == errno.ENAMETOOLONG

    # Errno values of the common mistakes.
    plain = mnt / directory / "ünïcødé 文件 with spaces.txt"
    assert errno_of(lambda: os.open(plain, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)) == errno.EEXIST
    assert errno_of(lambda: os.open(mnt / directory / "missing", os.O_RDONLY)) == errno.ENOENT
    assert errno_of(lambda: os.open(mnt / "missing-dir" / "x", os.O_CREAT | os.O_WRONLY, 0o644)) == errno.ENOENT
    assert errno_of(lambda: os.rmdir(mnt / directory)) == errno.ENOTEMPTY
    assert errno_of(lambda: os.unlink(mnt / directory)) == errno.EISDIR
    assert errno_of(lambda: os.rmdir(plain)) == errno.ENOTDIR
    assert errno_of(lambda: os.listdir(plain)) == errno.ENOTDIR
    assert errno_of(lambda: os.open(plain / "below", os.O_CREAT | os.O_WRONLY, 0o644)) == errno.ENOTDIR
    assert errno_of(lambda: os.mkdir(mnt / directory)) == errno.EEXIST
    assert errno_of(lambda: open(mnt / directory, "wb")) == errno.EISDIR
    assert plain.read_bytes() == b"unicode"  # the failed O_EXCL did not truncate it

    # fallocate(2) is not implemented by ssefs: the kernel answers EOPNOTSUPP.
    target = mnt / "allocated.bin"
    target.write_bytes(b"abc")
    assert fallocate(target, 8192) == errno.EOPNOTSUPP
    assert os.stat(target).st_size == 3
    result = subprocess.run(["fallocate", "-l", "8192", str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not supported" in result.stderr.lower(), result
    # posix_fallocate: glibc emulates it by writing, so it works and the file grows with zeros.
    fd = os.open(target, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 8192)
    finally:
        os.close(fd)
    assert os.stat(target).st_size == 8192
    assert target.read_bytes() == b"abc" + bytes(8189)

    info = os.statvfs(mnt)
    assert info.f_namemax == 255
    assert info.f_bsize > 0 and info.f_frsize > 0
    assert info.f_blocks * info.f_frsize >= 1 << 40  # at least 1 TiB: S3 has no capacity to report
    assert 0 < info.f_bavail <= info.f_blocks and 0 < info.f_bfree <= info.f_blocks
    assert info.f_files > 0 and info.f_ffree > 0
    assert shutil.disk_usage(mnt).free > 1 << 40

    # S3 keys are the UTF-8 paths, and a fresh mount shows the same names and bytes.
    mount.stop()
    stored = file_keys(s3, bucket)
    for name, data in names.items():
        assert f"{directory}/{name}" in stored
        assert server_bytes(s3, bucket, f"{directory}/{name}", key_bytes) == data
    again = fresh_mount(mount_ssefs, tmp_path, endpoint, bucket, key_file, "again").mountpoint
    assert sorted(os.listdir(again / directory)) == sorted(names)
    for name, data in names.items():
        assert (again / directory / name).read_bytes() == data
    assert (again / ("D" * 255)).is_dir()
    assert (again / deep_key).read_bytes() == b"deep"
    assert server_bytes(s3, bucket, deep_key, key_bytes) == b"deep"
    assert (again / "allocated.bin").read_bytes() == b"abc" + bytes(8189)


# ---------------------------------------------------------------------- odd keys written by other tools


def walk_consistently(root: Path) -> dict[str, bytes | int | None]:
    """Every listed name can be stat'ed; files read to bytes or an errno; directories recurse (None)."""
    seen: dict[str, bytes | int | None] = {}
    pending = [root]
    while pending:
        directory = pending.pop()
        for name in os.listdir(directory):
            path = directory / name
            relative = str(path.relative_to(root))
            info = os.lstat(path)  # a listed name must never fail a lookup
            if stat.S_ISDIR(info.st_mode):
                seen[relative] = None
                pending.append(path)
                continue
            try:
                with open(path, "rb") as reader:
                    content = reader.read()
            except OSError as error:
                seen[relative] = error.errno
                continue
            seen[relative] = content
            assert info.st_size == len(content), relative
    return seen


def test_odd_keys_written_by_other_tools(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    sse = sse_params(key_bytes)
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    mnt = mount.mountpoint
    long_key = "long/" + "/".join(["s" * 203] * 5)  # 1024 bytes, S3's limit; every segment a legal name
    assert len(long_key.encode()) == 1024
    written = {
        "good.txt": b"good",
        "a//b": b"double slash",
        "withdata/": b"x",
        "both": b"file named like a directory",
        "both/child": b"child",
        "dots/../escaped": b"dot dot",
        "dots/./here": b"dot",
        "dots/fine": b"fine",
        " leading space": b"leading",
        "trailing/ ": b"a name that is one space",
        "hidden/.dotfile": b"dotfile",
        long_key: b"long key",
    }
    refused = {}
    for key, data in written.items():
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=data, **sse)
        except botocore.exceptions.ClientError as error:
            refused[key] = error.response["Error"]["Code"]
    # SeaweedFS refuses keys with "." or ".." segments and stores "a//b" as "a/b".
    print("refused by the server:", refused)
    s3.put_object(Bucket=bucket, Key="plain.bin", Body=b"not encrypted")
    s3.put_object(Bucket=bucket, Key="foreign.bin", Body=b"other key", **sse_params(secrets.token_bytes(32)))
    stored = keys(s3, bucket)
    print("keys as the server lists them:", sorted(key[:40] for key in stored))

    seen = walk_consistently(mnt)
    print("the mount shows:", {name[:40]: value for name, value in seen.items()})
    assert seen["good.txt"] == b"good"
    assert seen["both"] is None and seen["both/child"] == b"child"  # an object and a prefix: shown as the directory
    assert errno_of(lambda: open(mnt / "both", "wb")) == errno.EISDIR
    assert seen["withdata"] is None  # a key ending in "/" is a directory, whatever its body
    assert os.listdir(mnt / "withdata") == []
    assert seen["dots/fine"] == b"fine"
    assert seen[" leading space"] == b"leading"
    assert seen["trailing/ "] == b"a name that is one space"
    assert seen["hidden/.dotfile"] == b"dotfile"
    assert seen[long_key] == b"long key"
    if "a//b" not in refused:
        # However the server stored it: as "a/b" (SeaweedFS), or as "a//b" with an empty segment the mount hides.
        assert seen.get("a/b", b"double slash") == b"double slash"
        assert ("a/b" in stored) == ("a/b" in seen)
    # Keys with "." and ".." segments, if a server took them, must not show up as escaping names.
    assert not any(part in (".", "..") for name in seen for part in name.split("/"))
    assert seen["plain.bin"] == errno.EIO  # stored without SSE-C
    assert seen["foreign.bin"] == errno.EACCES  # stored under another SSE-C key
    assert os.stat(mnt / "foreign.bin").st_size == len(b"other key")

    # The daemon still serves: the readable files still read, new files can be written.
    assert mount.process.poll() is None
    assert (mnt / "good.txt").read_bytes() == b"good"
    assert (mnt / "both" / "child").read_bytes() == b"child"
    (mnt / "new.txt").write_bytes(b"still writable")
    assert (mnt / "new.txt").read_bytes() == b"still writable"
    log = mount.log()
    failures = [line for line in log.splitlines() if "foreign.bin" in line or "plain.bin" in line]
    print("daemon log:", *failures, sep="\n")
    assert any("foreign.bin" in line for line in failures), log
    assert any("plain.bin" in line for line in failures), log
    assert mount.stop() == 0
    assert "both" in keys(s3, bucket)  # the hidden file was left alone


# ---------------------------------------------------------------------- open, unlinked files


def open_then_unlink(mnt: Path, s3: Any, bucket: str, key_bytes: bytes, uploaded: bool, model: bytes) -> int:
    """A file (in S3 already, or only in the cache), opened read-write, first bytes read, then unlinked."""
    path = mnt / "victim.bin"
    if uploaded:
        s3.put_object(Bucket=bucket, Key="victim.bin", Body=model, **sse_params(key_bytes))
    else:
        path.write_bytes(model)
    fd = os.open(path, os.O_RDWR)
    assert os.pread(fd, 100, 0) == model[:100]
    os.unlink(path)
    assert "victim.bin" not in os.listdir(mnt)
    assert not path.exists()
    fsync_directory(mnt)
    assert "victim.bin" not in keys(s3, bucket)
    return fd


def assert_victim_gone_for_good(mount: Mount, s3: Any, bucket: str) -> None:
    time.sleep(3)  # past the write-back delay (1 s here)
    assert "victim.bin" not in os.listdir(mount.mountpoint)
    assert file_keys(s3, bucket) == {"keep.txt"}, "the unlinked file came back in S3"
    assert (mount.mountpoint / "keep.txt").read_bytes() == b"keep"
    assert mount.stop() == 0
    assert file_keys(s3, bucket) == {"keep.txt"}, "the unlinked file came back in S3 at unmount"


UPLOADED_OR_NOT = pytest.mark.parametrize("uploaded", [True, False], ids=["uploaded", "only-in-cache"])


@UPLOADED_OR_NOT
def test_unlinked_open_file_is_gone_for_good_after_close(
    uploaded: bool, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any,
    tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 1"))
    (mount.mountpoint / "keep.txt").write_bytes(b"keep")
    fd = open_then_unlink(mount.mountpoint, s3, bucket, key_bytes, uploaded, secrets.token_bytes(3 * MiB + 333))
    os.close(fd)
    assert_victim_gone_for_good(mount, s3, bucket)
    again = fresh_mount(mount_ssefs, tmp_path, endpoint, bucket, key_file, "again").mountpoint
    assert os.listdir(again) == ["keep.txt"]


@UPLOADED_OR_NOT
def test_unlinked_open_file_reads_and_writes_until_close(
    uploaded: bool, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any,
    tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 1"))
    (mount.mountpoint / "keep.txt").write_bytes(b"keep")
    model = bytearray(secrets.token_bytes(3 * MiB + 333))
    fd = open_then_unlink(mount.mountpoint, s3, bucket, key_bytes, uploaded, bytes(model))
    try:
        # Reads anywhere, including blocks never read before the unlink.
        assert os.pread(fd, 1000, 2 * MiB + 5) == model[2 * MiB + 5:2 * MiB + 1005]
        assert os.pread(fd, 100, 0) == model[:100]
        # Writes across a block boundary and at the end, read back through the same descriptor.
        patch = secrets.token_bytes(5000)
        assert os.pwrite(fd, patch, MiB - 10) == len(patch)
        model[MiB - 10:MiB - 10 + len(patch)] = patch
        assert os.pread(fd, 5000, MiB - 10) == patch
        assert os.pwrite(fd, b"appended", len(model)) == 8
        model += b"appended"
        assert os.fstat(fd).st_size == len(model)
        assert os.lseek(fd, 0, os.SEEK_END) == len(model)
        os.lseek(fd, 0, os.SEEK_SET)
        content = b""
        while chunk := os.read(fd, MiB):
            content += chunk
        assert content == model
        os.fsync(fd)  # must not bring the name back
        assert "victim.bin" not in keys(s3, bucket)
    finally:
        os.close(fd)
    assert_victim_gone_for_good(mount, s3, bucket)


@UPLOADED_OR_NOT
def test_ftruncate_of_unlinked_open_file_does_not_bring_it_back(
    uploaded: bool, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any,
    tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 1"))
    (mount.mountpoint / "keep.txt").write_bytes(b"keep")
    fd = open_then_unlink(mount.mountpoint, s3, bucket, key_bytes, uploaded, secrets.token_bytes(3000))
    try:
        os.ftruncate(fd, 100)
    finally:
        os.close(fd)
    time.sleep(3)
    if "victim.bin" in keys(s3, bucket):
        content = server_bytes(s3, bucket, "victim.bin", key_bytes)
        raise AssertionError(f"the unlinked file came back in S3 after close: {len(content)} bytes {content[:16]!r}")
    assert_victim_gone_for_good(mount, s3, bucket)


# ---------------------------------------------------------------------- mv


def test_mv_between_directories_and_over_an_existing_file(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    sse = sse_params(key_bytes)
    moved = secrets.token_bytes(2 * MiB + 7)
    s3.put_object(Bucket=bucket, Key="src/moved.bin", Body=moved, **sse)
    s3.put_object(Bucket=bucket, Key="dst/existing.bin", Body=b"to be replaced", **sse)
    s3.put_object(Bucket=bucket, Key="src/other.txt", Body=b"stays", **sse)
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600"))
    mnt = mount.mountpoint
    (mnt / "elsewhere").mkdir()

    run("mv", str(mnt / "src/moved.bin"), str(mnt / "elsewhere/moved.bin"))
    assert (mnt / "elsewhere/moved.bin").read_bytes() == moved
    assert os.listdir(mnt / "src") == ["other.txt"]
    fsync_directory(mnt / "src")
    assert file_keys(s3, bucket) == {"src/other.txt", "dst/existing.bin", "elsewhere/moved.bin"}
    assert server_bytes(s3, bucket, "elsewhere/moved.bin", key_bytes) == moved

    run("mv", "-f", str(mnt / "elsewhere/moved.bin"), str(mnt / "dst/existing.bin"))
    assert (mnt / "dst/existing.bin").read_bytes() == moved
    assert os.listdir(mnt / "dst") == ["existing.bin"]
    assert os.listdir(mnt / "elsewhere") == []
    fsync_directory(mnt / "elsewhere")
    assert file_keys(s3, bucket) == {"src/other.txt", "dst/existing.bin"}
    assert server_bytes(s3, bucket, "dst/existing.bin", key_bytes) == moved

    # A file written through the mount and not uploaded yet (600 s delay), moved over another one.
    fresh_data = secrets.token_bytes(300_000)
    (mnt / "elsewhere/draft.bin").write_bytes(fresh_data)
    assert "elsewhere/draft.bin" not in keys(s3, bucket)
    run("mv", str(mnt / "elsewhere/draft.bin"), str(mnt / "src/other.txt"))
    assert (mnt / "src/other.txt").read_bytes() == fresh_data
    assert not (mnt / "elsewhere/draft.bin").exists()
    assert file_keys(s3, bucket) == {"src/other.txt", "dst/existing.bin"}
    assert server_bytes(s3, bucket, "src/other.txt", key_bytes) == fresh_data

    mount.stop()
    assert file_keys(s3, bucket) == {"src/other.txt", "dst/existing.bin"}
    again = fresh_mount(mount_ssefs, tmp_path, endpoint, bucket, key_file, "again").mountpoint
    assert (again / "dst/existing.bin").read_bytes() == moved
    assert (again / "src/other.txt").read_bytes() == fresh_data
    assert os.listdir(again / "elsewhere") == []
