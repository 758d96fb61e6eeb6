"""Model-based test: random operation sequences on the mount and on a local reference directory.

Every step is applied twice, to a directory on the local disk (ext4: the reference) and to the
ssefs mount, and both must answer alike: the same return value, or the same errno. After each
step both trees are walked and compared: the set of paths, file type, size, every byte, and the
permission bits (``st_mode & 0o7777``). All file data goes through open/write/close, so "closed"
is the whole state: it must survive a clean remount on the same cache, a ``kill -9`` of the
daemon followed by a new mount on the same cache (docs/cache.md: closed files are recovered), and
a clean unmount followed by a mount with an *empty* cache (then everything comes from S3).

Each hypothesis example gets a fresh bucket, cache and mount. The default run is small; the
``slow`` variant runs many more examples. Shrinking costs a mount per attempt, so it is off unless
``SSEFS_MODEL_SHRINK=1`` is set; a failure reports the unshrunk step sequence, which
``Harness`` methods of the same names replay (see the regression tests at the end).

Each bug found becomes a regression test at the end, replaying the steps that found it (while a bug
is open, its test is marked ``xfail(strict=True)`` and the random runs step around it).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import secrets
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from ssefs.seaweed import SeaweedEndpoint, SeaweedServer

from .conftest import Mount, assert_log_clean, keys, server_bytes, start_mount, write_config

pytestmark = pytest.mark.fuse

BLOCK = 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1


# ---------------------------------------------------------------------- the operations' arguments


@dataclass(frozen=True)
class Data:
    """Deterministic bytes: ``size`` bytes from a PRNG seeded with ``seed`` (short to print)."""

    size: int
    seed: int

    def bytes(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)

    def __repr__(self) -> str:
        return f"Data({self.size}, {self.seed})"


# Three letters, up to three levels: the same names come back as files and as directories.
PATHS = st.lists(st.sampled_from("abc"), min_size=1, max_size=3).map("/".join)
# A path as the steps draw it, resolved against the reference tree (see SsefsModel.pick): steps that act
# on a path (truncate, unlink, chmod...) mostly get one that exists, steps that create one (write, mkdir,
# a rename's target) mostly a new name in an existing directory; sometimes any path at all, for the
# errors (ENOENT, ENOTDIR...).
EXISTING_PATH = st.tuples(st.sampled_from(["existing"] * 7 + ["in_dir"] * 2 + ["any"]), st.integers(0, 99), PATHS)
NEW_PATH = st.tuples(st.sampled_from(["in_dir"] * 5 + ["existing"] * 3 + ["any"] * 2), st.integers(0, 99), PATHS)
# How often each kind of step comes (the first is what a shrunk example falls back to).
STEP_KINDS = st.sampled_from(
    ["write"] * 6 + ["append"] * 2 + ["truncate"] * 3 + ["rename"] * 4 + ["unlink"] * 2 + ["mkdir"] * 4
    + ["rmdir"] * 2 + ["chmod"] * 2 + ["fsync"] + ["read"] + ["unlink_while_open"] + ["rename_while_open"]
    + ["remount", "crash", "remount_empty_cache"]
)
EDGES = [BLOCK - 3, BLOCK, BLOCK + 1, 2 * BLOCK + 5, 3 * BLOCK - 1]
OFFSETS = st.one_of(st.integers(0, 5000), st.sampled_from(EDGES))
SIZES = st.one_of(st.integers(0, 3000), st.sampled_from([4096, BLOCK - 1, BLOCK + 7, 2 * BLOCK + 17]))
DATA = st.builds(Data, SIZES, st.integers(0, 2**16))
SMALL_DATA = st.builds(Data, st.integers(1, 3000), st.integers(0, 2**16))
TRUNCATE_SIZES = st.one_of(st.integers(0, 6000), st.sampled_from(EDGES))
# No setgid: ext4 makes it inherited by new subdirectories (BSD group semantics); ssefs documents that new
# files get the creator's gid, so that difference is by design, not something to find again and again.
FILE_MODES = st.sampled_from([0o644, 0o600, 0o755, 0o400, 0o000, 0o777, 0o4755, 0o1644])
DIR_MODES = st.sampled_from([0o755, 0o700, 0o777, 0o1777, 0o750, 0o500])
OPEN_KINDS = st.sampled_from(["create", "truncate", "exclusive", "existing"])
OPEN_FLAGS = {
    "create": os.O_CREAT,
    "truncate": os.O_CREAT | os.O_TRUNC,
    "exclusive": os.O_CREAT | os.O_EXCL,
    "existing": 0,
}


# ---------------------------------------------------------------------- outcomes and snapshots


def outcome(operation: Callable[[Path], object], root: Path) -> tuple[str, object]:
    """What an operation did under ``root``: ("ok", its value) or ("error", the errno's name)."""
    try:
        return "ok", operation(root)
    except OSError as error:
        return "error", errno.errorcode.get(error.errno or 0, str(error.errno))


@dataclass(frozen=True)
class Item:
    kind: str  # "file", "dir" or "other"
    mode: int  # st_mode & 0o7777
    size: int = 0  # files only: st_size
    digest: str = ""  # files only: SHA-256 of the bytes read
    read_size: int = 0  # files only: how many bytes reading the whole file gave (must be st_size)


def snapshot(root: Path) -> dict[str, Item]:
    """Every path under ``root`` with its type, permission bits, size and content digest."""
    found: dict[str, Item] = {}
    pending = [(root, "")]
    while pending:
        directory, relative = pending.pop()
        for name in sorted(os.listdir(directory)):
            path, name_relative = directory / name, relative + name
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                found[name_relative] = Item("dir", stat.S_IMODE(info.st_mode))
                pending.append((path, name_relative + "/"))
            elif stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
                found[name_relative] = Item(
                    "file", stat.S_IMODE(info.st_mode), info.st_size, hashlib.sha256(content).hexdigest(), len(content)
                )
            else:
                found[name_relative] = Item("other", info.st_mode)
    return found


def first_difference(left: bytes, right: bytes) -> int:
    for index, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return index
    return min(len(left), len(right))


def renameat2(flags: int) -> Callable[[Path, Path], None]:
    def call(source: Path, target: Path) -> None:
        if _libc.renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(source))

    return call


# ---------------------------------------------------------------------- the harness


@dataclass
class Env:
    """What every example needs from the session: the server, the key, a scratch directory."""

    seaweed: SeaweedServer
    endpoint: SeaweedEndpoint
    key_file: Path
    key_bytes: bytes
    base: Path


@dataclass
class Figures:
    examples: int = 0
    steps: int = 0
    ops_checked: int = 0
    failing_ops_matched: int = 0
    remounts: int = 0
    crashes: int = 0
    empty_cache_remounts: int = 0
    started: float = field(default_factory=time.monotonic)
    # Per step name: how many succeeded on both sides, how many failed on both sides with the same errno.
    outcomes: Counter[str] = field(default_factory=Counter)

    def line(self, name: str) -> str:
        return (
            f"FIGURES {name} model_examples={self.examples} steps={self.steps} ops_checked={self.ops_checked} "
            f"errno_matches={self.failing_ops_matched} remounts={self.remounts} crashes={self.crashes} "
            f"empty_cache_remounts={self.empty_cache_remounts} "
            f"seconds={time.monotonic() - self.started:.1f}\n"
            f"FIGURES {name}-outcomes " + " ".join(f"{key}={value}" for key, value in sorted(self.outcomes.items()))
        )


class Harness:
    """One bucket, one mount (remounted, crashed and restarted at will) and one reference directory.

    Each public method is one step: it runs on both sides, compares the outcomes, then compares the
    trees. A failure names the step and lists the steps so far, ready to paste into a regression test.
    """

    def __init__(self, env: Env, figures: Figures, *, writeback_delay: float) -> None:
        self.env, self.figures = env, figures
        self.directory = env.base / f"example-{secrets.token_hex(4)}"
        self.directory.mkdir()
        self.local = self.directory / "local"
        self.local.mkdir()
        self.mnt = self.directory / "mnt"
        self.bucket = "m-" + secrets.token_hex(6)
        env.seaweed.create_bucket(self.bucket)
        self.s3 = env.endpoint.client()
        self.writeback_delay = writeback_delay
        self.history: list[str] = [f"Harness(writeback_delay={writeback_delay})"]
        self.logs: list[Path] = []
        self.caches = 0
        self.failed = self.closed = False
        self.remounts = self.crashes = self.empty_cache_remounts = 0
        self.config = self._new_config()
        self.mount: Mount | None = self._start()
        figures.examples += 1

    # -------------------------------------------------------------- mounts

    def _new_config(self) -> Path:
        self.caches += 1
        name = f"cache{self.caches}"
        assert not (self.directory / f"{name}-cache").exists()
        return write_config(
            self.directory, self.env.endpoint, self.bucket, self.env.key_file, name=name,
            cache_extra=f"writeback_delay = {self.writeback_delay}",
        )

    def _start(self) -> Mount:
        log = self.directory / f"ssefs{len(self.logs)}.log"
        self.logs.append(log)
        return start_mount(self.config, self.mnt, log)

    def _stop_cleanly(self) -> None:
        assert self.mount is not None
        code = self.mount.stop()
        self.mount = None
        self._check(code == 0, f"the daemon exited with {code} at unmount")

    def close(self) -> None:
        """End of the example: unmount (always), then check the exit code and the logs."""
        if self.closed:
            return
        try:
            if self.mount is not None:
                if self.mount.process.poll() is None:
                    code = self.mount.stop()
                    if not self.failed:
                        self._check(code == 0, f"the daemon exited with {code} at unmount")
                else:
                    self.mount.stop()
                self.mount = None
            if not self.failed:
                for log in self.logs:
                    text = log.read_text(errors="replace") if log.exists() else ""
                    assert_log_clean(text, [self.env.key_bytes])
        finally:
            self.closed = True
            shutil.rmtree(self.directory, ignore_errors=True)

    # -------------------------------------------------------------- comparing

    def _check(self, condition: bool, message: str) -> None:
        if not condition:
            self.failed = True
            steps = "\n  ".join(self.history)
            raise AssertionError(f"{message}\nsteps so far:\n  {steps}")

    def _both(self, step: str, operation: Callable[[Path], object]) -> object:
        self.history.append(step)
        self.figures.steps += 1
        expected = outcome(operation, self.local)
        got = outcome(operation, self.mnt)
        self._check(expected == got, f"{step}: the local disk answered {expected!r}, ssefs {got!r}")
        self.figures.ops_checked += 1
        operation_name = step[2:step.index("(")]
        if expected[0] == "error":
            self.figures.failing_ops_matched += 1
            self.figures.outcomes[f"{operation_name}:{expected[1]}"] += 1
        else:
            self.figures.outcomes[f"{operation_name}:ok"] += 1
        self.compare(step)
        return expected[1]

    def _mounted_snapshot(self, step: str) -> dict[str, Item]:
        try:
            return snapshot(self.mnt)
        except OSError as error:
            self._check(False, f"after {step}, walking and reading the mount failed: {error!r}")
            raise

    def compare(self, step: str) -> None:
        expected, got = snapshot(self.local), self._mounted_snapshot(step)
        if expected == got:
            return
        problems = []
        for path in sorted(set(expected) | set(got)):
            want, have = expected.get(path), got.get(path)
            if want == have:
                continue
            if want is None or have is None:
                problems.append(f"{path}: local {want}, ssefs {have}")
            elif want.kind == have.kind == "file" and want.digest != have.digest and want.size == have.size:
                offset = first_difference((self.local / path).read_bytes(), (self.mnt / path).read_bytes())
                problems.append(f"{path}: same size {want.size}, content differs from offset {offset}")
            else:
                problems.append(
                    f"{path}: local {want.kind} mode {want.mode:o} size {want.size}, "
                    f"ssefs {have.kind} mode {have.mode:o} size {have.size} (reads {have.read_size} bytes)"
                )
        self._check(False, f"after {step}, the trees differ:\n    " + "\n    ".join(problems))

    def check_server(self) -> None:
        """After a clean unmount, S3 holds every file with its bytes, and no other file."""
        model = {path: item for path, item in snapshot(self.local).items() if item.kind == "file"}
        stored = {key for key in keys(self.s3, self.bucket) if not key.endswith("/") and
                  not key.endswith(".ssefs-dirs")}
        self._check(stored == set(model), f"S3 holds files {sorted(stored)}, the model {sorted(model)}")
        for path in sorted(model):
            content = server_bytes(self.s3, self.bucket, path, self.env.key_bytes)
            self._check(hashlib.sha256(content).hexdigest() == model[path].digest,
                        f"S3's {path} ({len(content)} bytes) is not the model's ({model[path].size} bytes)")

    # -------------------------------------------------------------- steps on both sides

    def write(self, path: str, offset: int, data: Data, mode: int = 0o644, kind: str = "create") -> None:
        payload = data.bytes()

        def operation(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | OPEN_FLAGS[kind], mode)
            try:
                return os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)

        self._both(f"h.write({path!r}, {offset}, {data!r}, {mode:#o}, {kind!r})", operation)

    def append(self, path: str, data: Data) -> None:
        payload = data.bytes()

        def operation(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                return os.write(fd, payload)
            finally:
                os.close(fd)

        self._both(f"h.append({path!r}, {data!r})", operation)

    def truncate(self, path: str, size: int, through_handle: bool = False) -> None:
        def operation(root: Path) -> None:
            if not through_handle:
                os.truncate(root / path, size)
                return
            fd = os.open(root / path, os.O_RDWR)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)

        self._both(f"h.truncate({path!r}, {size}, through_handle={through_handle})", operation)

    def rename(self, source: str, target: str, noreplace: bool = False) -> None:
        call = renameat2(RENAME_NOREPLACE) if noreplace else os.rename
        self._both(f"h.rename({source!r}, {target!r}, noreplace={noreplace})",
                   lambda root: call(root / source, root / target))

    def unlink(self, path: str) -> None:
        self._both(f"h.unlink({path!r})", lambda root: os.unlink(root / path))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._both(f"h.mkdir({path!r}, {mode:#o})", lambda root: os.mkdir(root / path, mode))

    def rmdir(self, path: str) -> None:
        self._both(f"h.rmdir({path!r})", lambda root: os.rmdir(root / path))

    def chmod(self, path: str, mode: int) -> None:
        self._both(f"h.chmod({path!r}, {mode:#o})", lambda root: os.chmod(root / path, mode))

    def fsync(self, path: str, data: Data | None = None) -> None:
        payload = data.bytes() if data is not None else b""

        def operation(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND)
            try:
                if payload:
                    os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)

        self._both(f"h.fsync({path!r}, {data!r})", operation)

    def read(self, path: str, offset: int, size: int) -> None:
        def operation(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)

        self._both(f"h.read({path!r}, {offset}, {size})", operation)

    def unlink_while_open(self, path: str, data: Data) -> None:
        """Open, unlink, then write and read through the descriptor: what the handle sees must agree."""
        payload = data.bytes()

        def operation(root: Path) -> tuple[int, str]:
            fd = os.open(root / path, os.O_RDWR)
            try:
                os.unlink(root / path)
                os.pwrite(fd, payload, 0)
                size = os.fstat(fd).st_size
                content = os.pread(fd, size + 10, 0)
                return size, hashlib.sha256(content).hexdigest()
            finally:
                os.close(fd)

        self._both(f"h.unlink_while_open({path!r}, {data!r})", operation)

    def rename_while_open(self, source: str, target: str, data: Data) -> None:
        """Write, rename while still open for writing, write more, close: the target has it all."""
        payload = data.bytes()

        def operation(root: Path) -> None:
            fd = os.open(root / source, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, payload, 0)
                os.rename(root / source, root / target)
                os.pwrite(fd, payload, len(payload))
            finally:
                os.close(fd)

        self._both(f"h.rename_while_open({source!r}, {target!r}, {data!r})", operation)

    # -------------------------------------------------------------- steps on the mount only

    def _mount_step(self, step: str) -> None:
        self.history.append(step)
        self.figures.steps += 1

    def remount(self) -> None:
        """Clean unmount (which uploads everything), check S3, mount again on the same cache."""
        self._mount_step("h.remount()")
        self._stop_cleanly()
        self.check_server()
        self.mount = self._start()
        self.remounts += 1
        self.figures.remounts += 1
        self.compare("h.remount()")

    def crash(self) -> None:
        """kill -9 the daemon, then mount again at once on the same cache: every closed file is back.

        The new daemon detaches the dead mount itself (test_restart_at_once_after_kill_9).
        """
        self._mount_step("h.crash()")
        assert self.mount is not None
        self.mount.process.kill()
        self.mount.process.wait(timeout=30)
        self.mount = self._start()
        self.crashes += 1
        self.figures.crashes += 1
        self.compare("h.crash()")

    def remount_empty_cache(self) -> None:
        """Clean unmount, then a mount with a new, empty cache: everything must come from S3."""
        self._mount_step("h.remount_empty_cache()")
        self._stop_cleanly()
        self.check_server()
        self.config = self._new_config()
        self.mount = self._start()
        self.empty_cache_remounts += 1
        self.figures.empty_cache_remounts += 1
        self.compare("h.remount_empty_cache()")


# ---------------------------------------------------------------------- the state machine


Choice = tuple[str, int, str]


def machine_for(env: Env, figures: Figures) -> type[RuleBasedStateMachine]:
    class SsefsModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.harness: Harness | None = None

        @property
        def h(self) -> Harness:
            assert self.harness is not None
            return self.harness

        def pick(self, choice: Choice) -> str:
            """Turn a drawn EXISTING_PATH or NEW_PATH into a path, from the reference tree as it is now."""
            how, index, fresh = choice
            tree = snapshot(self.h.local)
            if how == "existing" and tree:
                return sorted(tree)[index % len(tree)]
            if how in ("in_dir", "existing"):
                directories = [""] + sorted(path + "/" for path, item in tree.items() if item.kind == "dir")
                return directories[index % len(directories)] + fresh[-1]
            return fresh

        @initialize(delay=st.sampled_from([0.5, 0.0, 600.0]))
        def start(self, delay: float) -> None:
            self.harness = Harness(env, figures, writeback_delay=delay)

        @rule(data=st.data())
        def step(self, data: st.DataObject) -> None:
            """One step, its kind drawn with weights (hypothesis alone would pick rules evenly)."""
            h = self.h
            kind = data.draw(STEP_KINDS, label="kind")
            creates = kind in ("write", "append", "mkdir", "rename_while_open")
            path = self.pick(data.draw(NEW_PATH if creates else EXISTING_PATH, label="path"))
            if kind == "remount" and h.remounts >= 2 or kind == "crash" and h.crashes >= 2 or \
                    kind == "remount_empty_cache" and h.empty_cache_remounts >= 1:
                kind = "read"
            if kind == "write":
                h.write(path, data.draw(OFFSETS), data.draw(DATA), data.draw(FILE_MODES), data.draw(OPEN_KINDS))
            elif kind == "append":
                h.append(path, data.draw(SMALL_DATA))
            elif kind == "truncate":
                h.truncate(path, data.draw(TRUNCATE_SIZES), data.draw(st.booleans()))
            elif kind == "rename":
                h.rename(path, self.pick(data.draw(NEW_PATH)), data.draw(st.booleans()))
            elif kind == "unlink":
                h.unlink(path)
            elif kind == "mkdir":
                h.mkdir(path, data.draw(DIR_MODES))
            elif kind == "rmdir":
                h.rmdir(path)
            elif kind == "chmod":
                h.chmod(path, data.draw(st.one_of(FILE_MODES, DIR_MODES)))
            elif kind == "fsync":
                h.fsync(path, data.draw(st.none() | SMALL_DATA))
            elif kind == "read":
                h.read(path, data.draw(OFFSETS), data.draw(st.sampled_from([1, 100, 5000, BLOCK + 3])))
            elif kind == "unlink_while_open":
                h.unlink_while_open(path, data.draw(SMALL_DATA))
            elif kind == "rename_while_open":
                h.rename_while_open(path, self.pick(data.draw(NEW_PATH)), data.draw(SMALL_DATA))
            elif kind == "remount":
                h.remount()
            elif kind == "crash":
                h.crash()
            else:
                assert kind == "remount_empty_cache", kind
                h.remount_empty_cache()

        def teardown(self) -> None:
            if self.harness is not None:
                self.harness.close()

    return SsefsModel


def run_model(env: Env, figures: Figures, *, examples: int, steps: int) -> None:
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("SSEFS_MODEL_SHRINK") == "1":
        phases.append(Phase.shrink)
    run_state_machine_as_test(
        machine_for(env, figures),
        settings=settings(
            max_examples=examples, stateful_step_count=steps, deadline=None, database=None, phases=phases,
            suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False,
        ),
    )


@pytest.fixture
def env(seaweed: SeaweedServer, endpoint: SeaweedEndpoint, key_file: Path, key_bytes: bytes,
        tmp_path: Path) -> Env:
    return Env(seaweed, endpoint, key_file, key_bytes, tmp_path)


@pytest.mark.timeout(600)
def test_random_operation_sequences_match_the_local_disk(env: Env) -> None:
    figures = Figures()
    try:
        run_model(env, figures, examples=15, steps=30)
    finally:
        print(figures.line("model"))
    assert figures.examples >= 15 and figures.ops_checked > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_random_operation_sequences_match_the_local_disk_many(env: Env) -> None:
    figures = Figures()
    try:
        run_model(env, figures, examples=int(os.environ.get("SSEFS_MODEL_EXAMPLES", "150")), steps=40)
    finally:
        print(figures.line("model-slow"))
    assert figures.ops_checked > 0


# ---------------------------------------------------------------------- explicit sequences


@pytest.fixture
def harness(env: Env) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []
    figures = Figures()

    def factory(writeback_delay: float = 0.5) -> Harness:
        made.append(Harness(env, figures, writeback_delay=writeback_delay))
        return made[-1]

    try:
        yield factory
    finally:
        for each in made:
            each.close()


def test_every_kind_of_step_once(harness: Callable[..., Harness]) -> None:
    """A fixed walk through every step, so each is known to work on its own (and errnos agree)."""
    h = harness(writeback_delay=600.0)
    h.mkdir("a", 0o750)
    h.write("a/b", BLOCK - 3, Data(10, 1), 0o600, "create")  # sparse, across a block boundary
    h.write("a/b", 0, Data(5, 2), 0o644, "existing")
    h.append("a/b", Data(100, 3))
    h.truncate("a/b", 2 * BLOCK + 5)
    h.truncate("a/b", 7, through_handle=True)
    h.write("c", 0, Data(3000, 4), 0o644, "exclusive")
    h.write("c", 0, Data(1, 5), 0o644, "exclusive")  # EEXIST
    h.write("b/a", 0, Data(1, 5))  # ENOENT: no directory b
    h.write("c/a", 0, Data(1, 5))  # ENOTDIR: c is a file
    h.write("a", 0, Data(1, 5))  # EISDIR
    h.rmdir("a")  # ENOTEMPTY
    h.unlink("a")  # EISDIR
    h.rmdir("c")  # ENOTDIR
    h.mkdir("a")  # EEXIST
    h.chmod("c", 0o4755)
    h.chmod("a", 0o1777)
    h.fsync("c", Data(10, 6))
    h.read("c", 2990, 100)
    h.rename("c", "a")  # EISDIR: a file over a directory
    h.rename("a", "c")  # ENOTDIR: a directory over a file
    h.rename("a", "a/b/c")  # ENOTDIR (b is a file) or EINVAL: the kernel decides, on both sides
    h.rename("a", "b")  # a directory with a file in it
    h.rename("c", "b/b")  # a file over another file
    h.rename("b/b", "c", noreplace=True)
    h.write("b/c", 0, Data(4, 7))
    h.rename("c", "b/c", noreplace=True)  # EEXIST
    h.unlink_while_open("b/c", Data(50, 8))
    h.rename_while_open("b/x", "c", Data(70, 9))
    h.crash()
    h.remount()
    h.mkdir("e")
    h.rename("b", "e")  # a directory over an empty directory
    h.remount_empty_cache()
    h.rmdir("e/b")  # ENOENT
    h.unlink("e/c")
    h.unlink("c")
    h.rmdir("e")


def test_shrunk_rename_over_a_file_rewritten_empty(harness: Callable[..., Harness]) -> None:
    """The model's first shrunk failure, replayed without background uploads (the race itself is
    test_rename_over_a_file_being_uploaded): renames over a file rewritten empty, then S3 from scratch."""
    h = harness(writeback_delay=600.0)
    for _ in range(4):
        h.write("a", 0, Data(0, 0), 0o644, "create")
    h.write("c", 0, Data(4096, 0), 0o644, "create")
    h.mkdir("a", 0o755)  # EEXIST
    h.rename("c", "a")
    h.rename("a", "a")
    h.remount_empty_cache()


def test_sequence_that_found_the_stale_listing(harness: Callable[..., Harness]) -> None:
    """A failing sequence from a random run (writeback_delay 600, two crashes): after the second crash
    the recovery upload of b raced the first listing (test_listing_in_flight_during_an_upload_shows_stale_size).
    Kept as it was found, failing steps included; compare() looks again after attr_timeout."""
    h = harness(writeback_delay=600.0)
    h.rename("a", "a", noreplace=True)
    h.truncate("c", 3145727, through_handle=False)
    h.write("b", 2097157, Data(1048575, 1528), 0o644, "create")
    h.write("b", 1048573, Data(4096, 262), 0o0, "create")
    h.crash()
    h.mkdir("a/b/b", 0o500)
    h.write("b", 1048573, Data(2845, 2627), 0o777, "truncate")
    h.rmdir("b")
    h.write("b", 1048576, Data(4096, 41892), 0o600, "exclusive")
    h.rename("b", "b")
    h.mkdir("c", 0o777)
    h.write("a/b/a", 1048573, Data(1418, 7959), 0o644, "exclusive")
    h.mkdir("b", 0o500)
    h.rename("b", "c")
    h.truncate("c", 4514, through_handle=True)
    h.write("c/c", 2097157, Data(4096, 867), 0o4755, "truncate")
    h.crash()
    h.remount_empty_cache()


def test_sequence_that_lost_a_chmod_across_kill_9(harness: Callable[..., Harness]) -> None:
    """A failing sequence from a random run (-m slow, writeback_delay 0.5): c is uploaded, then its
    chmod is a self-copy, which keeps the ETag and landed in the same second as the upload; the new
    row of the metadata index waited for its batch when the daemon was killed, and the old row
    (mode 644) matched the copied object after the restart. Fixed (MetadataIndex.forget_now before
    the copy); kept as it was found, failing steps included."""
    h = harness(writeback_delay=0.5)
    h.remount_empty_cache()
    h.rmdir("b")
    h.write("a", 86, Data(1169, 256), 0o644, "existing")
    h.write("a", 1356, Data(1048583, 10257), 0o644, "truncate")
    h.read("a", 3443, 5000)
    h.chmod("b", 0o1644)
    h.write("c", 168, Data(516, 111), 0o644, "create")
    h.remount()
    h.mkdir("b/a/c", 0o700)
    h.rmdir("a")
    h.write("c", 4733, Data(1146, 8065), 0o755, "truncate")
    h.write("a", 1048577, Data(1108, 26670), 0o600, "truncate")
    h.rename("a", "b", noreplace=False)
    h.remount()
    h.rmdir("c")
    h.truncate("b", 2641, through_handle=False)
    h.unlink_while_open("c", Data(675, 2984))
    h.append("a", Data(292, 200))
    h.unlink_while_open("c", Data(349, 2140))
    h.unlink("a")
    h.rmdir("b")
    h.read("b", 301, 5000)
    h.truncate("b", 3820, through_handle=True)
    h.rename("b", "c", noreplace=False)
    h.mkdir("c", 0o750)
    h.truncate("b", 1048577, through_handle=False)
    h.rename("c", "c", noreplace=False)
    h.rename("b", "c", noreplace=False)
    h.rmdir("b")
    h.crash()
    h.chmod("c", 0o500)
    h.crash()


def test_restart_at_once_after_kill_9(harness: Callable[..., Harness]) -> None:
    """Found by the model (a crash right after the mount): ssefs/mount.py check_mountpoint() took the dead
    mount for a live one while the kernel answered stat() from the root's cached attributes (attr_timeout
    after the kill), and refused to mount with 'already a mount point'. Fixed; kept as a regression test."""
    h = harness()
    h.write("a", 0, Data(10, 1))
    os.stat(h.mnt)  # e.g. ls -ld MOUNTPOINT, or the shell's cd: the kernel now holds the root's attributes
    h.crash()


def test_concurrent_releases_of_one_file_log_no_keyerror(harness: Callable[..., Harness]) -> None:
    """Found by the model: write-and-close a file, then read it at once, again and again.

    The kernel sends RELEASE after close() returned, so the writer's release (which syncs the cache
    entry in a thread) is still running when the reader's open and release arrive. ssefs/vfs.py
    release() then deleted _open_files[inode] a second time: KeyError, a traceback in the log and EIO.
    Fixed; kept as a regression test.
    """
    h = harness()
    path = h.mnt / "a"
    for _attempt in range(300):  # it failed about once in 12 rounds
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(fd, b"", 0)
        os.close(fd)
        path.read_bytes()
    assert h.mount is not None
    assert "unexpected error in release" not in h.mount.log(), h.mount.log()


def test_rename_over_a_file_being_uploaded(harness: Callable[..., Harness]) -> None:
    """Found by the model: a file renamed over another whose upload is in flight.

    Shrunk from: write a (0 bytes) x4, write c (4096 bytes), rename c -> a, with writeback_delay 0:
    after a clean unmount S3's a had 0 bytes: ssefs/vfs.py rename() copied the source before dropping
    the target's cache entry, so the target's upload in flight landed after the copy (data loss). Here
    the target's upload is made long (8 MiB) so that the race would be lost every time. Fixed; kept as a
    regression test.
    """
    h = harness(writeback_delay=0.0)
    h.write("c", 0, Data(100, 1))
    h.fsync("c")  # c is clean: the rename is a server-side copy
    h.write("a", 0, Data(8 * BLOCK, 2))  # its upload starts at once and takes a while
    h.rename("c", "a")
    time.sleep(2.5)  # attr_timeout is 1 s: the mount lists the bucket again
    h.compare("2.5 s later")
    h.remount_empty_cache()


def test_rename_of_a_file_being_uploaded(harness: Callable[..., Harness]) -> None:
    """Found by the model (a file renamed right after close, writeback_delay 0): S3 lost the file.

    ssefs/vfs.py rename() decided that the source had changes before taking its lock; the upload in
    flight then made it clean under the old key, nothing was uploaded under the new one, and the old
    key was deleted. Fixed; kept as a regression test (an editor's write-temp-then-rename).
    """
    h = harness(writeback_delay=0.0)
    h.write("a", 0, Data(8 * BLOCK, 3))  # its upload starts at once and takes a while
    h.rename("a", "c")
    time.sleep(2.5)
    h.compare("2.5 s later")
    h.remount_empty_cache()


def test_rename_of_a_directory_while_a_file_in_it_is_uploaded(harness: Callable[..., Harness]) -> None:
    h = harness(writeback_delay=0.0)
    h.mkdir("d")
    h.write("d/a", 0, Data(8 * BLOCK, 4))
    h.rename("d", "e")
    time.sleep(2.5)
    h.compare("2.5 s later")
    h.remount_empty_cache()


def test_listing_in_flight_during_an_upload_shows_stale_size(harness: Callable[..., Harness]) -> None:
    """Found by the model (a crash, then the recovery upload raced the first listing); made repeatable here.

    Each listing is made slow with 1,000 new objects stored without SSE-C: the mount cannot learn
    their attributes, so the listing sends one HEAD for each (about 2 s here). The file's upload (an
    fsync) finishes while that listing is in flight. Fixed (changes made while a LIST is in flight win
    over what it returns); kept as a regression test.
    """
    h = harness(writeback_delay=600.0)
    path = h.mnt / "b"
    old = Data(3 * BLOCK, 1).bytes()
    path.write_bytes(old)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # S3 holds 3 MiB
    os.close(fd)
    # Objects without SSE-C in the root: every listing HEADs each of them.
    client = boto3.client(
        "s3", endpoint_url=h.env.endpoint.endpoint, region_name=h.env.endpoint.region,
        aws_access_key_id=h.env.endpoint.access_key_id, aws_secret_access_key=h.env.endpoint.secret_access_key,
        verify=str(h.env.endpoint.ca_bundle), config=botocore.config.Config(max_pool_connections=32),
    )
    seen: list[tuple[float, int, bytes]] = []
    for round_number, pause in enumerate([0.02, 0.05, 0.08, 0.11, 0.15, 0.2, 0.3, 0.4]):
        # New objects each round: the mount remembers which ones it could not read.
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(
                lambda key: client.put_object(Bucket=h.bucket, Key=key, Body=b""),
                [f"z{round_number}-{index:04d}" for index in range(1000)],
            ))
        path.write_bytes(b"x" * 1024)  # 1 KiB, not uploaded yet
        time.sleep(1.5)  # the cached listing of the root expires
        lister = threading.Thread(target=os.listdir, args=(h.mnt,))
        started = time.monotonic()
        lister.start()
        time.sleep(pause)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # uploaded while the listing is in flight
        os.close(fd)
        lister.join(timeout=120)
        print(f"pause {pause}: listing took {time.monotonic() - started:.3f} s, size {os.stat(path).st_size}")
        seen.append((pause, os.stat(path).st_size, path.read_bytes()))
        if seen[-1][1:] != (1024, b"x" * 1024):
            break
        path.write_bytes(old)  # S3 must hold another size again for the next attempt
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    sizes = [(pause, size, len(content), content[-4:]) for pause, size, content in seen]
    assert all(item[1:] == (1024, b"x" * 1024) for item in seen), f"pause, stat size, bytes read, last bytes: {sizes}"


def test_rmdir_while_its_last_file_uploads(harness: Callable[..., Harness]) -> None:
    """Found by the model once uploads got faster (writeback_delay 0): rmdir of a directory whose only
    file was uploading succeeded, and the file stayed in S3 under a directory that was gone.

    ssefs/vfs.py rmdir() listed the prefix and then asked the cache for files with changes; an upload
    that landed while the listing was on its way made the file clean after the listing had missed it.
    The cache is now asked first as well. Without the fix this failed within 25 rounds every time
    (3 runs of 3)."""
    h = harness(writeback_delay=0.0)
    for round_ in range(25):
        h.mkdir("a", 0o755)
        h.append("a/b", Data(729, round_))
        h.rmdir("a")  # ENOTEMPTY
        h.unlink("a/b")
        h.rmdir("a")
