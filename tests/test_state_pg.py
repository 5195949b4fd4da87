"""What the PostgreSQL backend does beyond the State contract: the lease, the closing mark, credentials."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from fedpers.client.processes import free_port
from fedpers.server import state as st
from fedpers.server.state_pg import PostgresState, RoundNotOpen, redact, url_has_password

from tests.pg_cluster import PgCluster


@pytest.fixture
def pg(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> PostgresState:
    name = "pg_" + request.node.name.lower()[-40:].replace("[", "_").replace("]", "")
    s = PostgresState(pg_cluster.create_database(name), replica="r1")
    yield s
    s.close()


def test_the_lease_is_exclusive_renewable_and_moves_once_it_runs_out(pg: PostgresState, pg_cluster: PgCluster) -> None:
    other = PostgresState(pg.url, replica="r2")
    try:
        first = pg.acquire_lease("coordinator", "r1", ttl=0.5)
        assert first is not None and first.epoch == 1
        assert other.acquire_lease("coordinator", "r2", ttl=0.5) is None  # held
        assert pg.acquire_lease("coordinator", "r1", ttl=0.5) == first  # renewed: same epoch
        time.sleep(0.7)
        taken = other.acquire_lease("coordinator", "r2", ttl=5)
        assert taken is not None and taken.epoch == 2  # expired: moves, epoch grows (the fencing token)
        with pytest.raises(st.StateError, match="no longer holds"), pg.tx():
            pg.check_lease("coordinator", first)
        with other.tx():
            other.check_lease("coordinator", taken)
        other.release_lease("coordinator", "r2")
        assert pg.acquire_lease("coordinator", "r1", ttl=5).epoch == 3  # released: taken at once
    finally:
        other.close()


def test_a_closing_round_takes_no_more_updates_and_rows_name_their_replica(pg: PostgresState) -> None:
    d = [pg.add_device(f"d{i}", "h", 1.0).device_id for i in range(2)]
    r = pg.open_round(0, tuple(d), 1.0, 2.0)
    pg.add_update(st.UpdateRecord(r.round_id, d[0], 1, 1, "x", 1.5))
    assert pg.mark_closing(r.round_id, 1.6) and pg.closing_at(r.round_id) == 1.6
    with pytest.raises(RoundNotOpen, match="closing"):
        pg.add_update(st.UpdateRecord(r.round_id, d[1], 1, 1, "y", 1.7))
    assert pg.committed_by(r.round_id) == {d[0]: "r1"}
    assert pg.round(r.round_id).state == st.OPEN  # closing is not a state: the close commits it
    pg.close_round(r.round_id, 1, {}, 1.8)
    assert pg.published_version() == (1, 1) and not pg.mark_closing(r.round_id, 1.9)


def test_presence_and_heartbeats(pg: PostgresState) -> None:
    pg.heartbeat("r1", seen={1: 10.0, 2: 11.0}, waiting={2: 11.0})
    pg.heartbeat("r2", seen={1: 12.0}, waiting={3: 12.5})
    seen, waiting = pg.presence(since=9.0)
    assert seen == {1: 12.0, 2: 11.0, 3: 12.5} and waiting == {2: 11.0, 3: 12.5}
    pg.clear_waiting([2])
    assert pg.presence(since=9.0)[1] == {3: 12.5}
    assert pg.live_replicas(within=60) == {"r1", "r2"}
    pg.forget_replica("r2")
    assert pg.live_replicas(within=60) == {"r1"}


def test_the_password_comes_from_elsewhere_than_the_url(pg_cluster: PgCluster) -> None:
    url = pg_cluster.tcp_url()  # over TCP on 127.0.0.1: scram-sha-256, a password is required
    assert not url_has_password(url)
    with pytest.raises(st.StateUnavailable, match="cannot connect") as refused:
        PostgresState(url, replica="r", connect_timeout=3)
    assert pg_cluster.password not in str(refused.value)
    s = PostgresState(url, replica="r", password=pg_cluster.password)  # what --state-password-file hands over
    assert s.count_devices() >= 0
    s.close()
    with pytest.raises(st.StateUnavailable):  # nobody listens there: unavailable, not a crash
        PostgresState(f"postgresql://u@127.0.0.1:{free_port()}/db", connect_timeout=1)


def test_urls_with_a_password_are_refused_on_argv_and_redacted_in_logs() -> None:
    assert url_has_password("postgresql://u:pw@h/db") and url_has_password("postgresql://u@h/db?password=pw")
    assert redact("postgresql://u:pw@h:5/db?password=pw&sslmode=require") == \
        "postgresql://u:***@h:5/db?password=***&sslmode=require"
    proc = subprocess.run([sys.executable, "-m", "fedpers.server", "--model", "m.ini", "--store", "s",
                           "--state-url", "postgresql://fedpers:hunter2@db/fedpers", "--insecure"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--state-password-file" in proc.stderr and "hunter2" not in proc.stderr


def test_a_name_enrolled_through_another_replica_a_moment_ago_is_taken(pg: PostgresState, monkeypatch) -> None:
    from fedpers import wire
    from fedpers.server.errors import NameTaken
    from fedpers.server.identity import Identity, IdentityPolicy

    other = PostgresState(pg.url, replica="r2")
    try:
        a, b = (Identity(s, IdentityPolicy(open_enrollment=True)) for s in (pg, other))
        a.enroll(wire.EnrollRequest("", "kitchen", request_id="req-a-0123456789abcdef"))
        monkeypatch.setattr(other, "device_by_name", lambda name: None)  # b looked before a's row committed
        with pytest.raises(NameTaken, match="kitchen"):
            b.enroll(wire.EnrollRequest("", "kitchen", request_id="req-b-0123456789abcdef"))
        assert pg.count_devices() == 1
    finally:
        other.close()
