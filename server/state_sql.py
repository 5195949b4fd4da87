"""The `State` contract in SQL, written once for the SQLite and PostgreSQL backends.

Each statement is written here once, with `?` placeholders. A backend (server/state_sqlite.py,
server/state_pg.py) supplies its connection and transactions (`tx`, `_exec`, `close`) and only what
its database does differently: the placeholder style (`_q`), how an insert returns its id, the LIMIT
that means every row, how a constraint violation shows, and how a round is checked (and, on
PostgreSQL, locked) before it changes or takes an update.
"""

from __future__ import annotations

import abc
import json
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from fedpers.server.state import OPEN, Conflict, Device, Round, State, UnknownId, UpdateRecord, check_id
from fedpers.wire import INT63_MAX

_DEVICE_COLS = "device_id, name, secret_hash, joined_at, session_hash, revoked_at, enroll_hash"
_ROUND_COLS = "round_id, base_version, state, opened_at, deadline, closed_at, version, reason, metrics"
_UPDATE_COLS = "round_id, device_id, num_examples, nbytes, sha256, accepted_at, metrics"


class SqlState(State):
    """One connection (`_db`) guarded by one lock: writes are tiny and the coordinator serializes them anyway.

    Reads go through `_one` / `_all` (the backend's `_exec`: outside a transaction it may reconnect);
    statements inside `with self.tx():` go through `_run`, straight to the driver."""

    _db: Any  # the driver's connection (sqlite3 / psycopg): `.execute(sql, args)` returns a cursor
    _NO_LIMIT: int | None  # what `LIMIT ?` takes to mean every row (a backend sets it)
    _DUPLICATE_UPDATE: type[Conflict] = Conflict  # raised when a device reports twice for one round

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # tx() blocks open on this connection

    # ------------------------------------------------------------------ what a backend supplies

    @abc.abstractmethod
    def _exec(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement in the driver's placeholder style, in or out of a transaction; its cursor."""

    @abc.abstractmethod
    def _insert_id(self, sql: str, args: Sequence[Any], key: str) -> int:
        """Inside tx(): run an INSERT (`?` placeholders) and return the id the database gave its `key` column."""

    @abc.abstractmethod
    def _unique(self, duplicate: Conflict, refused: str) -> AbstractContextManager[None]:
        """Around one INSERT inside tx(): a duplicate key raises `duplicate`; another broken constraint,
        StateError(f"{refused}: ...")."""

    def _q(self, sql: str) -> str:
        """A statement written with `?` placeholders in the driver's style (sqlite3 takes `?` as is)."""
        return sql

    # ------------------------------------------------------------------ plumbing

    def _run(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """Inside tx(), whose lock the caller holds: the driver's cursor, its errors as the driver raises them."""
        return self._db.execute(self._q(sql), args)

    def _one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        with self._lock:
            return self._exec(self._q(sql), args).fetchone()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._exec(self._q(sql), args).fetchall()

    # ------------------------------------------------------------------ devices

    def add_device(self, name: str | None, secret_hash: str, now: float, *, enroll_hash: str = "") -> Device:
        taken = Conflict(f"a device named {name!r} is already enrolled")
        with self.tx():
            with self._unique(taken, "device refused by the database"):
                did = self._insert_id("INSERT INTO devices (name, secret_hash, joined_at, enroll_hash)"
                                      " VALUES (?, ?, ?, ?)", (name or None, secret_hash, now, enroll_hash),
                                      "device_id")
            return Device(check_id(did, "device_id"), name or None, secret_hash, now, enroll_hash=enroll_hash)

    def device(self, device_id: int) -> Device | None:
        if not 1 <= device_id <= INT63_MAX:
            return None
        row = self._one(f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id = ?", (device_id,))
        return Device(*row) if row else None

    def device_by_name(self, name: str) -> Device | None:
        row = self._one(f"SELECT {_DEVICE_COLS} FROM devices WHERE name = ? AND revoked_at = 0", (name,))
        return Device(*row) if row else None

    def devices(self) -> list[Device]:
        return [Device(*row) for row in self._all(f"SELECT {_DEVICE_COLS} FROM devices ORDER BY device_id")]

    def count_devices(self, active_only: bool = False) -> int:
        where = " WHERE revoked_at = 0" if active_only else ""
        return self._one(f"SELECT COUNT(*) FROM devices{where}")[0]  # type: ignore[index]

    def _known(self, device_id: int) -> Device:
        dev = self.device(device_id)
        if dev is None:
            raise UnknownId(f"device {device_id} is not enrolled")
        return dev

    def set_credentials(self, device_id: int, *, secret_hash: str | None = None, session_hash: str | None = None,
                        enroll_hash: str | None = None) -> Device:
        changes = [(k, v) for k, v in (("secret_hash", secret_hash), ("session_hash", session_hash),
                                       ("enroll_hash", enroll_hash)) if v is not None]
        with self.tx():
            self._known(device_id)
            if changes:
                sets = ", ".join(f"{k} = ?" for k, _ in changes)
                self._run(f"UPDATE devices SET {sets} WHERE device_id = ?", (*(v for _, v in changes), device_id))
            return self._known(device_id)

    def revoke_device(self, device_id: int, now: float) -> Device:
        with self.tx():
            if not self._known(device_id).revoked:
                # (revoked_at = 0: of two replicas revoking at once, the first time stays)
                self._run("UPDATE devices SET revoked_at = ?, session_hash = '', enroll_hash = ''"
                          " WHERE device_id = ? AND revoked_at = 0", (now, device_id))
            return self._known(device_id)

    def revoked_ids(self) -> frozenset[int]:
        return frozenset(d for (d,) in self._all("SELECT device_id FROM devices WHERE revoked_at > 0"))

    # ------------------------------------------------------------------ rounds

    def open_round(self, base_version: int, selected: tuple[int, ...], now: float, deadline: float) -> Round:
        check_id(base_version, "base_version", allow_zero=True)
        with self.tx():
            rid = self._insert_id("INSERT INTO rounds (base_version, state, opened_at, deadline)"
                                  " VALUES (?, 'open', ?, ?)", (base_version, now, deadline), "round_id")
            rid = check_id(rid, "round_id")
            for d in sorted(selected):
                if self.device(d) is None:
                    raise UnknownId(f"device {d} is not enrolled")
                self._run("INSERT INTO selections (round_id, device_id) VALUES (?, ?)", (rid, d))
            return self.round(rid)  # type: ignore[return-value]

    def _round_from_row(self, row: tuple) -> Round:
        rid, base, state, opened, deadline, closed, version, reason, metrics = row
        sel = tuple(d for (d,) in self._all(
            "SELECT device_id FROM selections WHERE round_id = ? ORDER BY device_id", (rid,)))
        return Round(rid, base, state, opened, deadline, sel, closed, version, reason, json.loads(metrics))

    def round(self, round_id: int) -> Round | None:
        if not 1 <= round_id <= INT63_MAX:
            return None
        with self._lock:
            row = self._one(f"SELECT {_ROUND_COLS} FROM rounds WHERE round_id = ?", (round_id,))
            return self._round_from_row(row) if row else None

    def rounds(self, limit: int | None = None) -> list[Round]:
        with self._lock:
            rows = self._all(f"SELECT {_ROUND_COLS} FROM rounds ORDER BY round_id DESC LIMIT ?",
                             (self._NO_LIMIT if limit is None else limit,))
            return [self._round_from_row(r) for r in rows]

    def open_rounds(self) -> list[Round]:
        with self._lock:
            rows = self._all(f"SELECT {_ROUND_COLS} FROM rounds WHERE state = 'open' ORDER BY round_id")
            return [self._round_from_row(r) for r in rows]

    def _require_open(self, round_id: int) -> None:
        """Inside tx(), before a round closes or is abandoned: UnknownId / Conflict unless it is open."""
        row = self._one("SELECT state FROM rounds WHERE round_id = ?", (round_id,))
        if row is None:
            raise UnknownId(f"round {round_id} does not exist")
        if row[0] != OPEN:
            raise Conflict(f"round {round_id} is {row[0]}, not open")

    def _require_accepting(self, round_id: int) -> None:
        """Inside tx(), before an update is recorded: UnknownId / Conflict unless the round takes updates."""
        self._require_open(round_id)

    def close_round(self, round_id: int, version: int, metrics: dict[str, float], now: float) -> Round:
        check_id(version, "version")
        with self.tx():
            self._require_open(round_id)
            self._run("UPDATE rounds SET state = 'closed', version = ?, metrics = ?, closed_at = ? WHERE round_id = ?",
                      (version, json.dumps(metrics, sort_keys=True), now, round_id))
            return self.round(round_id)  # type: ignore[return-value]

    def abandon_round(self, round_id: int, reason: str, now: float) -> Round:
        with self.tx():
            self._require_open(round_id)
            self._run("UPDATE rounds SET state = 'abandoned', reason = ?, closed_at = ? WHERE round_id = ?",
                      (reason, now, round_id))
            return self.round(round_id)  # type: ignore[return-value]

    def count_rounds(self, state: str) -> int:
        return self._one("SELECT COUNT(*) FROM rounds WHERE state = ?", (state,))[0]  # type: ignore[index]

    # ------------------------------------------------------------------ updates

    def _update_row(self, rec: UpdateRecord) -> dict[str, Any]:
        """Column -> value of an accepted update's row (a backend may store more)."""
        return {"round_id": rec.round_id, "device_id": rec.device_id, "num_examples": rec.num_examples,
                "nbytes": rec.nbytes, "sha256": rec.sha256, "accepted_at": rec.accepted_at,
                "metrics": json.dumps(rec.metrics, sort_keys=True)}

    def add_update(self, rec: UpdateRecord) -> None:
        with self.tx():
            self._require_accepting(rec.round_id)
            if self.device(rec.device_id) is None:
                raise UnknownId(f"device {rec.device_id} is not enrolled")
            row = self._update_row(rec)
            duplicate = self._DUPLICATE_UPDATE(f"device {rec.device_id} already reported for round {rec.round_id}")
            with self._unique(duplicate, "update record refused by the database"):
                self._run(f"INSERT INTO updates ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))

    def updates(self, round_id: int) -> list[UpdateRecord]:
        rows = self._all(f"SELECT {_UPDATE_COLS} FROM updates WHERE round_id = ? ORDER BY device_id", (round_id,))
        return [UpdateRecord(*r[:6], metrics=json.loads(r[6])) for r in rows]

    def count_updates(self, round_id: int) -> int:
        return self._one("SELECT COUNT(*) FROM updates WHERE round_id = ?", (round_id,))[0]  # type: ignore[index]

    def record_late(self, round_id: int, device_id: int, now: float) -> None:
        with self.tx():
            if self._one("SELECT 1 FROM rounds WHERE round_id = ?", (round_id,)) is None:
                raise UnknownId(f"round {round_id} does not exist")
            self._run("INSERT INTO late_updates (round_id, device_id, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                      (round_id, device_id, now))

    def count_late(self, round_id: int | None = None) -> int:
        if round_id is None:
            return self._one("SELECT COUNT(*) FROM late_updates")[0]  # type: ignore[index]
        return self._one("SELECT COUNT(*) FROM late_updates WHERE round_id = ?",  # type: ignore[index]
                         (round_id,))[0]
