"""The ``ssefs`` console script, and its mount(8) helper form.

This module owns the program's entry point and the command line that mount(8)
uses: for ``mount -t fuse.ssefs CONFIG MOUNTPOINT -o OPTIONS`` (or an
``/etc/fstab`` line of type ``fuse.ssefs``), fuse3's ``mount.fuse3`` runs
``ssefs CONFIG MOUNTPOINT -o OPTIONS``. ``entry`` recognises that shape, checks
every option (an unknown one is refused with one line and exit code 1, before
anything is mounted), turns the ones ssefs honours into ``ssefs mount
--background`` options and runs that command in-process, so the helper returns
only once the mount is live, or exits 1 with the reason, as mount(8) expects.
Options meant for mount(8) or systemd are accepted and ignored. Every other
command line goes to the click group ``ssefs.cli.main`` unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from .cli import LOG_LEVELS, main

# Accepted and ignored: they steer mount(8), systemd's fstab generator or the
# kernel's access-time updates (ssefs keeps no access times: atime is mtime).
IGNORED_OPTIONS = frozenset({
    "rw", "defaults", "auto", "noauto", "_netdev", "nofail", "user", "nouser", "users", "owner", "group",
    "async", "atime", "noatime", "relatime", "strictatime", "nodiratime", "diratime", "lazytime",
    "nolazytime",
    # The mount is always nodev,nosuid: the modes shown come from the bucket, and
    # whoever can write objects must not be able to plant a device node or a
    # setuid-root program. mount.fuse3 adds "dev,suid" for root on its own.
    "dev", "nodev", "suid", "nosuid", "exec",
})
IGNORED_PREFIXES = ("x-", "comment=")

# mount(2) flags, as in <sys/mount.h>, and the statvfs(3) flags that report them.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 32, 1024, 2048, 4096, 1 << 21
_MOUNT_FLAGS = (
    (os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_SYNCHRONOUS, MS_SYNCHRONOUS), (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)


class OptionError(Exception):
    """A mount option ssefs does not accept; the message is the whole error line."""


@dataclass(frozen=True)
class HelperRequest:
    """What ``ssefs CONFIG MOUNTPOINT -o OPTIONS`` asks for."""

    config: str
    mountpoint: str
    read_only: bool = False
    allow_other: bool = False
    noexec: bool = False
    skip_key_check: bool = False
    log_level: str | None = None

    def mount_arguments(self) -> list[str]:
        """The ``ssefs mount`` command line (without the program name) doing the same."""
        arguments = ["mount", "--background"]
        if self.read_only:
            arguments.append("--read-only")
        if self.allow_other:
            arguments.append("--allow-other")
        if self.skip_key_check:
            arguments.append("--skip-key-check")
        if self.log_level is not None:
            arguments += ["--log-level", self.log_level]
        return [*arguments, "--", self.config, self.mountpoint]


def entry(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: the mount(8) helper form, or the ``ssefs`` command group."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not is_helper_form(arguments):
        main(args=arguments, prog_name="ssefs")
        return
    try:
        request = parse_helper_arguments(arguments)
    except OptionError as error:
        click.echo(f"ssefs: {error}", err=True)
        sys.exit(1)
    sys.exit(run_helper(request))


def is_helper_form(arguments: Sequence[str]) -> bool:
    """``SOURCE MOUNTPOINT [-o OPTIONS]...``: SOURCE is no subcommand, MOUNTPOINT a directory."""
    if len(arguments) < 2:
        return False
    source, mountpoint = arguments[0], arguments[1]
    if source.startswith("-") or source in main.commands:
        return False
    # A mistyped subcommand ("ssefs moutn /mnt") is not taken for a config file.
    if not (os.path.exists(source) or "/" in source or source.endswith(".toml")):
        return False
    return _is_directory(mountpoint)


def _is_directory(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as error:
        # A stale FUSE mount left by a dead daemon; ``ssefs mount`` clears it.
        return error.errno == errno.ENOTCONN


def parse_helper_arguments(arguments: Sequence[str]) -> HelperRequest:
    """Read ``SOURCE MOUNTPOINT [-o OPTIONS]...``; ``OptionError`` for anything ssefs cannot honour."""
    options: list[str] = []
    rest = list(arguments[2:])
    while rest:
        argument = rest.pop(0)
        if argument == "-o":
            if not rest:
                raise OptionError("-o needs a list of mount options")
            options += rest.pop(0).split(",")
        elif argument.startswith("-o"):
            options += argument[2:].split(",")
        else:
            raise OptionError(f"unexpected argument {argument!r} (usage: ssefs CONFIG MOUNTPOINT [-o OPTIONS])")
    flags: set[str] = set()
    log_level: str | None = None
    for option in options:
        if not option or option in IGNORED_OPTIONS or option.startswith(IGNORED_PREFIXES):
            continue
        if option in ("ro", "allow_other", "noexec", "skip_key_check"):
            flags.add(option)
        elif option.startswith("log_level="):
            log_level = option.split("=", 1)[1]
            if log_level not in LOG_LEVELS:
                raise OptionError(f"mount option {option!r}: the level must be one of {', '.join(LOG_LEVELS)}")
        else:
            raise OptionError(f"unknown mount option {option!r}")
    return HelperRequest(
        arguments[0], arguments[1], read_only="ro" in flags, allow_other="allow_other" in flags,
        noexec="noexec" in flags, skip_key_check="skip_key_check" in flags, log_level=log_level,
    )


def run_helper(request: HelperRequest) -> int:
    """Mount in the background like ``ssefs mount --background``; the exit code for mount(8)."""
    try:
        main(args=request.mount_arguments(), prog_name="ssefs")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    else:
        code = 0
    if code != 0 or not request.noexec:
        return code
    try:
        _add_mount_flags(request.mountpoint, MS_NOEXEC)
    except OSError as error:
        subprocess.run([sys.executable, "-m", "ssefs", "umount", request.mountpoint], check=False)
        click.echo(f"ssefs: cannot apply noexec to {request.mountpoint} ({error.strerror}); unmounted it", err=True)
        return 1
    return 0


def _add_mount_flags(mountpoint: str, flags: int) -> None:
    """Add per-mount flags to a live mount (``mount -o remount,bind,...``), keeping the ones it has."""
    reported = os.statvfs(mountpoint).f_flag
    current = sum(flag for reported_flag, flag in _MOUNT_FLAGS if reported & reported_flag)
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.fsencode(Path(mountpoint).absolute())
    if libc.mount(None, target, None, ctypes.c_ulong(MS_REMOUNT | MS_BIND | current | flags), None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), mountpoint)


__all__ = ["entry", "is_helper_form", "parse_helper_arguments", "HelperRequest", "OptionError"]
