"""Tests for ssefs.keys (loading, encoding and protecting the SSE-C key) and the log redaction filter."""

from __future__ import annotations

import base64
import copy
import hashlib
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssefs.cli import RedactingFilter, protect_logs
from ssefs.config import KeySource
from ssefs.errors import KeyLoadError, SsefsError
from ssefs.keys import KEY_BYTES, MAX_KEY_FILE_BYTES, SseKey, load_key, parse_key_bytes, write_new_key

# A fixed key whose base64 contains "+" and "/" (so the standard and URL-safe
# encodings differ) and which includes NUL and newline bytes.
SAMPLE = bytes([0xFB, 0xFF, 0xBF, 0x00, 0x0A, 0x3E]) + bytes(range(100, 126))
assert len(SAMPLE) == 32


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def key_file(tmp_path: Path, content: bytes, *, mode: int = 0o600, name: str = "mount.key") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def load_file(path: Path) -> SseKey:
    return load_key(KeySource(file=path))


def forbidden_strings(raw: bytes) -> list[str]:
    """Encodings of ``raw`` that must never appear in an error message or repr."""
    return [
        b64(raw),
        b64(raw).rstrip("="),
        raw.hex(),
        base64.urlsafe_b64encode(raw).decode("ascii"),
        repr(raw),
    ]


def assert_no_key_material(error: BaseException, raw: bytes) -> None:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        text = str(item) + repr(item)
        for secret in forbidden_strings(raw):
            if len(secret) >= 8:
                assert secret not in text


# ------------------------------------------------------------------ raw and base64 key files


def test_raw_32_bytes_accepted(tmp_path: Path) -> None:
    raw = os.urandom(32)
    key = load_file(key_file(tmp_path, raw))
    assert key.sse_params()["SSECustomerKey"] == b64(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00" + bytes(range(1, 32)),
        b"\x00" * 32,
        b"\x00\x00\x00" + os.urandom(26) + b"\x00\x00\x00",
        b"abc\ndef\n" + bytes(range(200, 224)),
        b"\n" * 32,
        b" " * 16 + b"\t" * 16,  # whitespace: must not be stripped from a raw key
        b"=" * 32,
        SAMPLE,
    ],
)
def test_awkward_raw_keys_accepted_byte_for_byte(tmp_path: Path, raw: bytes) -> None:
    assert len(raw) == 32
    key = load_file(key_file(tmp_path, raw))
    assert key.sse_params()["SSECustomerKey"] == b64(raw)
    assert key.sse_params()["SSECustomerKeyMD5"] == b64(hashlib.md5(raw).digest())


def test_raw_key_that_looks_like_base64_text_is_still_raw(tmp_path: Path) -> None:
    # 32 printable base64 characters decode to 24 bytes; the file is 32 bytes long,
    # so it is taken as 32 raw bytes, not decoded.
    raw = b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"
    key = load_file(key_file(tmp_path, raw))
    assert key.sse_params()["SSECustomerKey"] == b64(raw)


@pytest.mark.parametrize("suffix", [b"", b"\n", b"\r\n", b"  \n", b"\n\n"])
def test_base64_one_line_accepted(tmp_path: Path, suffix: bytes) -> None:
    raw = os.urandom(32)
    key = load_file(key_file(tmp_path, b64(raw).encode() + suffix))
    assert key.sse_params()["SSECustomerKey"] == b64(raw)


def test_base64_with_leading_whitespace_accepted(tmp_path: Path) -> None:
    raw = os.urandom(32)
    key = load_file(key_file(tmp_path, b"  " + b64(raw).encode() + b"\n"))
    assert key.sse_params()["SSECustomerKey"] == b64(raw)


def test_base64_split_over_lines_refused(tmp_path: Path) -> None:
    encoded = b64(SAMPLE).encode()
    with pytest.raises(KeyLoadError):
        load_file(key_file(tmp_path, encoded[:20] + b"\n" + encoded[20:] + b"\n"))


def test_urlsafe_base64_refused(tmp_path: Path) -> None:
    encoded = base64.urlsafe_b64encode(SAMPLE)
    assert encoded != base64.b64encode(SAMPLE)
    with pytest.raises(KeyLoadError):
        load_file(key_file(tmp_path, encoded))


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_wrong_raw_lengths_refused(tmp_path: Path, length: int) -> None:
    raw = (SAMPLE * 3)[:length]
    path = key_file(tmp_path, raw)
    with pytest.raises(KeyLoadError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"holds {length} bytes" in message
    assert "ssefs keygen" in message
    assert_no_key_material(info.value, raw)
    if length >= 32:
        assert_no_key_material(info.value, raw[:32])


@pytest.mark.parametrize("length", [31, 33, 16, 48])
@pytest.mark.parametrize("suffix", [b"", b"\n"])
def test_base64_of_wrong_length_refused(tmp_path: Path, length: int, suffix: bytes) -> None:
    raw = os.urandom(length)
    encoded = b64(raw).encode()
    path = key_file(tmp_path, encoded + suffix)
    with pytest.raises(KeyLoadError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message
    assert encoded.decode() not in message
    assert encoded.decode().rstrip("=") not in message
    assert_no_key_material(info.value, raw)


def test_file_of_exactly_32_raw_bytes_plus_newline_is_refused(tmp_path: Path) -> None:
    # 33 bytes: not raw, and not base64 either. Refusing is safer than guessing.
    path = key_file(tmp_path, SAMPLE[:31] + b"A" + b"\n")
    with pytest.raises(KeyLoadError, match="holds 33 bytes"):
        load_file(path)


def test_far_too_large_key_file_refused(tmp_path: Path) -> None:
    path = key_file(tmp_path, b"A" * (MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(KeyLoadError) as info:
        load_file(path)
    assert "too large" in str(info.value)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ key file permissions and kinds


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o620, 0o610, 0o601, 0o666])
def test_key_file_accessible_by_others_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path, SAMPLE, mode=mode)
    with pytest.raises(KeyLoadError) as info:
        load_file(path)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert str(path) in message
    assert_no_key_material(info.value, SAMPLE)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o500])
def test_private_key_file_accepted(tmp_path: Path, mode: int) -> None:
    key = load_file(key_file(tmp_path, SAMPLE, mode=mode))
    assert key.sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyLoadError) as info:
        load_file(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_directory_instead_of_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keydir"
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    with pytest.raises(KeyLoadError) as info:
        load_file(path)
    assert str(path) in str(info.value)
    assert "not a regular file" in str(info.value)


def test_symlink_to_private_key_file_accepted(tmp_path: Path) -> None:
    target = key_file(tmp_path, b64(SAMPLE).encode() + b"\n", name="real.key")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    key = load_file(link)
    assert key.sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_symlink_to_readable_key_file_still_refused(tmp_path: Path) -> None:
    target = key_file(tmp_path, SAMPLE, name="real.key", mode=0o644)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(KeyLoadError, match="chmod 600"):
        load_file(link)


def test_key_load_error_is_an_ssefs_error(tmp_path: Path) -> None:
    import errno

    with pytest.raises(SsefsError) as info:
        load_file(tmp_path / "absent.key")
    assert isinstance(info.value, KeyLoadError)
    assert info.value.errno == errno.EINVAL


# ------------------------------------------------------------------ environment variable


def test_env_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSEFS_TEST_KEY", b64(SAMPLE))
    key = load_key(KeySource(env="SSEFS_TEST_KEY"))
    assert key.sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_env_source_with_trailing_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSEFS_TEST_KEY", b64(SAMPLE) + "\n")
    assert load_key(KeySource(env="SSEFS_TEST_KEY")).sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_env_source_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSEFS_TEST_KEY", raising=False)
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(env="SSEFS_TEST_KEY"))
    assert "SSEFS_TEST_KEY" in str(info.value)
    assert "not set" in str(info.value)


def test_env_source_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSEFS_TEST_KEY", "")
    with pytest.raises(KeyLoadError, match="SSEFS_TEST_KEY is not set"):
        load_key(KeySource(env="SSEFS_TEST_KEY"))


@pytest.mark.parametrize(
    "value",
    [
        b64(SAMPLE[:31]),
        b64(SAMPLE + b"!"),
        b64(SAMPLE)[:-2],
        "not a key at all",
        b64(SAMPLE).replace("+", "-"),
        "é" * 40,
    ],
)
def test_env_source_bad_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SSEFS_TEST_KEY", value)
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(env="SSEFS_TEST_KEY"))
    message = str(info.value)
    assert "environment variable SSEFS_TEST_KEY" in message
    assert value not in message
    assert_no_key_material(info.value, SAMPLE)


# ------------------------------------------------------------------ systemd credential


def credentials_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    os.chmod(directory, 0o700)
    return directory


def test_credential_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = credentials_dir(tmp_path)
    key_file(directory, b64(SAMPLE).encode() + b"\n", name="ssefs-key", mode=0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    key = load_key(KeySource(credential="ssefs-key"))
    assert key.sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_credential_source_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = credentials_dir(tmp_path)
    key_file(directory, SAMPLE, name="ssefs-key", mode=0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    assert load_key(KeySource(credential="ssefs-key")).sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_credential_without_credentials_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(credential="ssefs-key"))
    message = str(info.value)
    assert "CREDENTIALS_DIRECTORY" in message
    assert "ssefs-key" in message
    assert "LoadCredential" in message


def test_credential_missing_from_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = credentials_dir(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(credential="other"))
    assert str(directory / "other") in str(info.value)
    assert "does not exist" in str(info.value)


def test_credential_with_bad_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = credentials_dir(tmp_path)
    key_file(directory, SAMPLE[:20], name="ssefs-key", mode=0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(credential="ssefs-key"))
    assert f"systemd credential {directory / 'ssefs-key'}" in str(info.value)
    assert_no_key_material(info.value, SAMPLE[:20])


# ------------------------------------------------------------------ key command


def test_command_source_prints_base64() -> None:
    key = load_key(KeySource(command=f"printf '%s\\n' {b64(SAMPLE)}"))
    assert key.sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_command_source_reads_a_secret_manager_like_script(tmp_path: Path) -> None:
    vault = key_file(tmp_path, b64(SAMPLE).encode() + b"\n", name="vault")
    script = tmp_path / "fetch-key"
    script.write_text(f"#!/bin/sh\n# stands in for: pass show ssefs/photos\nexec cat {vault}\n")
    os.chmod(script, 0o700)
    assert load_key(KeySource(command=str(script))).fingerprint == SseKey(SAMPLE).fingerprint


def test_command_failure_names_the_exit_code_and_stderr_line() -> None:
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(command="echo 'vault is sealed' >&2; exit 3"))
    assert str(info.value) == "key command failed with exit code 3: vault is sealed"


def test_command_timeout() -> None:
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(command="sleep 5", command_timeout=0.3))
    assert str(info.value) == "key command did not finish within 0.3 seconds"


def test_command_printing_raw_bytes_refused() -> None:
    # 32 printable characters are a weak key if taken as raw bytes: only base64 is accepted.
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(command="printf abcdefghijklmnopqrstuvwxyz012345"))
    assert "key command holds 32 bytes" in str(info.value)


def test_command_echoing_key_on_stderr_does_not_leak_it() -> None:
    with pytest.raises(KeyLoadError) as info:
        load_key(KeySource(command=f"echo {b64(SAMPLE[:20])}; echo {b64(SAMPLE[:20])} >&2; exit 1"))
    assert_no_key_material(info.value, SAMPLE[:20])


def test_key_ring_loads_previous_keys_and_drops_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssefs.config import load_config
    from ssefs.keys import load_key_ring

    old = bytes(range(32))
    key_file(tmp_path, SAMPLE)
    key_file(tmp_path, old, name="old.key")
    monkeypatch.setenv("OLD_KEY", b64(old))
    config_path = tmp_path / "mount.toml"
    config_path.write_text(
        '[s3]\nendpoint = "https://s3.example.com"\nbucket = "my-bucket"\n'
        '[key]\nfile = "mount.key"\n'
        'previous_keys = [{ file = "old.key" }, { env = "OLD_KEY" }, { file = "mount.key" }]\n'
    )
    ring = load_key_ring(load_config(config_path))
    assert ring.current.fingerprint == SseKey(SAMPLE).fingerprint
    assert [key.fingerprint for key in ring.previous] == [SseKey(old).fingerprint]
    assert ring.by_fingerprint(SseKey(old).fingerprint) is ring.previous[0]
    assert ring.by_fingerprint("0" * 16) is None
    assert b64(old) in ring.redaction_strings() and b64(SAMPLE) in ring.redaction_strings()


def test_key_ring_names_the_failing_previous_key(tmp_path: Path) -> None:
    from ssefs.config import load_config
    from ssefs.keys import load_key_ring

    key_file(tmp_path, SAMPLE)
    config_path = tmp_path / "mount.toml"
    config_path.write_text(
        '[s3]\nendpoint = "https://s3.example.com"\nbucket = "my-bucket"\n'
        '[key]\nfile = "mount.key"\nprevious_keys = [{ file = "gone.key" }]\n'
    )
    with pytest.raises(KeyLoadError) as info:
        load_key_ring(load_config(config_path))
    assert str(info.value) == f"previous_keys[0]: key file {tmp_path / 'gone.key'} does not exist"


# ------------------------------------------------------------------ SseKey


def test_repr_and_str_show_only_the_fingerprint() -> None:
    key = SseKey(SAMPLE)
    fingerprint = hashlib.sha256(SAMPLE).hexdigest()[:16]
    assert key.fingerprint == fingerprint
    for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert fingerprint in text
        for secret in forbidden_strings(SAMPLE):
            assert secret not in text
        assert b64(hashlib.md5(SAMPLE).digest()) not in text
    assert repr(key) == f"SseKey(fingerprint={fingerprint})"
    assert str(key) == repr(key)


def test_key_has_no_instance_dict() -> None:
    # __slots__: vars() and __dict__ cannot dump the key by accident.
    key = SseKey(SAMPLE)
    with pytest.raises(TypeError):
        vars(key)


def test_fingerprints_differ_per_key() -> None:
    assert SseKey(SAMPLE).fingerprint != SseKey(bytes(32)).fingerprint


def test_sse_params() -> None:
    key = SseKey(SAMPLE)
    expected_key = base64.b64encode(SAMPLE).decode("ascii")
    expected_md5 = base64.b64encode(hashlib.md5(SAMPLE).digest()).decode("ascii")
    assert key.sse_params() == {
        "SSECustomerAlgorithm": "AES256",
        "SSECustomerKey": expected_key,
        "SSECustomerKeyMD5": expected_md5,
    }
    assert key.md5_b64 == expected_md5
    assert base64.b64decode(key.sse_params()["SSECustomerKey"]) == SAMPLE


def test_copy_source_params() -> None:
    key = SseKey(SAMPLE)
    assert key.copy_source_params() == {
        "CopySourceSSECustomerAlgorithm": "AES256",
        "CopySourceSSECustomerKey": base64.b64encode(SAMPLE).decode("ascii"),
        "CopySourceSSECustomerKeyMD5": base64.b64encode(hashlib.md5(SAMPLE).digest()).decode("ascii"),
    }


def test_params_are_fresh_dicts() -> None:
    key = SseKey(SAMPLE)
    params = key.sse_params()
    params["SSECustomerKey"] = "tampered"
    assert key.sse_params()["SSECustomerKey"] == b64(SAMPLE)


def test_redaction_strings_cover_the_encodings() -> None:
    strings = SseKey(SAMPLE).redaction_strings()
    assert b64(SAMPLE) in strings
    assert SAMPLE.hex() in strings
    assert base64.urlsafe_b64encode(SAMPLE).decode("ascii") in strings


@pytest.mark.parametrize("raw", [b"", bytes(31), bytes(33), bytes(64)])
def test_sse_key_refuses_wrong_length(raw: bytes) -> None:
    with pytest.raises(KeyLoadError, match=f"exactly {KEY_BYTES} bytes, got {len(raw)}"):
        SseKey(raw)


@pytest.mark.parametrize("raw", [bytearray(32), memoryview(bytes(32)), "a" * 32])
def test_sse_key_refuses_non_bytes(raw: object) -> None:
    with pytest.raises(KeyLoadError):
        SseKey(raw)  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_refused(protocol: int) -> None:
    key = SseKey(SAMPLE)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key, protocol=protocol)


def test_copying_refused() -> None:
    key = SseKey(SAMPLE)
    with pytest.raises(TypeError):
        copy.copy(key)
    with pytest.raises(TypeError):
        copy.deepcopy(key)


def test_derive() -> None:
    key = SseKey(SAMPLE)
    cache_key = key.derive(b"cache")
    assert isinstance(cache_key, bytes)
    assert len(cache_key) == 32
    assert key.derive(b"cache") == cache_key
    assert SseKey(SAMPLE).derive(b"cache") == cache_key
    assert key.derive(b"index") != cache_key
    assert key.derive(b"") != cache_key
    assert SseKey(bytes(32)).derive(b"cache") != cache_key
    assert cache_key != SAMPLE


def test_derive_matches_hkdf_sha256() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ssefs/cache").derive(SAMPLE)
    assert SseKey(SAMPLE).derive(b"cache") == expected


def test_parse_key_bytes_origin_in_message() -> None:
    with pytest.raises(KeyLoadError, match="^my origin holds 3 bytes"):
        parse_key_bytes(b"abc", origin="my origin")


# ------------------------------------------------------------------ write_new_key


def test_write_new_key(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    key = write_new_key(path)
    data = path.read_bytes()
    assert len(data) == 32
    assert (path.stat().st_mode & 0o777) == 0o600
    assert key.sse_params()["SSECustomerKey"] == b64(data)
    # The file loads back as the same key.
    assert load_file(path).fingerprint == key.fingerprint


def test_write_new_key_is_random(tmp_path: Path) -> None:
    first = write_new_key(tmp_path / "a.key")
    second = write_new_key(tmp_path / "b.key")
    assert first.fingerprint != second.fingerprint
    assert (tmp_path / "a.key").read_bytes() != (tmp_path / "b.key").read_bytes()


def test_write_new_key_mode_ignores_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        write_new_key(tmp_path / "k")
    finally:
        os.umask(old)
    assert ((tmp_path / "k").stat().st_mode & 0o777) == 0o600


def test_write_new_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = key_file(tmp_path, b"precious existing key material!!")
    before = path.read_bytes()
    with pytest.raises(KeyLoadError) as info:
        write_new_key(path)
    assert "already exists" in str(info.value)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert (path.stat().st_mode & 0o777) == 0o600


def test_write_new_key_refuses_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(KeyLoadError):
        write_new_key(link)
    assert not target.exists()


def test_write_new_key_in_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "k"
    with pytest.raises(KeyLoadError) as info:
        write_new_key(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ RedactingFilter


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, Capture]]:
    handler = Capture()
    handler.addFilter(RedactingFilter(SseKey(SAMPLE).redaction_strings()))
    logger = logging.getLogger("ssefs.test.redaction")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, handler
    logger.handlers.clear()
    logger.propagate = True


def assert_redacted(handler: Capture, *, expect_lines: int = 1) -> str:
    assert len(handler.lines) == expect_lines
    output = "\n".join(handler.lines)
    for secret in forbidden_strings(SAMPLE)[:4]:
        assert secret not in output
    return output


def test_redacts_key_in_message(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    logger.debug(f"headers: x-amz-server-side-encryption-customer-key: {b64(SAMPLE)}")
    output = assert_redacted(handler)
    assert "[redacted]" in output
    assert "x-amz-server-side-encryption-customer-key: [redacted]" in output


def test_redacts_key_in_percent_args(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    logger.info("request headers %s for %r", {"SSECustomerKey": b64(SAMPLE)}, "obj/key")
    output = assert_redacted(handler)
    assert "[redacted]" in output
    assert "'obj/key'" in output


def test_redacts_key_in_bytes_arg(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    logger.info("raw header %s", b64(SAMPLE).encode())
    assert "[redacted]" in assert_redacted(handler)


def test_redacts_hex_and_urlsafe(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    logger.warning("hex %s", SAMPLE.hex())
    logger.warning("urlsafe %s", base64.urlsafe_b64encode(SAMPLE).decode())
    output = assert_redacted(handler, expect_lines=2)
    assert output.count("[redacted]") == 2


def test_redacts_every_occurrence(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    logger.error("%s and again %s", b64(SAMPLE), b64(SAMPLE))
    assert assert_redacted(handler).count("[redacted]") == 2


def test_leaves_innocent_messages_alone(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    logger.info("uploaded %s (%d bytes)", "photos/a.jpg", 1234)
    assert handler.lines == ["INFO ssefs.test.redaction: uploaded photos/a.jpg (1234 bytes)"]


def test_withholds_exception_text_with_key(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    try:
        raise RuntimeError(f"bad header {b64(SAMPLE)}")
    except RuntimeError:
        logger.exception("request failed")
    output = assert_redacted(handler)
    assert "request failed" in output
    assert "withheld" in output
    assert "Traceback" not in output


def test_keeps_innocent_exception_text(captured: tuple[logging.Logger, Capture]) -> None:
    logger, handler = captured
    try:
        raise RuntimeError("connection reset")
    except RuntimeError:
        logger.exception("request failed")
    output = assert_redacted(handler)
    assert "connection reset" in output
    assert "Traceback" in output


def test_empty_secret_strings_ignored() -> None:
    handler = Capture()
    handler.addFilter(RedactingFilter(("", b64(SAMPLE))))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %s", ("text",), None)
    handler.handle(record)
    assert handler.lines == ["INFO x: plain text"]


def test_protect_logs_installs_the_filter_on_root_handlers() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = Capture()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    try:
        protect_logs(SseKey(SAMPLE))
        logging.getLogger("botocore.test").warning("Authorization header %s", b64(SAMPLE))
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    output = assert_redacted(handler)
    assert "[redacted]" in output


def test_refused_key_files_do_not_leak_descriptors(tmp_path: Path) -> None:
    directory = tmp_path / "keydir"
    directory.mkdir()
    readable = key_file(tmp_path, SAMPLE, mode=0o644)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for path in (directory, readable):
            with pytest.raises(KeyLoadError):
                load_file(path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_env_source_refuses_32_characters_of_text(monkeypatch: pytest.MonkeyPatch) -> None:
    # 32 characters in a variable are text, not a key: taking them as raw bytes would make a weak key.
    monkeypatch.setenv("SSEFS_TEST_KEY", "correct horse battery staple 123")
    with pytest.raises(KeyLoadError, match="neither the base64"):
        load_key(KeySource(env="SSEFS_TEST_KEY"))


def test_fifo_in_place_of_key_file_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyLoadError, match="not a regular file"):
        load_key(KeySource(file=fifo))
