"""Deletes queued and sent in batches (ssefs/deletes.py): fast ``rm``, and never a delete that lands late.

The queue's rules are checked against a fake ``delete_many`` (pure logic); the store against the real
server (a pending key reads as absent, a write to it cancels the delete); and the whole path through a
mount: ``rm`` of many files, ``fsync`` of the directory, re-creating a name right after deleting it,
``rm -r``, and a ``kill -9`` while deletes could not be sent.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ssefs.deletes import BATCH_SIZE, DeleteQueue
from ssefs.errors import NoSuchObject, ServerUnavailable
from ssefs.keys import SseKey
from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, eventually_on_server, fsync_directory, keys, server_bytes, sse_params, write_config
from .proxy import TcpProxy
from .test_store import make_store


@pytest.fixture
def sse_key(key_bytes: bytes) -> SseKey:
    return SseKey(key_bytes)

MountFactory = Callable[..., Mount]


class MemoryJournal:
    def __init__(self, keys: list[str] | None = None) -> None:
        self.keys: list[str] = list(keys or [])

    def delete_queued(self, object_key: str) -> None:
        if object_key not in self.keys:
            self.keys.append(object_key)

    def deletes_done(self, object_keys: list[str]) -> None:
        self.keys = [key for key in self.keys if key not in object_keys]

    def queued_deletes(self) -> list[str]:
        return list(self.keys)


class FakeServer:
    """Records each DeleteObjects batch; can fail keys, or hold a batch until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.failing: set[str] = set()
        self.hold: trio.Event | None = None
        self.deleted: list[str] = []

    async def delete_many(self, batch: list[str]) -> dict[str, str]:
        self.batches.append(list(batch))
        if self.hold is not None:
            await self.hold.wait()
        errors = {key: "InternalError" for key in batch if key in self.failing}
        self.deleted += [key for key in batch if key not in errors]
        return errors


# ---------------------------------------------------------------------- the queue (no server)


async def test_queued_deletes_go_in_batches_of_1000_and_leave_the_journal() -> None:
    server, journal = FakeServer(), MemoryJournal()
    queue = DeleteQueue(server.delete_many)
    queue.attach_journal(journal)
    for index in range(2500):
        queue.add(f"k{index}")
    assert journal.keys[:2] == ["k0", "k1"] and len(journal.keys) == 2500
    assert queue.is_pending("k7") and len(queue) == 2500
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        with trio.fail_after(5):
            while len(queue):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [len(batch) for batch in server.batches] == [BATCH_SIZE, BATCH_SIZE, 500]
    assert sorted(server.deleted) == sorted(f"k{index}" for index in range(2500))
    assert journal.keys == [] and queue.deleted == 2500


async def test_a_write_cancels_a_queued_delete_and_waits_for_one_in_flight() -> None:
    server = FakeServer()
    queue = DeleteQueue(server.delete_many)
    queue.add("cancelled")
    await queue.settle("cancelled")
    assert not queue.is_pending("cancelled")

    queue.add("flying")
    server.hold = trio.Event()
    settled_at: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        with trio.fail_after(5):
            while not server.batches:
                await trio.sleep(0.01)

        async def writer() -> None:
            await queue.settle("flying")
            settled_at.append(len(server.deleted))

        nursery.start_soon(writer)
        await trio.sleep(0.1)
        assert settled_at == []  # the write waits while the delete is in flight
        server.hold.set()
        with trio.fail_after(5):
            while not settled_at:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert settled_at == [1] and server.deleted == ["flying"]  # the delete landed before the write went out
    assert server.batches == [["flying"]]


async def test_a_pending_delete_of_a_parent_name_goes_out_before_the_write() -> None:
    """SeaweedFS refuses directory "a/" (or "a/b") while a file "a" is still there: its delete goes first."""
    server = FakeServer()
    queue = DeleteQueue(server.delete_many)
    for key in ("a", "x", "x/y", "unrelated", "x/y/z"):
        queue.add(key)
    await queue.settle("a/")
    assert server.batches == [["a"]] and not queue.is_pending("a")
    await queue.settle("x/y/z")  # its own delete is cancelled; its parents' deletes are sent
    assert server.batches == [["a"], ["x"], ["x/y"]]
    assert not queue.is_pending("x/y/z") and "x/y/z" not in server.deleted
    assert queue.is_pending("unrelated")  # still waits for its batch
    server.failing.add("b")
    queue.add("b")
    with pytest.raises(ServerUnavailable):
        await queue.settle("b/c")  # the write must not go out while "b" may still be there
    assert queue.is_pending("b")


async def test_failed_deletes_are_retried_and_flush_reports_them() -> None:
    server, journal = FakeServer(), MemoryJournal()
    queue = DeleteQueue(server.delete_many)
    queue.attach_journal(journal)
    server.failing = {"dir/bad"}
    queue.add("dir/good")
    queue.add("dir/bad")
    queue.add("other/file")
    with pytest.raises(ServerUnavailable, match="dir/bad"):
        await queue.flush("dir/")
    assert server.batches == [["dir/good", "dir/bad"]]  # only what is under the prefix
    assert queue.is_pending("dir/bad") and not queue.is_pending("dir/good")
    assert journal.keys == ["dir/bad", "other/file"]
    server.failing = set()
    await queue.flush()
    assert not len(queue) and journal.keys == []


async def test_an_unexpected_error_does_not_stop_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer()
    calls = 0

    async def broken_once(batch: list[str]) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return await server.delete_many(batch)

    queue = DeleteQueue(broken_once)
    queue.add("a")
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        with trio.fail_after(60):  # virtual time: the retry comes after the backoff
            while len(queue):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert server.deleted == ["a"] and calls == 2


async def test_a_cancelled_batch_stays_queued_and_journaled() -> None:
    server, journal = FakeServer(), MemoryJournal()
    queue = DeleteQueue(server.delete_many)
    queue.attach_journal(journal)
    queue.add("a")
    server.hold = trio.Event()
    with trio.move_on_after(0.2):
        await queue.flush()
    assert queue.is_pending("a") and journal.keys == ["a"]
    # A new run takes up what the journal holds.
    again = DeleteQueue(FakeServer().delete_many)
    again.attach_journal(journal)
    assert again.is_pending("a")


# ---------------------------------------------------------------------- the store (real server)


async def test_pending_keys_read_as_absent_and_a_write_cancels_their_delete(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, key_bytes: bytes, s3: Any,
) -> None:
    store = make_store(endpoint, bucket, sse_key)
    for name in ("d/a", "d/b", "d/c"):
        await store.put(name, b"old " + name.encode())
    store.delete_later("d/a")
    store.delete_later("d/b")
    assert [info.key for info in (await store.list_children("d/")).objects] == ["d/c"]
    assert [info.key for info in await store.list_tree("d/")] == ["d/c"]
    assert await store.keys_with_prefix("d/", 1) == ["d/c"]
    assert (await store.probe("d/a"))[0] is None
    first = await store.first_object_with_prefix("d/")
    assert first is not None and first.key == "d/c"
    with pytest.raises(NoSuchObject):
        await store.head("d/a")
    # Writing d/b again takes its delete out of the queue: the new version stays.
    await store.put("d/b", b"new")
    await store.deletes.flush()
    assert keys(s3, bucket, "d/") == {"d/", "d/b", "d/c"}  # "d/": the directory's marker, made before a delete
    assert server_bytes(s3, bucket, "d/b", key_bytes) == b"new"


# ---------------------------------------------------------------------- through a mount


@pytest.mark.parametrize("asking", ["list_children", "first_object_with_prefix", "keys_with_prefix"])
async def test_a_delete_confirmed_while_a_listing_is_answered_does_not_bring_the_object_back(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, asking: str,
) -> None:
    """The LIST is answered before the delete lands and the delete is confirmed before the LIST's answer is
    read: the object must still read as absent (it came back in a listing right after a remount, whose
    journaled deletes went out while the first directory listing was under way)."""
    store = make_store(endpoint, bucket, sse_key)
    for name in ("r/a", "r/b"):
        await store.put(name, b"x")
    store.delete_later("r/a")
    listed, release = threading.Event(), threading.Event()
    pages = store._list_pages

    def slow_pages(prefix: str, **options: Any) -> Any:
        for page in pages(prefix, **options):
            listed.set()
            release.wait(30)
            yield page

    store._list_pages = slow_pages  # type: ignore[method-assign]
    children: list[str] = []

    async def list_r() -> None:
        if asking == "list_children":
            children.extend(info.key for info in (await store.list_children("r/")).objects)
        elif asking == "first_object_with_prefix":  # a lookup's probe of the name
            first = await store.first_object_with_prefix("r/a")
            children.extend(["r/a"] if first is not None else ["r/b"])  # r/b is not under "r/a"
        else:
            children.extend(await store.keys_with_prefix("r/", 5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(list_r)
        await trio.to_thread.run_sync(listed.wait, 30)
        await store.deletes.flush()  # confirmed while the LIST's answer waits
        assert not store.deletes.is_pending("r/a")
        release.set()
    assert children == ["r/b"]


@pytest.fixture
def mounted(endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path,
            mount_ssefs: MountFactory) -> Mount:
    return mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 0"))


@pytest.mark.fuse
def test_rm_of_many_files_is_done_in_s3_when_fsync_of_the_directory_returns(
    mounted: Mount, bucket: str, s3: Any, key_bytes: bytes,
) -> None:
    sse = sse_params(key_bytes)
    for index in range(300):
        s3.put_object(Bucket=bucket, Key=f"many/f{index:03d}", Body=b"x", **sse)
    s3.put_object(Bucket=bucket, Key="many/kept", Body=b"kept", **sse)
    directory = mounted.mountpoint / "many"
    assert len(os.listdir(directory)) == 301
    for index in range(300):
        os.unlink(directory / f"f{index:03d}")
    assert os.listdir(directory) == ["kept"]
    assert not (directory / "f000").exists()
    fsync_directory(directory)
    # The directory had no marker: it got one before its first file went (test_fuse: it must not vanish).
    assert keys(s3, bucket, "many/") == {"many/", "many/kept"}
    assert (directory / "kept").read_bytes() == b"kept"


@pytest.mark.fuse
def test_a_name_written_again_right_after_its_delete_keeps_the_new_content(
    mounted: Mount, bucket: str, s3: Any, key_bytes: bytes,
) -> None:
    """unlink then create, again and again, with and without fsync: the last version wins in S3."""
    path = mounted.mountpoint / "again.bin"
    contents = []
    for round_number in range(20):
        data = secrets.token_bytes(1000 + round_number)
        path.write_bytes(data)
        if round_number % 2:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        contents.append(data)
        if round_number < 19:
            os.unlink(path)
    fsync_directory(mounted.mountpoint)
    eventually_on_server(s3, bucket, "again.bin", key_bytes, contents[-1], timeout=30)
    time.sleep(1.5)  # nothing queued may land after it
    assert server_bytes(s3, bucket, "again.bin", key_bytes) == contents[-1]
    assert path.read_bytes() == contents[-1]


@pytest.mark.fuse
def test_rm_r_leaves_nothing_in_s3_and_the_directory_gone(mounted: Mount, bucket: str, s3: Any) -> None:
    tree = mounted.mountpoint / "tree"
    for sub in ("a", "a/b", "c"):
        (tree / sub).mkdir(parents=True)
        for index in range(20):
            (tree / sub / f"f{index}").write_bytes(b"data")
    fsync_directory(tree)
    subprocess.run(["rm", "-r", str(tree)], check=True, timeout=120)
    assert not tree.exists()
    assert "tree" not in os.listdir(mounted.mountpoint)
    assert keys(s3, bucket, "tree") == set()


@pytest.fixture
def proxy(endpoint: SeaweedEndpoint) -> Iterator[TcpProxy]:
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as running:
        yield running


@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_deletes_not_sent_before_a_kill_are_sent_by_the_next_mount(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, proxy: TcpProxy,
) -> None:
    sse = sse_params(key_bytes)
    for index in range(50):
        s3.put_object(Bucket=bucket, Key=f"gone/f{index:02d}", Body=b"x", **sse)
    s3.put_object(Bucket=bucket, Key="gone/kept", Body=b"kept", **sse)
    config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint,
                          s3_extra="read_timeout = 2")
    first = mount_ssefs(config)
    directory = first.mountpoint / "gone"
    assert len(os.listdir(directory)) == 51
    proxy.down()  # no delete can reach the server now
    started = time.monotonic()
    for index in range(50):
        os.unlink(directory / f"f{index:02d}")
    assert time.monotonic() - started < 10, "unlink waited for the server"
    assert os.listdir(directory) == ["kept"]
    with pytest.raises(OSError) as caught:
        fsync_directory(directory)
    assert caught.value.errno == errno.EIO
    first.kill()
    assert len(keys(s3, bucket, "gone/")) == 51  # nothing was deleted yet
    proxy.up()
    second = mount_ssefs(config, first.mountpoint)
    listed = os.listdir(second.mountpoint / "gone")
    # Hidden at once, not resurrected. (Failed once in CI, not reproduced in 11 runs: what the server held
    # then and what the daemon logged say whether the deletes were lost or sent and still listed.)
    assert listed == ["kept"], (sorted(listed)[:3], sorted(keys(s3, bucket, "gone/"))[:3], second.log()[-3000:])
    deadline = time.monotonic() + 30
    while keys(s3, bucket, "gone/") != {"gone/", "gone/kept"}:  # with the marker made before the deletes
        assert time.monotonic() < deadline, keys(s3, bucket, "gone/")
        time.sleep(0.2)
    assert second.stop() == 0
