"""Error translation for answers SeaweedFS never gives (AWS's SSE-C block, throttling), with botocore's Stubber.

These are unit tests of the store's decision logic: the HTTP exchange is
replaced by canned AWS responses, everything else is the real code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber

from ssefs.config import S3Settings, load_config
from ssefs.errors import SseBlocked, StartupCheckError, WrongKey
from ssefs.keys import SseKey
from ssefs.mount import startup_check
from ssefs.store import ObjectStore

KEY = SseKey(bytes(range(32)))


def stubbed_store() -> tuple[ObjectStore, Stubber]:
    settings = S3Settings(endpoint="https://s3.example.invalid", bucket="photos",
                          access_key_id="AKIDEXAMPLE", secret_access_key="secret")
    store = ObjectStore(settings, KEY)
    stubber = Stubber(store._client)
    stubber.activate()
    return store, stubber


def blocked_encryption(blocked: bool) -> dict[str, Any]:
    rule: dict[str, Any] = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    rule["BlockedEncryptionTypes"] = {"EncryptionType": ["SSE-C"] if blocked else ["NONE"]}
    return {"ServerSideEncryptionConfiguration": {"Rules": [rule]}}


async def test_put_refused_on_a_bucket_that_blocks_sse_c_says_so() -> None:
    store, stubber = stubbed_store()
    stubber.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    stubber.add_response("get_bucket_encryption", blocked_encryption(True), {"Bucket": "photos"})
    with pytest.raises(SseBlocked) as caught:
        await store.put("a.txt", b"x")
    message = str(caught.value)
    assert "refuses SSE-C writes" in message and "BlockedEncryptionTypes" in message and "'a.txt'" in message
    for secret in KEY.redaction_strings():
        assert secret not in message


async def test_put_refused_for_other_reasons_is_plain_access_denied() -> None:
    store, stubber = stubbed_store()
    stubber.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    stubber.add_response("get_bucket_encryption", blocked_encryption(False), {"Bucket": "photos"})
    with pytest.raises(WrongKey) as caught:
        await store.put("a.txt", b"x")
    assert not isinstance(caught.value, SseBlocked)
    # The verdict is cached: a second refusal asks no second question.
    stubber.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    with pytest.raises(WrongKey):
        await store.put("b.txt", b"x")
    stubber.assert_no_pending_responses()


async def test_startup_refuses_a_bucket_that_blocks_sse_c(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_bytes(bytes(32))
    key_file.chmod(0o600)
    config_path = tmp_path / "c.toml"
    config_path.write_text(
        '[s3]\nendpoint = "https://s3.example.invalid"\nbucket = "photos"\n'
        f'[key]\nfile = "{key_file}"\n[cache]\ndir = "{tmp_path / "cache"}"\n'
    )
    config = load_config(config_path)
    store, stubber = stubbed_store()
    stubber.add_response("head_bucket", {}, {"Bucket": "photos"})
    stubber.add_response("get_bucket_encryption", blocked_encryption(True), {"Bucket": "photos"})
    with pytest.raises(StartupCheckError, match="blocks SSE-C writes"):
        await startup_check(store, config, skip_key_check=False)


async def test_startup_refuses_credentials_without_access() -> None:
    store, stubber = stubbed_store()
    stubber.add_client_error("head_bucket", "403", "Forbidden", 403)
    with pytest.raises(StartupCheckError, match="not allowed to use bucket"):
        await store.check_bucket()


def test_unknown_aws_profile_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ssefs.errors import ConfigError

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    settings = S3Settings(endpoint="https://s3.example.invalid", bucket="photos", profile="nope")
    with pytest.raises(ConfigError, match="profile 'nope'"):
        ObjectStore(settings, KEY)


async def test_upload_part_copy_is_used_where_supported() -> None:
    store, stubber = stubbed_store()
    stubber.add_response(
        "upload_part_copy", {"CopyPartResult": {"ETag": '"copied"'}},
        {"Bucket": "photos", "Key": "big", "UploadId": "u1", "PartNumber": 1,
         "CopySource": {"Bucket": "photos", "Key": "big"}, "CopySourceRange": "bytes=0-5242879",
         **KEY.sse_params(), **KEY.copy_source_params()},
    )
    assert await store.upload_part_copy("big", "u1", 1, "big", 0, 5 * 1024 * 1024) == '"copied"'
    assert store.part_copy_supported is True


async def test_upload_part_copy_not_implemented_is_detected_once() -> None:
    store, stubber = stubbed_store()
    stubber.add_client_error("upload_part_copy", "NotImplemented", "not implemented", 501)
    assert await store.upload_part_copy("big", "u1", 1, "big", 0, 5 * 1024 * 1024) is None
    assert store.part_copy_supported is False
    # Asked once: the next call answers without a request (the stubber has no response queued).
    assert await store.upload_part_copy("big", "u1", 2, "big", 0, 5 * 1024 * 1024) is None
    stubber.assert_no_pending_responses()
