"""Several keys end to end: two mounts with their own keys, and a key rotation with ``previous_keys``.

Everything runs through real FUSE mounts against SeaweedFS, and what the server
holds is checked from the outside with boto3: which key each object answers to.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ssefs.seaweed import SeaweedEndpoint
from tests.conftest import (
    Mount,
    MountFailed,
    eventually_on_server,
    server_bytes,
    sse_params,
    ssefs_command,
    start_mount,
    write_config,
    write_key_file,
)

pytestmark = pytest.mark.fuse


def with_key_lines(config: Path, lines: str) -> Path:
    """Add settings to the [key] table of a config written by ``write_config``."""
    text = config.read_text()
    text = text.replace("[key]\n", f"[key]\n{lines}\n", 1)
    config.write_text(text)
    return config


def refused_with_key(s3: Any, bucket: str, key: str, sse_key: bytes) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key, **sse_params(sse_key))
    except botocore.exceptions.ClientError as error:
        return int(error.response["ResponseMetadata"]["HTTPStatusCode"]) == 403
    return False


def test_two_mounts_with_their_own_keys_cannot_read_each_other(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any,
    mount_ssefs: Callable[..., Mount],
) -> None:
    key_a, key_b = secrets.token_bytes(32), secrets.token_bytes(32)
    config_a = write_config(tmp_path, endpoint, bucket, write_key_file(tmp_path / "a.key", key_a), name="a")
    config_b = write_config(tmp_path, endpoint, bucket, write_key_file(tmp_path / "b.key", key_b), name="b")
    mount_a = mount_ssefs(config_a, tmp_path / "mnt-a")
    mount_b = mount_ssefs(config_b, tmp_path / "mnt-b", "--skip-key-check")
    mount_a.secrets_to_hide += [key_a, key_b]
    mount_b.secrets_to_hide += [key_a, key_b]

    (mount_a.mountpoint / "a.txt").write_bytes(b"written through mount A")
    (mount_b.mountpoint / "b.txt").write_bytes(b"written through mount B")
    for mount in (mount_a, mount_b):
        os.sync()
        with open(mount.mountpoint / f"{'a' if mount is mount_a else 'b'}.txt", "rb") as written:
            os.fsync(written.fileno())
    assert server_bytes(s3, bucket, "a.txt", key_a) == b"written through mount A"
    assert server_bytes(s3, bucket, "b.txt", key_b) == b"written through mount B"
    assert refused_with_key(s3, bucket, "a.txt", key_b)
    assert refused_with_key(s3, bucket, "b.txt", key_a)

    # Each mount lists the other's file (names are not secret) but cannot read it.
    for mount, foreign in ((mount_a, "b.txt"), (mount_b, "a.txt")):
        with pytest.raises(OSError) as denied:
            (mount.mountpoint / foreign).read_bytes()
        assert denied.value.errno == errno.EACCES
    assert (mount_a.mountpoint / "a.txt").read_bytes() == b"written through mount A"
    assert (mount_b.mountpoint / "b.txt").read_bytes() == b"written through mount B"


def test_rotation_with_previous_keys_reads_old_objects_and_rewrites_under_the_new_key(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any,
    mount_ssefs: Callable[..., Mount],
) -> None:
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    old_file = write_key_file(tmp_path / "old.key", old_key)
    config = write_config(tmp_path, endpoint, bucket, old_file)
    before = mount_ssefs(config, tmp_path / "mnt-before")
    before.secrets_to_hide.append(old_key)
    for name in ("appended.txt", "chmodded.txt", "untouched.txt"):
        (before.mountpoint / name).write_bytes(f"{name} under the old key\n".encode())
    os.setxattr(before.mountpoint / "untouched.txt", "user.colour", b"blue")
    assert before.stop() == 0
    for name in ("appended.txt", "chmodded.txt", "untouched.txt"):
        assert refused_with_key(s3, bucket, name, new_key)
    # One object the mount has never seen, so it is not in the local cache.
    s3.put_object(Bucket=bucket, Key="direct.txt", Body=b"put with boto3", **sse_params(old_key))

    # The rotation: the new key becomes the key, the old one a previous key.
    write_key_file(tmp_path / "new.key", new_key)
    config.write_text(config.read_text().replace(f'file = "{old_file}"', f'file = "{tmp_path / "new.key"}"'))
    with_key_lines(config, f'previous_keys = [{{ file = "{old_file}" }}]')
    after = mount_ssefs(config, tmp_path / "mnt-after")
    after.secrets_to_hide += [old_key, new_key]
    root = after.mountpoint

    assert (root / "untouched.txt").read_bytes() == b"untouched.txt under the old key\n"
    assert (root / "direct.txt").read_bytes() == b"put with boto3"  # a GET refused, then the old key
    assert os.getxattr(root / "untouched.txt", "user.colour") == b"blue"
    with open(root / "appended.txt", "ab") as appended:
        appended.write(b"and a line under the new key\n")
        appended.flush()
        os.fsync(appended.fileno())
    os.chmod(root / "chmodded.txt", 0o600)

    # Written files are now under the new key only; the untouched one stays under the old.
    assert server_bytes(s3, bucket, "appended.txt", new_key) == (
        b"appended.txt under the old key\nand a line under the new key\n"
    )
    assert refused_with_key(s3, bucket, "appended.txt", old_key)
    eventually_on_server(s3, bucket, "chmodded.txt", new_key, b"chmodded.txt under the old key\n")
    assert refused_with_key(s3, bucket, "chmodded.txt", old_key)
    assert refused_with_key(s3, bucket, "untouched.txt", new_key)
    assert server_bytes(s3, bucket, "untouched.txt", old_key) == b"untouched.txt under the old key\n"
    assert "previous keys" in after.log()

    # The mount remembers which key each remaining old object is under, across remounts.
    assert after.stop() == 0
    with sqlite3.connect(tmp_path / "mount-cache" / "metadata.sqlite") as index:
        remembered = dict(index.execute("SELECT object_key, fingerprint FROM object_keys").fetchall())
    assert "direct.txt" in remembered
    assert "appended.txt" not in remembered and "chmodded.txt" not in remembered
    assert set(remembered.values()) == {hashlib.sha256(old_key).hexdigest()[:16]}


def test_objects_under_an_unconfigured_key_stay_unreadable_after_rotation(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any,
    mount_ssefs: Callable[..., Mount],
) -> None:
    stranger, current = secrets.token_bytes(32), secrets.token_bytes(32)
    s3.put_object(Bucket=bucket, Key="foreign.bin", Body=b"not ours", **sse_params(stranger))
    s3.put_object(Bucket=bucket, Key="ours.bin", Body=b"ours", **sse_params(current))
    config = write_config(tmp_path, endpoint, bucket, write_key_file(tmp_path / "k", current))
    mount = mount_ssefs(config, None, "--skip-key-check")
    mount.secrets_to_hide.append(current)
    assert (mount.mountpoint / "ours.bin").read_bytes() == b"ours"
    with pytest.raises(OSError) as denied:
        (mount.mountpoint / "foreign.bin").read_bytes()
    assert denied.value.errno == errno.EACCES
    assert server_bytes(s3, bucket, "foreign.bin", stranger) == b"not ours"  # nothing was lost

    # ssefs status names the problem (the daemon refreshes its status once a second).
    deadline = time.monotonic() + 10
    while True:
        status = subprocess.run(
            ssefs_command("status", str(mount.mountpoint), "--json"), capture_output=True, text=True, timeout=30
        )
        problems = json.loads(status.stdout)["recent_problems"] if status.returncode == 0 else []
        if problems or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any("foreign.bin" in problem["message"] and problem["level"] in ("WARNING", "ERROR")
               for problem in problems), problems
    shown = subprocess.run(ssefs_command("status", str(mount.mountpoint)), capture_output=True, text=True, timeout=30)
    assert "recent problems" in shown.stdout and "foreign.bin" in shown.stdout
    for secret in (base64.b64encode(current).decode(), current.hex()):
        assert secret not in shown.stdout and secret not in status.stdout


# ------------------------------------------------------------------ bad key sources: one clear error, no mount


def failed_mount(tmp_path: Path, config: Path) -> MountFailed:
    mountpoint = tmp_path / "mnt-refused"
    with pytest.raises(MountFailed) as failure:
        start_mount(config, mountpoint, tmp_path / "refused.log")
    assert not os.path.ismount(mountpoint)
    return failure.value


def key_command_config(tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, lines: str) -> Path:
    config = write_config(tmp_path, endpoint, bucket, tmp_path / "unused.key")
    config.write_text(config.read_text().replace(f'file = "{tmp_path / "unused.key"}"', lines))
    return config


def test_key_command_mounts(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, key_bytes: bytes,
    mount_ssefs: Callable[..., Mount],
) -> None:
    import base64

    vault = tmp_path / "vault"
    vault.write_text(base64.b64encode(key_bytes).decode() + "\n")
    os.chmod(vault, 0o600)
    config = key_command_config(tmp_path, endpoint, bucket, f'command = "cat {vault}"')
    mount = mount_ssefs(config)
    (mount.mountpoint / "from-command.txt").write_bytes(b"key from a command")
    with open(mount.mountpoint / "from-command.txt", "rb") as written:
        os.fsync(written.fileno())
    assert server_bytes(s3, bucket, "from-command.txt", key_bytes) == b"key from a command"
    # The command line, not the key, is what shows in the daemon's argv.
    cmdline = Path(f"/proc/{mount.process.pid}/cmdline").read_bytes()
    assert base64.b64encode(key_bytes) not in cmdline


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('command = "echo vault sealed >&2; exit 7"', "key command failed with exit code 7: vault sealed"),
        ('command = "sleep 30"\ncommand_timeout = 0.5', "key command did not finish within 0.5 seconds"),
        ('command = "echo too-short"', "key command holds 10 bytes that are neither"),
        ('credential = "photos.key"', "$CREDENTIALS_DIRECTORY is not set"),
        ('file = "/nonexistent/old.key"', "key file /nonexistent/old.key does not exist"),
        ('command = "true"\nprevious_keys = [{ file = "/nonexistent/old.key" }]', "previous_keys[0]: key file"),
    ],
)
def test_bad_key_sources_give_one_clear_error_and_no_mount(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, lines: str, expected: str,
) -> None:
    if lines.startswith('command = "true"'):
        # A good current key, so the failure is the previous key's.
        key_path = write_key_file(tmp_path / "good.key", secrets.token_bytes(32))
        lines = lines.replace('command = "true"', f'file = "{key_path}"')
    config = key_command_config(tmp_path, endpoint, bucket, lines)
    failure = failed_mount(tmp_path, config)
    assert failure.code == 1
    message = failure.stderr.strip()
    assert message.startswith("ssefs: ") and expected in message, message
    assert len(message.splitlines()) == 1, message


def test_malformed_config_gives_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('[s3]\nendpoint = "https://s3.example.com"\nbucket = "b"\n[key\nfile = "k"\n')
    result = subprocess.run(
        ssefs_command("mount", str(config), str(tmp_path)), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"ssefs: {config}") or result.stderr.startswith("ssefs: config file")
    assert "is not valid TOML" in result.stderr and len(result.stderr.strip().splitlines()) == 1
