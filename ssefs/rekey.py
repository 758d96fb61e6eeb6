"""Key rotation over a whole bucket: ``ssefs rekey`` and ``ssefs check``.

This module owns re-encrypting every object under a config's bucket and prefix
from an old SSE-C key to the config's current key, and reporting which key each
object is stored under. ``rekey`` parses the ``--from`` key source
(``file:PATH``, ``env:NAME``, ``credential:NAME``, ``command:SHELLCMD`` or a bare
path), HEADs each object with the new key (already done) and then the old one,
and copies it onto itself server-side (CopyObject with the old key as the copy
source's key and the new key as the target's, user metadata kept; objects above
5 GiB part by part as ``uploader.copy_object`` does, with ranged GETs and
re-upload where the server lacks UploadPartCopy for SSE-C). A bounded pool of
trio workers does the objects in parallel; an append-only journal in the cache
directory (mode 0600) records finished objects so that an interrupted run
resumes where it stopped, though correctness never depends on it: the HEAD with
the new key makes every rerun idempotent. ``check`` HEADs every object with the
configured keys and counts objects per key fingerprint, listing those no key
opens and those stored without SSE-C. Progress goes to stderr (a tqdm bar on a
terminal, plain lines otherwise), summaries to stdout, as text or JSON; keys
appear only as fingerprints. All S3 traffic goes through ``ObjectStore``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio
from tqdm import tqdm

from .config import MAX_PART_SIZE, Config, KeySource, S3Settings, format_size
from .errors import (
    KeyLoadError,
    NoSuchObject,
    NotEncrypted,
    ServerUnavailable,
    SsefsError,
    StartupCheckError,
    WrongKey,
    unwrap_group,
)
from .keys import KeyRing, SseKey, load_key
from .store import SSE_BLOCKED_HINT, ObjectInfo, ObjectStore
from .uploader import copy_object, for_each

DEFAULT_JOBS = 8
# Human output names at most this many objects per list; --json lists them all.
LISTED_AT_MOST = 20
# Without a terminal, one progress line at most this often.
PLAIN_PROGRESS_SECONDS = 5.0
JOURNAL_FORMAT = 1
SOURCE_KINDS = ("file", "env", "credential", "command")
EXIT_INTERRUPTED = 130
# After this many objects in a row failed because the server is unreachable, stop instead of
# spending the retries of every remaining object.
GIVE_UP_AFTER = 20


class GiveUp(ServerUnavailable):
    """The server stopped answering in the middle of a run."""


class FailureStreak:
    """Counts objects in a row that failed with ``ServerUnavailable``; raises ``GiveUp`` at the limit."""

    def __init__(self, limit: int = GIVE_UP_AFTER) -> None:
        self.limit = limit
        self.count = 0

    def success(self) -> None:
        self.count = 0

    def failure(self, error: SsefsError) -> None:
        if not isinstance(error, ServerUnavailable):
            return
        self.count += 1
        if self.count >= self.limit:
            raise GiveUp(f"stopped after {self.limit} objects in a row failed: {error}")


# --------------------------------------------------------------------- key sources


def parse_key_source(text: str) -> KeySource:
    """``file:PATH``, ``env:NAME``, ``credential:NAME``, ``command:SHELLCMD``, or a bare PATH (a file)."""
    kind, colon, value = text.partition(":")
    if not colon or kind not in SOURCE_KINDS:
        kind, value = "file", text
    if not value.strip():
        raise KeyLoadError(
            "--from needs a key source: file:PATH, env:NAME, credential:NAME, command:SHELLCMD or a PATH"
        )
    if kind == "file":
        return KeySource(file=Path(value).expanduser().absolute())
    if kind == "env":
        return KeySource(env=value)
    if kind == "credential":
        if "/" in value or value in (".", ".."):
            raise KeyLoadError("--from credential: must name a systemd credential, not a path")
        return KeySource(credential=value)
    return KeySource(command=value)


def load_rekey_keys(config: Config, source_text: str) -> tuple[SseKey, SseKey]:
    """The old key (from ``--from``) and the new one (the config's current key)."""
    try:
        old = load_key(parse_key_source(source_text))
    except KeyLoadError as error:
        message = str(error)
        raise KeyLoadError(message if message.startswith("--from") else f"--from: {message}") from None
    new = load_key(config.key)
    if old.fingerprint == new.fingerprint:
        raise KeyLoadError(
            f"--from names the config's current key ({new.fingerprint}): there is nothing to re-encrypt"
        )
    return old, new


# --------------------------------------------------------------------- output helpers


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _group(heading: str, names: Iterable[str], *, always: bool = False) -> list[str]:
    """A summary's heading line and, indented below it, the first names (none: no lines unless ``always``)."""
    listed = sorted(names)
    return [f"  {heading}", *_listed(listed, "    ")] if listed or always else []


def _with_errors(errors: dict[str, str]) -> list[str]:
    return [f"{key}: {error}" for key, error in errors.items()]


def _listed(names: list[str], indent: str = "  ") -> list[str]:
    lines = [f"{indent}{name}" for name in names[:LISTED_AT_MOST]]
    if len(names) > LISTED_AT_MOST:
        lines.append(f"{indent}and {len(names) - LISTED_AT_MOST} more (--json lists them all)")
    return lines


def _location(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}"


class Progress:
    """Objects and bytes done so far: a tqdm bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, label: str, total_objects: int, total_bytes: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.total_objects = total_objects
        self.total_bytes = total_bytes
        self.objects = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar: Any = None
        if self.stream.isatty():
            self._bar = tqdm(
                total=total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024,
                file=self.stream, desc=label, dynamic_ncols=True,
            )

    def advance(self, size: int) -> None:
        self.objects += 1
        self.bytes += size
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.objects}/{self.total_objects} objects", refresh=False)
            self._bar.update(size)
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_PROGRESS_SECONDS:
            self._last_line = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.started
        if self.total_bytes:
            fraction = self.bytes / self.total_bytes
        else:
            fraction = self.objects / self.total_objects if self.total_objects else 1.0
        eta = f", about {elapsed * (1 - fraction) / fraction:.0f} s left" if 0 < fraction < 1 else ""
        return (
            f"ssefs {self.label}: {self.objects}/{self.total_objects} objects, "
            f"{format_size(self.bytes)} of {format_size(self.total_bytes)}, {elapsed:.0f} s elapsed{eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_marker(info: ObjectInfo) -> bool:
    return info.key.endswith("/") and info.size == 0


# --------------------------------------------------------------------- the journal


class Journal:
    """Objects a rekey from one key to another has finished, one JSON line each, so a rerun can skip them.

    The first line names the endpoint, bucket, prefix and both fingerprints; a
    file written for anything else is started afresh. Each later line is
    ``[object key, ETag]``: an entry counts only while the listing still shows
    that ETag, so an object rewritten since is examined again. A line cut short
    by a crash is ignored. An exclusive ``flock`` keeps two runs from sharing it.
    """

    def __init__(self, path: Path, header: dict[str, Any], *, writable: bool) -> None:
        self.path = path
        self.header = header
        self.writable = writable
        self.done: dict[str, str] = {}
        self._fd: int | None = None
        if writable:
            self._open_for_writing()
        else:
            try:
                self._load(path.read_bytes())
            except FileNotFoundError:
                pass
            except OSError as error:
                raise SsefsError(f"cannot read the rekey journal {path}: {error.strerror}") from None

    @staticmethod
    def path_for(directory: Path, old: SseKey, new: SseKey) -> Path:
        return directory / f"rekey-{old.fingerprint}-to-{new.fingerprint}.journal"

    def _open_for_writing(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            raise SsefsError(f"cannot open the rekey journal {self.path}: {error.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SsefsError(
                    f"another ssefs rekey is already working from the journal {self.path}"
                ) from None
            with open(fd, "rb", closefd=False) as reader:
                data = reader.read()
            if not self._load(data):
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(self.header, sort_keys=True) + "\n").encode())
            elif not data.endswith(b"\n"):
                os.write(fd, b"\n")  # end a line cut short by a crash, so the next one stands alone
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _load(self, data: bytes) -> bool:
        """Read entries from ``data``; False when it is not a journal of this very run."""
        lines = data.split(b"\n")
        try:
            if json.loads(lines[0]) != self.header:
                return False
        except ValueError:
            return False
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry):
                self.done[entry[0]] = entry[1]
        return True

    def is_done(self, info: ObjectInfo) -> bool:
        etag = self.done.get(info.key)
        return etag is not None and (etag == "" or etag == info.etag)

    def record(self, object_key: str, etag: str) -> None:
        self.done[object_key] = etag
        if self._fd is not None:
            # One write of one line on an O_APPEND descriptor: a kill leaves whole lines, or a cut-off last one.
            os.write(self._fd, (json.dumps([object_key, etag]) + "\n").encode())

    def close(self, *, remove: bool = False) -> None:
        if remove and self._fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------- rekey


@dataclass
class Tally:
    objects: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.objects += 1
        self.bytes += size

    def as_json(self) -> dict[str, int]:
        return {"objects": self.objects, "bytes": self.bytes}


@dataclass
class RekeyReport:
    """What a rekey run did, object by object class."""

    old: str
    new: str
    bucket: str
    prefix: str
    dry_run: bool
    listed: int = 0
    reencrypted: Tally = field(default_factory=Tally)  # with --dry-run: would be re-encrypted
    already: Tally = field(default_factory=Tally)
    resumed: Tally = field(default_factory=Tally)
    markers: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    not_encrypted: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    interrupted: bool = False
    stopped: str | None = None  # why the run gave up early (the server stopped answering)
    journal: Path | None = None

    @property
    def complete(self) -> bool:
        """Every object readable with either key is now (or, dry run, could be) under the new key."""
        return not self.failed and not self.interrupted and self.stopped is None

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.old,
            "to": self.new,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "dry_run": self.dry_run,
            "objects": self.listed,
            "reencrypted": self.reencrypted.as_json(),
            "already_under_new_key": self.already.as_json(),
            "done_in_earlier_run": self.resumed.as_json(),
            "markers_skipped": sorted(self.markers),
            "unreadable": sorted(self.unreadable),
            "not_encrypted": sorted(self.not_encrypted),
            "vanished": sorted(self.vanished),
            "failed": [{"key": key, "error": self.failed[key]} for key in sorted(self.failed)],
            "elapsed_seconds": round(self.elapsed, 3),
            "interrupted": self.interrupted,
            "stopped": self.stopped,
            "complete": self.complete,
            "journal": str(self.journal) if self.journal else None,
        }

    def summary_lines(self) -> list[str]:
        verb = "would re-encrypt" if self.dry_run else "re-encrypted"
        lines = [
            f"ssefs rekey{' (dry run)' if self.dry_run else ''}: key {self.old} -> key {self.new} "
            f"in {_location(self.bucket, self.prefix)}: {_plural(self.listed, 'object')} listed",
            f"  {verb}: {_plural(self.reencrypted.objects, 'object')}, {format_size(self.reencrypted.bytes)}",
            f"  already under the new key: {_plural(self.already.objects, 'object')}, "
            f"{format_size(self.already.bytes)}",
        ]
        if self.resumed.objects:
            lines.append(
                f"  done by an earlier, interrupted run (journal): {_plural(self.resumed.objects, 'object')}, "
                f"{format_size(self.resumed.bytes)}"
            )
        if self.markers:
            lines.append(
                f"  directory markers skipped: {len(self.markers)} (they hold no data, and this server does "
                "not store them with SSE-C)"
            )
        if self.vanished:
            lines.append(f"  deleted while the run went on: {_plural(len(self.vanished), 'object')}")
        lines += _group(f"skipped, readable with neither key ({len(self.unreadable)}): written under a third key, "
                        "or the credentials may not read them", self.unreadable)
        lines += _group(f"skipped, not stored with SSE-C ({len(self.not_encrypted)}):", self.not_encrypted)
        lines += _group(f"failed: {len(self.failed)}", _with_errors(self.failed), always=True)
        lines.append(f"  elapsed: {self.elapsed:.1f} s")
        if self.interrupted:
            where = f" ({self.journal})" if self.journal else ""
            lines.append(f"interrupted: run the same command again to resume; finished objects are recorded{where}")
        elif self.stopped is not None:
            lines.append(f"{self.stopped}; run the same command again to resume")
        elif self.dry_run:
            lines.append("dry run: nothing was written")
        elif self.complete:
            lines.append(f"done: every object readable with key {self.old} is now under key {self.new}")
        else:
            lines.append("not complete: run the same command again to retry the failed objects")
        return lines


async def copy_in_place(
    store: ObjectStore, settings: S3Settings, info: ObjectInfo, *, multipart_above: int = MAX_PART_SIZE
) -> str:
    """Rewrite ``info`` onto itself under the store's current key, metadata kept; returns the new ETag."""
    return await copy_object(store, settings, info, info.key, info.metadata, multipart_above=multipart_above)


async def rekey_objects(
    store: ObjectStore, prefix: str, old: SseKey, new: SseKey, report: RekeyReport, *,
    jobs: int = DEFAULT_JOBS, dry_run: bool = False, journal: Journal | None = None,
    progress_stream: TextIO | None = None, multipart_above: int = MAX_PART_SIZE,
) -> None:
    """Move every object under ``prefix`` from ``old`` to ``new``; fills in ``report`` as it goes.

    ``store`` must write with ``new`` (its ring's current key) and know ``old``.
    """
    assert store.keys.current.fingerprint == new.fingerprint
    await store.check_bucket()
    if not dry_run and await store.sse_c_blocked():
        raise StartupCheckError(f"bucket {store.bucket!r} refuses SSE-C writes. {SSE_BLOCKED_HINT}")
    listing = await store.list_tree(prefix)
    report.listed = len(listing)
    progress = Progress("rekey", len(listing), sum(info.size for info in listing), progress_stream)
    streak = FailureStreak()

    def failed(object_key: str, error: SsefsError, context: str = "") -> SsefsError:
        report.failed[object_key] = context + str(error)
        return error

    def finished(info: ObjectInfo, tally: Tally, etag: str | None) -> None:
        tally.add(info.size)
        if etag is not None and journal is not None and not dry_run:
            journal.record(info.key, etag)

    def skipped(info: ObjectInfo, error: SsefsError) -> None:
        """Record an object the run leaves alone because of the server's answer ``error``."""
        if isinstance(error, NoSuchObject):
            report.vanished.append(info.key)
        elif isinstance(error, WrongKey):
            report.unreadable.append(info.key)
        else:  # NotEncrypted
            (report.markers if _is_marker(info) else report.not_encrypted).append(info.key)

    async def one(info: ObjectInfo) -> SsefsError | None:
        """Move one object; returns the error when it failed."""
        object_key = info.key
        if journal is not None and journal.is_done(info):
            report.resumed.add(info.size)
            return None
        try:
            current = await store.head(object_key, key=new)
        except WrongKey:
            pass
        except (NotEncrypted, NoSuchObject) as answer:
            skipped(info, answer)
            return None
        except SsefsError as error:
            return failed(object_key, error)
        else:
            finished(info, report.already, current.etag)
            return None
        try:
            source = await store.head(object_key, key=old)
        except (WrongKey, NotEncrypted, NoSuchObject) as answer:
            skipped(info, answer)
            return None
        except SsefsError as error:
            return failed(object_key, error)
        if dry_run:
            finished(info, report.reencrypted, None)
            return None
        # Known to be under the old key: the copy names it as the source's key at once.
        store.key_index.remember(object_key, old.fingerprint)
        try:
            etag = await copy_in_place(store, store.settings, source, multipart_above=multipart_above)
        except SsefsError as error:
            # Rewritten meanwhile under the new key (by a mount), or deleted: nothing left to do.
            try:
                rewritten = await store.head(object_key, key=new)
            except NoSuchObject as gone:
                skipped(info, gone)
                return None
            except SsefsError:
                return failed(object_key, error)
            finished(info, report.already, rewritten.etag)
            return None
        # Trust, but verify: the object must now open with the new key.
        try:
            after = await store.head(object_key, key=new)
        except SsefsError as error:
            return failed(object_key, error, "copied, but it does not read back with the new key: ")
        finished(info, report.reencrypted, etag or after.etag)
        return None

    async def counted(info: ObjectInfo) -> None:
        error = await one(info)
        progress.advance(info.size)
        if error is None:
            streak.success()
            return
        try:
            streak.failure(error)
        except GiveUp as give_up:
            report.stopped = str(give_up)
            raise

    try:
        await for_each(listing, jobs, counted)
    finally:
        progress.close()


def run_rekey(
    config: Config, old: SseKey, new: SseKey, *, jobs: int = DEFAULT_JOBS, dry_run: bool = False,
    as_json: bool = False, out: TextIO | None = None, progress_stream: TextIO | None = None,
) -> int:
    """The ``ssefs rekey`` command once its keys are loaded: run, print the summary, return the exit code."""
    out = out if out is not None else sys.stdout
    store = ObjectStore(config.s3, KeyRing(new, (old,)))
    report = RekeyReport(old.fingerprint, new.fingerprint, config.s3.bucket, config.key_prefix, dry_run)
    header = {
        "format": JOURNAL_FORMAT, "endpoint": config.s3.endpoint, "bucket": config.s3.bucket,
        "prefix": config.key_prefix, "from": old.fingerprint, "to": new.fingerprint,
    }
    journal = Journal(Journal.path_for(config.cache.dir, old, new), header, writable=not dry_run)
    report.journal = None if dry_run else journal.path
    started = time.monotonic()
    try:
        trio.run(lambda: rekey_objects(
            store, config.key_prefix, old, new, report, jobs=jobs, dry_run=dry_run, journal=journal,
            progress_stream=progress_stream,
        ))
    except KeyboardInterrupt:
        report.interrupted = True
    except GiveUp:
        pass  # report.stopped says why; the summary follows
    except BaseExceptionGroup as group:
        leaf = unwrap_group(group)
        if not isinstance(leaf, KeyboardInterrupt | GiveUp):
            journal.close(remove=not journal.done)
            raise leaf from None
        report.interrupted = isinstance(leaf, KeyboardInterrupt)
    except BaseException:
        # Could not start (or a bug): a journal this run created and never used goes again.
        journal.close(remove=not journal.done)
        raise
    report.elapsed = time.monotonic() - started
    # A finished run leaves no journal: a later run must look at every object again.
    journal.close(remove=report.complete and not dry_run)
    if report.complete and not dry_run:
        report.journal = None
    _print(out, report.as_json() if as_json else report.summary_lines(), as_json)
    if report.interrupted:
        return EXIT_INTERRUPTED
    return 0 if report.complete else 1


def _print(out: TextIO, content: dict[str, Any] | list[str], as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(content, indent=2) + "\n")
    else:
        assert isinstance(content, list)
        out.write("\n".join(content) + "\n")
    out.flush()


# --------------------------------------------------------------------- check


@dataclass
class KeyUse:
    fingerprint: str
    role: str  # "current" or "previous"
    objects: int = 0
    bytes: int = 0


@dataclass
class CheckReport:
    """Which key each object under the prefix is stored with."""

    bucket: str
    prefix: str
    keys: list[KeyUse]
    listed: int = 0
    markers: int = 0
    unreadable: list[str] = field(default_factory=list)
    not_encrypted: list[str] = field(default_factory=list)
    vanished: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.not_encrypted and not self.errors

    def use(self, fingerprint: str) -> KeyUse:
        return next(use for use in self.keys if use.fingerprint == fingerprint)

    def as_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "objects": self.listed,
            "keys": [
                {"fingerprint": use.fingerprint, "role": use.role, "objects": use.objects, "bytes": use.bytes}
                for use in self.keys
            ],
            "markers_not_encrypted": self.markers,
            "unreadable": sorted(self.unreadable),
            "not_encrypted": sorted(self.not_encrypted),
            "vanished": self.vanished,
            "errors": [{"key": key, "error": self.errors[key]} for key in sorted(self.errors)],
            "elapsed_seconds": round(self.elapsed, 3),
            "ok": self.ok,
        }

    def summary_lines(self) -> list[str]:
        lines = [f"ssefs check: {_plural(self.listed, 'object')} in {_location(self.bucket, self.prefix)}"]
        for use in self.keys:
            lines.append(
                f"  key {use.fingerprint} ({use.role}): {_plural(use.objects, 'object')}, {format_size(use.bytes)}"
            )
        if self.markers:
            lines.append(f"  directory markers without SSE-C: {self.markers} (they hold no data; not a problem)")
        lines += _group(f"not readable with any configured key ({len(self.unreadable)}): written under another "
                        "key, or the credentials may not read them", self.unreadable)
        lines += _group(f"not stored with SSE-C ({len(self.not_encrypted)}):", self.not_encrypted)
        lines += _group(f"could not be checked ({len(self.errors)}):", _with_errors(self.errors))
        for use in self.keys:
            if use.role == "current":
                continue
            if use.objects:
                lines.append(
                    f"key {use.fingerprint} still holds {_plural(use.objects, 'object')}; "
                    "re-encrypt under the current key with: ssefs rekey CONFIG --from OLDKEYSOURCE"
                )
            elif self.ok:
                lines.append(f"key {use.fingerprint} holds no object any more: it can go from previous_keys")
        lines.append(f"  elapsed: {self.elapsed:.1f} s")
        lines.append("ok: every object opens with a configured key" if self.ok else "problems found (see above)")
        return lines


async def check_objects(
    store: ObjectStore, prefix: str, report: CheckReport, *, jobs: int = DEFAULT_JOBS,
    progress_stream: TextIO | None = None,
) -> None:
    """HEAD every object under ``prefix`` with the ring's keys; fills in ``report``."""
    await store.check_bucket()
    listing = await store.list_tree(prefix)
    report.listed = len(listing)
    progress = Progress("check", len(listing), sum(info.size for info in listing), progress_stream)
    streak = FailureStreak()

    def likeliest_first() -> list[SseKey]:
        # The key most objects were found under so far is tried first (the current key on a tie).
        return sorted(store.keys.all, key=lambda key: -report.use(key.fingerprint).objects)

    async def one(info: ObjectInfo) -> None:
        failure: SsefsError | None = None
        for key in likeliest_first():
            try:
                await store.head(info.key, key=key)
            except WrongKey:
                continue
            except NotEncrypted:
                if _is_marker(info):
                    report.markers += 1
                else:
                    report.not_encrypted.append(info.key)
            except NoSuchObject:
                report.vanished += 1
            except SsefsError as error:
                failure = error
                report.errors[info.key] = str(error)
            else:
                use = report.use(key.fingerprint)
                use.objects += 1
                use.bytes += info.size
            break
        else:
            report.unreadable.append(info.key)
        progress.advance(info.size)
        if failure is None:
            streak.success()
        else:
            streak.failure(failure)

    try:
        await for_each(listing, jobs, one)
    finally:
        progress.close()


def run_check(
    config: Config, keys: KeyRing, *, jobs: int = DEFAULT_JOBS, as_json: bool = False,
    out: TextIO | None = None, progress_stream: TextIO | None = None,
) -> int:
    """The ``ssefs check`` command once its keys are loaded: 0 when all is well, else 1."""
    out = out if out is not None else sys.stdout
    store = ObjectStore(config.s3, keys)
    uses = [KeyUse(keys.current.fingerprint, "current")]
    uses += [KeyUse(key.fingerprint, "previous") for key in keys.previous]
    report = CheckReport(config.s3.bucket, config.key_prefix, uses)
    started = time.monotonic()
    try:
        trio.run(lambda: check_objects(store, config.key_prefix, report, jobs=jobs, progress_stream=progress_stream))
    except KeyboardInterrupt:
        (progress_stream or sys.stderr).write("ssefs: check interrupted\n")
        return EXIT_INTERRUPTED
    report.elapsed = time.monotonic() - started
    _print(out, report.as_json() if as_json else report.summary_lines(), as_json)
    return 0 if report.ok else 1
