"""The S3 layer against a real SeaweedFS over HTTPS: SSE-C on every data request, typed errors."""

from __future__ import annotations

import secrets
import time
from typing import Any

import botocore.credentials
import botocore.exceptions
import pytest

from ssefs.config import S3Settings
from ssefs.errors import NoSuchObject, NotEncrypted, ServerUnavailable, SsefsError, StartupCheckError, WrongKey
from ssefs.keys import SseKey
from ssefs.seaweed import SeaweedEndpoint
from ssefs.store import ObjectInfo, ObjectStore, _echoed_md5_matches

from .conftest import sse_params


def make_store(endpoint: SeaweedEndpoint, bucket: str, key: SseKey, **overrides: Any) -> ObjectStore:
    settings = S3Settings(
        endpoint=overrides.pop("endpoint_url", endpoint.endpoint),
        bucket=bucket,
        region=endpoint.region,
        ca_bundle=endpoint.ca_bundle,
        access_key_id=endpoint.access_key_id,
        secret_access_key=endpoint.secret_access_key,
        **overrides,
    )
    return ObjectStore(settings, key)


@pytest.fixture
def sse_key(key_bytes: bytes) -> SseKey:
    return SseKey(key_bytes)


async def test_put_get_range_head_carry_the_key(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, key_bytes: bytes, s3: Any
) -> None:
    store = make_store(endpoint, bucket, sse_key)
    payload = secrets.token_bytes(100_000)
    etag = await store.put("dir/object.bin", payload, {"note": "x"})
    assert etag
    # The server really holds it under our key: a plain boto3 client with the same key reads it.
    assert s3.get_object(Bucket=bucket, Key="dir/object.bin", **sse_params(key_bytes))["Body"].read() == payload
    with pytest.raises(botocore.exceptions.ClientError):
        s3.get_object(Bucket=bucket, Key="dir/object.bin")
    assert await store.get_range("dir/object.bin", 10, 50) == payload[10:60]
    assert await store.get_range("dir/object.bin", 99_990, 100) == payload[99_990:]
    assert await store.get_range("dir/object.bin", 100_000, 10) == b""
    info = await store.head("dir/object.bin")
    assert info.size == len(payload) and info.metadata == {"note": "x"}


async def test_a_range_read_in_pieces(endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey) -> None:
    store = make_store(endpoint, bucket, sse_key)
    payload = secrets.token_bytes(2 * 1024 * 1024 + 12_345)
    await store.put("pieces.bin", payload)
    pieces = await store.get_pieces("pieces.bin", 1000, len(payload), 1024 * 1024)
    assert [len(piece) for piece in pieces] == [1024 * 1024, 1024 * 1024, 12_345 - 1000]  # the object ends first
    assert b"".join(pieces) == payload[1000:]
    assert await store.get_pieces("pieces.bin", 0, 10, 4) == [payload[0:4], payload[4:8], payload[8:10]]
    assert await store.get_pieces("pieces.bin", len(payload), 10, 4) == []


async def test_errors_are_typed_and_never_contain_the_key(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, key_bytes: bytes, s3: Any
) -> None:
    store = make_store(endpoint, bucket, sse_key)
    s3.put_object(Bucket=bucket, Key="foreign", Body=b"f", **sse_params(secrets.token_bytes(32)))
    s3.put_object(Bucket=bucket, Key="plain", Body=b"p")
    caught: list[Exception] = []
    for call, expected in (
        (lambda: store.head("missing"), NoSuchObject),
        (lambda: store.get_range("missing", 0, 10), NoSuchObject),
        (lambda: store.head("foreign"), WrongKey),
        (lambda: store.get_range("foreign", 0, 1), WrongKey),
        (lambda: store.head("plain"), NotEncrypted),
        (lambda: store.get_range("plain", 0, 1), NotEncrypted),
    ):
        with pytest.raises(expected) as error:
            await call()
        caught.append(error.value)
    for failure in caught:
        text = f"{failure} {failure!r}"
        for secret in sse_key.redaction_strings():
            assert secret not in text
        assert bucket in str(error)


async def test_listing_probe_and_markers(endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey) -> None:
    store = make_store(endpoint, bucket, sse_key)
    for key in ("top.txt", "top.txt.bak", "sub/a", "sub/b", "sub/deeper/c"):
        await store.put(key, b"x")
    await store.put_directory_marker("empty/")
    listing = await store.list_children("")
    assert sorted(o.key for o in listing.objects) == ["top.txt", "top.txt.bak"]
    assert sorted(listing.prefixes) == ["empty", "sub"]
    sub = await store.list_children("sub/")
    assert sorted(o.key for o in sub.objects) == ["sub/a", "sub/b"] and sub.prefixes == ["deeper"]
    assert (await store.list_children("empty/")).objects == []  # the marker is not its own child
    found, is_dir = await store.probe("top.txt")
    assert found is not None and found.key == "top.txt" and not is_dir
    found, is_dir = await store.probe("sub")
    assert found is None and is_dir
    found, is_dir = await store.probe("nothing")
    assert found is None and not is_dir


async def test_deletes_give_a_directory_a_marker_only_where_none_is_known(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = make_store(endpoint, bucket, sse_key)
    for key in ("made/f", "listed/f", "probed/f", "tree/sub/f", "other/f", "other/g", "top", "gone/sub/f"):
        await store.put(key, b"x")
    for prefix in ("listed/", "probed/", "tree/sub/"):
        await store._put_marker(prefix)  # by another tool: this store has not seen them
    store = make_store(endpoint, bucket, sse_key)
    await store.put_directory_marker("made/")
    assert (await store.list_children("listed/")).has_marker
    assert (await store.probe("probed"))[1]
    await store.list_tree("tree/")
    written: list[str] = []
    put_marker = store._put_marker

    async def counted(prefix: str) -> None:
        written.append(prefix)
        await put_marker(prefix)

    monkeypatch.setattr(store, "_put_marker", counted)
    assert await store.delete_many(["made/f", "listed/f", "probed/f", "tree/sub/f", "other/f", "top"]) == {}
    assert written == ["other/"]  # the only directory not known to have a marker; the top needs none
    assert await store.delete_many(["other/g"]) == {}
    assert written == ["other/"]  # known now
    for prefix in ("made/", "listed/", "probed/", "tree/sub/", "other/"):
        assert await store.keys_with_prefix(prefix, 5) == [prefix]  # each directory still there, empty
    # A directory about to be removed (rmdir, rename) is not kept, nor anything below it.
    store.delete_later("gone/sub/f")
    await store.flush_deletes_before_removing("gone/")
    assert written == ["other/"] and await store.keys_with_prefix("gone/", 5) == []
    await store.delete("other/")
    await store.keep_directory("other/")
    assert written == ["other/", "other/"]  # a marker deleted is no longer known


async def test_multipart_upload_and_copy(endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey,
                                         key_bytes: bytes, s3: Any) -> None:
    store = make_store(endpoint, bucket, sse_key)
    part = secrets.token_bytes(5 * 1024 * 1024)
    upload_id = await store.create_multipart("multi", {})
    etags = [
        await store.upload_part("multi", upload_id, 1, part),
        await store.upload_part("multi", upload_id, 2, b"end"),
    ]
    await store.complete_multipart("multi", upload_id, etags)
    body = s3.get_object(Bucket=bucket, Key="multi", **sse_params(key_bytes))["Body"].read()
    assert body == part + b"end"
    await store.copy("multi", "copied")
    assert await store.get_range("copied", len(part) - 2, 5) == part[-2:] + b"end"
    await store.delete("multi")
    with pytest.raises(NoSuchObject):
        await store.head("multi")


async def test_bodies_are_not_hashed_for_signing_over_tls(endpoint: SeaweedEndpoint, bucket: str,
                                                          sse_key: SseKey) -> None:
    """TLS protects the body in transit; a SHA-256 of every uploaded byte for the signature would only cost CPU."""
    store = make_store(endpoint, bucket, sse_key)
    signed_hashes: list[str] = []

    def after_signing(request: Any, **_: Any) -> None:
        signed_hashes.append(request.headers["X-Amz-Content-SHA256"])

    store._client.meta.events.register_last("request-created.s3", after_signing)
    upload_id = await store.create_multipart("unsigned", {})
    part = secrets.token_bytes(5 * 1024 * 1024)
    etag = await store.upload_part("unsigned", upload_id, 1, part)
    await store.complete_multipart("unsigned", upload_id, [etag])
    await store.put("unsigned-small", b"small body")
    assert await store.get_range("unsigned", 0, 8) == part[:8]
    assert signed_hashes and endpoint.endpoint.startswith("https://")
    assert set(signed_hashes) == {"UNSIGNED-PAYLOAD"}
    plain = make_store(endpoint, bucket, sse_key, endpoint_url=endpoint.endpoint.replace("https://", "http://"))
    assert plain._client.meta.config.s3["payload_signing_enabled"] is True  # no TLS: the signature covers the body


async def test_bucket_check_and_unreachable_server(endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey) -> None:
    await make_store(endpoint, bucket, sse_key).check_bucket()
    with pytest.raises(StartupCheckError, match="does not exist"):
        await make_store(endpoint, "absent-" + secrets.token_hex(4), sse_key).check_bucket()
    unreachable = make_store(endpoint, bucket, sse_key, endpoint_url="https://127.0.0.1:9", max_attempts=2,
                             connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="cannot reach"):
        await unreachable.get_range("x", 0, 1)
    assert time.monotonic() - started < 30  # retries are bounded


def test_echo_check_accepts_doubled_header() -> None:
    assert _echoed_md5_matches("abc==", "abc==")
    assert _echoed_md5_matches("abc==, abc==", "abc==")
    assert not _echoed_md5_matches("abc==, xyz==", "abc==")
    assert not _echoed_md5_matches(None, "abc==")
    assert not _echoed_md5_matches("", "abc==")


async def test_copy_of_an_object_over_the_copyobject_limit_goes_part_by_part(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, key_bytes: bytes, s3: Any,
) -> None:
    # The 5 GiB CopyObject limit, scaled down to 6 MiB so that a 13 MiB object crosses it:
    # UploadPartCopy is tried (SeaweedFS answers 501 for SSE-C sources) and the parts are
    # then read with ranged GETs and uploaded again.
    from ssefs import uploader

    store = make_store(endpoint, bucket, sse_key, multipart_threshold=5 * 1024 * 1024, part_size=5 * 1024 * 1024)
    data = secrets.token_bytes(13 * 1024 * 1024 + 7)
    await store.put("big", data, {"mode": "33188"})
    source = await store.head("big")
    etag = await uploader.copy_object(
        store, store.settings, source, "big-copy", {"mode": "33152"}, multipart_above=6 * 1024 * 1024
    )
    response = s3.get_object(Bucket=bucket, Key="big-copy", **sse_params(key_bytes))
    assert response["Body"].read() == data
    assert response["Metadata"] == {"mode": "33152"}
    assert response["ETag"].strip('"') == etag
    assert store.part_copy_supported is False  # SeaweedFS: the fallback was what copied it
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def test_multipart_uploads_left_unfinished_are_aborted_at_the_next_start(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, key_bytes: bytes, s3: Any, tmp_path: Any,
) -> None:
    from ssefs.cache import BlockCache
    from ssefs.uploader import abort_unfinished_uploads

    cache = BlockCache(tmp_path / "cache", sse_key, identity="test", max_size=1 << 30)
    store = make_store(endpoint, bucket, sse_key)
    store.upload_journal = cache
    # A daemon killed mid-upload: created, one part sent, never completed.
    orphan = await store.create_multipart("big.bin")
    await store.upload_part("big.bin", orphan, 1, secrets.token_bytes(5 * 1024 * 1024))
    # A finished upload leaves nothing in the journal.
    finished = await store.create_multipart("done.bin")
    etag = await store.upload_part("done.bin", finished, 1, b"small last part")
    await store.complete_multipart("done.bin", finished, [etag])
    # Another client's upload in progress: not ours to abort.
    foreign = s3.create_multipart_upload(Bucket=bucket, Key="theirs.bin", **sse_params(key_bytes))["UploadId"]
    assert [(key, upload_id) for key, upload_id, _started in cache.unfinished_multiparts()] == [("big.bin", orphan)]
    cache.close()

    reopened = BlockCache(tmp_path / "cache", sse_key, identity="test", max_size=1 << 30)
    store.upload_journal = reopened
    await abort_unfinished_uploads(store, reopened)
    left = {(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == {("theirs.bin", foreign)}
    assert reopened.unfinished_multiparts() == []
    await abort_unfinished_uploads(store, reopened)  # nothing left: nothing asked
    reopened.close()


async def test_a_create_request_left_without_answer_has_its_uploads_aborted_at_the_next_start(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, key_bytes: bytes, s3: Any, tmp_path: Any,
) -> None:
    """Killed while CreateMultipartUpload had no answer: the server may have created the upload, whose id
    the journal never learnt. The next start aborts the uploads of exactly that key from that time."""
    from ssefs.cache import BlockCache
    from ssefs.store import PENDING_CREATE_PREFIX
    from ssefs.uploader import abort_unfinished_uploads

    cache = BlockCache(tmp_path / "cache", sse_key, identity="test", max_size=1 << 30)
    cache.multipart_started("lost.bin", PENDING_CREATE_PREFIX + "1")  # what create_multipart writes first
    created = s3.create_multipart_upload(Bucket=bucket, Key="lost.bin", **sse_params(key_bytes))["UploadId"]
    neighbour = s3.create_multipart_upload(Bucket=bucket, Key="lost.bin.2", **sse_params(key_bytes))["UploadId"]
    store = make_store(endpoint, bucket, sse_key)
    store.upload_journal = cache
    await abort_unfinished_uploads(store, cache)
    left = {(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == {("lost.bin.2", neighbour)}
    assert created not in {upload_id for _key, upload_id in left}
    assert cache.unfinished_multiparts() == []
    cache.close()


@pytest.mark.parametrize("text", [
    "Tue, 24 Nov 2026 22:53:16 GMT", "Thu, 01 Jan 1970 00:00:00 GMT", "2026-11-24T22:53:16.000Z",
    "2026-11-24T22:53:16Z", "2026-11-24T22:53:16.123456+00:00", "2026-11-24T23:53:16+01:00",
    "2026-11-24T22:53:16", "1700000000",
])
def test_fast_time_parser_agrees_with_botocore(text: str) -> None:
    import botocore.utils

    from ssefs.store import parse_s3_time

    assert parse_s3_time(text) == botocore.utils.parse_timestamp(text)
    assert parse_s3_time(text).tzinfo == botocore.utils.parse_timestamp(text).tzinfo or \
        parse_s3_time(text).utcoffset() == botocore.utils.parse_timestamp(text).utcoffset()


@pytest.mark.parametrize("text", ["Tue, 24 Nov 2026 22:53:16 GMT", "2026-11-24T22:53:16.000Z"])
def test_the_times_s3_sends_never_need_the_slow_parser(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers (RFC 1123: HEAD, GET) and XML bodies (ISO 8601: LIST) are parsed without dateutil."""
    import botocore.utils

    from ssefs.store import parse_s3_time

    expected = botocore.utils.parse_timestamp(text)

    def slow_parser(text: str) -> Any:
        raise AssertionError(f"fell back to botocore's parser for {text!r}")

    monkeypatch.setattr(botocore.utils, "parse_timestamp", slow_parser)
    assert parse_s3_time(text) == expected


QUICK_HEAD_NAMES = ["plain.txt", "with space/and+plus", "percent%20sign", "unicode/ünï 😀", "tilde~(paren)'q'",
                    "a=b&c?d#e", "*star,comma;semi", "dir/sub/deep.bin", ".hidden"]


async def test_the_quick_answers_exactly_like_boto3(endpoint: SeaweedEndpoint, bucket: str,
                                                         sse_key: SseKey, key_bytes: bytes, s3: Any) -> None:
    """HEADs skip botocore's per-call machinery; the answer must be the one boto3 would give, for any name."""
    from ssefs.quickpath import NOT_FOUND
    from ssefs.store import _info_from_head

    store = make_store(endpoint, bucket, sse_key)
    assert store._quick is not None
    for index, name in enumerate(QUICK_HEAD_NAMES):
        s3.put_object(Bucket=bucket, Key=name, Body=b"x" * index, Metadata={"mode": str(0o100600 + index),
                      "mtime": f"{index}.5"}, **sse_params(key_bytes))
    answered: list[str] = []
    quick = store._quick.head

    def counting(object_key: str, key: SseKey) -> Any:
        answer = quick(object_key, key)
        assert isinstance(answer, dict), (object_key, answer)
        answered.append(object_key)
        return answer

    store._quick.head = counting  # type: ignore[method-assign]
    for name in QUICK_HEAD_NAMES:
        through_boto3 = store._client.head_object(Bucket=bucket, Key=name, **sse_key.sse_params())
        assert await store.head(name) == _info_from_head(name, through_boto3)
        assert (await store.head(name)).metadata["mode"] == str(0o100600 + QUICK_HEAD_NAMES.index(name))
    assert answered == [name for name in QUICK_HEAD_NAMES for _ in range(2)]
    store._quick.head = quick  # type: ignore[method-assign]
    assert quick("missing/name", sse_key) == NOT_FOUND
    with pytest.raises(NoSuchObject, match="no such object"):
        await store.head("missing/name")


async def test_the_quick_leaves_refusals_and_failures_to_boto3(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, s3: Any
) -> None:
    """A 403 (another key), odd paths and an unreachable server go to boto3, which asks again and explains;
    an object stored without SSE-C is refused by the echo check either way."""
    store = make_store(endpoint, bucket, sse_key)
    assert store._quick is not None
    s3.put_object(Bucket=bucket, Key="foreign", Body=b"f", **sse_params(secrets.token_bytes(32)))
    s3.put_object(Bucket=bucket, Key="plain", Body=b"p")
    for name in ("foreign", "dots/../x"):  # the last one urllib3 would resolve to "x"
        assert store._quick.head(name, sse_key) is None
    plain = store._quick.head("plain", sse_key)  # SeaweedFS answers 200 without the echo of our key
    assert isinstance(plain, dict) and not plain["SSECustomerKeyMD5"]
    with pytest.raises(WrongKey):
        await store.head("foreign")
    with pytest.raises(NotEncrypted):
        await store.head("plain")
    unreachable = make_store(endpoint, bucket, sse_key, endpoint_url="https://127.0.0.1:9", max_attempts=1,
                             connect_timeout=1.0)
    assert unreachable._quick is not None and unreachable._quick.head("x", sse_key) is None
    with pytest.raises(ServerUnavailable, match="cannot reach"):
        await unreachable.head("x")


def test_no_quick_through_a_proxy(endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert make_store(endpoint, bucket, sse_key)._quick is None
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert make_store(endpoint, bucket, sse_key)._quick is not None


async def test_head_many_answers_each_key_like_head(endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey,
                                                    s3: Any) -> None:
    store = make_store(endpoint, bucket, sse_key)
    names = [f"many/{index:03d}" for index in range(40)]
    for index, name in enumerate(names):
        await store.put(name, b"y" * index, {"mode": str(index)})
    s3.put_object(Bucket=bucket, Key="many/foreign", Body=b"f", **sse_params(secrets.token_bytes(32)))
    s3.put_object(Bucket=bucket, Key="many/plain", Body=b"p")
    store.deletes.add("many/000")  # queued for deletion: reads as absent at once
    answers = await store.head_many([*names, "many/foreign", "many/plain", "many/missing"])
    assert len(answers) == len(names) + 3
    for index, name in enumerate(names[1:], start=1):
        answer = answers[name]
        assert isinstance(answer, ObjectInfo) and answer.size == index and answer.metadata == {"mode": str(index)}
        assert answer == await store.head(name)
    assert isinstance(answers["many/000"], NoSuchObject)
    assert isinstance(answers["many/foreign"], WrongKey)
    assert isinstance(answers["many/plain"], NotEncrypted)
    assert isinstance(answers["many/missing"], NoSuchObject)
    store._quick = None  # without the quick path, the same answers through boto3
    again = await store.head_many([*names, "many/foreign", "many/plain", "many/missing"])
    assert {name: type(answer) for name, answer in again.items()} == {
        name: type(answer) for name, answer in answers.items()}
    assert all(again[name] == answers[name] for name in names[1:])


async def test_quick_head_batches_go_through_libcurl_and_answer_like_urllib3(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names that need escaping, metadata, a missing key, a key under another SSE key and a dot
    segment: libcurl's batch answers exactly as the one-at-a-time urllib3 HEAD does (None where that
    one must ask boto3), and its session, with its connections, serves the next batch too."""
    from ssefs import quickpath

    assert quickpath.pycurl is not None
    store = make_store(endpoint, bucket, sse_key)
    quick = store._quick
    assert quick is not None
    names = ["b/a b.txt", "b/plus+sign", "b/per%cent", "b/ü nicode", "b/tilde~", "b/q?mark", "b/hash#"]
    for index, name in enumerate(names):
        await store.put(name, b"z" * index, {"mode": str(33188 + index), "mtime": "1700000000.5"})
    other = SseKey(secrets.token_bytes(32))
    asked = [(name, sse_key) for name in names] + [
        ("b/missing", sse_key), ("b/a b.txt", other), ("b/./a b.txt", sse_key)]

    def answers_of(batch: list[tuple[str, SseKey]]) -> list[Any]:
        return [{name: value for name, value in answer.items() if name != "LastModified"}
                if isinstance(answer, dict) else answer for answer in quick.head_many(batch)]

    through_curl = answers_of(asked)
    assert quick._curl_sessions.qsize() == 1
    assert answers_of(asked) == through_curl and quick._curl_sessions.qsize() == 1  # the session is reused
    for index, answer in enumerate(through_curl[:len(names)]):
        assert answer["ContentLength"] == index and answer["Metadata"]["mode"] == str(33188 + index)
    assert through_curl[len(names):] == [quickpath.NOT_FOUND, None, None]
    # A libcurl failure midway: the batch is asked again elsewhere (None), the session not reused.
    session = quick._curl_sessions.get_nowait()

    def broken(requests: list[Any]) -> list[Any]:
        raise quickpath.pycurl.error(7, "failed midway")

    monkeypatch.setattr(session, "heads", broken)
    quick._curl_sessions.put(session)
    assert quick.head_many(asked[:2]) == [None, None]
    assert quick._curl_sessions.qsize() == 0
    assert answers_of(asked) == through_curl  # a new session serves the next batch
    monkeypatch.setattr(quickpath, "pycurl", None)
    assert quick.head_batching == (quickpath.URLLIB3_HEAD_BATCH, store.settings.max_connections)
    assert answers_of(asked) == through_curl


async def test_libcurl_signs_its_heads_and_a_wrong_secret_is_refused(endpoint: SeaweedEndpoint, bucket: str,
                                                                     sse_key: SseKey) -> None:
    """libcurl signs the HEAD batches itself (SigV4): the server checks the signature, so with a
    wrong secret every answer is None (boto3 then reports the credentials), never a 200 or 404."""
    store = make_store(endpoint, bucket, sse_key)
    await store.put("signed", b"s", {"mode": "33188"})
    quick = store._quick
    assert quick is not None
    assert [answer["Metadata"] if isinstance(answer, dict) else answer
            for answer in quick.head_many([("signed", sse_key)])] == [{"mode": "33188"}]
    settings = S3Settings(endpoint=endpoint.endpoint, bucket=bucket, region=endpoint.region,
                          ca_bundle=endpoint.ca_bundle, access_key_id=endpoint.access_key_id,
                          secret_access_key="not-the-secret", max_attempts=1)
    wrong_store = ObjectStore(settings, sse_key)
    wrong = wrong_store._quick
    assert wrong is not None
    assert wrong.head_many([("signed", sse_key), ("absent", sse_key)]) == [None, None]
    answers = await wrong_store.head_many(["signed", "absent"])  # boto3 then explains, per key
    assert all(isinstance(answer, SsefsError) and not isinstance(answer, NoSuchObject)
               for answer in answers.values()), answers


async def test_a_first_listing_loads_no_botocore_model(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading botocore's paginator model costs about 0.25 s: listings, quick or through boto3,
    use none, so the first `ls` of a mount does not pay it."""
    import botocore.loaders

    store = make_store(endpoint, bucket, sse_key)
    await store.put("listed", b"x")
    await store.check_bucket()

    def no_more_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a botocore model was loaded after the start-up check")

    monkeypatch.setattr(botocore.loaders.Loader, "load_service_model", no_more_loading)
    assert [info.key for info in (await store.list_children("")).objects] == ["listed"]
    store._quick = None
    assert [info.key for info in (await store.list_children("")).objects] == ["listed"]


async def test_small_puts_take_the_quick_path_and_store_what_boto3_would(
    endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey, key_bytes: bytes, s3: Any
) -> None:
    from ssefs.quickpath import PUT_LIMIT

    store = make_store(endpoint, bucket, sse_key)
    assert store._quick is not None
    quick_put = store._quick.put
    answered: list[str] = []

    def counting(object_key: str, *args: Any) -> Any:
        answer = quick_put(object_key, *args)
        if answer is not None:
            answered.append(object_key)
        return answer

    store._quick.put = counting  # type: ignore[method-assign, assignment]
    metadata = {"mode": "33188", "uid": "0", "gid": "0", "mtime": "1700000000.123456789"}
    small = secrets.token_bytes(5000)
    large = secrets.token_bytes(PUT_LIMIT + 1)
    for name, body in (("a dir/small ü+%.bin", small), ("empty", b""), ("large.bin", large)):
        etag = await store.put(name, body, metadata)
        stored = s3.get_object(Bucket=bucket, Key=name, **sse_params(key_bytes))
        assert stored["Body"].read() == body and stored["Metadata"] == metadata
        assert stored["ETag"].strip('"') == etag
        assert _echoed_md5_matches(stored["SSECustomerKeyMD5"], sse_key.md5_b64)
    assert answered == ["a dir/small ü+%.bin", "empty"]  # the large body went through boto3
    # Not plain ASCII, or a name urllib3 would rewrite: boto3's turn.
    assert quick_put("x", sse_key, b"x", {"note": "é"}, "") is None
    assert quick_put("a/../b", sse_key, b"x", {}, "") is None
    with pytest.raises(botocore.exceptions.ClientError):
        s3.get_object(Bucket=bucket, Key="a dir/small ü+%.bin")  # stored under the key, as always


async def test_a_quick_put_refused_goes_to_boto3_which_explains(endpoint: SeaweedEndpoint, bucket: str,
                                                                sse_key: SseKey) -> None:
    """A body whose Content-MD5 does not match is refused (the guard against a body cut short)."""
    import base64
    import hashlib

    store = make_store(endpoint, bucket, sse_key)
    assert store._quick is not None
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    assert store._quick.put("refused", sse_key, b"body", {}, wrong_md5) is None
    with pytest.raises(NoSuchObject):
        await store.head("refused")


async def test_ranged_gets_take_the_quick_path_in_pieces(endpoint: SeaweedEndpoint, bucket: str,
                                                         sse_key: SseKey) -> None:
    from ssefs.quickpath import NOT_FOUND, PAST_THE_END

    store = make_store(endpoint, bucket, sse_key)
    assert store._quick is not None
    piece = 1024 * 1024
    payload = secrets.token_bytes(3 * piece + 5000)
    await store.put("ranged", payload)  # over PUT_LIMIT: through boto3
    quick_get = store._quick.get
    answered: list[tuple[int, int, list[int]]] = []

    def counting(object_key: str, key: SseKey, offset: int, length: int, piece_size: int) -> Any:
        answer = quick_get(object_key, key, offset, length, piece_size)
        if isinstance(answer, dict):
            answered.append((offset, length, [len(part) for part in answer["Pieces"]]))
        return answer

    store._quick.get = counting  # type: ignore[method-assign]
    assert await store.get_range("ranged", 0, 4096) == payload[:4096]
    assert await store.get_range("ranged", 3 * piece, piece) == payload[3 * piece:]  # fewer at the end
    assert await store.get_pieces("ranged", 10, 3000, 1000) == [payload[10:1010], payload[1010:2010],
                                                               payload[2010:3010]]
    # A read-ahead sized GET: read from the socket piece by piece, the last piece shorter.
    assert await store.get_pieces("ranged", piece, 8 * piece, piece) == [
        payload[piece:2 * piece], payload[2 * piece:3 * piece], payload[3 * piece:]]
    assert answered == [(0, 4096, [4096]), (3 * piece, piece, [5000]), (10, 3000, [1000, 1000, 1000]),
                        (piece, 8 * piece, [piece, piece, 5000])]
    assert quick_get("ranged", sse_key, len(payload), 10, 10) == PAST_THE_END
    assert await store.get_range("ranged", len(payload) + 5, 10) == b""
    assert quick_get("absent", sse_key, 0, 10, 10) == NOT_FOUND
    with pytest.raises(NoSuchObject):
        await store.get_range("absent", 0, 10)
    # After error answers whose bodies were drained, the pooled connections still serve correctly.
    for _ in range(8):
        assert quick_get("ranged", sse_key, 5, 20, 20)["Pieces"] == [payload[5:25]]  # type: ignore[index]


async def test_the_quick_path_verifies_the_server_certificate(endpoint: SeaweedEndpoint, bucket: str,
                                                              sse_key: SseKey) -> None:
    """Without the test CA, the lean path refuses the server's certificate, exactly as boto3 does."""
    settings = S3Settings(endpoint=endpoint.endpoint, bucket=bucket, region=endpoint.region, ca_bundle=None,
                          access_key_id=endpoint.access_key_id, secret_access_key=endpoint.secret_access_key,
                          max_attempts=1)
    store = ObjectStore(settings, sse_key)
    assert store._quick is not None
    assert store._quick.head("anything", sse_key) is None
    assert store._quick.head_many([("anything", sse_key)]) == [None]  # libcurl refuses it too
    assert store._quick.put("anything", sse_key, b"x", {}, "") is None
    with pytest.raises(ServerUnavailable, match="TLS"):
        await store.head("anything")


def test_a_quick_get_whose_body_ends_short_is_left_to_boto3(sse_key: SseKey) -> None:
    """A server that declares 100 bytes and sends 50: the quick path answers None (boto3 reads again),
    never the short body as if it were whole. Plain HTTP on loopback, a one-shot server."""
    import socket
    import threading

    import boto3

    from ssefs.quickpath import QuickPath

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    requests: list[bytes] = []

    def serve() -> None:
        for answer in (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100\r\n\r\n" + b"x" * 50,
                       b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n" + b"y" * 4000):
            connection, _ = listener.accept()
            with connection:
                requests.append(connection.recv(65536))
                connection.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="id", aws_secret_access_key="secret")
    credentials = botocore.credentials.Credentials("id", "secret")
    quick = QuickPath(client, credentials, "bucket", ca_bundle=None, max_connections=1,
                      connect_timeout=2, read_timeout=2)
    try:
        assert quick.get("cut", sse_key, 0, 100, 10) is None
        # A 200 (the whole object) for a range that starts later is not the bytes asked for.
        assert quick.get("whole", sse_key, 10, 100, 10) is None
    finally:
        listener.close()
        server.join(timeout=5)
    assert [request.split(b" ", 2)[:2] for request in requests] == [[b"GET", b"/bucket/cut"],
                                                                    [b"GET", b"/bucket/whole"]]


async def test_quick_listings_match_the_names_stored(endpoint: SeaweedEndpoint, bucket: str, sse_key: SseKey,
                                                     s3: Any) -> None:
    """Names that need URL or XML escaping come back from the quick LIST exactly as stored, page after
    page, with sub-prefixes; and the same as boto3 lists them."""
    store = make_store(endpoint, bucket, sse_key)
    assert store._quick is not None
    names = ["d/a b.txt", "d/plus+sign", "d/per%cent", "d/ü nicode", "d/tilde~", "d/q?mark", "d/hash#",
             "d/amp&<lt>\"'", "d/sub/inner", "d/sub2/x/y", "d/z"]
    for name in names:
        await store.put(name, b"x")
    quick_list_page = store._quick.list_page
    pages: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        page = quick_list_page(*args, **kwargs)
        if page is not None:
            pages.append(len(page["Contents"]) + len(page["CommonPrefixes"]))
        return page

    store._quick.list_page = counting  # type: ignore[method-assign]
    listing = await store.list_children("d/")
    files = sorted(name for name in names if name.count("/") == 1)
    assert sorted(info.key for info in listing.objects) == files
    assert sorted(listing.prefixes) == ["sub", "sub2"]
    assert pages == [len(files) + 2]
    # Two entries a page: the continuation tokens carry the listing on, every page the quick way.
    pages.clear()
    paged = [item["Key"] for page in store._list_pages("d/", max_keys=2) for item in page["Contents"]]
    assert paged == sorted(names)
    assert pages == [2] * (len(names) // 2) + [len(names) % 2]
    assert [info.key for info in await store.list_tree("d/")] == sorted(names)
    assert (await store.first_object_with_prefix("d/p")) is not None
    assert await store.keys_with_prefix("d/sub", 5) == ["d/sub/inner", "d/sub2/x/y"]
    # boto3's view of the same listing, sizes and times included.
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="d/")["Contents"]
    quick = quick_list_page("d/", delimiter=None, max_keys=1000, continuation=None)
    assert quick is not None
    assert [(item["Key"], item["Size"], item["ETag"], item["LastModified"]) for item in quick["Contents"]] == [
        (item["Key"], item["Size"], item["ETag"], item["LastModified"]) for item in listed]
