"""One suite over every state backend: memory, SQLite :memory:, SQLite on a file, PostgreSQL.

PostgreSQL runs in a throwaway cluster started once for the session (tests/pg_cluster.py), one
fresh database per test; skipped, with the reason, where the binaries or psycopg are missing.
"""

import itertools
from pathlib import Path

import pytest
from fedpers.server import state as st

_databases = itertools.count()


@pytest.fixture(params=["memory", "sqlite-memory", "sqlite-file", "postgres"])
def state(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "memory":
        s = st.MemoryState()
    elif request.param == "sqlite-memory":
        s = st.SqliteState(":memory:")
    elif request.param == "sqlite-file":
        s = st.SqliteState(tmp_path / "db" / "state.sqlite")
    else:
        from fedpers.server.state_pg import PostgresState

        cluster = request.getfixturevalue("pg_cluster")
        s = PostgresState(cluster.create_database(f"contract{next(_databases)}"), replica="test")
    yield s
    s.close()


def _devices(state: st.State, n: int) -> list[int]:
    return [state.add_device(f"dev{i}", f"secret-hash{i}", 1.0).device_id for i in range(n)]


def test_devices_enroll_with_unique_names_and_credentials(state: st.State) -> None:
    a = state.add_device("alice", "s1", 10.0, enroll_hash="e1")
    b = state.add_device("bob", "s2", 11.0)
    anon = state.add_device(None, "s3", 12.0)
    anon2 = state.add_device("", "s4", 12.0)
    ids = [a.device_id, b.device_id, anon.device_id, anon2.device_id]
    assert all(i >= 1 for i in ids) and len(set(ids)) == 4
    assert a == st.Device(a.device_id, "alice", "s1", 10.0, enroll_hash="e1") and not a.revoked
    with pytest.raises(st.Conflict, match="'alice' is already enrolled"):  # a name never yields an identity
        state.add_device("alice", "s9", 20.0)
    assert state.device(a.device_id) == a and state.device_by_name("alice") == a
    assert state.device(anon.device_id).name is None and state.device_by_name("carol") is None
    assert state.device(9999) is None and state.device(0) is None and state.device(-5) is None
    assert state.count_devices() == 4 and [d.device_id for d in state.devices()] == sorted(ids)
    changed = state.set_credentials(a.device_id, session_hash="t1", enroll_hash="")
    assert (changed.secret_hash, changed.session_hash, changed.enroll_hash) == ("s1", "t1", "")
    assert state.set_credentials(a.device_id, secret_hash="s1b").session_hash == "t1"
    with pytest.raises(st.UnknownId):
        state.set_credentials(777, session_hash="x")


def test_revocation_frees_the_name_and_survives(state: st.State) -> None:
    a = state.add_device("alice", "s1", 10.0)
    state.set_credentials(a.device_id, session_hash="t1")
    gone = state.revoke_device(a.device_id, 30.0)
    assert gone.revoked and gone.revoked_at == 30.0 and gone.session_hash == ""
    assert state.revoke_device(a.device_id, 40.0).revoked_at == 30.0  # the first revocation stands
    assert state.revoked_ids() == frozenset({a.device_id})
    assert state.device_by_name("alice") is None
    assert state.count_devices() == 1 and state.count_devices(active_only=True) == 0
    new = state.add_device("alice", "s2", 50.0)  # the operator may enroll a replacement under the name
    assert new.device_id != a.device_id and state.device_by_name("alice") == new
    with pytest.raises(st.UnknownId):
        state.revoke_device(777, 1.0)


def test_round_lifecycle_close(state: st.State) -> None:
    d = _devices(state, 3)
    r = state.open_round(0, (d[2], d[0]), now=5.0, deadline=65.0)
    assert r.round_id >= 1 and r.state == st.OPEN and r.selected == (d[0], d[2]) and r.base_version == 0
    assert state.open_rounds() == [r] and state.round(r.round_id) == r
    state.add_update(st.UpdateRecord(r.round_id, d[0], 10, 400, "ab", 6.0, {"loss": 0.5}))
    state.add_update(st.UpdateRecord(r.round_id, d[2], 30, 400, "cd", 7.0))
    assert state.count_updates(r.round_id) == 2
    assert [u.device_id for u in state.updates(r.round_id)] == [d[0], d[2]]
    assert state.updates(r.round_id)[0].metrics == {"loss": 0.5}
    closed = state.close_round(r.round_id, version=1, metrics={"loss": 0.4}, now=8.0)
    assert closed.state == st.CLOSED and closed.version == 1 and closed.metrics == {"loss": 0.4}
    assert closed.closed_at == 8.0 and state.open_rounds() == []
    assert state.count_rounds(st.CLOSED) == 1 and state.count_rounds(st.OPEN) == 0


def test_round_abandon_and_listing_order(state: st.State) -> None:
    d = _devices(state, 2)
    r1 = state.open_round(0, tuple(d), 1.0, 2.0)
    a = state.abandon_round(r1.round_id, "deadline with 0 of 2 updates", 3.0)
    assert a.state == st.ABANDONED and a.reason.startswith("deadline") and a.version == 0
    r2 = state.open_round(0, tuple(d), 4.0, 5.0)
    assert r2.round_id > r1.round_id
    assert [r.round_id for r in state.rounds()] == [r2.round_id, r1.round_id]
    assert [r.round_id for r in state.rounds(limit=1)] == [r2.round_id]
    assert state.count_rounds(st.ABANDONED) == 1


def test_finished_rounds_refuse_changes(state: st.State) -> None:
    d = _devices(state, 1)
    r = state.open_round(0, tuple(d), 1.0, 2.0)
    state.close_round(r.round_id, 1, {}, 3.0)
    with pytest.raises(st.Conflict, match="closed, not open"):
        state.close_round(r.round_id, 2, {}, 4.0)
    with pytest.raises(st.Conflict):
        state.abandon_round(r.round_id, "x", 4.0)
    with pytest.raises(st.Conflict, match="not open"):
        state.add_update(st.UpdateRecord(r.round_id, d[0], 1, 1, "x", 5.0))
    with pytest.raises(st.UnknownId, match="round 999"):
        state.abandon_round(999, "x", 4.0)


def test_duplicate_and_unknown_updates(state: st.State) -> None:
    d = _devices(state, 1)
    r = state.open_round(0, tuple(d), 1.0, 2.0)
    state.add_update(st.UpdateRecord(r.round_id, d[0], 1, 1, "x", 5.0))
    with pytest.raises(st.Conflict, match="already reported"):
        state.add_update(st.UpdateRecord(r.round_id, d[0], 2, 1, "y", 6.0))
    with pytest.raises(st.UnknownId, match="device 777"):
        state.add_update(st.UpdateRecord(r.round_id, 777, 2, 1, "y", 6.0))
    with pytest.raises(st.UnknownId):
        state.open_round(0, (777,), 1.0, 2.0)
    assert state.count_updates(r.round_id) == 1 and len(state.open_rounds()) == 1


def test_late_updates_are_counted_once_per_device_and_round(state: st.State) -> None:
    d = _devices(state, 2)
    r = state.open_round(0, tuple(d), 1.0, 2.0)
    state.close_round(r.round_id, 1, {}, 3.0)
    state.record_late(r.round_id, d[0], 4.0)
    state.record_late(r.round_id, d[0], 5.0)  # a retry of the same late update
    state.record_late(r.round_id, d[1], 5.0)
    r2 = state.open_round(1, tuple(d), 6.0, 7.0)
    state.record_late(r2.round_id, d[1], 8.0)
    assert state.count_late(r.round_id) == 2 and state.count_late(r2.round_id) == 1 and state.count_late() == 3
    with pytest.raises(st.UnknownId):
        state.record_late(999, d[0], 9.0)


def test_tx_rolls_back_everything_on_error(state: st.State) -> None:
    d = _devices(state, 2)
    r = state.open_round(0, tuple(d), 1.0, 2.0)
    with pytest.raises(RuntimeError, match="boom"), state.tx():
        state.add_update(st.UpdateRecord(r.round_id, d[0], 1, 1, "x", 5.0))
        state.add_device("carol", "h", 1.0)
        state.close_round(r.round_id, 1, {}, 6.0)
        raise RuntimeError("boom")
    assert state.count_updates(r.round_id) == 0
    assert state.round(r.round_id).state == st.OPEN
    assert state.count_devices() == 2


def test_nested_tx_rolls_back_only_the_inner_scope(state: st.State) -> None:
    d = _devices(state, 2)
    r = state.open_round(0, tuple(d), 1.0, 2.0)
    with state.tx():
        state.add_update(st.UpdateRecord(r.round_id, d[0], 1, 1, "x", 5.0))
        with pytest.raises(st.Conflict):
            with state.tx():
                state.add_update(st.UpdateRecord(r.round_id, d[1], 1, 1, "y", 5.0))
                state.add_update(st.UpdateRecord(r.round_id, d[1], 1, 1, "y", 5.0))
    assert [u.device_id for u in state.updates(r.round_id)] == [d[0]]


def test_ids_and_versions_are_int63(state: st.State) -> None:
    d = _devices(state, 1)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        state.open_round(1 << 63, tuple(d), 1.0, 2.0)
    with pytest.raises(ValueError):
        state.open_round(-1, tuple(d), 1.0, 2.0)
    r = state.open_round(st.INT63_MAX, tuple(d), 1.0, 2.0)
    assert state.round(r.round_id).base_version == st.INT63_MAX
    with pytest.raises(ValueError):
        state.close_round(r.round_id, 0, {}, 3.0)
    with pytest.raises(TypeError):
        st.check_id(True, "x")
    assert state.round(1 << 63) is None


def test_sqlite_file_is_private_and_revocation_survives_reopen(tmp_path: Path) -> None:
    import os
    import stat

    path = tmp_path / "state.sqlite"
    s = st.SqliteState(path)
    d = s.add_device("dev", "s", 1.0).device_id
    s.revoke_device(d, 2.0)
    s.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    s2 = st.SqliteState(path)
    assert s2.revoked_ids() == frozenset({d}) and s2.device(d).revoked
    s2.close()


def test_sqlite_database_from_before_device_secrets_is_migrated(tmp_path: Path) -> None:
    """The old devices table (token_hash, names unique forever): rebuilt, old devices revoked, history kept."""
    import sqlite3

    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE devices (device_id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE,
                              token_hash TEXT NOT NULL, joined_at REAL NOT NULL);
        CREATE TABLE rounds (round_id INTEGER PRIMARY KEY AUTOINCREMENT, base_version INTEGER NOT NULL,
            state TEXT NOT NULL, opened_at REAL NOT NULL, deadline REAL NOT NULL, closed_at REAL NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '', metrics TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE selections (round_id INTEGER NOT NULL REFERENCES rounds(round_id),
            device_id INTEGER NOT NULL REFERENCES devices(device_id), PRIMARY KEY (round_id, device_id));
        INSERT INTO devices (name, token_hash, joined_at) VALUES ('old-phone', 'abc', 5.0), (NULL, 'def', 6.0);
        INSERT INTO rounds (base_version, state, opened_at, deadline) VALUES (0, 'closed', 1.0, 2.0);
        INSERT INTO selections VALUES (1, 1), (1, 2);
    """)
    db.close()
    s = st.SqliteState(path)
    assert [(d.device_id, d.name, d.revoked, d.joined_at) for d in s.devices()] == [(1, "old-phone", True, 5.0),
                                                                                    (2, None, True, 6.0)]
    assert s.round(1).selected == (1, 2)
    fresh = s.add_device("old-phone", "s", 7.0)  # its name is free again; ids continue
    assert fresh.device_id == 3
    s.close()


def test_sqlite_file_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    s = st.SqliteState(path)
    d = _devices(s, 2)
    r = s.open_round(0, tuple(d), 1.0, 2.0)
    s.add_update(st.UpdateRecord(r.round_id, d[0], 3, 10, "x", 5.0, {"acc": 0.25}))
    s.close()
    s2 = st.SqliteState(path)
    assert s2.count_devices() == 2 and s2.open_rounds()[0].selected == tuple(d)
    assert s2.updates(r.round_id)[0].metrics == {"acc": 0.25}
    assert s2._one("PRAGMA journal_mode")[0] == "wal"
    s2.close()
