"""Shared fixtures: a real SeaweedFS over HTTPS, buckets, keys, configs, and real FUSE mounts.

One SeaweedFS server runs per test session (started on free loopback ports by
``ssefs.seaweed``, the same code the demo uses); each test gets its own bucket.
``mount_ssefs`` starts ``python -m ssefs mount`` as a subprocess, exactly as a
user would, waits until the mount appears in /proc/self/mountinfo, and always
unmounts and reaps the daemon at the end, killing it if it does not go. After
each mount, the daemon's log is checked for tracebacks and for key material.
"""

from __future__ import annotations

import base64
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ssefs.seaweed import SeaweedEndpoint, SeaweedServer

MOUNT_TIMEOUT_SECONDS = 60.0


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def endpoint(seaweed: SeaweedServer) -> SeaweedEndpoint:
    return seaweed.endpoint


@pytest.fixture
def s3(endpoint: SeaweedEndpoint) -> Any:
    return endpoint.client()


@pytest.fixture
def bucket(seaweed: SeaweedServer) -> str:
    name = "t-" + secrets.token_hex(6)
    seaweed.create_bucket(name)
    return name


def sse_params(key: bytes) -> dict[str, str]:
    """SSE-C parameters computed independently of ssefs.keys, for checking from the outside."""
    import hashlib

    return {
        "SSECustomerAlgorithm": "AES256",
        "SSECustomerKey": base64.b64encode(key).decode(),
        "SSECustomerKeyMD5": base64.b64encode(hashlib.md5(key).digest()).decode(),
    }

def keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    """Every key in the bucket under ``prefix``, as the server lists them."""
    found: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update(item["Key"] for item in page.get("Contents", []))
    return found


def server_bytes(s3: Any, bucket: str, key: str, sse_key: bytes) -> bytes:
    response = s3.get_object(Bucket=bucket, Key=key, **sse_params(sse_key))
    return bytes(response["Body"].read())


def fsync_directory(path: Path) -> None:
    """fsync of a directory: returns once S3 has confirmed the deletes queued under it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def eventually_on_server(s3: Any, bucket: str, key: str, sse_key: bytes, expected: bytes | bytearray,
                         timeout: float = 30.0) -> None:
    """Write-back uploads a few seconds after close: wait until the server holds ``expected``."""
    deadline = time.monotonic() + timeout
    last: bytes | str = "nothing"
    while time.monotonic() < deadline:
        try:
            last = server_bytes(s3, bucket, key, sse_key)
            if last == expected:
                return
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            last = str(error)  # not there yet, or replaced while we read it
        time.sleep(0.2)
    shown = last[:80] if isinstance(last, bytes) else last
    raise AssertionError(f"{key} never reached the expected content on the server (last: {shown!r})")



@pytest.fixture
def key_bytes() -> bytes:
    # Start with a NUL and keep another inside: binary keys must survive every layer.
    return b"\x00" + secrets.token_bytes(15) + b"\x00" + secrets.token_bytes(15)


def write_key_file(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(key)
    os.chmod(path, mode)
    return path


@pytest.fixture
def key_file(tmp_path: Path, key_bytes: bytes) -> Path:
    return write_key_file(tmp_path / "mount.key", key_bytes)


def write_config(
    directory: Path,
    endpoint: SeaweedEndpoint,
    bucket: str,
    key_file: Path,
    *,
    name: str = "mount",
    s3_extra: str = "",
    mount_extra: str = "",
    cache_extra: str = "",
    endpoint_url: str | None = None,
) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(
        f"""
[s3]
endpoint = "{endpoint_url or endpoint.endpoint}"
region = "{endpoint.region}"
bucket = "{bucket}"
ca_bundle = "{endpoint.ca_bundle}"
access_key_id = "{endpoint.access_key_id}"
secret_access_key = "{endpoint.secret_access_key}"
connect_timeout = 2
max_attempts = 2
{s3_extra}

[key]
file = "{key_file}"

[cache]
dir = "{directory / (name + '-cache')}"
{cache_extra}

[mount]
attr_timeout = 1
{mount_extra}
"""
    )
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def config_file(tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path) -> Path:
    return write_config(tmp_path, endpoint, bucket, key_file)


def ssefs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssefs", *args]


def is_mounted(mountpoint: Path) -> bool:
    # mountinfo writes a space in a path as \040 (tab, newline, backslash likewise).
    target = str(mountpoint).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def unmount(mountpoint: Path) -> None:
    """Unmount everything stacked on ``mountpoint`` (a dead mount may sit under a live one)."""
    for _attempt in range(5):
        if not is_mounted(mountpoint):
            return
        result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@dataclass
class Mount:
    """A running ``ssefs mount`` daemon and where it is mounted."""

    mountpoint: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    secrets_to_hide: list[bytes] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, *, unmount: bool = False) -> None:
        """SIGKILL the daemon (a crash) and wait for it; ``unmount`` also detaches the dead mount."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        if unmount:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)

    def stop(self, timeout: float = 60.0) -> int:
        """Unmount and wait for the daemon to exit; returns its exit code."""
        unmount(self.mountpoint)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=30)


def start_mount(
    config: Path, mountpoint: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> Mount:
    try:
        os.lstat(mountpoint)
    except FileNotFoundError:
        mountpoint.mkdir(parents=True)
    except OSError:
        pass  # e.g. ENOTCONN: a dead mount the daemon is expected to clear
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        ssefs_command(
            "mount", str(config), str(mountpoint), "--log-file", str(log_path), "--ready-fd", str(write_end), *extra
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(write_end,),
        env=env,
    )
    os.close(write_end)
    mount = Mount(mountpoint, process, log_path)
    # The daemon reports READY on this pipe once the mount is live, or closes it on failure.
    with os.fdopen(read_end, "rb") as ready_pipe:
        ready, _, _ = select.select([ready_pipe], [], [], MOUNT_TIMEOUT_SECONDS)
        line = ready_pipe.readline().decode(errors="replace").strip() if ready else ""
    if line != "READY":
        if not ready:
            process.kill()
        code = process.wait(timeout=60)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        raise MountFailed(code if ready else -1, stderr or line, mount.log())
    return mount


class MountFailed(Exception):
    def __init__(self, code: int, stderr: str, log: str) -> None:
        super().__init__(f"ssefs mount exited with {code}: {stderr}\n{log}")
        self.code = code
        self.stderr = stderr
        self.log = log


@pytest.fixture
def mount_ssefs(tmp_path: Path, key_bytes: bytes) -> Iterator[Callable[..., Mount]]:
    """Factory: mount a config; every mount is unmounted and its log checked at teardown."""
    mounts: list[Mount] = []

    def factory(config: Path, mountpoint: Path | None = None, *extra: str, **kwargs: Any) -> Mount:
        index = len(mounts)
        mount = start_mount(
            config, mountpoint or tmp_path / f"mnt{index}", tmp_path / f"ssefs{index}.log", *extra, **kwargs
        )
        mount.secrets_to_hide.append(key_bytes)
        mounts.append(mount)
        return mount

    try:
        yield factory
    finally:
        for mount in mounts:
            if mount.process.poll() is None:
                mount.stop()
            else:
                unmount(mount.mountpoint)
        for mount in mounts:
            assert_log_clean(mount.log(), mount.secrets_to_hide)


def assert_log_clean(log: str, keys: list[bytes]) -> None:
    assert "Traceback" not in log, log
    for key in keys:
        for encoding in (base64.b64encode(key).decode(), key.hex(), base64.urlsafe_b64encode(key).decode()):
            assert encoding not in log


def send_signal_and_wait(mount: Mount, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    mount.process.send_signal(signum)
    return mount.process.wait(timeout=timeout)
