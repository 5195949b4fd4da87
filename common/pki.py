"""Throwaway certificates for tests, the simulator and the compose fleet (the `cryptography` package).

`make_dev_pki` makes a fresh CA, signs a server certificate (and optionally client certificates
for mutual TLS) and writes them as PEM files; the CA's private key is never written, so nothing
else can ever be signed by it. Keys are ECDSA P-256 (fast to make, accepted by gRPC's TLS).
This is for runs that live as long as their files: a real deployment brings certificates from
its own CA (SECURITY.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fedpers.private import ensure_private_dir, write_private

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CA_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE = "ca.pem", "server.pem", "server.key"


class PkiUnavailable(RuntimeError):
    """The `cryptography` package is not installed (pip install 'fedpers[certs]')."""


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise PkiUnavailable("making throwaway certificates needs the `cryptography` package: "
                             "pip install 'fedpers[certs]' (or bring your own: SECURITY.md)") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """One certificate and its key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes


class Authority:
    """A CA held in memory only: it signs server and client certificates, and is then forgotten."""

    def __init__(self, name: str | None = None, days: int = 30) -> None:
        x509, hashes, serialization, ec, _, NameOID = _crypto()
        name = name or f"fedpers throwaway CA {secrets.token_hex(4)}"  # two CAs never share a name
        self._now = datetime.datetime.now(datetime.UTC)
        self._days = days
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, names: tuple[str, ...], client: bool = False, days: int | None = None) -> Issued:
        """A certificate for `names` (DNS names or IP addresses; the first is also the common name),
        for a server (serverAuth) or a client (clientAuth)."""
        x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID = _crypto()
        if not names:
            raise ValueError("a certificate needs at least one name")
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        valid_days = self._days if days is None else days
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + datetime.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


@dataclass(frozen=True)
class DevPki:
    """Where make_dev_pki wrote its files."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key)


def make_dev_pki(directory: str | Path, server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES,
                 clients: tuple[str, ...] = (), days: int = 30) -> DevPki:
    """A fresh CA, a server certificate for `server_names` and one client certificate per name in
    `clients`, written under `directory` (0700; keys 0600). The CA key is discarded."""
    out = ensure_private_dir(directory)
    ca = Authority(days=days)
    server = ca.issue(tuple(server_names))
    write_private(out / CA_FILE, ca.cert_pem, mode=0o644)
    write_private(out / SERVER_CERT_FILE, server.cert_pem, mode=0o644)
    write_private(out / SERVER_KEY_FILE, server.key_pem)
    issued = {}
    for name in clients:
        c = ca.issue((name,), client=True)
        cert, key = out / f"client-{name}.pem", out / f"client-{name}.key"
        write_private(cert, c.cert_pem, mode=0o644)
        write_private(key, c.key_pem)
        issued[name] = (cert, key)
    return DevPki(out, out / CA_FILE, out / SERVER_CERT_FILE, out / SERVER_KEY_FILE, issued)
