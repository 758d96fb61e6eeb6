"""The filesystem's decisions, without FUSE in the loop.

``Filesystem`` maps file operations onto the object store: which paths exist
(listings and targeted probes, cached in the inode table), what a read fetches
(a ranged GET, or the staged copy while the file is being written), how writes
are staged (an encrypted scratch file, filled from the object first unless the
file was truncated) and when they are uploaded (on flush, i.e. every ``close()``,
and on fsync, before the call returns). It raises ``SsefsError`` subclasses
carrying an errno; ``fs.py`` translates them for the kernel.

Concurrency: everything runs on the trio loop. Each open file has a lock held
across filling the staged copy and uploading it, the only places that await
while file state is half-changed; a write waits for an upload in progress. The
file's generation counts changes, so a file is dirty exactly while its
generation differs from the one last uploaded.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from itertools import count

import pyfuse3
import trio

from .cache import EncryptedScratchFile, ScratchArea
from .config import MAX_PART_SIZE, Config
from .errors import NoSuchObject, SsefsError
from .inodes import ROOT_INODE, DirectoryEntry, InodeTable, Node, child_path
from .readahead import SequentialReader
from .store import ObjectStore
from .uploader import upload_scratch

log = logging.getLogger(__name__)

# POSIX NAME_MAX; S3 keys are at most 1024 bytes.
NAME_MAX = 255
KEY_MAX = 1024


class FsError(SsefsError):
    """An ordinary filesystem answer (ENOENT, EEXIST, ...), not worth a warning."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(message or os.strerror(errno_value), errno_value=errno_value)


@dataclass
class OpenFile:
    """State shared by all handles open on one file."""

    node: Node
    scratch: EncryptedScratchFile | None = None
    handles: int = 0
    # Bumped by every change; the file is dirty while it differs from the uploaded one.
    generation: int = 0
    uploaded_generation: int = 0
    unlinked: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def dirty(self) -> bool:
        return self.generation != self.uploaded_generation


@dataclass
class Handle:
    open_file: OpenFile
    writable: bool
    reader: SequentialReader = field(default_factory=SequentialReader)


class Filesystem:
    """Paths and file handles on top of one bucket prefix."""

    def __init__(self, config: Config, store: ObjectStore) -> None:
        self.config = config
        self.store = store
        self.prefix = config.key_prefix
        self.inodes = InodeTable(ttl=config.mount.attr_timeout)
        self.scratch_area = ScratchArea(config.cache.dir / "scratch")
        self._open_files: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = count(1)
        self.started_at = time.time()

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
        # SeaweedFS turns a backslash into a path separator; refuse rather than corrupt.
        if "\\" in text:
            raise FsError(errno.EINVAL, "names with a backslash are not supported")
        if len(self.object_key(child_path(parent.path, text)).encode()) + 1 > KEY_MAX:
            raise FsError(errno.ENAMETOOLONG)
        return text

    # ------------------------------------------------------------------ lookups

    async def lookup(self, parent_inode: int, name_bytes: bytes) -> Node:
        parent = self._directory(parent_inode)
        try:
            name = self._valid_name(name_bytes, parent)
        except FsError as error:
            if error.errno == errno.EINVAL:
                raise FsError(errno.ENOENT) from None
            raise
        path = child_path(parent.path, name)
        known = self.inodes.by_path(path)
        if known is not None and known.has_local_data:
            return known
        listing = self.inodes.cached_listing(parent.path)
        if listing is not None:
            entry = listing.entries.get(name)
            if entry is None:
                raise FsError(errno.ENOENT)
            node = self.inodes.node_for(path, is_dir=entry.is_dir)
            self.inodes.update_from_entry(node, entry)
            return node
        found, is_dir = await self.store.probe(self.object_key(path))
        if is_dir:
            return self.inodes.node_for(path, is_dir=True)
        if found is None:
            raise FsError(errno.ENOENT)
        node = self.inodes.node_for(path, is_dir=False)
        self.inodes.update_from_entry(node, DirectoryEntry(name, False, found.size, found.mtime, found.etag))
        return node

    async def getattr(self, inode: int) -> Node:
        node = self._node(inode)
        if node.is_dir or node.has_local_data or self.inodes.is_fresh(node):
            return node
        listing = self.inodes.cached_listing(node.parent_path)
        entry = listing.entries.get(node.name) if listing is not None else None
        if entry is None:
            found = await self.store.first_object_with_prefix(self.object_key(node.path))
            if found is None or found.key != self.object_key(node.path):
                raise FsError(errno.ENOENT)
            entry = DirectoryEntry(node.name, False, found.size, found.mtime, found.etag)
        self.inodes.update_from_entry(node, entry)
        return node

    async def list_directory(self, inode: int) -> list[tuple[str, Node]]:
        """A snapshot of a directory's children, sorted by name."""
        directory = self._directory(inode)
        listing = self.inodes.cached_listing(directory.path)
        if listing is None:
            entries = await self._fetch_listing(directory.path)
            self.inodes.store_listing(directory.path, entries)
        else:
            entries = listing.entries
        children: dict[str, Node] = {}
        for name, entry in entries.items():
            node = self.inodes.node_for(child_path(directory.path, name), is_dir=entry.is_dir)
            self.inodes.update_from_entry(node, entry)
            children[name] = node
        # Files created here but not uploaded yet exist only in this mount.
        for open_file in self._open_files.values():
            node = open_file.node
            if node.has_local_data and not open_file.unlinked and node.parent_path == directory.path:
                children.setdefault(node.name, node)
        return sorted(children.items())

    async def _fetch_listing(self, path: str) -> dict[str, DirectoryEntry]:
        listing = await self.store.list_children(self.directory_prefix(path))
        entries: dict[str, DirectoryEntry] = {}
        for info in listing.objects:
            name = info.key[len(self.directory_prefix(path)):]
            if _showable(name):
                entries[name] = DirectoryEntry(name, False, info.size, info.mtime, info.etag)
        for name in listing.prefixes:
            # A name that is both an object and a prefix shows as the directory.
            # S3 keeps no time for a prefix: directories show the mount's start time.
            if _showable(name):
                entries[name] = DirectoryEntry(name, True, mtime=self.started_at)
        return entries

    # ------------------------------------------------------------------ open files

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def _attach(self, node: Node, writable: bool) -> int:
        open_file = self._open_files.get(node.inode)
        if open_file is None:
            open_file = self._open_files[node.inode] = OpenFile(node)
        open_file.handles += 1
        node.open_count += 1
        fh = next(self._next_fh)
        self._handles[fh] = Handle(open_file, writable)
        return fh

    async def open(self, inode: int, flags: int) -> int:
        node = self._node(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._check_writable_mount()
        fh = self._attach(node, writable)
        if writable and flags & os.O_TRUNC:
            await self._truncate_open_file(self._handles[fh].open_file, 0)
        return fh

    async def create(self, parent_inode: int, name_bytes: bytes) -> tuple[int, Node]:
        self._check_writable_mount()
        parent = self._directory(parent_inode)
        name = self._valid_name(name_bytes, parent)
        path = child_path(parent.path, name)
        existing = self.inodes.by_path(path)
        if existing is not None and existing.is_dir:
            raise FsError(errno.EISDIR)
        node = self.inodes.node_for(path, is_dir=False)
        fh = self._attach(node, writable=True)
        await self._truncate_open_file(self._handles[fh].open_file, 0)
        self.inodes.invalidate_listing(parent.path)
        return fh, node

    async def _ensure_scratch(self, open_file: OpenFile, *, load: bool = True) -> EncryptedScratchFile:
        """The file's staged copy, filled from S3 the first time unless ``load`` is false."""
        async with open_file.lock:
            if open_file.scratch is None:
                scratch = self.scratch_area.new_file()
                if load and not open_file.node.has_local_data:
                    try:
                        await self.store.download(self.object_key(open_file.node.path), scratch.write)
                    except NoSuchObject:
                        pass  # deleted behind our back: the file starts empty
                    except BaseException:
                        scratch.close()
                        raise
                open_file.scratch = scratch
            return open_file.scratch

    def _changed(self, open_file: OpenFile, scratch: EncryptedScratchFile) -> None:
        open_file.generation += 1
        node = open_file.node
        node.size = scratch.size
        node.mtime = time.time()
        node.has_local_data = True

    async def _truncate_open_file(self, open_file: OpenFile, size: int) -> None:
        scratch = await self._ensure_scratch(open_file, load=size > 0)
        scratch.truncate(size)
        self._changed(open_file, scratch)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        open_file = handle.open_file
        if open_file.scratch is not None:
            return open_file.scratch.read(offset, size)
        object_key = self.object_key(open_file.node.path)

        async def fetch(start: int, length: int) -> bytes:
            return await self.store.get_range(object_key, start, length)

        return await handle.reader.read(offset, size, open_file.generation, fetch)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise FsError(errno.EBADF)
        scratch = await self._ensure_scratch(handle.open_file)
        written = scratch.write(offset, data)
        self._changed(handle.open_file, scratch)
        return written

    async def _upload(self, open_file: OpenFile) -> None:
        """Upload the staged copy if it has changes, and record the result."""
        async with open_file.lock:
            if not open_file.dirty or open_file.unlinked or open_file.scratch is None:
                return
            generation = open_file.generation
            node = open_file.node
            etag = await upload_scratch(
                self.store, self.config.s3, self.object_key(node.path), open_file.scratch
            )
            open_file.uploaded_generation = generation
            node.etag = etag
            if not open_file.dirty:
                node.has_local_data = False
                node.checked_at = time.monotonic()
            self.inodes.invalidate_listing(node.parent_path)

    async def flush(self, fh: int) -> None:
        await self._upload(self._handle(fh).open_file)

    async def fsync(self, fh: int) -> None:
        await self._upload(self._handle(fh).open_file)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        open_file = handle.open_file
        open_file.handles -= 1
        node = open_file.node
        node.open_count -= 1
        if open_file.handles > 0:
            return
        try:
            if open_file.dirty and not open_file.unlinked:
                await self._upload(open_file)
        finally:
            if open_file.dirty and not open_file.unlinked:
                log.error("changes to %r could not be uploaded and are lost", self.object_key(node.path))
            del self._open_files[node.inode]
            if open_file.scratch is not None:
                open_file.scratch.close()
            node.has_local_data = False
            self.inodes.drop_if_unused(node)

    # ------------------------------------------------------------------ changes

    async def truncate(self, inode: int, size: int, fh: int | None) -> None:
        self._check_writable_mount()
        node = self._node(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if size > MAX_PART_SIZE * 10_000:
            raise FsError(errno.EFBIG)
        open_file = self._open_files.get(inode)
        if open_file is not None:
            await self._truncate_open_file(open_file, size)
            return
        temporary = self._attach(node, writable=True)
        try:
            await self._truncate_open_file(self._handles[temporary].open_file, size)
        finally:
            await self.release(temporary)

    async def mkdir(self, parent_inode: int, name_bytes: bytes) -> Node:
        self._check_writable_mount()
        parent = self._directory(parent_inode)
        name = self._valid_name(name_bytes, parent)
        path = child_path(parent.path, name)
        await self.store.put_directory_marker(self.directory_prefix(path))
        self.inodes.invalidate_listing(parent.path)
        node = self.inodes.node_for(path, is_dir=True)
        node.mtime = time.time()
        return node

    async def rmdir(self, parent_inode: int, name_bytes: bytes) -> None:
        self._check_writable_mount()
        node = await self.lookup(parent_inode, name_bytes)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        prefix = self.directory_prefix(node.path)
        remaining = [key for key in await self.store.keys_with_prefix(prefix, 2) if key != prefix]
        local_children = any(
            f.node.parent_path == node.path and f.node.has_local_data and not f.unlinked
            for f in self._open_files.values()
        )
        if remaining or local_children:
            raise FsError(errno.ENOTEMPTY)
        await self.store.delete(prefix)
        self.inodes.invalidate_listing(node.path)
        self.inodes.remove_path(node.path)

    async def unlink(self, parent_inode: int, name_bytes: bytes) -> None:
        self._check_writable_mount()
        node = await self.lookup(parent_inode, name_bytes)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        open_file = self._open_files.get(node.inode)
        if open_file is not None:
            open_file.unlinked = True
        await self.store.delete(self.object_key(node.path))
        self.inodes.remove_path(node.path)

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable_mount()
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise FsError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
        node = await self.lookup(old_parent, old_name)
        target_parent = self._directory(new_parent)
        target_name = self._valid_name(new_name, target_parent)
        target_path = child_path(target_parent.path, target_name)
        if target_path == node.path:
            return
        if node.is_dir:
            # Directory rename arrives in a later issue; EXDEV makes mv copy and delete.
            raise FsError(errno.EXDEV)
        try:
            target = await self.lookup(new_parent, new_name)
        except FsError as error:
            if error.errno != errno.ENOENT:
                raise
            target = None
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if target.is_dir:
                raise FsError(errno.EISDIR)
        old_key = self.object_key(node.path)
        open_file = self._open_files.get(node.inode)
        if open_file is not None and open_file.dirty:
            self.inodes.move(node, target_path)
            await self._upload(open_file)
        else:
            if node.size > MAX_PART_SIZE:
                raise FsError(errno.EXDEV)  # CopyObject stops at 5 GiB; mv falls back to copying
            await self.store.copy(old_key, self.object_key(target_path))
            self.inodes.move(node, target_path)
        try:
            await self.store.delete(old_key)
        except NoSuchObject:
            pass

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
        """Upload whatever open files still hold (called after the kernel let go)."""
        for open_file in list(self._open_files.values()):
            if open_file.dirty and not open_file.unlinked:
                try:
                    await self._upload(open_file)
                except SsefsError as error:
                    log.error("could not upload %r at shutdown: %s", open_file.node.path, error)


def _showable(name: str) -> bool:
    """Names a listing may show: exactly those that ``lookup`` would also accept."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and len(name.encode()) <= NAME_MAX
    )


__all__ = ["Filesystem", "FsError", "ROOT_INODE"]
