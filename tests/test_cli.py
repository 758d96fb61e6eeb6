"""The ssefs command as a user runs it: --help, --version, keygen, and the embedded demo."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssefs import __version__

from .conftest import is_mounted, ssefs_command, unmount


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def ssefs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ssefs_command(*args), capture_output=True, text=True, timeout=timeout)


def test_version_and_help_on_every_command() -> None:
    result = ssefs("--version")
    assert result.returncode == 0 and __version__ in result.stdout
    for command in ([], ["mount"], ["umount"], ["status"], ["keygen"], ["demo"], ["rekey"], ["check"]):
        result = ssefs(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout


def test_mount_takes_no_key_on_the_command_line() -> None:
    result = ssefs("mount", "--help")
    assert "--key" not in result.stdout


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    result = ssefs("keygen", str(path))
    assert result.returncode == 0, result.stderr
    content = path.read_bytes()
    assert len(content) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "fingerprint" in result.stderr
    again = ssefs("keygen", str(path))
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr
    assert path.read_bytes() == content


def test_umount_of_something_not_mounted_fails_clearly(tmp_path: Path) -> None:
    result = ssefs("umount", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("ssefs: cannot unmount")


@pytest.mark.fuse
def test_demo_runs_a_local_encrypted_mount(tmp_path: Path) -> None:
    mountpoint = tmp_path / "demo-mnt"
    data_dir = tmp_path / "demo-data"
    process = subprocess.Popen(
        ssefs_command("demo", str(mountpoint), "--data-dir", str(data_dir)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while not is_mounted(mountpoint):
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "demo did not mount in time"
            time.sleep(0.1)
        (mountpoint / "hello.txt").write_text("hello, encrypted world\n")
        assert (mountpoint / "hello.txt").read_text() == "hello, encrypted world\n"
        assert os.listdir(mountpoint) == ["hello.txt"]
        assert stat.S_IMODE((data_dir / "demo.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "demo.toml").stat().st_mode) == 0o600
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        output = process.stdout.read().decode() if process.stdout else ""
        assert "is mounted at" in output and "Traceback" not in output
        assert not is_mounted(mountpoint)
        # The embedded server was stopped with the mount.
        server_log = (data_dir / "seaweedfs" / "weed.log").read_text(errors="replace")
        assert server_log
        assert not processes_mentioning(str(data_dir / "seaweedfs" / "volumes"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        unmount(mountpoint)


def test_logs_carry_journald_priorities_when_stderr_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from ssefs.cli import configure_logging

    captured = tmp_path / "journal-stream"
    with open(captured, "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        configure_logging("info")
        logging.getLogger("ssefs.test").info("mounted")
        logging.getLogger("ssefs.test").warning("upload failed\nsecond line")
        logging.getLogger("ssefs.test").debug("not shown at info")
        # Another stream than the journal's: ordinary timestamped lines.
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
        configure_logging("info")
        logging.getLogger("ssefs.test").error("plain")
    lines = captured.read_text().splitlines()
    assert lines[:3] == ["<6>ssefs.test: mounted", "<4>ssefs.test: upload failed", "<4>second line"]
    assert len(lines) == 4 and lines[3].endswith(" ERROR ssefs.test: plain") and lines[3][:4].isdigit()
    assert "\x1b[" not in captured.read_text()  # never coloured
