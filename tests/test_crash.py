"""The crash matrix: ``kill -9`` of the daemon at many points, then a restart on the same cache.

Each case runs a real mount through the fault proxy (``tests/proxy.py``; its
latency slows uploads and copies down enough to kill the daemon in the middle
of them), kills the daemon with SIGKILL at one point, checks what S3 holds
right then, restarts the mount on the same config and cache directory, and
checks the outcome against docs/cache.md ("Crash recovery"):

- every file that ``fsync()`` returned for is in S3 at once, every file whose
  ``close()`` returned is in S3 after the restart (and reads back through the
  mount), byte for byte;
- a file being written when the daemon died comes back as everything written
  except the block the writer held in memory (the last MiB at most);
- under a file's name there is only ever a complete version of it: the old one
  or the new one (a thread lists the bucket every 0.2 s throughout);
- a directory rename cut short leaves every file under the old name, the new
  one, or both, with the right content (the state is printed);
- a multipart upload cut short is aborted by the next mount.

Every test prints ``FIGURES crashes=... files_checked=... bytes_verified=...``.
"""

from __future__ import annotations

import errno
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, eventually_on_server, keys, server_bytes, sse_params, write_config
from .figures import accumulate
from .proxy import TcpProxy
from .test_faults import ServerWatcher, drop_page_cache, is_bookkeeping, write_file

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]
MiB = 1024 * 1024
S3_SETTINGS = 'read_timeout = 10\npart_size = "5MiB"\nmultipart_threshold = "5MiB"'


# ---------------------------------------------------------------------- figures


@dataclass
class CrashFigures:
    crashes: int = 0
    files_checked: int = 0
    bytes_verified: int = 0
    watch_checks: int = 0

    def line(self, name: str) -> str:
        return (f"FIGURES test={name} crashes={self.crashes} files_checked={self.files_checked} "
                f"bytes_verified={self.bytes_verified} watch_checks={self.watch_checks}")


TOTALS = CrashFigures()


@pytest.fixture(scope="module", autouse=True)
def figures_total() -> Iterator[None]:
    yield
    print(f"\n{TOTALS.line('test_crash.py(total)')}")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[CrashFigures]:
    collected = CrashFigures()
    yield collected
    print(f"\n{collected.line(request.node.name)}")
    accumulate(TOTALS, collected)


# ---------------------------------------------------------------------- the harness


@pytest.fixture
def proxy(endpoint: SeaweedEndpoint) -> Iterator[TcpProxy]:
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as running:
        yield running


class Crashable:
    """A mount that a test kills and restarts, with everything needed to check S3 and the mount."""

    def __init__(
        self, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
        mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: CrashFigures, *,
        writeback_delay: float, s3_extra: str = "",
    ) -> None:
        self.s3, self.bucket, self.key, self.proxy, self.figures = s3, bucket, key_bytes, proxy, figures
        self._mount_ssefs = mount_ssefs
        self.config = write_config(
            tmp_path, endpoint, bucket, key_file, endpoint_url=proxy.endpoint,
            s3_extra="\n".join(filter(None, [S3_SETTINGS, s3_extra])),
            cache_extra=f"writeback_delay = {writeback_delay}",
        )
        self.mountpoint = tmp_path / "crash"
        self.mount = mount_ssefs(self.config, self.mountpoint)
        self.watcher = ServerWatcher(s3, bucket, key_bytes)

    @property
    def mnt(self) -> Path:
        return self.mountpoint

    def put(self, key: str, data: bytes) -> None:
        """An object in S3 before the crash (straight to the server), and allowed under its name."""
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, **sse_params(self.key))
        self.watcher.allow(key, data)

    def kill(self) -> None:
        self.mount.kill()
        self.figures.crashes += 1

    def restart(self) -> Mount:
        """Mount again on the same config and cache, at once (the dead mount is detached by the daemon)."""
        self.mount = self._mount_ssefs(self.config, self.mountpoint)
        return self.mount

    def assert_on_server(self, key: str, data: bytes) -> None:
        """In S3 right now (no waiting)."""
        assert server_bytes(self.s3, self.bucket, key, self.key) == data, f"{key} is not (yet) in S3"
        self.figures.files_checked += 1
        self.figures.bytes_verified += len(data)

    def assert_intact(self, files: dict[str, bytes], *, timeout: float = 60.0) -> None:
        """Each file reaches S3 byte for byte, and reads back so through the mount."""
        for key, data in files.items():
            eventually_on_server(self.s3, self.bucket, key, self.key, data, timeout=timeout)
            drop_page_cache(self.mnt / key)
            assert (self.mnt / key).read_bytes() == data, f"{key} reads back wrong through the mount"
            self.figures.files_checked += 1
            self.figures.bytes_verified += 2 * len(data)

    def finish(self) -> None:
        """Stop the watcher and require that it never saw a partial object; unmount cleanly."""
        self.watcher.check_once()
        self.watcher.stop()
        self.figures.watch_checks += self.watcher.checks
        assert not self.watcher.violations, self.watcher.violations
        assert self.mount.stop() == 0


@pytest.fixture
def crashable(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, proxy: TcpProxy, figures: CrashFigures,
) -> Callable[..., Crashable]:
    def make(**kwargs: Any) -> Crashable:
        return Crashable(tmp_path, endpoint, bucket, key_file, key_bytes, mount_ssefs, s3, proxy, figures, **kwargs)

    return make


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def in_thread(action: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    """Run a file operation that the kill will interrupt; its error (ENOTCONN etc.) is kept, not raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except OSError as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def uploads_of(s3: Any, bucket: str, key: str) -> list[str]:
    return [upload["UploadId"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            if upload["Key"] == key]


def closed_files(tag: str) -> dict[str, bytes]:
    """Files of awkward sizes: empty, one byte, around the 1 MiB block, and multipart-sized."""
    sizes = [0, 1, 4096, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 6 * MiB + 1]
    return {f"{tag}/closed-{n}.bin": secrets.token_bytes(size) for n, size in enumerate(sizes)}


def fsynced_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as writer:
        writer.write(data)
        writer.flush()
        os.fsync(writer.fileno())


# ---------------------------------------------------------------------- the matrix


def case_during_write(crash: Crashable) -> None:
    """Killed while a large file is being written (before close): all but the last two blocks survive
    (the hot one, and the one the writer left behind if it was still being sealed)."""
    synced = {"w/synced.bin": secrets.token_bytes(700_000)}
    closed = {"w/closed.bin": secrets.token_bytes(2 * MiB + 3)}
    data = secrets.token_bytes(5 * MiB + MiB // 2)
    # Blocks 0-3 were sealed as the writer moved on; block 4 was being sealed or was; block 5 was hot.
    may_survive = [data[:4 * MiB], data[:5 * MiB]]
    for key, content in {**synced, **closed}.items():
        crash.watcher.allow(key, content)
    for content in may_survive:
        crash.watcher.allow("w/big.bin", content)
    (crash.mnt / "w").mkdir()
    with crash.watcher:
        for key, content in synced.items():
            fsynced_file(crash.mnt / key, content)
        for key, content in closed.items():
            write_file(crash.mnt / key, content)
        writer = open(crash.mnt / "w/big.bin", "wb", buffering=0)
        for offset in range(0, len(data), 256 * 1024):
            assert writer.write(data[offset:offset + 256 * 1024]) == 256 * 1024
        crash.kill()
        try:
            writer.close()
        except OSError:
            pass  # the daemon is gone: ENOTCONN
        for key, content in synced.items():
            crash.assert_on_server(key, content)  # fsync meant S3
        assert not keys(crash.s3, crash.bucket, "w/big.bin")
        crash.restart()
        assert "recovered 2 file(s)" in crash.mount.log()
        survives = data[:(crash.mnt / "w/big.bin").stat().st_size]
        assert survives in may_survive
        crash.assert_intact({**synced, **closed, "w/big.bin": survives})
        crash.finish()


def case_after_close(crash: Crashable) -> None:
    """Killed after close() returned, before any upload: nothing is lost, old versions stay whole."""
    old = secrets.token_bytes(4 * MiB)
    crash.put("c/replaced.bin", old)
    files = closed_files("c")
    new = secrets.token_bytes(3 * MiB + 5)
    for key, content in {**files, "c/replaced.bin": new}.items():
        crash.watcher.allow(key, content)
    with crash.watcher:
        assert (crash.mnt / "c/replaced.bin").read_bytes() == old
        for key, content in files.items():
            write_file(crash.mnt / key, content)
        write_file(crash.mnt / "c/replaced.bin", new)
        crash.kill()
        assert keys(crash.s3, crash.bucket, "c/") == {"c/replaced.bin"}  # writeback_delay: nothing uploaded
        crash.assert_on_server("c/replaced.bin", old)
        crash.restart()
        assert f"recovered {len(files) + 1} file(s)" in crash.mount.log()
        crash.assert_intact({**files, "c/replaced.bin": new})
        crash.finish()


def case_during_multipart(crash: Crashable) -> None:
    """Killed in the middle of a multipart upload replacing a 12 MiB object: S3 keeps the old one whole."""
    old = secrets.token_bytes(12 * MiB)
    crash.put("m/big.bin", old)
    new = secrets.token_bytes(20 * MiB + 11)
    crash.watcher.allow("m/big.bin", new)
    with crash.watcher:
        crash.proxy.set_latency(per_chunk=0.05)
        crash.proxy.reset_counters()
        write_file(crash.mnt / "m/big.bin", new)  # writeback_delay = 0: the upload starts at once
        wait_for(lambda: bool(uploads_of(crash.s3, crash.bucket, "m/big.bin")), 30, "the multipart upload")
        wait_for(lambda: crash.proxy.bytes_to_server > 6 * MiB, 60, "some parts to be sent")
        crash.kill()
        crash.proxy.set_latency()
        crash.assert_on_server("m/big.bin", old)
        assert uploads_of(crash.s3, crash.bucket, "m/big.bin"), "the kill did not leave an unfinished upload"
        crash.restart()
        crash.assert_intact({"m/big.bin": new})
        crash.finish()


def case_during_fsync(crash: Crashable) -> None:
    """Killed while fsync() uploads: fsync never returned, yet the data was committed to the cache."""
    synced = secrets.token_bytes(400_000)
    data = secrets.token_bytes(3 * MiB + 1)
    crash.watcher.allow("f/synced.bin", synced)
    crash.watcher.allow("f/fsyncing.bin", data)
    (crash.mnt / "f").mkdir()
    with crash.watcher:
        fsynced_file(crash.mnt / "f/synced.bin", synced)
        crash.proxy.set_latency(per_chunk=0.05)
        crash.proxy.reset_counters()
        thread, errors = in_thread(lambda: fsynced_file(crash.mnt / "f/fsyncing.bin", data))
        wait_for(lambda: crash.proxy.bytes_to_server > MiB, 30, "the fsync upload to be under way")
        assert thread.is_alive(), "fsync returned before the kill: nothing was interrupted"
        crash.kill()
        thread.join(timeout=30)
        assert errors, "fsync cannot have succeeded"
        crash.proxy.set_latency()
        crash.assert_on_server("f/synced.bin", synced)
        assert not keys(crash.s3, crash.bucket, "f/fsyncing.bin")
        crash.restart()
        crash.assert_intact({"f/synced.bin": synced, "f/fsyncing.bin": data})
        crash.finish()


def case_truncate_unopened(crash: Crashable) -> None:
    """Killed right after truncate(2) of a file nobody had open returned: the truncate is durable."""
    old = secrets.token_bytes(3 * MiB)
    crash.put("t/file.bin", old)
    crash.watcher.allow("t/file.bin", old[:MiB + 5])
    with crash.watcher:
        assert (crash.mnt / "t/file.bin").stat().st_size == len(old)
        os.truncate(crash.mnt / "t/file.bin", MiB + 5)
        crash.kill()
        crash.assert_on_server("t/file.bin", old)
        crash.restart()
        crash.assert_intact({"t/file.bin": old[:MiB + 5]})
        crash.finish()


def case_overwrite_open(crash: Crashable) -> None:
    """Killed while rewriting an existing file opened with O_TRUNC, before close.

    What survives is the truncate plus the sealed blocks of the new data: never
    a mix with the old object's bytes, which lie past the new size saved with them.
    """
    old = secrets.token_bytes(3 * MiB + MiB // 2)
    crash.put("o/file.bin", old)
    new = secrets.token_bytes(2 * MiB + MiB // 2)
    # Block 0 was sealed; block 1 was being sealed behind the writer or was; block 2 was hot.
    may_survive = [new[:MiB], new[:2 * MiB]]
    for content in may_survive:
        crash.watcher.allow("o/file.bin", content)
    with crash.watcher:
        assert (crash.mnt / "o/file.bin").read_bytes()[:100] == old[:100]
        writer = open(crash.mnt / "o/file.bin", "wb", buffering=0)
        for offset in range(0, len(new), 128 * 1024):
            writer.write(new[offset:offset + 128 * 1024])
        crash.kill()
        try:
            writer.close()
        except OSError:
            pass
        crash.assert_on_server("o/file.bin", old)
        crash.restart()
        survives = new[:(crash.mnt / "o/file.bin").stat().st_size]
        assert survives in may_survive
        crash.assert_intact({"o/file.bin": survives})
        crash.finish()


def rename_directory_case(crash: Crashable, *, files: int, kill_when: Callable[[int, int], bool], rng: random.Random,
                          dirty: int = 5) -> dict[str, int]:
    """Kill during ``mv photos albums`` of ``files`` uploaded and ``dirty`` not yet uploaded files.

    ``kill_when(copied, old_left)`` sees how many objects are under the new name
    and how many are still under the old one. Returns the state right after the kill.
    """
    clean = {f"p{n:03d}.jpg": rng.randbytes(rng.randrange(1, 60_000)) for n in range(files)}
    pending = {f"new-{n}.jpg": rng.randbytes(rng.randrange(1, 300_000)) for n in range(dirty)}
    everything = {**clean, **pending}
    for name, data in clean.items():
        crash.put(f"photos/{name}", data)
    for name, data in everything.items():
        crash.watcher.allow(f"photos/{name}", data)
        crash.watcher.allow(f"albums/{name}", data)
    with crash.watcher:
        assert len(os.listdir(crash.mnt / "photos")) == files  # learns every file's attributes
        for name, data in pending.items():
            write_file(crash.mnt / "photos" / name, data)
        crash.proxy.set_latency(per_chunk=0.03, per_connection=0.05)
        thread, errors = in_thread(lambda: os.rename(crash.mnt / "photos", crash.mnt / "albums"))

        def progress() -> tuple[int, int]:
            copied = len([key for key in keys(crash.s3, crash.bucket, "albums/") if not is_bookkeeping(key)])
            left = len([key for key in keys(crash.s3, crash.bucket, "photos/") if not is_bookkeeping(key)])
            return copied, left

        wait_for(lambda: kill_when(*progress()) or not thread.is_alive(), 120, "the rename to get far enough")
        renamed_completely = not thread.is_alive()
        crash.kill()
        thread.join(timeout=30)
        crash.proxy.set_latency()
        assert not renamed_completely, "the rename finished before the kill"
        assert errors, "the rename cannot have succeeded"
        old_keys = keys(crash.s3, crash.bucket, "photos/")
        new_keys = keys(crash.s3, crash.bucket, "albums/")
        state = {"old_only": 0, "new_only": 0, "both": 0, "neither": 0}
        # Files that were uploaded: in S3 right after the kill, under one name or both, whole.
        for name, data in clean.items():
            old_key, new_key = f"photos/{name}", f"albums/{name}"
            for key in (old_key, new_key):
                if key in old_keys | new_keys:
                    crash.assert_on_server(key, data)
            placed = (old_key in old_keys, new_key in new_keys)
            state[{(True, False): "old_only", (False, True): "new_only", (True, True): "both"}.get(
                placed, "neither")] += 1
        assert state["neither"] == 0, state
        crash.restart()
        seen_after = {"old_only": 0, "new_only": 0, "both": 0}
        # After the restart, through the mount: every file under the old name, the new one or both.
        # The files not yet uploaded are uploaded under the name the journal gave them.
        for name, data in everything.items():
            found = []
            for directory in ("photos", "albums"):
                path = crash.mnt / directory / name
                if path.exists():
                    assert path.read_bytes() == data, f"{directory}/{name} has the wrong content"
                    found.append(f"{directory}/{name}")
                    crash.figures.bytes_verified += len(data)
            assert found, f"{name} is under neither name after the restart"
            seen_after[{1: "old_only" if found[0].startswith("photos/") else "new_only", 2: "both"}[len(found)]] += 1
            for key in found:
                eventually_on_server(crash.s3, crash.bucket, key, crash.key, data)
            crash.figures.files_checked += 1
        # Finish the job. docs/posix.md says running the same mv again does; rename(2) of photos/ onto
        # the non-empty albums/ gives ENOTEMPTY though (and mv(1) would move photos/ into albums/).
        rerun = "not needed"
        if (crash.mnt / "photos").exists():
            try:
                os.rename(crash.mnt / "photos", crash.mnt / "albums")
                rerun = "finished the rename"
            except OSError as error:
                rerun = errno.errorcode.get(error.errno or 0, str(error.errno))
            if (crash.mnt / "photos").exists():
                # Move what is left file by file.
                for name in os.listdir(crash.mnt / "photos"):
                    os.rename(crash.mnt / "photos" / name, crash.mnt / "albums" / name)
                try:
                    os.rmdir(crash.mnt / "photos")
                except FileNotFoundError:
                    pass  # photos/ had no marker object (made by boto3 puts): it vanished with its last file
        assert sorted(os.listdir(crash.mnt / "albums")) == sorted(everything)
        for name, data in everything.items():
            eventually_on_server(crash.s3, crash.bucket, f"albums/{name}", crash.key, data)
        crash.finish()
    print(f"\nRENAME-STATE files={files + dirty} uploaded_before={files} killed_after_copies="
          f"{len([k for k in new_keys if not is_bookkeeping(k)])} old_only={state['old_only']} "
          f"new_only={state['new_only']} both={state['both']} (state of the uploaded files right after the kill)"
          f"; through the restarted mount (all {files + dirty} files): old_only={seen_after['old_only']} "
          f"new_only={seen_after['new_only']} both={seen_after['both']}; rename again after the restart: {rerun}")
    return state


def case_rename_directory(crash: Crashable) -> None:
    """Killed mid-way through renaming a directory of 50 uploaded (and 5 pending) files.

    The state this leaves (printed as RENAME-STATE; the slow variants kill at later stages):

    - killed during the copies: every uploaded file is still under photos/, those already copied
      also under albums/ (nothing only under albums/); the pending files were not renamed in the
      journal yet, so the restarted mount uploads them under photos/;
    - killed after the copies, before the deletes: everything uploaded is under both names;
    - killed during the deletes: the pending files were uploaded under albums/ first, and the
      files already deleted are only under albums/, the others under both names.

    Never neither. ``rename(photos, albums)`` after the restart gives ENOTEMPTY (albums/ is not
    empty), so the files left under photos/ are moved one by one.
    """
    state = rename_directory_case(crash, files=50, kill_when=lambda copied, left: copied >= 10,
                                  rng=random.Random(secrets.randbits(32)))
    # Copies come first and deletes last: cut short during the copies, every file is still under its old name.
    assert state["old_only"] + state["both"] == 50, state


CASES: dict[str, tuple[Callable[[Crashable], None], dict[str, Any]]] = {
    "during-write": (case_during_write, {"writeback_delay": 600}),
    "after-close": (case_after_close, {"writeback_delay": 600}),
    "during-multipart": (case_during_multipart, {"writeback_delay": 0}),
    "during-fsync": (case_during_fsync, {"writeback_delay": 600}),
    "truncate-unopened": (case_truncate_unopened, {"writeback_delay": 600}),
    "overwrite-open": (case_overwrite_open, {"writeback_delay": 600}),
    "rename-directory": (case_rename_directory, {"writeback_delay": 600, "s3_extra": "max_connections = 4"}),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("point", list(CASES))
def test_kill_9_then_restart(point: str, crashable: Callable[..., Crashable]) -> None:
    case, settings = CASES[point]
    case(crashable(**settings))


@pytest.mark.timeout(180)
def test_orphaned_multipart_upload_is_aborted_by_the_next_mount(
    crashable: Callable[..., Crashable], s3: Any, bucket: str,
) -> None:
    """A multipart upload the kill cut short is aborted when the next mount starts (its journal)."""
    crash = crashable(writeback_delay=0)
    data = secrets.token_bytes(20 * MiB)
    crash.watcher.allow("orphan.bin", data)
    with crash.watcher:
        crash.proxy.set_latency(per_chunk=0.05)
        crash.proxy.reset_counters()
        write_file(crash.mnt / "orphan.bin", data)
        wait_for(lambda: bool(uploads_of(s3, bucket, "orphan.bin")), 30, "the multipart upload")
        # Parts are on their way: the daemon has had the upload's id (and journaled it) for a while.
        wait_for(lambda: crash.proxy.bytes_to_server > 6 * MiB, 60, "some parts to be sent")
        orphans = uploads_of(s3, bucket, "orphan.bin")
        crash.kill()
        crash.proxy.set_latency()
        assert uploads_of(s3, bucket, "orphan.bin") == orphans
        crash.restart()
        crash.assert_intact({"orphan.bin": data})  # the restarted mount finished uploading
        deadline = time.monotonic() + 30
        while uploads_of(s3, bucket, "orphan.bin") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert uploads_of(s3, bucket, "orphan.bin") == [], "the unfinished multipart upload was left on the server"
        crash.finish()


@pytest.mark.timeout(120)
def test_restart_right_after_kill(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes,
    mount_ssefs: MountFactory, s3: Any, figures: CrashFigures,
) -> None:
    """A supervisor restarting the daemon at once after a crash gets a working mount."""
    config = write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600")
    config.write_text(config.read_text().replace("attr_timeout = 1", "attr_timeout = 10"))
    mountpoint = tmp_path / "restart"
    first = mount_ssefs(config, mountpoint)
    data = secrets.token_bytes(100_000)
    write_file(mountpoint / "kept.bin", data)
    os.stat(mountpoint)
    first.kill()
    figures.crashes += 1
    mount_ssefs(config, mountpoint)
    eventually_on_server(s3, bucket, "kept.bin", key_bytes, data)
    figures.files_checked += 1
    figures.bytes_verified += len(data)


# ---------------------------------------------------------------------- heavier variants (-m slow)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("progress", ["first-copy", "half-copied", "copies-done", "deleting"])
def test_kill_during_large_directory_rename(progress: str, crashable: Callable[..., Crashable]) -> None:
    """200 files (and 10 pending), killed at several stages of the rename."""
    files = 200

    def kill_when(copied: int, left: int) -> bool:
        return {
            "first-copy": copied >= 1,
            "half-copied": copied >= files // 2,
            "copies-done": copied >= files,
            "deleting": left < files,
        }[progress]

    crash = crashable(writeback_delay=600, s3_extra="max_connections = 4")
    state = rename_directory_case(crash, files=files, kill_when=kill_when, rng=random.Random(secrets.randbits(32)),
                                  dirty=10)
    if progress != "deleting":
        assert state["new_only"] == 0, state


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("round_number", range(6))
def test_kill_at_random_moments_of_a_busy_mount(
    round_number: int, crashable: Callable[..., Crashable], figures: CrashFigures,
) -> None:
    """Writers, fsyncs and uploads all at once; kill -9 at a random moment, three times in a row, then check.

    Whatever the moment: every file fsynced is in S3 at once, every file closed
    is intact after the restarts, a file open for writing comes back as a
    block-aligned prefix of what was written, and S3 never shows a partial object.
    """
    rng = random.Random(secrets.randbits(32))
    crash = crashable(writeback_delay=rng.choice([0, 0.5, 2]))
    # A kill while a PUT waits for "100 Continue" makes SeaweedFS store an empty object (see
    # test_faults.py::test_put_cut_after_its_headers_never_leaves_an_empty_object): counted, not failed.
    crash.watcher.tolerate_empty = True
    crash.proxy.set_latency(per_chunk=rng.choice([0.0, 0.005, 0.02]))
    closed: dict[str, bytes] = {}
    synced: dict[str, bytes] = {}
    open_at_kill: dict[str, tuple[bytes, int]] = {}  # key -> (everything meant to be written, bytes written)
    stop = threading.Event()
    lock = threading.Lock()

    def writer(kill: int, worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            key = f"busy/k{kill}-w{worker}-{n}.bin"
            data = rng.randbytes(rng.choice([0, 1, 5000, MiB, MiB + 1, 3 * MiB + 7, 7 * MiB]))
            fsync = rng.random() < 0.3
            crash.watcher.allow(key, data)
            for end in range(MiB, len(data), MiB):  # what a kill mid-write may leave
                crash.watcher.allow(key, data[:end])
            written = 0
            try:
                with open(crash.mnt / key, "wb", buffering=0) as handle:
                    with lock:
                        open_at_kill[key] = (data, 0)
                    for offset in range(0, len(data), 256 * 1024):
                        written += handle.write(data[offset:offset + 256 * 1024])
                        with lock:
                            open_at_kill[key] = (data, written)
                    if fsync:
                        os.fsync(handle.fileno())
            except OSError:
                return  # the daemon died under us
            with lock:
                del open_at_kill[key]
                (synced if fsync else closed)[key] = data

    (crash.mnt / "busy").mkdir()
    with crash.watcher:
        for kill in range(3):
            stop.clear()
            threads = [threading.Thread(target=writer, args=(kill, n), daemon=True) for n in range(3)]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.3, 3.0))
            crash.kill()
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            with lock:
                for key, data in synced.items():
                    crash.assert_on_server(key, data)
            crash.restart()
            crash.proxy.set_latency(per_chunk=rng.choice([0.0, 0.005]))
        crash.proxy.set_latency()
        crash.assert_intact({**closed, **synced}, timeout=120)
        # Files open when a kill came: every block the writer had left behind survives but the last
        # (it may still have been being sealed); the block it was in may be lost, and so the tail of a
        # file killed while being closed.
        for key, (data, written) in open_at_kill.items():
            sealed = max(0, (written + MiB - 1) // MiB - 2) * MiB
            path = crash.mnt / key
            if not path.exists():
                assert sealed == 0 and key not in keys(crash.s3, crash.bucket, key), (key, written)
                continue
            content = path.read_bytes()
            assert len(content) >= sealed and (len(content) % MiB == 0 or len(content) == len(data)), \
                (key, len(content), written)
            assert content == data[:len(content)], key
            eventually_on_server(crash.s3, crash.bucket, key, crash.key, content)
            figures.files_checked += 1
            figures.bytes_verified += len(content)
        crash.finish()
    print(f"\nSEAWEEDFS-EMPTY-OBJECTS {len(crash.watcher.empty_objects)} (a kill between a PUT's headers and body)")
