"""File attributes in S3 user metadata, and the local index that spares a HEAD per file.

Mode, owner, group and modification time travel with each object as
``x-amz-meta-mode``/``-uid``/``-gid``/``-mtime``, in s3fs-fuse's names and
encodings (decimal ``st_mode`` including the file type bits, decimal ids,
seconds with an optional ``.nnnnnnnnn`` fraction), so a bucket can be shared
with s3fs. A value that is missing or malformed counts as not stored: the
mount's defaults apply. These headers are not encrypted by SSE-C (see
docs/security.md), which is why extended attributes go in sealed
(``XattrSealer``, ``x-amz-meta-ssefs-xattrs``).

S3 listings carry size, ETag and time but no user metadata, so knowing a
file's mode means a keyed HEAD per object. ``MetadataIndex`` remembers the
attributes of each object key together with the ETag they were read from,
in ``metadata.sqlite`` in the cache directory: while a listing shows the same
ETag, the remembered attributes are current and no HEAD is needed, across
remounts too. Objects ssefs itself writes are entered as they are uploaded.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import sqlite3
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MODE, UID, GID, MTIME = "mode", "uid", "gid", "mtime"
# Extended attributes, sealed: x-amz-meta-ssefs-xattrs.
XATTRS = "ssefs-xattrs"
# An object uploaded while it was still being written (``streaming.py``) got its metadata before the
# file was complete; its final mode, owner, group and time are in its tag ATTRIBUTES_TAG, read only
# when this metadata name says so (a later self-copy or rename writes plain metadata, without it).
ATTRIBUTES_IN_TAG = "ssefs-attributes-in-tag"
ATTRIBUTES_TAG = "ssefs-attributes"
# S3 allows 2 KiB of user metadata per object (names and values of x-amz-meta-*).
USER_METADATA_LIMIT = 2048
XATTR_ASSOCIATED_DATA = b"ssefs xattrs v1"


@dataclass(frozen=True)
class FileAttributes:
    """What user metadata says about a file; ``None`` where it says nothing."""

    mode: int | None = None  # full st_mode, file type included
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    # Extended attributes as stored: sealed (see ``XattrSealer``), base64.
    xattrs: str | None = None

    def with_changes(
        self, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> FileAttributes:
        return replace(
            self,
            mode=self.mode if mode is None else mode,
            uid=self.uid if uid is None else uid,
            gid=self.gid if gid is None else gid,
            mtime_ns=self.mtime_ns if mtime_ns is None else mtime_ns,
        )


NO_ATTRIBUTES = FileAttributes()


def _digits(text: str) -> bool:
    return bool(text) and text.isascii() and text.isdigit()


def _integer(value: str | None, upper: int) -> int | None:
    if value is None or not _digits(value.strip()):
        return None
    number = int(value)
    return number if number < upper else None


def _nanoseconds(value: str | None) -> int | None:
    """Seconds with an optional fraction (s3fs writes up to nine digits), exactly, in nanoseconds."""
    if value is None:
        return None
    whole, _, fraction = value.strip().partition(".")
    if not _digits(whole.removeprefix("-")) or (fraction and not _digits(fraction)):
        return None
    nanoseconds = int(whole) * 1_000_000_000
    nanoseconds += (-1 if whole.startswith("-") else 1) * int(fraction[:9].ljust(9, "0") or "0")
    return nanoseconds if abs(nanoseconds) < 2**62 else None


def from_metadata(metadata: dict[str, str]) -> FileAttributes:
    """Read attributes from an object's user metadata (keys without ``x-amz-meta-``, any case)."""
    lowered = {name.lower(): value for name, value in metadata.items()}
    mode = _integer(lowered.get(MODE), 2**32)
    if mode is not None and stat.S_IFMT(mode) == 0:
        mode |= stat.S_IFREG  # some tools store permission bits only
    return FileAttributes(
        mode=mode, uid=_integer(lowered.get(UID), 2**32 - 1), gid=_integer(lowered.get(GID), 2**32 - 1),
        mtime_ns=_nanoseconds(lowered.get(MTIME)), xattrs=lowered.get(XATTRS) or None,
    )


def format_nanoseconds(nanoseconds: int) -> str:
    """As s3fs writes times: whole seconds, then a nine-digit fraction when there is one."""
    whole, fraction = divmod(nanoseconds, 1_000_000_000)
    return f"{whole}.{fraction:09d}" if fraction else str(whole)


def to_metadata(attributes: FileAttributes) -> dict[str, str]:
    """User metadata for an upload: only what is known."""
    metadata = {}
    if attributes.mode is not None:
        metadata[MODE] = str(attributes.mode)
    if attributes.uid is not None:
        metadata[UID] = str(attributes.uid)
    if attributes.gid is not None:
        metadata[GID] = str(attributes.gid)
    if attributes.mtime_ns is not None:
        metadata[MTIME] = format_nanoseconds(attributes.mtime_ns)
    if attributes.xattrs:
        metadata[XATTRS] = attributes.xattrs
    return metadata


def attributes_tag(attributes: FileAttributes) -> str:
    """The value of ``ATTRIBUTES_TAG``: ``mode=... uid=... gid=... mtime=...`` (what is known), within
    what S3 allows in a tag value (256 characters of letters, digits, spaces and ``+-=._:/@``)."""
    fields = to_metadata(replace(attributes, xattrs=None))
    return " ".join(f"{name}={value}" for name, value in fields.items())


def names_attributes_tag(metadata: dict[str, str]) -> bool:
    """Whether an object's metadata says its final attributes are in its tag (uploaded while written)."""
    return any(name.lower() == ATTRIBUTES_IN_TAG for name in metadata)


def with_tagged_attributes(metadata: dict[str, str], tag: str | None) -> tuple[dict[str, str], bool]:
    """An object's metadata with the attributes its tag holds, and whether they are final.

    Only metadata that names ``ATTRIBUTES_IN_TAG`` takes the tag; without the
    tag (the upload completed, its tag not yet set) the metadata stands, not final.
    """
    if not names_attributes_tag(metadata):
        return metadata, True
    if tag is None:
        return metadata, False
    merged = {name: value for name, value in metadata.items() if name.lower() not in (ATTRIBUTES_IN_TAG, MODE, UID,
                                                                                     GID, MTIME)}
    for field in tag.split():
        name, _, value = field.partition("=")
        if name in (MODE, UID, GID, MTIME) and value:
            merged[name] = value
    return merged, True


def metadata_size(metadata: dict[str, str]) -> int:
    """Bytes S3 counts against its user-metadata limit."""
    return sum(len(("x-amz-meta-" + name).encode()) + len(value.encode()) for name, value in metadata.items())


class XattrSealer:
    """Extended attributes in and out of their sealed form.

    SSE-C encrypts object data, not metadata: ``x-amz-meta-*`` values sit on
    the server in clear. So names and values are sealed together with AES-GCM
    under a key derived from the mount key (random nonce per sealing) and
    stored as one base64 value. A blob that fails to open reads as no
    extended attributes (and is logged by the caller). Blobs sealed under the
    derivation of a previous key still open; sealing always uses the first key.
    """

    def __init__(self, key: bytes, *older: bytes) -> None:
        self._cipher = AESGCM(key)
        self._older = [AESGCM(other) for other in older]

    def seal(self, xattrs: dict[bytes, bytes]) -> str | None:
        if not xattrs:
            return None
        plain = b"".join(
            len(name).to_bytes(2, "big") + name + len(value).to_bytes(4, "big") + value
            for name, value in sorted(xattrs.items())
        )
        nonce = secrets.token_bytes(12)
        return base64.b64encode(nonce + self._cipher.encrypt(nonce, plain, XATTR_ASSOCIATED_DATA)).decode("ascii")

    def open(self, blob: str | None) -> dict[bytes, bytes]:
        """The attributes in ``blob``; raises ``ValueError`` if it is damaged or sealed under another key."""
        if not blob:
            return {}
        try:
            raw = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("extended attributes cannot be opened (damaged)") from None
        for cipher in (self._cipher, *self._older):
            try:
                plain = cipher.decrypt(raw[:12], raw[12:], XATTR_ASSOCIATED_DATA)
                break
            except (InvalidTag, ValueError):
                continue
        else:
            raise ValueError("extended attributes cannot be opened (damaged, or sealed under another key)")
        xattrs, position = {}, 0
        while position < len(plain):
            name_length = int.from_bytes(plain[position:position + 2], "big")
            name = plain[position + 2:position + 2 + name_length]
            position += 2 + name_length
            value_length = int.from_bytes(plain[position:position + 4], "big")
            xattrs[name] = plain[position + 4:position + 4 + value_length]
            position += 4 + value_length
        return xattrs


def open_metadata_database(directory: Path) -> sqlite3.Connection:
    """``metadata.sqlite`` in the cache directory, readable by its owner only.

    What it holds can be learnt again from S3 (a lost update costs a HEAD, or
    a 403 and a retry with another key), so writes are not fsynced.
    """
    path = Path(directory) / "metadata.sqlite"
    database = sqlite3.connect(path, isolation_level=None)
    os.chmod(path, 0o600)
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("PRAGMA synchronous=OFF")
    return database


class StoredKeyIndex:
    """Which key (by fingerprint) each object not under the current key is stored with.

    Kept in ``metadata.sqlite`` so that after a key rotation each old object
    costs one refused request once, not on every read, across remounts too.
    Objects under the current key have no row: the table stays as small as
    what is left to re-encrypt.
    """

    def __init__(self, directory: Path) -> None:
        self._db = open_metadata_database(directory)
        self._db.execute("CREATE TABLE IF NOT EXISTS object_keys (object_key TEXT PRIMARY KEY, fingerprint TEXT)")
        self._fingerprints = dict(self._db.execute("SELECT object_key, fingerprint FROM object_keys").fetchall())

    def get(self, object_key: str) -> str | None:
        return self._fingerprints.get(object_key)

    def remember(self, object_key: str, fingerprint: str) -> None:
        self._fingerprints[object_key] = fingerprint
        self._db.execute("INSERT OR REPLACE INTO object_keys VALUES (?, ?)", (object_key, fingerprint))

    def forget(self, object_key: str) -> None:
        if self._fingerprints.pop(object_key, None) is not None:
            self._db.execute("DELETE FROM object_keys WHERE object_key = ?", (object_key,))

    def close(self) -> None:
        self._db.close()


# How many changed or forgotten keys to collect before writing their rows in one transaction.
WRITE_BATCH = 256


class MetadataIndex:
    """Attributes of objects by key, valid while the object keeps the ETag and LastModified
    (to the second) they were read with.

    The ETag alone is not enough: a metadata-only change (an s3fs chmod is a
    self-copy) keeps the data and so, on servers whose ETag is the data's MD5,
    the ETag. Attributes recorded from our own uploads and copies have no
    LastModified yet (S3 does not return it): the first listing that shows the
    same ETag supplies it.
    """

    def __init__(self, directory: Path) -> None:
        self._db = open_metadata_database(directory)
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(attributes)")]
        if columns and "mtime_ns" not in columns:
            self._db.execute("DROP TABLE attributes")  # an older layout: it is only a cache
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS attributes (object_key TEXT PRIMARY KEY, etag TEXT NOT NULL, "
            "last_modified INTEGER, mode INTEGER, uid INTEGER, gid INTEGER, mtime_ns INTEGER, xattrs TEXT)"
        )
        self._forgotten: set[str] = set()
        self._unsaved: set[str] = set()
        self._known: dict[str, tuple[str, int | None, FileAttributes]] = {
            key: (etag, last_modified, FileAttributes(mode, uid, gid, mtime_ns, xattrs))
            for key, etag, last_modified, mode, uid, gid, mtime_ns, xattrs in self._db.execute(
                "SELECT * FROM attributes"
            )
        }

    def get(self, object_key: str, etag: str, last_modified: float) -> FileAttributes | None:
        known = self._known.get(object_key)
        if known is None or known[0] != etag or not etag:
            return None
        if known[1] is None:
            self.put(object_key, etag, known[2], last_modified)
        elif known[1] != int(last_modified):
            return None
        return known[2]

    def put(
        self, object_key: str, etag: str, attributes: FileAttributes, last_modified: float | None = None
    ) -> None:
        row = (etag, None if last_modified is None else int(last_modified), attributes)
        self._forgotten.discard(object_key)
        if self._known.get(object_key) == row:
            return
        self._known[object_key] = row
        self._unsaved.add(object_key)
        self._write_if_due()

    def put_many(self, rows: list[tuple[str, str, FileAttributes, float]]) -> None:
        """Attributes learnt for a whole listing: written at once."""
        for object_key, etag, attributes, last_modified in rows:
            self.put(object_key, etag, attributes, last_modified)
        self.write()

    def forget(self, object_key: str) -> None:
        if self._known.pop(object_key, None) is not None:
            self._unsaved.discard(object_key)
            self._forgotten.add(object_key)
            self._write_if_due()

    def forget_now(self, object_key: str) -> None:
        """Forget the key's row, on disk at once: before this mount changes the object in a way that
        may keep its ETag and the second of its LastModified (a chmod's self-copy, an upload of the
        same bytes). A crash that lost the new row must not leave the old one to match the new object."""
        if object_key in self._known or object_key in self._forgotten:
            self.forget(object_key)
            self.write()

    def _write_if_due(self) -> None:
        # Rows are written in batches: one statement per file made an unlink a
        # third slower and a lookup twice as slow. What a crash loses is
        # learnt again (a HEAD); a stale row matches no listing, except one of an
        # object this mount changed without changing its ETag: ``forget_now`` first.
        if len(self._unsaved) + len(self._forgotten) >= WRITE_BATCH:
            self.write()

    def write(self) -> None:
        """Write the rows changed or forgotten since the last write, in one transaction."""
        if not self._unsaved and not self._forgotten:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany("DELETE FROM attributes WHERE object_key = ?", [(key,) for key in self._forgotten])
            rows = []
            for object_key in self._unsaved:
                etag, last_modified, attributes = self._known[object_key]
                rows.append((object_key, etag, last_modified, attributes.mode, attributes.uid, attributes.gid,
                             attributes.mtime_ns, attributes.xattrs))
            self._db.executemany("INSERT OR REPLACE INTO attributes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        finally:
            self._db.execute("COMMIT")
        self._forgotten.clear()
        self._unsaved.clear()

    def close(self) -> None:
        self.write()
        self._db.close()
