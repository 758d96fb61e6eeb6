"""The floor of pyfuse3 itself: a filesystem that keeps everything in a dict, for ``bench/suite.py``.

It answers the same kernel requests as ssefs does for the small-file workload (lookup, create,
write, read, getattr, unlink, mkdir, rmdir, and getxattr with ENOTSUP outside ``user.``), with
the same timeouts and mount options, but does no work behind them: no cache, no journal, no S3.
What it reaches with pyfuse3 and trio on this machine is the most any pyfuse3 filesystem can
reach on the same workload; ssefs's rate over it shows how much of the cost is ssefs's own.

    python bench/barefs.py MOUNTPOINT    # runs in the foreground until unmounted
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

# ssefs's default attr_timeout, which it uses for entries and attributes alike.
TIMEOUT = 5.0


@dataclass
class Inode:
    number: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)


class BareFs(pyfuse3.Operations):
    """Names, modes and bytes in memory; nothing else."""

    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        self.inodes = {pyfuse3.ROOT_INODE: Inode(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)}
        self.next_inode = pyfuse3.ROOT_INODE + 1

    def _attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode.number
        attributes.st_mode = inode.mode
        attributes.st_size = len(inode.data)
        attributes.st_mtime_ns = attributes.st_ctime_ns = attributes.st_atime_ns = inode.mtime_ns
        attributes.st_uid, attributes.st_gid = os.getuid(), os.getgid()
        attributes.entry_timeout = attributes.attr_timeout = TIMEOUT
        return attributes

    def _new(self, parent: int, name: bytes, mode: int) -> Inode:
        inode = Inode(self.next_inode, mode)
        self.next_inode += 1
        self.inodes[inode.number] = inode
        self.inodes[parent].children[name] = inode.number
        return inode

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        number = self.inodes[parent_inode].children.get(name)
        if number is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative
        return self._attributes(self.inodes[number])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self.inodes[inode])

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA if name.startswith(b"user.") else errno.ENOTSUP)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777)))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        number = self.inodes[parent_inode].children[name]
        if self.inodes[number].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del self.inodes[parent_inode].children[name]

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=inode.number, keep_cache=True), self._attributes(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_TRUNC:
            self.inodes[inode].data.clear()
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.inodes[fh].data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self.inodes[fh].data
        if len(data) < off:
            data.extend(bytes(off - len(data)))
        data[off:off + len(buf)] = buf
        self.inodes[fh].mtime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        del self.inodes[parent_inode].children[name]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass


def main() -> None:
    mountpoint = sys.argv[1]
    options = set(pyfuse3.default_options)
    options.add("fsname=barefs")
    pyfuse3.init(BareFs(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
