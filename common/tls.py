"""Transport security for fedpers.v1: TLS credentials for both ends, with grpcio's own credentials.

A caller (device, simulator, `fedpers-server status|health`, fleet check, benchmarks) describes
its side with a `TlsConfig` (the CA that signed the server's certificate, optionally its own
certificate and key for mutual TLS) and gets a channel from `open_channel`; the server describes
its side with a `ServerTls`. Plaintext exists only as an explicit choice (`TlsConfig.plaintext()`,
`--insecure`), never as a fallback. `explain` turns gRPC's handshake failures into a sentence that
names the certificate problem, so a misconfigured device stops at once instead of retrying.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Environment variables that stand in for the client flags (e.g. a container's HEALTHCHECK, which
# runs `fedpers-server health` without flags, finds the CA here).
ENV_CA = "FEDPERS_TLS_CA"
ENV_CERT = "FEDPERS_TLS_CERT"
ENV_KEY = "FEDPERS_TLS_KEY"
ENV_SERVER_NAME = "FEDPERS_TLS_SERVER_NAME"


class TlsError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file and the flag."""


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """The caller's side of a channel: trust `ca` (None: the system's roots), present `cert`/`key`
    when the server asks for a client certificate, check the server's certificate against
    `server_name` (None: the host of the address). `insecure` means plaintext, nothing else."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsError("--tls-cert and --tls-key go together (the client certificate and its key)")
        if self.insecure and (self.ca or self.cert or self.server_name):
            raise TlsError("--insecure (plaintext) cannot be combined with --tls-ca/--tls-cert/--tls-server-name")

    @classmethod
    def plaintext(cls) -> TlsConfig:
        """No TLS at all: only for a trusted loopback or a test that is about plaintext."""
        return cls(insecure=True)

    def credentials(self) -> grpc.ChannelCredentials:
        """grpcio channel credentials from the files (TlsError when one cannot be read)."""
        ca = _read_pem(self.ca, "--tls-ca") if self.ca else None
        key = _read_pem(self.key, "--tls-key") if self.key else None
        cert = _read_pem(self.cert, "--tls-cert") if self.cert else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def describe(self) -> str:
        if self.insecure:
            return "plaintext (--insecure)"
        trust = f"CA {self.ca}" if self.ca else "the system's CAs"
        return f"TLS trusting {trust}" + (" with a client certificate" if self.cert else "")


def open_channel(address: str, tls: TlsConfig, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `address`: TLS per `tls`, plaintext only when `tls.insecure`."""
    opts = list(options)
    if tls.insecure:
        return grpc.insecure_channel(address, options=opts)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.credentials(), options=opts)


@dataclass(frozen=True)
class ServerTls:
    """The server's side: its certificate chain and key; with `client_ca`, every caller must also
    present a certificate signed by that CA (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read_pem(self.key, "--tls-key"), _read_pem(self.cert, "--tls-cert"))
        client_ca = _read_pem(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


# What gRPC's C core says in a failed handshake -> what a person should hear. Matched on the
# details of an UNAVAILABLE call; first match wins.
_HANDSHAKE_PROBLEMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?P<token>CERTIFICATE_VERIFY_FAILED|BAD_SIGNATURE)(?::\s*(?P<reason>[^:]+))?"),
     "the server's certificate is not signed by a CA this side trusts (check --tls-ca)"),
    (re.compile(r"(?P<token>Hostname Verification Check failed|No match found for server name)"),
     "the server's certificate does not name the host dialled (dial a name in its certificate, "
     "or set --tls-server-name)"),
    (re.compile(r"(?P<token>CERTIFICATE_EXPIRED|certificate has expired)"), "a certificate has expired"),
    (re.compile(r"(?P<token>WRONG_VERSION_NUMBER)"),
     "the other side does not speak TLS (a server started with --insecure?)"),
    (re.compile(r"(?P<token>TLSV1_ALERT_UNKNOWN_CA|SSLV3_ALERT_BAD_CERTIFICATE|CERTIFICATE_REQUIRED|"
                r"PEER_DID_NOT_RETURN_A_CERTIFICATE|TLSV13_ALERT_CERTIFICATE_REQUIRED)"),
     "the server refused this side's client certificate (mutual TLS: check --tls-cert/--tls-key)"),
    (re.compile(r"(?P<token>[Hh]andshake failed)"), "the TLS handshake failed"),
)


def explain(error: object) -> str | None:
    """A sentence naming the TLS problem behind a failed call (a grpc.RpcError), or None when the
    failure is not a TLS handshake problem (then it may be transient and worth retrying)."""
    details_fn = getattr(error, "details", None)
    try:
        details = (details_fn() if callable(details_fn) else "") or ""
    except Exception:  # noqa: BLE001 - a failed call without details is simply not explained
        return None
    for pattern, sentence in _HANDSHAKE_PROBLEMS:
        m = pattern.search(details)
        if m:
            reason = (m.groupdict().get("reason") or "").strip()
            return f"TLS: {sentence} [{m.group('token')}{': ' + reason if reason else ''}]"
    return None


# ------------------------------------------------------------------------------------- command line


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """The flags that make a caller's TlsConfig (each also read from an environment variable)."""
    g = parser.add_argument_group("transport security (TLS)")
    g.add_argument("--tls-ca", type=Path, metavar="CA.pem",
                   help=f"CA certificate that signed the server's certificate (env {ENV_CA}; "
                        "default: the system's CAs)")
    g.add_argument("--tls-cert", type=Path, metavar="CERT.pem",
                   help=f"client certificate, for a server that requires mutual TLS (env {ENV_CERT})")
    g.add_argument("--tls-key", type=Path, metavar="KEY.pem", help=f"key of --tls-cert (env {ENV_KEY})")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help=f"name to check in the server's certificate instead of the dialled host "
                        f"(env {ENV_SERVER_NAME})")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext, no TLS: tokens and updates travel unencrypted (trusted loopback only)")


def client_from_args(ns: argparse.Namespace) -> TlsConfig:
    """The TlsConfig of parsed `add_client_args` flags, environment variables filling the gaps."""
    if ns.insecure:
        return TlsConfig.plaintext()

    def pick(value: Any, env: str) -> Any:
        if value is not None:
            return value
        raw = os.environ.get(env, "")
        return raw or None

    ca, cert, key = (pick(ns.tls_ca, ENV_CA), pick(ns.tls_cert, ENV_CERT), pick(ns.tls_key, ENV_KEY))
    return TlsConfig(ca=Path(ca) if ca else None, cert=Path(cert) if cert else None, key=Path(key) if key else None,
                     server_name=pick(ns.tls_server_name, ENV_SERVER_NAME))
