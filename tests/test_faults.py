"""Network faults between ssefs and S3, and a SeaweedFS killed mid-upload: nothing lost, nothing partial.

Each FUSE test mounts through the fault proxy (``tests/proxy.py``) with short
timeouts and few attempts, so that retries happen quickly, and runs a mixed
workload (new files from empty to multipart-sized, a full and a partial
overwrite of existing objects, reads and stats of existing objects, listings)
from several threads while the proxy injects one kind of fault. Then the fault
is turned off and the test checks that:

- every file whose ``close()`` returned is in S3, byte for byte (boto3 GET with
  the SSE-C key, straight to the server), and reads back through the mount;
- what the application saw fail, failed with EIO, within a bounded time (a
  fault is an error, never a hang);
- at no time was anything but a complete version of a file under its name (a
  thread lists the bucket every 0.2 s, past the proxy, and checks sizes and,
  for objects up to 2 MiB, content hashes).

Each test prints a ``FIGURES`` line (faults injected, operations checked,
bytes verified); ``pytest -s`` shows them.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from ssefs.seaweed import SeaweedEndpoint, SeaweedServer

from .conftest import Mount, eventually_on_server, server_bytes, sse_params, write_config
from .figures import accumulate
from .proxy import TcpProxy

MountFactory = Callable[..., Mount]

MiB = 1024 * 1024
# Short timeouts and 5 MiB parts: retries come within seconds, and 20 MiB makes four parts.
S3_FAST_RETRIES = 'read_timeout = 2\npart_size = "5MiB"\nmultipart_threshold = "5MiB"'
# What an application may see when S3 misbehaves.
ALLOWED_ERRNOS = {errno.EIO}
# No single file operation may take longer than this, whatever the network does. One S3 request gives
# up after max_attempts (2) x (connect 2 s + read 2 s) plus backoff; a lookup makes up to about five
# requests in a row, and requests queue for the connection limit behind stalled uploads.
OPERATION_LIMIT_SECONDS = 30.0
# When the server answers nothing at all, every request waits for its timeouts: measured up to ~40 s.
BLACKHOLE_OPERATION_LIMIT_SECONDS = 90.0
# The fault stays on at least this long, so that background uploads run into it too.
FAULT_MIN_SECONDS = 3.0
# Objects up to this size are also compared by content while the workload runs.
WATCH_CONTENT_LIMIT = 2 * MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_bookkeeping(key: str) -> bool:
    """Directory markers and directory-attribute sidecars: not files of the workload."""
    return key.endswith("/") or key.rsplit("/", 1)[-1] == ".ssefs-dirs"


def drop_page_cache(path: Path) -> None:
    """Make the next read of ``path`` reach ssefs rather than the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as writer:
        for offset in range(0, len(data), MiB):
            writer.write(data[offset:offset + MiB])


def put_object(s3: Any, bucket: str, key: str, data: bytes, sse_key: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=data, **sse_params(sse_key))


# ---------------------------------------------------------------------- figures


@dataclass
class Figures:
    """What a test did, for the lead's tables: printed as one ``FIGURES`` line."""

    faults: int = 0
    ops: int = 0
    failed_ops: int = 0
    bytes_verified: int = 0
    watch_checks: int = 0
    slowest: float = 0.0  # seconds, of the slowest operation the application saw
    errnos: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def line(self, name: str) -> str:
        errors = ",".join(f"{code}:{n}" for code, n in sorted(self.errnos.items())) or "none"
        return (f"FIGURES test={name} faults={self.faults} ops={self.ops} failed_ops={self.failed_ops} "
                f"errnos={errors} slowest_op={self.slowest:.1f}s watch_checks={self.watch_checks} "
                f"bytes={self.bytes_verified}")


TOTALS = Figures()


@pytest.fixture(scope="module", autouse=True)
def figures_total() -> Iterator[None]:
    yield
    print(f"\n{TOTALS.line('test_faults.py(total)')}")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    collected = Figures()
    yield collected
    print(f"\n{collected.line(request.node.name)}")
    accumulate(TOTALS, collected)


# ---------------------------------------------------------------------- watching S3


class ServerWatcher:
    """Lists the bucket straight from the server every 0.2 s while a workload runs.

    Every object under a file's name must be one of the versions ``allow``ed for
    it (by size; up to ``WATCH_CONTENT_LIMIT`` also by content hash, fetched
    when the ETag changes); anything else, an object under a name nobody wrote,
    is a violation. A server that is down is simply not checked meanwhile.
    """

    def __init__(self, s3: Any, bucket: str, sse_key: bytes, *, tolerate_empty: bool = False) -> None:
        self.s3, self.bucket, self.sse_key = s3, bucket, sse_key
        self.sizes: dict[str, set[int]] = {}
        self.hashes: dict[str, set[str]] = {}
        self.violations: list[str] = []
        # Empty objects that no version explains: with ``tolerate_empty`` noted here and not counted as
        # violations (the SeaweedFS bug of test_put_cut_after_its_headers_never_leaves_an_empty_object).
        self.tolerate_empty = tolerate_empty
        self.empty_objects: set[str] = set()
        self.checks = 0
        self._etags: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def allow(self, key: str, data: bytes) -> None:
        self.sizes.setdefault(key, set()).add(len(data))
        self.hashes.setdefault(key, set()).add(sha(data))

    def __enter__(self) -> ServerWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def check_once(self) -> None:
        try:
            pages = list(self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return  # the server is down (a test killed it): nothing to see now
        for page in pages:
            for item in page.get("Contents", []):
                self._check(item["Key"], int(item["Size"]), str(item["ETag"]))

    def _check(self, key: str, size: int, etag: str) -> None:
        if is_bookkeeping(key):
            return
        self.checks += 1
        if key not in self.sizes:
            self.violations.append(f"unexpected object {key!r} ({size} bytes)")
            return
        if size == 0 and 0 not in self.sizes[key] and self.tolerate_empty:
            self.empty_objects.add(key)
            return
        if size not in self.sizes[key]:
            self.violations.append(f"{key!r} has {size} bytes: no complete version has that size "
                                   f"(allowed {sorted(self.sizes[key])})")
            return
        if size <= WATCH_CONTENT_LIMIT and self._etags.get(key) != etag:
            try:
                content = server_bytes(self.s3, self.bucket, key, self.sse_key)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
                return  # replaced or deleted meanwhile, or the server went down
            if sha(content) not in self.hashes[key]:
                self.violations.append(f"{key!r}: {len(content)} bytes that are no complete version of it")
            self._etags[key] = etag

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.check_once()


# ---------------------------------------------------------------------- the workload


@dataclass
class Outcome:
    kind: str
    target: str
    error: int | None
    seconds: float


class Workload:
    """Operations on a mount, run from several threads; each records how it ended and how long it took.

    An operation either succeeds and its result is checked (wrong bytes fail the
    test at once), or raises ``OSError``, whose errno is recorded.
    """

    def __init__(self, mnt: Path, figures: Figures) -> None:
        self.mnt = mnt
        self.figures = figures
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()

    def run(self, kind: str, target: str, operation: Callable[[], None]) -> bool:
        started = time.monotonic()
        error: int | None = None
        try:
            operation()
        except OSError as failure:
            error = failure.errno if failure.errno is not None else -1
        seconds = time.monotonic() - started
        with self._lock:
            self.outcomes.append(Outcome(kind, target, error, seconds))
        return error is None

    def check(self, allowed_errnos: set[int] = ALLOWED_ERRNOS, limit: float = OPERATION_LIMIT_SECONDS) -> None:
        """Every failure had an allowed errno, and nothing took longer than the limit."""
        with self.figures.lock:
            self.figures.ops += len(self.outcomes)
            for outcome in self.outcomes:
                if outcome.error is not None:
                    self.figures.failed_ops += 1
                    self.figures.errnos[errno.errorcode.get(outcome.error, str(outcome.error))] += 1
        wrong = [o for o in self.outcomes if o.error is not None and o.error not in allowed_errnos]
        assert not wrong, f"operations failed with unexpected errno values: {wrong}"
        slow = [o for o in self.outcomes if o.seconds > limit]
        assert not slow, f"operations took longer than {limit} s: {slow}"
        with self.figures.lock:
            self.figures.slowest = max([self.figures.slowest, *(o.seconds for o in self.outcomes)])


@dataclass
class Scenario:
    """The bucket's files before and after a workload, and which of them the workload may change."""

    existing: dict[str, bytes]          # in the bucket before the mount (key -> content)
    read_only: set[str]                 # existing keys the workload only reads
    new: dict[str, bytes]               # keys the workload creates
    replaced: dict[str, bytes]          # existing keys it overwrites entirely (key -> new content)
    patched: dict[str, tuple[int, bytes]]  # existing keys it patches in place (offset, bytes)
    expected: dict[str, bytes] = field(default_factory=dict)  # filled in as operations succeed
    written_before: set[str] = field(default_factory=set)  # created (and closed) before this workload

    def patched_content(self, key: str) -> bytes:
        offset, patch = self.patched[key]
        old = self.existing[key]
        return old[:offset] + patch + old[offset + len(patch):]

    def versions(self, key: str) -> list[bytes]:
        found = []
        if key in self.existing:
            found.append(self.existing[key])
        if key in self.new:
            found.append(self.new[key])
        if key in self.replaced:
            found.append(self.replaced[key])
        if key in self.patched:
            found.append(self.patched_content(key))
        return found


def make_scenario(tag: str, *, heavy: bool = False) -> Scenario:
    """Files of many sizes: empty, tiny, block-sized and off by one, single PUT, multipart (20 MiB)."""
    existing_sizes = [1000, 300_000, MiB + 7, 3 * MiB, 7 * MiB]
    existing = {f"existing/read-{n}.bin": secrets.token_bytes(size) for n, size in enumerate(existing_sizes)}
    existing["existing/replace.bin"] = secrets.token_bytes(2 * MiB)
    existing["existing/patch.bin"] = secrets.token_bytes(3 * MiB)
    new_sizes = [0, 1, 4095, 65_536, MiB, MiB + 1, 2 * MiB + MiB // 2, 5 * MiB, 5 * MiB + 1, 20 * MiB]
    if heavy:
        new_sizes += [secrets.randbelow(3 * MiB) for _ in range(30)] + [12 * MiB + 3]
    new = {f"new/{tag}-{n:02d}.bin": secrets.token_bytes(size) for n, size in enumerate(new_sizes)}
    new.update({f"new/sub/{tag}-{n}.bin": secrets.token_bytes(100_000 * (n + 1)) for n in range(3)})
    return Scenario(
        existing=existing,
        read_only={key for key in existing if "/read-" in key},
        new=new,
        replaced={"existing/replace.bin": secrets.token_bytes(MiB + MiB // 2)},
        patched={"existing/patch.bin": (MiB + MiB // 2 - 10, secrets.token_bytes(4096))},
    )


def run_workload(workload: Workload, scenario: Scenario, *, threads: int = 6) -> None:
    """Every operation of the scenario, concurrently; records into ``scenario.expected`` what must persist."""
    mnt = workload.mnt
    lock = threading.Lock()
    expected = scenario.expected

    def settle(key: str, content: bytes) -> None:
        with lock:
            expected[key] = content

    def create(key: str, data: bytes) -> None:
        if workload.run("write-new", key, lambda: write_file(mnt / key, data)):
            settle(key, data)

    def replace(key: str, data: bytes) -> None:
        if workload.run("overwrite", key, lambda: write_file(mnt / key, data)):
            settle(key, data)

    def patch(key: str) -> None:
        offset, data = scenario.patched[key]

        def operation() -> None:
            with open(mnt / key, "r+b") as writer:
                writer.seek(offset)
                writer.write(data)

        if workload.run("patch", key, operation):
            settle(key, scenario.patched_content(key))

    def read(key: str) -> None:
        def operation() -> None:
            content = (mnt / key).read_bytes()
            assert content == scenario.existing[key], f"{key}: read {len(content)} wrong bytes during a fault"

        workload.run("read", key, operation)

    def stat(key: str) -> None:
        def operation() -> None:
            assert (mnt / key).stat().st_size == len(scenario.existing[key])

        workload.run("stat", key, operation)

    def listing(directory: str) -> None:
        def names_in(keys: Iterable[str]) -> set[str]:
            return {key[len(directory) + 1:] for key in keys
                    if key.startswith(directory + "/") and "/" not in key[len(directory) + 1:]}

        always = names_in({*scenario.read_only, *scenario.written_before})
        possible = names_in({*scenario.existing, *scenario.new, *scenario.written_before})
        possible.add("sub")

        def operation() -> None:
            names = set(os.listdir(mnt / directory))
            assert always <= names, f"listing of {directory} lacks {always - names}"
            assert names <= possible, f"listing of {directory} shows unknown names {names - possible}"

        workload.run("list", directory, operation)

    jobs: list[Callable[[], None]] = []
    jobs += [functools.partial(create, key, data) for key, data in scenario.new.items()]
    jobs += [functools.partial(replace, key, data) for key, data in scenario.replaced.items()]
    jobs += [functools.partial(patch, key) for key in scenario.patched]
    for key in sorted(scenario.read_only):
        jobs += [functools.partial(read, key), functools.partial(stat, key)]
    jobs += [functools.partial(listing, directory) for directory in ("existing", "new", "new/sub")]
    # Interleave kinds so that reads, writes and listings overlap.
    order = sorted(range(len(jobs)), key=lambda n: (n * 7919) % len(jobs))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(jobs[n]) for n in order]:
            future.result()
    # What the workload did not change successfully keeps its old content.
    for key in scenario.existing:
        expected.setdefault(key, scenario.existing[key])


def verify_everything(
    mnt: Path, s3: Any, bucket: str, sse_key: bytes, scenario: Scenario, figures: Figures, *, timeout: float = 90.0
) -> None:
    """Faults are off: S3 and the mount hold exactly the expected files, byte for byte, and nothing else."""
    expected = scenario.expected
    for key, data in expected.items():
        eventually_on_server(s3, bucket, key, sse_key, data, timeout=timeout)
        figures.bytes_verified += len(data)
    listed = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            if not is_bookkeeping(item["Key"]):
                listed[item["Key"]] = int(item["Size"])
    # Files whose creation failed may not exist; anything else must be exactly as expected.
    assert set(listed) == set(expected), (
        f"on the server but not expected: {sorted(set(listed) - set(expected))}; "
        f"expected but missing: {sorted(set(expected) - set(listed))}"
    )
    assert all(listed[key] == len(data) for key, data in expected.items())
    for key, data in expected.items():
        drop_page_cache(mnt / key)
        assert (mnt / key).read_bytes() == data, f"{key} reads back wrong through the mount"
        figures.bytes_verified += len(data)
    for directory in ("existing", "new", "new/sub"):
        wanted = sorted(key[len(directory) + 1:] for key in expected
                        if key.startswith(directory + "/") and "/" not in key[len(directory) + 1:])
        names = sorted(name for name in os.listdir(mnt / directory) if name != "sub")
        assert names == wanted, f"listing of {directory} through the mount"
        figures.ops += 1


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def proxy(endpoint: SeaweedEndpoint) -> Iterator[TcpProxy]:
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as running:
        yield running


# ---------------------------------------------------------------------- the proxy itself (no FUSE)


class _Server:
    """A loopback server that sends ``reply`` to each connection and keeps what it receives."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.received: list[bytes] = []
        self.endings: list[str | None] = []  # how each connection ended, as the server saw it
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket) -> None:
        got = bytearray()
        self.received.append(b"")
        self.endings.append(None)
        slot = len(self.received) - 1
        threading.Thread(target=self._send, args=(connection,), daemon=True).start()
        try:
            while chunk := connection.recv(65536):
                got += chunk
                self.received[slot] = bytes(got)
            self.endings[slot] = "eof"
        except OSError:
            self.endings[slot] = "reset"


    def _send(self, connection: socket.socket) -> None:
        try:
            connection.sendall(self.reply)
        except OSError:
            pass


def _drain(client: socket.socket, limit: int) -> tuple[bytes, str]:
    """Read until EOF, reset or timeout; returns what came and how it ended."""
    got = bytearray()
    try:
        while len(got) < limit:
            chunk = client.recv(65536)
            if not chunk:
                return bytes(got), "eof"
            got += chunk
    except ConnectionResetError:
        return bytes(got), "reset"
    except TimeoutError:
        return bytes(got), "timeout"
    return bytes(got), "complete"


@pytest.mark.timeout(60)
def test_proxy_faults_act_at_the_byte_asked_for() -> None:
    reply = secrets.token_bytes(1_000_000)
    server = _Server(reply)
    with TcpProxy("127.0.0.1", server.port) as proxy:
        def connect() -> socket.socket:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            client.settimeout(1.5)
            return client

        with connect() as client:
            assert _drain(client, len(reply)) == (reply, "complete")

        proxy.inject("reset", after=300_000, direction="from_server")
        with connect() as client:
            got, how = _drain(client, len(reply))
            assert how == "reset" and got == reply[:len(got)] and len(got) <= 300_000

        proxy.inject("truncate", after=123_456, direction="from_server")
        with connect() as client:
            assert _drain(client, len(reply)) == (reply[:123_456], "eof")

        proxy.inject("stall", after=200_000, direction="from_server")
        with connect() as client:
            got, how = _drain(client, len(reply))
            assert how == "timeout" and got == reply[:200_000]
        proxy.inject("stall", direction="both")  # after=0: accepted, never connected onward
        with connect() as client:
            assert _drain(client, len(reply)) == (b"", "timeout")
        proxy.clear()

        proxy.inject("reset", after=50_000, direction="to_server", times=1)
        payload = secrets.token_bytes(400_000)
        slot = len(server.received)
        with connect() as client:
            try:
                client.sendall(payload)
                time.sleep(0.5)
                client.sendall(payload)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (len(server.received) <= slot or len(server.received[slot]) < 50_000):
            time.sleep(0.05)
        assert server.received[slot] == payload[:50_000]
        with connect() as client:  # ``times=1``: the next connection is spared
            assert _drain(client, len(reply)) == (reply, "complete")
        proxy.clear()

        proxy.set_latency(per_connection=0.3)
        started = time.monotonic()
        with connect() as client:
            assert _drain(client, len(reply)) == (reply, "complete")
        assert time.monotonic() - started >= 0.3
        proxy.set_latency()

        other = _Server(b"another server")
        proxy.retarget("127.0.0.1", other.port)
        with connect() as client:
            assert _drain(client, 14) == (b"another server", "complete")
        assert proxy.faults_injected == 5  # reset, truncate, two stalls, one reset to the server
        proxy.retarget("127.0.0.1", server.port)

        # A request cut short with a clean FIN: the server reads exactly the bytes forwarded, then EOF.
        proxy.inject("truncate", after=1000, direction="to_server", times=1)
        slot = len(server.endings)
        with connect() as client:
            client.sendall(payload[:5000])
            assert _drain(client, len(reply))[1] == "eof"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (len(server.endings) <= slot or server.endings[slot] is None):
            time.sleep(0.05)
        assert (server.received[slot], server.endings[slot]) == (payload[:1000], "eof")
        assert proxy.faults_injected == 6

        proxy.down()
        try:
            with connect() as client:
                assert _drain(client, 1)[1] in ("reset", "eof")
        except ConnectionResetError:
            pass  # reset before connect() even returned
    server.listener.close()
    other.listener.close()


# ---------------------------------------------------------------------- FUSE through a faulty network


def _inject(proxy: TcpProxy, kind: str) -> None:
    if kind == "latency":
        proxy.set_latency(per_chunk=0.002, per_connection=0.05)
    elif kind == "reset-download":       # GET bodies cut mid-way (RST)
        proxy.inject("reset", after=200_000, direction="from_server")
    elif kind == "reset-upload":         # PUT and part bodies cut mid-way (RST)
        proxy.inject("reset", after=1_500_000, direction="to_server")
    elif kind == "reset-early":          # every connection cut after 20 kB either way: nothing big gets through
        proxy.inject("reset", after=20_000, direction="both")
    elif kind == "flaky":                # one connection in a few is cut: retries should hide most of it
        proxy.inject("reset", after=100_000, direction="both", times=8)
    elif kind == "stall-midway":         # connections freeze after 300 kB either way (a blackholed route)
        proxy.inject("stall", after=300_000, direction="both")
    elif kind == "blackhole":            # the server accepts and never answers, established connections freeze
        proxy.inject("stall", direction="both")
    elif kind == "truncate-response":    # the response ends early with a clean FIN
        proxy.inject("truncate", after=150_000, direction="from_server")
    elif kind == "truncate-request":     # the request body ends early with a clean FIN
        proxy.inject("truncate", after=700_000, direction="to_server")
    else:
        raise AssertionError(kind)


def _fault_case(
    kind: str, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: Figures, *, heavy: bool = False,
) -> None:
    scenario = make_scenario(kind, heavy=heavy)
    for key, data in scenario.existing.items():
        put_object(s3, bucket, key, data, key_bytes)
    config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint,
                          s3_extra=S3_FAST_RETRIES, cache_extra="writeback_delay = 0")
    mount = mount_ssefs(config)
    mnt = mount.mountpoint
    (mnt / "new").mkdir()
    (mnt / "new" / "sub").mkdir()
    workload = Workload(mnt, figures)
    watcher = ServerWatcher(s3, bucket, key_bytes)
    for key in {*scenario.existing, *scenario.new}:
        for version in scenario.versions(key):
            watcher.allow(key, version)
    with watcher:
        started = time.monotonic()
        _inject(proxy, kind)
        run_workload(workload, scenario)
        time.sleep(max(0.0, FAULT_MIN_SECONDS - (time.monotonic() - started)))
        proxy.clear()
        proxy.set_latency()
        figures.faults += proxy.faults_injected
        workload.check(limit=BLACKHOLE_OPERATION_LIMIT_SECONDS if kind == "blackhole" else OPERATION_LIMIT_SECONDS)
        verify_everything(mnt, s3, bucket, key_bytes, scenario, figures)
    watcher.check_once()
    figures.watch_checks += watcher.checks
    assert not watcher.violations, watcher.violations
    if kind == "latency":
        assert not any(o.error for o in workload.outcomes), "latency alone must not make anything fail"
        assert proxy.connections > 0
    else:
        assert proxy.faults_injected > 0, "the fault never fired: the test proved nothing"
    created = [key for key in scenario.new if key in scenario.expected]
    # With nothing answering, creating a file in a directory never listed fails with EIO (ssefs
    # will not guess that a name is absent); elsewhere most files must have been created.
    wanted = 1 if kind == "blackhole" else len(scenario.new) // 2
    assert len(created) >= wanted, f"only {len(created)} of {len(scenario.new)} files were created"
    assert mount.stop() == 0
    assert "; 0 file(s) left dirty" in mount.log()


DEFAULT_FAULTS = ["latency", "reset-download", "reset-upload", "stall-midway", "truncate-response"]
SLOW_FAULTS = ["reset-early", "flaky", "blackhole", "truncate-request"]


@pytest.mark.fuse
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", DEFAULT_FAULTS)
def test_workload_survives_network_fault(
    kind: str, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: Figures,
) -> None:
    _fault_case(kind, tmp_path, endpoint, bucket, key_file, key_bytes, mount_ssefs, s3, proxy, figures)


@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("kind", SLOW_FAULTS + DEFAULT_FAULTS)
def test_heavy_workload_survives_network_fault(
    kind: str, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: Figures,
) -> None:
    _fault_case(kind, tmp_path, endpoint, bucket, key_file, key_bytes, mount_ssefs, s3, proxy, figures,
                heavy=True)


@pytest.mark.fuse
@pytest.mark.timeout(120)
@pytest.mark.parametrize("root_listed", [True, False], ids=["parent-listed", "parent-looked-up"])
def test_new_files_can_be_created_during_an_outage_after_the_listing_expired(
    root_listed: bool, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: Figures,
) -> None:
    """Writes go to the cache during an outage (README, docs/cache.md): also once cached listings expired."""
    put_object(s3, bucket, "dir/known.bin", b"k" * 1000, key_bytes)
    config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint,
                          s3_extra=S3_FAST_RETRIES, cache_extra="writeback_delay = 0")
    mount = mount_ssefs(config)
    mnt = mount.mountpoint
    if root_listed:
        assert os.listdir(mnt) == ["dir"]
    assert sorted(os.listdir(mnt / "dir")) == ["known.bin"]
    proxy.down()
    figures.faults += 1
    time.sleep(2.5)  # attr_timeout is 1 s: the kernel's and ssefs's listings have expired
    workload = Workload(mnt, figures)
    data = secrets.token_bytes(300_000)
    target = mnt / "dir" / "during-outage.bin"
    created = workload.run("write-new", "dir/during-outage.bin", lambda: write_file(target, data))
    proxy.up()
    workload.check()
    assert created, f"creating a file in a known directory during an outage failed: {workload.outcomes}"
    eventually_on_server(s3, bucket, "dir/during-outage.bin", key_bytes, data, timeout=60)
    figures.bytes_verified += len(data)


class OrphanLeft(AssertionError):
    """A multipart upload stayed on the server after every mount was done with it."""


@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_lost_create_multipart_response_leaves_no_unfinished_upload(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: Figures,
) -> None:
    """The server creates the upload, its answer never arrives, the client retries: the first upload must go.

    Found by this suite (the journal learnt upload ids only from answers); fixed by journaling the
    request before it is sent and aborting the strays of a retried one.
    """
    config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint,
                          s3_extra=S3_FAST_RETRIES, cache_extra="writeback_delay = 1")
    mount = mount_ssefs(config)
    data = secrets.token_bytes(12 * MiB)
    write_file(mount.mountpoint / "lost.bin", data)
    # The upload starts a second later, on a pooled connection: hold back the next answer from the server.
    proxy.inject("stall", direction="from_server", times=1)
    deadline = time.monotonic() + 10
    while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline, "the stalled request was not the CreateMultipartUpload"
        time.sleep(0.05)
    first = [upload["UploadId"] for upload in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]]
    figures.faults += 1
    eventually_on_server(s3, bucket, "lost.bin", key_bytes, data, timeout=60)  # the retry got through
    proxy.clear()
    figures.bytes_verified += len(data)
    assert mount.stop() == 0
    mount_ssefs(config, mount.mountpoint)  # a new mount aborts the uploads its journal lists, before it is ready
    deadline = time.monotonic() + 2
    left: list[str] = first
    while left and time.monotonic() < deadline:
        left = [upload["UploadId"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
                if upload["UploadId"] in first]
        time.sleep(0.5)
    if left:
        raise OrphanLeft(f"unfinished multipart upload(s) {left} stay on the server (billed, invisible)")


class EmptyObjectSeen(AssertionError):
    """The server held an empty object under a file's name: neither its old nor its new content."""


@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_put_cut_after_its_headers_never_leaves_an_empty_object(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: Figures,
) -> None:
    """An upload cut off between its headers and its body leaves the old version in place."""
    old, new = secrets.token_bytes(300_000), secrets.token_bytes(200_000)
    put_object(s3, bucket, "victim.bin", old, key_bytes)
    config = write_config(tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint,
                          s3_extra=S3_FAST_RETRIES, cache_extra="writeback_delay = 1")
    mount = mount_ssefs(config)
    victim = mount.mountpoint / "victim.bin"
    assert victim.read_bytes() == old  # the daemon now has a connection in its pool
    write_file(victim, new)
    assert proxy.open_connections > 0, "no pooled connection: the first request would not go out alone"
    # Every connection ends (FIN to the server) after the next chunk the daemon sends on it: on the pooled
    # connection that is the PUT's headers (the body waits for "100 Continue"); new connections get no
    # further than their TLS ClientHello, so the retries fail and the server's state stays visible.
    proxy.inject("truncate", after=1, direction="to_server", whole_chunk=True)
    deadline = time.monotonic() + 10
    while proxy.faults_injected < 2:
        assert time.monotonic() < deadline, "the upload never came"
        time.sleep(0.05)
    seen: set[int] = set()
    for _ in range(10):
        listed = {item["Key"]: int(item["Size"]) for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
        seen.add(listed["victim.bin"])
        time.sleep(0.1)
    proxy.clear()
    figures.faults += proxy.faults_injected
    eventually_on_server(s3, bucket, "victim.bin", key_bytes, new, timeout=60)
    figures.bytes_verified += len(new)
    if seen != {len(old)}:
        raise EmptyObjectSeen(f"sizes of victim.bin on the server while uploads were cut: {sorted(seen)} "
                              f"(old version: {len(old)} bytes)")


# ---------------------------------------------------------------------- the server itself dies


@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_seaweedfs_killed_and_restarted_during_uploads(
    tmp_path: Path, key_file: Path, key_bytes: bytes, mount_ssefs: MountFactory, figures: Figures,
) -> None:
    """SIGKILL SeaweedFS while a multipart and several small uploads are in flight, write on, restart it."""
    server = SeaweedServer(tmp_path / "own-seaweedfs")
    endpoint = server.start()
    try:
        bucket = "crashing"
        server.create_bucket(bucket)
        s3 = endpoint.client()
        scenario = make_scenario("killed")
        for key, data in scenario.existing.items():
            put_object(s3, bucket, key, data, key_bytes)
        config = write_config(tmp_path, endpoint, bucket, key_file, s3_extra=S3_FAST_RETRIES,
                              cache_extra="writeback_delay = 0")
        mount = mount_ssefs(config)
        mnt = mount.mountpoint
        (mnt / "new").mkdir()
        (mnt / "new" / "sub").mkdir()
        watcher = ServerWatcher(s3, bucket, key_bytes)
        for key in {*scenario.existing, *scenario.new}:
            for version in scenario.versions(key):
                watcher.allow(key, version)
        big = max(scenario.new, key=lambda key: len(scenario.new[key]))
        before = {key: data for key, data in scenario.new.items() if key != big and len(data) < MiB}
        with watcher:
            for key, data in before.items():
                write_file(mnt / key, data)
                scenario.expected[key] = data
            write_file(mnt / big, scenario.new[big])
            scenario.expected[big] = scenario.new[big]
            # Kill the server while the big file's multipart upload is in flight.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
                    break
                time.sleep(0.02)
            in_flight = bool(s3.list_multipart_uploads(Bucket=bucket).get("Uploads"))
            server.crash()
            figures.faults += 1
            crashed_at = time.monotonic()
            # The rest of the workload runs against a dead server, then it comes back.
            rest = Scenario(
                existing=scenario.existing, read_only=scenario.read_only,
                new={key: data for key, data in scenario.new.items() if key not in scenario.expected},
                replaced=scenario.replaced, patched=scenario.patched, written_before=set(scenario.expected),
            )
            figures.ops += len(scenario.expected)
            workload = Workload(mnt, figures)
            run_workload(workload, rest)
            # Restarting takes SeaweedFS 10-15 s (raft), so uploads meet the outage several
            # times and back off: resuming at once keeps the test short.
            server.resume()
            outage = time.monotonic() - crashed_at
            workload.check()
            scenario.expected.update(rest.expected)
            verify_everything(mnt, s3, bucket, key_bytes, scenario, figures, timeout=120)
        watcher.check_once()
        figures.watch_checks += watcher.checks
        assert not watcher.violations, watcher.violations
        assert in_flight, "the multipart upload was never seen in flight: the kill did not hit it"
        failed_during_outage = [o for o in workload.outcomes if o.error is not None]
        assert any(o.kind == "read" for o in failed_during_outage), "reads of uncached files cannot succeed"
        print(f"\nSeaweedFS was down for {outage:.1f} s")
        assert mount.stop() == 0
        # The upload the crash cut short was either aborted once the server was back, or is
        # recorded in the cache's journal: a new mount leaves no unfinished upload behind.
        mount_ssefs(config, mnt)
        deadline = time.monotonic() + 30
        while s3.list_multipart_uploads(Bucket=bucket).get("Uploads") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    finally:
        server.stop()
