"""The filesystem's decisions, without FUSE in the loop.

``Filesystem`` maps file operations onto the object store through the local
block cache: which paths exist (S3 listings and targeted probes, cached in the
inode table, plus files whose newest data is still only in the cache), what a
read returns (cached blocks, else ranged GETs that fill the cache, read ahead
while access is sequential), and where writes go (into the cache; ``close()``
makes them durable on local disk and returns; the write-back queue uploads them
a few seconds later; ``fsync`` uploads at once). It raises ``SsefsError``
subclasses carrying an errno; ``fs.py`` translates them for the kernel.

Concurrency: everything runs on the trio loop. A cache entry's lock is held by
each write and truncate and by an upload, so a write waits for an upload of
the same file in progress. A file is dirty while its entry's generation
differs from the one last uploaded; a dirty entry's size and time win over
what S3 says.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field, replace
from itertools import count

import pyfuse3
import trio

from .cache import BLOCK_SIZE, BlockCache, Entry
from .cachedfile import CachedFile, PlaintextBlocks
from .config import MAX_PART_SIZE, Config
from .dirattrs import SIDECAR_NAME, DirectoryAttributes
from .errors import NoSuchObject, NotEncrypted, ServerUnavailable, SsefsError, WrongKey, unwrap_group
from .inodes import ROOT_INODE, CachedListing, DirectoryEntry, InodeTable, Node, child_path
from .metadata import (
    USER_METADATA_LIMIT,
    FileAttributes,
    MetadataIndex,
    XattrSealer,
    from_metadata,
    metadata_size,
    to_metadata,
)
from .readahead import SequentialReader
from .store import ObjectInfo, ObjectStore
from .streaming import StreamedUploads
from .uploader import WriteBack, copy_object

log = logging.getLogger(__name__)

# Directories with at most this many entries (one LIST page) are listed again
# to answer lookups once their cached listing has expired.
RELIST_LIMIT = 1000
# Larger ones are probed name by name (one or two requests each) until the probes
# since the last listing outnumber the LIST pages a new listing takes; then
# it is listed again in the background, so ``rm -r``, ``stat`` of each file or a
# build that outlasts the TTL costs a few LIST pages per TTL, not two requests per name.
ENTRIES_PER_LIST_PAGE = 1000

# A bound on the memory spent remembering objects whose attributes cannot be read.
MAX_UNREADABLE_REMEMBERED = 100_000

# POSIX NAME_MAX; S3 keys are at most 1024 bytes.
NAME_MAX = 255
KEY_MAX = 1024


class FsError(SsefsError):
    """An ordinary filesystem answer (ENOENT, EEXIST, ...), not worth a warning."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(message or os.strerror(errno_value), errno_value=errno_value)


@dataclass(eq=False)
class ListingFetch:
    """One LIST of a directory that concurrent lookups wait for; a failure is theirs too."""

    done: trio.Event = field(default_factory=trio.Event)
    error: SsefsError | OSError | None = None


@dataclass
class OpenFile:
    """State shared by all handles open on one file."""

    node: Node
    handles: int = 0
    # Set once the file is unlinked while open: the detached cache entry holding its data.
    unlinked_entry: Entry | None = None


@dataclass
class Handle:
    open_file: OpenFile
    # Set for handles opened for writing: the cache entry their writes go to.
    entry: Entry | None = None
    reader: SequentialReader = field(default_factory=SequentialReader)


class Filesystem:
    """Paths and file handles on top of one bucket prefix."""

    def __init__(self, config: Config, store: ObjectStore, cache: BlockCache, xattr_sealer: XattrSealer) -> None:
        self.config = config
        self.xattr_sealer = xattr_sealer
        self.store = store
        self.cache = cache
        self.prefix = config.key_prefix
        self.inodes = InodeTable(ttl=config.mount.attr_timeout)
        self.metadata = MetadataIndex(cache.directory)
        self.directory_attributes = DirectoryAttributes(store)
        self.streams = StreamedUploads(store, config.s3, cache, self.cached_file)
        self.writeback = WriteBack(
            cache, store, config.s3, delay=config.cache.writeback_delay, cached_file=self.cached_file,
            on_uploaded=self._uploaded, on_upload_start=lambda entry: self.metadata.forget_now(entry.object_key),
            streams=self.streams,
        )
        # The CachedFile of each entry that is open; other entries get a fresh one per use.
        self._cached_files: dict[int, CachedFile] = {}
        # 40 MiB in all: more than a read-ahead window (32 blocks), so blocks fetched ahead are
        # still in memory when the reader gets to them, and the daemon stays under 200 MiB.
        self.plaintext_blocks = PlaintextBlocks(max_blocks=40)
        self._open_files: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = count(1)
        self.started_at = time.time()
        # Objects whose attributes a HEAD could not read (under another key, or without SSE-C), by
        # key, with the ETag seen: listings show them with the mount's defaults and do not ask again
        # until the object changes. In memory only: a key added to the config is tried at the next mount.
        self._attributes_unreadable: dict[str, str] = {}
        # Directory listings being fetched, so that concurrent lookups share one LIST.
        self._listing_fetches: dict[str, ListingFetch] = {}
        # Per directory too large to relist for a lookup: names probed since its last listing.
        self._probes_since_listing: dict[str, int] = {}
        # Where background work (read-ahead) runs; set by the mount while it serves.
        self.background: trio.Nursery | None = None

    def recover(self) -> None:
        """Queue what an earlier run left dirty in the cache (after a crash or a failed flush)."""
        dirty = self.cache.dirty_entries()
        if dirty and self.config.mount.read_only:
            log.warning(
                "the cache holds %d file(s) not yet uploaded (%d bytes); a read-only mount does not upload: "
                "mount read-write to upload them", len(dirty), sum(entry.size for entry in dirty),
            )
            return
        if dirty:
            log.warning(
                "recovered %d file(s) not yet uploaded from the cache (%d bytes): %s",
                len(dirty), sum(entry.size for entry in dirty),
                ", ".join(repr(entry.object_key) for entry in dirty[:10]) + (" ..." if len(dirty) > 10 else ""),
            )
        for parked in self.cache.parked_uploads():
            self.streams.resume(parked)
        for entry in dirty:
            self.writeback.schedule(entry, delay=0)

    def cached_file(self, entry: Entry) -> CachedFile:
        cached = self._cached_files.get(entry.id)
        if cached is None or cached.entry is not entry:
            cached = CachedFile(self.cache, entry, self._fetch_blocks, self.plaintext_blocks, self.background)
            if entry.open_writers or self._is_open(entry):
                # Kept while open: it holds the hot block and the read-ahead state.
                self._cached_files[entry.id] = cached
        return cached

    async def _fetch_blocks(self, object_key: str, offset: int, length: int) -> list[bytes]:
        return await self.store.get_pieces(object_key, offset, length, BLOCK_SIZE)

    def _is_open(self, entry: Entry) -> bool:
        node = self.inodes.by_path(entry.object_key[len(self.prefix):])
        return node is not None and node.inode in self._open_files

    def _uploaded(self, entry: Entry) -> None:
        """The write-back queue stored ``entry`` in S3: S3's view of it is current again."""
        path = entry.object_key[len(self.prefix):]
        node = self.inodes.by_path(path)
        self.metadata.put(entry.object_key, entry.base_etag, entry.attributes)
        if node is not None and not entry.dirty:
            node.has_local_data = False
            node.etag = entry.base_etag
            node.size = entry.size
            node.checked_at = time.monotonic()
        name = path.rsplit("/", 1)[-1]
        self.inodes.note_child(
            path.rsplit("/", 1)[0] if "/" in path else "",
            name, DirectoryEntry(name, False, entry.size, entry.mtime_ns, entry.base_etag, entry.attributes),
        )

    # ------------------------------------------------------------------ helpers

    def object_key(self, path: str) -> str:
        return self.prefix + path

    def directory_prefix(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        mount = self.config.mount
        return self.inodes.attributes(
            node, uid=mount.uid, gid=mount.gid, file_mode=mount.file_mode, dir_mode=mount.dir_mode
        )

    def _node(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _directory(self, inode: int) -> Node:
        node = self._node(inode)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def _check_writable_mount(self) -> None:
        if self.config.mount.read_only:
            raise FsError(errno.EROFS)

    def _valid_name(self, name: bytes, parent: Node) -> str:
        """Decode a name the kernel gave us, refusing what S3 cannot store faithfully."""
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise FsError(errno.EINVAL, "names must be UTF-8 to become S3 keys") from None
        if text == SIDECAR_NAME:
            raise FsError(errno.EINVAL, f"{SIDECAR_NAME} is reserved for directory attributes")
        # SeaweedFS turns a backslash into a path separator; refuse rather than corrupt.
        if "\\" in text:
            raise FsError(errno.EINVAL, "names with a backslash are not supported")
        if len(self.object_key(child_path(parent.path, text)).encode()) + 1 > KEY_MAX:
            raise FsError(errno.ENAMETOOLONG)
        return text

    # ------------------------------------------------------------------ lookups

    def _local_node(self, path: str) -> Node | None:
        """The node for ``path`` if the cache holds newer data for it than S3 does."""
        entry = self.cache.entry(self.object_key(path))
        if entry is None or not entry.dirty:
            return None
        node = self.inodes.node_for(path, is_dir=False)
        self.inodes.apply_attributes(node, entry.attributes)
        node.size, node.mtime_ns, node.has_local_data = entry.size, entry.mtime_ns, True
        return node

    def _apply(self, node: Node, listed: DirectoryEntry) -> None:
        """Take S3's word for a file, and drop cached blocks of an object that changed elsewhere."""
        if node.is_dir:
            self.inodes.update_from_entry(node, listed)
            return
        entry = self.cache.entry(self.object_key(node.path))
        if entry is not None and entry.dirty:
            return
        in_use = entry is not None and (entry.open_writers > 0 or entry.lock.locked())
        if entry is not None and listed.etag != entry.base_etag and not in_use:
            self.writeback.forget(entry)
            self.cache.drop_entry(entry)
        self.inodes.update_from_entry(node, listed)

    async def lookup(self, parent_inode: int, name_bytes: bytes) -> Node:
        parent = self._directory(parent_inode)
        try:
            name = self._valid_name(name_bytes, parent)
        except FsError as error:
            if error.errno == errno.EINVAL:
                raise FsError(errno.ENOENT) from None
            raise
        path = child_path(parent.path, name)
        local = self._local_node(path)
        if local is not None:
            return local
        listing = self.inodes.cached_listing(parent.path)
        if listing is not None:
            answered, listed = True, listing.entries.get(name)
        else:
            # A name changed through this mount lately is known without asking S3.
            answered, listed = self.inodes.recent_change(parent.path, name)
        if not answered and self._worth_relisting(parent.path):
            try:
                relisted = await self._refresh_listing(parent.path)
            except ServerUnavailable:
                relisted = None  # the probe below falls back to the last listing seen
            # A name missing from the new listing is probed below before it is called absent.
            if relisted is not None and name in relisted.entries:
                answered, listed = True, relisted.entries[name]
        if answered:
            if listed is None:
                raise FsError(errno.ENOENT, "absent from the listing" if listing is not None else "removed lately")
            if not listed.is_dir and listed.attributes is None:
                await self._fill_attributes(self.directory_prefix(parent.path), [listed])
            node = self.inodes.node_for(path, is_dir=listed.is_dir)
            self._apply(node, listed)
            return node
        self._note_probe(parent.path)
        try:
            found, is_dir = await self.store.probe(self.object_key(path))
        except ServerUnavailable:
            # During an outage, the last listing seen answers, so work can go on in the cache;
            # without one, a node already looked up stands (never a guess that a name is absent).
            last = self.inodes.last_listing(parent.path)
            if last is None:
                known = self.inodes.by_path(path)
                if known is not None:
                    return known
                raise
            listed = last.entries.get(name)
            if listed is None:
                raise FsError(errno.ENOENT, "absent from the last listing (server unavailable)") from None
            node = self.inodes.node_for(path, is_dir=listed.is_dir)
            self.inodes.update_from_entry(node, listed)
            return node
        if is_dir:
            node = self.inodes.node_for(path, is_dir=True)
            stored = await self._stored_directory_attributes(parent.path, name)
            if stored is not None:
                self.inodes.apply_attributes(node, stored)
            return node
        if found is None:
            raise FsError(errno.ENOENT, "neither an object nor a prefix (probed)")
        node = self.inodes.node_for(path, is_dir=False)
        listed = DirectoryEntry(name, False, found.size, _nanoseconds(found.mtime), found.etag)
        await self._fill_attributes(self.directory_prefix(parent.path), [listed])
        self._apply(node, listed)
        return node

    async def getattr(self, inode: int) -> Node:
        node = self._node(inode)
        open_file = self._open_files.get(inode)
        if node.is_dir or (open_file is not None and open_file.unlinked_entry is not None):
            return node  # an unlinked open file is known only here
        if self._local_node(node.path) is not None or self.inodes.is_fresh(node):
            return node
        listing = self.inodes.cached_listing(node.parent_path)
        if listing is None and self._worth_relisting(node.parent_path):
            try:
                listing = await self._refresh_listing(node.parent_path)
            except ServerUnavailable:
                return node
        listed = listing.entries.get(node.name) if listing is not None else None
        if listed is not None and listed.attributes is None:
            await self._fill_attributes(self.directory_prefix(node.parent_path), [listed])
        if listed is None:
            self._note_probe(node.parent_path)
            try:
                found = await self.store.first_object_with_prefix(self.object_key(node.path))
            except ServerUnavailable:
                return node  # during an outage, known files keep their last known attributes
            if found is None or found.key != self.object_key(node.path):
                raise FsError(errno.ENOENT)
            listed = DirectoryEntry(node.name, False, found.size, _nanoseconds(found.mtime), found.etag)
            await self._fill_attributes(self.directory_prefix(node.parent_path), [listed])
        self._apply(node, listed)
        return node

    async def list_directory(self, inode: int) -> list[tuple[str, Node]]:
        """A snapshot of a directory's children, sorted by name."""
        directory = self._directory(inode)
        listing = self.inodes.cached_listing(directory.path)
        refreshed = listing is None
        listing = listing or await self._refresh_listing(directory.path)
        entries = listing.entries
        await self._fill_attributes(
            self.directory_prefix(directory.path),
            [listed for listed in entries.values() if not listed.is_dir and listed.attributes is None],
        )
        if refreshed:
            listing.fetched_at = time.monotonic()  # trusted from when its attributes were complete
        children: dict[str, Node] = {}
        for name, listed in entries.items():
            node = self.inodes.node_for(child_path(directory.path, name), is_dir=listed.is_dir)
            self._apply(node, listed)
            children[name] = node
        # Files whose newest data is only in the cache (not uploaded yet) show as the cache has them.
        prefix = self.directory_prefix(directory.path)
        for entry in self.cache.dirty_entries():
            name = entry.object_key[len(prefix):]
            if entry.object_key.startswith(prefix) and _showable(name):
                local = self._local_node(child_path(directory.path, name))
                if local is not None:
                    children[name] = local
        return sorted(children.items())

    async def _stored_directory_attributes(self, parent_path: str, name: str) -> FileAttributes | None:
        """The stored attributes of one subdirectory, without listing its parent."""
        prefix = self.directory_prefix(parent_path)
        sidecar = await self.store.first_object_with_prefix(prefix + SIDECAR_NAME)
        etag = sidecar.etag if sidecar is not None and sidecar.key == prefix + SIDECAR_NAME else None
        return (await self.directory_attributes.load(prefix, etag)).get(name)

    def _worth_relisting(self, path: str) -> bool:
        """Whether to answer a lookup in ``path`` by listing it again rather than probing one name.

        For a directory that fitted in one listing page, one LIST answers every
        lookup that follows (``ls -l``, ``stat`` of each file, a build) for
        ``attr_timeout``; probing costs two requests per name.
        """
        last = self.inodes.last_listing(path)
        return last is not None and len(last.entries) <= RELIST_LIMIT

    def _note_probe(self, path: str) -> None:
        """A name in ``path`` is about to be probed: once the probes since its last listing
        outnumber the pages of a new one, list it again in the background."""
        last = self.inodes.last_listing(path)
        if last is None or self.background is None or path in self._listing_fetches:
            return  # never listed (its size is unknown), or a listing is on its way
        probes = self._probes_since_listing.get(path, 0) + 1
        if probes < -(-len(last.entries) // ENTRIES_PER_LIST_PAGE):
            self._probes_since_listing[path] = probes
            return
        self._probes_since_listing.pop(path, None)
        self.background.start_soon(self._refresh_listing_quietly, path)

    async def _refresh_listing_quietly(self, path: str) -> None:
        try:
            await self._refresh_listing(path)
        except (SsefsError, OSError) as error:
            log.debug("listing %r again in the background failed: %s", path, error)
        except Exception:  # noqa: BLE001 - a task of the mount's nursery: raised, it would stop the mount
            log.exception("listing %r again in the background failed", path)

    async def _refresh_listing(self, path: str) -> CachedListing:
        """A fresh listing of ``path``; concurrent callers share one fetch."""
        # A loop: waiters woken together must not each start a fetch of their own.
        while (pending := self._listing_fetches.get(path)) is not None:
            await pending.done.wait()
            if pending.error is not None:
                # In an outage every waiter would otherwise try again in turn, each for a full timeout.
                raise pending.error
            listing = self.inodes.cached_listing(path)
            if listing is not None:
                return listing
        fetch = self._listing_fetches[path] = ListingFetch()
        self._probes_since_listing.pop(path, None)
        self.inodes.begin_fetch(path)
        try:
            self.inodes.store_listing(path, await self._fetch_listing(path))
        except (SsefsError, OSError) as error:
            fetch.error = error
            raise
        finally:
            self.inodes.end_fetch(path)
            del self._listing_fetches[path]
            fetch.done.set()
        listing = self.inodes.last_listing(path)
        assert listing is not None
        return listing

    async def _fetch_listing(self, path: str) -> dict[str, DirectoryEntry]:
        listing = await self.store.list_children(self.directory_prefix(path))
        entries: dict[str, DirectoryEntry] = {}
        for info in listing.objects:
            name = info.key[len(self.directory_prefix(path)):]
            if _showable(name):
                entries[name] = DirectoryEntry(name, False, info.size, _nanoseconds(info.mtime), info.etag)
        sidecar_key = self.directory_prefix(path) + SIDECAR_NAME
        sidecar = next((info for info in listing.objects if info.key == sidecar_key), None)
        directories = await self.directory_attributes.load(
            self.directory_prefix(path), sidecar.etag if sidecar is not None else None
        )
        for name in listing.prefixes:
            # A name that is both an object and a prefix shows as the directory.
            # S3 keeps no time for a prefix: directories show the mount's start time
            # unless their attributes were stored.
            if _showable(name):
                entries[name] = DirectoryEntry(
                    name, True, mtime_ns=_nanoseconds(self.started_at), attributes=directories.get(name)
                )
        return entries

    async def _fill_attributes(self, prefix: str, files: list[DirectoryEntry]) -> None:
        """Give listed files their stored mode, owner and time: from the metadata index while the
        ETag is the one it knows, else by keyed HEADs, many at once."""
        missing = []
        for listed in files:
            known = self.metadata.get(prefix + listed.name, listed.etag, listed.mtime_ns / 1e9)
            if known is not None:
                listed.attributes = known
            elif self._attributes_unreadable.get(prefix + listed.name) != listed.etag:
                missing.append(listed)
        if not missing:
            return
        learned: list[tuple[str, str, FileAttributes, float]] = []
        answers = await self.store.head_many([prefix + listed.name for listed in missing])
        for listed in missing:
            answer = answers[prefix + listed.name]
            if isinstance(answer, (WrongKey, NotEncrypted)):
                # It lists with the mount's defaults; reading it reports the problem (once, in fs.py).
                log.debug("no attributes for %r: %s", prefix + listed.name, answer)
                if len(self._attributes_unreadable) >= MAX_UNREADABLE_REMEMBERED:
                    self._attributes_unreadable.clear()
                self._attributes_unreadable[prefix + listed.name] = listed.etag
            elif isinstance(answer, SsefsError):
                log.debug("no attributes for %r: %s", prefix + listed.name, answer)
            else:
                listed.attributes = from_metadata(answer.metadata)
                if answer.settled:
                    learned.append((prefix + listed.name, answer.etag, listed.attributes, answer.mtime))
        self.metadata.put_many(learned)

    # ------------------------------------------------------------------ open files

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def _entry_for(self, node: Node) -> Entry:
        """The cache entry of a file, created from what S3 last told us if there is none."""
        object_key = self.object_key(node.path)
        entry = self.cache.entry(object_key)
        if entry is None:
            entry = self.cache.create_entry(
                object_key, base_etag=node.etag, base_size=node.size, mtime_ns=node.mtime_ns,
                exists_in_s3=bool(node.etag), attributes=self.inodes.attributes_of(node),
            )
        return entry

    def _attach(self, node: Node, *, writable: bool) -> int:
        open_file = self._open_files.get(node.inode)
        if open_file is None:
            open_file = self._open_files[node.inode] = OpenFile(node)
        open_file.handles += 1
        node.open_count += 1
        entry = None
        if writable:
            entry = self._entry_for(node)
            entry.open_writers += 1
        fh = next(self._next_fh)
        self._handles[fh] = Handle(open_file, entry)
        return fh

    async def open(self, inode: int, flags: int) -> tuple[int, bool]:
        """A handle, and whether the kernel may keep the pages it cached for this file.

        It may unless another client changed the object since (our own writes
        go through the kernel's cache, so they never make it stale).
        """
        node = self._node(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._check_writable_mount()
        fh = self._attach(node, writable=writable)
        if writable and flags & os.O_TRUNC:
            entry = self._handles[fh].entry
            assert entry is not None
            await self._truncate_entry(node, entry, 0)
        keep_cache = not node.page_cache_stale
        node.page_cache_stale = False
        return fh, keep_cache

    async def create(
        self, parent_inode: int, name_bytes: bytes, *, mode: int, uid: int, gid: int
    ) -> tuple[int, Node]:
        """A new, empty, open file owned by the creator, with the mode it asked for."""
        self._check_writable_mount()
        parent = self._directory(parent_inode)
        name = self._valid_name(name_bytes, parent)
        path = child_path(parent.path, name)
        existing = self.inodes.by_path(path)
        if existing is not None and existing.is_dir:
            raise FsError(errno.EISDIR)
        object_key = self.object_key(path)
        node = self.inodes.node_for(path, is_dir=False)
        node.size, node.etag, node.mtime_ns = 0, "", time.time_ns()
        node.mode, node.uid, node.gid = stat.S_IFREG | (mode & 0o7777), uid, gid
        # A new file replaces whatever the cache held for this name; S3's copy (if any)
        # is overwritten by the upload.
        entry = self.cache.create_entry(
            object_key, base_etag="", base_size=0, mtime_ns=node.mtime_ns, exists_in_s3=False,
            attributes=self.inodes.attributes_of(node),
        )
        self.cache.record_change(entry, size=0)
        fh = self._attach(node, writable=True)
        node.has_local_data = True
        self.inodes.note_child(parent.path, name, self.inodes.directory_entry(node))
        return fh, node

    async def symlink(self, parent_inode: int, name_bytes: bytes, target: bytes, *, uid: int, gid: int) -> Node:
        """A symbolic link, as s3fs-fuse stores one: an object whose (encrypted) body is the
        target and whose mode says S_IFLNK. Written to S3 at once: it is tiny."""
        self._check_writable_mount()
        parent = self._directory(parent_inode)
        name = self._valid_name(name_bytes, parent)
        path = child_path(parent.path, name)
        try:
            await self.lookup(parent_inode, name_bytes)
        except FsError as error:
            if error.errno != errno.ENOENT:
                raise
        else:
            raise FsError(errno.EEXIST)
        object_key = self.object_key(path)
        attributes = FileAttributes(stat.S_IFLNK | 0o777, uid, gid, time.time_ns())
        etag = await self.store.put(object_key, target, to_metadata(attributes))
        self.metadata.put(object_key, etag, attributes)
        node = self.inodes.node_for(path, is_dir=False)
        node.size, node.etag, node.symlink_target = len(target), etag, target
        self.inodes.apply_attributes(node, attributes)
        node.checked_at = time.monotonic()
        self.inodes.note_child(parent.path, name, self.inodes.directory_entry(node))
        return node

    async def readlink(self, inode: int) -> bytes:
        node = await self.getattr(inode)
        if not self.inodes.is_symlink(node):
            raise FsError(errno.EINVAL)
        if node.symlink_target is None or len(node.symlink_target) != node.size:
            node.symlink_target = await self.store.get_range(self.object_key(node.path), 0, node.size)
        return node.symlink_target

    async def change_attributes(
        self, inode: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> Node:
        """chmod, chown, utimens: stored in the object's metadata.

        A file with changes not yet uploaded takes them along with its upload; a
        file as it is in S3 gets them by a server-side copy onto itself (no
        data through this machine). Directories keep them for this mount only:
        S3 has no object to hold them (and SeaweedFS drops a marker's metadata).
        """
        self._check_writable_mount()
        node = await self.getattr(inode)
        current = self.inodes.attributes_of(node)
        if mode is not None:
            kind = stat.S_IFDIR if node.is_dir else stat.S_IFLNK if self.inodes.is_symlink(node) else stat.S_IFREG
            mode = kind | (mode & 0o7777)
        wanted = current.with_changes(mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns)
        await self._store_attributes(node, current, wanted)
        return node

    async def _store_attributes(self, node: Node, current: FileAttributes, wanted: FileAttributes) -> None:
        if wanted == current or node.inode == ROOT_INODE:
            self.inodes.apply_attributes(node, wanted)  # the root has no parent to keep them in
            return
        if node.is_dir:
            await self.directory_attributes.set(self.directory_prefix(node.parent_path), node.name, wanted)
            self.inodes.apply_attributes(node, wanted)
            self.inodes.note_child(node.parent_path, node.name, self.inodes.directory_entry(node))
            return
        object_key = self.object_key(node.path)
        entry = self.cache.entry(object_key)
        if entry is not None and wanted.xattrs != current.xattrs and self.streams.has_parked(entry):
            await self._finish_parked_upload(entry)  # its extended attributes were fixed when it was created
        if entry is not None and (entry.dirty or not node.etag):
            async with entry.lock:
                self.cache.change_attributes(entry, wanted)
            # Durable with the next sync (close, fsync, the upload's start), not an fsync of its own:
            # a power cut may lose a chmod or utime not yet synced, as on a local filesystem, where
            # tar -x paid three fsyncs per file for them (a process crash loses nothing: committed).
            if not entry.open_writers:
                self.writeback.schedule(entry)
        else:
            # A self-copy keeps the bytes and so, where the ETag is their MD5, the ETag.
            self.metadata.forget_now(object_key)
            etag = await self.store.copy(object_key, object_key, to_metadata(wanted))
            self.metadata.put(object_key, etag, wanted)
            node.etag = etag
            if entry is not None:
                entry.set_attributes(wanted)
                entry.base_etag = etag
                self.cache.save(entry)
        self.inodes.apply_attributes(node, wanted)
        self.inodes.note_child(node.parent_path, node.name, self.inodes.directory_entry(node))

    # ------------------------------------------------------------------ extended attributes

    async def _xattrs(self, inode: int) -> tuple[Node, dict[bytes, bytes]]:
        node = await self.getattr(inode)
        try:
            return node, self.xattr_sealer.open(node.xattrs)
        except ValueError as error:
            # Not an FsError: a damaged object is a problem worth a warning (fs.py logs it once a minute).
            raise SsefsError(f"{node.path!r}: {error}", errno_value=errno.EIO) from None

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        if not name.startswith(b"user."):
            # Only user.* are ever stored: other namespaces (ACLs, SELinux labels) are not
            # supported on this filesystem. ENOTSUP rather than ENODATA, because `ls -l` then
            # stops asking every file for its ACL and label (it remembers, per device, the
            # answer "unsupported"): two FUSE round trips less per file.
            raise FsError(errno.ENOTSUP)
        _node, xattrs = await self._xattrs(inode)
        if name not in xattrs:
            raise FsError(errno.ENODATA)
        return xattrs[name]

    async def listxattr(self, inode: int) -> list[bytes]:
        return sorted((await self._xattrs(inode))[1])

    async def setxattr(self, inode: int, name: bytes, value: bytes) -> None:
        """Only ``user.*`` (what S3 metadata can carry for any user); sealed, within S3's 2 KiB."""
        self._check_writable_mount()
        if not name.startswith(b"user.") or len(name) <= len(b"user."):
            raise FsError(errno.ENOTSUP)
        node, xattrs = await self._xattrs(inode)
        await self._store_xattrs(node, {**xattrs, name: value})

    async def removexattr(self, inode: int, name: bytes) -> None:
        self._check_writable_mount()
        node, xattrs = await self._xattrs(inode)
        if name not in xattrs:
            raise FsError(errno.ENODATA)
        del xattrs[name]
        await self._store_xattrs(node, xattrs)

    async def _store_xattrs(self, node: Node, xattrs: dict[bytes, bytes]) -> None:
        current = self.inodes.attributes_of(node)
        wanted = replace(current, xattrs=self.xattr_sealer.seal(xattrs))
        if metadata_size(to_metadata(wanted)) > USER_METADATA_LIMIT:
            raise FsError(errno.E2BIG, "S3 keeps at most 2 KiB of metadata per object")
        await self._store_attributes(node, current, wanted)

    async def _truncate_entry(self, node: Node, entry: Entry, size: int, *, seal: bool = False) -> None:
        """Truncate under the entry lock; ``seal`` makes it durable at once (no handle will close it)."""
        if self.streams.must_finish_before_change(entry, size):
            await self._finish_parked_upload(entry)
        await self.cache.ensure_space(2 * BLOCK_SIZE, self.writeback.make_room)
        async with entry.lock:
            cached_file = self.cached_file(entry)
            self.streams.before_change(entry, size)
            await cached_file.truncate(size)
            if seal:
                await cached_file.seal_hot()
                await self.cache.sync(entry)
        node.size, node.mtime_ns, node.has_local_data = entry.size, entry.mtime_ns, True

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        node = handle.open_file.node
        entry = handle.entry or handle.open_file.unlinked_entry or self.cache.entry(self.object_key(node.path))
        if entry is None:
            if node.size == 0 and not node.etag:
                return b""
            entry = self._entry_for(node)
        if offset < entry.parked_bytes:
            await self._finish_parked_upload(entry)
        blocks_ahead = handle.reader.blocks_ahead(offset, size)
        cached_file = self.cached_file(entry)
        if blocks_ahead > 1 and self.background is not None:
            cached_file.prefetch(offset // BLOCK_SIZE, blocks_ahead, self.background)
        return await cached_file.read(offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        entry = handle.entry
        if entry is None:
            raise FsError(errno.EBADF)
        if self.streams.must_finish_before_change(entry, offset, offset + len(data)):
            await self._finish_parked_upload(entry)
        # Wait for room (backpressure) before taking the lock an upload needs.
        await self.cache.ensure_space(len(data) + 2 * BLOCK_SIZE, self.writeback.make_room)
        async with entry.lock:
            self.streams.before_change(entry, offset)
            written = await self.cached_file(entry).write(offset, data)
            self.streams.after_write(entry, offset + written)
        node = handle.open_file.node
        node.size, node.mtime_ns, node.has_local_data = entry.size, entry.mtime_ns, True
        return written

    async def _finish_parked_upload(self, entry: Entry) -> None:
        """Complete the upload holding the entry's parked parts (S3 serves no bytes of an unfinished
        upload, and abandoning it would lose them): from then on the file is based on that object."""
        log.debug("finishing the upload of %r first: its first %d bytes are only in its parts", entry.object_key,
                  entry.parked_bytes)
        await self.writeback.upload(entry)

    async def flush(self, fh: int) -> None:
        """close(): commit this file's changes to the cache (not yet in S3), fsynced in the background.

        Like a local filesystem's close, and unlike ``fsync``, it does not wait for the disk (unless
        ``[cache] fsync_on_close``): a killed daemon loses nothing closed, a power cut at most what
        was closed in the last 20 ms or so (``cache.DURABILITY_DELAY_SECONDS``).
        """
        entry = self._handle(fh).entry
        if entry is not None and entry.dirty and self.cache.is_live(entry):
            async with entry.lock:
                await self.cached_file(entry).seal_hot()
                await self.cache.sync(entry, wait=self.config.cache.fsync_on_close)

    async def fsync(self, fh: int) -> None:
        """fsync(): return only when the file's current data is durable in S3."""
        handle = self._handle(fh)
        if handle.open_file.unlinked_entry is not None:
            return  # nothing to make durable: the file has no name any more
        entry = handle.entry or self.cache.entry(self.object_key(handle.open_file.node.path))
        if entry is not None and entry.dirty and self.cache.is_live(entry):
            await self.writeback.upload(entry)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        open_file = handle.open_file
        open_file.handles -= 1
        node = open_file.node
        node.open_count -= 1
        entry = handle.entry
        if entry is not None:
            entry.open_writers -= 1
            if entry.open_writers == 0:
                self.streams.closed(entry)
            if entry.open_writers == 0 and self.cache.is_live(entry) and not entry.unlinked:
                if entry.dirty:
                    async with entry.lock:
                        await self.cached_file(entry).seal_hot()
                        await self.cache.sync(entry, wait=self.config.cache.fsync_on_close)
                    self.writeback.schedule(entry)
        # Another handle may have been opened and released while this release
        # waited for the sync above: then that release has done the tear-down.
        if open_file.handles == 0 and self._open_files.get(node.inode) is open_file:
            del self._open_files[node.inode]
            self.inodes.drop_if_unused(node)
            if open_file.unlinked_entry is not None:
                # The last handle of a file unlinked while open: its data goes now.
                self._cached_files.pop(open_file.unlinked_entry.id, None)
                async with open_file.unlinked_entry.lock:
                    self.cache.drop_entry(open_file.unlinked_entry)
                return
            closed = self.cache.entry(self.object_key(node.path))
            if closed is not None and closed.open_writers == 0:
                self._cached_files.pop(closed.id, None)
                self.cache.drop_if_empty(closed)

    # ------------------------------------------------------------------ changes

    async def truncate(self, inode: int, size: int, fh: int | None) -> None:
        self._check_writable_mount()
        node = self._node(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if size > MAX_PART_SIZE * 10_000:
            raise FsError(errno.EFBIG)
        handle = self._handles.get(fh) if fh is not None else None
        open_file = self._open_files.get(inode)
        entry = (handle.entry if handle is not None else None) \
            or (open_file.unlinked_entry if open_file is not None else None) or self._entry_for(node)
        if entry.unlinked:
            await self._truncate_entry(node, entry, size)
            return
        unopened = entry.open_writers == 0
        entry.open_writers += 1  # in use: waiting for cache space must not let it be forgotten
        try:
            await self._truncate_entry(node, entry, size, seal=unopened)
        finally:
            entry.open_writers -= 1
        if unopened:
            self.writeback.schedule(entry)

    async def mkdir(self, parent_inode: int, name_bytes: bytes, *, mode: int, uid: int, gid: int) -> Node:
        self._check_writable_mount()
        parent = self._directory(parent_inode)
        name = self._valid_name(name_bytes, parent)
        path = child_path(parent.path, name)
        await self.store.put_directory_marker(self.directory_prefix(path))
        node = self.inodes.node_for(path, is_dir=True)
        attributes = FileAttributes(stat.S_IFDIR | (mode & 0o7777), uid, gid, time.time_ns())
        mount = self.config.mount
        if (mode & 0o7777, uid, gid) != (mount.dir_mode, mount.uid, mount.gid):
            await self.directory_attributes.set(self.directory_prefix(parent.path), name, attributes)
        self.inodes.apply_attributes(node, attributes)
        self.inodes.note_child(parent.path, name, self.inodes.directory_entry(node))
        # A new directory is empty: lookups in it need not ask S3 (tar, cp -r, git checkout).
        self.inodes.store_listing(path, {})
        return node

    async def rmdir(self, parent_inode: int, name_bytes: bytes) -> None:
        self._check_writable_mount()
        node = await self._existing_child(parent_inode, name_bytes)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        prefix = self.directory_prefix(node.path)
        # The deletes of its files land first, so the directory does not outlive them in S3.
        await self.store.flush_deletes_before_removing(prefix)
        # Asked before the listing too: an upload that lands while the listing is on its way turns
        # its file clean, and the listing may still not show it.
        if self._has_unuploaded_under(prefix):
            raise FsError(errno.ENOTEMPTY)
        remaining = [key for key in await self.store.keys_with_prefix(prefix, 3)
                     if key not in (prefix, prefix + SIDECAR_NAME)]
        if remaining or self._has_unuploaded_under(prefix):
            raise FsError(errno.ENOTEMPTY)
        await self._keep_directory(node.parent_path)
        for key in (prefix + SIDECAR_NAME, prefix):
            try:
                await self.store.delete(key)
            except NoSuchObject:
                pass
        await self.directory_attributes.set(self.directory_prefix(node.parent_path), node.name, None)
        self.inodes.invalidate_listing(node.path)
        self.inodes.remove_path(node.path)

    async def _keep_directory(self, path: str) -> None:
        """A subdirectory is about to leave the directory ``path``: it must not vanish with its last child
        (files leave through the delete queue, which sees to it: ``store.delete_many``)."""
        if path:  # the mount's root needs no marker
            await self.store.keep_directory(self.directory_prefix(path))

    def _has_unuploaded_under(self, prefix: str) -> bool:
        """Whether the cache holds a file under ``prefix`` with changes not uploaded yet."""
        return any(entry.object_key.startswith(prefix) for entry in self.cache.dirty_entries())

    async def _discard_entry(self, object_key: str) -> None:
        """Forget what the cache holds for ``object_key``, after any upload of it in progress."""
        entry = self.cache.entry(object_key)
        if entry is None:
            return
        async with entry.lock:
            self.writeback.forget(entry)
            self.streams.abandon(entry, "deleted or replaced")
            if self.cache.is_live(entry):
                self.cache.drop_entry(entry)
        self._cached_files.pop(entry.id, None)

    async def _existing_child(self, parent_inode: int, name_bytes: bytes) -> Node:
        """The node the kernel just looked up (it does so before unlink, rmdir and rename),
        without asking S3 again while what we know of it is fresh."""
        parent = self._directory(parent_inode)
        try:
            path = child_path(parent.path, name_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            raise FsError(errno.ENOENT) from None
        known = self.inodes.by_path(path)
        if known is not None and (known.has_local_data or self.inodes.is_fresh(known)):
            return known
        return await self.lookup(parent_inode, name_bytes)

    async def unlink(self, parent_inode: int, name_bytes: bytes) -> None:
        self._check_writable_mount()
        node = await self._existing_child(parent_inode, name_bytes)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        open_file = self._open_files.get(node.inode)
        object_key = self.object_key(node.path)
        if open_file is not None and open_file.unlinked_entry is None:
            # Still open: its handles keep reading and writing the data, which must
            # first all be local (the object goes now) and is never uploaded again.
            entry = self.cache.entry(object_key) or self._entry_for(node)
            if entry.size + 2 * BLOCK_SIZE > self.cache.max_size:
                # It could never all be local: waiting for room would wait forever.
                log.warning("cannot delete %r while it is open: its %d bytes do not fit in the cache (max_size %d); "
                            "close it first, or give the cache more room", object_key, entry.size,
                            self.cache.max_size)
                raise FsError(errno.EBUSY, "an open file larger than the cache cannot be deleted")
            if entry.parked_bytes:
                await self._finish_parked_upload(entry)  # every byte must be local: those are only in S3
            await self.cache.ensure_space(entry.size + 2 * BLOCK_SIZE, self.writeback.make_room)
            async with entry.lock:
                self.writeback.forget(entry)
                self.streams.abandon(entry, "unlinked")
                await self.cached_file(entry).make_local()
                self.cache.unlink_entry(entry)
            open_file.unlinked_entry = entry
        else:
            await self._discard_entry(object_key)
        # Journaled here, sent in a batch a moment later (deletes.py): rm -r costs no round trip per file.
        self.store.delete_later(object_key)
        self.metadata.forget(self.object_key(node.path))
        self.inodes.remove_path(node.path)

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable_mount()
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise FsError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
        node = await self._existing_child(old_parent, old_name)
        target_parent = self._directory(new_parent)
        target_name = self._valid_name(new_name, target_parent)
        target_path = child_path(target_parent.path, target_name)
        if target_path == node.path:
            return
        try:
            target = await self.lookup(new_parent, new_name)
        except FsError as error:
            if error.errno != errno.ENOENT:
                raise
            target = None
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if target.is_dir and not node.is_dir:
                raise FsError(errno.EISDIR)
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
        if node.is_dir:
            if (target_path + "/").startswith(node.path + "/"):
                raise FsError(errno.EINVAL)  # into itself
            if node.parent_path != target_parent.path:
                await self._keep_directory(node.parent_path)
            await self._rename_directory(node, target_path, replacing=target)
            return
        old_key, new_key = self.object_key(node.path), self.object_key(target_path)
        entry = self.cache.entry(old_key)
        renamed_in_cache = False
        if entry is not None and entry.dirty and self.streams.streaming(entry) and (
                not entry.open_writers or self.streams.has_parked(entry)):
            # Written and closed while its parts were being sent (rsync's temporary file): finishing
            # that upload and copying it server-side beats abandoning the parts and sending them again.
            # Still open, but with parts parked: those bytes are only in the upload, which must finish.
            await self.writeback.upload(entry)
        if entry is not None and entry.dirty:
            # Upload under the new name (unchanged ranges still come from the old
            # object), then delete the old one: at no point is the data only in flight.
            await self._discard_entry(new_key)
            async with entry.lock:
                # An upload under the old name may have run while we waited for the
                # lock: then the data is in S3 there, and a copy moves it.
                if entry.dirty and self.cache.is_live(entry):
                    self.streams.abandon(entry, "renamed")
                    self.cache.rename_entry(entry, new_key)
                    renamed_in_cache = True
        if renamed_in_cache:
            assert entry is not None
            self.inodes.move(node, target_path)
            await self.writeback.upload(entry)
        else:
            # The target's cache entry goes first: an upload of its old content that is
            # in flight must land before the copy, or it would overwrite the renamed data.
            await self._discard_entry(new_key)
            attributes = self.inodes.attributes_of(node)
            source = ObjectInfo(old_key, node.size, node.etag, node.mtime_ns / 1e9)
            etag = await copy_object(self.store, self.config.s3, source, new_key, to_metadata(attributes))
            if entry is not None and entry.open_writers and self.cache.is_live(entry):
                # Still open for writing (a log renamed under its writer): the entry follows the name, now
                # based on the copy, so what the writer adds is uploaded there.
                async with entry.lock:
                    self.cache.rename_entry(entry, new_key)
                    entry.base_key, entry.base_etag = new_key, etag
                    self.cache.save(entry)
            else:
                await self._discard_entry(old_key)
            self.metadata.put(new_key, etag, attributes)
            node.etag = etag
            self.inodes.move(node, target_path)
        self.store.delete_later(old_key)  # journaled: the old name reads as absent from now on
        self.metadata.forget(old_key)

    async def _rename_directory(self, node: Node, target_path: str, *, replacing: Node | None) -> None:
        """Move every object under the directory, in an order that loses nothing if cut short.

        S3 has no rename: each object is copied server-side to its new key
        (several at once), files with changes not yet uploaded are uploaded
        under their new names, and only when all of that is done are the old
        keys deleted. Interrupted, both trees may exist, never neither; running
        the same ``mv`` again finishes the job. Not atomic: another client may
        see the directory half moved.
        """
        old_prefix, new_prefix = self.directory_prefix(node.path), self.directory_prefix(target_path)
        if replacing is not None:
            # Before the listing too, as in rmdir: an upload landing meanwhile may be in neither.
            if self._has_unuploaded_under(new_prefix):
                raise FsError(errno.ENOTEMPTY)
            left = [key for key in await self.store.keys_with_prefix(new_prefix, 2) if key != new_prefix]
            if left or self._has_unuploaded_under(new_prefix):
                raise FsError(errno.ENOTEMPTY)
        for entry in self.cache.dirty_entries():
            if entry.object_key.startswith(old_prefix) and self.streams.has_parked(entry):
                # Its first bytes are only in its unfinished upload, under the old name: complete it, then
                # it is copied like any other object.
                await self._finish_parked_upload(entry)
        objects = await self.store.list_tree(old_prefix)
        dirty = {
            entry.object_key: entry for entry in self.cache.entries()
            if entry.object_key.startswith(old_prefix) and entry.dirty
        }
        copied: list[tuple[str, str, str, FileAttributes]] = []
        limiter = trio.CapacityLimiter(max(1, self.config.s3.max_connections // 2))

        def new_key_of(old_key: str) -> str:
            return new_prefix + old_key[len(old_prefix):]

        async def copy_one(info: ObjectInfo) -> None:
            new_key = new_key_of(info.key)
            async with limiter:
                if info.key.endswith("/"):
                    await self.store.put_directory_marker(new_key)
                    copied.append((info.key, new_key, "", FileAttributes()))
                    return
                attributes = self.metadata.get(info.key, info.etag, info.mtime)
                if attributes is None:
                    attributes = from_metadata((await self.store.head(info.key)).metadata)
                etag = await copy_object(self.store, self.config.s3, info, new_key, to_metadata(attributes))
                copied.append((info.key, new_key, etag, attributes))

        async def copy_all(infos: list[ObjectInfo]) -> None:
            try:
                async with trio.open_nursery() as nursery:
                    for info in infos:
                        nursery.start_soon(copy_one, info)
            except BaseExceptionGroup as group:
                raise unwrap_group(group) from None

        await copy_all([info for info in objects if info.key not in dirty])
        if not any(info.key == old_prefix for info in objects):
            await self.store.put_directory_marker(new_prefix)  # the directory itself, even if empty
        # Dirty files upload under their new names (reading unchanged ranges from the old keys).
        # Whether a file is dirty is decided again under its lock: an upload in flight holds it,
        # and a file it made clean is in S3 under its old name, to be copied like the others.
        to_upload: list[Entry] = []
        uploaded_meanwhile: list[ObjectInfo] = []
        for old_key, entry in dirty.items():
            await self._discard_entry(new_key_of(old_key))
            async with entry.lock:
                if entry.dirty and self.cache.is_live(entry) and entry.object_key == old_key:
                    self.cache.rename_entry(entry, new_key_of(old_key))
                    to_upload.append(entry)
                    continue
            if self.cache.is_live(entry) and entry.object_key == old_key:
                uploaded_meanwhile.append(await self.store.head(old_key))
        await copy_all(uploaded_meanwhile)
        objects += uploaded_meanwhile
        # Clean cache entries follow their objects to the copies; one written to since the
        # listing is dirty now and uploads under its new name like those above.
        for old_key, new_key, etag, attributes in copied:
            if etag:
                self.metadata.put(new_key, etag, attributes)
            following = self.cache.entry(old_key)
            if following is None:
                continue
            await self._discard_entry(new_key)
            async with following.lock:
                if not self.cache.is_live(following) or following.object_key != old_key:
                    continue
                self.cache.rename_entry(following, new_key)
                if following.dirty:
                    to_upload.append(following)
                else:
                    following.base_key, following.base_etag = new_key, etag
                    self.cache.save(following)
        attributes = self.inodes.attributes_of(node)
        old_parent, old_name = node.parent_path, node.name
        self.inodes.move_tree(node, target_path)
        if attributes.mode is not None or attributes.uid is not None or attributes.xattrs:
            await self.directory_attributes.set(self.directory_prefix(node.parent_path), node.name, attributes)
        await self.directory_attributes.set(self.directory_prefix(old_parent), old_name, None)
        for entry in to_upload:
            await self.writeback.upload(entry)
        # Everything is under the new name: now the old keys may go, in batches of up to 1,000.
        for info in objects:
            if not info.key.endswith("/"):
                self.store.delete_later(info.key)
                self.metadata.forget(info.key)
        await self.store.flush_deletes_before_removing(old_prefix)

        async def delete_one(key: str) -> None:
            try:
                await self.store.delete(key)
            except NoSuchObject:
                pass
            self.metadata.forget(key)

        # Then the directories, deepest first: markers, and the implicit directories
        # SeaweedFS keeps (as an empty folder) after their last object is gone.
        directories = {old_prefix}
        for info in objects:
            parts = info.key[len(old_prefix):].split("/")[:-1]
            directories.update(old_prefix + "/".join(parts[:depth]) + "/" for depth in range(1, len(parts) + 1))
        for directory_key in sorted(directories, key=lambda key: key.count("/"), reverse=True):
            await delete_one(directory_key)

    async def fsync_directory(self, inode: int) -> None:
        """fsync() of a directory: the deletes of files in it (and below) are done in S3 when it returns."""
        await self.store.deletes.flush(self.directory_prefix(self._directory(inode).path))

    def statfs(self) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        # S3 has no capacity limit to report; these numbers keep df and installers happy.
        block = 4096
        stats.f_bsize = stats.f_frsize = block
        stats.f_blocks = stats.f_bfree = stats.f_bavail = (1 << 50) // block
        stats.f_files = stats.f_ffree = stats.f_favail = 1 << 32
        stats.f_namemax = NAME_MAX
        return stats

    async def shutdown(self) -> None:
        """Upload everything still dirty (after the kernel let go); report what could not be."""
        if self.config.mount.read_only:  # nothing was written; what the cache holds waits for a read-write mount
            self.metadata.close()
            return
        left = await self.writeback.flush_all()
        try:
            await self.store.deletes.flush()
        except SsefsError as error:
            log.error("%d delete(s) could not be sent; they are sent at the next mount with this config: %s",
                      len(self.store.deletes), error)
        log.info(
            "this mount uploaded %d file(s), %d bytes; %d file(s) left dirty",
            self.writeback.uploaded_files, self.writeback.uploaded_bytes, len(left),
        )
        if left:
            log.error(
                "%d file(s) (%d bytes) could not be uploaded; they stay in the cache %s and are "
                "uploaded at the next mount with this config",
                len(left), sum(entry.size for entry in left), self.cache.directory,
            )
        self.metadata.close()


def _nanoseconds(seconds: float) -> int:
    """S3's times (LastModified) in the nanoseconds that attributes are kept in."""
    return round(seconds * 1e9)


def _showable(name: str) -> bool:
    """Names a listing may show: exactly those that ``lookup`` would also accept."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..", SIDECAR_NAME)
        and len(name.encode()) <= NAME_MAX
    )


__all__ = ["Filesystem", "FsError", "ROOT_INODE"]
