"""Wiring a mount together, in one readable order.

open the store → check bucket, credentials and key → build the filesystem and
operations → ``pyfuse3.init`` (the mount is now in place) → tell whoever waits
that we are ready (the ``--background`` parent's pipe, systemd's
``NOTIFY_SOCKET``) → serve until unmounted or signalled → unmount → upload what
open files still held. Start-up problems raise ``StartupCheckError`` before
anything is mounted. No business logic lives here.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from .cache import BlockCache
from .config import Config
from .errors import NotEncrypted, ServerUnavailable, StartupCheckError, WrongKey
from .fs import Operations
from .keys import KeyRing
from .memory import give_back_memory_when_idle, keep_large_buffers_in_the_heap
from .metadata import StoredKeyIndex, XattrSealer
from .store import ObjectStore
from .uploader import abort_unfinished_uploads
from .vfs import Filesystem

log = logging.getLogger(__name__)

# How many keys to list when looking for one real object to test the key on.
KEY_CHECK_SAMPLE = 50
STATUS_INTERVAL_SECONDS = 1.0
# How many recent warnings and errors ``ssefs status`` shows.
RECENT_PROBLEMS = 5


class RecentProblems(logging.Handler):
    """Keeps the last few warnings and errors the daemon logged, for ``ssefs status``.

    It takes over the filters of the handlers already installed, so what it
    keeps is redacted exactly like the log itself.
    """

    def __init__(self, keep: int = RECENT_PROBLEMS) -> None:
        super().__init__(logging.WARNING)
        self.entries: collections.deque[dict[str, object]] = collections.deque(maxlen=keep)
        for handler in logging.getLogger().handlers:
            for log_filter in handler.filters:
                self.addFilter(log_filter)

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append({"time": record.created, "level": record.levelname, "message": record.getMessage()})


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/ssefs")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/ssefs-{os.getuid()}"
    return Path(base) / "ssefs"


def state_file(mountpoint: Path) -> Path:
    """Where the daemon serving ``mountpoint`` records its pid and status (``ssefs umount``, ``ssefs status``).

    Only the mount point's directory is resolved, not the mount point: a stat of it waits for the daemon
    serving it, which may be the one stuck, and these two commands are what one runs then. (The daemon
    passes its mount point resolved in full, so a symlink to it is found too: see ``cli``.)
    """
    absolute = Path(os.path.abspath(mountpoint))
    digest = hashlib.sha256(str(absolute.parent.resolve() / absolute.name).encode()).hexdigest()[:16]
    return runtime_dir() / f"{digest}.json"


def check_mountpoint(mountpoint: Path) -> None:
    try:
        # statvfs, not only stat: right after a daemon died, the kernel still answers
        # stat from the dead mount's cached root attributes, while statfs needs the daemon.
        os.stat(mountpoint)
        os.statvfs(mountpoint)
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise StartupCheckError(f"mount point {mountpoint} does not exist or is not a directory") from None
        # A daemon that died (kill -9, OOM) leaves a dead mount that answers ENOTCONN;
        # it serves nothing, so clearing it is what a restart needs.
        log.warning("mount point %s is a stale FUSE mount left by a dead daemon; unmounting it", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)
    if not mountpoint.is_dir():
        raise StartupCheckError(f"mount point {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise StartupCheckError(f"{mountpoint} is already a mount point")


async def startup_check(store: ObjectStore, config: Config, *, skip_key_check: bool) -> None:
    """Refuse to mount when the bucket, the credentials or the key are wrong."""
    try:
        await store.check_bucket()
        if not config.mount.read_only and await store.sse_c_blocked():
            raise StartupCheckError(
                f"bucket {config.s3.bucket!r} blocks SSE-C writes (BlockedEncryptionTypes contains SSE-C). "
                "AWS does this on new buckets since April 2026; allow it with PutBucketEncryption, "
                "or mount read-only"
            )
        if skip_key_check:
            return
        keys = await store.keys_with_prefix(config.key_prefix, KEY_CHECK_SAMPLE)
        sample = next((key for key in keys if not key.endswith("/")), None)
        if sample is None:
            return
        try:
            await store.head(sample)
        except WrongKey:
            raise StartupCheckError(
                f"the configured key (fingerprint {store.key_fingerprint}) cannot read {sample!r}: "
                "objects here are encrypted under another SSE-C key (or the credentials may not read "
                "them). Check [key] in the config, or mount anyway with --skip-key-check"
            ) from None
        except NotEncrypted as error:
            log.warning("%s (mounting anyway; such objects read as I/O errors)", error)
    except ServerUnavailable as error:
        raise StartupCheckError(str(error)) from None


def _notify_systemd(message: str) -> None:
    """sd_notify(3): tell systemd ``message``; like sd_notify, a failed delivery is logged, never raised."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.connect(target)
            notify.sendall(message.encode())
    except OSError as error:
        log.warning("could not send %s to systemd on NOTIFY_SOCKET %s: %s", message, address, error.strerror or error)


def set_kernel_read_ahead(device: int, size: int) -> None:
    """Set the kernel's read-ahead for our mount (``read_ahead_kb`` of its backing device).

    Only after the kernel has our FUSE_INIT reply, which would lower it again.
    Only root may; for other users the kernel default (128 KiB) stays and reads
    arrive in smaller requests. ``size`` 0 leaves the default.
    """
    if size <= 0:
        return
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        setting.write_text(str(max(size // 1024, 4)))
    except OSError as error:
        log.info("kernel read-ahead left at its default (%s: %s); large reads arrive in 128 KiB requests",
                 setting, error.strerror)


async def _announce_when_live(mountpoint: Path, config: Config, on_ready: Callable[[], None]) -> None:
    """Once the kernel has finished setting up the mount, tune it and say we are ready.

    A stat of the mount point from a worker thread returns only after our own
    request loop has answered FUSE_INIT (and that stat): the mount is live.
    """
    try:
        device = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
    except OSError as error:
        log.warning("could not stat the new mount %s: %s", mountpoint, error.strerror)
    else:
        set_kernel_read_ahead(device, config.mount.read_ahead)
    log.debug("mount at %s is live", mountpoint)
    on_ready()
    _notify_systemd("READY=1")


def mount_options(config: Config) -> set[str]:
    prefix = config.key_prefix.rstrip("/")
    options = set(pyfuse3.default_options)
    options.add(f"fsname=ssefs:{config.s3.bucket}{'/' + prefix if prefix else ''}")
    options.add("subtype=ssefs")
    if config.mount.allow_other:
        options.add("allow_other")
    if config.mount.read_only:
        options.add("ro")
    return options


async def serve(
    config: Config,
    keys: KeyRing,
    mountpoint: Path,
    *,
    skip_key_check: bool = False,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Mount and serve until unmounted or sent SIGINT/SIGTERM."""
    check_mountpoint(mountpoint)
    if not keep_large_buffers_in_the_heap():
        log.debug("malloc left as it is (no glibc mallopt)")
    key = keys.current
    store = ObjectStore(config.s3, keys)
    await startup_check(store, config, skip_key_check=skip_key_check or config.mount.skip_key_check)
    cache = BlockCache(
        config.cache.dir, keys, identity=f"{config.s3.endpoint}/{config.s3.bucket}/{config.key_prefix}",
        max_size=config.cache.max_size,
    )
    key_index = store.key_index = StoredKeyIndex(cache.directory)
    store.upload_journal = cache
    store.deletes.attach_journal(cache)
    if not config.mount.read_only:
        await abort_unfinished_uploads(store, cache)
    xattr_sealer = XattrSealer(*(each.derive(b"xattrs-v1") for each in keys.all))
    filesystem = Filesystem(config, store, cache, xattr_sealer)
    filesystem.recover()
    operations = Operations(filesystem)
    # Resolved before mounting: once mounted, touching the mount point from this
    # thread would wait for our own, not yet running, request loop.
    state = state_file(mountpoint.resolve())
    status = StatusReport(config, keys, mountpoint, filesystem, RecentProblems())
    logging.getLogger().addHandler(status.problems)
    pyfuse3.init(operations, str(mountpoint), mount_options(config))
    unmounted = False
    try:
        state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_state(state, status.snapshot())
        log.info(
            "mounted s3 bucket %s%s at %s (key fingerprint %s%s)",
            config.s3.bucket, "/" + config.key_prefix if config.key_prefix else "", mountpoint, key.fingerprint,
            "; previous keys " + ", ".join(k.fingerprint for k in keys.previous) if keys.previous else "",
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal)
            await nursery.start(filesystem.writeback.run)
            if not config.mount.read_only:
                await nursery.start(store.deletes.run)
            await nursery.start(cache.remove_dropped_files)
            await nursery.start(cache.keep_durable)
            filesystem.background = filesystem.streams.nursery = nursery
            nursery.start_soon(_report_status, state, status)
            nursery.start_soon(give_back_memory_when_idle)
            nursery.start_soon(_announce_when_live, mountpoint, config, on_ready)
            await pyfuse3.main()
            unmounted = True
            nursery.cancel_scope.cancel()
    finally:
        _notify_systemd("STOPPING=1")
        # Unmount first so no process hangs on a mount nobody serves; what open
        # files still hold stays in memory and is uploaded right after.
        pyfuse3.close(unmount=True)
        await filesystem.shutdown()
        cache.close()
        key_index.close()
        state.unlink(missing_ok=True)
        logging.getLogger().removeHandler(status.problems)
        log.info("unmounted %s%s", mountpoint, "" if unmounted else " (after an error)")


@dataclass
class StatusReport:
    """What ``ssefs status`` shows, gathered from the parts of a running mount."""

    config: Config
    keys: KeyRing
    mountpoint: Path
    filesystem: Filesystem
    problems: RecentProblems

    def snapshot(self) -> dict[str, object]:
        config, keys, filesystem = self.config, self.keys, self.filesystem
        writeback = filesystem.writeback.status()
        return {
            "pid": os.getpid(),
            "mountpoint": str(self.mountpoint),
            "config": str(config.path),
            "endpoint": config.s3.endpoint,
            "bucket": config.s3.bucket,
            "prefix": config.key_prefix,
            "read_only": config.mount.read_only,
            "key_fingerprint": keys.current.fingerprint,
            "previous_key_fingerprints": [key.fingerprint for key in keys.previous],
            "cache_dir": str(config.cache.dir),
            "cache_used_bytes": filesystem.cache.used_bytes,
            "cache_max_bytes": filesystem.cache.max_size,
            "dirty_files": writeback.dirty_files,
            "dirty_bytes": writeback.dirty_bytes,
            "uploads_in_flight": writeback.uploads_in_flight,
            "uploaded_files": filesystem.writeback.uploaded_files,
            "uploaded_bytes": filesystem.writeback.uploaded_bytes,
            "last_upload_error": writeback.last_error,
            "streams_active": len(filesystem.streams),
            "streams_started": filesystem.streams.started,
            "streams_abandoned": filesystem.streams.abandoned,
            "streams_parked_bytes": filesystem.streams.parked_bytes,
            "deletes_pending": len(filesystem.store.deletes),
            "deleted_files": filesystem.store.deletes.deleted,
            "last_delete_error": filesystem.store.deletes.last_error,
            "recent_problems": list(self.problems.entries),
            "updated_at": time.time(),
        }


def _write_state(path: Path, payload: dict[str, object]) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as state_out:
        json.dump(payload, state_out)
    os.replace(temporary, path)


async def _report_status(state: Path, status: StatusReport) -> None:
    """Refresh the state file that ``ssefs status`` reads, once a second."""
    while True:
        await trio.sleep(STATUS_INTERVAL_SECONDS)
        try:
            _write_state(state, status.snapshot())
        except OSError as error:
            log.debug("could not write status file %s: %s", state, error)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
