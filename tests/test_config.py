"""Tests for ssefs.config: load_config, parse_size and the messages of ConfigError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ssefs.config import (
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    Config,
    KeySource,
    MiB,
    load_config,
    parse_size,
)
from ssefs.errors import ConfigError, SsefsError

GiB = 1024 * MiB

MINIMAL = """
[s3]
endpoint = "https://s3.example.com"
bucket = "my-bucket"

[key]
file = "mount.key"
"""


def write_config(tmp_path: Path, text: str, *, name: str = "mount.toml", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def config_with(tmp_path: Path, *, s3: str = "", key: str = 'file = "mount.key"', extra: str = "") -> Config:
    text = f"""
[s3]
endpoint = "https://s3.example.com"
bucket = "my-bucket"
{s3}

[key]
{key}

{extra}
"""
    return load_config(write_config(tmp_path, text))


def refused(tmp_path: Path, *, s3: str = "", key: str = 'file = "mount.key"', extra: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        config_with(tmp_path, s3=s3, key=key, extra=extra)
    return str(info.value)


# ------------------------------------------------------------------ minimal / defaults


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    config = load_config(path)

    assert config.path == path
    assert config.name == "mount"
    assert config.s3.endpoint == "https://s3.example.com"
    assert config.s3.bucket == "my-bucket"
    assert config.s3.region == "us-east-1"
    assert config.s3.prefix == ""
    assert config.key_prefix == ""
    assert config.s3.ca_bundle is None
    assert config.s3.allow_insecure_http is False
    assert config.s3.profile is None
    assert config.s3.access_key_id is None
    assert config.s3.secret_access_key is None
    assert config.s3.addressing_style == "path"
    assert config.s3.max_connections == 16
    assert config.s3.multipart_threshold == 16 * MiB
    assert config.s3.part_size == 8 * MiB
    assert config.s3.upload_concurrency == 4
    assert config.s3.connect_timeout == 5.0
    assert config.s3.read_timeout == 60.0
    assert config.s3.max_attempts == 4

    assert config.key == KeySource(file=tmp_path / "mount.key")
    assert config.key.describe() == f"key file {tmp_path / 'mount.key'}"

    assert config.cache.max_size == 10 * GiB
    assert config.cache.fsync_on_close is False
    assert config.cache.dir.name == "mount"
    assert config.cache.dir.is_absolute()

    assert config.mount.uid == os.getuid()
    assert config.mount.gid == os.getgid()
    assert config.mount.file_mode == 0o644
    assert config.mount.dir_mode == 0o755
    assert config.mount.allow_other is False
    assert config.mount.read_only is False
    assert config.mount.attr_timeout == 5.0
    assert config.mount.skip_key_check is False
    assert config.mount.read_ahead == 4 * 1024 * 1024


def test_config_name_is_the_file_stem(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL, name="backups.toml"))
    assert config.name == "backups"


def test_default_cache_dir_uses_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = load_config(write_config(tmp_path, MINIMAL))
    assert config.cache.dir == tmp_path / "xdg" / "ssefs" / "mount"


def test_default_cache_dir_without_xdg_is_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write_config(tmp_path, MINIMAL))
    assert config.cache.dir == tmp_path / "home" / ".cache" / "ssefs" / "mount"


def test_default_cache_dir_for_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    config = load_config(write_config(tmp_path, MINIMAL))
    assert config.cache.dir == Path("/var/cache/ssefs/mount")


def test_trailing_slash_of_endpoint_is_dropped(tmp_path: Path) -> None:
    text = MINIMAL.replace('"https://s3.example.com"', '"https://s3.example.com:9000/"')
    config = load_config(write_config(tmp_path, text))
    assert config.s3.endpoint == "https://s3.example.com:9000"


def test_all_settings_are_read(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = config_with(
        tmp_path,
        s3="""
region = "eu-west-3"
prefix = "backups/daily"
ca_bundle = "ca.pem"
profile = "work"
addressing_style = "virtual"
max_connections = 32
multipart_threshold = "64MiB"
part_size = "16MiB"
upload_concurrency = 8
connect_timeout = 2
read_timeout = 30.5
max_attempts = 7
""",
        extra="""
[cache]
dir = "cache"
max_size = "512MiB"
fsync_on_close = true

[mount]
uid = 1234
gid = 5678
file_mode = "0640"
dir_mode = "0750"
allow_other = true
read_only = true
attr_timeout = 0
skip_key_check = true
""",
    )
    assert config.s3.region == "eu-west-3"
    assert config.s3.prefix == "backups/daily/"
    assert config.s3.ca_bundle == tmp_path / "ca.pem"
    assert config.s3.profile == "work"
    assert config.s3.addressing_style == "virtual"
    assert config.s3.max_connections == 32
    assert config.s3.multipart_threshold == 64 * MiB
    assert config.s3.part_size == 16 * MiB
    assert config.s3.upload_concurrency == 8
    assert config.s3.connect_timeout == 2.0
    assert isinstance(config.s3.connect_timeout, float)
    assert config.s3.read_timeout == 30.5
    assert config.s3.max_attempts == 7
    assert config.cache.dir == tmp_path / "cache"
    assert config.cache.max_size == 512 * MiB
    assert config.cache.fsync_on_close is True
    assert config.mount.uid == 1234
    assert config.mount.gid == 5678
    assert config.mount.file_mode == 0o640
    assert config.mount.dir_mode == 0o750
    assert config.mount.allow_other is True
    assert config.mount.read_only is True
    assert config.mount.attr_timeout == 0.0
    assert config.mount.skip_key_check is True


# ------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc" / "ssefs"
    conf_dir.mkdir(parents=True)
    (conf_dir / "certs").mkdir()
    (conf_dir / "certs" / "ca.pem").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The working directory must not matter.
    monkeypatch.chdir(elsewhere)
    path = write_config(
        conf_dir,
        """
[s3]
endpoint = "https://s3.example.com"
bucket = "my-bucket"
ca_bundle = "certs/ca.pem"

[key]
file = "keys/mount.key"

[cache]
dir = "../cache/mount"
""",
    )
    config = load_config(path)
    assert config.key.file == conf_dir / "keys" / "mount.key"
    assert config.s3.ca_bundle == conf_dir / "certs" / "ca.pem"
    assert config.cache.dir == conf_dir / "../cache/mount"
    assert config.cache.dir.resolve() == (tmp_path / "etc" / "cache" / "mount").resolve()


def test_relative_config_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load_config("mount.toml")
    assert config.path.is_absolute()
    assert config.path == tmp_path / "mount.toml"
    assert config.key.file == tmp_path / "mount.key"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = config_with(tmp_path, key='file = "/srv/keys/k.bin"', extra='[cache]\ndir = "/var/tmp/ssefs-c"')
    assert config.key.file == Path("/srv/keys/k.bin")
    assert config.cache.dir == Path("/var/tmp/ssefs-c")


def test_missing_ca_bundle_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, s3='ca_bundle = "nope.pem"')
    assert "ca_bundle" in message
    assert str(tmp_path / "nope.pem") in message


# ------------------------------------------------------------------ prefix


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", ""),
        ("/", ""),
        ("a", "a/"),
        ("a/b", "a/b/"),
        ("a/b/", "a/b/"),
        ("/a/b/", "a/b/"),
        ("photos 2024/raw", "photos 2024/raw/"),
    ],
)
def test_prefix_normalisation(tmp_path: Path, given: str, expected: str) -> None:
    config = config_with(tmp_path, s3=f'prefix = "{given}"')
    assert config.s3.prefix == expected
    assert config.key_prefix == expected


@pytest.mark.parametrize("bad", ["a//b", "a\\\\b"])
def test_prefix_with_double_slash_or_backslash_refused(tmp_path: Path, bad: str) -> None:
    assert "prefix" in refused(tmp_path, s3=f'prefix = "{bad}"')


# ------------------------------------------------------------------ endpoint


def test_http_endpoint_refused_by_default(tmp_path: Path) -> None:
    text = MINIMAL.replace("https://", "http://")
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "clear text" in message
    assert "allow_insecure_http" in message
    assert str(path) in message


def test_http_endpoint_refused_when_explicitly_false(tmp_path: Path) -> None:
    text = MINIMAL.replace("https://", "http://").replace("[key]", "allow_insecure_http = false\n\n[key]")
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        load_config(write_config(tmp_path, text))


def test_http_endpoint_allowed_with_allow_insecure_http(tmp_path: Path) -> None:
    text = MINIMAL.replace("https://s3.example.com", "http://127.0.0.1:8333").replace(
        "[key]", "allow_insecure_http = true\n\n[key]"
    )
    config = load_config(write_config(tmp_path, text))
    assert config.s3.endpoint == "http://127.0.0.1:8333"
    assert config.s3.allow_insecure_http is True


def test_https_endpoint_with_allow_insecure_http_still_fine(tmp_path: Path) -> None:
    config = config_with(tmp_path, s3="allow_insecure_http = true")
    assert config.s3.endpoint.startswith("https://")


@pytest.mark.parametrize("endpoint", [
    "s3.example.com", "ftp://s3.example.com", "https://", "", "file:///tmp/x",
    "https://s3.example.com:99999", "https://s3.example.com:port", "https://:443",
])
def test_endpoint_must_be_a_url(tmp_path: Path, endpoint: str) -> None:
    text = MINIMAL.replace('"https://s3.example.com"', f'"{endpoint}"')
    with pytest.raises(ConfigError, match="endpoint"):
        load_config(write_config(tmp_path, text))


def test_endpoint_required(tmp_path: Path) -> None:
    text = '[s3]\nbucket = "my-bucket"\n\n[key]\nfile = "k"\n'
    with pytest.raises(ConfigError, match=r"\[s3\] endpoint is required"):
        load_config(write_config(tmp_path, text))


def test_bucket_required(tmp_path: Path) -> None:
    text = '[s3]\nendpoint = "https://s3.example.com"\n\n[key]\nfile = "k"\n'
    with pytest.raises(ConfigError, match=r"\[s3\] bucket is required"):
        load_config(write_config(tmp_path, text))


def test_missing_s3_section_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="endpoint"):
        load_config(write_config(tmp_path, '[key]\nfile = "k"\n'))


# ------------------------------------------------------------------ unknown names and types


def test_unknown_section_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, extra="[s4]\nfoo = 1")
    assert "unknown section" in message
    assert "s4" in message


def test_unknown_top_level_key_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'name = "x"\n' + MINIMAL)
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path)


@pytest.mark.parametrize(
    ("s3", "key", "extra", "section", "typo"),
    [
        ('regoin = "eu-west-1"', 'file = "k"', "", "s3", "regoin"),
        ("", 'file = "k"\nfiles = "k2"', "", "key", "files"),
        ("", 'file = "k"', '[cache]\nmaxsize = "1GiB"', "cache", "maxsize"),
        ("", 'file = "k"', "[mount]\nreadonly = true", "mount", "readonly"),
    ],
)
def test_unknown_key_refused(tmp_path: Path, s3: str, key: str, extra: str, section: str, typo: str) -> None:
    message = refused(tmp_path, s3=s3, key=key, extra=extra)
    assert f"[{section}]" in message
    assert "unknown setting" in message
    assert typo in message


def test_section_that_is_not_a_table_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'cache = "x"\n' + MINIMAL)
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(path)


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("bucket = 5", "bucket"),
        ('allow_insecure_http = "yes"', "allow_insecure_http"),
        ("max_connections = true", "max_connections"),
        ('max_connections = "16"', "max_connections"),
        ("max_connections = 1.5", "max_connections"),
        ("upload_concurrency = false", "upload_concurrency"),
        ("connect_timeout = true", "connect_timeout"),
        ('read_timeout = "60"', "read_timeout"),
        ("region = 1", "region"),
        ("part_size = true", "part_size"),
        ("part_size = 8.5", "part_size"),
        ("prefix = []", "prefix"),
    ],
)
def test_wrong_types_in_s3_refused(tmp_path: Path, setting: str, where: str) -> None:
    # bucket is given twice in TOML if we appended; build the document by hand.
    lines = ['endpoint = "https://s3.example.com"']
    if not setting.startswith("bucket"):
        lines.append('bucket = "my-bucket"')
    lines.append(setting)
    text = "[s3]\n" + "\n".join(lines) + '\n\n[key]\nfile = "k"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    assert where in str(info.value)


@pytest.mark.parametrize(
    "mount_setting",
    ['uid = "1000"', "uid = true", "allow_other = 1", 'read_only = "no"', "file_mode = true", "attr_timeout = false"],
)
def test_wrong_types_in_mount_refused(tmp_path: Path, mount_setting: str) -> None:
    name = mount_setting.split(" ")[0]
    message = refused(tmp_path, extra=f"[mount]\n{mount_setting}")
    assert f"[mount] {name}" in message


def test_bool_message_is_clear(tmp_path: Path) -> None:
    message = refused(tmp_path, s3="max_connections = true")
    assert "whole number" in message
    assert "True" in message


@pytest.mark.parametrize("setting", ["max_connections = 0", "upload_concurrency = -1", "max_attempts = 0"])
def test_counts_must_be_positive(tmp_path: Path, setting: str) -> None:
    assert "at least 1" in refused(tmp_path, s3=setting)


@pytest.mark.parametrize("setting", ["connect_timeout = 0", "read_timeout = -1.0"])
def test_timeouts_must_be_positive(tmp_path: Path, setting: str) -> None:
    assert "positive" in refused(tmp_path, s3=setting)


def test_attr_timeout_may_be_zero_but_not_negative(tmp_path: Path) -> None:
    assert config_with(tmp_path, extra="[mount]\nattr_timeout = 0.0").mount.attr_timeout == 0.0
    assert "attr_timeout" in refused(tmp_path, extra="[mount]\nattr_timeout = -0.5")


def test_read_ahead_is_a_size_up_to_1gib(tmp_path: Path) -> None:
    assert config_with(tmp_path, extra='[mount]\nread_ahead = "16MiB"').mount.read_ahead == 16 * 1024 * 1024
    assert config_with(tmp_path, extra="[mount]\nread_ahead = 0").mount.read_ahead == 0
    assert "read_ahead" in refused(tmp_path, extra='[mount]\nread_ahead = "2GiB"')
    assert "read_ahead" in refused(tmp_path, extra='[mount]\nread_ahead = "lots"')


def test_addressing_style_checked(tmp_path: Path) -> None:
    assert config_with(tmp_path, s3='addressing_style = "auto"').s3.addressing_style == "auto"
    assert "addressing_style" in refused(tmp_path, s3='addressing_style = "host"')


# ------------------------------------------------------------------ [key]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ('file = "k.bin"', "file"),
        ('env = "SSEFS_KEY"', "env"),
        ('credential = "ssefs-key"', "credential"),
    ],
)
def test_key_exactly_one_source(tmp_path: Path, key: str, expected: str) -> None:
    source = config_with(tmp_path, key=key).key
    values = {"file": source.file, "env": source.env, "credential": source.credential}
    assert values[expected] is not None
    assert [name for name, value in values.items() if value is not None] == [expected]
    if expected == "env":
        assert source.env == "SSEFS_KEY"
        assert source.describe() == "environment variable SSEFS_KEY"
    if expected == "credential":
        assert source.credential == "ssefs-key"
        assert source.describe() == "systemd credential ssefs-key"


def test_key_with_no_source_refused(tmp_path: Path) -> None:
    assert "exactly one of" in refused(tmp_path, key="")


def test_missing_key_section_refused(tmp_path: Path) -> None:
    text = '[s3]\nendpoint = "https://s3.example.com"\nbucket = "my-bucket"\n'
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(write_config(tmp_path, text))


@pytest.mark.parametrize(
    "key",
    [
        'file = "k"\nenv = "SSEFS_KEY"',
        'file = "k"\ncredential = "c"',
        'env = "SSEFS_KEY"\ncredential = "c"',
        'file = "k"\nenv = "SSEFS_KEY"\ncredential = "c"',
    ],
)
def test_key_with_two_sources_refused(tmp_path: Path, key: str) -> None:
    assert "exactly one of" in refused(tmp_path, key=key)


@pytest.mark.parametrize("key", ['file = ""', 'env = ""', 'credential = ""'])
def test_key_source_must_not_be_empty(tmp_path: Path, key: str) -> None:
    # An empty value must not count as "the one source": it would leave the key
    # source pointing nowhere (or at $CREDENTIALS_DIRECTORY itself).
    assert "[key]" in refused(tmp_path, key=key)


@pytest.mark.parametrize("credential", ["a/b", "/etc/key", "../key", ".", ".."])
def test_credential_must_be_a_plain_name(tmp_path: Path, credential: str) -> None:
    assert "credential" in refused(tmp_path, key=f'credential = "{credential}"')


def test_key_source_wrong_type_refused(tmp_path: Path) -> None:
    assert "[key] file" in refused(tmp_path, key="file = 5")


# ------------------------------------------------------------------ S3 credentials


def test_access_key_without_secret_refused(tmp_path: Path) -> None:
    assert "together" in refused(tmp_path, s3='access_key_id = "AKIA123"')


def test_secret_without_access_key_refused(tmp_path: Path) -> None:
    assert "together" in refused(tmp_path, s3='secret_access_key = "s3cr3t"')


def test_secret_in_world_readable_config_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("[key]", 'access_key_id = "AKIA123"\nsecret_access_key = "s3cr3t-value"\n\n[key]')
    path = write_config(tmp_path, text, mode=0o644)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "secret_access_key" in message
    assert f"chmod 600 {path}" in message
    assert "s3cr3t-value" not in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o610])
def test_secret_in_group_or_other_accessible_config_refused(tmp_path: Path, mode: int) -> None:
    text = MINIMAL.replace("[key]", 'access_key_id = "AKIA123"\nsecret_access_key = "s3cr3t-value"\n\n[key]')
    with pytest.raises(ConfigError, match="secret_access_key"):
        load_config(write_config(tmp_path, text, mode=mode))


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_secret_in_private_config_accepted(tmp_path: Path, mode: int) -> None:
    text = MINIMAL.replace("[key]", 'access_key_id = "AKIA123"\nsecret_access_key = "s3cr3t-value"\n\n[key]')
    config = load_config(write_config(tmp_path, text, mode=mode))
    assert config.s3.access_key_id == "AKIA123"
    assert config.s3.secret_access_key == "s3cr3t-value"
    # The secret is kept out of the dataclass repr.
    assert "s3cr3t-value" not in repr(config.s3)
    assert "s3cr3t-value" not in repr(config)


def test_world_readable_config_without_secret_is_fine(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL, mode=0o644))
    assert config.s3.bucket == "my-bucket"


# ------------------------------------------------------------------ file-level errors


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[s3]\nendpoint = "https://x\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)


def test_duplicate_key_is_malformed_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + '\n[s3]\nregion = "x"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.encode() + b"\n# caf\xe9\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "UTF-8" in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.toml"
    path.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_validation_errors_name_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL.replace("my-bucket", "My_Bucket"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_config_error_is_an_ssefs_error_with_einval(tmp_path: Path) -> None:
    import errno

    with pytest.raises(SsefsError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.errno == errno.EINVAL


# ------------------------------------------------------------------ bucket names


@pytest.mark.parametrize("bucket", ["abc", "my-bucket", "my.bucket.2024", "a" * 63, "0bucket9", "my_bucket"])
def test_valid_bucket_names(tmp_path: Path, bucket: str) -> None:
    text = MINIMAL.replace('"my-bucket"', f'"{bucket}"')
    assert load_config(write_config(tmp_path, text)).s3.bucket == bucket


@pytest.mark.parametrize(
    "bucket", ["", "ab", "a" * 64, "MyBucket", "-bucket", "bucket-", "my bucket", "bucket/name", "bücket", ".bucket"]
)
def test_invalid_bucket_names(tmp_path: Path, bucket: str) -> None:
    text = MINIMAL.replace('"my-bucket"', f'"{bucket}"')
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    assert "bucket" in str(info.value)
    assert "not a valid bucket name" in str(info.value)


# ------------------------------------------------------------------ part sizes


@pytest.mark.parametrize("size", ["4MiB", 5 * MiB - 1, "5MB", 0, "6GiB"])
def test_part_size_outside_s3_limits_refused(tmp_path: Path, size: str | int) -> None:
    value = f'"{size}"' if isinstance(size, str) else str(size)
    message = refused(tmp_path, s3=f"part_size = {value}")
    assert "part_size" in message
    assert "5MiB" in message


@pytest.mark.parametrize(("size", "expected"), [("5MiB", MIN_PART_SIZE), ("5GiB", MAX_PART_SIZE), (6 * MiB, 6 * MiB)])
def test_part_size_limits_are_inclusive(tmp_path: Path, size: str | int, expected: int) -> None:
    value = f'"{size}"' if isinstance(size, str) else str(size)
    assert config_with(tmp_path, s3=f"part_size = {value}").s3.part_size == expected


@pytest.mark.parametrize("size", ['"1MiB"', '"257MiB"', '"6GiB"'])
def test_multipart_threshold_outside_limits_refused(tmp_path: Path, size: str) -> None:
    assert "multipart_threshold" in refused(tmp_path, s3=f"multipart_threshold = {size}")


@pytest.mark.parametrize("size", ['"ten"', '"-1"', "true", "-1", '"10 XB"', "1.5"])
def test_bad_cache_size_refused(tmp_path: Path, size: str) -> None:
    assert "[cache] max_size" in refused(tmp_path, extra=f"[cache]\nmax_size = {size}")


# ------------------------------------------------------------------ modes


@pytest.mark.parametrize(
    ("given", "expected"),
    [('"0750"', 0o750), ('"750"', 0o750), ('"0600"', 0o600), ('"2775"', 0o2775)],
)
def test_modes(tmp_path: Path, given: str, expected: int) -> None:
    config = config_with(tmp_path, extra=f"[mount]\ndir_mode = {given}\nfile_mode = {given}")
    assert config.mount.dir_mode == expected
    assert config.mount.file_mode == expected


@pytest.mark.parametrize("given", ['"0789"', '"rwxr-x---"', '""', '"17777"', "-1", "65536", "644", "0o644"])
def test_bad_modes_refused(tmp_path: Path, given: str) -> None:
    assert "[mount] file_mode" in refused(tmp_path, extra=f"[mount]\nfile_mode = {given}")


@pytest.mark.parametrize("given", ["644", "0o644"])
def test_integer_modes_refused_with_the_string_form_suggested(tmp_path: Path, given: str) -> None:
    assert 'file_mode = "0644"' in refused(tmp_path, extra=f"[mount]\nfile_mode = {given}")


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_negative_ids_refused(tmp_path: Path, field: str) -> None:
    assert f"[mount] {field}" in refused(tmp_path, extra=f"[mount]\n{field} = -5")


# ------------------------------------------------------------------ parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1048576, MiB),
        ("1048576", MiB),
        ("10GiB", 10 * GiB),
        ("512MiB", 512 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5MiB", MiB // 2),
        ("10 GB", 10 * 1000**3),
        ("  64mib  ", 64 * MiB),
        ("64MIB", 64 * MiB),
        ("1TB", 1000**4),
        ("2TiB", 2 * 1024**4),
        ("100k", 100_000),
        ("100KiB", 102_400),
        ("7b", 7),
        ("3m", 3_000_000),
        ("2g", 2_000_000_000),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    result = parse_size(value, what="size")
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value", ["ten", "-1", "-1MiB", "", "   ", "1.5.5GiB", "10 PiB", "GiB", "1e9", "10GiBs", "1,000", ".5GiB"]
)
def test_parse_size_refuses_bad_strings(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, what="[cache] max_size")
    message = str(info.value)
    assert message.startswith("[cache] max_size:")
    assert repr(value) in message


@pytest.mark.parametrize("value", [True, False, None, 1.5, [1], {"a": 1}])
def test_parse_size_refuses_non_sizes(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^what: expected a size"):
        parse_size(value, what="what")


def test_parse_size_refuses_negative_int() -> None:
    with pytest.raises(ConfigError, match="negative"):
        parse_size(-1, what="x")


# ------------------------------------------------------------------ key command and previous keys


def test_key_command_source(tmp_path: Path) -> None:
    config = config_with(tmp_path, key='command = "pass show ssefs/photos"\ncommand_timeout = 5')
    assert config.key.command == "pass show ssefs/photos"
    assert config.key.command_timeout == 5.0
    assert config.key.describe() == "key command"


def test_command_timeout_without_command_refused(tmp_path: Path) -> None:
    assert "command_timeout only applies" in refused(tmp_path, key='file = "k"\ncommand_timeout = 5')


def test_key_command_must_not_be_blank(tmp_path: Path) -> None:
    assert "must not be empty" in refused(tmp_path, key='command = "  "')


def test_previous_keys(tmp_path: Path) -> None:
    config = config_with(
        tmp_path, key='file = "new.key"\nprevious_keys = [{ file = "old.key" }, { credential = "older" }]'
    )
    assert config.previous_keys == (KeySource(file=tmp_path / "old.key"), KeySource(credential="older"))


def test_no_previous_keys_by_default(tmp_path: Path) -> None:
    assert config_with(tmp_path).previous_keys == ()


@pytest.mark.parametrize(
    ("previous", "expected"),
    [
        ('previous_keys = "old.key"', "previous_keys: expected list"),
        ("previous_keys = [{}]", "[key.previous_keys[0]] needs exactly one of"),
        ('previous_keys = [{ file = "a", env = "B" }]', "[key.previous_keys[0]] needs exactly one of"),
        ('previous_keys = [{ file = "a", colour = "red" }]', "[key.previous_keys[0]] unknown setting(s): colour"),
        ('previous_keys = ["old.key"]', "[key.previous_keys[0]] must be a table"),
    ],
)
def test_bad_previous_keys_refused(tmp_path: Path, previous: str, expected: str) -> None:
    assert expected in refused(tmp_path, key=f'file = "k"\n{previous}')
