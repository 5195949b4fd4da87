"""Device identity: enrollment, long-term device secrets, sessions, revocation and the admin token.

A device enrolls once (the enrollment token, unless --open-enrollment; a cap on enrolled devices)
and receives its own random secret; the server stores only a salted hash of it. Every later start
proves that secret to get a session token (also stored only as a salted hash), which then
authenticates each call. A name is a label: it never yields an existing identity. A revoked
device is refused from then on, also after a restart (revocation lives in the state, and a
running server re-reads it every tick, so `fedpers-server devices revoke` on its store works).
Secrets are compared in constant time and never logged. No gRPC here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpers import wire
from fedpers.logsafe import clip
from fedpers.private import new_secret, read_secret_file, write_private
from fedpers.server import state as st
from fedpers.server.errors import BadToken, EnrollmentClosed, NameTaken, Revoked, TooManyDevices

log = logging.getLogger(__name__)

ENV_ENROLL_TOKEN = "FEDPERS_ENROLL_TOKEN"
ENV_ADMIN_TOKEN = "FEDPERS_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin.token"  # in the store when no admin token is configured
_SCHEME = "s256"


class IdentityConfigError(ValueError):
    """The identity settings contradict each other; the message names the settings."""


def hash_secret(secret: str) -> str:
    """A salted hash of a secret, as stored: 's256$<salt hex>$<sha256(salt + secret) hex>'."""
    salt = secrets.token_bytes(16)
    return f"{_SCHEME}${salt.hex()}${hashlib.sha256(salt + secret.encode()).hexdigest()}"


def verify_secret(secret: str, stored: str) -> bool:
    """Does `secret` match the stored salted hash? Constant time in the secret; False for an empty
    or malformed stored value (a legacy or cleared credential never matches)."""
    try:
        scheme, salt_hex, digest = stored.split("$")
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    if scheme != _SCHEME or not secret:
        return False
    return hmac.compare_digest(hashlib.sha256(salt + secret.encode()).hexdigest(), digest)


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of two secrets (compared as digests: no length leak)."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


@dataclass(frozen=True)
class IdentityPolicy:
    """Who may enroll and who may read the status. Tokens are never shown by repr."""

    enroll_token: str = ""  # required by Enroll when set
    open_enrollment: bool = False  # anyone may enroll (still capped by max_devices)
    max_devices: int = 1000  # enrolled and not revoked
    admin_token: str = ""  # GetStatus for an operator ("" : devices only)

    def __post_init__(self) -> None:
        if self.enroll_token and self.open_enrollment:
            raise IdentityConfigError("give an enrollment token or --open-enrollment, not both")
        if self.max_devices < 1:
            raise IdentityConfigError(f"max_devices: must be >= 1, got {self.max_devices}")

    def __repr__(self) -> str:
        return (f"IdentityPolicy(enroll_token={'<set>' if self.enroll_token else '<none>'}, "
                f"open_enrollment={self.open_enrollment}, max_devices={self.max_devices}, "
                f"admin_token={'<set>' if self.admin_token else '<none>'})")

    @property
    def enrollment(self) -> str:
        """How enrollment is gated, for the start-up log line."""
        if self.open_enrollment:
            return f"open to anyone (--open-enrollment), at most {self.max_devices} devices"
        if self.enroll_token:
            return f"with the enrollment token, at most {self.max_devices} devices"
        return "closed (no enrollment token configured): only enrolled devices can join"


def admin_token_for(store: Path, configured: str) -> str:
    """The configured admin token, or the one kept in `<store>/admin.token` (made on first use, 0600)."""
    if configured:
        return configured
    path = Path(store) / ADMIN_TOKEN_FILE
    if path.exists():
        return read_secret_file(path, "admin token")
    token = new_secret()
    write_private(path, (token + "\n").encode())
    log.info("admin token for GetStatus written to %s (fedpers-server status --admin-token-file %s)", path, path)
    return token


class Identity:
    """Enroll, join, authenticate and revoke devices against the state; an in-memory cache keeps
    per-call authentication off the database (it runs on gRPC's serving thread)."""

    def __init__(self, state: st.State, policy: IdentityPolicy, clock: Callable[[], float] = time.time) -> None:
        self.state, self.policy, self.clock = state, policy, clock
        self._lock = threading.Lock()
        self._sessions: dict[int, str] = {}  # device id -> stored session hash
        self._revoked: frozenset[int] = state.revoked_ids()

    # ------------------------------------------------------------------ enrollment

    def enroll(self, req: wire.EnrollRequest) -> wire.EnrollReply:
        """A new device: its id and a fresh secret (shown once). A repeated request (same name and
        request id, the device not yet joined) gets the same id and a new secret."""
        if not self.policy.open_enrollment:
            if not self.policy.enroll_token:
                raise EnrollmentClosed("enrollment is closed: this server takes no new devices (it was started "
                                       "without an enrollment token or --open-enrollment)")
            if not _same(req.enroll_token, self.policy.enroll_token):
                raise BadToken("wrong enrollment token")
        name = req.device_name or None
        secret = new_secret()
        with self.state.tx():
            existing = self.state.device_by_name(name) if name else None
            if existing is not None:
                if not (existing.enroll_hash and verify_secret(req.request_id, existing.enroll_hash)):
                    raise NameTaken(f"a device named {name!r} is already enrolled; a device proves who it is with "
                                    "its secret, never by its name (use another name, or revoke the old device)")
                dev = self.state.set_credentials(existing.device_id, secret_hash=hash_secret(secret))
                log.info("device %d: enrollment repeated (its first reply was lost); new secret issued",
                         dev.device_id)
                return wire.EnrollReply(device_id=dev.device_id, device_secret=secret)
            active = self.state.count_devices(active_only=True)
            if active >= self.policy.max_devices:
                raise TooManyDevices(f"this server already has {active} enrolled devices, its limit "
                                     f"(--max-devices {self.policy.max_devices})")
            try:
                dev = self.state.add_device(name, hash_secret(secret), self.clock(),
                                            enroll_hash=hash_secret(req.request_id))
            except st.Conflict:  # another server process on the same state enrolled the name a moment ago
                raise NameTaken(f"a device named {name!r} is already enrolled") from None
        log.info("device %d enrolled%s", dev.device_id, f" as {clip(name, 64)}" if name else "")
        return wire.EnrollReply(device_id=dev.device_id, device_secret=secret)

    def join(self, req: wire.JoinRequest) -> wire.JoinReply:
        """An enrolled device proves its secret and gets a new session token (the previous one ends)."""
        did = req.device_id
        dev = self.state.device(did) if 1 <= did <= wire.INT63_MAX else None
        if dev is None or not verify_secret(req.device_secret, dev.secret_hash):
            raise BadToken(f"device {did}: unknown device or wrong device secret")
        if dev.revoked:
            raise Revoked(self._revoked_message(dev))
        token = new_secret()
        session = hash_secret(token)
        self.state.set_credentials(did, session_hash=session, enroll_hash="")
        with self._lock:
            self._sessions[did] = session
        log.info("device %d joined", did)
        return wire.JoinReply(device_id=did, session_token=token)

    # ------------------------------------------------------------------ every call

    def authenticate(self, device_id: str | int | None, token: str | None) -> int:
        """The device id if (id, session token) match an enrolled device's current session; BadToken
        otherwise, Revoked for a revoked device."""
        if device_id in (None, "") or not token:
            raise BadToken(f"missing {wire.DEVICE_KEY} / {wire.TOKEN_KEY} metadata; call Join first")
        try:
            did = int(device_id)  # type: ignore[arg-type]
        except ValueError:
            raise BadToken(f"{wire.DEVICE_KEY} must be a decimal device id, got {clip(device_id, 32)!r}") from None
        if did in self._revoked:
            raise Revoked(f"device {did} is revoked; it can no longer take part")
        with self._lock:
            known = self._sessions.get(did)
        if known is None:
            dev = self.state.device(did) if 1 <= did <= wire.INT63_MAX else None
            if dev is None:
                raise BadToken(f"device {did} is not enrolled")
            if dev.revoked:
                raise Revoked(self._revoked_message(dev))
            known = dev.session_hash
            with self._lock:
                self._sessions[did] = known
        if not verify_secret(token, known) and not self._newer_session(did, known, token):
            raise BadToken(f"wrong or expired session token for device {did}; Join again")
        return did

    def _newer_session(self, did: int, cached: str, token: str) -> bool:
        """Does the state hold a newer session than the cache, matching `token`? (Another server
        process on the same state may have let the device join; the cache must not refuse it.)"""
        dev = self.state.device(did)
        if dev is None or dev.session_hash == cached:
            return False
        with self._lock:
            self._sessions[did] = dev.session_hash
        if dev.revoked:
            raise Revoked(self._revoked_message(dev))
        return verify_secret(token, dev.session_hash)

    def is_admin(self, token: str | None) -> bool:
        """Is `token` the server's admin token (constant time)? False when none is configured."""
        return bool(self.policy.admin_token) and bool(token) and _same(token or "", self.policy.admin_token)

    # ------------------------------------------------------------------ revocation

    def revoke(self, device_id: int) -> st.Device:
        """Revoke a device now: its session ends and it can never join again."""
        dev = self.state.revoke_device(device_id, self.clock())
        self._forget(dev.device_id)
        log.warning("device %d revoked", dev.device_id)
        return dev

    def refresh(self) -> None:
        """Re-read revocations from the state (another process, `fedpers-server devices revoke`, may
        have written them); called by the server's ticker."""
        revoked = self.state.revoked_ids()
        for did in revoked - self._revoked:
            self._forget(did)
            log.warning("device %d revoked (seen in the state)", did)
        self._revoked = revoked

    def _forget(self, device_id: int) -> None:
        with self._lock:
            self._sessions.pop(device_id, None)
            self._revoked = self._revoked | {device_id}

    @staticmethod
    def _revoked_message(dev: st.Device) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(dev.revoked_at))
        return f"device {dev.device_id} was revoked at {when}; it can no longer join (enroll a new device)"
