"""Two `fedpers-server` replicas on one PostgreSQL, four real devices over gRPC with TLS, one replica
killed with SIGKILL mid-round: the other finishes the federation and no acknowledged update is lost.

A throwaway PostgreSQL cluster (tests/pg_cluster.py), one shared --store directory, two replicas
behind the TCP load balancer the compose fleet uses (docker/fleet_lb.py), four `fedpers-client run`
processes dialling the balancer. Once a round has closed, the coordinating replica is killed (kill -9)
right after it logs that it accepted an update. Then: the federation finishes, every device exits 0,
every update a device recorded as acknowledged (its round history, written only after an accepted
reply) has its row in a closed round, and each version was made from exactly its round's rows, as
tests/test_kill_campaign.py checks for one server. `pytest tests/test_replicas.py -s` prints the
numbers. `run_federation` is also what bench/replicas.py times with one and with two replicas.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fedpers.client.partition import partition_digits, write_partition
from fedpers.client.personal import PersonalStore
from fedpers.client.processes import Child, free_port, wait_for_server, wait_until
from fedpers.store import ModelStore
from fedpers.stub import get_status

from tests.pg_cluster import PgCluster
from tests.server_helpers import client_tls, client_tls_args, server_tls_args

REPO = Path(__file__).resolve().parent.parent
MODEL = Path(__file__).parent / "data" / "digits_mlp_personal.ini"
LB = REPO / "docker" / "fleet_lb.py"
DEVICES = 4
TOKEN, ADMIN = "rep-enroll", "rep-admin"
SERVER_ENV = {"FEDPERS_ENROLL_TOKEN": TOKEN, "FEDPERS_ADMIN_TOKEN": ADMIN}  # secrets never go in argv
ACCEPTED = re.compile(rb"round (\d+): update from device \d+ accepted")
COORDINATES = b"coordinates the federation"
pytestmark = pytest.mark.slow


@dataclass
class Federation:
    """A running federation of replicas behind one balancer, and its devices."""

    tmp: Path
    url: str
    rounds: int
    replicas: list[Child] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    devices: list[Child] = field(default_factory=list)
    lb: Child | None = None
    address: str = ""

    def start_replica(self, i: int) -> None:
        port_file = self.tmp / f"replica-{i}.port"
        argv = [sys.executable, "-m", "fedpers.server", "serve", "--model", str(MODEL), "--store",
                str(self.tmp / "store"), "--state-url", self.url, "--replica-name", f"replica-{i}",
                "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--rounds", str(self.rounds),
                "--min-devices", str(DEVICES - 1), "--round-timeout", "60", "--retry-after", "0.1", "--codec", "int8",
                "--local-epochs", "1", "--log-level", "DEBUG", "--linger", "5", *server_tls_args()]
        child = Child.start(f"replica-{i}", argv, self.tmp / "logs" / f"replica-{i}.log", env=SERVER_ENV)
        self.replicas.append(child)
        self.addresses.append(wait_for_server(port_file, child, timeout=90, tls=client_tls()))

    def start_lb(self) -> None:
        port = free_port()
        argv = [sys.executable, str(LB), "--listen", f"127.0.0.1:{port}", "--connect-timeout", "1",
                *[x for a in self.addresses for x in ("--backend", a)]]
        self.lb = Child.start("lb", argv, self.tmp / "logs" / "lb.log")
        self.address = f"127.0.0.1:{port}"
        wait_until("the balancer to listen", lambda: b"listening" in self.lb.log_path.read_bytes(), 30)

    def start_devices(self) -> None:
        for i in range(DEVICES):
            argv = [sys.executable, "-m", "fedpers.client", "run", "--server", self.address, "--data",
                    str(self.tmp / "data" / f"device-{i}.npz"), "--state", str(self.tmp / "dev" / str(i)),
                    "--name", f"rep-{i}", "--retry-seconds", "300", "--log-level", "WARNING", *client_tls_args()]
            self.devices.append(Child.start(f"device-{i}", argv, self.tmp / "logs" / f"device-{i}.log",
                                            env={"FEDPERS_ENROLL_TOKEN": TOKEN}))

    def status(self, i: int):
        return get_status(self.addresses[i], tls=client_tls(), admin_token=ADMIN, timeout=5)

    def coordinator(self) -> int:
        """The replica that took the coordinator lease (before any kill, exactly one has)."""
        holders = [i for i, r in enumerate(self.replicas) if COORDINATES in r.log_path.read_bytes()]
        assert len(holders) == 1, holders
        return holders[0]

    def stop(self) -> None:
        for c in [*self.devices, *self.replicas, *([self.lb] if self.lb else [])]:
            c.stop()


def write_data(tmp: Path) -> None:
    splits = partition_digits(DEVICES, seed=5)
    write_partition(tmp / "data", [type(s)(s.x[:64], s.y[:64], s.x_test[:20], s.y_test[:20], s.distortion)
                                   for s in splits])


def wait_for_ack(child: Child, since: int, timeout: float) -> bool:
    """Poll a replica's log until a new acceptance line appears after byte `since`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if ACCEPTED.search(child.log_path.read_bytes()[since:]):
            return True
        time.sleep(0.002)
    return False


def check_nothing_lost(tmp: Path, url: str) -> dict[str, int]:
    """Every acknowledged update aggregated; each version made from exactly its round's rows."""
    import psycopg

    acked = set()
    for i in range(DEVICES):
        st = PersonalStore(tmp / "dev" / str(i)).load()
        acked |= {(st.device_id, h.round_id) for h in st.history}
    with psycopg.connect(url) as db:
        closed = dict(db.execute("SELECT round_id, version FROM rounds WHERE state = 'closed'").fetchall())
        rows = set(db.execute("SELECT device_id, round_id FROM updates").fetchall())
        by_replica = dict(db.execute("SELECT replica, COUNT(*) FROM updates GROUP BY replica").fetchall())
    store = ModelStore(tmp / "store", shared=True)
    per_round: dict[int, int] = {}
    for _, rid in rows:
        per_round[rid] = per_round.get(rid, 0) + 1
    for rid, v in closed.items():
        assert store.load_version(v).meta["devices"] == per_round.get(rid, 0), (rid, v)
    aggregated = {(d, r) for d, r in acked if r in closed and (d, r) in rows}
    lost = sorted(acked - aggregated)
    assert not lost, f"acknowledged updates lost: {lost}"
    return {"acked": len(acked), "aggregated": len(aggregated), "rounds": len(closed),
            **{f"rows via {k}": v for k, v in sorted(by_replica.items())}}


def run_federation(tmp: Path, url: str, replicas: int, rounds: int, kill: bool = False) -> dict[str, float]:
    """Start `replicas` replicas, the balancer and four devices; optionally kill -9 the coordinator
    right after an acknowledgement once a round closed; wait until every device is done."""
    write_data(tmp)
    fed = Federation(tmp, url, rounds)
    killed = ""
    try:
        for i in range(replicas):
            fed.start_replica(i)
        fed.start_lb()
        t0 = time.monotonic()
        fed.start_devices()
        if kill:
            wait_until("a first round to close", lambda: fed.status(0).rounds_completed >= 1, 180, interval=0.3)
            victim = fed.coordinator()
            since = len(fed.replicas[victim].log_path.read_bytes())
            assert wait_for_ack(fed.replicas[victim], since, timeout=120), fed.replicas[victim].tail(30)
            fed.replicas[victim].proc.kill()  # SIGKILL: no handler, no goodbye, its lease runs out
            fed.replicas[victim].proc.wait()
            killed = fed.replicas[victim].name
        deadline = time.monotonic() + 300
        while any(d.poll() is None for d in fed.devices):
            assert time.monotonic() < deadline, "the federation did not finish: " + \
                "\n".join(r.tail(20) for r in fed.replicas)
            for d in fed.devices:
                assert d.poll() in (None, 0), d.tail(30)
            time.sleep(0.2)
        seconds = time.monotonic() - t0
        codes = [d.stop() for d in fed.devices]
        assert codes == [0] * DEVICES, [d.tail(20) for d in fed.devices]
        alive = [i for i, r in enumerate(fed.replicas) if r.poll() is None]
        if alive:
            status = fed.status(alive[0])
            assert status.finished and status.rounds_completed >= rounds, status
        for r in fed.replicas:
            if r.name != killed:
                assert b"Traceback" not in r.log_path.read_bytes(), r.tail(40)
    finally:
        fed.stop()
    numbers = check_nothing_lost(tmp, url)
    return {"replicas": replicas, "seconds": seconds, "rounds/min": 60 * numbers["rounds"] / seconds,
            "killed": killed, **numbers}


def test_two_replicas_four_devices_one_killed_nothing_lost(tmp_path: Path, pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database("replicas")
    result = run_federation(tmp_path, url, replicas=2, rounds=5, kill=True)
    print("\ntwo replicas, one killed:", result)
    assert result["killed"] and result["rounds"] >= 5 and result["acked"] >= 5 * (DEVICES - 1)
    survivors = {k for k in result if k.startswith("rows via")}
    assert len(survivors) == 2, f"both replicas accepted updates: {result}"
