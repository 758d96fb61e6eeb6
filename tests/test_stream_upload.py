"""Uploading large files while they are written (streaming.py), end to end: real FUSE mount, real SeaweedFS."""

from __future__ import annotations

import json
import os
import random
import secrets
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from ssefs.cache import Entry, ParkedUpload
from ssefs.config import S3Settings
from ssefs.keys import KeyRing, SseKey
from ssefs.metadata import ATTRIBUTES_IN_TAG, ATTRIBUTES_TAG, FileAttributes, attributes_tag, with_tagged_attributes
from ssefs.seaweed import SeaweedEndpoint
from ssefs.streaming import STREAM_AFTER_PARTS, StreamedUploads

from .conftest import Mount, server_bytes, sse_params, ssefs_command, write_config
from .proxy import TcpProxy

MountFactory = Callable[..., Mount]
MiB = 1024 * 1024
PART = 5 * MiB
# Small parts (S3's minimum) so that a few tens of MiB make several of them.
S3_EXTRA = 'part_size = "5MiB"\nmultipart_threshold = "5MiB"'


def pattern(size: int, seed: int = 7) -> bytes:
    """Bytes that differ in every part (a part uploaded in the wrong place shows)."""
    block = bytes((seed + index) % 251 for index in range(MiB))
    return b"".join(block[index % 7:] + block[:index % 7] for index in range(size // MiB))


def uploads_in_progress(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    return [upload for upload in s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
            if upload["Key"] == key]


def parts_sent(s3: Any, bucket: str, key: str) -> int:
    uploads = uploads_in_progress(s3, bucket, key)
    if not uploads:
        return 0
    return len(s3.list_parts(Bucket=bucket, Key=key, UploadId=uploads[0]["UploadId"]).get("Parts", []))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def write_until_parts_sent(writer: Any, data: bytes | bytearray, s3: Any, bucket: str, key: str, parts: int) -> None:
    """Write ``data`` to the open ``writer`` and wait, the file still open, until ``parts`` parts are on the server."""
    writer.write(data)
    writer.flush()
    wait_for(lambda: parts_sent(s3, bucket, key) >= parts, "parts sent while the file is open")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def status_of(mountpoint: Path, timeout: float = 10.0) -> dict[str, Any]:
    """``ssefs status`` as of after this call: the daemon rewrites what it shows once a second, so an
    answer taken before (say, before the upload an ``fsync`` just finished) is waited out."""
    asked, deadline = time.time(), time.monotonic() + timeout
    while True:
        shown = subprocess.run(ssefs_command("status", str(mountpoint), "--json"), capture_output=True, text=True,
                               timeout=30)
        status = dict(json.loads(shown.stdout)) if shown.returncode == 0 else {}
        if not status or status.get("updated_at", 0) >= asked or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def tag_of(s3: Any, bucket: str, key: str) -> str | None:
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return next((tag["Value"] for tag in tags if tag["Key"] == ATTRIBUTES_TAG), None)


@pytest.fixture
def streaming_config(tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path) -> Path:
    # Nothing is uploaded by the write-back delay during a test: only what streams, and fsync.
    return write_config(tmp_path, endpoint, bucket, key_file, s3_extra=S3_EXTRA, cache_extra="writeback_delay = 600")


# ---------------------------------------------------------------------- pure logic


def test_the_attributes_tag_overrides_metadata_only_where_the_metadata_says_so() -> None:
    final = FileAttributes(mode=0o100640, uid=1000, gid=100, mtime_ns=1_764_000_000_123_456_789)
    tag = attributes_tag(final)
    assert tag == "mode=33184 uid=1000 gid=100 mtime=1764000000.123456789"
    created = {"mode": "33188", "uid": "0", "gid": "0", "mtime": "1700000000", ATTRIBUTES_IN_TAG: "1", "other": "x"}
    assert with_tagged_attributes(created, tag) == (
        {"mode": "33184", "uid": "1000", "gid": "100", "mtime": "1764000000.123456789", "other": "x"}, True)
    # Completed but not tagged yet: the metadata of the creation stands, and is not final.
    assert with_tagged_attributes(created, None) == (created, False)
    # Plain metadata (a later self-copy or rename wrote it) ignores a tag left from before.
    plain = {"mode": "33188", "mtime": "1700000000"}
    assert with_tagged_attributes(plain, tag) == (plain, True)


# ---------------------------------------------------------------------- through the mount


def test_a_large_file_uploads_while_it_is_written(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, streaming_config: Path,
    mount_ssefs: MountFactory, s3: Any, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(streaming_config)
    path = mount.mountpoint / "big.bin"
    data = pattern(48 * MiB)
    with open(path, "wb") as writer:
        # Still open, nothing closed or synced: the first parts are on the server already.
        write_until_parts_sent(writer, data[:40 * MiB], s3, bucket, "big.bin", 5)
        # ssefs status shows it (the daemon refreshes its status once a second).
        wait_for(lambda: status_of(mount.mountpoint).get("streams_active") == 1, "the stream in ssefs status")
        shown = subprocess.run(ssefs_command("status", str(mount.mountpoint)), capture_output=True, text=True,
                               timeout=30).stdout
        assert "sent while written: 1 file(s) now; 1 started, 0 abandoned" in shown
        writer.write(data[40 * MiB:])
    os.chmod(path, 0o640)
    fsync_path(path)
    assert uploads_in_progress(s3, bucket, "big.bin") == []
    assert server_bytes(s3, bucket, "big.bin", key_bytes) == data
    head = s3.head_object(Bucket=bucket, Key="big.bin", **sse_params(key_bytes))
    assert head["Metadata"].get(ATTRIBUTES_IN_TAG) == "1"
    local = os.stat(path)
    assert tag_of(s3, bucket, "big.bin") == attributes_tag(
        FileAttributes(local.st_mode, local.st_uid, local.st_gid, local.st_mtime_ns))
    # Another mount with its own empty cache reads the final attributes from the tag.
    other_config = write_config(tmp_path, endpoint, bucket, key_file, name="other", s3_extra=S3_EXTRA)
    other = mount_ssefs(other_config)
    seen = os.stat(other.mountpoint / "big.bin")
    assert (stat.S_IMODE(seen.st_mode), seen.st_mtime_ns, seen.st_size) == (0o640, local.st_mtime_ns, len(data))
    assert (other.mountpoint / "big.bin").read_bytes() == data


def test_a_write_behind_the_parts_sent_uploads_the_file_whole(
    streaming_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(streaming_config)
    path = mount.mountpoint / "header-last.bin"
    data = bytearray(pattern(40 * MiB))
    with open(path, "wb") as writer:
        write_until_parts_sent(writer, data, s3, bucket, "header-last.bin", 3)
        # As muxers and archivers do: the header is written last, over bytes already sent.
        writer.seek(100)
        writer.write(b"HEADER")
    data[100:106] = b"HEADER"
    fsync_path(path)
    assert server_bytes(s3, bucket, "header-last.bin", key_bytes) == data
    head = s3.head_object(Bucket=bucket, Key="header-last.bin", **sse_params(key_bytes))
    assert ATTRIBUTES_IN_TAG not in head["Metadata"]
    wait_for(lambda: uploads_in_progress(s3, bucket, "header-last.bin") == [], "the abandoned upload aborted")


def test_a_truncate_behind_the_parts_sent_uploads_what_is_left(
    streaming_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(streaming_config)
    path = mount.mountpoint / "cut.bin"
    data = pattern(40 * MiB)
    with open(path, "wb") as writer:
        write_until_parts_sent(writer, data, s3, bucket, "cut.bin", 3)
        writer.truncate(7 * MiB + 3)
        writer.seek(0, os.SEEK_END)
        writer.write(b"tail")
    fsync_path(path)
    assert server_bytes(s3, bucket, "cut.bin", key_bytes) == data[:7 * MiB + 3] + b"tail"
    wait_for(lambda: uploads_in_progress(s3, bucket, "cut.bin") == [], "the abandoned upload aborted")


def test_a_temporary_file_renamed_after_close_keeps_its_bytes_and_attributes(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, streaming_config: Path,
    mount_ssefs: MountFactory, s3: Any, key_bytes: bytes,
) -> None:
    """What rsync does: write a temporary name, close, set mode and time, rename over the final name."""
    mount = mount_ssefs(streaming_config)
    temporary = mount.mountpoint / ".final.bin.Xa81Qz"
    data = pattern(32 * MiB, seed=3)
    with open(temporary, "wb") as writer:
        write_until_parts_sent(writer, data, s3, bucket, ".final.bin.Xa81Qz", 2)
    os.chmod(temporary, 0o600)
    os.utime(temporary, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.rename(temporary, mount.mountpoint / "final.bin")
    fsync_path(mount.mountpoint / "final.bin")
    assert server_bytes(s3, bucket, "final.bin", key_bytes) == data
    wait_for(lambda: ".final.bin.Xa81Qz" not in {item["Key"] for item in
                                                 s3.list_objects_v2(Bucket=bucket).get("Contents", [])},
             "the temporary name deleted")
    assert uploads_in_progress(s3, bucket, ".final.bin.Xa81Qz") == []
    other = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="other", s3_extra=S3_EXTRA))
    seen = os.stat(other.mountpoint / "final.bin")
    assert (stat.S_IMODE(seen.st_mode), seen.st_mtime_ns) == (0o600, 1_600_000_000_123_456_789)


def test_killed_while_streaming_the_restart_uploads_the_file_and_aborts_the_parts(
    streaming_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    mount = mount_ssefs(streaming_config)
    path = mount.mountpoint / "killed.bin"
    data = pattern(40 * MiB, seed=11)
    with open(path, "wb") as writer:
        writer.write(data)
    wait_for(lambda: parts_sent(s3, bucket, "killed.bin") >= 3, "parts sent before the kill")
    mount.kill(unmount=True)
    again = mount_ssefs(streaming_config, mount.mountpoint)
    # The restart aborts the unfinished upload and uploads the closed file whole from the cache.
    fsync_path(again.mountpoint / "killed.bin")
    assert server_bytes(s3, bucket, "killed.bin", key_bytes) == data
    wait_for(lambda: uploads_in_progress(s3, bucket, "killed.bin") == [], "the unfinished upload aborted")


def test_where_tagging_is_refused_the_attributes_are_written_by_a_copy(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, mount_ssefs: MountFactory, s3: Any,
    key_bytes: bytes,
) -> None:
    """Credentials without s3:PutObjectTagging: the streamed object gets its final attributes as plain metadata."""
    assert endpoint.without_tagging is not None
    access_key_id, secret_access_key = endpoint.without_tagging
    limited = replace(endpoint, access_key_id=access_key_id, secret_access_key=secret_access_key)
    config = write_config(tmp_path, limited, bucket, key_file, s3_extra=S3_EXTRA, cache_extra="writeback_delay = 600")
    mount = mount_ssefs(config)
    path = mount.mountpoint / "untagged.bin"
    data = pattern(32 * MiB, seed=5)
    with open(path, "wb") as writer:
        write_until_parts_sent(writer, data, s3, bucket, "untagged.bin", 2)
    os.chmod(path, 0o604)
    os.utime(path, ns=(1_650_000_000_000_000_000, 1_650_000_000_000_000_000))
    fsync_path(path)
    assert server_bytes(s3, bucket, "untagged.bin", key_bytes) == data
    metadata = s3.head_object(Bucket=bucket, Key="untagged.bin", **sse_params(key_bytes))["Metadata"]
    assert ATTRIBUTES_IN_TAG not in metadata
    assert (int(metadata["mode"]) & 0o7777, float(metadata["mtime"])) == (0o604, 1_650_000_000.0)
    assert tag_of(s3, bucket, "untagged.bin") is None
    other = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="other"))
    seen = os.stat(other.mountpoint / "untagged.bin")
    assert (stat.S_IMODE(seen.st_mode), seen.st_mtime_ns) == (0o604, 1_650_000_000_000_000_000)
    # A copy costs about what the upload did: the next large file is not streamed on this mount.
    with open(mount.mountpoint / "second.bin", "wb") as writer:
        writer.write(data)
        writer.flush()
        time.sleep(2)
        assert uploads_in_progress(s3, bucket, "second.bin") == []


def test_abandoning_remembers_only_files_still_open_for_writing() -> None:
    """A stream abandoned while its writer goes on is not restarted until the last close; a deleted file
    (no writer) leaves nothing behind, so a mount deleting millions of files does not grow."""
    streams = StreamedUploads(store=None, settings=S3Settings(endpoint="https://s3.example", bucket="b"),  # type: ignore[arg-type]
                              cache=None, cached_file=lambda entry: None)  # type: ignore[arg-type,return-value]
    streams.nursery = object()  # type: ignore[assignment]  # serving: may start streams
    size = STREAM_AFTER_PARTS * streams.settings.part_size
    open_file = Entry(1, b"u1", "open.bin", None, "", 0, size, 0, open_writers=1)
    deleted = Entry(2, b"u2", "gone.bin", None, "", 0, size, 0)
    streams.abandon(open_file, "a change behind the parts sent")
    streams.abandon(deleted, "deleted or replaced")
    assert not streams._may_start(open_file, size)
    assert streams._declined == {open_file.id}
    open_file.open_writers = 0
    streams.closed(open_file)
    assert streams._declined == set()
    open_file.open_writers = 1
    assert streams._may_start(open_file, size)


def test_unmounted_while_parts_are_in_flight_the_upload_is_finished_not_left(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, mount_ssefs: MountFactory, s3: Any,
    key_bytes: bytes,
) -> None:
    """A clean unmount right after close: the stream's parts cut off by the unmount are sent again and the
    upload completed; no multipart upload is left on the server for the next start to abort. The mount talks
    to the server through a proxy that slows every chunk, so that parts are surely still in flight."""
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as proxy:
        config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint, s3_extra=S3_EXTRA,
                              cache_extra="writeback_delay = 600")
        mount = mount_ssefs(config)
        proxy.set_latency(per_chunk=0.005)
        path = mount.mountpoint / "unmounted.bin"
        data = pattern(64 * MiB, seed=13)
        with open(path, "wb") as writer:
            write_until_parts_sent(writer, data, s3, bucket, "unmounted.bin", 1)
        assert parts_sent(s3, bucket, "unmounted.bin") < 12, "the stream finished before the unmount"
        assert mount.stop(timeout=120) == 0
    assert server_bytes(s3, bucket, "unmounted.bin", key_bytes) == data
    assert uploads_in_progress(s3, bucket, "unmounted.bin") == []


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_writes_while_streaming_land_exactly(
    seed: int, streaming_config: Path, mount_ssefs: MountFactory, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    """Appends first (a stream starts), then in a random order more appends, writes and truncates near
    the writer (where parts may not be sent yet) and far behind it (where they are), fsyncs while open
    and pauses that let parts go out: what lands is exactly what was written, and no upload is left."""
    rng = random.Random(seed)
    mount = mount_ssefs(streaming_config)
    name = f"random-{seed}.bin"
    path = mount.mountpoint / name
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for step in range(48):
            choice = 0.0 if step < 8 else rng.random()
            near = max(0, len(model) - 12 * MiB)  # within about two parts of the writer
            if choice < 0.78:
                chunk = rng.randbytes(rng.randrange(1, 6 * MiB))
                os.pwrite(fd, chunk, len(model))
                model += chunk
            elif choice < 0.88:
                offset = rng.randrange(near if choice < 0.86 else 0, len(model))
                chunk = rng.randbytes(rng.randrange(1, 256 * 1024))
                os.pwrite(fd, chunk, offset)
                model[offset:offset + len(chunk)] = chunk
            elif choice < 0.92:
                size = rng.randrange(near, len(model))
                os.ftruncate(fd, size)
                del model[size:]
            elif choice < 0.94:
                os.fsync(fd)
                assert server_bytes(s3, bucket, name, key_bytes) == model
            else:
                time.sleep(0.4)
    finally:
        os.close(fd)
    fsync_path(path)
    assert server_bytes(s3, bucket, name, key_bytes) == model
    assert path.read_bytes() == model
    wait_for(lambda: uploads_in_progress(s3, bucket, name) == [], "no upload left behind")
    wait_for(lambda: status_of(mount.mountpoint).get("streams_started", 0) >= 1, "a stream started")


class SlowToCreateStore:
    """Just what ``StreamedUploads`` asks of a store; CreateMultipartUpload answers only when released."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.parts: dict[int, int] = {}
        self.aborted: list[str] = []

    async def create_multipart(self, object_key: str, metadata: dict[str, str]) -> str:
        await self.release.wait()
        return "upload-1"

    async def upload_part(self, object_key: str, upload_id: str, part_number: int, data: bytes, *,
                          key: Any = None) -> str:
        self.parts[part_number] = len(data)
        return f"etag-{part_number}"

    async def abort_multipart(self, object_key: str, upload_id: str) -> None:
        self.aborted.append(upload_id)


class ZerosFile:
    async def read(self, offset: int, size: int, *, keep: bool = True) -> bytes:
        return bytes(size)


@pytest.mark.parametrize("meanwhile", ["closed", "deleted", "uploaded whole"])
async def test_what_happens_to_a_file_while_its_upload_is_being_created(meanwhile: str) -> None:
    """A file closed before CreateMultipartUpload answered still streams (the upload after close takes it
    over); one deleted or uploaded whole meanwhile gets its new upload aborted."""
    store = SlowToCreateStore()
    settings = S3Settings(endpoint="https://s3.example", bucket="b", part_size=5 * MiB)
    roomy_cache = SimpleNamespace(waiting_for_space=0, used_bytes=0, max_size=1 << 40)
    streams = StreamedUploads(store, settings, roomy_cache, lambda entry: ZerosFile())  # type: ignore[arg-type,return-value]
    size = (STREAM_AFTER_PARTS + 2) * settings.part_size
    entry = Entry(1, b"u1", "file.bin", None, "", 0, size, 0, generation=1, open_writers=1)
    async with trio.open_nursery() as nursery:
        streams.nursery = nursery
        streams.after_write(entry, size)
        await trio.testing.wait_all_tasks_blocked()
        entry.open_writers = 0
        streams.closed(entry)
        if meanwhile == "deleted":
            streams.abandon(entry, "deleted or replaced")
        elif meanwhile == "uploaded whole":
            assert await streams.take(entry, size) is None
        store.release.set()
        await trio.testing.wait_all_tasks_blocked()
        if meanwhile == "closed":
            stream = await streams.take(entry, size)
            assert stream is not None and stream.upload_id == "upload-1"
            assert sorted(stream.etags) == [0, 1, 2, 3, 4] and store.aborted == []
        else:
            assert store.aborted == ["upload-1"] and len(streams) == 0
            assert await streams.take(entry, size) is None
    assert streams._cancelled_starts == set() and streams._declined == set()


@pytest.mark.parametrize("created_under", ["current", "previous", "gone", "unrecorded"])
def test_a_resumed_upload_sends_its_parts_under_the_key_it_was_created_under(
    created_under: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """After a key rotation, the key an upload was created under may be a previous key: its last parts go
    under that key (S3 wants one key per upload). A key no longer configured leaves it for a mount with it."""
    current, previous, gone = (SseKey(secrets.token_bytes(32)) for _ in range(3))
    fingerprint = {"current": current.fingerprint, "previous": previous.fingerprint, "gone": gone.fingerprint,
                   "unrecorded": None}[created_under]
    store = SimpleNamespace(keys=KeyRing(current, (previous,)))
    streams = StreamedUploads(store, S3Settings(endpoint="https://s3.example", bucket="b"),  # type: ignore[arg-type]
                              cache=None, cached_file=lambda entry: None)  # type: ignore[arg-type,return-value]
    entry = Entry(1, b"u1", "big.bin", None, "", 0, 30 * MiB, 0, parked_bytes=10 * MiB)
    streams.resume(ParkedUpload(entry, "upload-1", 5 * MiB, {0: "e1", 1: "e2"}, None, fingerprint))
    if created_under == "gone":
        assert not streams.streaming(entry)
        assert f"fingerprint {gone.fingerprint}, which this mount does not have" in caplog.text
        return
    assert streams.streaming(entry)
    stream = streams._streams[entry.id]
    assert (stream.upload_id, stream.parked, stream.claimed) == ("upload-1", 2, 2)
    assert stream.key is (previous if created_under == "previous" else None)  # None: the current key
