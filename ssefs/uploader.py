"""Uploading a staged file to S3: one PUT for small files, parallel multipart for large ones.

This module decides how a file's bytes travel: below ``multipart_threshold`` one
PutObject; above it CreateMultipartUpload, parts read from the encrypted scratch
file and sent by at most ``upload_concurrency`` workers at once (so memory is
bounded by ``upload_concurrency * part_size`` whatever the file size), then
CompleteMultipartUpload, or AbortMultipartUpload on any failure so no orphaned
parts are left behind. The part size grows for huge files so that no upload
needs more than S3's 10,000 parts. The write-back queue comes later; for now the
caller awaits the upload.
"""

from __future__ import annotations

import logging
import math

import trio

from .cache import EncryptedScratchFile
from .config import MAX_PART_SIZE, MiB, S3Settings
from .errors import unwrap_group
from .store import ObjectStore

log = logging.getLogger(__name__)

# S3 allows at most 10,000 parts per multipart upload.
MAX_PARTS = 10_000


def part_size_for(total_size: int, configured: int) -> int:
    """The configured part size, grown (in whole MiB) when it would need more than 10,000 parts."""
    needed = math.ceil(total_size / MAX_PARTS)
    if needed <= configured:
        return configured
    return min(MAX_PART_SIZE, math.ceil(needed / MiB) * MiB)


async def upload_scratch(
    store: ObjectStore,
    settings: S3Settings,
    object_key: str,
    scratch: EncryptedScratchFile,
    metadata: dict[str, str] | None = None,
) -> str:
    """Upload the whole scratch file as ``object_key``; returns the new ETag."""
    size = scratch.size
    if size <= settings.multipart_threshold:
        return await store.put(object_key, scratch.read(0, size), metadata)

    part_size = part_size_for(size, settings.part_size)
    part_count = math.ceil(size / part_size)
    upload_id = await store.create_multipart(object_key, metadata)
    etags: list[str] = [""] * part_count
    log.debug("multipart upload of %r: %d parts of %d bytes", object_key, part_count, part_size)
    try:
        # A zero-capacity channel hands each part number to an idle worker, so at
        # most ``upload_concurrency`` parts are in memory at once.
        send_part, receive_part = trio.open_memory_channel[int](0)

        async def worker(receive: trio.MemoryReceiveChannel[int]) -> None:
            async with receive:
                async for part_index in receive:
                    offset = part_index * part_size
                    data = scratch.read(offset, min(part_size, size - offset))
                    etags[part_index] = await store.upload_part(object_key, upload_id, part_index + 1, data)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(settings.upload_concurrency, part_count)):
                    nursery.start_soon(worker, receive_part.clone())
                async with send_part, receive_part:
                    for part_index in range(part_count):
                        await send_part.send(part_index)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        return await store.complete_multipart(object_key, upload_id, etags)
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await store.abort_multipart(object_key, upload_id)
            except Exception as abort_error:  # noqa: BLE001 - the original error matters more
                log.warning("could not abort multipart upload of %r: %s", object_key, abort_error)
        raise
