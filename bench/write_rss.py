"""Benchmark: write one large file through ssefs and read it back, watching the daemon's memory.

Starts a local SeaweedFS (HTTPS), mounts ssefs on it, writes SIZE bytes of
random data with one sequential writer, fsyncs (so the time includes the
upload), and samples the daemon's RSS every 100 ms throughout. Then it mounts
again and reads the whole file back with one sequential reader (kernel page
cache dropped first), checking every byte, again sampling the RSS. For
comparison it uploads the same number of bytes straight from memory with boto3
multipart (same part size and concurrency) against the same server in the same
run.

    .venv/bin/python bench/write_rss.py --size 4GiB --cache 1GiB

Prints a table and, with --json, the raw figures.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

from ssefs.config import parse_size
from ssefs.seaweed import SeaweedServer

CHUNK = 8 * 1024 * 1024
PART = 8 * 1024 * 1024
CONCURRENCY = 4


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Progress(Protocol):
    """A progress bar (tqdm's): told how many more bytes are done."""

    def update(self, n: int) -> object: ...


def expected_bytes(block: bytes, offset: int, length: int) -> bytes:
    """The bytes at ``offset`` of an object made of ``block`` repeated (block is CHUNK long)."""
    out = bytearray()
    while length:
        start = offset % len(block)
        piece = block[start:start + length]
        out += piece
        offset += len(piece)
        length -= len(piece)
    return bytes(out)


def read_file_checked(path: Path, size: int, block: bytes, progress: Progress | None = None) -> None:
    """Read ``path`` sequentially in CHUNK reads and check every byte against the repeated block."""
    buffer = bytearray(CHUNK)
    offset = 0
    with open(path, "rb", buffering=0) as source:
        while True:
            count = source.readinto(buffer)
            if not count:
                break
            # bytearray == bytes is a memcmp; a memoryview compares item by item, 50x slower
            # (14 ms per 8 MiB: CPU the reader would take from the filesystem and server).
            if offset % CHUNK == 0 and count == CHUNK:
                ok = buffer == block
            else:
                ok = buffer[:count] == expected_bytes(block, offset, count)
            if not ok:
                raise AssertionError(f"{path}: wrong data at offset {offset}")
            offset += count
            if progress is not None:
                progress.update(count)
    if offset != size:
        raise AssertionError(f"{path}: read {offset} bytes, expected {size}")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._halt = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def start_daemon(config: Path, mountpoint: Path, log: Path) -> subprocess.Popen[bytes]:
    """``ssefs mount`` in the foreground; returns once it is ready."""
    read_end, write_end = os.pipe()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ssefs", "mount", str(config), str(mountpoint), "--ready-fd", str(write_end),
         "--log-file", str(log)],
        pass_fds=(write_end,),
    )
    os.close(write_end)
    with os.fdopen(read_end) as ready:
        assert ready.readline().strip() == "READY", f"mount failed; see {log}"
    return daemon


def stop_daemon(daemon: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Unmount, and wait for the daemon to upload what is left and exit."""
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    daemon.wait(timeout=600)


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        sys.stderr.write("(not root: the read-back may find pages in the kernel's cache)\n")


def progress(done: int, total: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6) / 2**20
    sys.stderr.write(f"\r  {done / 2**20:8.0f} / {total / 2**20:.0f} MiB  {rate:6.1f} MiB/s")
    sys.stderr.flush()


class ProgressLine:
    """``progress`` every 256 MiB, for ``read_file_checked``."""

    def __init__(self, total: int, started: float) -> None:
        self.total, self.started, self.done = total, started, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.done % (256 * 2**20) == 0:
            progress(self.done, self.total, self.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--cache", default="1GiB", help="[cache] max_size for the mount")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = parse_size(args.size, what="--size")
    work = Path(tempfile.mkdtemp(prefix="ssefs-bench-"))
    key = secrets.token_bytes(32)
    key_file = work / "bench.key"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    server = SeaweedServer(work / "seaweedfs")
    endpoint = server.start()
    results: dict[str, float | int | str] = {"size_bytes": size, "cache_max": args.cache}
    try:
        server.create_bucket("bench")
        config = work / "bench.toml"
        config.write_text(
            f'[s3]\nendpoint = "{endpoint.endpoint}"\nbucket = "bench"\nca_bundle = "{endpoint.ca_bundle}"\n'
            f'access_key_id = "{endpoint.access_key_id}"\nsecret_access_key = "{endpoint.secret_access_key}"\n'
            f'part_size = "{PART}"\nupload_concurrency = {CONCURRENCY}\n'
            f'[key]\nfile = "{key_file}"\n[cache]\ndir = "{work / "cache"}"\nmax_size = "{args.cache}"\n'
        )
        config.chmod(0o600)
        mountpoint = work / "mnt"
        mountpoint.mkdir()
        daemon = start_daemon(config, mountpoint, work / "ssefs.log")
        sampler = RssSampler(daemon.pid)
        sampler.start()
        results["rss_idle_bytes"] = rss_bytes(daemon.pid)
        block = secrets.token_bytes(CHUNK)
        sys.stderr.write(f"ssefs: writing {args.size} (cache {args.cache})\n")
        started = started_ssefs = time.monotonic()
        with open(mountpoint / "big.bin", "wb", buffering=0) as out:
            written = 0
            while written < size:
                written += out.write(block[: min(CHUNK, size - written)])
                if written % (256 * 2**20) == 0:
                    progress(written, size, started)
            closed_at = time.monotonic()
            os.fsync(out.fileno())
        durable_at = time.monotonic()
        sys.stderr.write("\n")
        sampler.stop()
        results["ssefs_write_seconds"] = round(closed_at - started, 2)
        results["ssefs_durable_seconds"] = round(durable_at - started, 2)
        results["ssefs_durable_mib_s"] = round(size / 2**20 / (durable_at - started), 1)
        results["rss_peak_bytes"] = sampler.peak
        stop_daemon(daemon, mountpoint)

        # Read back through a new mount: what the cache kept (at most its max_size) plus GETs for the rest.
        daemon = start_daemon(config, mountpoint, work / "ssefs-read.log")
        drop_page_cache()
        sampler = RssSampler(daemon.pid)
        sampler.start()
        sys.stderr.write(f"ssefs: reading {args.size} back\n")
        started = time.monotonic()
        read_file_checked(mountpoint / "big.bin", size, block, ProgressLine(size, started))
        read_seconds = time.monotonic() - started
        sys.stderr.write("\n")
        sampler.stop()
        results["ssefs_read_seconds"] = round(read_seconds, 2)
        results["ssefs_read_mib_s"] = round(size / 2**20 / read_seconds, 1)
        results["rss_read_peak_bytes"] = sampler.peak
        stop_daemon(daemon, mountpoint)

        sys.stderr.write("boto3: multipart upload of the same size from memory\n")
        client = endpoint.client()
        sse = {
            "SSECustomerAlgorithm": "AES256",
            "SSECustomerKey": base64.b64encode(key).decode(),
            "SSECustomerKeyMD5": base64.b64encode(hashlib.md5(key).digest()).decode(),
        }
        started = time.monotonic()
        upload_id = client.create_multipart_upload(Bucket="bench", Key="direct.bin", **sse)["UploadId"]
        parts = (size + PART - 1) // PART

        def upload(number: int) -> dict[str, object]:
            length = min(PART, size - (number - 1) * PART)
            etag = client.upload_part(Bucket="bench", Key="direct.bin", UploadId=upload_id, PartNumber=number,
                                      Body=block[:length], **sse)["ETag"]
            return {"PartNumber": number, "ETag": etag}

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            done = list(pool.map(upload, range(1, parts + 1)))
        client.complete_multipart_upload(Bucket="bench", Key="direct.bin", UploadId=upload_id,
                                         MultipartUpload={"Parts": done})
        direct = time.monotonic() - started
        results["boto3_multipart_seconds"] = round(direct, 2)
        results["boto3_multipart_mib_s"] = round(size / 2**20 / direct, 1)
        # Throughput ratio: ssefs (until durable) over the direct boto3 upload.
        results["ratio_ssefs_to_boto3"] = round(direct / (durable_at - started_ssefs), 2)
    finally:
        subprocess.run(["fusermount3", "-u", str(work / "mnt")], capture_output=True)
        server.stop()
        # Several GiB of server volumes and cache: never leave them behind.
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    mib = 2**20
    print(f"{'size':>28}: {size / mib:.0f} MiB (cache max {args.cache})")
    print(f"{'ssefs write until close':>28}: {results['ssefs_write_seconds']} s")
    print(f"{'ssefs write until durable':>28}: {results['ssefs_durable_seconds']} s "
          f"({results['ssefs_durable_mib_s']} MiB/s)")
    print(f"{'boto3 multipart (limit)':>28}: {results['boto3_multipart_seconds']} s "
          f"({results['boto3_multipart_mib_s']} MiB/s)")
    print(f"{'ssefs / limit':>28}: {results['ratio_ssefs_to_boto3']}")
    print(f"{'daemon RSS idle / peak':>28}: {int(results['rss_idle_bytes']) / mib:.0f} / "
          f"{int(results['rss_peak_bytes']) / mib:.0f} MiB")
    print(f"{'ssefs read back (checked)':>28}: {results['ssefs_read_seconds']} s "
          f"({results['ssefs_read_mib_s']} MiB/s); daemon RSS peak {int(results['rss_read_peak_bytes']) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
