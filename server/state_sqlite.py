"""Federation bookkeeping in SQLite (stdlib sqlite3, WAL): the durable default `State` backend.

The connection and its pragmas, the schema, migrating an older devices table, transactions
(`BEGIN IMMEDIATE`, nesting as savepoints) and the contract's SQL. Ids and versions are positive
int63, so they fit SQLite's signed INTEGER.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpers.private import tighten_file
from fedpers.server.state import (
    OPEN,
    Conflict,
    Device,
    Round,
    State,
    StateError,
    UnknownId,
    UpdateRecord,
    check_id,
)
from fedpers.wire import INT63_MAX

log = logging.getLogger(__name__)

# Listed once; applied to every SQLite connection.
SQLITE_PRAGMAS: tuple[tuple[str, str], ...] = (
    ("journal_mode", "WAL"),
    ("synchronous", "FULL"),
    ("foreign_keys", "ON"),
    ("busy_timeout", "5000"),
)

_DEVICES_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    device_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT,
    secret_hash  TEXT NOT NULL,
    joined_at    REAL NOT NULL,
    session_hash TEXT NOT NULL DEFAULT '',
    revoked_at   REAL NOT NULL DEFAULT 0,
    enroll_hash  TEXT NOT NULL DEFAULT ''
)"""
_DEVICE_COLS = "device_id, name, secret_hash, joined_at, session_hash, revoked_at, enroll_hash"

_SCHEMA = _DEVICES_TABLE.format(name="devices") + """;
CREATE UNIQUE INDEX IF NOT EXISTS devices_active_name ON devices(name) WHERE revoked_at = 0;
CREATE TABLE IF NOT EXISTS rounds (
    round_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    base_version INTEGER NOT NULL CHECK (base_version >= 0),
    state        TEXT NOT NULL CHECK (state IN ('open', 'closed', 'abandoned')),
    opened_at    REAL NOT NULL,
    deadline     REAL NOT NULL,
    closed_at    REAL NOT NULL DEFAULT 0,
    version      INTEGER NOT NULL DEFAULT 0 CHECK (version >= 0),
    reason       TEXT NOT NULL DEFAULT '',
    metrics      TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS selections (
    round_id  INTEGER NOT NULL REFERENCES rounds(round_id),
    device_id INTEGER NOT NULL REFERENCES devices(device_id),
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    round_id     INTEGER NOT NULL REFERENCES rounds(round_id),
    device_id    INTEGER NOT NULL REFERENCES devices(device_id),
    num_examples INTEGER NOT NULL CHECK (num_examples > 0),
    nbytes       INTEGER NOT NULL CHECK (nbytes >= 0),
    sha256       TEXT NOT NULL,
    accepted_at  REAL NOT NULL,
    metrics      TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS late_updates (
    round_id  INTEGER NOT NULL REFERENCES rounds(round_id),
    device_id INTEGER NOT NULL,
    at        REAL NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
"""


class SqliteState(State):
    """State in one SQLite database (a file, or ":memory:"), shared by the server's threads.

    One connection guarded by a lock: writes are tiny and serialized by the coordinator anyway."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        """Open (or create) the database; `read_only` opens an existing one for inspection only."""
        self.path = str(path)
        self._lock = threading.RLock()
        self._depth = 0
        if read_only:
            uri = Path(self.path).resolve().as_uri() + "?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # owner only from the first byte: it names devices and holds credential hashes
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            tighten_file(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for key, value in SQLITE_PRAGMAS:
            self._db.execute(f"PRAGMA {key} = {value}")
        self._migrate_devices()
        with self.tx():  # (executescript would commit early; run the statements one by one)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
        if self.path != ":memory:":
            for suffix in ("-wal", "-shm"):
                tighten_file(self.path + suffix)

    def _migrate_devices(self) -> None:
        """A database from before device secrets (a `token_hash` column, names unique forever): rebuild
        the devices table; its devices cannot prove a secret, so they are revoked (freeing their
        names) and enroll again. Rounds, updates and versions are kept."""
        cols = [row[1] for row in self._db.execute("PRAGMA table_info(devices)")]
        if not cols or "secret_hash" in cols:
            return
        self._db.execute("PRAGMA foreign_keys = OFF")  # (only outside a transaction)
        try:
            with self.tx():
                self._db.execute(_DEVICES_TABLE.format(name="devices_v2"))
                n = self._db.execute(
                    "INSERT INTO devices_v2 (device_id, name, secret_hash, joined_at, revoked_at)"
                    " SELECT device_id, name, '', joined_at, ? FROM devices", (time.time(),)).rowcount
                self._db.execute("DROP TABLE devices")
                self._db.execute("ALTER TABLE devices_v2 RENAME TO devices")
                if self._db.execute("PRAGMA foreign_key_check").fetchall():
                    raise StateError(f"{self.path}: foreign keys broken while migrating the devices table")
        finally:
            self._db.execute("PRAGMA foreign_keys = ON")
        log.warning("%s: %d devices enrolled before device secrets existed are revoked; they enroll again",
                    self.path, n)

    @contextmanager
    def tx(self) -> Iterator[None]:
        with self._lock:
            depth = self._depth
            self._db.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if depth == 0:
                    self._db.execute("ROLLBACK")
                else:
                    self._db.execute(f"ROLLBACK TO sp{depth}")
                    self._db.execute(f"RELEASE sp{depth}")
                raise
            else:
                self._depth -= 1
                self._db.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add_device(self, name: str | None, secret_hash: str, now: float, *, enroll_hash: str = "") -> Device:
        with self.tx():
            try:
                cur = self._db.execute(
                    "INSERT INTO devices (name, secret_hash, joined_at, enroll_hash) VALUES (?, ?, ?, ?)",
                    (name or None, secret_hash, now, enroll_hash))
            except sqlite3.IntegrityError:
                raise Conflict(f"a device named {name!r} is already enrolled") from None
            return Device(check_id(cur.lastrowid, "device_id"), name or None, secret_hash, now,
                          enroll_hash=enroll_hash)

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
                values = (*(v for _, v in changes), device_id)
                self._db.execute(f"UPDATE devices SET {sets} WHERE device_id = ?", values)
            return self._known(device_id)

    def revoke_device(self, device_id: int, now: float) -> Device:
        with self.tx():
            if not self._known(device_id).revoked:
                self._db.execute("UPDATE devices SET revoked_at = ?, session_hash = '', enroll_hash = ''"
                                 " WHERE device_id = ?", (now, device_id))
            return self._known(device_id)

    def revoked_ids(self) -> frozenset[int]:
        return frozenset(d for (d,) in self._all("SELECT device_id FROM devices WHERE revoked_at > 0"))

    def open_round(self, base_version: int, selected: tuple[int, ...], now: float, deadline: float) -> Round:
        check_id(base_version, "base_version", allow_zero=True)
        with self.tx():
            cur = self._db.execute(
                "INSERT INTO rounds (base_version, state, opened_at, deadline) VALUES (?, 'open', ?, ?)",
                (base_version, now, deadline),
            )
            rid = check_id(cur.lastrowid, "round_id")
            for d in sorted(selected):
                if self.device(d) is None:
                    raise UnknownId(f"device {d} is not enrolled")
                self._db.execute("INSERT INTO selections (round_id, device_id) VALUES (?, ?)", (rid, d))
            return self.round(rid)  # type: ignore[return-value]

    _ROUND_COLS = "round_id, base_version, state, opened_at, deadline, closed_at, version, reason, metrics"

    def _round_from_row(self, row: tuple) -> Round:
        rid, base, state, opened, deadline, closed, version, reason, metrics = row
        sel = tuple(d for (d,) in self._all(
            "SELECT device_id FROM selections WHERE round_id = ? ORDER BY device_id", (rid,)))
        return Round(rid, base, state, opened, deadline, sel, closed, version, reason, json.loads(metrics))

    def round(self, round_id: int) -> Round | None:
        if not 1 <= round_id <= INT63_MAX:
            return None
        with self._lock:
            row = self._one(f"SELECT {self._ROUND_COLS} FROM rounds WHERE round_id = ?", (round_id,))
            return self._round_from_row(row) if row else None

    def rounds(self, limit: int | None = None) -> list[Round]:
        with self._lock:
            rows = self._all(f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round_id DESC LIMIT ?",
                             (-1 if limit is None else limit,))
            return [self._round_from_row(r) for r in rows]

    def open_rounds(self) -> list[Round]:
        with self._lock:
            rows = self._all(f"SELECT {self._ROUND_COLS} FROM rounds WHERE state = 'open' ORDER BY round_id")
            return [self._round_from_row(r) for r in rows]

    def _require_open(self, round_id: int) -> None:
        row = self._one("SELECT state FROM rounds WHERE round_id = ?", (round_id,))
        if row is None:
            raise UnknownId(f"round {round_id} does not exist")
        if row[0] != OPEN:
            raise Conflict(f"round {round_id} is {row[0]}, not open")

    def close_round(self, round_id: int, version: int, metrics: dict[str, float], now: float) -> Round:
        check_id(version, "version")
        with self.tx():
            self._require_open(round_id)
            self._db.execute(
                "UPDATE rounds SET state = 'closed', version = ?, metrics = ?, closed_at = ? WHERE round_id = ?",
                (version, json.dumps(metrics, sort_keys=True), now, round_id),
            )
            return self.round(round_id)  # type: ignore[return-value]

    def abandon_round(self, round_id: int, reason: str, now: float) -> Round:
        with self.tx():
            self._require_open(round_id)
            self._db.execute(
                "UPDATE rounds SET state = 'abandoned', reason = ?, closed_at = ? WHERE round_id = ?",
                (reason, now, round_id),
            )
            return self.round(round_id)  # type: ignore[return-value]

    def count_rounds(self, state: str) -> int:
        return self._one("SELECT COUNT(*) FROM rounds WHERE state = ?", (state,))[0]  # type: ignore[index]

    def add_update(self, rec: UpdateRecord) -> None:
        with self.tx():
            self._require_open(rec.round_id)
            if self.device(rec.device_id) is None:
                raise UnknownId(f"device {rec.device_id} is not enrolled")
            try:
                self._db.execute(
                    "INSERT INTO updates (round_id, device_id, num_examples, nbytes, sha256, accepted_at, metrics)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (rec.round_id, rec.device_id, rec.num_examples, rec.nbytes, rec.sha256, rec.accepted_at,
                     json.dumps(rec.metrics, sort_keys=True)),
                )
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                    raise Conflict(f"device {rec.device_id} already reported for round {rec.round_id}") from None
                raise StateError(f"update record refused by the database: {exc}") from None

    def updates(self, round_id: int) -> list[UpdateRecord]:
        rows = self._all(
            "SELECT round_id, device_id, num_examples, nbytes, sha256, accepted_at, metrics FROM updates"
            " WHERE round_id = ? ORDER BY device_id", (round_id,))
        return [UpdateRecord(*r[:6], metrics=json.loads(r[6])) for r in rows]

    def count_updates(self, round_id: int) -> int:
        return self._one("SELECT COUNT(*) FROM updates WHERE round_id = ?", (round_id,))[0]  # type: ignore[index]

    def record_late(self, round_id: int, device_id: int, now: float) -> None:
        with self.tx():
            if self._one("SELECT 1 FROM rounds WHERE round_id = ?", (round_id,)) is None:
                raise UnknownId(f"round {round_id} does not exist")
            self._db.execute("INSERT OR IGNORE INTO late_updates (round_id, device_id, at) VALUES (?, ?, ?)",
                             (round_id, device_id, now))

    def count_late(self, round_id: int | None = None) -> int:
        if self._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'late_updates'") is None:
            return 0  # a store written before late updates were counted, opened read-only
        if round_id is None:
            return self._one("SELECT COUNT(*) FROM late_updates")[0]  # type: ignore[index]
        return self._one("SELECT COUNT(*) FROM late_updates WHERE round_id = ?",  # type: ignore[index]
                         (round_id,))[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
