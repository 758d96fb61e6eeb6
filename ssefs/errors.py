"""Exception types that carry an errno, shared by every layer.

Each layer raises these (or lets them pass); only ``fs.py`` turns them into
``pyfuse3.FUSEError``, and only ``cli.py`` turns start-up errors into an exit
code and one line on stderr. Messages name the object or file concerned and
never contain key material.
"""

from __future__ import annotations

import errno


class SsefsError(Exception):
    """Base class: a message for people and the errno a file operation should see."""

    errno: int = errno.EIO

    def __init__(self, message: str, *, errno_value: int | None = None) -> None:
        super().__init__(message)
        if errno_value is not None:
            self.errno = errno_value


class ConfigError(SsefsError):
    """The mount configuration is missing, malformed or unsafe."""

    errno = errno.EINVAL


class KeyLoadError(SsefsError):
    """The SSE-C key could not be loaded or is invalid (never includes the key itself)."""

    errno = errno.EINVAL


class StartupCheckError(SsefsError):
    """The bucket, credentials or key failed the check made before mounting."""


class NoSuchObject(SsefsError):
    """The object (or bucket) does not exist: 404."""

    errno = errno.ENOENT


class WrongKey(SsefsError):
    """The object is encrypted under another SSE-C key, or access is denied: 403."""

    errno = errno.EACCES


class NotEncrypted(SsefsError):
    """The object is not stored with SSE-C, or the server did not echo our key's MD5."""

    errno = errno.EIO


class SseBlocked(SsefsError):
    """The bucket refuses SSE-C writes (AWS blocks SSE-C on new buckets since April 2026)."""

    errno = errno.EACCES


class ServerUnavailable(SsefsError):
    """The server could not be reached or kept failing after bounded retries."""

    errno = errno.EIO


def unwrap_group(error: BaseException) -> BaseException:
    """The most meaningful single error inside a (possibly nested) exception group.

    trio nurseries raise groups; callers of ssefs want the first ``SsefsError``
    (the errno to report), else the first leaf.
    """
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if isinstance(current, BaseExceptionGroup):
            pending[:0] = list(current.exceptions)
        else:
            leaves.append(current)
    return next((leaf for leaf in leaves if isinstance(leaf, SsefsError)), leaves[0] if leaves else error)


def one_line(text: str) -> str:
    """``text`` with control characters escaped, so that a quoted name or path cannot break the line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
