"""The SSE-C key: the only module that holds key bytes.

It loads the 32-byte key from one source (a file holding 32 raw bytes or their
base64, an environment variable holding the base64, a systemd credential in
``$CREDENTIALS_DIRECTORY``, or a command such as a secret manager's client that
prints the base64 within a timeout), refuses anything else with one clear
message, and computes once the values S3 wants in its three SSE-C headers. A
``KeyRing`` holds the current key and the previous ones still accepted for
reading during a rotation. The key object's
``repr``/``str`` show only a short fingerprint, error messages never quote key
material, and ``redaction_strings`` lets the log handler scrub the encoded key
should a library ever try to log a request header.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, KeySource
from .errors import KeyLoadError, one_line

KEY_BYTES = 32
# A key file is tiny; anything much larger is a mistake and is not read whole.
MAX_KEY_FILE_BYTES = 4096
SSE_ALGORITHM = "AES256"


class SseKey:
    """A 256-bit SSE-C customer key with its encoded header values."""

    __slots__ = ("_raw", "_b64", "_md5_b64", "fingerprint")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            length = len(raw) if isinstance(raw, bytes) else "?"
            raise KeyLoadError(f"an SSE-C key must be exactly {KEY_BYTES} bytes, got {length}")
        self._raw = raw
        self._b64 = base64.b64encode(raw).decode("ascii")
        self._md5_b64 = base64.b64encode(hashlib.md5(raw).digest()).decode("ascii")
        # A short, non-reversible name for logs and status output.
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]

    @property
    def md5_b64(self) -> str:
        """The key's MD5 as S3 echoes it in ``x-amz-server-side-encryption-customer-key-MD5``."""
        return self._md5_b64

    def sse_params(self) -> dict[str, str]:
        """boto3 parameters for a request that reads or writes data under this key."""
        return {
            "SSECustomerAlgorithm": SSE_ALGORITHM,
            "SSECustomerKey": self._b64,
            "SSECustomerKeyMD5": self._md5_b64,
        }

    def sse_headers(self) -> dict[str, str]:
        """The same three values as the HTTP headers of a request sent without boto3."""
        return {
            "x-amz-server-side-encryption-customer-algorithm": SSE_ALGORITHM,
            "x-amz-server-side-encryption-customer-key": self._b64,
            "x-amz-server-side-encryption-customer-key-MD5": self._md5_b64,
        }

    def copy_source_params(self) -> dict[str, str]:
        """boto3 parameters naming this key as the key of a copy source."""
        return {
            "CopySourceSSECustomerAlgorithm": SSE_ALGORITHM,
            "CopySourceSSECustomerKey": self._b64,
            "CopySourceSSECustomerKeyMD5": self._md5_b64,
        }

    def derive(self, purpose: bytes) -> bytes:
        """A 32-byte subkey for a local purpose (e.g. cache encryption), via HKDF-SHA256."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ssefs/" + purpose).derive(self._raw)

    def redaction_strings(self) -> tuple[str, ...]:
        """Encodings of the key that must never reach a log line."""
        return (self._b64, self._raw.hex(), base64.urlsafe_b64encode(self._raw).decode("ascii"))

    def __repr__(self) -> str:
        return f"SseKey(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("SSE-C keys are not picklable")


def parse_key_bytes(data: bytes, *, origin: str, allow_raw: bool = True) -> SseKey:
    """Accept 32 raw bytes (files only), or their base64 (one line, surrounding whitespace ignored)."""
    if allow_raw and len(data) == KEY_BYTES:
        return SseKey(data)
    text = data.strip()
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = None
    if decoded is not None and len(decoded) == KEY_BYTES:
        return SseKey(decoded)
    accepted = f"{KEY_BYTES} raw bytes nor the base64" if allow_raw else "the base64"
    raise KeyLoadError(
        f"{origin} holds {len(data)} bytes that are neither {accepted} of {KEY_BYTES} bytes "
        "(44 characters); create a key with: ssefs keygen PATH"
    )


def _read_protected_file(path: Path, *, origin: str) -> bytes:
    try:
        # O_NONBLOCK: a FIFO in place of the key file must not hang start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyLoadError(f"{origin} does not exist") from None
    except PermissionError:
        raise KeyLoadError(f"{origin} is not readable by this user") from None
    except ValueError:  # a NUL in the path
        raise KeyLoadError(f"{origin} is not a valid path") from None
    except OSError as error:
        if error.errno == 40:  # ELOOP from O_NOFOLLOW: a symlink; resolve and retry once.
            return _read_protected_file(path.resolve(), origin=origin)
        raise KeyLoadError(f"cannot open {origin}: {error.strerror}") from None
    # Check the descriptor before wrapping it: os.fdopen refuses a directory with
    # IsADirectoryError, which must become a KeyLoadError like any other refusal.
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyLoadError(f"{origin} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise KeyLoadError(
                f"{origin} is readable or writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as key_file:
        data = key_file.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyLoadError(f"{origin} is far too large to be a key")
    return data


def load_key(source: KeySource) -> SseKey:
    """Load the key from the configured source, or raise ``KeyLoadError`` with one clear line."""
    try:
        return _load_key(source)
    except KeyLoadError as error:
        if not str(error).isprintable():  # a path or name quoted as given
            raise KeyLoadError(one_line(str(error))) from None
        raise


def _load_key(source: KeySource) -> SseKey:
    if source.file is not None:
        origin = f"key file {source.file}"
        return parse_key_bytes(_read_protected_file(source.file, origin=origin), origin=origin)
    if source.env is not None:
        origin = f"environment variable {source.env}"
        value = os.environ.get(source.env)
        if not value:
            raise KeyLoadError(f"{origin} is not set (it should hold the base64 of a 32-byte key)")
        # Only base64 here: 32 characters of text would be a weak key taken as raw bytes.
        return parse_key_bytes(value.encode("utf-8", "surrogateescape"), origin=origin, allow_raw=False)
    if source.command is not None:
        return _run_key_command(source.command, source.command_timeout)
    assert source.credential is not None
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise KeyLoadError(
            f"systemd credential {source.credential!r} requested but $CREDENTIALS_DIRECTORY is not set "
            "(use LoadCredential= in the service unit)"
        )
    path = Path(directory) / source.credential
    origin = f"systemd credential {path}"
    return parse_key_bytes(_read_protected_file(path, origin=origin), origin=origin)


def _run_key_command(command: str, timeout: float) -> SseKey:
    origin = "key command"
    try:
        result = subprocess.run(
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise KeyLoadError(f"{origin} did not finish within {timeout:g} seconds") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the command
        raise KeyLoadError(f"cannot run {origin}: {getattr(error, 'strerror', None) or error}") from None
    if result.returncode != 0:
        # The last line of stderr usually names the problem (locked vault, wrong
        # passphrase); it is shown only if it cannot be the key itself.
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        # Only printable text, and long base64- or hex-like runs blanked: they could be key material.
        line = "".join(char for char in lines[-1] if char.isprintable()) if lines else ""
        hint = re.sub(r"[A-Za-z0-9+/=_-]{20,}", "[...]", line)[:200].strip()
        printed = result.stdout.decode("utf-8", "replace").strip()
        if printed and printed in hint:
            hint = ""
        raise KeyLoadError(f"{origin} failed with exit code {result.returncode}" + (f": {hint}" if hint else ""))
    if len(result.stdout) > MAX_KEY_FILE_BYTES:
        raise KeyLoadError(f"{origin} printed far too much to be a key")
    return parse_key_bytes(result.stdout, origin=origin, allow_raw=False)


@dataclass(frozen=True)
class KeyRing:
    """The mount's current key, which writes use, and older keys still accepted for reading."""

    current: SseKey
    previous: tuple[SseKey, ...] = ()

    @property
    def all(self) -> tuple[SseKey, ...]:
        return (self.current, *self.previous)

    def by_fingerprint(self, fingerprint: str) -> SseKey | None:
        return next((key for key in self.all if key.fingerprint == fingerprint), None)

    def redaction_strings(self) -> tuple[str, ...]:
        return tuple(text for key in self.all for text in key.redaction_strings())


def load_key_ring(config: Config) -> KeyRing:
    """Load the current key and every ``previous_keys`` source; the first failure is the error."""
    current = load_key(config.key)
    previous: list[SseKey] = []
    for index, source in enumerate(config.previous_keys):
        try:
            key = load_key(source)
        except KeyLoadError as error:
            raise KeyLoadError(f"previous_keys[{index}]: {error}") from None
        if all(key.fingerprint != known.fingerprint for known in (current, *previous)):
            previous.append(key)
    return KeyRing(current, tuple(previous))


def write_new_key(path: Path) -> SseKey:
    """Create ``path`` holding 32 random bytes, mode 0600; never overwrite."""
    raw = os.urandom(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise KeyLoadError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as error:
        raise KeyLoadError(f"cannot create {path}: {error.strerror}") from None
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(raw)
        key_file.flush()
        os.fsync(key_file.fileno())
    return SseKey(raw)
