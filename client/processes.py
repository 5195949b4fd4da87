"""Child processes of this machine's federations: start, watch, stop, and wait for a server to answer.

The simulator, the end-to-end tests, the benchmarks and the Docker fleet check start servers and
devices as processes and poll them; these helpers are their one copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from fedpers.tls import TlsConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Children get one BLAS/OpenMP thread each: N device processes on a 2-core machine must not
# each start a thread per core.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ProcessError(RuntimeError):
    """A child process died or something did not happen in time; the message says which."""


class WaitTimeout(ProcessError):
    """What `wait_until` waited for did not happen in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus CHILD_ENV and `extra` (how secrets reach a child: never argv)."""
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env.update(extra or {})
    return env


def wait_until(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Call `probe` until it returns something truthy and return that; WaitTimeout after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Child:
    """A subprocess with its log file (stderr, and stdout unless `stdout_path` is given)."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log_path: Path, stdout_path: Path | None = None,
              env: dict[str, str] | None = None) -> Child:
        """Start `argv`; `env` adds environment variables (secrets go there, never into argv)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        if stdout_path is not None:
            stdout_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(stdout_path, "wb") if stdout_path else fh  # noqa: SIM115
        proc = subprocess.Popen(list(argv), stdout=out, stderr=fh, env=child_env(env), start_new_session=True)
        if out is not fh:
            out.close()
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return cls(name, proc, log_path, fh)

    def poll(self) -> int | None:
        return self.proc.poll()

    def check_alive(self) -> None:
        """ProcessError with the end of its log when the child has exited."""
        code = self.proc.poll()
        if code is not None:
            raise ProcessError(f"{self.name} exited with code {code}:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; killing it", self.name)
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for_server(port_file: Path, server: Child, timeout: float, tls: TlsConfig | None = None) -> str:
    """Wait until a server started with `--port-file` has written its port and its health service
    says SERVING over `tls` (a TLS mismatch fails at once); returns HOST:PORT. ProcessError when it
    exits first or does not answer in time."""
    import grpc
    from fedpers.stub import FederationClient
    from fedpers.tls import explain

    def probe() -> str | None:
        server.check_alive()
        try:
            address = f"127.0.0.1:{int(port_file.read_text().strip())}"
        except (OSError, ValueError):
            return None
        try:
            with FederationClient(address, tls=tls, timeout=1.0) as client:
                serving = client.health() == "SERVING"
        except grpc.RpcError as exc:
            problem = explain(exc)
            if problem:
                raise ProcessError(f"{server.name} at {address}: {problem}") from None
            return None
        return address if serving else None

    try:
        return wait_until("the server to answer", probe, timeout, interval=0.1)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}:\n{server.tail()}") from None
