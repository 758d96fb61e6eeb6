"""The ``ssefs`` command: options, exit codes and logging set-up.

Built on click (declarative commands, ``--help`` on every command, and the
de-facto standard for Python CLIs). Every failure a user can cause ends in one
line on stderr, ``ssefs: <what is wrong>``, and exit code 1; usage errors exit
with 2. The SSE-C key is never a command-line value: it comes from the config's
key source. ``mount --background`` starts the daemon as a child and returns only
once the child reports over a pipe that the mount is live, or why it failed.
Logging is plain text (journald-friendly, no colour) and passes through a filter
that scrubs any encoding of the key should a library ever try to log it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import click
import trio

from . import __version__
from .config import Config, format_size, load_config
from .errors import SsefsError
from .keys import KeyRing, SseKey, load_key_ring, write_new_key

log = logging.getLogger("ssefs")

LOG_LEVELS = ["debug", "info", "warning", "error"]
# How long ``mount --background`` waits for the daemon to report; start-up checks
# against an unreachable server give up well before this (bounded retries).
BACKGROUND_START_TIMEOUT_SECONDS = 300.0
UMOUNT_WAIT_SECONDS = 600.0


class RedactingFilter(logging.Filter):
    """Replaces any of the given secret strings in a log record with ``[redacted]``."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self._secrets):
            for secret in self._secrets:
                message = message.replace(secret, "[redacted]")
            record.msg, record.args = message, None
        if record.exc_info and record.exc_info[1] is not None:
            text = str(record.exc_info[1])
            if any(secret in text for secret in self._secrets):
                record.exc_info = None
                record.exc_text = None
                record.msg = f"{record.msg} (exception text withheld: it contained key material)"
        return True


class JournalFormatter(logging.Formatter):
    """Lines for journald: a ``<priority>`` prefix it turns into the entry's level, no timestamp."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        # Each line of a traceback becomes its own journal entry: give each the priority.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald (systemd sets ``JOURNAL_STREAM`` to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure_logging(level: str, log_file: Path | None = None) -> None:
    """Plain-text log lines (never coloured) with levels, on stderr or in ``log_file``.

    Under systemd, when stderr is the journal, lines carry journald's priority
    prefix instead of a timestamp, so ``journalctl -p warning`` filters by level.
    """
    formatter: logging.Formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        handler: logging.Handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            formatter = JournalFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # These libraries log request headers at DEBUG, and the SSE-C key is a header.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def protect_logs(keys: KeyRing | SseKey) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(keys.redaction_strings()))


def fail(message: str, ready_fd: int | None = None) -> NoReturn:
    if ready_fd is not None:
        _report(ready_fd, f"ERROR {message}")
    click.echo(f"ssefs: {message}", err=True)
    sys.exit(1)


def _report(ready_fd: int, line: str) -> None:
    try:
        os.write(ready_fd, (line.replace("\n", " ") + "\n").encode())
        os.close(ready_fd)
    except OSError:
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ssefs")
def main() -> None:
    """Mount an S3 bucket whose objects are encrypted with SSE-C (customer-provided keys)."""


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--background", is_flag=True, help="Return once the mount is live; the daemon keeps running.")
@click.option("--skip-key-check", is_flag=True, help="Mount even if existing objects do not open with the key.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Log here instead of stderr (background default: CACHE_DIR/ssefs.log).")
@click.option("--read-only", is_flag=True, help="Mount read-only, whatever [mount] read_only says.")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount, whatever [mount] allow_other says.")
@click.option("--ready-fd", type=int, hidden=True)
def mount(
    config_path: Path, mountpoint: Path, background: bool, skip_key_check: bool,
    log_level: str, log_file: Path | None, read_only: bool, allow_other: bool, ready_fd: int | None,
) -> None:
    """Mount the bucket described by CONFIG at MOUNTPOINT (foreground by default)."""
    configure_logging(log_level, log_file)
    try:
        config = with_mount_overrides(load_config(config_path), read_only=read_only, allow_other=allow_other)
        keys = load_key_ring(config)
    except SsefsError as error:
        fail(str(error), ready_fd)
    protect_logs(keys)
    mountpoint = mountpoint.absolute()
    if background:
        sys.exit(_start_background(config, mountpoint, skip_key_check, log_level, log_file))
    run_mount(config, keys, mountpoint, skip_key_check=skip_key_check, ready_fd=ready_fd)


def with_mount_overrides(config: Config, *, read_only: bool, allow_other: bool) -> Config:
    """``config`` with command-line (or mount -o) choices layered over its [mount] table."""
    mount_settings = dataclasses.replace(
        config.mount,
        read_only=config.mount.read_only or read_only,
        allow_other=config.mount.allow_other or allow_other,
    )
    return dataclasses.replace(config, mount=mount_settings)


def _tune_malloc() -> None:
    """Keep the daemon's memory close to what it really holds (glibc only).

    Two malloc arenas instead of one per thread (8 x cores by default): worker
    threads each allocating 1-8 MiB buffers in their own arena leave memory
    fragmented across arenas. And a fixed mmap threshold of 1.25 MiB: glibc
    otherwise raises it to 32 MiB after the first large free, so 8 MiB upload
    parts would land in the heap, where freed ones stay resident (a 1 GiB cold
    read peaked at 228 MiB with that). The 1 MiB blocks, allocated and freed
    all the time, stay below it and are reused from the heap: as fresh
    mappings each cost 256 page faults and an munmap, which was half the
    daemon's CPU for a sequential write (1.35 -> 0.70 s per 256 MiB) and a
    fifth for a cold read; peak RSS over the big workloads 173 MiB, for a
    4 GiB write 182 MiB. Must run before the first worker thread starts.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-8), ctypes.c_int(2))  # M_ARENA_MAX
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1280 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def run_mount(
    config: Config, keys: KeyRing, mountpoint: Path, *, skip_key_check: bool = False,
    ready_fd: int | None = None, on_ready_message: str | None = None,
) -> None:
    from .mount import serve  # pyfuse3 is imported only by commands that mount

    _tune_malloc()

    def on_ready() -> None:
        if ready_fd is not None:
            _report(ready_fd, "READY")
        if on_ready_message:
            click.echo(on_ready_message, err=True)

    try:
        trio.run(lambda: serve(config, keys, mountpoint, skip_key_check=skip_key_check, on_ready=on_ready))
    except SsefsError as error:
        fail(str(error), ready_fd)
    except RuntimeError as error:  # pyfuse3.init reports mount failures this way
        fail(f"cannot mount at {mountpoint}: {error}", ready_fd)


def _start_background(
    config: Config, mountpoint: Path, skip_key_check: bool, log_level: str, log_file: Path | None
) -> int:
    log_file = log_file or config.cache.dir / "ssefs.log"
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    command = [
        sys.executable, "-m", "ssefs", "mount", str(config.path), str(mountpoint),
        "--ready-fd", str(write_end), "--log-level", log_level, "--log-file", str(log_file),
    ]
    if skip_key_check:
        command.append("--skip-key-check")
    if config.mount.read_only:
        command.append("--read-only")
    if config.mount.allow_other:
        command.append("--allow-other")
    stderr_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    daemon = subprocess.Popen(
        command, pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=stderr_fd, start_new_session=True, cwd="/",
    )
    os.close(write_end)
    os.close(stderr_fd)
    with os.fdopen(read_end, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], BACKGROUND_START_TIMEOUT_SECONDS)
        line = pipe.readline().decode(errors="replace").strip() if ready else ""
    if line == "READY":
        click.echo(f"ssefs: mounted at {mountpoint} (daemon pid {daemon.pid}, log {log_file})", err=True)
        return 0
    if line.startswith("ERROR "):
        click.echo(f"ssefs: {line[len('ERROR '):]}", err=True)
    elif not ready:
        click.echo(f"ssefs: the daemon did not become ready in time; see {log_file}", err=True)
    else:
        code = daemon.wait()
        click.echo(f"ssefs: the daemon exited with code {code} before mounting; see {log_file}", err=True)
    return 1


# A plain string, not click.Path: that would stat the mount point, which waits for a stuck daemon
# (see _state_file_of), and umount and status are what one runs when a mount hangs.
MOUNTED_POINT = click.argument("mountpoint_arg", metavar="MOUNTPOINT")


@main.command()
@MOUNTED_POINT
def umount(mountpoint_arg: str) -> None:
    """Unmount MOUNTPOINT and wait until its daemon has uploaded everything and exited."""
    mountpoint = Path(mountpoint_arg).absolute()
    state = _state_file_of(mountpoint)
    pid: int | None = None
    try:
        pid = int(json.loads(state.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        pass
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"cannot unmount {mountpoint}: {result.stderr.strip() or 'fusermount3 failed'}")
    if pid is not None:
        deadline = time.monotonic() + UMOUNT_WAIT_SECONDS
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            fail(f"unmounted {mountpoint}, but daemon {pid} is still uploading; it will finish on its own")


def _state_file_of(mountpoint: Path) -> Path:
    """The state file of the daemon serving ``mountpoint``, found without a stat of the mount point (which
    would wait for that daemon) unless ``mountpoint`` is a symlink to it."""
    from .mount import state_file

    state = state_file(mountpoint)
    return state if state.exists() else state_file(mountpoint.resolve())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@main.command()
@MOUNTED_POINT
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(mountpoint_arg: str, as_json: bool) -> None:
    """Show what the daemon serving MOUNTPOINT is doing: cache use, dirty data, uploads, errors."""
    from .mount import STATUS_INTERVAL_SECONDS

    mountpoint = Path(mountpoint_arg).absolute()
    state_path = _state_file_of(mountpoint)
    asked = time.time()
    # The daemon rewrites its status once a second: wait for one written after this call, so that what
    # is shown includes, say, the upload an fsync just finished.
    deadline = time.monotonic() + 1.5 * STATUS_INTERVAL_SECONDS
    while True:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            fail(f"no ssefs daemon is serving {mountpoint}")
        if not _alive(int(state["pid"])):
            fail(f"the ssefs daemon for {mountpoint} (pid {state['pid']}) is gone; remount to recover its cache")
        if state.get("updated_at", 0) >= asked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    prefix = state["prefix"]
    rows = [
        ("mount point", state["mountpoint"]),
        ("daemon pid", state["pid"]),
        ("endpoint", state["endpoint"]),
        ("bucket", state["bucket"] + ("/" + prefix if prefix else "")),
        ("key fingerprint", state["key_fingerprint"]),
        ("previous keys", ", ".join(state.get("previous_key_fingerprints", [])) or "none"),
        ("cache", f"{format_size(state['cache_used_bytes'])} of {format_size(state['cache_max_bytes'])} "
                  f"in {state['cache_dir']}"),
        ("dirty", f"{state['dirty_files']} file(s), {format_size(state['dirty_bytes'])} waiting for upload"),
        ("uploads in flight", state["uploads_in_flight"]),
        ("deletes pending", state.get("deletes_pending", 0)),
        ("uploaded", f"{state['uploaded_files']} file(s), {format_size(state['uploaded_bytes'])} since mount"),
        ("sent while written", f"{state.get('streams_active', 0)} file(s) now; {state.get('streams_started', 0)} "
                               f"started, {state.get('streams_abandoned', 0)} abandoned since mount; "
                               f"{format_size(state.get('streams_parked_bytes', 0))} parked"),
        ("last upload error", state["last_upload_error"] or "none"),
    ]
    if state.get("updated_at", 0) < asked:
        rows.append(("as of", f"{asked - state.get('updated_at', 0):.0f} s ago: the daemon has not refreshed it since "
                              "(busy, or stuck)"))
    if state.get("read_only"):
        rows.insert(4, ("mode", "read-only"))
    for label, value in rows:
        click.echo(f"{label:>18}: {value}")
    problems = state.get("recent_problems", [])
    click.echo(f"{'recent problems':>18}: {'none' if not problems else ''}".rstrip())
    for problem in problems:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(problem["time"]))
        click.echo(f"{'':>20}{when} {problem['level']} {problem['message']}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Write a new random 32-byte SSE-C key to PATH (mode 0600; never overwrites)."""
    try:
        key = write_new_key(path)
    except SsefsError as error:
        fail(str(error))
    click.echo(f"wrote a new key to {path} (fingerprint {key.fingerprint}); keep a copy somewhere safe:"
               " without it the data cannot be read", err=True)


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: str(Path.home() / ".local/share/ssefs/demo"), show_default="~/.local/share/ssefs/demo",
              help="Where the local server keeps its data, key and config.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def demo(mountpoint: Path, data_dir: Path, log_level: str) -> None:
    """Start a local SeaweedFS over HTTPS, create a bucket and a key, and mount it at MOUNTPOINT."""
    from .demo import run_demo

    configure_logging(log_level)
    try:
        run_demo(mountpoint.absolute(), data_dir.absolute())
    except SsefsError as error:
        fail(str(error))


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "old_source", metavar="OLDKEYSOURCE", required=True,
              help="The key the objects are under now: file:PATH, env:NAME, credential:NAME, "
                   "command:SHELLCMD, or a PATH.")
@click.option("--dry-run", is_flag=True, help="Only look: count what would be re-encrypted; write nothing.")
@click.option("--jobs", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Objects re-encrypted at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def rekey(config_path: Path, old_source: str, dry_run: bool, jobs: int, as_json: bool) -> None:
    """Re-encrypt every object of CONFIG's bucket/prefix from the --from key to CONFIG's current key.

    Server-side copies onto themselves, user metadata kept. Objects already under
    the current key are left alone, so an interrupted run can simply be run again;
    a journal in the cache directory lets it skip what it finished.

    \b
    Exit codes:
      0    every object readable with the old key is now under the current key
           (objects readable with neither key, or stored without SSE-C, are
           listed and skipped: see ssefs check)
      1    some objects failed (listed), or the run could not start
      2    usage error
      130  interrupted (run it again to resume)
    """
    from .rekey import load_rekey_keys, run_rekey

    configure_logging("warning")
    try:
        config = load_config(config_path)
        old, new = load_rekey_keys(config, old_source)
    except SsefsError as error:
        fail(str(error))
    protect_logs(KeyRing(new, (old,)))
    try:
        code = run_rekey(config, old, new, jobs=jobs, dry_run=dry_run, as_json=as_json)
    except SsefsError as error:
        fail(str(error))
    sys.exit(code)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--jobs", type=click.IntRange(1, 256), default=8, show_default=True, help="HEAD requests at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(config_path: Path, jobs: int, as_json: bool) -> None:
    """Report which key each object of CONFIG's bucket/prefix is stored under.

    Counts objects per key fingerprint (the current key and previous_keys: a
    previous key that holds no object any more can be dropped), and lists the
    objects no configured key can read and those stored without SSE-C.

    \b
    Exit codes:
      0    every object opens with a configured key (current or previous_keys)
           and is stored with SSE-C
      1    some objects are unreadable with every configured key, are stored
           without SSE-C, or could not be checked (all listed); or the check
           could not start
      2    usage error
      130  interrupted
    """
    from .rekey import run_check

    configure_logging("warning")
    try:
        config = load_config(config_path)
        keys = load_key_ring(config)
    except SsefsError as error:
        fail(str(error))
    protect_logs(keys)
    try:
        code = run_check(config, keys, jobs=jobs, as_json=as_json)
    except SsefsError as error:
        fail(str(error))
    sys.exit(code)
