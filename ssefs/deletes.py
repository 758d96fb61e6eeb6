"""Deletes on their way to S3: ``unlink`` returns once a deletion is journaled; objects go in batches.

The object of an unlinked file is deleted in the background, up to 1,000 keys
per DeleteObjects request, so ``rm -r`` of many files costs a few requests
instead of one round trip per file. Until its delete is done a key is
*pending*: the store hides it from listings and lookups, and a write to the
same key first takes it out of the queue, or waits for a delete already in
flight, so that a delete never lands after a newer version of the file. The
queue is journaled (``DeleteJournal``, the cache database), so a crash loses no
delete: the next mount sends it. ``rmdir``, ``fsync`` of a directory and
unmount send the deletes they depend on and wait for them (``flush``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

import trio

from .errors import ServerUnavailable, SsefsError

log = logging.getLogger(__name__)

# S3's limit for one DeleteObjects request.
BATCH_SIZE = 1000
# After the first key of a batch, how long to gather more before sending: an
# ``rm`` of many files then makes a few full requests, not one per file while
# the first ones are in flight (which cost more CPU than the unlinks).
GATHER_SECONDS = 0.1
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0

# Deletes the given keys; returns, per key that could not be deleted, the reason.
DeleteMany = Callable[[list[str]], Awaitable[dict[str, str]]]


class DeleteJournal(Protocol):
    """Where queued deletes are recorded until S3 confirms them."""

    def delete_queued(self, object_key: str) -> None: ...

    def deletes_done(self, object_keys: list[str]) -> None: ...

    def queued_deletes(self) -> list[str]: ...


class DeleteQueue:
    """Keys to delete from S3, in the order they were queued, and the task that deletes them."""

    def __init__(self, delete_many: DeleteMany) -> None:
        self._delete_many = delete_many
        self._journal: DeleteJournal | None = None
        self._queued: dict[str, None] = {}  # insertion-ordered set
        self._in_flight: dict[str, trio.Event] = {}
        self._work = trio.Event()
        self.deleted = 0
        self.last_error: str | None = None

    def attach_journal(self, journal: DeleteJournal) -> None:
        """Record deletes in ``journal`` from now on, and take up those it holds from an earlier run."""
        self._journal = journal
        for object_key in journal.queued_deletes():
            self._queued.setdefault(object_key)
        if self._queued:
            log.info("%d delete(s) left by an earlier run are queued again", len(self._queued))
            self._work.set()

    # ------------------------------------------------------------------ state

    def add(self, object_key: str) -> None:
        if self._journal is not None:
            self._journal.delete_queued(object_key)
        self._queued[object_key] = None
        self._work.set()

    def is_pending(self, object_key: str) -> bool:
        return object_key in self._queued or object_key in self._in_flight

    def pending_under(self, prefix: str) -> list[str]:
        return [key for key in self._pending() if key.startswith(prefix)]

    def _pending(self) -> Iterator[str]:
        yield from self._queued
        yield from self._in_flight

    def __len__(self) -> int:
        return len(self._queued) + len(self._in_flight)

    async def settle(self, object_key: str) -> None:
        """Before ``object_key`` is written: drop its queued delete, or wait for one in flight.

        A pending delete of an object named like one of its parent directories
        ("a" before writing "a/" or "a/b") is sent first and waited for:
        servers with a real directory tree (SeaweedFS) refuse a directory
        where a file of that name still is.
        """
        parts = object_key.rstrip("/").split("/")
        parents = ["/".join(parts[:count]) for count in range(1, len(parts))]
        if object_key.endswith("/"):
            parents.append(object_key.rstrip("/"))
        for parent in parents:
            if self.is_pending(parent):
                await self._delete_now(parent)
        while (in_flight := self._in_flight.get(object_key)) is not None:
            await in_flight.wait()  # then look again: a failed delete is queued again
        if object_key in self._queued:
            del self._queued[object_key]
            if self._journal is not None:
                self._journal.deletes_done([object_key])

    async def _delete_now(self, object_key: str) -> None:
        """Send the pending delete of ``object_key`` now (or wait for it in flight); raises if it fails."""
        while True:
            in_flight = self._in_flight.get(object_key)
            if in_flight is not None:
                await in_flight.wait()
            elif object_key in self._queued:
                errors = await self._send([object_key])
                if errors:
                    raise ServerUnavailable(f"delete of {object_key!r} failed: {errors[object_key]}")
            else:
                return

    # ------------------------------------------------------------------ sending

    async def flush(self, prefix: str = "") -> None:
        """Delete now every pending key under ``prefix``; raises if S3 did not confirm them all."""
        while True:
            queued = [key for key in self._queued if key.startswith(prefix)]
            for start in range(0, len(queued), BATCH_SIZE):
                errors = await self._send(queued[start:start + BATCH_SIZE])
                if errors:
                    key, reason = next(iter(errors.items()))
                    raise ServerUnavailable(f"{len(errors)} delete(s) failed, e.g. {key!r}: {reason}")
            in_flight = [event for key, event in self._in_flight.items() if key.startswith(prefix)]
            if not in_flight:
                return
            await in_flight[0].wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background task: delete queued keys in batches, retrying failures with backoff."""
        task_status.started()
        failures = 0
        while True:
            if not self._queued:
                self._work = trio.Event()
                await self._work.wait()
            if len(self._queued) < BATCH_SIZE:
                await trio.sleep(GATHER_SECONDS)
            batch = list(self._queued)[:BATCH_SIZE]
            try:
                errors = await self._send(batch)
            except Exception as error:  # noqa: BLE001 - a bug here must not end the mount; the batch stays queued
                log.exception("sending deletes failed unexpectedly")
                errors = dict.fromkeys(batch, f"unexpected error: {error!r}")
            if not errors:
                failures = 0
                continue
            failures += 1
            retry_in = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (failures - 1))
            key, reason = next(iter(errors.items()))
            self.last_error = f"delete of {key!r}: {reason}"
            level = logging.WARNING if failures <= 3 or failures % 10 == 0 else logging.DEBUG
            log.log(level, "%d of %d delete(s) failed (retrying in %.0f s), e.g. %r: %s",
                    len(errors), len(batch), retry_in, key, reason)
            await trio.sleep(retry_in)

    async def _send(self, batch: list[str]) -> dict[str, str]:
        """One DeleteObjects request; failed keys go back to the queue. Returns the failures."""
        batch = [key for key in batch if key in self._queued]
        if not batch:
            return {}
        for key in batch:
            del self._queued[key]
            self._in_flight[key] = trio.Event()
        # Until S3 answers, nothing is confirmed: cancelled (unmount), the batch stays queued and journaled.
        errors = dict.fromkeys(batch, "no answer")
        try:
            errors = await self._delete_many(batch)
        except SsefsError as error:
            errors = dict.fromkeys(batch, str(error))
        finally:
            confirmed = [key for key in batch if key not in errors]
            for key in batch:
                if key not in confirmed:
                    self._queued[key] = None
            if self._journal is not None and confirmed:
                self._journal.deletes_done(confirmed)
            self.deleted += len(confirmed)
            for key in batch:
                self._in_flight.pop(key).set()
        return errors
