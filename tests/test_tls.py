"""Transport security over real gRPC on 127.0.0.1: TLS on the port, plaintext only when asked for.

Attack 1 of issue 10: a capture proxy on the path read the enrollment and session tokens, and a
sniffed token was replayed. With TLS the proxy sees only ciphertext; a plaintext client, a
device trusting another CA, or (with mutual TLS) a device without a client certificate is
refused, and the message names the certificate problem.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from fedpers import wire
from fedpers.client.agent import Agent, AgentConfig, AgentError
from fedpers.client.partition import partition_digits, write_partition
from fedpers.pki import make_dev_pki
from fedpers.server import app
from fedpers.server.config import ConfigError, ServerConfig
from fedpers.stub import FederationClient
from fedpers.tls import ServerTls, TlsConfig, TlsError, explain

from tests.server_helpers import Device, client_tls, make_coordinator, pki, server_tls

ROOT = Path(__file__).resolve().parents[1]


def _start(tmp_path: Path, **cfg):
    coord = make_coordinator(tmp_path, min_devices=1, rounds=2, clock=time.time)
    tls = cfg.pop("tls", server_tls())
    config = ServerConfig(model=tmp_path / "unused.ini", store=tmp_path, listen="127.0.0.1:0", **tls, **cfg)
    return app.start(config, coordinator=coord)


class CaptureProxy(threading.Thread):
    """A TCP relay 127.0.0.1:port -> the server that keeps every byte it forwards (an on-path attacker)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(daemon=True)
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                with self._lock:
                    self.captured += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_tokens_cannot_be_read_on_the_wire(tmp_path: Path) -> None:
    running = _start(tmp_path)
    proxy = CaptureProxy(running.port)
    proxy.start()
    try:
        # the certificate names localhost; the proxy is dialled by that name
        dev = Device(f"localhost:{proxy.port}", "victim")
        assert dev.task().kind == wire.TaskKind.TRAIN
        assert len(proxy.captured) > 1000
        for secret in (b"enroll-me", dev.token.encode(), *dev.secrets()):
            assert secret not in proxy.captured, "a secret travelled in the clear"
        assert b"victim" not in proxy.captured  # even the device's name is encrypted
        dev.close()
    finally:
        proxy.close()
        running.stop(0)


def test_plaintext_client_to_a_tls_server_fails(tmp_path: Path) -> None:
    running = _start(tmp_path)
    try:
        with FederationClient(running.address, tls=TlsConfig.plaintext(), timeout=5) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.health()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert running.coordinator.state.count_devices() == 0
        with FederationClient(running.address, tls=client_tls(), timeout=5) as client:
            assert client.health() == "SERVING"  # the honest path
    finally:
        running.stop(0)


def test_device_trusting_another_ca_stops_with_the_certificate_problem(tmp_path: Path) -> None:
    running = _start(tmp_path)
    other = make_dev_pki(tmp_path / "other-ca")
    write_partition(tmp_path / "data", partition_digits(2, seed=0)[:1])
    cfg = AgentConfig(server=running.address, data=tmp_path / "data" / "device-0.npz", state=tmp_path / "state",
                      tls=TlsConfig(ca=other.ca_cert), enroll_token="enroll-me", retry_seconds=60)
    agent = Agent(cfg)
    t0 = time.monotonic()
    try:
        with pytest.raises(AgentError) as info:
            agent.run()
    finally:
        running.stop(0)
    message = str(info.value)
    assert "not signed by a CA this side trusts" in message and "CERTIFICATE_VERIFY_FAILED" in message, message
    assert time.monotonic() - t0 < 20, "a certificate problem must not be retried for --retry-seconds"


def test_health_cli_names_a_wrong_ca(tmp_path: Path) -> None:
    running = _start(tmp_path)
    other = make_dev_pki(tmp_path / "other-ca")
    try:
        r = subprocess.run([sys.executable, "-m", "fedpers.server", "health", "--address", running.address,
                            "--tls-ca", str(other.ca_cert)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, r.stderr
        env = dict(os.environ, FEDPERS_TLS_CA=str(pki().ca_cert))  # the flag's environment variable
        r = subprocess.run([sys.executable, "-m", "fedpers.server", "health", "--address", running.address],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and "SERVING" in r.stdout, r.stderr
    finally:
        running.stop(0)


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    p = pki()
    tls = {"tls_cert": p.server_cert, "tls_key": p.server_key, "tls_client_ca": p.ca_cert}
    running = _start(tmp_path, tls=tls)
    try:
        with FederationClient(running.address, tls=client_tls(), timeout=5) as client:
            with pytest.raises(grpc.RpcError):
                client.health()
        cert, key = p.clients["device"]
        with FederationClient(running.address, tls=TlsConfig(ca=p.ca_cert, cert=cert, key=key), timeout=5) as c:
            assert c.health() == "SERVING"
    finally:
        running.stop(0)


def test_server_needs_tls_or_an_explicit_insecure(tmp_path: Path, caplog) -> None:
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key"):
        ServerConfig(model=tmp_path / "m.ini", store=tmp_path)
    with pytest.raises(ConfigError, match="plaintext cannot be combined"):
        ServerConfig(model=tmp_path / "m.ini", store=tmp_path, insecure=True, **server_tls())
    caplog.set_level(logging.WARNING)
    running = _start(tmp_path, tls={"insecure": True})
    try:
        assert any("PLAINTEXT" in r.getMessage() for r in caplog.records)
        with FederationClient(running.address, tls=TlsConfig.plaintext(), timeout=5) as client:
            assert client.health() == "SERVING"
    finally:
        running.stop(0)


def test_tls_files_are_checked_before_connecting(tmp_path: Path) -> None:
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(TlsError, match="not a PEM file"):
        TlsConfig(ca=tmp_path / "not.pem").credentials()
    with pytest.raises(TlsError, match="--tls-ca .*missing"):
        TlsConfig(ca=tmp_path / "missing").credentials()
    with pytest.raises(TlsError, match="go together"):
        TlsConfig(cert=tmp_path / "c.pem")
    with pytest.raises(TlsError, match="--tls-key"):
        ServerTls(cert=pki().server_cert, key=tmp_path / "missing").credentials()


class _Failed:
    def __init__(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details


def test_explain_names_each_handshake_problem() -> None:
    wrong_ca = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
                "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK")
    assert explain(_Failed(wrong_ca)) == ("TLS: the server's certificate is not signed by a CA this side trusts "
                                          "(check --tls-ca) [CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
                                          "certificate]")
    assert "does not name the host" in explain(_Failed("Custom verification check failed with error: "
                                                       "UNAUTHENTICATED: Hostname Verification Check failed."))
    assert "does not speak TLS" in explain(_Failed("SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
                                                   "WRONG_VERSION_NUMBER"))
    assert explain(_Failed("failed to connect to all addresses; last error: UNAVAILABLE: Socket closed")) is None
    assert explain(object()) is None


def test_dev_certs_cli_writes_private_keys(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    r = subprocess.run([sys.executable, "-m", "fedpers.server", "dev-certs", "--out", str(out), "--name", "server",
                        "--name", "localhost", "--client", "dev1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "client-dev1.key", "client-dev1.pem", "server.key",
                                                    "server.pem"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for key in ("server.key", "client-dev1.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in (out / "ca.pem").read_bytes()  # the CA's key is never written
