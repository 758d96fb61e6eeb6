"""Concurrency and load on one mount: parallel processes, fio with verification, readers racing a writer.

Every test checks content, not just exit codes: workers write deterministic data and the test
compares what the mount and then S3 (read back with boto3 after a clean unmount, which uploads
everything) hold with what was written; fio verifies CRC32C checksums of every block it wrote, and
once more from a mount with an empty cache, i.e. from S3. Readers of a file that a writer is
appending to must only ever see a prefix of the final content.

No test may hang CI: pytest-timeout bounds each test, and every wait on a worker process has its
own timeout after which the workers (ours) are terminated and the test fails.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, keys, server_bytes, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]
MiB = 1024 * 1024
WORKER_TIMEOUT = 240.0  # seconds any group of worker processes may take before the test fails
SPAWN = multiprocessing.get_context("spawn")


def content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_pool(
    function: Callable[..., Any], arguments: list[tuple[Any, ...]], timeout: float = WORKER_TIMEOUT
) -> list[Any]:
    """Run ``function`` in one spawned process per argument tuple; fail (and kill them) past ``timeout``."""
    pool: Pool = SPAWN.Pool(len(arguments))
    try:
        pending = pool.starmap_async(function, arguments)
        try:
            return list(pending.get(timeout=timeout))
        except multiprocessing.TimeoutError:
            raise AssertionError(f"{function.__name__} workers did not finish within {timeout:.0f} s "
                                 "(a deadlock or a hang in the mount)") from None
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------- many processes, many files


def file_worker(root: str, worker: int, files: int, big_every: int) -> dict[str, Any]:
    """Write files (through a temporary name and a rename, as editors do), read them back, list the
    tree, read and stat other workers' files, unlink some; returns the files it leaves and counters."""
    base = Path(root)
    mine = base / f"w{worker}"
    mine.mkdir()
    expected: dict[str, str] = {}
    written = listings = foreign_reads = 0
    rng = random.Random(worker)
    for index in range(files):
        size = 3 * MiB + rng.randrange(100_000) if big_every and index % big_every == 0 else rng.randrange(200_000)
        data = content(worker * 100_000 + index, size)
        temporary, final = mine / f".f{index}.tmp", mine / f"f{index}"
        with open(temporary, "wb") as handle:
            for offset in range(0, size, 65536):
                handle.write(data[offset:offset + 65536])
        os.rename(temporary, final)
        written += size
        assert final.read_bytes() == data, f"{final} reads back differently right after close"
        expected[f"w{worker}/f{index}"] = digest(data)
        if index % 5 == 4:
            os.unlink(mine / f"f{index - 2}")
            del expected[f"w{worker}/f{index - 2}"]
        # Lists while the others write: every name listed is either still there or just unlinked/renamed.
        for directory, _subdirectories, names in os.walk(base):
            listings += 1
            for name in names:
                try:
                    os.stat(Path(directory) / name)
                except FileNotFoundError:
                    pass
        other = base / f"w{(worker + 1) % 4}"
        if other.is_dir():
            for name in sorted(os.listdir(other))[:3]:
                if not name.startswith("."):
                    try:
                        (other / name).read_bytes()
                        foreign_reads += 1
                    except FileNotFoundError:
                        pass
    for name, want in expected.items():
        assert digest((base / name).read_bytes()) == want, f"{name} changed after its worker closed it"
    return {"expected": expected, "written": written, "listings": listings, "foreign_reads": foreign_reads}


def check_files_everywhere(mount: Mount, s3: Any, bucket: str, key_bytes: bytes, expected: dict[str, str]) -> None:
    """Through the mount, then on the server after a clean unmount: exactly the expected files and bytes."""
    on_mount = {}
    for directory, _subdirectories, names in os.walk(mount.mountpoint):
        for name in names:
            path = Path(directory) / name
            on_mount[str(path.relative_to(mount.mountpoint))] = digest(path.read_bytes())
    assert on_mount == expected
    assert mount.stop() == 0
    stored = {key for key in keys(s3, bucket) if not key.endswith("/") and not key.endswith(".ssefs-dirs")}
    assert stored == set(expected)
    for key, want in expected.items():
        assert digest(server_bytes(s3, bucket, key, key_bytes)) == want, key


def run_file_workers(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory, *, workers: int, files: int, big_every: int, delay: float, label: str,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra=f"writeback_delay = {delay}"))
    started = time.monotonic()
    results = run_pool(file_worker, [(str(mount.mountpoint), worker, files, big_every) for worker in range(workers)])
    seconds = time.monotonic() - started
    expected = {name: want for result in results for name, want in result["expected"].items()}
    written = sum(result["written"] for result in results)
    check_files_everywhere(mount, s3, bucket, key_bytes, expected)
    print(f"FIGURES concurrency {label} processes={workers} files_written={workers * files} files_kept={len(expected)} "
          f"bytes={written} seconds={seconds:.1f} write_MBps={written / seconds / 1e6:.1f} "
          f"listings={sum(result['listings'] for result in results)} "
          f"foreign_reads={sum(result['foreign_reads'] for result in results)}")


@pytest.mark.timeout(300)
def test_processes_write_read_and_list_in_parallel(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    # writeback_delay 0.3: background uploads run all the time, alongside the writes, renames and unlinks.
    run_file_workers(endpoint, bucket, key_file, key_bytes, s3, tmp_path, mount_ssefs,
                     workers=4, files=20, big_every=6, delay=0.3, label="files")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_processes_write_read_and_list_in_parallel_many(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    # writeback_delay 0: a rename right after close() meets the file's upload in flight. Before the fix
    # of tests/test_model.py::test_rename_of_a_file_being_uploaded this lost a file (w2/f3) once in six runs.
    run_file_workers(endpoint, bucket, key_file, key_bytes, s3, tmp_path, mount_ssefs,
                     workers=8, files=60, big_every=5, delay=0.0, label="files-slow")


# ---------------------------------------------------------------------- readers racing an appending writer


APPEND_SIZE = 6 * MiB + 12345


def appender(path: str, done_flag: str, seed: int) -> dict[str, Any]:
    """Append the final content in chunks of varying size, with an fsync now and then; then close."""
    final = content(seed, APPEND_SIZE)
    rng = random.Random(seed + 1)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    appends = fsyncs = 0
    try:
        offset = 0
        while offset < len(final):
            size = rng.choice([1, 100, 4096, 4096, 65536, 65536, 131072, 1024 * 1024 + 7])
            chunk = final[offset:offset + size]
            assert os.write(fd, chunk) == len(chunk)
            offset += len(chunk)
            appends += 1
            if appends % 17 == 0:
                os.fsync(fd)
                fsyncs += 1
            time.sleep(rng.random() * 0.01)
    finally:
        os.close(fd)
        Path(done_flag).write_text("done")
    return {"appends": appends, "fsyncs": fsyncs}


def prefix_reader(path: str, done_flag: str, seed: int, reader: int) -> dict[str, Any]:
    """Read the growing file over and over, whole or at random offsets: every byte must be the final
    content's byte at that offset; after the writer closed, the whole file must be the final content."""
    final = content(seed, APPEND_SIZE)
    rng = random.Random(reader)
    reads = partial_reads = longest = 0
    while not Path(path).exists():
        time.sleep(0.01)
    while True:
        finished = Path(done_flag).exists()
        with open(path, "rb") as handle:
            if reader % 2 == 0 or finished:
                data = handle.read()
                if data != final[:len(data)]:
                    first = next(i for i, (a, b) in enumerate(zip(data, final, strict=False)) if a != b)
                    raise AssertionError(f"reader {reader} saw {len(data)} bytes that are not a prefix of the "
                                         f"final content (first difference at offset {first})")
                longest = max(longest, len(data))
            else:
                size = os.fstat(handle.fileno()).st_size
                offset = rng.randrange(size + 1)
                handle.seek(offset)
                data = handle.read(rng.choice([1, 4096, 300_000]))
                assert data == final[offset:offset + len(data)], f"reader {reader}: wrong bytes at {offset}"
                partial_reads += 1
        reads += 1
        if finished:
            assert data == final, f"reader {reader}: after the writer closed, the file has {len(data)} bytes"
            return {"reads": reads, "partial_reads": partial_reads, "longest_before_end": longest}


@pytest.mark.timeout(300)
def test_readers_only_ever_see_a_prefix_while_a_writer_appends(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 0.2"))
    path, done_flag, seed = str(mount.mountpoint / "growing.bin"), str(tmp_path / "done"), 7
    started = time.monotonic()
    arguments: list[tuple[Any, ...]] = [(path, done_flag, seed)] + [(path, done_flag, seed, reader)
                                                                   for reader in range(4)]
    pool: Pool = SPAWN.Pool(len(arguments))
    try:
        writer = pool.apply_async(appender, arguments[0])
        readers = [pool.apply_async(prefix_reader, each) for each in arguments[1:]]
        try:
            written = writer.get(timeout=WORKER_TIMEOUT)
            results = [reader.get(timeout=WORKER_TIMEOUT) for reader in readers]
        except multiprocessing.TimeoutError:
            raise AssertionError("the writer or a reader did not finish (a deadlock or a hang)") from None
    finally:
        pool.terminate()
        pool.join()
    seconds = time.monotonic() - started
    final = content(seed, APPEND_SIZE)
    assert Path(path).read_bytes() == final
    assert mount.stop() == 0
    assert server_bytes(s3, bucket, "growing.bin", key_bytes) == final
    print(f"FIGURES concurrency append writer_appends={written['appends']} writer_fsyncs={written['fsyncs']} "
          f"readers={len(results)} reads={sum(result['reads'] for result in results)} "
          f"random_offset_reads={sum(result['partial_reads'] for result in results)} "
          f"longest_prefix_seen_mid_write={max(result['longest_before_end'] for result in results)} "
          f"bytes={APPEND_SIZE} seconds={seconds:.1f}")


# ---------------------------------------------------------------------- fio with verification


def fio(*arguments: str, cwd: Path, timeout: float = 600) -> dict[str, Any]:
    command = ["fio", "--output-format=json", *arguments]
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fio did not finish within {timeout:.0f} s: {' '.join(command)}") from None
    assert result.returncode == 0, f"fio failed ({result.returncode}): {result.stderr}\n{result.stdout[-3000:]}"
    report = json.loads(result.stdout[result.stdout.index("{"):])
    for job in report["jobs"]:
        assert job["error"] == 0, job
    return report


def fio_rate(report: dict[str, Any], direction: str) -> float:
    return sum(job[direction]["bw_bytes"] for job in report["jobs"]) / 1e6


needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install -y fio)")


def run_fio_and_check_from_s3(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, s3: Any, tmp_path: Path, mount_ssefs: MountFactory,
    job: list[str], *, files: dict[str, int], label: str,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 0.5"))
    started = time.monotonic()
    report = fio(*job, f"--directory={mount.mountpoint}", "--do_verify=1", cwd=tmp_path)
    seconds = time.monotonic() - started
    assert {name: os.stat(mount.mountpoint / name).st_size for name in files} == files
    assert mount.stop() == 0
    listed = {item["Key"]: item["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
              for item in page.get("Contents", []) if not item["Key"].endswith("/")}
    assert listed == files
    # The same job in verify-only mode on a mount with an empty cache: every block comes from S3.
    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="again"), tmp_path / "again-mnt")
    started_verify = time.monotonic()
    verify = fio(*job, f"--directory={again.mountpoint}", "--verify_only", cwd=tmp_path)
    verify_seconds = time.monotonic() - started_verify
    assert again.stop() == 0
    print(f"FIGURES concurrency fio-{label} write_MBps={fio_rate(report, 'write'):.1f} "
          f"verify_read_MBps={fio_rate(report, 'read'):.1f} seconds={seconds:.1f} "
          f"verify_from_s3_MBps={fio_rate(verify, 'read'):.1f} verify_from_s3_seconds={verify_seconds:.1f}")


@needs_fio
@pytest.mark.timeout(600)
def test_fio_random_writes_verify_crc32c(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, s3: Any, tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    job = ["--name=v", "--rw=randwrite", "--bs=4k,64k", "--size=16m", "--numjobs=2", "--verify=crc32c",
           "--verify_fatal=1", "--ioengine=psync", "--fsync_on_close=1", "--randrepeat=1"]
    run_fio_and_check_from_s3(endpoint, bucket, key_file, s3, tmp_path, mount_ssefs, job,
                              files={"v.0.0": 16 * MiB, "v.1.0": 16 * MiB}, label="randwrite")


@needs_fio
@pytest.mark.timeout(600)
def test_fio_sequential_write_verify_crc32c(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, s3: Any, tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    job = ["--name=s", "--rw=write", "--bs=1m", "--size=48m", "--numjobs=2", "--verify=crc32c",
           "--verify_fatal=1", "--ioengine=psync", "--fsync_on_close=1"]
    run_fio_and_check_from_s3(endpoint, bucket, key_file, s3, tmp_path, mount_ssefs, job,
                              files={"s.0.0": 48 * MiB, "s.1.0": 48 * MiB}, label="seqwrite")


@needs_fio
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fio_mixed_random_read_write_verify_many_jobs(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, s3: Any, tmp_path: Path, mount_ssefs: MountFactory,
) -> None:
    job = ["--name=m", "--rw=randrw", "--rwmixread=30", "--bs=4k,128k", "--size=64m", "--numjobs=4",
           "--verify=crc32c", "--verify_fatal=1", "--ioengine=psync", "--fsync_on_close=1", "--randrepeat=1"]
    run_fio_and_check_from_s3(endpoint, bucket, key_file, s3, tmp_path, mount_ssefs, job,
                              files={f"m.{index}.0": 64 * MiB for index in range(4)}, label="randrw-slow")
