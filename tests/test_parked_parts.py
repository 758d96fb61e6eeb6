"""Files written larger than the cache (parked parts, cache.py and streaming.py), end to end: real FUSE
mount, real SeaweedFS, a 64 MiB cache and files several times its size."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ssefs.metadata import FileAttributes, attributes_tag
from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, server_bytes, sse_params, write_config, write_key_file
from .proxy import TcpProxy
from .test_rotation import refused_with_key, with_key_lines
from .test_stream_upload import fsync_path, pattern, status_of, tag_of, uploads_in_progress, wait_for

MountFactory = Callable[..., Mount]
MiB = 1024 * 1024
CACHE = 64 * MiB


@pytest.fixture
def small_cache_config(tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path) -> Path:
    # 5 MiB parts (S3's minimum), the smallest cache ssefs allows, and no upload by the write-back delay.
    return write_config(tmp_path, endpoint, bucket, key_file,
                        s3_extra='part_size = "5MiB"\nmultipart_threshold = "5MiB"',
                        cache_extra='max_size = "64MiB"\nwriteback_delay = 600')


def stored_block_bytes(cache_dir: Path) -> int:
    total = 0
    for directory, _subdirectories, files in os.walk(cache_dir / "blocks"):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass  # removed while we walked
    return total


@contextmanager
def largest_cache_seen(cache_dir: Path) -> Iterator[list[int]]:
    """Sample the bytes of block files in the cache every 20 ms; yields a list holding the largest seen."""
    largest = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            largest[0] = max(largest[0], stored_block_bytes(cache_dir))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield largest
    finally:
        stop.set()
        sampler.join()


def parked_bytes(mount: Mount) -> int:
    return int(status_of(mount.mountpoint).get("streams_parked_bytes", 0))


def write_until_parked(mount: Mount, path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and close it once some of its parts are parked."""
    with open(path, "wb") as writer:
        writer.write(data)
        writer.flush()
        wait_for(lambda: parked_bytes(mount) > 0, "parts parked")


def test_a_file_four_times_the_cache_streams_through_it_in_one_upload(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    data = pattern(4 * CACHE, seed=3)
    with largest_cache_seen(small_cache_config.parent / "mount-cache") as largest:
        with open(mount.mountpoint / "huge.bin", "wb") as writer:
            for offset in range(0, len(data), MiB):
                writer.write(data[offset:offset + MiB])
            writer.flush()
            os.fsync(writer.fileno())
    assert server_bytes(s3, bucket, "huge.bin", key_bytes) == data
    assert uploads_in_progress(s3, bucket, "huge.bin") == []
    status = status_of(mount.mountpoint)
    # Sent once, part by part as written: never completed early and uploaded again, never abandoned.
    assert (status["uploaded_files"], status["streams_started"], status["streams_abandoned"]) == (1, 1, 0)
    assert status["streams_parked_bytes"] >= 2 * CACHE
    # The cache's bound held (a few blocks in flight may pass it; ``cache.py``).
    assert 0 < largest[0] <= CACHE + 4 * MiB
    assert (mount.mountpoint / "huge.bin").read_bytes() == data


def test_reading_back_a_parked_range_finishes_the_upload_first(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    data = pattern(2 * CACHE, seed=5)
    more = pattern(16 * MiB, seed=9)
    with open(mount.mountpoint / "reread.bin", "w+b", buffering=0) as file:
        file.write(data)
        wait_for(lambda: parked_bytes(mount) > 0, "parts parked")
        # Those bytes are only in the unfinished upload: the read completes it, then reads the object.
        assert os.pread(file.fileno(), MiB, 3 * MiB) == data[3 * MiB:4 * MiB]
        assert uploads_in_progress(s3, bucket, "reread.bin") == []
        assert server_bytes(s3, bucket, "reread.bin", key_bytes) == data
        file.seek(len(data))
        file.write(more)  # the writer goes on, on top of the uploaded object
    fsync_path(mount.mountpoint / "reread.bin")
    assert server_bytes(s3, bucket, "reread.bin", key_bytes) == data + more
    assert uploads_in_progress(s3, bucket, "reread.bin") == []


@pytest.mark.parametrize("change", ["write", "truncate"])
def test_a_change_behind_parked_parts_finishes_the_upload_then_lands(
    change: str, small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    model = bytearray(pattern(2 * CACHE, seed=7))
    with open(mount.mountpoint / "changed.bin", "w+b", buffering=0) as file:
        file.write(model)
        wait_for(lambda: parked_bytes(mount) > 0, "parts parked")
        if change == "write":
            os.pwrite(file.fileno(), b"\xee" * 1000, 2 * MiB + 17)
            model[2 * MiB + 17:2 * MiB + 1017] = b"\xee" * 1000
        else:
            os.ftruncate(file.fileno(), 3 * MiB + 5)
            del model[3 * MiB + 5:]
    fsync_path(mount.mountpoint / "changed.bin")
    assert server_bytes(s3, bucket, "changed.bin", key_bytes) == bytes(model)
    assert (mount.mountpoint / "changed.bin").read_bytes() == bytes(model)
    assert uploads_in_progress(s3, bucket, "changed.bin") == []


def test_killed_with_parts_parked_the_next_start_resumes_the_upload(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    data = pattern(2 * CACHE, seed=11)
    write_until_parked(mount, mount.mountpoint / "resumed.bin", data)
    # Closed (durable in the cache and in the parts), not uploaded: the write-back delay is 600 s.
    [upload] = uploads_in_progress(s3, bucket, "resumed.bin")
    mount.kill(unmount=True)
    again = mount_ssefs(small_cache_config, mount.mountpoint)
    # The restart finishes that same upload (its first bytes exist nowhere else) rather than aborting it.
    fsync_path(again.mountpoint / "resumed.bin")
    assert server_bytes(s3, bucket, "resumed.bin", key_bytes) == data
    assert uploads_in_progress(s3, bucket, "resumed.bin") == []
    assert "resuming the upload of 'resumed.bin'" in again.log()
    assert upload["UploadId"] not in again.log()  # never named as aborted (nor anywhere else)
    assert (again.mountpoint / "resumed.bin").read_bytes() == data


def test_killed_with_parts_parked_then_the_key_rotated_the_upload_resumes_under_its_own_key(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_file: Path, key_bytes: bytes,
) -> None:
    """S3 wants every part of a multipart upload under the key it was created with: after a rotation
    (the key that created it now in ``previous_keys``), the resumed upload sends its last parts under
    that key, not the new one, so the object is whole under one key; the next write moves it to the new key."""
    mount = mount_ssefs(small_cache_config)
    data = pattern(2 * CACHE, seed=47)
    write_until_parked(mount, mount.mountpoint / "rotated.bin", data)
    mount.kill(unmount=True)
    new_key = secrets.token_bytes(32)
    new_file = write_key_file(small_cache_config.parent / "new.key", new_key)
    settings = small_cache_config.read_text()
    small_cache_config.write_text(settings.replace(f'file = "{key_file}"', f'file = "{new_file}"'))
    with_key_lines(small_cache_config, f'previous_keys = [{{ file = "{key_file}" }}]')
    again = mount_ssefs(small_cache_config, mount.mountpoint)
    again.secrets_to_hide += [key_bytes, new_key]
    fsync_path(again.mountpoint / "rotated.bin")
    assert uploads_in_progress(s3, bucket, "rotated.bin") == []
    assert server_bytes(s3, bucket, "rotated.bin", key_bytes) == data
    assert (again.mountpoint / "rotated.bin").read_bytes() == data
    with open(again.mountpoint / "rotated.bin", "ab") as appended:
        appended.write(b"tail")
        appended.flush()
        os.fsync(appended.fileno())
    assert server_bytes(s3, bucket, "rotated.bin", new_key) == data + b"tail"
    assert refused_with_key(s3, bucket, "rotated.bin", key_bytes)


def test_renamed_while_open_with_parts_parked_the_writer_goes_on_under_the_new_name(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    data = pattern(2 * CACHE, seed=13)
    more = pattern(8 * MiB, seed=17)
    with open(mount.mountpoint / "before.bin", "wb") as writer:
        writer.write(data)
        writer.flush()
        wait_for(lambda: parked_bytes(mount) > 0, "parts parked")
        os.rename(mount.mountpoint / "before.bin", mount.mountpoint / "after.bin")
        writer.write(more)
    fsync_path(mount.mountpoint / "after.bin")
    assert server_bytes(s3, bucket, "after.bin", key_bytes) == data + more
    assert not (mount.mountpoint / "before.bin").exists()
    assert (mount.mountpoint / "after.bin").read_bytes() == data + more
    assert uploads_in_progress(s3, bucket, "before.bin") == uploads_in_progress(s3, bucket, "after.bin") == []


def test_a_directory_renamed_with_a_file_whose_parts_are_parked(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    (mount.mountpoint / "old").mkdir()
    data = pattern(2 * CACHE, seed=19)
    write_until_parked(mount, mount.mountpoint / "old" / "big.bin", data)
    os.rename(mount.mountpoint / "old", mount.mountpoint / "new")
    fsync_path(mount.mountpoint / "new" / "big.bin")
    assert server_bytes(s3, bucket, "new/big.bin", key_bytes) == data
    assert (mount.mountpoint / "new" / "big.bin").read_bytes() == data
    assert not (mount.mountpoint / "old").exists()
    assert uploads_in_progress(s3, bucket, "old/big.bin") == uploads_in_progress(s3, bucket, "new/big.bin") == []


def test_extended_attributes_set_on_a_file_whose_parts_are_parked(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    path = mount.mountpoint / "tagged.bin"
    data = pattern(2 * CACHE, seed=23)
    write_until_parked(mount, path, data)
    # Fixed in the upload's metadata when it was created: the upload completes first, then they are set.
    os.setxattr(path, "user.origin", b"backup-host")
    fsync_path(path)
    assert server_bytes(s3, bucket, "tagged.bin", key_bytes) == data
    assert os.getxattr(path, "user.origin") == b"backup-host"
    assert uploads_in_progress(s3, bucket, "tagged.bin") == []


def test_an_open_file_larger_than_the_cache_cannot_be_deleted_until_closed(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    """Deleting an open file makes all of it local first (its handles keep working after the object is
    gone): one larger than the cache gets EBUSY at once, where it used to wait for room forever."""
    mount = mount_ssefs(small_cache_config)
    path = mount.mountpoint / "scratch.bin"
    data = pattern(2 * CACHE, seed=29)
    with open(path, "w+b", buffering=0) as file:
        file.write(data)
        wait_for(lambda: parked_bytes(mount) > 0, "parts parked")
        with pytest.raises(OSError) as refused:
            os.unlink(path)
        assert refused.value.errno == errno.EBUSY
        assert os.pread(file.fileno(), 2 * MiB, 0) == data[:2 * MiB]
        assert os.pread(file.fileno(), MiB, len(data) - MiB) == data[-MiB:]
    assert "do not fit in the cache" in mount.log()
    assert server_bytes(s3, bucket, "scratch.bin", key_bytes) == data  # the read completed the upload
    os.unlink(path)
    assert not path.exists()
    wait_for(lambda: "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="scratch.bin"), "the object deleted")
    assert uploads_in_progress(s3, bucket, "scratch.bin") == []


def test_killed_after_completing_before_marking_uploaded_the_next_start_only_finishes_the_bookkeeping(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    """The window between CompleteMultipartUpload and the commit that marks the file uploaded: the journal
    keeps the upload with its ETag (cache.multipart_finished), and the next start marks the file uploaded
    with it and sets its attributes, sending no part again. The window is made by hand: the daemon is
    killed with parts parked, and the rest of the upload is done here as the daemon would have done it."""
    mount = mount_ssefs(small_cache_config)
    data = pattern(2 * CACHE, seed=31)
    write_until_parked(mount, mount.mountpoint / "window.bin", data)
    mount.kill(unmount=True)
    [upload] = uploads_in_progress(s3, bucket, "window.bin")
    part = 5 * MiB
    sent = {item["PartNumber"]: item["ETag"] for item in s3.list_parts(
        Bucket=bucket, Key="window.bin", UploadId=upload["UploadId"]).get("Parts", [])}
    for number in range(1, (len(data) + part - 1) // part + 1):
        if number not in sent:
            sent[number] = s3.upload_part(Bucket=bucket, Key="window.bin", UploadId=upload["UploadId"],
                                          PartNumber=number, Body=data[(number - 1) * part:number * part],
                                          **sse_params(key_bytes))["ETag"]
    completed = s3.complete_multipart_upload(
        Bucket=bucket, Key="window.bin", UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": number, "ETag": etag} for number, etag in sorted(sent.items())]})
    journal = small_cache_config.parent / "mount-cache" / "journal.sqlite"
    with contextlib.closing(sqlite3.connect(journal)) as db:
        changed = db.execute("UPDATE multipart_uploads SET completed_etag = ? WHERE upload_id = ?",
                             (completed["ETag"].strip('"'), upload["UploadId"])).rowcount
        db.commit()
    assert changed == 1  # the journal did hold that upload, with its parked parts
    again = mount_ssefs(small_cache_config, mount.mountpoint)
    wait_for(lambda: status_of(again.mountpoint).get("dirty_files") == 0, "the file marked uploaded")
    assert server_bytes(s3, bucket, "window.bin", key_bytes) == data
    local = os.stat(again.mountpoint / "window.bin")
    assert tag_of(s3, bucket, "window.bin") == attributes_tag(
        FileAttributes(local.st_mode, local.st_uid, local.st_gid, local.st_mtime_ns))
    assert "resuming the upload of 'window.bin'" in again.log()
    with contextlib.closing(sqlite3.connect(journal)) as db:
        assert db.execute("SELECT COUNT(*) FROM multipart_uploads").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM parked_parts").fetchone()[0] == 0


def test_parts_that_fail_once_parts_are_parked_are_sent_again_not_abandoned(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, mount_ssefs: MountFactory, s3: Any,
    key_bytes: bytes,
) -> None:
    """The server goes away for a few seconds while a file larger than the cache is written: its parked
    parts cannot be given up, so the parts that fail are sent again, and the writer waits meanwhile."""
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as proxy:
        config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint,
                              s3_extra='part_size = "5MiB"\nmultipart_threshold = "5MiB"',
                              cache_extra='max_size = "64MiB"\nwriteback_delay = 600')
        mount = mount_ssefs(config)
        data = pattern(4 * CACHE, seed=37)
        failures: list[BaseException] = []

        def write_all() -> None:
            try:
                with open(mount.mountpoint / "outage.bin", "wb") as writer:
                    for offset in range(0, len(data), MiB):
                        writer.write(data[offset:offset + MiB])
            except BaseException as error:  # noqa: BLE001 - reported by the test below
                failures.append(error)

        writer = threading.Thread(target=write_all)
        writer.start()
        wait_for(lambda: parked_bytes(mount) > 0, "parts parked")
        proxy.down()
        wait_for(lambda: "sending it again" in mount.log(), "a part failing and being sent again")
        time.sleep(2)
        proxy.up()
        writer.join(timeout=120)
        assert not writer.is_alive() and failures == []
        fsync_path(mount.mountpoint / "outage.bin")
    assert server_bytes(s3, bucket, "outage.bin", key_bytes) == data
    status = status_of(mount.mountpoint)
    assert (status["uploaded_files"], status["streams_started"], status["streams_abandoned"]) == (1, 1, 0)
    assert uploads_in_progress(s3, bucket, "outage.bin") == []


def write_at_once(mountpoint: Path, contents: dict[str, bytes]) -> None:
    """Write each file from its own thread, all at once, each ending with an fsync."""
    failures: list[BaseException] = []

    def write(name: str) -> None:
        try:
            with open(mountpoint / name, "wb") as writer:
                for offset in range(0, len(contents[name]), MiB):
                    writer.write(contents[name][offset:offset + MiB])
                writer.flush()
                os.fsync(writer.fileno())
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=write, args=(name,)) for name in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads) and failures == []


def test_two_files_larger_than_the_cache_written_at_once_are_each_sent_once(
    small_cache_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(small_cache_config)
    contents = {name: pattern(3 * CACHE, seed=seed) for name, seed in (("one.bin", 41), ("two.bin", 43))}
    write_at_once(mount.mountpoint, contents)
    for name, data in contents.items():
        assert server_bytes(s3, bucket, name, key_bytes) == data
        assert uploads_in_progress(s3, bucket, name) == []
    status = status_of(mount.mountpoint)
    # Neither was completed early while the other's parts were on their way (and then uploaded again).
    assert (status["uploaded_files"], status["streams_started"], status["streams_abandoned"]) == (2, 2, 0)


def test_more_writers_than_the_cache_holds_all_land(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, mount_ssefs: MountFactory, s3: Any,
    key_bytes: bytes,
) -> None:
    """Four writers of 8 MiB parts in a 64 MiB cache fill it before any of them holds the four parts a
    stream starts at: the files are uploaded as they stand to make room, again later (slow, but nothing
    waits forever and every byte lands)."""
    config = write_config(tmp_path, endpoint, bucket, key_file, cache_extra='max_size = "64MiB"\nwriteback_delay = 600')
    mount = mount_ssefs(config)
    contents = {f"writer{number}.bin": pattern(CACHE, seed=50 + number) for number in range(4)}
    write_at_once(mount.mountpoint, contents)
    for name, data in contents.items():
        assert server_bytes(s3, bucket, name, key_bytes) == data
        assert uploads_in_progress(s3, bucket, name) == []
