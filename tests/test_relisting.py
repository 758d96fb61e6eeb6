"""Lookups in a directory whose cached listing has expired.

A directory of one LIST page is listed again for the lookup. A larger one is
probed name by name until the probes outnumber the pages a new listing takes;
then it is listed again in the background, and the lookups after that are
answered from the new listing (``rm -r`` or a ``stat`` of every file that
outlasts the TTL). In process, against the real server: the ``Filesystem``
without FUSE, with the store's probes and LISTs counted.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ssefs import vfs
from ssefs.cache import BlockCache
from ssefs.config import load_config
from ssefs.errors import ServerUnavailable
from ssefs.inodes import ROOT_INODE
from ssefs.keys import load_key_ring
from ssefs.metadata import XattrSealer
from ssefs.seaweed import SeaweedEndpoint
from ssefs.store import ObjectStore

from .conftest import sse_params, write_config

# attr_timeout in the tests' config (conftest.write_config).
TTL = 1.0


class Counted:
    """Counts the store's probes (two requests per name) and directory listings."""

    def __init__(self, store: ObjectStore) -> None:
        self.probes = 0
        self.listings = 0
        probe, list_children = store.probe, store.list_children

        async def counted_probe(object_key: str) -> Any:
            self.probes += 1
            return await probe(object_key)

        async def counted_list_children(prefix: str) -> Any:
            self.listings += 1
            return await list_children(prefix)

        store.probe = counted_probe  # type: ignore[method-assign]
        store.list_children = counted_list_children  # type: ignore[method-assign]


@pytest.fixture
async def filesystem(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path
) -> AsyncIterator[vfs.Filesystem]:
    config = load_config(write_config(tmp_path, endpoint, bucket, key_file))
    assert config.mount.attr_timeout == TTL
    keys = load_key_ring(config)
    cache = BlockCache(config.cache.dir, keys, identity="relisting", max_size=64 * 2**20)
    filesystem = vfs.Filesystem(config, ObjectStore(config.s3, keys), cache, XattrSealer(keys.current.derive(b"x")))
    try:
        async with trio.open_nursery() as nursery:
            filesystem.background = nursery
            yield filesystem
            nursery.cancel_scope.cancel()
    finally:
        filesystem.metadata.close()
        cache.close()


async def listing_is_fresh(filesystem: vfs.Filesystem, path: str) -> None:
    with trio.fail_after(30):
        while filesystem.inodes.cached_listing(path) is None:
            await trio.sleep(0.01)


async def test_a_large_directory_is_listed_again_once_probing_would_cost_more(
    filesystem: vfs.Filesystem, bucket: str, key_bytes: bytes, s3: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seven entries at two per page: four pages; a relist for a lookup only up to two entries.
    monkeypatch.setattr(vfs, "RELIST_LIMIT", 2)
    monkeypatch.setattr(vfs, "ENTRIES_PER_LIST_PAGE", 2)
    names = [f"f{index}" for index in range(7)]
    for index, name in enumerate(names):
        s3.put_object(Bucket=bucket, Key=f"big/{name}", Body=b"x" * (index + 1), **sse_params(key_bytes))
    big = await filesystem.lookup(ROOT_INODE, b"big")
    assert [name for name, _node in await filesystem.list_directory(big.inode)] == names
    await trio.sleep(TTL + 0.1)  # the listing expires
    assert filesystem.inodes.cached_listing(big.path) is None
    counted = Counted(filesystem.store)

    for index, name in enumerate(names[:3]):
        assert (await filesystem.lookup(big.inode, name.encode())).size == index + 1
    assert (counted.probes, counted.listings) == (3, 0)
    # The fourth probe matches the four pages a listing takes: the directory is listed in the background.
    assert (await filesystem.lookup(big.inode, names[3].encode())).size == 4
    assert counted.probes == 4
    await listing_is_fresh(filesystem, big.path)
    assert counted.listings == 1
    for index, name in enumerate(names[4:], start=4):
        assert (await filesystem.lookup(big.inode, name.encode())).size == index + 1
    assert (counted.probes, counted.listings) == (4, 1)

    # A name absent from the new listing is absent without asking S3 again.
    with pytest.raises(vfs.FsError):
        await filesystem.lookup(big.inode, b"missing")
    assert (counted.probes, counted.listings) == (4, 1)


async def test_a_small_directory_is_listed_again_for_the_lookup(
    filesystem: vfs.Filesystem, bucket: str, key_bytes: bytes, s3: Any,
) -> None:
    for name in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=f"small/{name}", Body=name.encode(), **sse_params(key_bytes))
    small = await filesystem.lookup(ROOT_INODE, b"small")
    await filesystem.list_directory(small.inode)
    await trio.sleep(TTL + 0.1)
    counted = Counted(filesystem.store)
    s3.put_object(Bucket=bucket, Key="small/c", Body=b"cc", **sse_params(key_bytes))  # another client's file
    assert (await filesystem.lookup(small.inode, b"c")).size == 2
    assert (await filesystem.lookup(small.inode, b"a")).size == 1
    assert (counted.probes, counted.listings) == (0, 1)


async def test_lookups_waiting_for_a_listing_that_fails_share_its_error(filesystem: vfs.Filesystem) -> None:
    """Several lookups wait for one LIST and the server does not answer: each gets that LIST's error at
    once, none starts a LIST of its own (in an outage each would wait a full timeout in turn), and no
    bookkeeping is left behind (a fetch replaced by another's used to end in a KeyError that stopped the
    mount, seen in the blackhole fault test)."""
    calls = 0

    async def unreachable(prefix: str) -> Any:
        nonlocal calls
        calls += 1
        await trio.sleep(0.2)
        raise ServerUnavailable(f"ListObjectsV2 {prefix!r} failed: read timeout")

    filesystem.store.list_children = unreachable  # type: ignore[method-assign]
    outcomes: list[BaseException | None] = []

    async def refresh() -> None:
        try:
            await filesystem._refresh_listing("dir")
        except ServerUnavailable as error:
            outcomes.append(error)
        else:
            outcomes.append(None)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(refresh)
    assert calls == 1
    assert len(outcomes) == 3 and all(isinstance(outcome, ServerUnavailable) for outcome in outcomes)
    assert filesystem._listing_fetches == {}
    # The next lookup after the failure asks the server again.
    with pytest.raises(ServerUnavailable):
        await filesystem._refresh_listing("dir")
    assert calls == 2


async def test_names_changed_through_the_mount_are_known_past_the_listing(
    filesystem: vfs.Filesystem, bucket: str, key_bytes: bytes, s3: Any,
) -> None:
    """A file uploaded or deleted through the mount is known as of that change: a lookup of it within
    the TTL after the change needs no request, even once the directory's listing (older) has expired;
    other names, and those changes once older than the TTL, are asked of S3 again."""
    for name in ("theirs", "doomed"):
        s3.put_object(Bucket=bucket, Key=f"mixed/{name}", Body=name.encode(), **sse_params(key_bytes))
    mixed = await filesystem.lookup(ROOT_INODE, b"mixed")
    await filesystem.list_directory(mixed.inode)
    listed_at = trio.current_time()
    await trio.sleep(TTL / 2)
    fh, _node = await filesystem.create(mixed.inode, b"mine", mode=0o640, uid=0, gid=0)
    await filesystem.write(fh, 0, b"written here")
    await filesystem.fsync(fh)  # uploaded: S3 holds it as of now
    await filesystem.release(fh)
    await filesystem.unlink(mixed.inode, b"doomed")
    await trio.sleep_until(listed_at + TTL + 0.1)
    assert filesystem.inodes.cached_listing(mixed.path) is None
    counted = Counted(filesystem.store)

    mine = await filesystem.lookup(mixed.inode, b"mine")
    assert (mine.size, mine.mode) == (len(b"written here"), 0o100640)
    with pytest.raises(vfs.FsError) as absent:
        await filesystem.lookup(mixed.inode, b"doomed")
    assert absent.value.errno == errno.ENOENT
    assert (counted.probes, counted.listings) == (0, 0)

    # Another name is not known as of any change: the directory is listed again.
    assert (await filesystem.lookup(mixed.inode, b"theirs")).size == len(b"theirs")
    assert (counted.probes, counted.listings) == (0, 1)

    # Once the change is older than the TTL, S3 is asked again.
    await trio.sleep(TTL + 0.1)
    assert (await filesystem.lookup(mixed.inode, b"mine")).size == len(b"written here")
    assert counted.listings == 2
