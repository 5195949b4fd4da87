"""A TCP proxy on 127.0.0.1 that a test controls: it forwards devices to the server and cuts links on cue.

    with NetProxy("127.0.0.1", server_port) as proxy:
        proxy.cut_after("down", 2 << 20, down_for=0.5)   # drop every link once 2 MiB went server->device,
        ...                                              # then refuse connections for 0.5 s
        proxy.cut()                                      # drop every link now
        proxy.down(); proxy.up()                         # refuse / accept new connections

Two threads per connection pump bytes (64 KiB reads); counters per direction ("up": device ->
server, "down": server -> device) tell the test where a stream was when it was cut. Every thread
ends when its sockets close; `close()` ends them all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

DIRECTIONS = ("up", "down")


@dataclass
class ProxyStats:
    """What went through the proxy."""

    connections: int = 0
    refused: int = 0
    cuts: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))


class NetProxy:
    """Forward 127.0.0.1:<port> to (host, port); cut and restore links when the test says so."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._links: list[tuple[socket.socket, socket.socket]] = []
        self._refuse_until = 0.0
        self._refusing = False
        self._trigger: tuple[str, int, float] | None = None  # (direction, byte count, down_for)
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="netproxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ control

    def cut(self, down_for: float = 0.0) -> None:
        """Drop every open link now; refuse new connections for `down_for` seconds."""
        with self._lock:
            links, self._links = self._links, []
            self.stats.cuts += 1
            self._refuse_until = time.monotonic() + down_for
        for a, b in links:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def cut_after(self, direction: str, nbytes: int, down_for: float = 0.0) -> None:
        """Once `nbytes` more bytes have gone in `direction`, cut every link (once)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        with self._lock:
            self._trigger = (direction, self.stats.bytes[direction] + nbytes, down_for)

    def down(self) -> None:
        """Refuse new connections (open links are kept; `cut()` drops them)."""
        self._refusing = True

    def up(self) -> None:
        self._refusing = False
        self._refuse_until = 0.0

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        self._acceptor.join(5)

    def __enter__(self) -> NetProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ forwarding

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing or time.monotonic() < self._refuse_until:
                self.stats.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._links.append((client, upstream))
                self.stats.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(64 << 10)
                if not data:
                    break
                fire = None
                with self._lock:
                    self.stats.bytes[direction] += len(data)
                    t = self._trigger
                    if t is not None and t[0] == direction and self.stats.bytes[direction] >= t[1]:
                        fire, self._trigger = t, None
                if fire is not None:
                    self.cut(fire[2])
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
