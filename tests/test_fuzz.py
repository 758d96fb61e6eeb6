"""Bad input: fuzzed config files and key sources, and odd objects in the bucket.

The loaders (``ssefs.config.load_config``, ``ssefs.keys.load_key``/``parse_key_bytes``) get arbitrary
bytes, TOML-like text, valid TOML with values of every type in every setting, huge files, and key
sources whose content, mode, environment or command output is arbitrary. Whatever they get, they
either return a config or key, or raise ``ConfigError``/``KeyLoadError`` with a one-line message that
never holds key material: never another exception.

Then a real mount of a bucket holding odd objects, written with boto3 (control characters and
percent sequences in keys, keys SeaweedFS rewrites, a 1024-byte key, objects under another SSE-C key,
objects stored without SSE-C, metadata and directory-attribute objects that do not parse): the daemon
keeps serving, ``os.walk`` and ``ls -lR`` complete, odd entries read or fail with a stated errno, and
each problem is logged once.

Each bug these tests found has its own test below (``xfail(strict=True)`` while it is open); the
fuzzers' strategies include the inputs that found them (each place names the test).
"""

from __future__ import annotations

import base64
import binascii
import errno
import math
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from ssefs.config import Config, KeySource, load_config
from ssefs.errors import ConfigError, KeyLoadError, SsefsError
from ssefs.keys import KEY_BYTES, SseKey, load_key, parse_key_bytes
from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, keys, sse_params, write_config

MountFactory = Callable[..., Mount]

FUZZ = settings(
    max_examples=int(os.environ.get("SSEFS_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_MANY = settings(FUZZ, max_examples=int(os.environ.get("SSEFS_FUZZ_EXAMPLES_SLOW", "3000")))


def assert_clean_error(error: BaseException, kind: type[SsefsError], forbidden: list[str] | None = None) -> str:
    """``error`` is a ``kind`` with a one-line message containing none of ``forbidden``."""
    assert isinstance(error, kind), f"{type(error).__name__}: {error}"
    assert isinstance(error, SsefsError)
    message = str(error)
    assert message.strip(), "empty message"
    assert len(message.splitlines()) == 1, f"message on several lines: {message!r}"
    for text in forbidden or []:
        assert text not in message, f"message quotes {text!r}: {message!r}"
    return message


# ---------------------------------------------------------------------- the config loader


BASE: dict[str, dict[str, Any]] = {
    "s3": {
        "endpoint": "https://s3.example.net",
        "bucket": "my-bucket",
    },
    "key": {"file": "mount.key"},
    "cache": {"dir": "cache"},
    "mount": {},
}
KNOWN_KEYS = {
    "s3": [
        "endpoint", "region", "bucket", "prefix", "ca_bundle", "allow_insecure_http", "profile", "access_key_id",
        "secret_access_key", "addressing_style", "max_connections", "multipart_threshold", "part_size",
        "upload_concurrency", "connect_timeout", "read_timeout", "max_attempts",
    ],
    "key": ["file", "env", "credential", "command", "command_timeout", "previous_keys"],
    "cache": ["dir", "max_size", "writeback_delay"],
    "mount": [
        "uid", "gid", "file_mode", "dir_mode", "allow_other", "read_only", "attr_timeout", "skip_key_check",
        "read_ahead",
    ],
}
SECRET = "SeCrEt-" + secrets.token_hex(8)

# Any text: line breaks and other control characters (test_messages_quoting_names_and_paths_stay_on_one_line),
# "[" and "]" (test_endpoint_with_an_unbalanced_bracket_is_a_config_error), NUL (paths with NUL:
# test_key_sources_with_nul_characters_are_key_load_errors). Surrogates cannot be encoded in UTF-8.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=40),
    st.text(st.sampled_from(LINE_BREAKS + "[]\x00\x1b\x7fab/. "), max_size=12),
)
SIZE_TEXT = st.from_regex(
    # Up to 500 digits: past 308 a float overflows (test_size_with_hundreds_of_digits_is_a_config_error).
    r"\A ?[0-9]{1,500}(\.[0-9]{1,12})? ?(b|k|kb|kib|m|MB|mib|g|gb|GiB|t|tb|tib|x|kibi|)\Z",
)
SPECIAL_TEXT = st.sampled_from([
    "", " ", "0", "644", "0644", "7777", "17777", "-1", "0o644", "https://", "https://h", "http://h", "https://h/",
    "ftp://h", "https://user:pw@h:99999/x", "~", "~/k", "/", ".", "..", "a/b", "a//b", "a\\b", "/dev/null",
    "/nonexistent/dir", "path", "virtual", "auto", "PATH", "10GiB", "64MiB", "63MiB", "5MiB", "5GiB", "256MiB",
    "1.5", "1e3", "inf", "nan", "NaN", "A" * 10_000,
])
NUMBERS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**32 - 2, 2**32 - 1, 2**32, 5 * 2**20, 5 * 2**30, 2**63 - 1]),
    st.floats(),  # inf and nan included: test_nan_seconds_are_refused
)
SCALARS = st.one_of(st.booleans(), NUMBERS, TEXT, SIZE_TEXT, SPECIAL_TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["file", "env", "x"]), inner,
                                                                          max_size=3)),
    max_leaves=6,
)
# Mostly the sections and settings that exist, so that values get checked; sometimes any name at all.
SECTIONS = st.sampled_from(["mount", "cache", "key", "s3"] * 3 + ["?"]).flatmap(
    lambda section: TEXT.filter(bool) if section == "?" else st.just(section)
)


def setting_names(section: str) -> st.SearchStrategy[str]:
    known = KNOWN_KEYS.get(section, ["x"])
    others = sorted({key for names in KNOWN_KEYS.values() for key in names} - set(known))
    return st.sampled_from(known * 8 + others + ["?"]).flatmap(
        lambda name: TEXT.filter(bool) if name == "?" else st.just(name)
    )


def toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(ch if ch >= " " and ch != "\x7f" else f"\\u{ord(ch):04x}" for ch in escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(key)} = {toml_value(item)}" for key, item in value.items()) + "}"


def toml_document(document: dict[str, Any]) -> str:
    lines = []
    for section, table in document.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(section)}]")
            lines.extend(f"{toml_string(key)} = {toml_value(value)}" for key, value in table.items())
        else:
            lines.insert(0, f"{toml_string(section)} = {toml_value(table)}")
    return "\n".join(lines) + "\n"


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with a few settings replaced, added or removed, and sections added or replaced."""
    document: dict[str, Any] = {section: dict(table) for section, table in BASE.items()}
    if draw(st.booleans()):
        # S3 credentials: the secret must never show up in a message or in the Config's repr.
        document["s3"].update(access_key_id="AKIDFUZZ", secret_access_key=SECRET)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set"] * 6 + ["delete", "section"]))
        section = draw(SECTIONS)
        if action == "section":
            document[section] = draw(st.one_of(VALUES, st.just({})))
            continue
        table = document.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        name = draw(setting_names(section))
        if action == "delete":
            table.pop(name, None)
        else:
            table[name] = draw(VALUES)
    return document


def check_config(path: Path, *, forbidden: list[str] | None = None) -> Config | str:
    """load_config gives a Config or a clean ConfigError (its message is returned); nothing else."""
    try:
        config = load_config(path)
    except ConfigError as error:
        message = assert_clean_error(error, ConfigError, forbidden)
        note_outcome("refused: " + re.split(r"[:(]| is | must ", re.sub(r"^\S+: ", "", message))[0][:30])
        return message
    check_accepted(config)
    note_outcome("accepted")
    return config


def note_outcome(what: str) -> None:
    """For --hypothesis-show-statistics: which checks the fuzzer's inputs reached."""
    if currently_in_test_context():
        event(what)


def check_accepted(config: Config) -> None:
    """What an accepted config promises: every value has its type and lies in its range."""
    s3, cache, mount = config.s3, config.cache, config.mount
    assert s3.endpoint.startswith("https://") or (s3.endpoint.startswith("http://") and s3.allow_insecure_http)
    assert re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]", s3.bucket)
    assert s3.prefix == "" or (s3.prefix.endswith("/") and not s3.prefix.startswith("/") and "//" not in s3.prefix)
    assert s3.addressing_style in ("path", "virtual", "auto")
    for count in (s3.max_connections, s3.upload_concurrency, s3.max_attempts):
        assert isinstance(count, int) and not isinstance(count, bool) and count >= 1
    assert 5 * 2**20 <= s3.part_size <= 5 * 2**30 and 5 * 2**20 <= s3.multipart_threshold <= 256 * 2**20
    for seconds in (s3.connect_timeout, s3.read_timeout, config.key.command_timeout):
        assert isinstance(seconds, float) and seconds > 0
    for seconds in (cache.writeback_delay, mount.attr_timeout):
        assert isinstance(seconds, float) and seconds >= 0
    assert isinstance(cache.max_size, int) and cache.max_size >= 64 * 2**20
    assert 0 <= mount.uid < 2**32 - 1 and 0 <= mount.gid < 2**32 - 1
    assert 0 <= mount.file_mode <= 0o7777 and 0 <= mount.dir_mode <= 0o7777
    assert isinstance(mount.read_ahead, int) and 0 <= mount.read_ahead <= 2**30
    for source in (config.key, *config.previous_keys):
        assert sum(value is not None for value in (source.file, source.env, source.credential, source.command)) == 1


def write_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "fuzz.toml"


def test_the_base_document_is_accepted(config_path: Path) -> None:
    """The fuzzers start from a config that loads, so their mutations are what gets refused."""
    write_file(config_path, toml_document(BASE).encode())
    config = check_config(config_path)
    assert isinstance(config, Config) and config.s3.bucket == "my-bucket"


@FUZZ
@given(content=st.binary(max_size=3000))
def test_config_loader_with_arbitrary_bytes(config_path: Path, content: bytes) -> None:
    write_file(config_path, content)
    check_config(config_path)


TOML_PIECES = st.sampled_from([
    "[s3]", "[key]", "[cache]", "[mount]", "[[s3]]", "[s3.x]", "endpoint", "bucket", "file", "max_size", "uid",
    " = ", "=", '"', "'", '"""', "'''", "https://h", "b-1", "{", "}", "[", "]", ",", ".", "\n", "\r\n", " ", "\t",
    "#", "1", "-1", "1e999", "0x10", "0o7", "0b1", "inf", "nan", "true", "false", "1979-05-27T07:32:00Z", "\\",
    "\\u0000", "\\n", "ü", "\x00", "\x7f", "\ud7ff", "😀",
])


@FUZZ
@given(pieces=st.lists(TOML_PIECES, max_size=60))
def test_config_loader_with_toml_like_text(config_path: Path, pieces: list[str]) -> None:
    write_file(config_path, "".join(pieces).encode("utf-8", "surrogatepass"))
    check_config(config_path)


@FUZZ
@given(document=mutated_documents(), mode=st.sampled_from([0o600, 0o644]))
def test_config_loader_with_wrong_types_and_values(config_path: Path, document: dict[str, Any], mode: int) -> None:
    write_file(config_path, toml_document(document).encode(), mode)
    result = check_config(config_path, forbidden=[SECRET])
    if isinstance(result, Config) and result.s3.secret_access_key is not None:
        assert mode == 0o600  # a secret is only accepted from a file only its owner can read
    assert SECRET not in repr(result)


@pytest.mark.slow
@FUZZ_MANY
@given(document=mutated_documents(), mode=st.sampled_from([0o600, 0o644]))
def test_config_loader_with_wrong_types_and_values_many(
    config_path: Path, document: dict[str, Any], mode: int
) -> None:
    write_file(config_path, toml_document(document).encode(), mode)
    check_config(config_path, forbidden=[SECRET])


def test_huge_config_files_are_config_errors(config_path: Path) -> None:
    """32 MiB of comments, or one 32 MiB string: refused with one line, within seconds."""
    comments = b"# comment line\n" * (32 * 2**20 // 15)
    for content in (comments, b'[s3]\nendpoint = "https://' + b"h" * 32 * 2**20 + b'"\n'):
        write_file(config_path, content)
        started = time.monotonic()
        message = check_config(config_path)
        assert isinstance(message, str), "a huge file was accepted"
        assert len(message) < 1000, message[:200]
        assert time.monotonic() - started < 30


def run_loader_in_a_child(path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """load_config(path) in a child limited to 1 GiB of memory, which prints what happened."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from ssefs.config import load_config\n"
        "from ssefs.errors import ConfigError\n"
        "try:\n"
        "    load_config(sys.argv[1])\n"
        "    print('LOADED')\n"
        "except ConfigError as error:\n"
        "    print('CONFIGERROR', error)\n"
        "except BaseException as error:\n"
        "    print('OTHER', type(error).__name__, error)\n"
    )
    try:
        return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], -1, "TIMEOUT", "")


def test_a_config_that_is_a_fifo_or_endless_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo, 0o600)
    endless = tmp_path / "zero.toml"
    endless.symlink_to("/dev/zero")
    outcomes = {path.name: run_loader_in_a_child(path, timeout=5).stdout.strip() for path in (fifo, endless)}
    assert all(outcome.startswith("CONFIGERROR") for outcome in outcomes.values()), outcomes


def test_size_with_hundreds_of_digits_is_a_config_error(config_path: Path) -> None:
    write_file(config_path, toml_document({**BASE, "cache": {"max_size": "9" * 400 + "GiB"}}).encode())
    with pytest.raises(ConfigError):
        load_config(config_path)


def test_endpoint_with_an_unbalanced_bracket_is_a_config_error(config_path: Path) -> None:
    write_file(config_path, toml_document({**BASE, "s3": {**BASE["s3"], "endpoint": "https://[::1"}}).encode())
    with pytest.raises(ConfigError):
        load_config(config_path)


def test_nan_seconds_are_refused(config_path: Path) -> None:
    accepted = []
    for section, name in [("mount", "attr_timeout"), ("s3", "connect_timeout"), ("cache", "writeback_delay")]:
        document = {key: dict(table) for key, table in BASE.items()}
        document[section][name] = "NAN-PLACEHOLDER"
        write_file(config_path, toml_document(document).replace('"NAN-PLACEHOLDER"', "nan").encode())
        try:
            load_config(config_path)
        except ConfigError:
            continue
        accepted.append(f"[{section}] {name}")
    assert accepted == [], f"nan accepted for {accepted}"


def test_messages_quoting_names_and_paths_stay_on_one_line(config_path: Path, tmp_path: Path) -> None:
    documents: list[dict[str, Any]] = [
        {**BASE, "mount": {"bad\nname": 1}},
        {**BASE, "sec\ntion": {}},
        {**BASE, "s3": {**BASE["s3"], "ca_bundle": "no\nsuch.pem"}},
    ]
    messages = []
    for document in documents:
        write_file(config_path, toml_document(document).encode())
        with pytest.raises(ConfigError) as caught:
            load_config(config_path)
        messages.append(str(caught.value))
    with pytest.raises(KeyLoadError) as key_error:
        load_key(KeySource(file=tmp_path / "no\nsuch.key"))
    messages.append(str(key_error.value))
    assert [message for message in messages if len(message.splitlines()) != 1] == []


# ---------------------------------------------------------------------- the key loader


def key_encodings(raw: bytes) -> list[str]:
    """The ways key material could show up in a message."""
    found = [raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()]
    found.append(base64.b64encode(raw).decode().rstrip("="))
    return found


def material_in(data: bytes) -> list[str]:
    """Strings a message about ``data`` must not contain: the data itself and any key it holds."""
    forbidden = []
    text = data.strip().decode("latin-1")
    if len(text) >= 12:
        forbidden.append(text)
    for candidate in {data, data.strip()}:
        if len(candidate) == KEY_BYTES:
            forbidden.extend(key_encodings(candidate))
        try:
            decoded = base64.b64decode(candidate, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(decoded) >= 8:
            forbidden.extend(key_encodings(decoded))
    return forbidden


KEY_LIKE = st.one_of(
    st.binary(max_size=100),
    st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES),
    st.builds(lambda raw, pad: pad[0] + base64.b64encode(raw) + pad[1], st.binary(min_size=20, max_size=40),
              st.tuples(st.sampled_from([b"", b" ", b"\n", b"\t\r\n"]), st.sampled_from([b"", b"\n", b" \n", b"=="]))),
    st.builds(lambda raw: base64.urlsafe_b64encode(raw), st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES)),
)


def check_key_result(load: Callable[[], SseKey], data: bytes) -> SseKey | str:
    try:
        key = load()
    except KeyLoadError as error:
        return assert_clean_error(error, KeyLoadError, material_in(data))
    assert isinstance(key, SseKey)
    for text in key_encodings(data.strip()) + [data.strip().decode("latin-1")]:
        assert len(text) < 12 or text not in repr(key)
    params = key.sse_params()
    raw = base64.b64decode(params["SSECustomerKey"])
    assert len(raw) == KEY_BYTES
    assert raw == data or raw == base64.b64decode(data.strip())
    return key


@FUZZ
@given(data=KEY_LIKE, allow_raw=st.booleans())
def test_parse_key_bytes_with_arbitrary_input(data: bytes, allow_raw: bool) -> None:
    check_key_result(lambda: parse_key_bytes(data, origin="fuzzed input", allow_raw=allow_raw), data)


@FUZZ
@given(data=KEY_LIKE, mode=st.sampled_from([0o600, 0o400, 0o640, 0o604, 0o000, 0o700, 0o2600]))
def test_key_file_with_arbitrary_content_and_mode(tmp_path: Path, data: bytes, mode: int) -> None:
    path = write_file(tmp_path / "fuzz.key", data, mode)
    result = check_key_result(lambda: load_key(KeySource(file=path)), data)
    if mode & 0o077:
        assert isinstance(result, str) and "group or others" in result


@FUZZ
@given(data=KEY_LIKE.filter(lambda value: b"\x00" not in value))
def test_key_env_with_arbitrary_value(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setenv("SSEFS_FUZZ_KEY", os.fsdecode(data))
    result = check_key_result(lambda: load_key(KeySource(env="SSEFS_FUZZ_KEY")), data)
    if len(data) == KEY_BYTES:
        assert isinstance(result, str)  # 32 raw bytes are never taken from a variable (too short for base64)


@FUZZ
@given(stdout=KEY_LIKE, stderr=st.binary(max_size=300), code=st.sampled_from([0, 0, 1, 2, 127, 255]))
def test_key_command_with_arbitrary_output(tmp_path: Path, stdout: bytes, stderr: bytes, code: int) -> None:
    write_file(tmp_path / "out", stdout)
    write_file(tmp_path / "err", stderr)
    command = f"cat '{tmp_path}/out'; cat '{tmp_path}/err' >&2; exit {code}"
    result = check_key_result(lambda: load_key(KeySource(command=command, command_timeout=30)), stdout)
    if code != 0:
        assert isinstance(result, str) and f"exit code {code}" in result


def test_huge_key_sources_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 MiB key file is not read whole; a 1 MiB variable or command output is refused without quoting it."""
    big = tmp_path / "big.key"
    with open(big, "wb") as handle:
        handle.truncate(64 * 2**20)
    os.chmod(big, 0o600)
    started = time.monotonic()
    with pytest.raises(KeyLoadError) as file_error:
        load_key(KeySource(file=big))
    assert time.monotonic() - started < 1
    assert_clean_error(file_error.value, KeyLoadError)
    assert "too large" in str(file_error.value)
    huge = base64.b64encode(secrets.token_bytes(3 * 2**19)).decode()  # 1 MiB of base64
    monkeypatch.setenv("SSEFS_FUZZ_KEY", huge)
    with pytest.raises(KeyLoadError) as env_error:
        load_key(KeySource(env="SSEFS_FUZZ_KEY"))
    assert len(assert_clean_error(env_error.value, KeyLoadError, [huge[:44]])) < 300
    monkeypatch.delenv("SSEFS_FUZZ_KEY")  # a 1 MiB variable is more than exec() passes to the command
    with pytest.raises(KeyLoadError) as command_error:
        load_key(KeySource(command="head -c 10000000 /dev/zero", command_timeout=30))
    assert "far too much" in assert_clean_error(command_error.value, KeyLoadError)


def test_key_sources_with_nul_characters_are_key_load_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    outcomes = {}
    for source in (KeySource(file=tmp_path / "a\x00b"), KeySource(credential="a\x00b"), KeySource(command="echo \x00")):
        try:
            load_key(source)
        except KeyLoadError:
            outcomes[source.describe()] = "KeyLoadError"
        except Exception as error:  # noqa: BLE001 - what else it raises is the finding
            outcomes[source.describe()] = type(error).__name__
    assert set(outcomes.values()) == {"KeyLoadError"}, outcomes


def test_failed_key_command_never_quotes_a_key_from_stderr() -> None:
    key = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()
    messages = []
    for command in (f"echo {key} >&2; exit 1", f"echo 'got key {key}' >&2; exit 3"):
        with pytest.raises(KeyLoadError) as caught:
            load_key(KeySource(command=command))
        messages.append(str(caught.value))
    assert not [message for message in messages if key in message]


def test_config_to_key_chain_with_fuzzed_key_files(tmp_path: Path) -> None:
    """The [key] file of a loaded config, relative to the config's directory, loads through load_key."""
    raw = secrets.token_bytes(KEY_BYTES)
    write_file(tmp_path / "mount.key", raw)
    write_file(tmp_path / "fuzz.toml", toml_document(BASE).encode())
    config = load_config(tmp_path / "fuzz.toml")
    assert load_key(config.key).sse_params() == sse_params(raw)
    write_file(tmp_path / "mount.key", raw, 0o644)
    with pytest.raises(KeyLoadError) as caught:
        load_key(config.key)
    assert_clean_error(caught.value, KeyLoadError, key_encodings(raw))


# ---------------------------------------------------------------------- odd objects in the bucket


def errno_of(call: Callable[[], Any]) -> int | None:
    try:
        call()
    except OSError as error:
        return error.errno
    return None


def lines_naming(log: str, name: str) -> list[str]:
    return [line for line in log.splitlines() if name in line]


@pytest.fixture
def odd_bucket(endpoint: SeaweedEndpoint, bucket: str, s3: Any, key_bytes: bytes) -> Iterator[dict[str, Any]]:
    """A bucket with ordinary files and odd objects; yields what the server did with each odd key."""
    sse = sse_params(key_bytes)
    normal = {
        "good/one.txt": b"one",
        "good/sub/two.bin": secrets.token_bytes(300_000),
        "top.txt": b"top",
    }
    for key, data in normal.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data, **sse)
    long_key = "long/" + "/".join(["s" * 203] * 5)  # 1024 bytes, S3's limit; every segment a legal name
    odd = {
        "a//b": b"double slash",
        "/leading": b"leading slash",
        "..": b"dot dot",
        ".": b"dot",
        "x/../y": b"dot dot segment",
        "x/./y": b"dot segment",
        "ctl/\x01one": b"control character",
        "ctl/new\nline": b"newline",
        "ctl/tab\tname": b"tab",
        "ctl/del\x7f": b"delete",
        long_key: b"long key",
        "seg/" + "s" * 300: b"300-byte segment",
        "back\\slash": b"backslash",
        "pct/%41%2F%00": b"percent sequences",
        "pct/%2e%2e": b"percent dots",
    }
    refused: dict[str, str] = {}
    for key, data in odd.items():
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=data, **sse)
        except botocore.exceptions.ClientError as error:
            refused[key] = error.response["Error"]["Code"]
    # Not readable with the mount's key: stored under another key, and stored without SSE-C.
    s3.put_object(Bucket=bucket, Key="bad/foreign.bin", Body=b"other key", **sse_params(secrets.token_bytes(32)))
    s3.put_object(Bucket=bucket, Key="bad/plain.bin", Body=b"no encryption")
    # Metadata that does not parse: the mount's defaults apply.
    for name, metadata in {
        "meta/mode-text": {"mode": "rwxr-xr-x"}, "meta/mode-huge": {"mode": "9" * 30},
        "meta/mtime-nan": {"mtime": "nan"}, "meta/mtime-inf": {"mtime": "1e400"},
        "meta/owner-text": {"uid": "root", "gid": "-1"}, "meta/xattrs-garbage": {"ssefs-xattrs": "not sealed"},
    }.items():
        s3.put_object(Bucket=bucket, Key=name, Body=b"meta", Metadata=metadata, **sse)
    # Directory attributes that cannot be used: garbage under our key, JSON without SSE-C.
    s3.put_object(Bucket=bucket, Key="attrs/.ssefs-dirs", Body=b"\x00 not json", **sse)
    s3.put_object(Bucket=bucket, Key="attrs/d/file", Body=b"in d", **sse)
    s3.put_object(Bucket=bucket, Key="plainattrs/.ssefs-dirs", Body=b'{"format": 1, "directories": {}}')
    s3.put_object(Bucket=bucket, Key="plainattrs/d/file", Body=b"in d", **sse)
    yield {"normal": normal, "odd": odd, "refused": refused, "long_key": long_key, "stored": keys(s3, bucket)}


@pytest.mark.fuse
def test_odd_objects_leave_the_rest_of_the_bucket_usable(
    odd_bucket: dict[str, Any], endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, mount_extra="skip_key_check = true"))
    mnt = mount.mountpoint
    stored: set[str] = odd_bucket["stored"]
    refused: dict[str, str] = odd_bucket["refused"]
    print("refused by the server:", {key[:30]: code for key, code in refused.items()})
    print("stored:", sorted(key[:40] for key in stored))

    # The whole tree can be walked and listed, and every listed name can be stat'ed.
    walked: dict[str, bytes | int | None] = {}
    for root, directories, files in os.walk(mnt, onerror=lambda error: walked.setdefault("walk error", error.errno)):
        for name in directories + files:
            path = Path(root) / name
            os.lstat(path)
            if name in files:
                try:
                    walked[str(path.relative_to(mnt))] = path.read_bytes()
                except OSError as error:
                    walked[str(path.relative_to(mnt))] = error.errno
    assert "walk error" not in walked
    listing = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert listing.stderr == b""

    # Ordinary files are untouched by their odd neighbours.
    for key, data in odd_bucket["normal"].items():
        assert walked[key] == data, key

    # Odd keys: whatever the server stored is shown byte for byte under a valid name, or hidden.
    for key, data in odd_bucket["odd"].items():
        if key in refused:
            continue
        segments = key.split("/")
        valid = all(segment not in ("", ".", "..") and len(segment.encode()) <= 255 for segment in segments)
        if key in stored and valid:
            assert walked[key] == data, key
    # SeaweedFS refuses "." and ".." segments and segments over 255 bytes; had it stored them, they must
    # not appear: nothing listed escapes its directory or has an over-long name.
    for name in walked:
        assert not {".", ".."} & set(name.split("/")), name
        assert all(len(part.encode()) <= 255 for part in name.split("/")), name
    assert walked.get("ctl/\x01one") == b"control character" or "ctl/\x01one" not in stored
    assert walked.get("ctl/new\nline") == b"newline" or "ctl/new\nline" not in stored
    assert walked.get("pct/%41%2F%00") == b"percent sequences" or "pct/%41%2F%00" not in stored
    assert walked[odd_bucket["long_key"]] == b"long key"
    # Names the kernel or ssefs refuses: a clean errno, never a crash.
    assert errno_of(lambda: os.stat(mnt / "good" / ("s" * 300))) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.stat(mnt / "seg" / ("s" * 300))) in (errno.ENAMETOOLONG, errno.ENOENT)
    assert errno_of(lambda: os.stat(mnt / "back\\slash")) == errno.ENOENT  # a name with "\" cannot be a key
    assert errno_of(lambda: open(mnt / "pct" / "new\\name", "wb")) == errno.EINVAL

    # Unreadable objects: listed with their size, reads fail with EACCES (other key) or EIO (no SSE-C).
    assert os.stat(mnt / "bad/foreign.bin").st_size == len(b"other key")
    assert walked["bad/foreign.bin"] == errno.EACCES
    assert walked["bad/plain.bin"] == errno.EIO
    # Metadata that does not parse: the mount's defaults.
    for name in ("mode-text", "mode-huge", "mtime-nan", "mtime-inf", "owner-text", "xattrs-garbage"):
        info = os.stat(mnt / "meta" / name)
        assert (info.st_mode, info.st_uid, info.st_gid, info.st_size) == (0o100644, os.getuid(), os.getgid(), 4), name
        assert math.isfinite(info.st_mtime) and info.st_mtime > 1e9, name
        assert walked[f"meta/{name}"] == b"meta"
    assert errno_of(lambda: os.listxattr(mnt / "meta/xattrs-garbage")) == errno.EIO
    # Directory attributes that cannot be used: the directories show the defaults.
    for directory in ("attrs/d", "plainattrs/d"):
        assert os.stat(mnt / directory).st_mode == 0o40755
        assert walked[f"{directory}/file"] == b"in d"

    # The daemon still serves, and writes still work.
    assert mount.process.poll() is None
    (mnt / "good/new.txt").write_bytes(b"new")
    assert (mnt / "good/new.txt").read_bytes() == b"new"
    assert mount.stop() == 0


@pytest.mark.fuse
def test_unreadable_objects_are_logged_once(
    odd_bucket: dict[str, Any], endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    """Reading an object under another key, or without SSE-C, three times, listing twice: one line each."""
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, mount_extra="skip_key_check = true"))
    mnt = mount.mountpoint
    for _round in range(2):
        subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, timeout=120, check=True)
        for _read in range(3):
            assert errno_of((mnt / "bad/foreign.bin").read_bytes) == errno.EACCES
            assert errno_of((mnt / "bad/plain.bin").read_bytes) == errno.EIO
        time.sleep(1.5)  # past attr_timeout: the next round lists and looks up again
    log = mount.log()
    print("\n".join(lines_naming(log, "bad/")))
    assert len(lines_naming(log, "foreign.bin")) == 1, log
    assert len(lines_naming(log, "plain.bin")) == 1, log
    assert mount.stop() == 0


@pytest.mark.fuse
def test_objects_whose_attributes_cannot_be_read_are_asked_once(
    odd_bucket: dict[str, Any], endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    """A listing HEADs an object under another key (or without SSE-C) once, not at every listing."""
    mount = mount_ssefs(
        write_config(tmp_path, endpoint, bucket, key_file, mount_extra="skip_key_check = true"),
        None, "--log-level", "debug",
    )
    for _round in range(3):
        subprocess.run(["ls", "-l", str(mount.mountpoint / "bad")], capture_output=True, timeout=120, check=True)
        time.sleep(1.5)  # past attr_timeout: the next round lists again
    log = mount.log()
    for name in ("bad/foreign.bin", "bad/plain.bin"):
        asked = [line for line in lines_naming(log, name) if "no attributes for" in line]
        assert len(asked) == 1, "\n".join(asked)
    assert mount.stop() == 0


@pytest.mark.fuse
def test_unreadable_directory_attributes_are_logged_once(
    odd_bucket: dict[str, Any], endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, mount_extra="skip_key_check = true"))
    for _round in range(3):
        assert os.listdir(mount.mountpoint / "plainattrs") == ["d"]  # stored without SSE-C
        assert os.listdir(mount.mountpoint / "attrs") == ["d"]  # not JSON
        time.sleep(1.5)
    log = mount.log()
    assert len(lines_naming(log, "'plainattrs/.ssefs-dirs'")) == 1, log
    assert len(lines_naming(log, "'attrs/.ssefs-dirs'")) == 1, log


@pytest.mark.fuse
def test_unopenable_extended_attributes_are_logged(
    odd_bucket: dict[str, Any], endpoint: SeaweedEndpoint, bucket: str, key_file: Path, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, mount_extra="skip_key_check = true"))
    assert errno_of(lambda: os.listxattr(mount.mountpoint / "meta/xattrs-garbage")) == errno.EIO
    assert len(lines_naming(mount.log(), "xattrs-garbage")) == 1, mount.log()
