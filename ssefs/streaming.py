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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .cache import Entry
from .cachedfile import CachedFile
from .config import S3Settings
from .errors import SsefsError
from .metadata import ATTRIBUTES_IN_TAG, FileAttributes, to_metadata
from .store import ObjectStore

log = logging.getLogger(__name__)

# A file starts streaming once it holds this many parts: smaller files upload whole after close
# (a single PUT up to the multipart threshold), and an append-only run this long is unlikely to be
# a file that goes back to rewrite its start.
STREAM_AFTER_PARTS = 4
# S3 allows at most 10,000 parts; a file that outgrows them uploads whole (with larger parts).
MAX_STREAMED_PARTS = 10_000


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

    @property
    def fixed_bytes(self) -> int:
        return self.claimed * self.part_size


class StreamedUploads:
    """The streams of all files being written; see the module docstring."""

    def __init__(self, store: ObjectStore, settings: S3Settings, cached_file: Callable[[Entry], CachedFile]) -> None:
        self.store = store
        self.settings = settings
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

    def __len__(self) -> int:
        """Files whose parts are being uploaded while they are written."""
        return len(self._streams)

    # ------------------------------------------------------------------ the writer's side

    def before_change(self, entry: Entry, offset: int) -> None:
        """Bytes from ``offset`` on are about to change (a write, or a truncate to ``offset``)."""
        stream = self._streams.get(entry.id)
        if stream is not None and offset < stream.fixed_bytes:
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

    def streaming(self, entry: Entry) -> bool:
        return entry.id in self._streams

    # ------------------------------------------------------------------ the uploader's side

    async def take(self, entry: Entry, size: int) -> StreamedUpload | None:
        """The entry's stream, its parts in flight done, if it can finish the upload of ``size`` bytes
        with the entry's current attributes; else None (and the stream is abandoned)."""
        stream = self._streams.get(entry.id)
        if stream is None:
            self._detach(entry, "uploaded whole")  # an upload being created is aborted once it is there
            return None
        if stream.in_flight:
            await stream.idle.wait()
        problem = None
        if stream.abandoned:
            problem = "a part failed"
        elif stream.object_key != entry.object_key:
            problem = "renamed"
        elif size < stream.fixed_bytes or size > MAX_STREAMED_PARTS * stream.part_size:
            problem = "its size no longer fits the parts"
        elif entry.attributes.xattrs != stream.attributes.xattrs:
            problem = "its extended attributes changed"
        if problem is not None:
            # Aborted here, not in the background: at unmount the mount's nursery is gone.
            abandoned = self._detach(entry, problem)
            if abandoned is not None:
                await self._abort(abandoned)
            return None
        del self._streams[entry.id]
        self._declined.discard(entry.id)
        return stream

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
        try:
            async with self._parts_at_once:
                if stream.abandoned:
                    return
                offset = index * stream.part_size
                data = await self._cached_file(entry).read(offset, stream.part_size, keep=False)
                if stream.abandoned:
                    return
                if len(data) != stream.part_size:
                    raise SsefsError(f"part {index + 1} of {stream.object_key!r} read short ({len(data)} bytes)")
                stream.etags[index] = await self.store.upload_part(stream.object_key, stream.upload_id, index + 1,
                                                                   data)
        except (SsefsError, OSError) as error:
            log.debug("part %d of %r could not be sent while the file is written: %s", index + 1,
                      stream.object_key, error)
            if self._streams.get(entry.id) is stream:
                self.abandon(entry, "a part failed")
        finally:
            stream.in_flight -= 1
            if not stream.in_flight:
                stream.idle.set()

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
