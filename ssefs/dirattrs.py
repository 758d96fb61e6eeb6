"""Directory attributes: mode, owner, time and xattrs of subdirectories, in one object per parent.

S3 has no object for a directory that could carry metadata: implicit
directories have none, and SeaweedFS drops the metadata of ``dir/`` markers.
So the attributes of the subdirectories of a directory live in one small
object inside it, ``.ssefs-dirs`` (a JSON map from subdirectory name to
attributes; its body is encrypted with SSE-C like any file). A listing of the
parent shows the object's ETag, so the map is fetched only when it changed.
ssefs hides the name; other tools see a file. A directory with no entry
shows the mount's defaults. Changes are read-modify-write of the whole map,
one at a time per parent within this mount (two mounts changing attributes
of sibling directories at the same moment may lose one change).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict

import trio

from .errors import NoSuchObject, ServerUnavailable, SsefsError
from .metadata import FileAttributes
from .store import ObjectStore

log = logging.getLogger(__name__)

SIDECAR_NAME = ".ssefs-dirs"
FORMAT = 1
# Far more than a map of thousands of subdirectories needs; a bound on what one read holds.
MAX_SIDECAR_BYTES = 16 * 1024 * 1024

DirectoryMap = dict[str, FileAttributes]


def encode(directories: DirectoryMap) -> bytes:
    body = {"format": FORMAT, "directories": {name: asdict(attributes) for name, attributes in directories.items()}}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode(data: bytes) -> DirectoryMap:
    """The map in ``data``; entries that do not parse are left out.

    Raises ``ValueError`` when ``data`` is not such a map at all (another tool wrote the object).
    """
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not valid JSON") from None
    entries = body.get("directories") if isinstance(body, dict) else None
    if not isinstance(entries, dict):
        raise ValueError("not a map of directory attributes")
    directories: DirectoryMap = {}
    for name, fields in entries.items():
        try:
            directories[str(name)] = FileAttributes(
                mode=_int_or_none(fields.get("mode")), uid=_int_or_none(fields.get("uid")),
                gid=_int_or_none(fields.get("gid")), mtime_ns=_nanoseconds_or_none(fields.get("mtime_ns")),
                xattrs=fields.get("xattrs") if isinstance(fields.get("xattrs"), str) else None,
            )
        except (AttributeError, TypeError, ValueError):
            continue
    return directories


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 else None


def _nanoseconds_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**62 else None


class DirectoryAttributes:
    """Reads and changes the ``.ssefs-dirs`` object of each directory."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        # Per directory prefix: the ETag of the object last read or written, and its map (empty for
        # an object that could not be read or parsed: reported once, fetched again once it changes).
        self._known: dict[str, tuple[str, DirectoryMap]] = {}
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)

    async def load(self, prefix: str, etag: str | None) -> DirectoryMap:
        """The map of the directory at ``prefix``, given the ETag its listing shows (None: no object)."""
        if not etag:
            self._known.pop(prefix, None)
            return {}
        known = self._known.get(prefix)
        if known is not None and known[0] == etag:
            return known[1]
        try:
            directories = decode(await self._store.get_range(prefix + SIDECAR_NAME, 0, MAX_SIDECAR_BYTES))
        except ServerUnavailable as error:
            # Not remembered: the next listing tries again.
            log.warning("directory attributes in %r cannot be read now: %s", prefix + SIDECAR_NAME, error)
            return {}
        except (SsefsError, ValueError) as error:
            log.warning(
                "directory attributes in %r cannot be read (subdirectories show the mount's defaults): %s",
                prefix + SIDECAR_NAME, error,
            )
            directories = {}
        self._known[prefix] = (etag, directories)
        return directories

    async def set(self, prefix: str, name: str, attributes: FileAttributes | None) -> None:
        """Record (or with None, remove) the attributes of subdirectory ``name`` of ``prefix``."""
        key = prefix + SIDECAR_NAME
        async with self._locks[prefix]:
            try:
                directories = decode(await self._store.get_range(key, 0, MAX_SIDECAR_BYTES))
            except NoSuchObject:
                directories = {}
            except ValueError as error:
                log.warning("directory attributes in %r were unreadable (%s) and are replaced", key, error)
                directories = {}
            if attributes is None:
                if name not in directories:
                    return
                del directories[name]
            else:
                directories[name] = attributes
            if directories:
                etag = await self._store.put(key, encode(directories))
                self._known[prefix] = (etag, directories)
            else:
                try:
                    await self._store.delete(key)
                except NoSuchObject:
                    pass
                self._known.pop(prefix, None)
