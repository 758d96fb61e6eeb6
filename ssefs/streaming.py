"""Uploading a large file while it is still being written.

``StreamedUploads`` owns, per cache entry, a multipart upload that runs ahead
of the file's regular upload. A file that depends on no stored object (a new
file, or one truncated to nothing) and is being appended to starts one once it
holds ``STREAM_AFTER_PARTS`` parts; from then on each part is sent as soon as
the writer is a whole part past its end, at most ``upload_concurrency`` parts
at once over all files (so memory stays bounded). When the write-back queue
uploads the file (after close, at fsync), ``take`` hands the stream over and
only the tail is left to send. S3 fixes an object's metadata at
CreateMultipartUpload, before the file's time is final, so the upload is
created with ``ATTRIBUTES_IN_TAG`` and the uploader puts the final attributes
in the object's tag (metadata.py). Anything that could make a part already
handed out wrong abandons the stream: a write or truncate behind the parts
given out, a rename, an unlink, extended attributes changed; its upload is
aborted once its parts in flight are done, and the file uploads whole as it
did before. Parts cut off by an unmount are simply left unsent: the uploader
sends every part a stream lacks when it finishes it. A crash leaves the upload
in the journal of unfinished multipart uploads (aborted at the next start) and
the file dirty in the cache.

A file larger than the cache: while the cache is nearly full, the parts sent
are *parked* (``BlockCache.park``): their blocks leave the cache and the parts
on the server are the only copy of those bytes. From then on the stream is
never abandoned: a failed part is sent again, a change, read, rename or
extended attribute that would need those bytes or abandon the stream finishes
the upload first (``must_finish_before_change``, ``has_parked``; vfs.py), and a
crash leaves the upload to be resumed by the next start (``resume``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .cache import BlockCache, Entry, ParkedUpload
from .cachedfile import CachedFile
from .config import S3Settings
from .errors import SsefsError
from .keys import SseKey
from .metadata import ATTRIBUTES_IN_TAG, FileAttributes, to_metadata
from .store import ObjectStore

log = logging.getLogger(__name__)

# A file starts streaming once it holds this many parts: smaller files upload whole after close
# (a single PUT up to the multipart threshold), and an append-only run this long is unlikely to be
# a file that goes back to rewrite its start.
STREAM_AFTER_PARTS = 4
# S3 allows at most 10,000 parts; a file that outgrows them uploads whole (with larger parts).
MAX_STREAMED_PARTS = 10_000
# Parts sent are parked as soon as they land once the cache is this full (or a writer waits for room):
# below it, their blocks stay cached, so a file read back or rewritten right after it was written
# need not finish its upload first.
PARK_ABOVE = 0.9
# A part of a stream with parked parts that failed is sent again after this long, doubling up to the cap.
PART_RETRY_FIRST_SECONDS = 1.0
PART_RETRY_MAX_SECONDS = 60.0


@dataclass(eq=False)
class StreamedUpload:
    """One multipart upload running ahead of a file's writer."""

    object_key: str
    upload_id: str
    part_size: int
    # The attributes the upload was created with (its extended attributes cannot change later).
    attributes: FileAttributes
    # ETags of the parts sent, by part index (0-based).
    etags: dict[int, str] = field(default_factory=dict)
    # Parts handed out so far: the bytes below ``claimed * part_size`` must not change any more.
    claimed: int = 0
    in_flight: int = 0
    abandoned: bool = False
    idle: trio.Event = field(default_factory=trio.Event)
    # Parts whose blocks left the cache (parked): the upload now holds the only copy of their bytes.
    parked: int = 0
    # Resumed from an upload completed just before a crash: only its attributes are left to do.
    completed_etag: str | None = None
    # Set once the uploader takes the stream to finish it: parts being sent again stop (it sends them).
    finishing: trio.Event = field(default_factory=trio.Event)
    # The SSE-C key every part must be sent under: the one the upload was created under (None: the current
    # key; another only for an upload resumed after a key rotation).
    key: SseKey | None = None

    @property
    def fixed_bytes(self) -> int:
        return self.claimed * self.part_size


class StreamedUploads:
    """The streams of all files being written; see the module docstring."""

    def __init__(self, store: ObjectStore, settings: S3Settings, cache: BlockCache,
                 cached_file: Callable[[Entry], CachedFile]) -> None:
        self.store = store
        self.settings = settings
        self.cache = cache
        self._cached_file = cached_file
        self.enabled = settings.stream_uploads
        # Where parts are sent; set by the mount while it serves (no streaming without it).
        self.nursery: trio.Nursery | None = None
        self._streams: dict[int, StreamedUpload] = {}
        self._starting: set[int] = set()
        # Entries abandoned or uploaded whole while their upload was being created: it is aborted.
        self._cancelled_starts: set[int] = set()
        # Entries still open for writing whose stream was abandoned: they upload whole, and do not start
        # another one until their last writer closes them.
        self._declined: set[int] = set()
        self._parts_at_once = trio.CapacityLimiter(settings.upload_concurrency)
        self.started = 0
        self.abandoned = 0
        self.parked_bytes = 0
        # A task parking the parts sent is on its way (one at a time is enough: it parks them all).
        self._parking = False

    def __len__(self) -> int:
        """Files whose parts are being uploaded while they are written."""
        return len(self._streams)

    # ------------------------------------------------------------------ the writer's side

    def must_finish_before_change(self, entry: Entry, offset: int, end: int = 0) -> bool:
        """Whether a change of the bytes from ``offset`` (to ``end``) must wait for the upload to finish:
        it would abandon a stream whose parked parts hold the only copy of the file's first bytes."""
        stream = self._streams.get(entry.id)
        if stream is None or not stream.parked:
            return False
        return offset < stream.fixed_bytes or end > MAX_STREAMED_PARTS * stream.part_size

    def sending(self) -> bool:
        """Whether parts of any file are on their way now (or an upload to send them is being created)."""
        return bool(self._starting) or any(stream.in_flight for stream in self._streams.values())

    def has_parked(self, entry: Entry) -> bool:
        stream = self._streams.get(entry.id)
        return stream is not None and stream.parked > 0

    def before_change(self, entry: Entry, offset: int) -> None:
        """Bytes from ``offset`` on are about to change (a write, or a truncate to ``offset``)."""
        stream = self._streams.get(entry.id)
        if stream is not None and offset < stream.fixed_bytes:
            if stream.parked:  # callers finish the upload first (must_finish_before_change)
                raise SsefsError(f"{entry.object_key!r} changed behind the parts of its unfinished upload")
            self.abandon(entry, "a change behind the parts sent")

    def after_write(self, entry: Entry, end: int) -> None:
        """A write ending at ``end`` is done: start a stream, or hand out the parts now behind the writer."""
        stream = self._streams.get(entry.id)
        if stream is None:
            if self._may_start(entry, end):
                assert self.nursery is not None
                self._starting.add(entry.id)
                self.nursery.start_soon(self._start, entry)
            return
        if entry.object_key != stream.object_key:
            self.abandon(entry, "renamed")
            return
        self._hand_out(entry, stream)

    def abandon(self, entry: Entry, reason: str) -> None:
        """Stop streaming ``entry``: it uploads whole; the upload is aborted once its parts are done."""
        stream = self._detach(entry, reason)
        if stream is not None and self.nursery is not None:
            try:
                self.nursery.start_soon(self._abort, stream)
            except RuntimeError:
                pass  # the mount has stopped serving: the next start aborts it (it is journaled)

    def _detach(self, entry: Entry, reason: str) -> StreamedUpload | None:
        """Take ``entry``'s stream out of service (its upload still to be aborted by the caller)."""
        self._decline(entry)
        if entry.id in self._starting:
            self._cancelled_starts.add(entry.id)
        stream = self._streams.pop(entry.id, None)
        if stream is not None:
            log.debug("no longer uploading %r while it is written: %s", stream.object_key, reason)
            self.abandoned += 1
            stream.abandoned = True
        return stream

    def _decline(self, entry: Entry) -> None:
        """No new stream for ``entry`` until its last writer closes it (``closed`` forgets it then;
        without a writer nothing is remembered, so deleted files leave nothing behind)."""
        if entry.open_writers:
            self._declined.add(entry.id)

    def closed(self, entry: Entry) -> None:
        """The file's last writer closed it: a later writer may stream it again."""
        if entry.id not in self._streams:
            self._declined.discard(entry.id)

    def streaming(self, entry: Entry, *, or_starting: bool = False) -> bool:
        return entry.id in self._streams or (or_starting and entry.id in self._starting)

    # ------------------------------------------------------------------ the uploader's side

    async def take(self, entry: Entry, size: int) -> StreamedUpload | None:
        """The entry's stream, its parts in flight done, if it can finish the upload of ``size`` bytes
        with the entry's current attributes; else None (and the stream is abandoned)."""
        stream = self._streams.get(entry.id)
        if stream is None:
            self._detach(entry, "uploaded whole")  # an upload being created is aborted once it is there
            return None
        stream.finishing.set()
        if stream.in_flight:
            await stream.idle.wait()
        problem = None
        if stream.completed_etag is not None:
            pass  # completed already: the entry cannot have changed since (it was not served)
        elif stream.abandoned:
            problem = "a part failed"
        elif stream.object_key != entry.object_key:
            problem = "renamed"
        elif size < stream.fixed_bytes or size > MAX_STREAMED_PARTS * stream.part_size:
            problem = "its size no longer fits the parts"
        elif entry.attributes.xattrs != stream.attributes.xattrs:
            problem = "its extended attributes changed"
        if problem is not None and stream.parked:
            # vfs.py finishes such an upload before anything that could make it wrong.
            log.error("the upload of %r holding its first %d bytes cannot be finished (%s); retried later",
                      stream.object_key, stream.parked * stream.part_size, problem)
            stream.finishing = trio.Event()
            raise SsefsError(f"cannot finish the upload of {stream.object_key!r}: {problem}")
        if problem is not None:
            # Aborted here, not in the background: at unmount the mount's nursery is gone.
            abandoned = self._detach(entry, problem)
            if abandoned is not None:
                await self._abort(abandoned)
            return None
        del self._streams[entry.id]
        self._declined.discard(entry.id)
        return stream

    def put_back(self, entry: Entry, stream: StreamedUpload) -> None:
        """A stream ``take`` handed out could not be finished; with parked parts it must be, later."""
        if self.cache.is_live(entry) and entry.id not in self._streams:
            stream.finishing = trio.Event()
            self._streams[entry.id] = stream

    def resume(self, parked: ParkedUpload) -> None:
        """Take up again an upload whose parked parts an earlier run left (the uploader finishes it), under
        the key it was created under, which a key rotation since may have made a previous key."""
        entry = parked.entry
        key = self.store.keys.by_fingerprint(parked.key_fingerprint) if parked.key_fingerprint else None
        if parked.key_fingerprint and key is None:
            log.error("the unfinished upload of %r, which alone holds its first %d bytes, was begun under the SSE-C "
                      "key with fingerprint %s, which this mount does not have: mount with that key (as the key or "
                      "in previous_keys) to finish it", entry.object_key, entry.parked_bytes, parked.key_fingerprint)
            return
        count = entry.parked_bytes // parked.part_size
        missing = [index + 1 for index in range(count) if index not in parked.etags]
        if missing:
            log.error("the journal lacks parts %s of the unfinished upload of %r; it cannot be finished",
                      missing[:10], entry.object_key)
        stream = StreamedUpload(entry.object_key, parked.upload_id, parked.part_size, entry.attributes,
                                etags=dict(parked.etags), claimed=count, parked=count,
                                completed_etag=parked.completed_etag,
                                key=None if key is self.store.keys.current else key)
        stream.idle.set()
        self._streams[entry.id] = stream
        log.info("resuming the upload of %r, whose first %d bytes an earlier run sent and left only there",
                 entry.object_key, entry.parked_bytes)

    # ------------------------------------------------------------------ parking (cache pressure)

    def _pressed(self) -> bool:
        return bool(self.cache.waiting_for_space) or self.cache.used_bytes > self.cache.max_size * PARK_ABOVE

    async def park_sent_parts(self) -> int:
        """Let the blocks of every part sent leave the cache (see the module docstring); returns the bytes parked."""
        parked = 0
        for entry_id, stream in list(self._streams.items()):
            parked += await self._park(entry_id, stream)
        return parked

    async def _park_in_background(self) -> None:
        try:
            while self._pressed() and await self.park_sent_parts():
                pass
        finally:
            self._parking = False

    async def _park(self, entry_id: int, stream: StreamedUpload) -> int:
        entry = self.cache.entry_by_id(entry_id)
        if entry is None:
            return 0
        async with entry.lock:
            if self._streams.get(entry_id) is not stream or not self.cache.is_live(entry) or stream.completed_etag:
                return 0
            first = upto = stream.parked
            while upto in stream.etags:
                upto += 1
            if upto == first:
                return 0
            # Set before the journal says so: from here on nothing may abandon (abort) this upload.
            stream.parked = upto
            await self.cache.park(entry, stream.upload_id, stream.part_size,
                                  {index: stream.etags[index] for index in range(first, upto)})
        parked = (upto - first) * stream.part_size
        self.parked_bytes += parked
        return parked

    # ------------------------------------------------------------------ inside

    def _may_start(self, entry: Entry, end: int) -> bool:
        return (
            self.enabled and self.nursery is not None and end == entry.size
            and entry.size >= STREAM_AFTER_PARTS * self.settings.part_size
            and entry.base_valid == 0 and not entry.unlinked
            and entry.id not in self._declined and entry.id not in self._starting
        )

    async def _start(self, entry: Entry) -> None:
        object_key, attributes, uploaded = entry.object_key, entry.attributes, entry.uploaded_generation
        try:
            upload_id = await self.store.create_multipart(object_key, {**to_metadata(attributes),
                                                                       ATTRIBUTES_IN_TAG: "1"})
        except SsefsError as error:
            log.debug("could not start uploading %r while it is written: %s", object_key, error)
            self._decline(entry)
            return
        finally:
            self._starting.discard(entry.id)
            cancelled = entry.id in self._cancelled_starts
            self._cancelled_starts.discard(entry.id)
        stream = StreamedUpload(object_key, upload_id, self.settings.part_size, attributes)
        stream.idle.set()
        self.started += 1
        self._streams[entry.id] = stream
        # The file may have been uploaded whole, renamed, unlinked or dropped while the upload was being
        # created. Closed meanwhile, it streams all the same: the upload after close takes the stream.
        if (cancelled or entry.object_key != object_key or entry.base_valid
                or entry.uploaded_generation != uploaded):
            self.abandon(entry, "changed while the upload was being created")
            return
        log.debug("uploading %r while it is written", object_key)
        self._hand_out(entry, stream)

    def _hand_out(self, entry: Entry, stream: StreamedUpload) -> None:
        """Send every part the writer is a whole part past (it may still rewrite just behind itself)."""
        assert self.nursery is not None
        while (stream.claimed + 2) * stream.part_size <= entry.size and stream.claimed < MAX_STREAMED_PARTS - 1:
            index = stream.claimed
            stream.claimed += 1
            if not stream.in_flight:
                stream.idle = trio.Event()
            stream.in_flight += 1
            self.nursery.start_soon(self._send, entry, stream, index)

    async def _send(self, entry: Entry, stream: StreamedUpload, index: int) -> None:
        # Cancelled (the mount is stopping), the part is just left unsent: the uploader sends every
        # part the stream lacks when it finishes it (at unmount too), so nothing is aborted or wasted.
        retry_in = PART_RETRY_FIRST_SECONDS
        try:
            while not await self._send_once(entry, stream, index):
                # Its parked parts cannot be given up: send this one again (the file is still being written).
                with trio.move_on_after(retry_in):
                    await stream.finishing.wait()
                retry_in = min(PART_RETRY_MAX_SECONDS, retry_in * 2)
                if self._streams.get(entry.id) is not stream or stream.finishing.is_set():
                    return  # taken by the uploader, which sends what is missing
        finally:
            stream.in_flight -= 1
            if not stream.in_flight:
                stream.idle.set()
        if index in stream.etags and self._pressed() and not self._parking and self.nursery is not None:
            self._parking = True
            self.nursery.start_soon(self._park_in_background)

    async def _send_once(self, entry: Entry, stream: StreamedUpload, index: int) -> bool:
        """Send one part; False if it failed and must be sent again."""
        try:
            async with self._parts_at_once:
                if stream.abandoned:
                    return True
                offset = index * stream.part_size
                data = await self._cached_file(entry).read(offset, stream.part_size, keep=False)
                if stream.abandoned:
                    return True
                if len(data) != stream.part_size:
                    raise SsefsError(f"part {index + 1} of {stream.object_key!r} read short ({len(data)} bytes)")
                stream.etags[index] = await self.store.upload_part(stream.object_key, stream.upload_id, index + 1,
                                                                   data, key=stream.key)
        except (SsefsError, OSError) as error:
            log.debug("part %d of %r could not be sent while the file is written: %s", index + 1,
                      stream.object_key, error)
            if self._streams.get(entry.id) is not stream:
                return True
            if stream.parked:
                log.warning("part %d of %r could not be sent (%s); sending it again", index + 1,
                            stream.object_key, error)
                return False
            self.abandon(entry, "a part failed")
        return True

    async def _abort(self, stream: StreamedUpload) -> None:
        if stream.in_flight:
            await stream.idle.wait()
        # Shielded: at unmount the abort still goes out (else the next start aborts it, from the journal).
        with trio.CancelScope(shield=True):
            try:
                await self.store.abort_multipart(stream.object_key, stream.upload_id)
            except SsefsError as error:
                log.warning("could not abort the multipart upload of %r (retried at the next start): %s",
                            stream.object_key, error)
