"""The write-back queue: when and how cached changes travel to S3.

``WriteBack`` keeps a due time per dirty entry. A file is uploaded once it has
no open writers and ``writeback_delay`` seconds passed since its last change
(so editors' write-rename sequences and ``tar`` cause one upload, not many);
``fsync`` and rename upload at once. At most ``MAX_FILES_IN_FLIGHT`` files
upload together. A failed upload is retried with capped exponential backoff
(1 s doubling to 5 min) and never dropped: the data stays in the cache, also
across restarts. When the cache is full of dirty data, ``make_room`` first parks
the parts that files being written have sent (streaming.py), and if that frees
nothing makes every dirty entry due at once, open ones included, so writers
waiting for space move on; files being written and streamed are left out while
parts or uploads are on their way (they make room as they land).

``upload_object`` decides how one object's bytes travel: up to
``multipart_threshold`` one PutObject; above it a multipart upload whose parts
are read from the cache (missing ranges from the object the entry is based on)
and sent by at most ``upload_concurrency`` workers, so memory stays bounded by
``upload_concurrency * part_size`` whatever the file size; any failure aborts
the multipart upload so a failed upload leaves no orphaned parts (a crash
mid-upload can; see docs/cache.md). The part size grows for
huge files so that no upload needs more than S3's 10,000 parts.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from .cache import BLOCK_SIZE, BlockCache, Entry
from .cachedfile import CachedFile
from .config import MAX_PART_SIZE, MiB, S3Settings
from .errors import NoSuchObject, SsefsError, unwrap_group
from .keys import SseKey
from .metadata import attributes_tag, to_metadata
from .store import PENDING_CREATE_PREFIX, ObjectInfo, ObjectStore
from .streaming import StreamedUpload, StreamedUploads

log = logging.getLogger(__name__)

# S3 allows at most 10,000 parts per multipart upload.
MAX_PARTS = 10_000
# Two files at once keep a 2-core machine's upload path busy without letting
# one huge file starve small ones; each file has its own parallel parts.
MAX_FILES_IN_FLIGHT = 2
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# A full cache with nothing on its way to S3 for this long: files being written and streamed are uploaded as
# they stand to make room (see make_room).
FULL_AND_IDLE_SECONDS = 1.0

ReadRange = Callable[[int, int], Awaitable[bytes]]
# For a byte range, the key of an object that holds exactly those bytes at the same offsets, if any.
CopySource = Callable[[int, int], str | None]
T = TypeVar("T")


def part_size_for(total_size: int, configured: int) -> int:
    """The configured part size, grown (in whole MiB) when it would need more than 10,000 parts."""
    needed = math.ceil(total_size / MAX_PARTS)
    if needed <= configured:
        return configured
    return min(MAX_PART_SIZE, math.ceil(needed / MiB) * MiB)


async def upload_object(
    store: ObjectStore, settings: S3Settings, object_key: str, size: int, read: ReadRange,
    metadata: dict[str, str] | None = None, copy_source: CopySource = lambda start, end: None,
) -> str:
    """Upload ``size`` bytes produced by ``read(offset, length)`` as ``object_key``; returns the ETag.

    Parts whose bytes are unchanged in an existing object (``copy_source``) are
    copied server-side with UploadPartCopy where the server supports it.
    """
    if size <= settings.multipart_threshold:
        return await store.put(object_key, await read(0, size), metadata)

    part_size = part_size_for(size, settings.part_size)
    part_count = math.ceil(size / part_size)
    upload_id = await store.create_multipart(object_key, metadata)
    etags: list[str] = [""] * part_count
    log.debug("multipart upload of %r: %d parts of %d bytes", object_key, part_count, part_size)
    try:
        await send_parts(store, settings, object_key, upload_id, range(part_count), part_size, size, read, etags,
                         copy_source)
        return await store.complete_multipart(object_key, upload_id, etags)
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await store.abort_multipart(object_key, upload_id)
            except Exception as abort_error:  # noqa: BLE001 - the original error matters more
                log.warning("could not abort multipart upload of %r: %s", object_key, abort_error)
        raise


async def send_parts(
    store: ObjectStore, settings: S3Settings, object_key: str, upload_id: str, part_indexes: Sequence[int],
    part_size: int, size: int, read: ReadRange, etags: list[str],
    copy_source: CopySource = lambda start, end: None, key: SseKey | None = None,
) -> None:
    """Upload the parts ``part_indexes`` (their ETags into ``etags``), ``upload_concurrency`` at once
    (so at most that many parts are in memory), under ``key`` (default: the current key)."""

    async def send(part_index: int) -> None:
        offset = part_index * part_size
        end = min(offset + part_size, size)
        source = copy_source(offset, end)
        if source is not None:
            copied = await store.upload_part_copy(object_key, upload_id, part_index + 1, source, offset, end)
            if copied is not None:
                etags[part_index] = copied
                return
        data = await read(offset, end - offset)
        etags[part_index] = await store.upload_part(object_key, upload_id, part_index + 1, data, key=key)

    await for_each(part_indexes, settings.upload_concurrency, send)


async def for_each(items: Sequence[T], jobs: int, work: Callable[[T], Awaitable[None]]) -> None:
    """Run ``work`` on every item, at most ``jobs`` at once; the first failure cancels the rest and is
    raised as itself.

    A zero-capacity channel hands each item to an idle worker, so no item is
    taken (and its data read) before a worker is free for it.
    """
    send, receive = trio.open_memory_channel[T](0)

    async def worker(items_in: trio.MemoryReceiveChannel[T]) -> None:
        async with items_in:
            async for item in items_in:
                await work(item)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, min(jobs, len(items)))):
                nursery.start_soon(worker, receive.clone())
            async with send, receive:
                for item in items:
                    await send.send(item)
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None


async def abort_unfinished_uploads(store: ObjectStore, cache: BlockCache) -> None:
    """Abort the multipart uploads an earlier run started and never finished (it was killed).

    Their parts are invisible but stored (and billed) until aborted. Only
    uploads this cache recorded are touched, never another client's, and never
    one holding parked parts of a file (``cache.parked_uploads``): it is resumed.
    """
    aborted = 0
    resumed = {parked.upload_id for parked in cache.parked_uploads()}
    for object_key, upload_id, started in cache.unfinished_multiparts():
        if upload_id in resumed:
            continue
        if upload_id.startswith(PENDING_CREATE_PREFIX):
            # Killed while a CreateMultipartUpload had no answer: whatever it created is a stray.
            if await store.abort_stray_uploads(object_key, started, started, keep=None):
                cache.multipart_finished(upload_id)
            continue
        try:
            await store.abort_multipart(object_key, upload_id)
            aborted += 1
        except NoSuchObject:  # completed after all, or aborted by a lifecycle rule
            cache.multipart_finished(upload_id)
        except SsefsError as error:
            log.warning("could not abort the unfinished multipart upload of %r (retried next start): %s",
                        object_key, error)
    if aborted:
        log.info("aborted %d multipart upload(s) left unfinished by an earlier run", aborted)


async def copy_object(
    store: ObjectStore, settings: S3Settings, source: ObjectInfo, target_key: str, metadata: dict[str, str],
    *, multipart_above: int = MAX_PART_SIZE,
) -> str:
    """Server-side copy of ``source`` to ``target_key`` with ``metadata``; returns the new ETag.

    CopyObject stops at 5 GiB (``multipart_above``, lowered only by tests):
    larger objects are copied part by part (UploadPartCopy), and where the
    server does not implement that (SeaweedFS with SSE-C), the parts are read
    with ranged GETs and uploaded again.
    """
    if source.size <= multipart_above:
        return await store.copy(source.key, target_key, metadata)

    async def read(offset: int, length: int) -> bytes:
        return await store.get_range(source.key, offset, length)

    return await upload_object(
        store, settings, target_key, source.size, read, metadata, copy_source=lambda start, end: source.key
    )


@dataclass
class WriteBackStatus:
    dirty_files: int
    dirty_bytes: int
    uploads_in_flight: int
    last_error: str | None


class WriteBack:
    """Schedules and runs uploads of dirty cache entries."""

    def __init__(
        self, cache: BlockCache, store: ObjectStore, settings: S3Settings, *,
        delay: float, cached_file: Callable[[Entry], CachedFile],
        on_uploaded: Callable[[Entry], None] = lambda entry: None,
        on_upload_start: Callable[[Entry], None] = lambda entry: None,
        streams: StreamedUploads | None = None,
    ) -> None:
        self.cache = cache
        self.streams = streams
        self.store = store
        self.settings = settings
        self.delay = delay
        self._cached_file = cached_file
        self._on_uploaded = on_uploaded
        self._on_upload_start = on_upload_start
        # Entry id -> when its upload falls due; ``_due_order`` is a heap over it, whose pairs that no
        # longer match it are skipped when they come up (a pass looks at what is due, not at everything).
        self._due: dict[int, float] = {}
        self._due_order: list[tuple[float, int]] = []
        self._failures: dict[int, int] = {}
        self._in_flight: set[int] = set()
        self._wakeup = trio.Event()
        # When run() wakes up next by itself: a later due time needs no wakeup
        # (scheduling a thousand small files must not sort the queue a thousand times).
        self._next_wake = -math.inf
        self._slots = trio.Semaphore(MAX_FILES_IN_FLIGHT)
        # Uploads running now, background or not (fsync, rename, make_room's).
        self._uploading = 0
        # Since when the cache has been full with no part or upload on its way (make_room).
        self._idle_and_full_since: float | None = None
        self.last_error: str | None = None
        self.uploaded_files = 0
        self.uploaded_bytes = 0

    # ------------------------------------------------------------------ scheduling

    def schedule(self, entry: Entry, delay: float | None = None) -> None:
        """Upload ``entry`` after ``delay`` (default: the write-back delay) unless it changes again."""
        if entry.unlinked:
            return
        due = trio.current_time() + (self.delay if delay is None else delay)
        self._set_due(entry.id, due)
        if due < self._next_wake:
            self._wakeup.set()

    def _set_due(self, entry_id: int, due: float) -> None:
        self._due[entry_id] = due
        heapq.heappush(self._due_order, (due, entry_id))

    def _is_current(self, due: float, entry_id: int) -> bool:
        """False for a pair of ``_due_order`` whose entry was rescheduled, forgotten or started since."""
        return self._due.get(entry_id) == due

    def forget(self, entry: Entry) -> None:
        self._due.pop(entry.id, None)
        self._failures.pop(entry.id, None)

    async def make_room(self) -> None:
        """The cache is full of dirty data: park the parts sent while files are written, else upload
        everything dirty now."""
        used_before = self.cache.used_bytes
        if self.streams is not None:
            await self.streams.park_sent_parts()
            if self.cache.used_bytes < used_before:
                return  # parked here, or by the parking that ran while this one waited for a file's lock
        # While parts are being sent or files uploaded, files still written that stream wait for those to land
        # (parts are parked then, uploaded files evictable): uploading one now would complete it as it stands,
        # and every later fill would upload it again. Only when nothing has been on its way for a while (what
        # just landed had its chance to make room) are they uploaded too: else every writer would wait forever.
        now = trio.current_time()
        if self.streams is not None and (self.streams.sending() or self._uploading > 0):
            self._idle_and_full_since = None
        elif self._idle_and_full_since is None:
            self._idle_and_full_since = now
        streams_may_wait = self._idle_and_full_since is None or now - self._idle_and_full_since < FULL_AND_IDLE_SECONDS
        for entry in self.cache.dirty_entries():
            # Entries in retry backoff keep their schedule: hammering a server that
            # is down would not free space any sooner.
            if entry.id in self._in_flight or entry.id in self._failures:
                continue
            if entry.open_writers and self.streams is not None and self.streams.streaming(entry, or_starting=True):
                if streams_may_wait:
                    continue
                log.debug("the cache is full and nothing is on its way to S3: uploading %r as it stands",
                          entry.object_key)
            self._set_due(entry.id, trio.current_time())
        self._wakeup.set()
        await trio.lowlevel.checkpoint()

    def status(self) -> WriteBackStatus:
        dirty = self.cache.dirty_entries()
        return WriteBackStatus(len(dirty), self.cache.dirty_bytes, len(self._in_flight), self.last_error)

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background task: start uploads as they fall due."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = trio.current_time()
                uploading = []  # due again while an upload of theirs runs: looked at in the next pass
                while self._due_order and self._due_order[0][0] <= now:
                    due, entry_id = heapq.heappop(self._due_order)
                    if not self._is_current(due, entry_id):
                        continue
                    if entry_id in self._in_flight:
                        uploading.append((due, entry_id))
                        continue
                    del self._due[entry_id]
                    self._in_flight.add(entry_id)
                    nursery.start_soon(self._background_upload, entry_id)
                for pair in uploading:
                    heapq.heappush(self._due_order, pair)
                while self._due_order and not self._is_current(*self._due_order[0]):
                    heapq.heappop(self._due_order)
                next_due = self._due_order[0][0] if self._due_order else now + 3600
                self._wakeup = trio.Event()
                self._next_wake = max(next_due, now + 0.01)
                with trio.move_on_at(self._next_wake):
                    await self._wakeup.wait()
                self._next_wake = -math.inf  # awake: every change is seen on the next pass

    async def _background_upload(self, entry_id: int) -> None:
        try:
            entry = self.cache.entry_by_id(entry_id)
            if entry is None or not entry.dirty:
                return
            forced = self.cache.used_bytes > self.cache.max_size * 0.9
            if entry.open_writers and not forced:
                return  # the last close will schedule it again
            async with self._slots:
                await self.upload(entry)
            self._failures.pop(entry_id, None)
        except (SsefsError, OSError) as error:
            # OSError: local disk trouble (ENOSPC, EIO) must not end the mount either.
            failures = self._failures.get(entry_id, 0) + 1
            self._failures[entry_id] = failures
            retry_in = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (failures - 1))
            self.last_error = f"{error}"
            level = logging.WARNING if failures <= 3 or failures % 10 == 0 else logging.DEBUG
            log.log(level, "upload failed (attempt %d, retrying in %.0f s): %s", failures, retry_in, error)
            if entry_id not in self._due:
                self._set_due(entry_id, trio.current_time() + retry_in)
        finally:
            self._in_flight.discard(entry_id)
            self._wakeup.set()

    async def upload(self, entry: Entry) -> None:
        """Upload the entry's current generation now; returns when it is durable in S3."""
        async with entry.lock:
            if not entry.dirty or not self.cache.is_live(entry) or entry.unlinked:
                return
            self._uploading += 1
            try:
                await self._upload_locked(entry)
            finally:
                self._uploading -= 1

    async def _upload_locked(self, entry: Entry) -> None:
        """The upload itself, under ``entry.lock``."""
        cached_file = self._cached_file(entry)
        await cached_file.seal_hot()
        await self.cache.sync(entry)
        generation, size = entry.generation, entry.size

        async def read(offset: int, length: int) -> bytes:
            return await cached_file.read(offset, length, keep=False)

        def unchanged_in_base(start: int, end: int) -> str | None:
            if entry.base_key is None or end > entry.base_valid:
                return None
            if self.cache.has_dirty_blocks(entry, start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE):
                return None
            return entry.base_key

        self._on_upload_start(entry)
        stream = await self.streams.take(entry, size) if self.streams is not None else None
        if stream is not None:
            etag = await self._finish_stream(entry, stream, size, read)
        else:
            etag = await upload_object(
                self.store, self.settings, entry.object_key, size, read,
                metadata=to_metadata(entry.attributes), copy_source=unchanged_in_base,
            )
        self.uploaded_files += 1
        self.uploaded_bytes += size
        if self.cache.is_live(entry):
            self.cache.mark_uploaded(entry, generation, etag=etag, size=size)
            self._on_uploaded(entry)
            # Lost in a power cut, the entry would look dirty again and be uploaded once more
            # over whatever another client wrote since.
            await self.cache.make_durable()
        self._due.pop(entry.id, None)
        log.debug("uploaded %r (%d bytes, generation %d)", entry.object_key, size, generation)

    async def _finish_stream(self, entry: Entry, stream: StreamedUpload, size: int, read: ReadRange) -> str:
        """Send what the stream has not sent yet, complete it, and give the object its final attributes."""
        part_count = math.ceil(size / stream.part_size)
        etags = [stream.etags.get(index, "") for index in range(part_count)]
        # The tail, and any part the stream did not get to send (cut off by an unmount).
        missing = [index for index, etag in enumerate(etags) if not etag]
        try:
            if stream.completed_etag is not None:
                etag = stream.completed_etag  # completed before a crash: only its attributes are left
            else:
                await send_parts(self.store, self.settings, stream.object_key, stream.upload_id,
                                 missing, stream.part_size, size, read, etags, key=stream.key)
                etag = await self.store.complete_multipart(stream.object_key, stream.upload_id, etags,
                                                           key=stream.key)
        except BaseException as error:
            if stream.parked:
                # Its first bytes are only in its parts: never aborted; the retry (or next start) finishes it.
                assert self.streams is not None  # the stream came from it
                self.streams.put_back(entry, stream)
                if isinstance(error, NoSuchObject):
                    raise SsefsError(
                        f"the multipart upload {stream.upload_id} holding the first {entry.parked_bytes} bytes of "
                        f"{stream.object_key!r} is gone from the server (aborted by a lifecycle rule or another "
                        "client?); those bytes exist nowhere else, so the file cannot be uploaded"
                    ) from None
                raise
            with trio.CancelScope(shield=True):
                try:
                    await self.store.abort_multipart(stream.object_key, stream.upload_id)
                except Exception as abort_error:  # noqa: BLE001 - the original error matters more
                    log.warning("could not abort multipart upload of %r: %s", stream.object_key, abort_error)
            raise
        try:
            await self.store.tag_attributes(stream.object_key, attributes_tag(entry.attributes))
        except SsefsError as error:
            # The copy costs about what sending the parts again would: stop streaming on this mount.
            log.warning("could not tag %r with its attributes (%s); writing them by a server-side copy, and "
                        "uploading files only after they are written from now on", stream.object_key, error)
            assert self.streams is not None  # the stream came from it
            self.streams.enabled = False
            etag = await self.store.copy(stream.object_key, stream.object_key, to_metadata(entry.attributes))
        log.debug("completed the upload of %r begun while it was written (%d of %d parts sent before)",
                  stream.object_key, part_count - len(missing), part_count)
        return etag

    async def flush_all(self) -> list[Entry]:
        """Try once to upload everything dirty (at unmount); returns what is still dirty."""
        for entry in self.cache.dirty_entries():
            try:
                await self.upload(entry)
            except (SsefsError, OSError) as error:
                log.error("could not upload %r: %s", entry.object_key, error)
        return self.cache.dirty_entries()
