"""Federation bookkeeping: devices, rounds, accepted updates (metadata only) and round metrics.

The records, the errors and the `State` interface, and `MemoryState` (tests, fast). The durable
backends write the interface's SQL once (server/state_sql.py): `SqliteState` (the default, stdlib
sqlite3 in WAL mode, server/state_sqlite.py; importable from here as before) and `PostgresState`
(server/state_pg.py). All of them run the same test suite. Writes that belong together go inside
`with state.tx():`, which nests (savepoints) and rolls everything back on error. Ids and versions
are positive int63, so they fit SQLite's signed INTEGER.
"""

from __future__ import annotations

import abc
import copy
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fedpers.wire import INT63_MAX

if TYPE_CHECKING:
    from fedpers.server.state_sqlite import SQLITE_PRAGMAS, SqliteState  # noqa: F401

OPEN, CLOSED, ABANDONED = "open", "closed", "abandoned"
ROUND_STATES = (OPEN, CLOSED, ABANDONED)


class StateError(RuntimeError):
    """A state operation broke an invariant (unknown id, duplicate, wrong round state)."""


class UnknownId(StateError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateUnavailable(StateError):
    """The database cannot be reached right now (a PostgreSQL connection lost): retrying later helps."""


class Conflict(StateError):
    """The write conflicts with what is stored (duplicate update, round not open)."""


@dataclass(frozen=True)
class Device:
    """An enrolled device. Its credentials are kept only as salted hashes (server/identity.py)."""

    device_id: int
    name: str | None  # a label, unique among devices that are not revoked
    secret_hash: str  # the long-term device secret
    joined_at: float  # when it enrolled
    session_hash: str = ""  # the current session token ("" : none)
    revoked_at: float = 0.0  # 0: not revoked
    enroll_hash: str = ""  # the enrollment request id, until the device first joins with its secret

    @property
    def revoked(self) -> bool:
        return self.revoked_at > 0


@dataclass(frozen=True)
class Round:
    round_id: int
    base_version: int
    state: str
    opened_at: float
    deadline: float
    selected: tuple[int, ...]
    closed_at: float = 0.0
    version: int = 0  # the version this round produced (0 while open or if abandoned)
    reason: str = ""  # why it was abandoned
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateRecord:
    """What the server keeps about an accepted update: never the delta itself."""

    round_id: int
    device_id: int
    num_examples: int
    nbytes: int
    sha256: str
    accepted_at: float
    metrics: dict[str, float] = field(default_factory=dict)


def check_id(value: int, what: str, allow_zero: bool = False) -> int:
    """Ids and versions are int63: positive (or zero where stated) and below 2**63."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if not low <= value <= INT63_MAX:
        raise ValueError(f"{what} must be in [{low}, 2**63-1], got {value}")
    return value


class State(abc.ABC):
    """The bookkeeping interface the round coordinator uses."""

    @abc.abstractmethod
    def tx(self) -> AbstractContextManager[None]:
        """Transaction scope: commits on success, rolls back on error, nests."""

    # devices
    @abc.abstractmethod
    def add_device(self, name: str | None, secret_hash: str, now: float, *, enroll_hash: str = "") -> Device:
        """Enroll a new device; Conflict when a device that is not revoked already has `name`."""

    @abc.abstractmethod
    def device(self, device_id: int) -> Device | None: ...

    @abc.abstractmethod
    def device_by_name(self, name: str) -> Device | None:
        """The device with `name` that is not revoked, or None."""

    @abc.abstractmethod
    def devices(self) -> list[Device]:
        """Every device, revoked ones included, by id."""

    @abc.abstractmethod
    def count_devices(self, active_only: bool = False) -> int:
        """Enrolled devices (only those not revoked when `active_only`)."""

    @abc.abstractmethod
    def set_credentials(self, device_id: int, *, secret_hash: str | None = None, session_hash: str | None = None,
                        enroll_hash: str | None = None) -> Device:
        """Replace the given credential hashes of a device (None: keep); UnknownId if not enrolled."""

    @abc.abstractmethod
    def revoke_device(self, device_id: int, now: float) -> Device:
        """Revoke a device (its session is cleared, its name freed); revoking again keeps the first time."""

    @abc.abstractmethod
    def revoked_ids(self) -> frozenset[int]: ...

    # rounds
    @abc.abstractmethod
    def open_round(self, base_version: int, selected: tuple[int, ...], now: float, deadline: float) -> Round: ...

    @abc.abstractmethod
    def round(self, round_id: int) -> Round | None: ...

    @abc.abstractmethod
    def rounds(self, limit: int | None = None) -> list[Round]:
        """Rounds, newest first."""

    @abc.abstractmethod
    def open_rounds(self) -> list[Round]: ...

    @abc.abstractmethod
    def close_round(self, round_id: int, version: int, metrics: dict[str, float], now: float) -> Round: ...

    @abc.abstractmethod
    def abandon_round(self, round_id: int, reason: str, now: float) -> Round: ...

    @abc.abstractmethod
    def count_rounds(self, state: str) -> int: ...

    # updates
    @abc.abstractmethod
    def add_update(self, rec: UpdateRecord) -> None:
        """Record an accepted update; Conflict if the round is not open or the device already reported."""

    @abc.abstractmethod
    def updates(self, round_id: int) -> list[UpdateRecord]: ...

    @abc.abstractmethod
    def count_updates(self, round_id: int) -> int: ...

    # late updates: refused because their round had closed (counted, never aggregated)
    @abc.abstractmethod
    def record_late(self, round_id: int, device_id: int, now: float) -> None:
        """Count one late update (a device's repeated tries for the same round count once)."""

    @abc.abstractmethod
    def count_late(self, round_id: int | None = None) -> int:
        """Late updates of one round, or of all rounds when `round_id` is None."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (a database connection)."""


# ---------------------------------------------------------------------------------- memory


@dataclass
class _Tables:
    devices: dict[int, Device] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)
    rounds: dict[int, Round] = field(default_factory=dict)
    updates: dict[int, dict[int, UpdateRecord]] = field(default_factory=dict)
    late: set[tuple[int, int]] = field(default_factory=set)
    next_device: int = 1
    next_round: int = 1


class MemoryState(State):
    """In-process state; a transaction snapshots the tables and restores them on error."""

    def __init__(self) -> None:
        self._t = _Tables()
        self._lock = threading.RLock()
        self._snapshots: list[_Tables] = []

    @contextmanager
    def tx(self) -> Iterator[None]:
        with self._lock:
            self._snapshots.append(copy.deepcopy(self._t))
            try:
                yield
            except BaseException:
                self._t = self._snapshots.pop()
                raise
            else:
                self._snapshots.pop()

    def add_device(self, name: str | None, secret_hash: str, now: float, *, enroll_hash: str = "") -> Device:
        with self.tx():
            if name and name in self._t.names:
                raise Conflict(f"a device named {name!r} is already enrolled")
            dev = Device(self._t.next_device, name or None, secret_hash, now, enroll_hash=enroll_hash)
            self._t.next_device += 1
            if name:
                self._t.names[name] = dev.device_id
            self._t.devices[dev.device_id] = dev
            return dev

    def device(self, device_id: int) -> Device | None:
        with self._lock:
            return self._t.devices.get(device_id)

    def device_by_name(self, name: str) -> Device | None:
        with self._lock:
            did = self._t.names.get(name)
            return self._t.devices[did] if did is not None else None

    def devices(self) -> list[Device]:
        with self._lock:
            return [self._t.devices[d] for d in sorted(self._t.devices)]

    def count_devices(self, active_only: bool = False) -> int:
        with self._lock:
            return sum(1 for d in self._t.devices.values() if not (active_only and d.revoked))

    def _known(self, device_id: int) -> Device:
        dev = self._t.devices.get(device_id)
        if dev is None:
            raise UnknownId(f"device {device_id} is not enrolled")
        return dev

    def set_credentials(self, device_id: int, *, secret_hash: str | None = None, session_hash: str | None = None,
                        enroll_hash: str | None = None) -> Device:
        changes = {k: v for k, v in (("secret_hash", secret_hash), ("session_hash", session_hash),
                                     ("enroll_hash", enroll_hash)) if v is not None}
        with self.tx():
            dev = replace(self._known(device_id), **changes)
            self._t.devices[device_id] = dev
            return dev

    def revoke_device(self, device_id: int, now: float) -> Device:
        with self.tx():
            dev = self._known(device_id)
            if not dev.revoked:
                dev = replace(dev, revoked_at=now, session_hash="", enroll_hash="")
                self._t.devices[device_id] = dev
                if dev.name and self._t.names.get(dev.name) == device_id:
                    del self._t.names[dev.name]
            return dev

    def revoked_ids(self) -> frozenset[int]:
        with self._lock:
            return frozenset(d for d, dev in self._t.devices.items() if dev.revoked)

    def open_round(self, base_version: int, selected: tuple[int, ...], now: float, deadline: float) -> Round:
        check_id(base_version, "base_version", allow_zero=True)
        with self.tx():
            for d in selected:
                if d not in self._t.devices:
                    raise UnknownId(f"device {d} is not enrolled")
            r = Round(self._t.next_round, base_version, OPEN, now, deadline, tuple(sorted(selected)))
            self._t.next_round += 1
            self._t.rounds[r.round_id] = r
            self._t.updates[r.round_id] = {}
            return r

    def round(self, round_id: int) -> Round | None:
        with self._lock:
            return self._t.rounds.get(round_id)

    def rounds(self, limit: int | None = None) -> list[Round]:
        with self._lock:
            out = sorted(self._t.rounds.values(), key=lambda r: -r.round_id)
            return out if limit is None else out[:limit]

    def open_rounds(self) -> list[Round]:
        with self._lock:
            return sorted((r for r in self._t.rounds.values() if r.state == OPEN), key=lambda r: r.round_id)

    def _finish(self, round_id: int, **changes) -> Round:
        with self.tx():
            r = self._t.rounds.get(round_id)
            if r is None:
                raise UnknownId(f"round {round_id} does not exist")
            if r.state != OPEN:
                raise Conflict(f"round {round_id} is {r.state}, not open")
            r = replace(r, **changes)
            self._t.rounds[round_id] = r
            return r

    def close_round(self, round_id: int, version: int, metrics: dict[str, float], now: float) -> Round:
        check_id(version, "version")
        return self._finish(round_id, state=CLOSED, version=version, metrics=dict(metrics), closed_at=now)

    def abandon_round(self, round_id: int, reason: str, now: float) -> Round:
        return self._finish(round_id, state=ABANDONED, reason=reason, closed_at=now)

    def count_rounds(self, state: str) -> int:
        with self._lock:
            return sum(1 for r in self._t.rounds.values() if r.state == state)

    def add_update(self, rec: UpdateRecord) -> None:
        with self.tx():
            r = self._t.rounds.get(rec.round_id)
            if r is None:
                raise UnknownId(f"round {rec.round_id} does not exist")
            if r.state != OPEN:
                raise Conflict(f"round {rec.round_id} is {r.state}, not open")
            if rec.device_id not in self._t.devices:
                raise UnknownId(f"device {rec.device_id} is not enrolled")
            if rec.device_id in self._t.updates[rec.round_id]:
                raise Conflict(f"device {rec.device_id} already reported for round {rec.round_id}")
            self._t.updates[rec.round_id][rec.device_id] = rec

    def updates(self, round_id: int) -> list[UpdateRecord]:
        with self._lock:
            return sorted(self._t.updates.get(round_id, {}).values(), key=lambda u: u.device_id)

    def count_updates(self, round_id: int) -> int:
        with self._lock:
            return len(self._t.updates.get(round_id, {}))

    def record_late(self, round_id: int, device_id: int, now: float) -> None:
        with self.tx():
            if round_id not in self._t.rounds:
                raise UnknownId(f"round {round_id} does not exist")
            self._t.late.add((round_id, device_id))

    def count_late(self, round_id: int | None = None) -> int:
        with self._lock:
            return sum(1 for r, _ in self._t.late if round_id is None or r == round_id)


# public names defined in server/state_sqlite.py, which builds on this module (importing it here at load
# would be circular): loaded on first use, so `from fedpers.server.state import SqliteState` works as before
_SQLITE_NAMES = ("SqliteState", "SQLITE_PRAGMAS")


def __getattr__(name: str) -> Any:
    """A name of server/state_sqlite.py, imported on first use and kept here."""
    if name not in _SQLITE_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from fedpers.server import state_sqlite

    value = globals()[name] = getattr(state_sqlite, name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SQLITE_NAMES))
