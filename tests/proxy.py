"""A loopback TCP proxy for tests: counts bytes and can simulate an outage.

It sits between ssefs and SeaweedFS (TLS passes through untouched, and the
test certificate is valid for 127.0.0.1 on any port). ``down()`` resets every
open connection and every new one until ``up()``; ``bytes_from_server`` counts
what the server sent (GET bodies, mostly), which shows how much data a
workload really fetched.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._is_down = False
        self._closed = False
        self.bytes_from_server = 0
        self.bytes_to_server = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def down(self) -> None:
        with self._lock:
            self._is_down = True
            connections, self._connections = self._connections, []
        for connection in connections:
            _reset(connection)

    def up(self) -> None:
        with self._lock:
            self._is_down = False

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_from_server = 0
            self.bytes_to_server = 0

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._is_down
            if down:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._connections += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with self._lock:
                    if from_server:
                        self.bytes_from_server += len(data)
                    else:
                        self.bytes_to_server += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _reset(connection: socket.socket) -> None:
    """Close with RST, as a crashed or unreachable server looks to the client."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        connection.close()
    except OSError:
        pass
