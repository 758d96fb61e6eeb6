"""The pyfuse3 operations: a thin translation layer over ``vfs.Filesystem``.

Each handler converts the kernel's arguments, calls the filesystem, and
converts the answer; lookup counts are kept here because they are part of the
FUSE protocol (every entry the kernel accepts adds one, ``forget`` subtracts).
This is the one place that raises ``pyfuse3.FUSEError``: any ``SsefsError`` is
logged (once per distinct message in a minute, with the object key, never key
material) and turned into its errno; an unexpected exception becomes EIO with a
traceback in the log rather than killing ``pyfuse3.main()``.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3

from .errors import NoSuchObject, SsefsError
from .vfs import Filesystem, FsError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# The same failure (say, every read of a file under another key) is logged once per window.
LOG_REPEAT_WINDOW_SECONDS = 60.0


class _ErrorLog:
    """Logs each distinct error message at most once per window."""

    def __init__(self) -> None:
        self._last_logged: dict[str, float] = {}

    def report(self, operation: str, error: SsefsError) -> None:
        if isinstance(error, (FsError, NoSuchObject)):
            log.debug("%s: %s", operation, error)
            return
        message = str(error)
        now = time.monotonic()
        if now - self._last_logged.get(message, -LOG_REPEAT_WINDOW_SECONDS) < LOG_REPEAT_WINDOW_SECONDS:
            return
        if len(self._last_logged) > 1000:
            self._last_logged.clear()
        self._last_logged[message] = now
        log.warning("%s failed: %s", operation, message)


def translated(handler: F) -> F:
    """Turn our errors into ``FUSEError`` with the right errno."""

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except SsefsError as error:
            self.errors.report(handler.__name__, error)
            raise pyfuse3.FUSEError(error.errno) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, wrapper)


class Operations(pyfuse3.Operations):
    """Kernel requests in, filesystem calls out."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, filesystem: Filesystem) -> None:
        super().__init__()
        self.fs = filesystem
        self.errors = _ErrorLog()
        # Directory listings are snapshotted at opendir so that offsets stay valid.
        self._listings: dict[int, list[tuple[str, Any]]] = {}
        self._directory_inodes: dict[int, int] = {}
        self._next_dir_handle = 1

    def _entry(self, node: Any) -> pyfuse3.EntryAttributes:
        self.fs.inodes.add_lookup(node)
        return self.fs.attributes(node)

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(await self.fs.lookup(parent_inode, name))
        except FsError as error:
            if error.errno != errno.ENOENT:
                raise
            log.debug("lookup %r in %d: %s", name, parent_inode, error)
            # Inode 0 tells the kernel to remember "no such name" for entry_timeout,
            # so a build probing for absent files does not ask S3 each time.
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.fs.config.mount.attr_timeout
            return negative

    @translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.fs.attributes(await self.fs.getattr(inode))

    @translated
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            await self.fs.truncate(inode, attr.st_size, fh)
        node = await self.fs.change_attributes(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self.fs.attributes(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.fs.inodes.forget(inode, count)

    @translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        listing = await self.fs.list_directory(inode)
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._listings[handle] = listing
        self._directory_inodes[handle] = inode
        return handle

    @translated
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode = self._directory_inodes.get(fh)
        if inode is not None:
            await self.fs.fsync_directory(inode)

    @translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._listings.get(fh, [])
        for index in range(start_id, len(listing)):
            name, node = listing[index]
            if not pyfuse3.readdir_reply(token, name.encode("utf-8"), self.fs.attributes(node), index + 1):
                break
            self.fs.inodes.add_lookup(node)

    @translated
    async def releasedir(self, fh: int) -> None:
        self._directory_inodes.pop(fh, None)
        for _name, node in self._listings.pop(fh, []):
            self.fs.inodes.drop_if_unused(node)

    @translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, keep_cache = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @translated
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, node = await self.fs.create(parent_inode, name, mode=mode, uid=ctx.uid, gid=ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(node)

    @translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @translated
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @translated
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @translated
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.mkdir(parent_inode, name, mode=mode, uid=ctx.uid, gid=ctx.gid))

    @translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name)

    @translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name)

    @translated
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @translated
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.symlink(parent_inode, name, target, uid=ctx.uid, gid=ctx.gid))

    @translated
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.readlink(inode)

    @translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.getxattr(inode, name)

    @translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return await self.fs.listxattr(inode)

    @translated
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.setxattr(inode, name, value)

    @translated
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, name)

    @translated
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise FsError(errno.EPERM, "hard links are not supported on S3")

    @translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return self.fs.statfs()
