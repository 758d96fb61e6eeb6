"""``mount -t fuse.ssefs`` and ``/etc/fstab``: ssefs as a mount(8) helper (``ssefs.mounthelper``).

mount(8) runs fuse3's ``mount.fuse3``, which runs ``ssefs CONFIG MOUNTPOINT -o
OPTIONS`` through ``/bin/sh``. mount(8) drops PATH from the helper's
environment, so the shell finds ``ssefs`` only in its default path
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin): these tests link
this checkout's console script into /usr/local/sbin for as long as they run,
unless ``ssefs`` there is already this one.

Every test mounts for real through mount(8), checks what the mount shows and
what the server holds, and unmounts with umount(8) (or, on failure, always in
``finally``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ssefs.mount import state_file
from ssefs.mounthelper import HelperRequest, OptionError, is_helper_form, parse_helper_arguments
from ssefs.seaweed import SeaweedEndpoint

from .conftest import assert_log_clean, is_mounted, server_bytes, sse_params, unmount, write_config
from .test_readonly import bucket_snapshot

SH_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV_SSEFS = Path(sys.executable).parent / "ssefs"
LINK = Path("/usr/local/sbin/ssefs")
LINK_LOCK = Path("/run/lock/ssefs-tests-mount-helper.lock")
NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of a FUSE type needs root here")


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def ssefs_on_mount_path() -> Iterator[None]:
    """Make ``ssefs`` on /bin/sh's default path this checkout's console script, for this module."""
    assert VENV_SSEFS.exists(), f"{VENV_SSEFS} is missing: run .venv/bin/pip install -e ."
    found = shutil.which("ssefs", path=SH_DEFAULT_PATH)
    if found is not None and Path(found).resolve() == VENV_SSEFS.resolve():
        yield
        return
    if LINK.exists() or LINK.is_symlink():
        if LINK.resolve() != VENV_SSEFS.resolve():
            pytest.skip(f"{LINK} is another ssefs; mount(8) would run that one")
    LINK_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LINK_LOCK, "a") as lock:
        # Shared while in use; the last run to finish (an exclusive lock) removes the link.
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            os.symlink(VENV_SSEFS, LINK)
        except FileExistsError:
            assert LINK.resolve() == VENV_SSEFS.resolve()
        try:
            yield
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another run still uses it and removes it when done
            else:
                if LINK.is_symlink() and LINK.resolve() == VENV_SSEFS.resolve():
                    LINK.unlink()


@pytest.fixture
def public_mountpoint() -> Iterator[Path]:
    """A mount point other users can reach (pytest's tmp_path is in a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="ssefs-mnt-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        if not is_mounted(path):
            path.rmdir()


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def mount_entry(mountpoint: Path) -> tuple[set[str], str, str, set[str]]:
    """Per-mount options, file system type, source and super-block options from mountinfo."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == str(mountpoint):
                fstype, source, super_options = fields[fields.index("-") + 1:][:3]
                return set(fields[5].split(",")), fstype, source, set(super_options.split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def daemon_pid(mountpoint: Path) -> int:
    return int(json.loads(state_file(mountpoint).read_text())["pid"])


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"daemon {pid} did not exit"
        time.sleep(0.05)


def umount_and_wait(mountpoint: Path) -> None:
    """umount(8), as a user would, then wait until the daemon has uploaded what was left and exited."""
    pid = daemon_pid(mountpoint)
    result = run("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    wait_gone(pid)
    assert not is_mounted(mountpoint)


class Cleanup:
    """Always unmount what a test mounted, and reap its daemon, even when the test fails."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.pid: int | None = None

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.pid = daemon_pid(self.mountpoint)
        except (OSError, ValueError, KeyError):
            pass
        unmount(self.mountpoint)
        if self.pid is not None and not gone(self.pid):
            try:
                wait_gone(self.pid, 60)
            except AssertionError:
                os.kill(self.pid, 9)  # our own daemon, stuck: do not leave it behind


def daemon_log(config_dir: Path) -> str:
    """The log of a helper-started daemon: ``--background`` logs to CACHE_DIR/ssefs.log."""
    path = config_dir / "mount-cache" / "ssefs.log"
    return path.read_text(errors="replace") if path.exists() else ""


def ssefs_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ssefs:")]


# ------------------------------------------------------------------ through mount(8)


@needs_root
@pytest.mark.fuse
def test_mount_t_fuse_ssefs_serves_files_until_umount(
    ssefs_on_mount_path: None, config_file: Path, tmp_path: Path, public_mountpoint: Path, s3: Any, bucket: str,
    key_bytes: bytes,
) -> None:
    s3.put_object(Bucket=bucket, Key="existing.txt", Body=b"from before", **sse_params(key_bytes))
    mountpoint = public_mountpoint
    with Cleanup(mountpoint):
        result = run("mount", "-t", "fuse.ssefs", str(config_file), str(mountpoint))
        assert result.returncode == 0, result.stderr
        # mount(8) returned: the mount already serves, with no wait.
        assert os.listdir(mountpoint) == ["existing.txt"]
        assert (mountpoint / "existing.txt").read_bytes() == b"from before"
        options, fstype, source, super_options = mount_entry(mountpoint)
        assert (fstype, source) == ("fuse.ssefs", f"ssefs:{bucket}")
        # mount.fuse3 asks for "dev,suid"; ssefs mounts nodev,nosuid all the same.
        assert {"rw", "nodev", "nosuid"} <= options
        assert "noexec" not in options and "allow_other" not in super_options
        # Without allow_other, no other user gets in (the mount point itself is open to all).
        denied = run(*NOBODY, "cat", str(mountpoint / "existing.txt"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert run(*NOBODY, "stat", str(mountpoint.parent)).returncode == 0

        (mountpoint / "new.txt").write_bytes(b"written through mount -t fuse.ssefs")
        script = mountpoint / "script.sh"
        script.write_text("#!/bin/sh\necho executed\n")
        script.chmod(0o755)
        assert run(str(script)).stdout == "executed\n"  # exec is allowed unless noexec is asked for
        umount_and_wait(mountpoint)
    assert server_bytes(s3, bucket, "new.txt", key_bytes) == b"written through mount -t fuse.ssefs"
    assert_log_clean(daemon_log(tmp_path), [key_bytes])


@needs_root
@pytest.mark.fuse
def test_mount_o_ro_refuses_writes_and_sends_nothing(
    ssefs_on_mount_path: None, config_file: Path, tmp_path: Path, s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    s3.put_object(Bucket=bucket, Key="existing.txt", Body=b"from before", **sse_params(key_bytes))
    before = bucket_snapshot(s3, bucket, key_bytes)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with Cleanup(mountpoint):
        result = run("mount", "-t", "fuse.ssefs", "-o", "ro", str(config_file), str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert (mountpoint / "existing.txt").read_bytes() == b"from before"
        assert "ro" in mount_entry(mountpoint)[0]
        for attempt in (
            lambda: (mountpoint / "new.txt").write_bytes(b"x"),
            lambda: (mountpoint / "existing.txt").write_bytes(b"x"),
            lambda: os.mkdir(mountpoint / "dir"),
            lambda: os.unlink(mountpoint / "existing.txt"),
        ):
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EROFS
        umount_and_wait(mountpoint)
    assert bucket_snapshot(s3, bucket, key_bytes) == before
    assert_log_clean(daemon_log(tmp_path), [key_bytes])


@needs_root
@pytest.mark.fuse
def test_fstab_line_with_netdev_nofail_allow_other(
    ssefs_on_mount_path: None, config_file: Path, tmp_path: Path, public_mountpoint: Path, s3: Any, bucket: str,
    key_bytes: bytes,
) -> None:
    s3.put_object(Bucket=bucket, Key="shared.txt", Body=b"for everyone", **sse_params(key_bytes))
    mountpoint = public_mountpoint
    fstab = tmp_path / "fstab"
    options = ("defaults,_netdev,nofail,allow_other,noatime,x-systemd.after=network-online.target,"
               "comment=photos,log_level=debug")
    fstab.write_text(f"# a comment line\n{config_file} {mountpoint} fuse.ssefs {options} 0 0\n")
    with Cleanup(mountpoint):
        result = run("mount", "--fstab", str(fstab), str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert "allow_other" in mount_entry(mountpoint)[3]
        # allow_other works: another user reads the file (its mode 0644 lets everyone read).
        allowed = run(*NOBODY, "cat", str(mountpoint / "shared.txt"))
        assert (allowed.returncode, allowed.stdout) == (0, "for everyone"), allowed.stderr
        assert " DEBUG " in daemon_log(tmp_path)  # log_level=debug reached the daemon
        umount_and_wait(mountpoint)
    assert_log_clean(daemon_log(tmp_path), [key_bytes])


@needs_root
@pytest.mark.fuse
def test_mount_o_noexec(
    ssefs_on_mount_path: None, config_file: Path, tmp_path: Path, key_bytes: bytes,
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with Cleanup(mountpoint):
        result = run("mount", "-t", "fuse.ssefs", "-o", "noexec", str(config_file), str(mountpoint))
        assert result.returncode == 0, result.stderr
        # Added to what the mount had, which stays.
        assert mount_entry(mountpoint)[0] == {"rw", "nosuid", "nodev", "noexec", "relatime"}
        script = mountpoint / "script.sh"
        script.write_text("#!/bin/sh\necho executed\n")
        script.chmod(0o755)
        with pytest.raises(PermissionError) as raised:
            subprocess.run([str(script)], check=False)
        assert raised.value.errno == errno.EACCES
        umount_and_wait(mountpoint)
    assert_log_clean(daemon_log(tmp_path), [key_bytes])


@needs_root
@pytest.mark.fuse
@pytest.mark.parametrize("option", ["bogus", "sync", "uid=5"])
def test_unknown_mount_option_is_refused_before_mounting(
    ssefs_on_mount_path: None, config_file: Path, tmp_path: Path, option: str,
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with Cleanup(mountpoint):
        result = run("mount", "-t", "fuse.ssefs", "-o", f"rw,{option},_netdev", str(config_file), str(mountpoint))
        assert result.returncode != 0
        assert ssefs_lines(result.stderr) == [f"ssefs: unknown mount option '{option}'"]
        assert not is_mounted(mountpoint)
        assert not state_file(mountpoint).exists()
        assert not (tmp_path / "mount-cache").exists(), "no daemon may have started"
        # Run directly, the helper form exits with exactly 1 and that one line.
        direct = run(str(VENV_SSEFS), str(config_file), str(mountpoint), "-o", option)
        assert (direct.returncode, direct.stderr) == (1, f"ssefs: unknown mount option '{option}'\n")
        assert not is_mounted(mountpoint)


@needs_root
@pytest.mark.fuse
def test_failed_start_is_reported_and_skip_key_check_overrides_it(
    ssefs_on_mount_path: None, tmp_path: Path, endpoint: SeaweedEndpoint, bucket: str, key_file: Path,
    s3: Any, key_bytes: bytes,
) -> None:
    other_key = bytes(reversed(key_bytes))
    s3.put_object(Bucket=bucket, Key="foreign.txt", Body=b"under another key", **sse_params(other_key))
    config = write_config(tmp_path, endpoint, bucket, key_file)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with Cleanup(mountpoint):
        refused = run("mount", "-t", "fuse.ssefs", str(config), str(mountpoint))
        assert refused.returncode != 0
        [line] = ssefs_lines(refused.stderr)
        assert "cannot read 'foreign.txt'" in line and "--skip-key-check" in line
        assert not is_mounted(mountpoint)

        allowed = run("mount", "-t", "fuse.ssefs", "-o", "skip_key_check", str(config), str(mountpoint))
        assert allowed.returncode == 0, allowed.stderr
        assert os.listdir(mountpoint) == ["foreign.txt"]
        umount_and_wait(mountpoint)
    assert_log_clean(daemon_log(tmp_path), [key_bytes])


# ------------------------------------------------------------------ the command line itself


def test_other_command_lines_go_to_the_command_group(tmp_path: Path) -> None:
    version = run(str(VENV_SSEFS), "--version")
    assert version.returncode == 0 and version.stdout.startswith("ssefs, version ")
    # A subcommand whose argument is a directory is still that subcommand.
    status = run(str(VENV_SSEFS), "status", str(tmp_path))
    assert (status.returncode, status.stderr) == (1, f"ssefs: no ssefs daemon is serving {tmp_path}\n")
    # A mistyped subcommand is not taken for a config file.
    typo = run(str(VENV_SSEFS), "moutn", str(tmp_path))
    assert typo.returncode == 2 and "No such command 'moutn'" in typo.stderr


def test_helper_form_and_options(tmp_path: Path) -> None:
    config = tmp_path / "photos.toml"
    config.write_text("")
    assert is_helper_form([str(config), str(tmp_path)])
    assert is_helper_form(["/etc/ssefs/missing.toml", str(tmp_path), "-o", "ro"])
    assert not is_helper_form([str(config), str(tmp_path / "missing")])
    assert not is_helper_form(["mount", str(config), str(tmp_path)])
    assert not is_helper_form(["--version"])

    request = parse_helper_arguments([
        str(config), str(tmp_path), "-o", "rw,dev,suid,ro,_netdev,nofail,noauto,user,x-systemd.automount",
        "-oallow_other,comment=hi,log_level=warning,skip_key_check,defaults,noatime",
    ])
    assert request == HelperRequest(str(config), str(tmp_path), read_only=True, allow_other=True,
                                    skip_key_check=True, log_level="warning")
    assert request.mount_arguments() == [
        "mount", "--background", "--read-only", "--allow-other", "--skip-key-check", "--log-level", "warning",
        "--", str(config), str(tmp_path),
    ]
    assert parse_helper_arguments([str(config), str(tmp_path)]).mount_arguments() == [
        "mount", "--background", "--", str(config), str(tmp_path),
    ]
    for bad, message in (
        (["-o", "ro,exotic"], "unknown mount option 'exotic'"),
        (["-o", "log_level=loud"], "mount option 'log_level=loud': the level must be one of debug, info, warning, "
                                   "error"),
        (["-o"], "-o needs a list of mount options"),
        (["-f"], "unexpected argument '-f' (usage: ssefs CONFIG MOUNTPOINT [-o OPTIONS])"),
    ):
        with pytest.raises(OptionError) as raised:
            parse_helper_arguments([str(config), str(tmp_path), *bad])
        assert str(raised.value) == message
