"""The inode table: inode numbers for paths, kernel lookup counts, and cached attributes.

A path here is relative to the mount's root, ``""`` for the root itself and
``"a/b"`` below it; the object key of a file is ``prefix + path`` and the
prefix of a directory ``prefix + path + "/"``. Inode numbers are handed out
from a counter and never reused, so generation numbers can stay 0. A node is
kept while the kernel holds lookups on it (every reply that carries an entry
adds one, ``forget`` subtracts) or while files are open on it; after that it
may be dropped and the path gets a new inode number next time.

Directory listings are cached for ``attr_timeout`` seconds; a change made
through this mount updates exactly the name it touched in the cached listing,
and that name is known as of the change, so it answers lookups for
``attr_timeout`` after the change even once the listing as a whole has expired
(and a listing past its time still answers lookups while S3 cannot be reached).
This module does no I/O.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

import pyfuse3

from .metadata import FileAttributes

ROOT_INODE: int = pyfuse3.ROOT_INODE


@dataclass
class Node:
    """One file or directory the kernel knows about."""

    inode: int
    path: str
    is_dir: bool
    size: int = 0
    mtime_ns: int = 0
    etag: str = ""
    lookups: int = 0
    open_count: int = 0
    # When size/mtime were last confirmed by S3 (monotonic seconds); 0 = never.
    checked_at: float = 0.0
    # True while the local staged copy is authoritative (written, not yet
    # uploaded): listings must not overwrite its size and mtime.
    has_local_data: bool = False
    # Mode (with type bits), owner and group stored with the object; None: the mount's defaults.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    # Extended attributes as stored (sealed); None: none.
    xattrs: str | None = None
    # A symbolic link's target, once read (the link's object holds it, encrypted).
    symlink_target: bytes | None = None
    # Another client changed the object since the kernel last cached its pages:
    # the next open tells the kernel to drop them (keep_cache off once).
    page_cache_stale: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent_path(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""


@dataclass
class DirectoryEntry:
    """A child as a listing shows it."""

    name: str
    is_dir: bool
    size: int = 0
    mtime_ns: int = 0
    etag: str = ""
    # From the object's user metadata (or the metadata index); None until known.
    attributes: FileAttributes | None = None


@dataclass
class CachedListing:
    entries: dict[str, DirectoryEntry]
    fetched_at: float = field(default_factory=time.monotonic)
    # Names changed through this mount since the fetch, and when (monotonic seconds): S3 held
    # what ``entries`` says of them (an absent name: nothing) at that time, not just at the fetch.
    changed_at: dict[str, float] = field(default_factory=dict)
    # ``changed_at`` is pruned of changes older than the TTL whenever it reaches this size.
    prune_at: int = 1024


def child_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class InodeTable:
    """Inode ↔ path mapping, lookup counts, and the listing cache."""

    def __init__(self, *, ttl: float) -> None:
        self.ttl = ttl
        self._by_inode: dict[int, Node] = {}
        self._by_path: dict[str, Node] = {}
        self._next_inode = ROOT_INODE + 1
        self._listings: dict[str, CachedListing] = {}
        # Per directory whose listing is being fetched: the changes made through this mount
        # since the LIST went out, which win over what it returns (it may predate them).
        self._changes_during_fetch: dict[str, dict[str, DirectoryEntry | None]] = {}
        root = Node(ROOT_INODE, "", is_dir=True, mtime_ns=time.time_ns(), lookups=1, checked_at=float("inf"))
        self._by_inode[ROOT_INODE] = root
        self._by_path[""] = root

    # ---------------------------------------------------------------- nodes

    def get(self, inode: int) -> Node | None:
        return self._by_inode.get(inode)

    def by_path(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def node_for(self, path: str, *, is_dir: bool) -> Node:
        """The node for ``path``, created (with no lookups yet) if unknown.

        A path that changed kind (a file replaced by a directory elsewhere) gets a
        fresh inode unless it is in use.
        """
        node = self._by_path.get(path)
        if node is not None and node.is_dir != is_dir and node.open_count == 0:
            self._detach(node)
            node = None
        if node is None:
            node = Node(self._next_inode, path, is_dir)
            self._next_inode += 1
            self._by_inode[node.inode] = node
            self._by_path[path] = node
        return node

    def update_from_entry(self, node: Node, entry: DirectoryEntry) -> None:
        if node.has_local_data:
            return
        changed = entry.etag != node.etag
        if node.etag and changed:
            node.page_cache_stale = True
        node.size, node.etag = entry.size, entry.etag
        if entry.mtime_ns or not node.mtime_ns:
            node.mtime_ns = entry.mtime_ns
        if entry.attributes is not None:
            self.apply_attributes(node, entry.attributes)
        elif changed:
            node.mode = node.uid = node.gid = node.xattrs = None  # another object now: its attributes are not known yet
        node.checked_at = time.monotonic()

    @staticmethod
    def apply_attributes(node: Node, attributes: FileAttributes) -> None:
        node.mode, node.uid, node.gid, node.xattrs = attributes.mode, attributes.uid, attributes.gid, attributes.xattrs
        if attributes.mtime_ns is not None:
            node.mtime_ns = attributes.mtime_ns

    @staticmethod
    def is_symlink(node: Node) -> bool:
        return node.mode is not None and stat.S_ISLNK(node.mode)

    @staticmethod
    def attributes_of(node: Node) -> FileAttributes:
        return FileAttributes(node.mode, node.uid, node.gid, node.mtime_ns, node.xattrs)

    def is_fresh(self, node: Node) -> bool:
        return time.monotonic() - node.checked_at < self.ttl

    def add_lookup(self, node: Node) -> None:
        node.lookups += 1

    def forget(self, inode: int, count: int) -> None:
        node = self._by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        self.drop_if_unused(node)

    def drop_if_unused(self, node: Node) -> None:
        if node.inode != ROOT_INODE and node.lookups == 0 and node.open_count == 0:
            self._by_inode.pop(node.inode, None)
            if self._by_path.get(node.path) is node:
                del self._by_path[node.path]

    def _detach(self, node: Node) -> None:
        """Stop mapping ``node.path`` to ``node`` (the path was removed or replaced)."""
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]

    def remove_path(self, path: str) -> Node | None:
        """The path is gone: unmap it; the node lives on while the kernel or open files hold it."""
        node = self._by_path.get(path)
        if node is not None:
            self._detach(node)
            self.drop_if_unused(node)
        self.note_child(_parent(path), path.rsplit("/", 1)[-1], None)
        return node

    def move(self, node: Node, new_path: str) -> None:
        """Re-map a file node to ``new_path`` (rename); whatever was there is unmapped."""
        old_path = node.path
        replaced = self._by_path.get(new_path)
        if replaced is not None and replaced is not node:
            self._detach(replaced)
            self.drop_if_unused(replaced)
        self._detach(node)
        node.path = new_path
        self._by_path[new_path] = node
        self.note_child(_parent(old_path), old_path.rsplit("/", 1)[-1], None)
        self.note_child(_parent(new_path), node.name, self.directory_entry(node))

    def move_tree(self, directory: Node, new_path: str) -> None:
        """Re-map a directory and every known node and cached listing below it to ``new_path``."""
        old_path = directory.path
        below = old_path + "/"
        replaced = self._by_path.get(new_path)
        if replaced is not None and replaced is not directory:
            self._detach(replaced)
            self.drop_if_unused(replaced)
        for node in [n for path, n in self._by_path.items() if path == old_path or path.startswith(below)]:
            self._detach(node)
            node.path = new_path + node.path[len(old_path):]
            self._by_path[node.path] = node
        for path in [path for path in self._listings if path == old_path or path.startswith(below)]:
            self._listings[new_path + path[len(old_path):]] = self._listings.pop(path)
        self.note_child(_parent(old_path), old_path.rsplit("/", 1)[-1], None)
        self.note_child(_parent(new_path), directory.name, self.directory_entry(directory))

    def directory_entry(self, node: Node) -> DirectoryEntry:
        """The node as its parent's listing would show it."""
        return DirectoryEntry(node.name, node.is_dir, node.size, node.mtime_ns, node.etag, self.attributes_of(node))

    # ---------------------------------------------------------------- listings

    def cached_listing(self, path: str) -> CachedListing | None:
        listing = self._listings.get(path)
        if listing is None or time.monotonic() - listing.fetched_at >= self.ttl:
            return None
        return listing

    def recent_change(self, parent: str, name: str) -> tuple[bool, DirectoryEntry | None]:
        """``(True, entry)`` if ``name`` in ``parent`` was changed through this mount less than
        the TTL ago (``entry`` None: it was removed), whether or not the listing is still fresh;
        ``(False, None)`` if S3 must be asked."""
        listing = self._listings.get(parent)
        if listing is None:
            return False, None
        changed = listing.changed_at.get(name)
        if changed is None or time.monotonic() - changed >= self.ttl:
            return False, None
        return True, listing.entries.get(name)

    def begin_fetch(self, path: str) -> None:
        """A LIST of ``path`` is going out: remember changes noted from now until it is stored."""
        self._changes_during_fetch[path] = {}

    def end_fetch(self, path: str) -> None:
        """The fetch ended without a listing to store (it failed)."""
        self._changes_during_fetch.pop(path, None)

    def store_listing(self, path: str, entries: dict[str, DirectoryEntry]) -> None:
        for name, entry in self._changes_during_fetch.pop(path, {}).items():
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        self._listings[path] = CachedListing(entries)

    def last_listing(self, path: str) -> CachedListing | None:
        """The last listing seen, however old: the best answer while S3 cannot be reached."""
        return self._listings.get(path)

    def note_child(self, parent: str, name: str, entry: DirectoryEntry | None) -> None:
        """A change made through this mount: update exactly that name in the parent's cached
        listing (``None`` removes it), leaving the rest of the listing as fresh as it was."""
        changes = self._changes_during_fetch.get(parent)
        if changes is not None:
            changes[name] = entry
        listing = self._listings.get(parent)
        if listing is None:
            return
        if entry is None:
            listing.entries.pop(name, None)
        else:
            listing.entries[name] = entry
        now = time.monotonic()
        listing.changed_at[name] = now
        if len(listing.changed_at) >= listing.prune_at:
            listing.changed_at = {key: at for key, at in listing.changed_at.items() if now - at < self.ttl}
            listing.prune_at = max(1024, 2 * len(listing.changed_at))

    def invalidate_listing(self, path: str) -> None:
        listing = self._listings.get(path)
        if listing is not None:
            listing.fetched_at = float("-inf")

    # ---------------------------------------------------------------- attributes

    def attributes(self, node: Node, *, uid: int, gid: int, file_mode: int, dir_mode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.entry_timeout = self.ttl
        attrs.attr_timeout = self.ttl
        kind = stat.S_IFDIR if node.is_dir else stat.S_IFREG
        if node.mode is None:
            attrs.st_mode = kind | (dir_mode if node.is_dir else file_mode)
        elif not node.is_dir and stat.S_ISLNK(node.mode):
            attrs.st_mode = node.mode
        else:
            # Served as what it is here (a FIFO or device stored by s3fs reads as a regular
            # file), with the permission bits stored, so chmod shows.
            attrs.st_mode = kind | stat.S_IMODE(node.mode)
        if node.is_dir:
            attrs.st_nlink = 2
            attrs.st_size = 0
        else:
            attrs.st_nlink = 1
            attrs.st_size = node.size
        attrs.st_uid = uid if node.uid is None else node.uid
        attrs.st_gid = gid if node.gid is None else node.gid
        attrs.st_mtime_ns = attrs.st_ctime_ns = attrs.st_atime_ns = node.mtime_ns
        attrs.st_blksize = 512 * 1024
        attrs.st_blocks = (attrs.st_size + 511) // 512
        return attrs


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""
