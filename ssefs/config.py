"""The per-mount configuration: one TOML file, validated into frozen dataclasses.

This module owns reading and checking the config file and nothing else: it
resolves relative paths against the file's directory, parses sizes such as
``"10GiB"``, rejects unknown keys (a typo must not silently become a default),
and refuses unsafe settings (plain ``http://`` without ``allow_insecure_http``,
S3 secrets in a file that others can read). It names where the SSE-C key comes
from but never reads key bytes: that is ``keys.py``'s job.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError, one_line

MiB = 1024 * 1024
# S3 refuses multipart parts under 5 MiB (except the last one).
MIN_PART_SIZE = 5 * MiB
# S3 refuses single parts and single PUTs above 5 GiB.
MAX_PART_SIZE = 5 * 1024 * MiB
# The cache must hold a few blocks per file being written and uploaded at once.
MIN_CACHE_SIZE = 64 * MiB
# A config file is a few hundred bytes; anything near this is a mistake.
MAX_CONFIG_BYTES = 1024 * 1024
# A single PUT holds the whole body in memory, so files above this go multipart.
MAX_SINGLE_PUT = 256 * MiB

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(value: object, *, what: str) -> int:
    """Parse ``1048576``, ``"64MiB"``, ``"10 GB"`` into bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size such as \"10GiB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: size must not be negative")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a size such as \"10GiB\", got {value!r}")
    match = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"{what}: cannot read {value[:80]!r} as a size (examples: 512MiB, 10GiB, 1TB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(count: int) -> str:
    """Bytes for people, in the binary units ``parse_size`` reads back: ``512 B``, ``1.5 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    bucket: str
    region: str = "us-east-1"
    prefix: str = ""
    ca_bundle: Path | None = None
    allow_insecure_http: bool = False
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    addressing_style: str = "path"
    max_connections: int = 16
    multipart_threshold: int = 16 * MiB
    part_size: int = 8 * MiB
    upload_concurrency: int = 4
    # Large files written from their start upload their parts while still being written (streaming.py).
    stream_uploads: bool = True
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 4


@dataclass(frozen=True)
class KeySource:
    """Where an SSE-C key comes from: exactly one of the four is set."""

    file: Path | None = None
    env: str | None = None
    credential: str | None = None
    # A shell command that prints the key (base64) on stdout, e.g. from a secret manager.
    command: str | None = None
    command_timeout: float = 30.0

    def describe(self) -> str:
        if self.file is not None:
            return f"key file {self.file}"
        if self.env is not None:
            return f"environment variable {self.env}"
        if self.command is not None:
            return "key command"
        return f"systemd credential {self.credential}"


@dataclass(frozen=True)
class CacheSettings:
    dir: Path
    max_size: int = 10 * 1024 * MiB
    # Seconds between a file's last close and its upload: long enough that an
    # editor's save (write, rename) or tar's create-then-chmod is one upload.
    writeback_delay: float = 3.0
    # close() waits for the cache's fsync, so a power cut loses nothing closed; by default it
    # returns at the commit, as a local filesystem's close() does, and the fsync follows (cache.py).
    fsync_on_close: bool = False


@dataclass(frozen=True)
class MountSettings:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    allow_other: bool = False
    read_only: bool = False
    # Seconds the kernel and ssefs trust attributes and listings before asking S3
    # again: short, because other clients may change a shared bucket, yet long
    # enough that a command's many lookups (ls -l, a build, tar) share one listing.
    attr_timeout: float = 5.0
    skip_key_check: bool = False
    # The kernel's read-ahead for this mount: how far ahead of a sequential
    # reader it asks, and so how large its read requests get (up to 1 MiB).
    # Linux gives FUSE mounts 128 KiB, which caps requests at 128 KiB.
    read_ahead: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    path: Path
    name: str
    s3: S3Settings
    key: KeySource
    cache: CacheSettings
    mount: MountSettings
    # Keys objects may still be stored under; tried only when the current key is refused.
    previous_keys: tuple[KeySource, ...] = ()

    @property
    def key_prefix(self) -> str:
        """The object-key prefix this mount shows: ``""`` or ending in ``/``."""
        return self.s3.prefix


_SECTIONS = {"s3", "key", "cache", "mount"}


class _Section:
    """Typed access to one TOML table, remembering which keys were used."""

    def __init__(self, name: str, table: object) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                raise ConfigError(f"[{self.name}] {key} is required")
            return default
        value = self.table[key]
        # bool is an int subclass: never accept true/false where a number is meant.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"[{self.name}] {key}: expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"[{self.name}] {key}: expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"[{self.name}] unknown setting(s): {', '.join(unknown)}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", bool: "true or false", int: "a whole number", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if "//" in prefix or "\\" in prefix:
        raise ConfigError(f"[s3] prefix {prefix!r} must not contain '//' or backslashes")
    return prefix + "/" if prefix else ""


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def default_cache_dir(name: str) -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/ssefs") / name
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ssefs" / name


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a mount configuration file; every refusal is one ``ConfigError`` line."""
    try:
        return _load_config(path)
    except ConfigError as error:
        # Names and paths are quoted as given: keep control characters from breaking the line.
        if not str(error).isprintable():
            raise ConfigError(one_line(str(error))) from None
        raise


def _load_config(path: str | os.PathLike[str]) -> Config:
    config_path = Path(path).expanduser().absolute()
    try:
        # O_NONBLOCK and a size bound: a FIFO or /dev/zero given as config must not hang or exhaust memory.
        fd = os.open(config_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as config_file:
            if not stat.S_ISREG(os.fstat(config_file.fileno()).st_mode):
                raise ConfigError(f"config file {config_path} is not a regular file")
            raw = config_file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {config_path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {config_path}: {error.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {config_path} is far too large (over 1 MiB)")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {config_path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {config_path} is not valid TOML: {error}") from None
    try:
        return _build(config_path, document)
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from None


def _build(config_path: Path, document: dict[str, Any]) -> Config:
    unknown = sorted(set(document) - _SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)} (known: [s3], [key], [cache], [mount])")
    base = config_path.parent
    name = config_path.stem

    s3 = _Section("s3", document.get("s3", {}))
    endpoint = s3.get("endpoint", str, required=True).rstrip("/")
    try:
        parsed = urlparse(endpoint)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        raise ConfigError(f"[s3] endpoint {endpoint[:200]!r} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"[s3] endpoint {endpoint!r} must be an https:// URL")
    allow_http = s3.get("allow_insecure_http", bool, False)
    if parsed.scheme == "http" and not allow_http:
        raise ConfigError(
            f"[s3] endpoint {endpoint} uses plain http: the SSE-C key would travel in clear text. "
            "Use https://, or set allow_insecure_http = true for a local test server"
        )
    bucket = s3.get("bucket", str, required=True)
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"[s3] bucket {bucket!r} is not a valid bucket name (3-63 characters: a-z 0-9 . - _)")
    ca_bundle = s3.get("ca_bundle", str)
    access_key_id = s3.get("access_key_id", str)
    secret_access_key = s3.get("secret_access_key", str)
    if (access_key_id is None) != (secret_access_key is None):
        raise ConfigError("[s3] access_key_id and secret_access_key must be given together")
    if secret_access_key is not None and stat.S_IMODE(config_path.stat().st_mode) & 0o077:
        raise ConfigError(
            "[s3] secret_access_key is set but the config file is readable by group or others; "
            f"run: chmod 600 {config_path}"
        )
    addressing_style = s3.get("addressing_style", str, "path")
    if addressing_style not in ("path", "virtual", "auto"):
        raise ConfigError("[s3] addressing_style must be \"path\", \"virtual\" or \"auto\"")
    part_size = parse_size(s3.get("part_size", (str, int), "8MiB"), what="[s3] part_size")
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise ConfigError("[s3] part_size must be between 5MiB and 5GiB (S3's limits)")
    multipart_threshold = parse_size(
        s3.get("multipart_threshold", (str, int), "16MiB"), what="[s3] multipart_threshold"
    )
    if not MIN_PART_SIZE <= multipart_threshold <= MAX_SINGLE_PUT:
        raise ConfigError("[s3] multipart_threshold must be between 5MiB and 256MiB")
    s3_settings = S3Settings(
        endpoint=endpoint,
        bucket=bucket,
        region=s3.get("region", str, "us-east-1"),
        prefix=_normalise_prefix(s3.get("prefix", str, "")),
        ca_bundle=_resolve(base, ca_bundle) if ca_bundle else None,
        allow_insecure_http=allow_http,
        profile=s3.get("profile", str),
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        addressing_style=addressing_style,
        max_connections=_positive(s3, "max_connections", 16),
        multipart_threshold=multipart_threshold,
        part_size=part_size,
        upload_concurrency=_positive(s3, "upload_concurrency", 4),
        stream_uploads=s3.get("stream_uploads", bool, True),
        connect_timeout=_positive_float(s3, "connect_timeout", 5.0),
        read_timeout=_positive_float(s3, "read_timeout", 60.0),
        max_attempts=_positive(s3, "max_attempts", 4),
    )
    s3.check_unknown()
    if s3_settings.ca_bundle is not None and not s3_settings.ca_bundle.is_file():
        raise ConfigError(f"[s3] ca_bundle {s3_settings.ca_bundle} does not exist")

    key = _Section("key", document.get("key", {}))
    key_source = _key_source(key, base)
    previous = key.get("previous_keys", list, [])
    previous_keys = tuple(
        _key_source(_Section(f"key.previous_keys[{index}]", table), base) for index, table in enumerate(previous)
    )
    key.check_unknown()

    cache = _Section("cache", document.get("cache", {}))
    cache_dir = cache.get("dir", str)
    cache_settings = CacheSettings(
        dir=_resolve(base, cache_dir) if cache_dir else default_cache_dir(name),
        max_size=parse_size(cache.get("max_size", (str, int), "10GiB"), what="[cache] max_size"),
        writeback_delay=_positive_float(cache, "writeback_delay", 3.0, allow_zero=True),
        fsync_on_close=cache.get("fsync_on_close", bool, False),
    )
    if cache_settings.max_size < MIN_CACHE_SIZE:
        raise ConfigError("[cache] max_size must be at least 64MiB")
    cache.check_unknown()

    mount = _Section("mount", document.get("mount", {}))
    defaults = MountSettings()
    mount_settings = MountSettings(
        uid=_id(mount, "uid", defaults.uid),
        gid=_id(mount, "gid", defaults.gid),
        file_mode=_mode(mount, "file_mode", defaults.file_mode),
        dir_mode=_mode(mount, "dir_mode", defaults.dir_mode),
        allow_other=mount.get("allow_other", bool, False),
        read_only=mount.get("read_only", bool, False),
        attr_timeout=_positive_float(mount, "attr_timeout", defaults.attr_timeout, allow_zero=True),
        skip_key_check=mount.get("skip_key_check", bool, False),
        read_ahead=parse_size(mount.get("read_ahead", (str, int), "4MiB"), what="[mount] read_ahead"),
    )
    if mount_settings.read_ahead > 1024 * 1024 * 1024:
        raise ConfigError("[mount] read_ahead must be at most 1GiB")
    mount.check_unknown()
    return Config(config_path, name, s3_settings, key_source, cache_settings, mount_settings, previous_keys)


def _key_source(section: _Section, base: Path) -> KeySource:
    """One key source: a table with exactly one of file, env, credential, command."""
    key_file = section.get("file", str)
    key_env = section.get("env", str)
    key_credential = section.get("credential", str)
    key_command = section.get("command", str)
    command_timeout = _positive_float(section, "command_timeout", 30.0)
    if section.name != "key":
        section.check_unknown()
    given = [v for v in (key_file, key_env, key_credential, key_command) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"[{section.name}] needs exactly one of: file, env, credential, command")
    if not given[0].strip():
        raise ConfigError(f"[{section.name}] file, env, credential or command must not be empty")
    if key_credential is not None and ("/" in key_credential or key_credential in (".", "..")):
        raise ConfigError(f"[{section.name}] credential must be a plain credential name, not a path")
    if key_command is None and "command_timeout" in section.table:
        raise ConfigError(f"[{section.name}] command_timeout only applies to a key command")
    return KeySource(
        file=_resolve(base, key_file) if key_file else None, env=key_env, credential=key_credential,
        command=key_command, command_timeout=command_timeout,
    )


def _id(section: _Section, key: str, default: int) -> int:
    value: int = section.get(key, int, default)
    if not 0 <= value < 2**32 - 1:
        raise ConfigError(f"[{section.name}] {key} must be a user or group id between 0 and 4294967294")
    return value


def _positive(section: _Section, key: str, default: int) -> int:
    value: int = section.get(key, int, default)
    if value < 1:
        raise ConfigError(f"[{section.name}] {key} must be at least 1")
    return value


def _positive_float(section: _Section, key: str, default: float, *, allow_zero: bool = False) -> float:
    value = float(section.get(key, (int, float), default))
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"[{section.name}] {key} must be a positive number of seconds")
    return value


def _mode(section: _Section, key: str, default: int) -> int:
    # Only strings: an integer 644 would be read as decimal (octal 1204), silently wrong.
    if key in section.table and not isinstance(section.table[key], str):
        raise ConfigError(f"[{section.name}] {key}: write the mode as an octal string, e.g. {key} = \"0644\"")
    text = section.get(key, str, None)
    if text is None:
        return default
    try:
        value = int(text, 8)
    except ValueError:
        raise ConfigError(f"[{section.name}] {key}: {text!r} is not an octal mode such as \"0644\"") from None
    if not 0 <= value <= 0o7777:
        raise ConfigError(f"[{section.name}] {key}: mode out of range")
    return int(value)
