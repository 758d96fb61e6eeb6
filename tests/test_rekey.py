"""``ssefs rekey`` and ``ssefs check`` against a real SeaweedFS over HTTPS.

Objects are written directly with boto3 under chosen keys; the commands run as
subprocesses (``python -m ssefs ...``), as a user would run them; what the server
holds afterwards is checked from the outside with boto3: the bytes under the new
key, a 403 under the old one, the user metadata. One test drives the part-by-part
copy path in-process, which the command takes only above 5 GiB. No FUSE needed.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import secrets
import select
import signal
import struct
import subprocess
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import trio

from ssefs import rekey as rekey_module
from ssefs.config import MiB, load_config
from ssefs.keys import KeyRing, SseKey
from ssefs.rekey import GIVE_UP_AFTER, GiveUp, Journal, Progress, RekeyReport, rekey_objects
from ssefs.seaweed import SeaweedEndpoint
from ssefs.store import ObjectStore

from .conftest import server_bytes, sse_params, ssefs_command, write_config, write_key_file
from .proxy import TcpProxy

METADATA = {"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000"}


# ------------------------------------------------------------------ helpers


def put(s3: Any, bucket: str, key: str, data: bytes, sse_key: bytes | None, metadata: dict[str, str] | None = None
        ) -> None:
    extra = sse_params(sse_key) if sse_key is not None else {}
    s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {}, **extra)


def put_multipart(s3: Any, bucket: str, key: str, data: bytes, sse_key: bytes, metadata: dict[str, str],
                  part_size: int = 5 * MiB) -> None:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata=metadata, **sse_params(sse_key))["UploadId"]
    parts = []
    for number, offset in enumerate(range(0, len(data), part_size), start=1):
        response = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                  Body=data[offset:offset + part_size], **sse_params(sse_key))
        parts.append({"PartNumber": number, "ETag": response["ETag"]})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})


def status_with_key(s3: Any, bucket: str, key: str, sse_key: bytes) -> int:
    """The HTTP status of a GET of ``key`` with ``sse_key``."""
    try:
        s3.get_object(Bucket=bucket, Key=key, **sse_params(sse_key))["Body"].read()
    except botocore.exceptions.ClientError as error:
        return int(error.response["ResponseMetadata"]["HTTPStatusCode"])
    return 200


def head(s3: Any, bucket: str, key: str, sse_key: bytes) -> dict[str, Any]:
    response: dict[str, Any] = s3.head_object(Bucket=bucket, Key=key, **sse_params(sse_key))
    return response


def ssefs(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ssefs_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def assert_no_key_material(text: str, *raw_keys: bytes) -> None:
    for raw in raw_keys:
        for encoding in (base64.b64encode(raw).decode(), raw.hex(), base64.urlsafe_b64encode(raw).decode()):
            assert encoding not in text


def fingerprint(raw: bytes) -> str:
    return SseKey(raw).fingerprint


def journal_path(config: Path, old: bytes, new: bytes) -> Path:
    return Journal.path_for(load_config(config).cache.dir, SseKey(old), SseKey(new))


def with_key_lines(config: Path, lines: str) -> Path:
    config.write_text(config.read_text().replace("[key]\n", f"[key]\n{lines}\n", 1))
    return config


@pytest.fixture
def old_new(tmp_path: Path) -> tuple[bytes, bytes, Path, Path]:
    """Two binary keys (with NULs) and their files."""
    old = b"\x00" + secrets.token_bytes(30) + b"\x00"
    new = b"\x00" + secrets.token_bytes(30) + b"\x00"
    return old, new, write_key_file(tmp_path / "old.key", old), write_key_file(tmp_path / "new.key", new)


# ------------------------------------------------------------------ rekey


def test_rekey_moves_every_object_to_the_new_key_with_bytes_and_metadata_kept(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
) -> None:
    old, new, old_file, new_file = old_new
    config = write_config(tmp_path, endpoint, bucket, new_file, s3_extra='prefix = "data"')
    contents = {
        "data/empty": b"",
        "data/one-byte": b"x",
        "data/dir/mid.bin": secrets.token_bytes(300 * 1024),
        "data/dir/.ssefs-dirs": b'{"format":1,"directories":{}}',
        "data/dir/sub/name with spaces & ünïcode.txt": b"odd names too\n",
    }
    for index, (key, data) in enumerate(contents.items()):
        put(s3, bucket, key, data, old, {**METADATA, "mtime": str(1700000000 + index)})
    big = secrets.token_bytes(12 * MiB)
    put_multipart(s3, bucket, "data/dir/sub/big.bin", big, old, {**METADATA, "size-note": "12MiB in 5MiB parts"})
    contents["data/dir/sub/big.bin"] = big
    put(s3, bucket, "data/already.txt", b"written under the new key", new, METADATA)
    put(s3, bucket, "data/dir/", b"", old)  # a directory marker, as ssefs writes them
    put(s3, bucket, "outside-the-prefix.txt", b"not ours to touch", old, METADATA)
    metadata_before = {key: head(s3, bucket, key, old)["Metadata"] for key in contents}
    assert metadata_before["data/dir/sub/big.bin"]["size-note"] == "12MiB in 5MiB parts"

    result = ssefs("rekey", str(config), "--from", f"file:{old_file}", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["from"] == fingerprint(old) and summary["to"] == fingerprint(new)
    assert summary["reencrypted"] == {"objects": len(contents), "bytes": sum(map(len, contents.values()))}
    assert summary["already_under_new_key"]["objects"] == 1
    # SeaweedFS keeps directory markers as directories, without SSE-C (and cannot copy them): skipped.
    assert summary["markers_skipped"] == ["data/dir/"]
    assert summary["failed"] == [] and summary["unreadable"] == [] and summary["not_encrypted"] == []
    assert summary["complete"] is True and summary["journal"] is None
    assert not journal_path(config, old, new).exists()  # a finished run leaves no journal

    for key, data in contents.items():
        assert server_bytes(s3, bucket, key, new) == data, key
        assert status_with_key(s3, bucket, key, old) == 403, key
        assert head(s3, bucket, key, new)["Metadata"] == metadata_before[key], key
    assert server_bytes(s3, bucket, "data/already.txt", new) == b"written under the new key"
    # Outside the config's prefix nothing changed.
    assert server_bytes(s3, bucket, "outside-the-prefix.txt", old) == b"not ours to touch"
    assert status_with_key(s3, bucket, "outside-the-prefix.txt", new) == 403
    assert_no_key_material(result.stdout + result.stderr, old, new)

    # A second run is a no-op: everything is already under the new key.
    again = ssefs("rekey", str(config), "--from", str(old_file))  # a bare path is a key file
    assert again.returncode == 0, again.stderr
    assert "re-encrypted: 0 objects" in again.stdout
    assert f"already under the new key: {len(contents) + 1} objects" in again.stdout
    assert_no_key_material(again.stdout + again.stderr, old, new)


async def test_objects_above_the_copy_limit_go_part_by_part_with_the_ranged_get_fallback(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
) -> None:
    # Above 5 GiB CopyObject is not allowed; the limit is lowered here so 12 MiB takes that path.
    old, new, _, new_file = old_new
    config = load_config(write_config(
        tmp_path, endpoint, bucket, new_file, s3_extra='multipart_threshold = "5MiB"\npart_size = "5MiB"'
    ))
    big = secrets.token_bytes(12 * MiB + 12345)
    put_multipart(s3, bucket, "big.bin", big, old, METADATA)
    put(s3, bucket, "small.bin", b"small", old, METADATA)
    old_key, new_key = SseKey(old), SseKey(new)
    store = ObjectStore(config.s3, KeyRing(new_key, (old_key,)))
    report = RekeyReport(old_key.fingerprint, new_key.fingerprint, bucket, "", dry_run=False)

    await rekey_objects(store, "", old_key, new_key, report, jobs=2, multipart_above=8 * MiB,
                        progress_stream=io.StringIO())

    assert report.complete and report.failed == {}
    assert report.reencrypted.objects == 2 and report.reencrypted.bytes == len(big) + 5
    # SeaweedFS answers UploadPartCopy with SSE-C by 501: the parts were read and uploaded again.
    assert store.part_copy_supported is False
    assert server_bytes(s3, bucket, "big.bin", new) == big
    assert status_with_key(s3, bucket, "big.bin", old) == 403
    assert head(s3, bucket, "big.bin", new)["Metadata"] == METADATA
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def interrupt_when_journal_holds(command: list[str], journal: Path, entries: int, signum: int
                                ) -> tuple[int, str, str]:
    """Start ``command``, send ``signum`` once ``journal`` records more than ``entries`` objects."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            # The journal's first line is its header; each further line one finished object.
            if journal.exists() and journal.read_bytes().count(b"\n") > entries + 1:
                break
            time.sleep(0.002)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout.decode(), stderr.decode()


def journal_entries(journal: Path) -> dict[str, str]:
    return Journal(journal, json.loads(journal.read_bytes().split(b"\n")[0]), writable=False).done


def test_interrupted_rekey_resumes_without_redoing_finished_objects(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
) -> None:
    old, new, old_file, new_file = old_new
    config = write_config(tmp_path, endpoint, bucket, new_file)
    total = 200
    objects = {f"many/{index:03d}.txt": f"object {index}\n".encode() * 20 for index in range(total)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: put(s3, bucket, item[0], item[1], old, METADATA), objects.items()))
    journal = journal_path(config, old, new)
    arguments = ("rekey", str(config), "--from", f"file:{old_file}", "--jobs", "1", "--json")
    command = ssefs_command(*arguments)

    # Ctrl-C: the run stops, prints what it did so far, keeps its journal and exits 130.
    code, stdout, stderr = interrupt_when_journal_holds(command, journal, 10, signal.SIGINT)
    assert code == 130, f"the first run was not interrupted: {code} {stdout} {stderr}"
    interrupted = json.loads(stdout)
    assert interrupted["interrupted"] is True and interrupted["complete"] is False
    assert interrupted["journal"] == str(journal)
    done_first = journal_entries(journal)
    assert 10 <= len(done_first) < total
    assert interrupted["reencrypted"]["objects"] == len(done_first)

    # kill -9: no summary at all, but the journal keeps every object finished before.
    code, stdout, stderr = interrupt_when_journal_holds(command, journal, len(done_first) + 10, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the second run finished before it could be killed"
    assert stdout == ""
    assert journal.stat().st_mode & 0o777 == 0o600
    done_second = journal_entries(journal)
    assert set(done_first) < set(done_second) and len(done_second) < total
    for key in done_second:
        assert status_with_key(s3, bucket, key, new) == 200, key  # recorded only once done

    last = ssefs(*arguments)
    assert last.returncode == 0, last.stderr
    summary = json.loads(last.stdout)
    assert summary["done_in_earlier_run"]["objects"] == len(done_second)
    # Only the rest was re-encrypted; an object copied just before the kill but not yet
    # recorded is found under the new key by its HEAD and counted as already done.
    assert summary["reencrypted"]["objects"] + summary["already_under_new_key"]["objects"] == total - len(done_second)
    assert summary["already_under_new_key"]["objects"] <= 1
    assert summary["complete"] is True
    assert not journal.exists()
    for key, data in objects.items():
        assert server_bytes(s3, bucket, key, new) == data, key
        assert status_with_key(s3, bucket, key, old) == 403, key
    assert_no_key_material(last.stdout + last.stderr, old, new)


async def test_rekey_gives_up_when_the_server_goes_away_and_a_rerun_finishes(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
) -> None:
    old, new, old_file, new_file = old_new
    total = 120
    objects = {f"o/{index:03d}": f"{index}".encode() for index in range(total)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: put(s3, bucket, item[0], item[1], old), objects.items()))
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as proxy:
        # A short read timeout: a request caught mid-flight by the cut ends within seconds.
        config_path = write_config(tmp_path, endpoint, bucket, new_file, endpoint_url=proxy.endpoint,
                                   s3_extra="read_timeout = 3")
        config = load_config(config_path)
        old_key, new_key = SseKey(old), SseKey(new)
        store = ObjectStore(config.s3, KeyRing(new_key, (old_key,)))
        report = RekeyReport(old_key.fingerprint, new_key.fingerprint, bucket, "", dry_run=False)

        async def cut_the_line_after_some_progress() -> None:
            while report.reencrypted.objects < 10:
                await trio.sleep(0.001)
            proxy.down()

        stopped: list[BaseException] = []

        async def rekey_until_it_gives_up() -> None:
            try:
                await rekey_objects(store, "", old_key, new_key, report, jobs=8, progress_stream=io.StringIO())
            except GiveUp as error:
                stopped.append(error)

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_the_line_after_some_progress)
            await rekey_until_it_gives_up()
            nursery.cancel_scope.cancel()
        assert time.monotonic() - started < 30
        assert len(stopped) == 1 and f"stopped after {GIVE_UP_AFTER} objects in a row failed" in str(stopped[0])
        # It stopped early instead of spending the retries of every remaining object.
        assert report.stopped is not None and not report.complete
        assert len(report.failed) >= GIVE_UP_AFTER
        assert report.reencrypted.objects + len(report.failed) < total
        proxy.up()
        result = await trio.to_thread.run_sync(lambda: ssefs("rekey", str(config_path), "--from", str(old_file)))
    assert result.returncode == 0, result.stdout + result.stderr
    for key, data in objects.items():
        assert server_bytes(s3, bucket, key, new) == data, key


def test_dry_run_changes_nothing(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
) -> None:
    old, new, old_file, new_file = old_new
    config = write_config(tmp_path, endpoint, bucket, new_file)
    objects = {f"f{index}": secrets.token_bytes(1000 * (index + 1)) for index in range(5)}
    for key, data in objects.items():
        put(s3, bucket, key, data, old, METADATA)
    put(s3, bucket, "already", b"new", new)
    before = {key: head(s3, bucket, key, old) for key in objects}

    result = ssefs("rekey", str(config), "--from", f"file:{old_file}", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is True
    assert summary["reencrypted"] == {"objects": 5, "bytes": sum(map(len, objects.values()))}
    assert summary["already_under_new_key"]["objects"] == 1
    for key, data in objects.items():
        after = head(s3, bucket, key, old)  # still under the old key
        assert (after["ETag"], after["LastModified"], after["Metadata"]) == (
            before[key]["ETag"], before[key]["LastModified"], before[key]["Metadata"]
        )
        assert server_bytes(s3, bucket, key, old) == data
        assert status_with_key(s3, bucket, key, new) == 403
    assert not journal_path(config, old, new).exists()

    text = ssefs("rekey", str(config), "--from", f"file:{old_file}", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "would re-encrypt: 5 objects" in text.stdout and "dry run: nothing was written" in text.stdout
    assert_no_key_material(result.stdout + result.stderr + text.stdout + text.stderr, old, new)


@pytest.mark.parametrize("case", ["missing file", "wrong length", "unset env", "empty", "credential path", "same key"])
def test_bad_from_source_is_one_clear_line_and_changes_nothing(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
    case: str,
) -> None:
    old, new, old_file, new_file = old_new
    config = write_config(tmp_path, endpoint, bucket, new_file)
    put(s3, bucket, "kept", b"stays under the old key", old)
    short = write_key_file(tmp_path / "short.key", old[:31])
    source, expected = {
        "missing file": (f"file:{tmp_path / 'nope.key'}", f"--from: key file {tmp_path / 'nope.key'} does not exist"),
        "wrong length": (str(short), f"--from: key file {short} holds 31 bytes that are neither"),
        "unset env": ("env:SSEFS_TEST_NO_SUCH_VARIABLE", "--from: environment variable SSEFS_TEST_NO_SUCH_VARIABLE"),
        "empty": ("file:", "--from needs a key source"),
        "credential path": ("credential:../x", "--from credential: must name a systemd credential"),
        "same key": (f"file:{new_file}", "--from names the config's current key"),
    }[case]
    result = ssefs("rekey", str(config), "--from", source)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssefs: ") and expected in lines[0], result.stderr
    assert server_bytes(s3, bucket, "kept", old) == b"stays under the old key"
    assert status_with_key(s3, bucket, "kept", new) == 403
    assert_no_key_material(result.stderr, old, new)


def test_unreadable_and_unencrypted_objects_are_listed_and_skipped(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
) -> None:
    old, new, _, new_file = old_new
    stranger = secrets.token_bytes(32)
    config = write_config(tmp_path, endpoint, bucket, new_file)
    put(s3, bucket, "mine", b"mine", old)
    put(s3, bucket, "foreign", b"under a third key", stranger)
    put(s3, bucket, "plain", b"no SSE-C at all", None)
    # The old key from an environment variable holding its base64.
    result = ssefs("rekey", str(config), "--from", "env:OLD_SSEFS_KEY",
                   env={"OLD_SSEFS_KEY": base64.b64encode(old).decode()})
    assert result.returncode == 0, result.stderr
    assert "re-encrypted: 1 object," in result.stdout
    assert "readable with neither key (1)" in result.stdout and "    foreign" in result.stdout
    assert "not stored with SSE-C (1)" in result.stdout and "    plain" in result.stdout
    assert server_bytes(s3, bucket, "mine", new) == b"mine"
    assert server_bytes(s3, bucket, "foreign", stranger) == b"under a third key"
    assert s3.get_object(Bucket=bucket, Key="plain")["Body"].read() == b"no SSE-C at all"
    assert_no_key_material(result.stdout + result.stderr, old, new, stranger)


# ------------------------------------------------------------------ check


def test_check_counts_objects_per_key_and_lists_unreadable_and_unencrypted(
    tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, s3: Any, old_new: tuple[bytes, bytes, Path, Path],
) -> None:
    old, new, old_file, new_file = old_new
    stranger = secrets.token_bytes(32)
    config = with_key_lines(
        write_config(tmp_path, endpoint, bucket, new_file), f'previous_keys = [{{ file = "{old_file}" }}]'
    )
    for index in range(3):
        put(s3, bucket, f"current/{index}", b"c" * (index + 1), new)
    put(s3, bucket, "previous/0", b"under the previous key", old)
    put(s3, bucket, "previous/1", b"also", old)
    put(s3, bucket, "stranger", b"under an unknown key", stranger)
    put(s3, bucket, "plain", b"no SSE-C", None)
    put(s3, bucket, "current/", b"", new)  # a directory marker

    result = ssefs("check", str(config), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["objects"] == 8
    assert report["keys"] == [
        {"fingerprint": fingerprint(new), "role": "current", "objects": 3, "bytes": 6},
        {"fingerprint": fingerprint(old), "role": "previous", "objects": 2, "bytes": 26},
    ]
    assert report["unreadable"] == ["stranger"]
    assert report["not_encrypted"] == ["plain"]
    assert report["markers_not_encrypted"] == 1 and report["errors"] == [] and report["ok"] is False

    text = ssefs("check", str(config))
    assert text.returncode == 1
    assert "not readable with any configured key (1)" in text.stdout and "    stranger" in text.stdout
    assert "not stored with SSE-C (1)" in text.stdout and "    plain" in text.stdout
    assert f"key {fingerprint(old)} still holds 2 objects" in text.stdout

    # Fixed: the stray objects go, the previous key's objects move to the current key.
    s3.delete_object(Bucket=bucket, Key="stranger")
    s3.delete_object(Bucket=bucket, Key="plain")
    ok = ssefs("check", str(config), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [use["objects"] for use in json.loads(ok.stdout)["keys"]] == [3, 2]
    moved = ssefs("rekey", str(config), "--from", f"command:cat {old_file}")  # raw bytes from a command: refused
    assert moved.returncode == 1 and "key command holds 32 bytes" in moved.stderr
    vault = tmp_path / "vault.b64"
    vault.write_text(base64.b64encode(old).decode() + "\n")
    moved = ssefs("rekey", str(config), "--from", f"command:cat {vault}")
    assert moved.returncode == 0, moved.stderr
    final = ssefs("check", str(config))
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"key {fingerprint(new)} (current): 5 objects" in final.stdout
    assert f"key {fingerprint(old)} (previous): 0 objects" in final.stdout
    assert f"key {fingerprint(old)} holds no object any more: it can go from previous_keys" in final.stdout
    everything = "".join(r.stdout + r.stderr for r in (result, text, ok, moved, final))
    assert_no_key_material(everything, old, new, stranger)


def test_check_help_documents_the_exit_codes() -> None:
    result = ssefs("check", "--help")
    assert result.returncode == 0
    assert "Exit codes:" in result.stdout
    assert "0    every object opens with a configured key" in result.stdout
    assert "1    some objects are unreadable" in result.stdout


# ------------------------------------------------------------------ progress output


def test_progress_prints_plain_lines_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rekey_module, "PLAIN_PROGRESS_SECONDS", 0.0)
    stream = io.StringIO()
    progress = Progress("rekey", 4, 4 * MiB, stream)
    progress.advance(MiB)
    progress.advance(MiB)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("ssefs rekey: 2/4 objects, 2.0 MiB of 4.0 MiB, ")
    assert "s left" in lines[-1]


def test_progress_draws_a_bar_on_a_terminal() -> None:
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        with open(terminal, "w", closefd=False) as stream:
            progress = Progress("rekey", 3, 3 * MiB, stream)
            for _ in range(3):
                progress.advance(MiB)
            progress.close()
        os.write(terminal, b"END")
        drawn = ""
        while "END" not in drawn and select.select([controller], [], [], 5)[0]:
            drawn += os.read(controller, 65536).decode(errors="replace")
    finally:
        os.close(controller)
        os.close(terminal)
    assert "rekey: 100%" in drawn and "3.00M/3.00M" in drawn and "3/3 objects" in drawn  # tqdm's bar
    assert "ssefs rekey:" not in drawn
