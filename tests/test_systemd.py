"""The systemd unit ``systemd/ssefs@.service`` and the daemon's side of it.

- ``systemd-analyze verify`` accepts an instance of the unit with no warning, and
  rejects copies broken on purpose (so the check can fail);
- the unit has the settings the daemon relies on (Type=notify with a foreground
  ``ssefs mount``, ExecStop through ``ssefs umount`` with room for its wait, the
  key as a credential, ...), and none that would put the daemon in a private
  mount namespace, where its FUSE mount would be invisible to the host;
- the daemon mounts, serves and unmounts within the unit's capability bounding
  set (run under setpriv(1) with exactly that set);
- the notify protocol: READY=1 comes from the main process once the mount is
  live, STOPPING=1 when it is asked to stop, on a socket path or an abstract
  socket (``@name``).
"""

from __future__ import annotations

import array
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ssefs.cli import UMOUNT_WAIT_SECONDS

from .conftest import (
    MOUNT_TIMEOUT_SECONDS,
    assert_log_clean,
    eventually_on_server,
    is_mounted,
    sse_params,
    ssefs_command,
    unmount,
)

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "ssefs@.service"
INSTALLED_SSEFS = "/usr/local/bin/ssefs"
VENV_SSEFS = Path(sys.executable).parent / "ssefs"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

needs_systemd_analyze = pytest.mark.skipif(
    not os.access(SYSTEMD_ANALYZE, os.X_OK), reason="systemd-analyze is not installed (Debian package systemd)"
)

# Settings that give the service its own mount namespace (systemd.exec(5); in
# systemd 252 the list is exec_needs_mount_namespace() in src/core/execute.c).
# A FUSE mount made in there would not be seen by the rest of the system.
MOUNT_NAMESPACE_SETTINGS = (
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateIPC", "PrivateNetwork", "PrivateUsers",
    "ProtectSystem", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "DynamicUser", "MountAPIVFS",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "RootDirectory", "RootImage",
    "ExtensionImages", "ExtensionDirectories", "LogNamespace", "NetworkNamespacePath", "IPCNamespacePath",
)
FALSE_VALUES = ("", "no", "false", "0", "off", "default", "all")


# ------------------------------------------------------------------ unit file parsing


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as ``{section: [(key, value), ...]}`` (keys repeat, as ExecStart= may)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every value given for ``key``; an empty assignment resets the list, as systemd does."""
    found: list[str] = []
    for name, value in unit.get(section, []):
        if name == key:
            found = [] if value == "" else [*found, value]
    return found


def single(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


def seconds(span: str) -> float:
    """A systemd time span (``15min``, ``1h 30min``, ``90``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60,
             "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "ms": 0.001, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", span), f"cannot read {span!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


# ------------------------------------------------------------------ systemd-analyze verify


def verify(unit_file: Path) -> list[str]:
    """What ``systemd-analyze verify`` objects to in ``unit_file``: [] when it is clean.

    verify exits 0 even for settings it could not parse (it logs "..., ignoring"
    and goes on), so every line naming the unit counts as a problem, as does a
    non-zero exit.
    """
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit_file)],
        capture_output=True, text=True, timeout=120, cwd=unit_file.parent,
    )
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if unit_file.name in line]
    if result.returncode != 0:
        problems.append(f"exit code {result.returncode}: {' | '.join(output)}")
    return problems


def instance(directory: Path, text: str) -> Path:
    """The unit as instance ``ssefs@demo.service``, its programs pointed at this checkout's ssefs.

    verify checks that ExecStart= and ExecStop= name executables, and ssefs is in
    the virtualenv here, not yet in /usr/local/bin.
    """
    assert VENV_SSEFS.exists(), f"{VENV_SSEFS} is missing: run .venv/bin/pip install -e ."
    path = directory / "ssefs@demo.service"
    path.write_text(text.replace(INSTALLED_SSEFS + " ", f"{VENV_SSEFS} "))
    return path


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert text.count(INSTALLED_SSEFS + " ") >= 2, "ExecStart= and ExecStop= are expected to run /usr/local/bin/ssefs"
    assert verify(instance(tmp_path, text)) == []


BROKEN_UNITS = {  # (a line of the unit, its broken version); the leading \n skips the comments
    "misspelt service type": ("\nType=notify\n", "\nType=notifyy\n"),
    "unknown restart policy": ("\nRestart=on-failure\n", "\nRestart=sometimes\n"),
    "misspelt setting name": ("\nNoNewPrivileges=yes\n", "\nNoNewPrivilege=yes\n"),
    "unreadable time span": ("\nTimeoutStopSec=15min\n", "\nTimeoutStopSec=15 parsecs\n"),
    "missing executable": ("\nExecStart=/usr/local/bin/ssefs ", "\nExecStart=/nonexistent/ssefs "),
    "misspelt section": ("\n[Service]\n", "\n[Servic]\n"),
}


@needs_systemd_analyze
@pytest.mark.parametrize("breakage", sorted(BROKEN_UNITS))
def test_systemd_analyze_verify_rejects_a_broken_unit(tmp_path: Path, breakage: str) -> None:
    """The verify check above can fail: each of these copies is refused."""
    old, new = BROKEN_UNITS[breakage]
    text = UNIT.read_text()
    assert old in text, f"the unit no longer contains {old!r}; update this test"
    assert verify(instance(tmp_path, text.replace(old, new, 1))) != []


# ------------------------------------------------------------------ required settings


def test_unit_runs_the_daemon_in_the_foreground_with_notify(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert single(unit, "Service", "Type") == "notify"
    start = single(unit, "Service", "ExecStart").split()
    assert start[:2] == [INSTALLED_SSEFS, "mount"]
    # Type=notify wants the daemon itself as the main process: no --background.
    assert "--background" not in start
    assert start[-2:] == ["/etc/ssefs/%i.toml", "/mnt/%i"]
    stop = single(unit, "Service", "ExecStop").split()
    assert stop == [INSTALLED_SSEFS, "umount", start[-1]], "ExecStop= must unmount what ExecStart= mounted"


def test_unit_leaves_room_for_the_final_upload(unit: dict[str, list[tuple[str, str]]]) -> None:
    # ssefs umount waits up to UMOUNT_WAIT_SECONDS for the daemon to upload; systemd
    # must not SIGKILL it first.
    assert seconds(single(unit, "Service", "TimeoutStopSec")) > UMOUNT_WAIT_SECONDS
    assert single(unit, "Service", "Restart") == "on-failure"
    assert seconds(single(unit, "Service", "RestartSec")) >= 1


def test_unit_hands_over_the_key_as_a_credential(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert values(unit, "Service", "LoadCredential") == ["%i.key:/etc/ssefs/%i.key"]
    # The key never travels on a command line.
    assert "key" not in " ".join(values(unit, "Service", "ExecStart")).replace("%i.toml", "")


def test_unit_directories_match_what_the_daemon_uses(unit: dict[str, list[tuple[str, str]]]) -> None:
    from ssefs.config import default_cache_dir
    from ssefs.mount import runtime_dir

    assert single(unit, "Service", "CacheDirectory") == "ssefs"
    assert single(unit, "Service", "CacheDirectoryMode") == "0700"
    assert single(unit, "Service", "RuntimeDirectory") == "ssefs"
    assert single(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    if os.geteuid() == 0:  # the service runs as root: its state file and default cache live there
        assert runtime_dir() == Path("/run/ssefs")
        assert default_cache_dir("demo") == Path("/var/cache/ssefs/demo")


def test_unit_waits_for_the_network_and_is_installable(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert "network-online.target" in " ".join(values(unit, "Unit", "Wants"))
    assert "network-online.target" in " ".join(values(unit, "Unit", "After"))
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_unit_hardening(unit: dict[str, list[tuple[str, str]]]) -> None:
    expected = {
        "NoNewPrivileges": "yes", "UMask": "0077", "LimitCORE": "0", "LockPersonality": "yes",
        "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native",
        "ProtectHostname": "yes", "RestrictNamespaces": "yes",
    }
    for key, value in expected.items():
        assert single(unit, "Service", key) == value, key
    families = set(" ".join(values(unit, "Service", "RestrictAddressFamilies")).split())
    # S3 over IPv4/IPv6, sd_notify over AF_UNIX; nothing else (no AF_PACKET, no exotic families).
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert "CAP_SYS_ADMIN" in bounding_set(unit), "mounting needs CAP_SYS_ADMIN"


def test_unit_creates_no_private_mount_namespace(unit: dict[str, list[tuple[str, str]]]) -> None:
    for key in MOUNT_NAMESPACE_SETTINGS:
        for value in values(unit, "Service", key):
            assert value.lower() in FALSE_VALUES, f"{key}={value} would hide the FUSE mount from the host"
    for value in values(unit, "Service", "MountFlags"):
        assert value == "shared", f"MountFlags={value} would hide the FUSE mount from the host"


def bounding_set(unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    listed = " ".join(values(unit, "Service", "CapabilityBoundingSet")).split()
    assert listed and not any(name.startswith("~") for name in listed), "expected an allow-list of capabilities"
    return listed


# ------------------------------------------------------------------ the daemon within the unit's limits


# Capability numbers from <linux/capability.h>.
CAPABILITIES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio sys_chroot "
    "sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time sys_tty_config mknod lease "
    "audit_write audit_control setfcap mac_override mac_admin syslog wake_alarm block_suspend audit_read "
    "perfmon bpf checkpoint_restore"
).split()


def start_daemon(config: Path, mountpoint: Path, log_path: Path, *, prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, ready_pipe: bool = True) -> subprocess.Popen[bytes]:
    """``[prefix...] python -m ssefs mount CONFIG MOUNTPOINT`` in the foreground, as systemd runs it.

    With ``ready_pipe``, returns once the daemon reports the mount live on its
    ready pipe; otherwise at once (the caller waits for READY=1 on its own).
    """
    try:
        os.lstat(mountpoint)
    except FileNotFoundError:
        mountpoint.mkdir()
    except OSError:
        pass  # ENOTCONN: the dead mount of a killed daemon, which the new one clears
    command = [*prefix, *ssefs_command("mount", str(config), str(mountpoint), "--log-file", str(log_path))]
    if not ready_pipe:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env)
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [*command, "--ready-fd", str(write_end)], pass_fds=(write_end,),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], MOUNT_TIMEOUT_SECONDS)
        line = pipe.readline().decode(errors="replace").strip() if ready else ""
    if line != "READY":
        stop_daemon(process, mountpoint)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise AssertionError(f"the daemon did not mount ({line!r}): {stderr}\n{log}")
    return process


def stop_daemon(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Unmount if still mounted, and reap the daemon (killing it only if it does not go)."""
    unmount(mountpoint)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def capability_mask(names: list[str]) -> int:
    return sum(1 << CAPABILITIES.index(name.removeprefix("CAP_").lower()) for name in names)


@pytest.mark.fuse
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv(1)")
def test_daemon_works_within_the_units_capability_bounding_set(
    unit: dict[str, list[tuple[str, str]]], config_file: Path, tmp_path: Path, s3: Any, bucket: str,
    key_bytes: bytes,
) -> None:
    """Mount, read, write, a restart after a crash, ``ssefs umount`` (ExecStop=) and the final upload,
    with only the unit's capabilities."""
    names = bounding_set(unit)
    keep = ",".join("+" + name.removeprefix("CAP_").lower() for name in names)
    # What systemd does for a root service with CapabilityBoundingSet= and NoNewPrivileges=yes.
    setpriv = ("setpriv", "--bounding-set", f"-all,{keep}", "--inh-caps", "-all", "--no-new-privs", "--")
    s3.put_object(Bucket=bucket, Key="existing.txt", Body=b"from before", **sse_params(key_bytes))
    mountpoint, log_path = tmp_path / "mnt", tmp_path / "daemon.log"
    process = start_daemon(config_file, mountpoint, log_path, prefix=setpriv)
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert int(fields["CapBnd"], 16) == capability_mask(names)
        assert int(fields["CapEff"], 16) == capability_mask(names)
        assert fields["NoNewPrivs"].strip() == "1"
        assert (mountpoint / "existing.txt").read_bytes() == b"from before"
        (mountpoint / "new.txt").write_bytes(b"written under the unit's limits")

        # Restart=on-failure: the next start clears the dead mount a killed daemon left.
        process.kill()
        process.wait(timeout=30)
        process = start_daemon(config_file, mountpoint, log_path, prefix=setpriv)
        assert (mountpoint / "new.txt").read_bytes() == b"written under the unit's limits"

        result = subprocess.run([*setpriv, *ssefs_command("umount", str(mountpoint))],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert process.wait(timeout=60) == 0
        assert not is_mounted(mountpoint)
        eventually_on_server(s3, bucket, "new.txt", key_bytes, b"written under the unit's limits", timeout=5)
    finally:
        stop_daemon(process, mountpoint)
    assert_log_clean(log_path.read_text(), [key_bytes])


# ------------------------------------------------------------------ the notify protocol


@pytest.fixture
def short_directory() -> Iterator[Path]:
    """A directory with a short path: a socket path must fit in 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="ssefs-notify-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def notify_socket(kind: str, directory: Path) -> tuple[socket.socket, str]:
    """A datagram socket like systemd's, and the NOTIFY_SOCKET value that names it."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # Like systemd: learn the sender's pid from the kernel (NotifyAccess=main checks it).
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if kind == "path":
        address = str(directory / "notify")
        receiver.bind(address)
        return receiver, address
    name = f"ssefs-test-{secrets.token_hex(8)}"
    receiver.bind("\0" + name)
    return receiver, "@" + name


def receive(receiver: socket.socket, timeout: float) -> tuple[str, int | None]:
    """The next notification and the pid of the process that sent it."""
    ready, _, _ = select.select([receiver], [], [], timeout)
    assert ready, f"no notification within {timeout} s"
    data, ancillary, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(3 * 4))
    pid = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = array.array("i", payload[:12])[0]
    return data.decode(), pid


@pytest.mark.fuse
@pytest.mark.parametrize(("address_kind", "stop_with"), [("path", "sigterm"), ("abstract", "umount")])
def test_notify_ready_once_live_and_stopping_on_stop(
    address_kind: str, stop_with: str, config_file: Path, tmp_path: Path, short_directory: Path,
    s3: Any, bucket: str, key_bytes: bytes,
) -> None:
    s3.put_object(Bucket=bucket, Key="before.txt", Body=b"written before the mount", **sse_params(key_bytes))
    receiver, address = notify_socket(address_kind, short_directory)
    mountpoint, log_path = tmp_path / "mnt", tmp_path / "daemon.log"
    env = {**os.environ, "NOTIFY_SOCKET": address}
    with receiver:
        process = start_daemon(config_file, mountpoint, log_path, env=env, ready_pipe=False)
        try:
            message, sender = receive(receiver, MOUNT_TIMEOUT_SECONDS)
            # Checked at once, with no wait or retry: READY=1 means the mount already serves.
            assert os.path.ismount(mountpoint)
            assert os.listdir(mountpoint) == ["before.txt"]
            assert (mountpoint / "before.txt").read_bytes() == b"written before the mount"
            assert message == "READY=1"
            assert sender == process.pid, "systemd (NotifyAccess=main) only listens to the main process"
            assert select.select([receiver], [], [], 0.5)[0] == [], "nothing else is announced while serving"

            if stop_with == "sigterm":
                process.send_signal(signal.SIGTERM)
            else:
                result = subprocess.run(ssefs_command("umount", str(mountpoint)),
                                        capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, result.stderr
            message, sender = receive(receiver, 60)
            assert (message, sender) == ("STOPPING=1", process.pid)
            assert process.wait(timeout=60) == 0
            assert not is_mounted(mountpoint)
        finally:
            stop_daemon(process, mountpoint)
    assert_log_clean(log_path.read_text(), [key_bytes])


@pytest.mark.fuse
def test_a_notify_socket_nobody_listens_on_does_not_break_the_mount(
    config_file: Path, tmp_path: Path, short_directory: Path, key_bytes: bytes,
) -> None:
    """sd_notify(3) ignores delivery failures; a stale NOTIFY_SOCKET must not cost the mount or the unmount."""
    mountpoint, log_path = tmp_path / "mnt", tmp_path / "daemon.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(short_directory / "nobody-listens")}
    process = start_daemon(config_file, mountpoint, log_path, env=env)
    try:
        (mountpoint / "file").write_bytes(b"still works")
        assert (mountpoint / "file").read_bytes() == b"still works"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not is_mounted(mountpoint)
    finally:
        stop_daemon(process, mountpoint)
    assert_log_clean(log_path.read_text(), [key_bytes])
