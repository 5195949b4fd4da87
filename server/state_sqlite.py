"""Federation bookkeeping in SQLite (stdlib sqlite3, WAL): the durable default `State` backend.

The SQL itself is shared with PostgreSQL (server/state_sql.py); here is what is SQLite's own: the
connection and its pragmas, the schema, migrating an older devices table, transactions
(`BEGIN IMMEDIATE`, nesting as savepoints) and how a constraint violation shows. Ids and versions
are positive int63, so they fit SQLite's signed INTEGER.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedpers.private import tighten_file
from fedpers.server.state import Conflict, StateError
from fedpers.server.state_sql import SqlState

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


class SqliteState(SqlState):
    """State in one SQLite database (a file, or ":memory:"), shared by the server's threads."""

    _NO_LIMIT = -1  # (SQLite's LIMIT takes no NULL)

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        """Open (or create) the database; `read_only` opens an existing one for inspection only."""
        super().__init__()
        self.path = str(path)
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

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _insert_id(self, sql: str, args: Sequence[Any], key: str) -> int:
        return self._run(sql, args).lastrowid  # type: ignore[return-value]

    @contextmanager
    def _unique(self, duplicate: Conflict, refused: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise duplicate from None
            raise StateError(f"{refused}: {exc}") from None

    def count_late(self, round_id: int | None = None) -> int:
        if self._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'late_updates'") is None:
            return 0  # a store written before late updates were counted, opened read-only
        return super().count_late(round_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
