"""The local block cache: file data on disk, encrypted, crash-safe and bounded.

Layout of the cache directory (created 0700; files 0600):
``journal.sqlite`` records the cache's identity (which bucket and which key it
belongs to), one row per cached object (an *entry*) and one row per stored
block; ``blocks/<entry id>/<block index>`` holds one block each, except that a
block of at most ``INLINE_LIMIT`` bytes (a small file, the short tail of a large
one) is sealed into its journal row instead: one commit and one fsync of the
journal's log make it durable, where a file costs a directory, a rename and two
more fsyncs.

Every block is 1 MiB of plaintext sealed with AES-256-GCM under a per-file key
(HKDF of a cache key that is itself derived from the mount's SSE-C key with
``keys.SseKey.derive``, salted with the entry's random 128-bit id), with a
fresh random 96-bit nonce per sealing and the entry id plus the block index as
associated data, so a block cannot be moved to another place or file. No
plaintext of file data is ever written here. Random nonces stay safe up to
about 2^32 sealings per key, i.e. 4 PiB of writes to one file.

An entry's bytes are: stored blocks where present; else, below ``base_valid``,
the bytes of the S3 object ``base_key`` (fetched on demand); else zeros. So a
write into a large object fetches only the blocks it touches, and truncation
never needs a download. ``generation`` counts changes; an entry is dirty while
it differs from ``uploaded_generation``. A block written at generation g turns
clean once generation g has been uploaded; only clean blocks are evicted.

Crash safety: a block file is written to a temporary name and renamed, and its
journal row is written after it, so the journal never points at a missing
block. On close and fsync the caller seals the in-memory hot block and calls
``sync``, which commits the entry's generation (after ``kill -9`` every closed
write is found again), and fsyncs the block files written since and the
journal's log, which holds that commit and the inline blocks, so that a power
cut loses nothing either: at once for an upload (``fsync()``), and for a close
in a pass ``keep_durable`` runs shortly after, shared by the closes in between
(``[cache] fsync_on_close`` waits for it). Block files
without a journal row (a crash between the two steps), or whose row now holds
the block inline, are removed at start.

Parked parts: a file written larger than the cache would otherwise fill it
with changes that cannot leave before its upload completes. Its parts sent
while it is written (streaming.py) are durable on the server already, as parts
of a multipart upload that stays open, so under pressure ``park`` lets their
blocks go: one commit records the parts' ETags, the upload's id and the
entry's ``parked_bytes`` (everything below it lives in those parts), and the
journal is fsynced before the block files are removed. Those bytes cannot be
read back until the upload completes (S3 serves no part of an unfinished
upload), so whoever needs them finishes the upload first. After a crash the
next start resumes such an upload instead of aborting it.

Size bound: clean blocks are evicted least-recently-used first. Writers call
``ensure_space`` *before* taking ``Entry.lock`` (the uploader that frees space
needs that lock); storing a block under the lock only evicts, never waits, so
the bound can be exceeded by at most the blocks of writes in progress. The
cache has no lock of its own: its state changes only on the trio thread;
worker threads do just the sealing, unsealing and file I/O of single blocks,
and a block takes its place only after re-checking, back on the trio thread,
that nothing changed it meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, SsefsError
from .keys import KeyRing, SseKey
from .metadata import NO_ATTRIBUTES, FileAttributes

log = logging.getLogger(__name__)

# How long after a close() the background fsync starts: closes in between share it. Each pass
# costs the trio thread a worker-thread hand-off; one per close was over a quarter of a small file's
# create (1,000 creates: 880 files/s with a pass per close, 1,140 with 5 ms, 1,200 with 20 ms).
# It bounds what a power cut can take from closed files, against a local filesystem's seconds.
DURABILITY_DELAY_SECONDS = 0.02

# 1 MiB blocks: large enough that per-block overhead (a file, a journal row, a
# nonce and tag, one encryption call) is negligible, small enough that a random
# 4 KiB write costs one block's fetch and re-encryption, not more.
BLOCK_SIZE = 1024 * 1024
NONCE_BYTES = 12
# Format 3 keeps small blocks in their journal row (INLINE_LIMIT). A format 2 cache is upgraded in
# place (the column is added); an older ssefs refuses format 3, where it would take inline blocks
# for missing files and drop them.
# Format 4 may hold files whose first bytes were sent as parts of an open multipart upload and left
# the cache (``park``): an older ssefs would read those bytes as zeros and upload them so.
FORMAT_VERSION = "4"
UPGRADABLE_FORMATS = ("2", "3")
# Version 2 does not store a block's trailing zero bytes (a 4 KiB file costs a 4 KiB block file, not
# 1 MiB: no sealing, writing and space for the padding); version 1 stored every block whole. Both
# are read. An older ssefs refuses version 2 blocks rather than misread them.
BLOCK_MAGIC = b"SSEFSB2\0"
WHOLE_BLOCK_MAGIC = b"SSEFSB1\0"
# Blocks whose plaintext (without trailing zeros) is at most this long are sealed into their
# journal row rather than a file of their own.
INLINE_LIMIT = 64 * 1024
# Object keys never start with NUL: entries of files unlinked while open are renamed under it.
UNLINKED_PREFIX = "\0unlinked/"
# The journal rows of dropped clean entries (an uploaded file deleted, or changed elsewhere) are deleted
# this many at a time: one commit per ``rm`` cost most of an unlink. Lost in a crash, such rows only
# bring back a clean cached copy of a file that is gone, as when another client deletes a file we
# cached; a dirty entry's rows go at once, so a crash can never bring back, and upload, a deleted file.
DROPPED_ROWS_BATCH = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid BLOB NOT NULL,
    object_key TEXT NOT NULL UNIQUE,
    base_key TEXT,
    base_etag TEXT NOT NULL,
    base_valid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    generation INTEGER NOT NULL,
    uploaded_generation INTEGER NOT NULL,
    file_mode INTEGER,
    file_uid INTEGER,
    file_gid INTEGER,
    file_xattrs TEXT,
    mtime_ns INTEGER,
    parked_bytes INTEGER
);
CREATE TABLE IF NOT EXISTS pending_deletes (
    object_key TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS multipart_uploads (
    upload_id TEXT PRIMARY KEY,
    object_key TEXT NOT NULL,
    started REAL NOT NULL,
    entry_id INTEGER,
    part_size INTEGER,
    completed_etag TEXT,
    key_fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS parked_parts (
    upload_id TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);
CREATE TABLE IF NOT EXISTS blocks (
    entry_id INTEGER NOT NULL,
    block_index INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    write_generation INTEGER NOT NULL,
    data BLOB,
    PRIMARY KEY (entry_id, block_index)
);
"""


def _remove_directories(directories: list[Path]) -> None:
    """Remove entry directories (flat: block files only). rmtree's careful walk cost
    several times a plain listdir/unlink/rmdir, and unlinks make thousands of these."""
    for directory in directories:
        try:
            for name in os.listdir(directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / name)
            os.rmdir(directory)
        except FileNotFoundError:
            continue
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)  # not what ssefs puts there: leave it to the walk


def _key_check(cache_key: bytes) -> str:
    """A value that shows which key a cache was created under, without revealing it."""
    return hmac.new(cache_key, b"ssefs cache key check", hashlib.sha256).hexdigest()


def _lock_directory(directory: Path) -> IO[str]:
    """Hold an exclusive lock on the cache for this process's lifetime: one daemon per cache."""
    lock_file = open(directory / "lock", "a+")
    os.chmod(directory / "lock", 0o600)
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise CacheMismatch(
            f"cache {directory} is in use by another ssefs daemon (pid {holder}); each mount needs its own [cache] dir"
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file


def _unseal_file(path: Path, cipher: AESGCM, associated_data: bytes) -> bytes:
    """Read and decrypt one block file (in a worker thread); InvalidTag if it is not intact."""
    return _unseal(path.read_bytes(), cipher, associated_data)


def _unseal(sealed: bytes, cipher: AESGCM, associated_data: bytes) -> bytes:
    """Decrypt one sealed block; InvalidTag if it is not intact.

    Returns what was stored: the block without its trailing zeros (they read as zeros).
    """
    if not sealed.startswith((BLOCK_MAGIC, WHOLE_BLOCK_MAGIC)):
        raise InvalidTag
    nonce = sealed[len(BLOCK_MAGIC):len(BLOCK_MAGIC) + NONCE_BYTES]
    # A view, not a slice: slicing would copy the whole block once more.
    return cipher.decrypt(nonce, memoryview(sealed)[len(BLOCK_MAGIC) + NONCE_BYTES:], associated_data)


class CorruptBlock(SsefsError):
    """A dirty block failed authentication: local data was damaged and cannot be re-fetched."""


class CacheMismatch(ConfigError):
    """The cache directory belongs to another bucket or was written under another key."""


@dataclass
class Entry:
    """What the cache holds for one object key."""

    id: int
    uid: bytes
    object_key: str
    base_key: str | None
    base_etag: str
    base_valid: int
    size: int
    # Modification time, exactly as set (utimensat gives nanoseconds).
    mtime_ns: int
    generation: int = 0
    uploaded_generation: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock, repr=False, compare=False)
    # Block files written since the last sync, to fsync on the next one.
    unsynced: set[int] = field(default_factory=set, repr=False, compare=False)
    open_writers: int = 0
    # Mode, owner and group to upload with the data (the time is ``mtime_ns``).
    owner_mode: int | None = None
    owner_uid: int | None = None
    owner_gid: int | None = None
    sealed_xattrs: str | None = None
    # The entry's row as last written: saving it unchanged again is skipped (each commit costs ~50 µs).
    saved_row: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)
    # The bytes below this were sent as parts of the entry's open multipart upload and left the cache.
    parked_bytes: int = 0

    @property
    def attributes(self) -> FileAttributes:
        return FileAttributes(self.owner_mode, self.owner_uid, self.owner_gid, self.mtime_ns, self.sealed_xattrs)

    def set_attributes(self, attributes: FileAttributes) -> None:
        self.owner_mode, self.owner_uid, self.owner_gid = attributes.mode, attributes.uid, attributes.gid
        self.sealed_xattrs = attributes.xattrs
        if attributes.mtime_ns is not None:
            self.mtime_ns = attributes.mtime_ns

    @property
    def dirty(self) -> bool:
        return self.generation != self.uploaded_generation

    @property
    def unlinked(self) -> bool:
        """The file was unlinked while open: its data lives here until its last handle closes."""
        return self.object_key.startswith(UNLINKED_PREFIX)


@dataclass
class ParkedUpload:
    """A multipart upload holding the first bytes of a file whose blocks left the cache (``park``)."""

    entry: Entry
    upload_id: str
    part_size: int
    # ETags of the parked parts, by part index (0-based).
    etags: dict[int, str]
    # Set when the upload was completed but the crash came before the entry was marked uploaded.
    completed_etag: str | None
    # The SSE-C key it was created under (None: journaled before ssefs recorded it; the current key).
    key_fingerprint: str | None = None


@dataclass
class BlockInfo:
    stored_bytes: int
    # The entry generation of the last write into this block; 0 for a block fetched clean.
    write_generation: int
    # Sealed into its journal row (INLINE_LIMIT), not a file of its own.
    inline: bool = False


class BlockCache:
    """Encrypted blocks of cached objects, with their journal."""

    def __init__(self, directory: Path, keys: KeyRing | SseKey, *, identity: str, max_size: int,
                 inline_limit: int = INLINE_LIMIT) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        self._lock_file = _lock_directory(self.directory)
        self.blocks_dir = self.directory / "blocks"
        self.blocks_dir.mkdir(exist_ok=True, mode=0o700)
        self.max_size = max_size
        self.inline_limit = inline_limit
        ring = keys if isinstance(keys, KeyRing) else KeyRing(keys)
        self._ciphers: dict[bytes, AESGCM] = {}
        self._db = sqlite3.connect(self.directory / "journal.sqlite", isolation_level=None)
        # Dropped clean entries whose rows are still in the journal: object key -> entry id.
        self._dropped_rows: dict[str, int] = {}
        os.chmod(self.directory / "journal.sqlite", 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: single statements commit without an fsync; ``make_durable``
        # fsyncs the write-ahead log, and with it every commit so far.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # sqlite's count of rows changed when the last ``make_durable`` pass began: all durable.
        self._durable_changes = -1
        # Block files and block directories written but not fsynced yet.
        self._unsynced_files: set[Path] = set()
        self._fsync_lock = trio.Lock()
        self._durability_wanted = trio.Event()
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        try:
            self._cache_key = self._check_identity(identity, ring)
        except BaseException:
            self.close()
            raise
        self._entries: dict[int, Entry] = {}
        self._by_key: dict[str, Entry] = {}
        self._blocks: dict[tuple[int, int], BlockInfo] = {}
        # The block indexes each entry has stored, so per-entry work does not scan every block.
        self._entry_blocks: dict[int, set[int]] = {}
        # Clean blocks in least-recently-used order: the eviction candidates.
        self._clean_lru: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.used_bytes = 0
        self._space_freed = trio.Event()
        # Writers waiting in ``ensure_space``: parts sent while they wait are parked at once.
        self.waiting_for_space = 0
        # Block directories of dropped entries, waiting for ``remove_dropped_files``.
        self._doomed_directories: list[Path] = []
        self._reaper_wakeup = trio.Event()
        self._reaper_running = False
        self._load()

    # ------------------------------------------------------------------ start-up

    def _add_missing_columns(self) -> None:
        """Caches written before file attributes (or inline blocks) were kept get the columns (empty)."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        for column, kind in (("file_mode", "INTEGER"), ("file_uid", "INTEGER"), ("file_gid", "INTEGER"),
                             ("file_xattrs", "TEXT"), ("mtime_ns", "INTEGER"), ("parked_bytes", "INTEGER")):
            if column not in present:
                self._db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
        present = {row[1] for row in self._db.execute("PRAGMA table_info(multipart_uploads)")}
        for column, kind in (("entry_id", "INTEGER"), ("part_size", "INTEGER"), ("completed_etag", "TEXT"),
                             ("key_fingerprint", "TEXT")):
            if column not in present:
                self._db.execute(f"ALTER TABLE multipart_uploads ADD COLUMN {column} {kind}")
        if "data" not in {row[1] for row in self._db.execute("PRAGMA table_info(blocks)")}:
            self._db.execute("ALTER TABLE blocks ADD COLUMN data BLOB")

    def _check_identity(self, identity: str, ring: KeyRing) -> bytes:
        """Check the cache is this mount's, and return the key its blocks are sealed with.

        That is the current key's derivation for a new cache, and for an existing
        one whichever key of the ring created it: after a key rotation the blocks
        already here (perhaps not yet uploaded) stay readable, while uploads go out
        under the current key.
        """
        stored = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        candidates = {_key_check(key.derive(b"cache-blocks-v1")): key for key in ring.all}
        current_check = _key_check(ring.current.derive(b"cache-blocks-v1"))
        if not stored:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("format", FORMAT_VERSION), ("identity", identity), ("key_check", current_check)],
                )
            return ring.current.derive(b"cache-blocks-v1")
        if stored.get("format") not in (FORMAT_VERSION, *UPGRADABLE_FORMATS):
            raise CacheMismatch(f"cache {self.directory} has format {stored.get('format')!r}, not {FORMAT_VERSION}")
        if stored.get("identity") != identity:
            raise CacheMismatch(
                f"cache {self.directory} belongs to {stored.get('identity')}, not {identity}; "
                "give this mount its own [cache] dir"
            )
        if stored["format"] != FORMAT_VERSION:
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'format'", (FORMAT_VERSION,))
        for check, key in candidates.items():
            if hmac.compare_digest(stored.get("key_check", ""), check):
                return key.derive(b"cache-blocks-v1")
        pending = self._db.execute(
            "SELECT COUNT(DISTINCT e.id) FROM entries e LEFT JOIN blocks b ON b.entry_id = e.id "
            "WHERE e.generation > e.uploaded_generation OR b.write_generation > e.uploaded_generation"
        ).fetchone()[0]
        if pending:
            raise CacheMismatch(
                f"cache {self.directory} was written under another SSE-C key and holds {pending} file(s) not yet "
                "uploaded. Mount with the key that wrote it (as the key or in previous_keys), "
                "or give this mount another [cache] dir"
            )
        # Nothing waits for upload: it is only a cache, so start it afresh under the current key.
        log.info("cache %s was written under a key no longer configured; starting it empty", self.directory)
        with self._transaction():
            self._db.execute("DELETE FROM blocks")
            self._db.execute("DELETE FROM entries")
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'key_check'", (current_check,))
        shutil.rmtree(self.blocks_dir, ignore_errors=True)
        self.blocks_dir.mkdir(exist_ok=True, mode=0o700)
        return ring.current.derive(b"cache-blocks-v1")

    def _load(self) -> None:
        for row in self._db.execute(
            "SELECT id, uid, object_key, base_key, base_etag, base_valid, size, "
            "COALESCE(mtime_ns, CAST(mtime * 1e9 AS INTEGER)), generation, "
            "uploaded_generation, file_mode, file_uid, file_gid, file_xattrs, COALESCE(parked_bytes, 0) FROM entries"
        ):
            entry = Entry(*row[:10])
            entry.owner_mode, entry.owner_uid, entry.owner_gid, entry.sealed_xattrs, entry.parked_bytes = row[10:]
            self._entries[entry.id] = entry
            self._by_key[entry.object_key] = entry
        for entry_id, index, stored_bytes, write_generation, inline in self._db.execute(
            "SELECT entry_id, block_index, stored_bytes, write_generation, data IS NOT NULL FROM blocks"
        ).fetchall():
            owner = self._entries.get(entry_id)
            present = bool(inline) or self._block_path(entry_id, index).exists()
            if owner is not None and not present and write_generation > owner.uploaded_generation:
                log.error("cached block %d of %r (not yet uploaded) is missing from %s",
                          index, owner.object_key, self.blocks_dir)
            if owner is None or not present:
                self._db.execute("DELETE FROM blocks WHERE entry_id = ? AND block_index = ?", (entry_id, index))
                continue
            self._blocks[(entry_id, index)] = BlockInfo(stored_bytes, write_generation, bool(inline))
            self._entry_blocks.setdefault(entry_id, set()).add(index)
            self.used_bytes += stored_bytes
            # Blocks written after the entry's last sync (the daemon died before the
            # file was closed) still count: the entry is dirty and they get uploaded.
            owner.generation = max(owner.generation, write_generation)
            if write_generation <= owner.uploaded_generation:
                self._clean_lru[(entry_id, index)] = None
        for entry in [entry for entry in self._entries.values() if entry.unlinked]:
            self.drop_entry(entry)  # its handles died with the daemon that had them
        self._remove_orphan_files()

    def _remove_orphan_files(self) -> None:
        for entry_dir in self.blocks_dir.iterdir():
            if not entry_dir.is_dir():
                entry_dir.unlink()
                continue
            entry_id = int(entry_dir.name) if entry_dir.name.isdigit() else -1
            for block_file in entry_dir.iterdir():
                index = int(block_file.name) if block_file.name.isdigit() else -1
                info = self._blocks.get((entry_id, index))
                if info is None or info.inline:  # no row, or a row that replaced the file by an inline block
                    block_file.unlink()
            if entry_id not in self._entries:
                entry_dir.rmdir()

    def close(self) -> None:
        self._delete_dropped_rows()
        if self._unsynced_files or self._db.total_changes != self._durable_changes:
            self._fsync_all(self._unsynced_files)
        self._db.close()
        self._lock_file.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ entries

    def entry(self, object_key: str) -> Entry | None:
        return self._by_key.get(object_key)

    def entry_by_id(self, entry_id: int) -> Entry | None:
        return self._entries.get(entry_id)

    def is_live(self, entry: Entry) -> bool:
        """False once the entry was dropped (its file deleted or replaced)."""
        return self._entries.get(entry.id) is entry

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def dirty_entries(self) -> list[Entry]:
        """Entries with changes to upload (not those of files unlinked while open)."""
        return [entry for entry in self._entries.values() if entry.dirty and not entry.unlinked]

    def create_entry(
        self, object_key: str, *, base_etag: str, base_size: int, mtime_ns: int, exists_in_s3: bool,
        attributes: FileAttributes = NO_ATTRIBUTES,
    ) -> Entry:
        """A new entry for ``object_key`` whose unstored bytes come from the object as it is now."""
        if object_key in self._by_key:
            self.drop_entry(self._by_key[object_key])
        if object_key in self._dropped_rows:
            self._delete_dropped_rows()  # the key is unique in the journal
        uid = secrets.token_bytes(16)
        base_key = object_key if exists_in_s3 else None
        base_valid = base_size if exists_in_s3 else 0
        entry = Entry(-1, uid, object_key, base_key, base_etag, base_valid, base_size, mtime_ns)
        entry.set_attributes(attributes)
        entry.mtime_ns = mtime_ns
        # One statement, one commit: the whole row at once.
        cursor = self._db.execute(
            "INSERT INTO entries (base_key, base_etag, base_valid, size, mtime, mtime_ns, generation, "
            "uploaded_generation, file_mode, file_uid, file_gid, file_xattrs, parked_bytes, uid, object_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*self._entry_row(entry)[:-1], uid, object_key),
        )
        assert cursor.lastrowid is not None
        entry.id = cursor.lastrowid
        entry.saved_row = self._entry_row(entry)
        self._entries[entry.id] = entry
        self._by_key[object_key] = entry
        return entry

    def drop_entry(self, entry: Entry) -> None:
        """Forget an entry and delete its blocks (the file was deleted or changed elsewhere)."""
        for index in list(self._entry_blocks.get(entry.id, ())):
            self._forget_block(entry, index, remove_file=False)
        self._entry_blocks.pop(entry.id, None)
        if entry.dirty or entry.object_key in self._dropped_rows:
            with self._transaction():
                self._db.execute("DELETE FROM blocks WHERE entry_id = ?", (entry.id,))
                self._db.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
        else:
            self._dropped_rows[entry.object_key] = entry.id
            if len(self._dropped_rows) >= DROPPED_ROWS_BATCH:
                self._delete_dropped_rows()
        self._entries.pop(entry.id, None)
        if self._by_key.get(entry.object_key) is entry:
            del self._by_key[entry.object_key]
        # A worker thread may be sealing a block into this directory right now;
        # whatever it leaves is removed when it returns (or at the next start).
        # The files go in the background: deleting them is most of an unlink's cost.
        # Most small files have no directory (their blocks are in the journal): no worker thread for them.
        directory = self.blocks_dir / str(entry.id)
        if directory.exists():
            if self._reaper_running:
                self._doomed_directories.append(directory)
                self._reaper_wakeup.set()
            else:
                shutil.rmtree(directory, ignore_errors=True)
        self._signal_space()

    def _delete_dropped_rows(self) -> None:
        """Delete the journal rows of the clean entries dropped since the last time, in one commit."""
        if not self._dropped_rows:
            return
        doomed = [(entry_id,) for entry_id in self._dropped_rows.values()]
        with self._transaction():
            self._db.executemany("DELETE FROM blocks WHERE entry_id = ?", doomed)
            self._db.executemany("DELETE FROM entries WHERE id = ?", doomed)
        self._dropped_rows.clear()

    async def remove_dropped_files(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Delete the block files of dropped entries in a worker thread, off the request path.

        Their journal rows are gone already, so a crash in between only leaves
        files that the next start removes as orphans.
        """
        self._reaper_running = True
        task_status.started()
        try:
            while True:
                await self._reaper_wakeup.wait()
                self._reaper_wakeup = trio.Event()
                doomed, self._doomed_directories = self._doomed_directories, []
                await trio.to_thread.run_sync(_remove_directories, doomed)
        finally:
            self._reaper_running = False
            _remove_directories(self._doomed_directories)
            self._doomed_directories = []

    # ------------------------------------------------------------------ multipart uploads

    def multipart_started(self, object_key: str, upload_id: str, key_fingerprint: str | None = None) -> None:
        """Record a started multipart upload (``store.UploadJournal``), so a crash cannot orphan it, with
        the fingerprint of the SSE-C key it was created under (its every part must use that key)."""
        self._db.execute(
            "INSERT OR REPLACE INTO multipart_uploads (upload_id, object_key, started, key_fingerprint) "
            "VALUES (?, ?, ?, ?)",
            (upload_id, object_key, time.time(), key_fingerprint),
        )

    def multipart_finished(self, upload_id: str, etag: str | None = None) -> None:
        """The upload was aborted, or completed as the object with ``etag``.

        A completed upload holding parked parts stays recorded, with its ETag,
        until ``mark_uploaded`` (the same commit that empties ``parked_bytes``),
        so a crash in between leaves the entry finishable, not stuck.
        """
        if etag is not None and self._db.execute(
            "SELECT 1 FROM parked_parts WHERE upload_id = ? LIMIT 1", (upload_id,)
        ).fetchone():
            self._db.execute("UPDATE multipart_uploads SET completed_etag = ? WHERE upload_id = ?", (etag, upload_id))
            return
        with self._transaction():
            self._db.execute("DELETE FROM parked_parts WHERE upload_id = ?", (upload_id,))
            self._db.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (upload_id,))

    def unfinished_multiparts(self) -> list[tuple[str, str, float]]:
        """(object key, upload id, time started) of multipart uploads started but never completed or aborted."""
        return [(key, upload_id, started) for upload_id, key, started in self._db.execute(
            "SELECT upload_id, object_key, started FROM multipart_uploads ORDER BY started"
        )]

    def parked_uploads(self) -> list[ParkedUpload]:
        """The uploads holding parked parts of live entries: to be resumed, never aborted."""
        found = []
        for upload_id, entry_id, part_size, completed_etag, key_fingerprint in self._db.execute(
            "SELECT upload_id, entry_id, part_size, completed_etag, key_fingerprint FROM multipart_uploads "
            "WHERE entry_id IS NOT NULL"
        ).fetchall():
            entry = self._entries.get(entry_id)
            if entry is None or not entry.parked_bytes or entry.unlinked:
                continue
            etags = {number - 1: etag for number, etag in self._db.execute(
                "SELECT part_number, etag FROM parked_parts WHERE upload_id = ?", (upload_id,))}
            found.append(ParkedUpload(entry, upload_id, part_size, etags, completed_etag, key_fingerprint))
        return found

    async def park(self, entry: Entry, upload_id: str, part_size: int, etags: dict[int, str]) -> None:
        """The parts ``etags`` (by index, continuing the parked ones) are on the server: let their blocks go.

        The journal records them and the new ``parked_bytes`` in one commit and
        is fsynced before any block file is removed, so after a crash either the
        blocks or the parts are found. The caller holds ``entry.lock``.
        """
        parked_bytes = (max(etags) + 1) * part_size
        first_block, last_block = entry.parked_bytes // BLOCK_SIZE, parked_bytes // BLOCK_SIZE
        doomed = [index for index in self._entry_blocks.get(entry.id, ()) if first_block <= index < last_block]
        before = entry.parked_bytes
        entry.parked_bytes = parked_bytes
        # The size saved last stays: the writer's size may count a block not stored yet (``_save_entry``).
        saved_size = entry.saved_row[3] if entry.saved_row is not None else None
        try:
            with self._transaction():
                self._db.execute("UPDATE multipart_uploads SET entry_id = ?, part_size = ? WHERE upload_id = ?",
                                 (entry.id, part_size, upload_id))
                self._db.executemany("INSERT OR REPLACE INTO parked_parts VALUES (?, ?, ?)",
                                     [(upload_id, index + 1, etag) for index, etag in etags.items()])
                self._db.executemany("DELETE FROM blocks WHERE entry_id = ? AND block_index = ?",
                                     [(entry.id, index) for index in doomed])
                self._save_entry(entry, size_on_disk=saved_size)
        except BaseException:
            entry.parked_bytes, entry.saved_row = before, None  # rolled back: nothing is parked
            raise
        await self.make_durable()
        for index in doomed:
            self._forget_block(entry, index)
        self._signal_space()

    # ------------------------------------------------------------------ deletes (``deletes.DeleteJournal``)

    def delete_queued(self, object_key: str) -> None:
        """Record a delete S3 has not confirmed yet (it survives a crash of the daemon)."""
        self._db.execute("INSERT OR IGNORE INTO pending_deletes VALUES (?)", (object_key,))

    def deletes_done(self, object_keys: list[str]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM pending_deletes WHERE object_key = ?", [(key,) for key in object_keys])

    def queued_deletes(self) -> list[str]:
        return [key for (key,) in self._db.execute("SELECT object_key FROM pending_deletes ORDER BY rowid")]

    def unlink_entry(self, entry: Entry) -> None:
        """Detach an entry from its name: it serves the file's open handles and is never uploaded.

        Call after making every block of it local and dirty (so none is evicted or
        fetched from the object, which is about to be deleted).
        """
        if self._by_key.get(entry.object_key) is entry:
            del self._by_key[entry.object_key]
        entry.object_key = f"{UNLINKED_PREFIX}{entry.id}"
        entry.base_key, entry.base_valid = None, 0
        with self._transaction():
            self._db.execute("UPDATE entries SET object_key = ? WHERE id = ?", (entry.object_key, entry.id))
        self._save_entry(entry)

    def rename_entry(self, entry: Entry, new_key: str) -> None:
        replaced = self._by_key.get(new_key)
        if replaced is not None and replaced is not entry:
            self.drop_entry(replaced)
        if new_key in self._dropped_rows:
            self._delete_dropped_rows()  # the key is unique in the journal
        with self._transaction():
            self._db.execute("UPDATE entries SET object_key = ? WHERE id = ?", (new_key, entry.id))
        del self._by_key[entry.object_key]
        entry.object_key = new_key
        self._by_key[new_key] = entry

    def save(self, entry: Entry) -> None:
        """Record the entry's state (no fsync)."""
        self._save_entry(entry)

    def change_attributes(self, entry: Entry, attributes: FileAttributes) -> None:
        """New mode, owner or time for a file whose data is not uploaded yet: they go with the upload.

        A change of attributes alone is a change to upload, like a write.
        Committed without an fsync: ``make_durable`` makes it durable.
        """
        entry.set_attributes(attributes)
        entry.generation += 1
        self._save_entry(entry)

    def record_change(self, entry: Entry, *, size: int | None = None) -> None:
        """Note a write or truncate in memory; ``sync`` makes it durable."""
        entry.generation += 1
        if size is not None:
            entry.size = size
        entry.mtime_ns = time.time_ns()

    async def sync(self, entry: Entry, *, wait: bool = True) -> None:
        """Make the entry's stored blocks and state durable (close, fsync, before upload).

        The entry's row is committed without an fsync on the trio thread (a
        killed process loses nothing from then on); the fsyncs of its block
        files and of the journal's write-ahead log, which holds that commit
        and every earlier one, follow in a worker thread (``make_durable``).
        ``wait=False`` (``close()``) returns at the commit and leaves the
        fsyncs to ``keep_durable``, which runs them in the background shortly
        after: a power cut can then lose only what was closed in those moments,
        as on a local filesystem, without ``close()`` waiting for the disk.
        """
        for index in entry.unsynced:  # file blocks only: inline ones are in the journal's log
            self._unsynced_files.add(self._block_path(entry.id, index))
        if entry.unsynced:
            self._unsynced_files.add(self.blocks_dir / str(entry.id))
        entry.unsynced.clear()
        self._save_entry(entry)
        if wait:
            await self.make_durable()
        elif self._unsynced_files or self._db.total_changes != self._durable_changes:
            self._durability_wanted.set()

    async def make_durable(self) -> None:
        """Fsync every block file and commit made so far, in a worker thread.

        A group commit: one pass at a time, and a caller whose commits a pass
        that started after them already covered returns without a pass of its own.
        """
        wanted = self._db.total_changes
        async with self._fsync_lock:
            if not self._unsynced_files and self._durable_changes == wanted:
                return
            paths, self._unsynced_files = self._unsynced_files, set()
            reached = self._db.total_changes
            try:
                await trio.to_thread.run_sync(self._fsync_all, paths)
            except BaseException:
                self._unsynced_files |= paths
                raise
            self._durable_changes = reached

    async def keep_durable(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the fsyncs that ``sync(wait=False)`` left, ``DURABILITY_DELAY_SECONDS`` after the first
        of them (off the request path), so that a burst of closes shares one pass."""
        task_status.started()
        while True:
            await self._durability_wanted.wait()
            await trio.sleep(DURABILITY_DELAY_SECONDS)
            self._durability_wanted = trio.Event()
            try:
                await self.make_durable()
            except OSError as error:
                log.error("cannot make the cache durable (retried with the next close or upload): %s", error)

    def _fsync_all(self, paths: set[Path]) -> None:
        # Block files before the directories holding them, then the journal's log.
        for path in sorted(paths, key=lambda path: path.parent == self.blocks_dir):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # dropped since (truncated away, evicted, deleted)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._fsync_journal()

    def _fsync_journal(self) -> None:
        # Checkpoints fsync what they copy out of the write-ahead log first, so every commit
        # is durable once the log is (or, with no log, the database file).
        for journal in (self.directory / "journal.sqlite-wal", self.directory / "journal.sqlite"):
            try:
                fd = os.open(journal, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return

    @staticmethod
    def _entry_row(entry: Entry) -> tuple[Any, ...]:
        return (entry.base_key, entry.base_etag, entry.base_valid, entry.size, entry.mtime_ns / 1e9, entry.mtime_ns,
                entry.generation, entry.uploaded_generation, entry.owner_mode, entry.owner_uid, entry.owner_gid,
                entry.sealed_xattrs, entry.parked_bytes, entry.id)

    def _save_entry(self, entry: Entry, *, size_on_disk: int | None = None) -> None:
        """Commit the entry's row (no fsync: ``make_durable`` makes commits durable).

        ``size_on_disk``: the most the stored blocks cover when the writer's size already counts a
        block not stored yet (a crash then leaves the file as far as its blocks reached, not padded).
        """
        if entry.id not in self._entries:
            return
        row = self._entry_row(entry)
        if size_on_disk is not None and size_on_disk < entry.size:
            row = (*row[:3], size_on_disk, *row[4:])
        if row == entry.saved_row:
            return
        self._db.execute(
            "UPDATE entries SET base_key = ?, base_etag = ?, base_valid = ?, size = ?, mtime = ?, mtime_ns = ?, "
            "generation = ?, uploaded_generation = ?, file_mode = ?, file_uid = ?, file_gid = ?, file_xattrs = ?, "
            "parked_bytes = ? WHERE id = ?",
            row,
        )
        entry.saved_row = row

    def mark_uploaded(self, entry: Entry, generation: int, *, etag: str, size: int) -> None:
        """Generation ``generation`` is now the object in S3: its blocks turn clean.

        Committed without an fsync: ``make_durable`` makes it durable.
        """
        entry.uploaded_generation = generation
        entry.base_key = entry.object_key
        entry.base_etag = etag
        entry.base_valid = size
        for index in self._entry_blocks.get(entry.id, ()):
            if self._blocks[(entry.id, index)].write_generation <= generation:
                self._clean_lru[(entry.id, index)] = None
        if entry.parked_bytes:
            entry.parked_bytes = 0
            with self._transaction():  # the parked parts are the object's now: in one commit with the entry
                self._db.execute("DELETE FROM parked_parts WHERE upload_id IN "
                                 "(SELECT upload_id FROM multipart_uploads WHERE entry_id = ?)", (entry.id,))
                self._db.execute("DELETE FROM multipart_uploads WHERE entry_id = ?", (entry.id,))
                self._save_entry(entry)
        else:
            self._save_entry(entry)
        self._signal_space()

    def truncate(self, entry: Entry, size: int) -> None:
        """Drop whole blocks past ``size``; bytes past it will read as zeros."""
        first_dropped = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        for index in [i for i in self._entry_blocks.get(entry.id, ()) if i >= first_dropped]:
            self._forget_block(entry, index)
            self._db.execute("DELETE FROM blocks WHERE entry_id = ? AND block_index = ?", (entry.id, index))
        entry.base_valid = min(entry.base_valid, size)
        self._signal_space()

    # ------------------------------------------------------------------ blocks

    def _block_path(self, entry_id: int, index: int) -> Path:
        return self.blocks_dir / str(entry_id) / str(index)

    def _cipher(self, entry: Entry) -> AESGCM:
        """The entry's own AES-GCM key: HKDF of the cache key with the entry's random id.

        One key per cached file keeps the random-nonce collision bound per file
        rather than for the whole cache's lifetime.
        """
        cipher = self._ciphers.get(entry.uid)
        if cipher is None:
            if len(self._ciphers) > 4096:
                self._ciphers.clear()
            file_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=entry.uid, info=b"ssefs cache file").derive(
                self._cache_key
            )
            cipher = self._ciphers[entry.uid] = AESGCM(file_key)
        return cipher

    def _associated_data(self, entry: Entry, index: int) -> bytes:
        return entry.uid + index.to_bytes(8, "big")

    def has_block(self, entry: Entry, index: int) -> bool:
        return (entry.id, index) in self._blocks

    def has_dirty_blocks(self, entry: Entry, first: int, last: int) -> bool:
        """Whether any block ``first..last`` holds changes not yet uploaded."""
        for index in range(first, last + 1):
            info = self._blocks.get((entry.id, index))
            if info is not None and info.write_generation > entry.uploaded_generation:
                return True
        return False

    async def read_block(self, entry: Entry, index: int) -> bytes | None:
        """The block's plaintext (up to BLOCK_SIZE bytes; the rest of the block is zeros), or None if not stored.

        Reading and decrypting run in a worker thread. A clean block that fails
        authentication is dropped (it will be fetched again); a dirty one raises
        ``CorruptBlock``.
        """
        while True:
            info = self._blocks.get((entry.id, index))
            if info is None:
                return None
            path = self._block_path(entry.id, index)
            try:
                if info.inline:  # small: read and decrypted here, in microseconds
                    plaintext = _unseal(self._inline_data(entry, index), self._cipher(entry),
                                        self._associated_data(entry, index))
                else:
                    plaintext = await trio.to_thread.run_sync(
                        _unseal_file, path, self._cipher(entry), self._associated_data(entry, index)
                    )
            except (InvalidTag, FileNotFoundError):
                if self._blocks.get((entry.id, index)) is not info:
                    continue  # replaced or dropped while being read: look again
                if info.write_generation > entry.uploaded_generation:
                    raise CorruptBlock(
                        f"cached block {index} of {entry.object_key!r} (not yet uploaded) is damaged on local "
                        f"disk ({self.directory / 'journal.sqlite' if info.inline else path})"
                    ) from None
                log.warning("cached block %d of %r was damaged; fetching it again", index, entry.object_key)
                self._forget_block(entry, index)
                self._db.execute("DELETE FROM blocks WHERE entry_id = ? AND block_index = ?", (entry.id, index))
                return None
            if self._blocks.get((entry.id, index)) is not info:
                continue  # a newer version was stored while this one was read
            if (entry.id, index) in self._clean_lru:
                self._clean_lru.move_to_end((entry.id, index))
            return plaintext

    def _inline_data(self, entry: Entry, index: int) -> bytes:
        row = self._db.execute(
            "SELECT data FROM blocks WHERE entry_id = ? AND block_index = ?", (entry.id, index)
        ).fetchone()
        return bytes(row[0]) if row is not None and row[0] is not None else b""

    async def write_block(
        self, entry: Entry, index: int, plaintext: bytes | bytearray, *, dirty: bool,
        still_wanted: Callable[[], bool] = lambda: True, size_on_disk: int | None = None,
    ) -> bool:
        """Seal and store one block; call ``evict_clean``/``ensure_space`` first.

        ``plaintext`` may stop short of BLOCK_SIZE: the rest of the block is zeros.

        Sealing and writing the file run in a worker thread; the block takes
        its place (rename and journal row) back on the trio thread, and only
        if the entry is still live and ``still_wanted()`` says so then (a
        fetched block must not overwrite a write that landed meanwhile).
        ``size_on_disk`` caps the size saved with a dirty block (see ``_save_entry``).
        Returns whether the block was stored.
        """
        write_generation = entry.generation if dirty else 0
        cipher, associated_data = self._cipher(entry), self._associated_data(entry, index)
        path = self._block_path(entry.id, index)

        def seal() -> list[bytes]:
            nonce = secrets.token_bytes(NONCE_BYTES)
            stored = plaintext if plaintext[-1:] != b"\0" else bytes(plaintext).rstrip(b"\0")
            return [BLOCK_MAGIC + nonce, cipher.encrypt(nonce, stored, associated_data)]

        if len(plaintext) <= self.inline_limit:
            # Sealing a few KiB costs microseconds: no worker thread, no file, no fsync of its own.
            if not self.is_live(entry) or not still_wanted():
                return False
            self._place_block(entry, index, b"".join(seal()), write_generation, dirty, size_on_disk)
            return True

        def seal_to_file() -> tuple[Path, int]:
            # Header and ciphertext go out in one writev: joining them first would copy the block again.
            sealed = seal()
            sealed_bytes = sum(len(part) for part in sealed)
            path.parent.mkdir(exist_ok=True, mode=0o700)
            # Unique: a fetch and a write may seal the same block at once.
            temporary = path.with_name(f".{index}.{secrets.token_hex(6)}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if os.writev(fd, sealed) != sealed_bytes:
                    raise OSError(errno.ENOSPC, f"short write of cache block {temporary}")
            except OSError:
                os.close(fd)
                temporary.unlink(missing_ok=True)
                raise
            os.close(fd)
            return temporary, sealed_bytes

        temporary, stored_bytes = await trio.to_thread.run_sync(seal_to_file)
        if not self.is_live(entry) or not still_wanted():
            temporary.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                if not self.is_live(entry):
                    path.parent.rmdir()  # recreated by the thread after the entry was dropped
            return False
        os.replace(temporary, path)
        self._place_block(entry, index, stored_bytes, write_generation, dirty, size_on_disk)
        return True

    def _place_block(self, entry: Entry, index: int, stored: int | bytes, write_generation: int,
                     dirty: bool, size_on_disk: int | None = None) -> None:
        """Record a stored block: ``stored`` is the size of its file, or the sealed block itself (inline)."""
        inline = isinstance(stored, bytes)
        stored_bytes = len(stored) if isinstance(stored, bytes) else stored
        previous = self._blocks.get((entry.id, index))
        if previous is not None:
            self.used_bytes -= previous.stored_bytes
        self._blocks[(entry.id, index)] = BlockInfo(stored_bytes, write_generation, inline)
        self._entry_blocks.setdefault(entry.id, set()).add(index)
        self.used_bytes += stored_bytes
        if dirty:
            self._clean_lru.pop((entry.id, index), None)
            if inline:
                entry.unsynced.discard(index)  # the journal's log holds it: no file to fsync
            else:
                entry.unsynced.add(index)
        else:
            self._clean_lru[(entry.id, index)] = None
        try:
            with self._transaction():  # one commit for both rows
                self._db.execute(
                    "INSERT OR REPLACE INTO blocks (entry_id, block_index, stored_bytes, write_generation, data) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (entry.id, index, stored_bytes, write_generation, stored if inline else None),
                )
                if dirty:
                    # Cheap (no fsync): after a crash before close, the entry's size and
                    # generation then cover every block that reached the disk.
                    self._save_entry(entry, size_on_disk=size_on_disk)
        except BaseException:
            entry.saved_row = None  # rolled back: the row on disk is unknown
            raise
        if inline and previous is not None and not previous.inline:
            # After the commit: a crash before this unlink leaves a file the next start removes.
            self._block_path(entry.id, index).unlink(missing_ok=True)

    def _forget_block(self, entry: Entry, index: int, *, remove_file: bool = True) -> None:
        info = self._blocks.pop((entry.id, index), None)
        if info is None:
            return
        self._entry_blocks.get(entry.id, set()).discard(index)
        self.used_bytes -= info.stored_bytes
        self._clean_lru.pop((entry.id, index), None)
        entry.unsynced.discard(index)
        if remove_file and not info.inline:
            self._block_path(entry.id, index).unlink(missing_ok=True)

    # ------------------------------------------------------------------ size bound

    @property
    def dirty_bytes(self) -> int:
        return sum(
            info.stored_bytes
            for (entry_id, _index), info in self._blocks.items()
            if info.write_generation > self._entries[entry_id].uploaded_generation
        )

    def _signal_space(self) -> None:
        self._space_freed.set()
        self._space_freed = trio.Event()

    def evict_clean(self, needed: int, *, storing_for: Entry | None = None) -> None:
        """Evict least-recently-used clean blocks until ``needed`` more bytes fit.

        An entry left with nothing is forgotten, except ``storing_for``, which is
        about to get a block.
        """
        while self.used_bytes + needed > self.max_size and self._clean_lru:
            (entry_id, index), _ = self._clean_lru.popitem(last=False)
            entry = self._entries[entry_id]
            self._forget_block(entry, index)
            self._db.execute("DELETE FROM blocks WHERE entry_id = ? AND block_index = ?", (entry_id, index))
            if entry is not storing_for:
                self.drop_if_empty(entry)

    def drop_if_empty(self, entry: Entry) -> None:
        """Forget an entry that holds nothing worth keeping: no blocks, no changes, not in use.

        Keeps the journal and the in-memory tables from growing with every file ever read.
        """
        in_use = entry.open_writers or entry.lock.locked() or entry.dirty
        if not in_use and not self._entry_blocks.get(entry.id) and self.is_live(entry):
            self.drop_entry(entry)

    async def ensure_space(self, needed: int, on_full: Callable[[], Awaitable[None]]) -> None:
        """Make room for ``needed`` bytes: evict clean blocks, else wait for uploads (backpressure).

        ``on_full`` is called when only dirty data is left; it should start
        uploads (the write-back queue) so that space frees up.
        """
        self.evict_clean(needed)
        if self.used_bytes + needed <= self.max_size:
            return
        self.waiting_for_space += 1
        try:
            while self.used_bytes + needed > self.max_size:
                waiter = self._space_freed
                await on_full()
                self.evict_clean(needed)
                if self.used_bytes + needed <= self.max_size:
                    return
                with trio.move_on_after(1.0):
                    await waiter.wait()
                self.evict_clean(needed)
        finally:
            self.waiting_for_space -= 1
