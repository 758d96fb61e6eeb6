"""A loopback TCP proxy for tests: counts bytes and injects network faults.

It sits between ssefs and SeaweedFS (TLS passes through untouched, and the
test certificate is valid for 127.0.0.1 on any port), one thread per direction
of each connection. What it can do to the traffic:

- ``down()`` resets every open connection and every new one until ``up()``
  (a server that crashed or is unreachable);
- ``set_latency(per_chunk=, per_connection=)`` delays each forwarded chunk
  (at most ``chunk_size`` bytes) and each new connection: slow, not broken;
- ``inject(kind, after=N, direction=, times=)`` acts on each connection once
  it has forwarded ``after`` more bytes (counted from the call) in
  ``direction`` (``"from_server"``, ``"to_server"`` or ``"both"``: either one
  reaching N), on the first ``times`` connections that get there (all when
  None), until ``clear()``:

  - ``"reset"``: close both sides with RST, mid-transfer;
  - ``"truncate"``: close both sides cleanly (FIN), so the peer sees a body
    that ends early rather than an error (``direction="to_server"``: the
    server gets a FIN);
  - ``"stall"``: stop forwarding in both directions (a blackhole); with
    ``after=0`` and ``direction`` ``"to_server"`` or ``"both"``, new
    connections are accepted but never connected onward.
    ``clear()`` closes what was stalled (its client gave up long ago);

- ``retarget(host, port)``: send new connections to another server (one that
  was restarted on another port).

``bytes_from_server``/``bytes_to_server`` count what went through, and
``faults_injected`` how many connections a fault (or ``down()``) cut, stalled
or truncated.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

FaultKind = Literal["reset", "truncate", "stall"]
Direction = Literal["from_server", "to_server", "both"]


@dataclass
class _Fault:
    kind: FaultKind
    after: int
    direction: Direction
    times: int | None
    whole_chunk: bool


@dataclass(eq=False)
class _Link:
    """One proxied connection: the two sockets and what went through since the last ``inject``."""

    client: socket.socket
    server: socket.socket | None
    counted: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    stalled: bool = False
    dead: bool = False
    draining: bool = False

    def sockets(self) -> list[socket.socket]:
        return [self.client] + ([self.server] if self.server is not None else [])


class TcpProxy:
    chunk_size = 65536

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._links: list[_Link] = []
        self._is_down = False
        self._closed = False
        self._fault: _Fault | None = None
        self._fault_uses = 0
        self.latency_per_chunk = 0.0
        self.latency_per_connection = 0.0
        self.bytes_from_server = 0
        self.bytes_to_server = 0
        self.connections = 0
        self.faults_injected = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections proxied now (idle ones in a client's pool included)."""
        with self._lock:
            return len([link for link in self._links if not link.dead])

    # ------------------------------------------------------------------ controls

    def down(self) -> None:
        with self._lock:
            self._is_down = True
            links, self._links = self._links, []
            self.faults_injected += len([link for link in links if not link.dead])
        for link in links:
            self._kill(link, rst=True)

    def up(self) -> None:
        with self._lock:
            self._is_down = False

    def set_latency(self, per_chunk: float = 0.0, per_connection: float = 0.0) -> None:
        with self._lock:
            self.latency_per_chunk = per_chunk
            self.latency_per_connection = per_connection

    def inject(self, kind: FaultKind, *, after: int = 0, direction: Direction = "from_server",
               times: int | None = None, whole_chunk: bool = False) -> None:
        """Act on connections once they forward ``after`` more bytes in ``direction`` (see the module doc).

        ``whole_chunk``: still forward the rest of the chunk (one ``recv``, e.g. one
        TLS record written alone) in which byte ``after`` arrived, then act.
        """
        with self._lock:
            self._fault = _Fault(kind, after, direction, times, whole_chunk)
            self._fault_uses = 0
            for link in self._links:
                link.counted = {True: 0, False: 0}
        if after == 0 and kind != "stall":
            # Nothing is ever forwarded on a connection cut at byte 0: cut the open ones now.
            for link in self._affected_now():
                self._kill(link, rst=kind == "reset")

    def clear(self) -> None:
        """No more faults; connections held by a stall are closed (their clients gave up)."""
        with self._lock:
            self._fault = None
            stalled = [link for link in self._links if link.stalled]
            self._changed.notify_all()
        for link in stalled:
            self._kill(link, rst=True)

    def retarget(self, host: str, port: int) -> None:
        """Connect new connections to ``host:port`` from now on."""
        with self._lock:
            self.target = (host, port)

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_from_server = 0
            self.bytes_to_server = 0

    # ------------------------------------------------------------------ forwarding

    def _affected_now(self) -> list[_Link]:
        with self._lock:
            chosen = []
            for link in self._links:
                if link.dead or not self._take_fault_use():
                    continue
                chosen.append(link)
            return chosen

    def _take_fault_use(self) -> bool:
        """Under the lock: whether the current fault may act on one more connection (and count it)."""
        fault = self._fault
        if fault is None or (fault.times is not None and self._fault_uses >= fault.times):
            return False
        self._fault_uses += 1
        self.faults_injected += 1
        return True

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._is_down
                fault = self._fault
                # Nothing from the client is ever to be forwarded: do not even connect onward.
                blackhole = fault is not None and fault.kind == "stall" and fault.after == 0 \
                    and fault.direction != "from_server" and self._take_fault_use()
                target = self.target
                delay = self.latency_per_connection
                self.connections += 1
                if down:
                    self.faults_injected += 1
            if down:
                _reset(client)
                continue
            if blackhole:
                with self._lock:
                    self._links.append(_Link(client, None, stalled=True))
                continue
            threading.Thread(target=self._connect, args=(client, target, delay), daemon=True).start()

    def _connect(self, client: socket.socket, target: tuple[str, int], delay: float) -> None:
        if delay:
            time.sleep(delay)
        try:
            server = socket.create_connection(target, timeout=5)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        link = _Link(client, server)
        with self._lock:
            if self._is_down or self._closed:
                link.dead = True
            else:
                self._links.append(link)
        if link.dead:
            self._kill(link, rst=True)
            return
        threading.Thread(target=self._pump, args=(link, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(link, True), daemon=True).start()

    def _pump(self, link: _Link, from_server: bool) -> None:
        assert link.server is not None
        source, sink = (link.server, link.client) if from_server else (link.client, link.server)
        try:
            while True:
                data = source.recv(self.chunk_size)
                if not data:
                    break
                if link.draining:
                    continue  # truncated: read (and drop) what still comes, so closing sends no RST
                with self._lock:
                    delay = self.latency_per_chunk
                if delay:
                    time.sleep(delay)
                action, data = self._apply_fault(link, from_server, data)
                if data:
                    if action is None:  # (a stall this chunk started comes after its last bytes)
                        self._wait_while_stalled(link)
                    if link.draining:
                        continue
                    if link.dead:
                        return
                    sink.sendall(data)
                    with self._lock:
                        if from_server:
                            self.bytes_from_server += len(data)
                        else:
                            self.bytes_to_server += len(data)
                if action == "stall":
                    self._wait_while_stalled(link)
                    if link.dead and not link.draining:
                        return
                elif action is not None:
                    self._kill(link, rst=action == "reset")
                    if action == "reset":
                        return
        except OSError:
            pass
        finally:
            with self._lock:
                ended_here = not link.dead and not link.stalled
                if ended_here:
                    link.dead = True
                if (ended_here or link.draining) and link in self._links:
                    self._links.remove(link)
            if ended_here:
                # One side finished (or failed): end both, as a plain proxy does.
                for end in link.sockets():
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _apply_fault(self, link: _Link, from_server: bool, data: bytes) -> tuple[FaultKind | None, bytes]:
        """Count ``data``; when the fault triggers, return its kind and the part still to forward."""
        with self._lock:
            fault = self._fault
            if fault is None or link.stalled:
                return None, data
            if fault.direction != "both" and fault.direction != ("from_server" if from_server else "to_server"):
                return None, data
            before = link.counted[from_server]
            link.counted[from_server] = before + len(data)
            if before + len(data) < fault.after or (before >= fault.after and fault.after > 0):
                # Not there yet; or past it on a connection the fault already spared (``times`` used up).
                return None, data
            if not self._take_fault_use():
                return None, data
            if fault.kind == "stall":
                link.stalled = True
            return fault.kind, data if fault.whole_chunk else data[: max(0, fault.after - before)]

    def _wait_while_stalled(self, link: _Link) -> None:
        with self._lock:
            while link.stalled and not link.dead and not self._closed:
                self._changed.wait(timeout=0.2)

    def _kill(self, link: _Link, *, rst: bool) -> None:
        """End a connection: RST both sides, or (``rst=False``) a clean FIN to both."""
        with self._lock:
            link.draining = not rst
            link.dead = True
            link.stalled = False
            if rst and link in self._links:
                self._links.remove(link)  # (a draining link stays listed, so ``down()`` can still reset it)
            self._changed.notify_all()
        if rst:
            for end in link.sockets():
                _reset(end)
            return
        # FIN both ways; both pumps go on reading and dropping until each side closes.
        for end in link.sockets():
            try:
                end.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.clear()
        self.down()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _reset(connection: socket.socket) -> None:
    """Close with RST, as a crashed or unreachable server looks to the client.

    ``shutdown(SHUT_RD)`` sends nothing but wakes a pump blocked in ``recv`` on
    this socket, so that ``close()`` really releases it (and the RST goes out) now.
    """
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        connection.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        connection.close()
    except OSError:
        pass
