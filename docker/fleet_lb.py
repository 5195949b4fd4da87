"""A small TCP load balancer: several server replicas behind one address (stdlib only).

    python fleet_lb.py --listen 0.0.0.0:50051 --backend server-a:50051 --backend server-b:50051

Each incoming connection goes to the next backend in turn (round robin); a backend that refuses or
does not answer within `--connect-timeout` is skipped for that connection, and the next one is
tried, so a replica that died (kill -9) costs its devices one reconnect. Bytes are piped as they are:
TLS runs end to end between the device and the replica (the load balancer never sees a key), and a
gRPC channel, one long-lived HTTP/2 connection, stays on one replica until that connection breaks.
Backend names are resolved at each connect, so a restarted container with a new address is found.
The compose fleet runs it as the `lb` service; tests/test_replicas.py runs it as a process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import sys

log = logging.getLogger("fedpers.lb")


def host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); argparse's type for --listen and --backend."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class Balancer:
    """Accepts on one address and pipes each connection to a backend chosen round robin."""

    def __init__(self, backends: list[tuple[str, int]], connect_timeout: float = 2.0) -> None:
        if not backends:
            raise ValueError("at least one backend")
        self.backends = backends
        self.connect_timeout = connect_timeout
        self._next = itertools.cycle(range(len(backends)))
        self.connections = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int]]:
        """A connection to the next backend that answers; OSError when none does."""
        last: Exception | None = None
        for _ in range(len(self.backends)):
            backend = self.backends[next(self._next)]
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*backend), self.connect_timeout)
                return reader, writer, backend
            except (TimeoutError, OSError) as exc:
                last = exc
                log.info("backend %s:%d unavailable (%s); trying the next", *backend, exc)
        raise OSError(f"no backend answers ({last})")

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(64 << 10):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                writer.close()
            except OSError:
                pass

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer, backend = await self._open()
        except OSError as exc:
            log.warning("connection dropped: %s", exc)
            client_writer.close()
            return
        self.connections += 1
        log.debug("connection %d -> %s:%d", self.connections, *backend)
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))

    async def serve(self, listen: tuple[str, int], ready: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self.handle, *listen, reuse_address=True)
        log.info("listening on %s:%d, backends %s", *listen, ", ".join(f"{h}:{p}" for h, p in self.backends))
        if ready is not None:
            ready.set()
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet_lb.py", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=host_port, required=True, help="HOST:PORT to accept on")
    p.add_argument("--backend", type=host_port, action="append", required=True, help="HOST:PORT (repeat)")
    p.add_argument("--connect-timeout", type=float, default=2.0, help="seconds before a backend is skipped")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    balancer = Balancer(args.backend, args.connect_timeout)
    loop = asyncio.new_event_loop()
    task = loop.create_task(balancer.serve(args.listen))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        log.info("stopped after %d connections", balancer.connections)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", *args.listen, exc)
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
