"""kill -9 campaign: the server is killed over and over while three real devices train; nothing
acknowledged is lost and the federation finishes.

A server process on a fixed port with a store; three `fedpers-client run` processes. The server is
SIGKILLed KILLS times: every third time right after it logs that an update was accepted (that is,
committed and about to be acknowledged), otherwise after a random time once it serves. Each time it
is started again on the same store. At the end the federation must finish, and every update a
device recorded as acknowledged (its round history, written only after an accepted reply) must
have been aggregated: its round closed, its row in the database, and the round's version made from
exactly the recorded updates. `pytest tests/test_kill_campaign.py -s` prints the table.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from fedpers.client.partition import partition_digits, write_partition
from fedpers.client.personal import PersonalStore
from fedpers.client.processes import Child, free_port, wait_for_server
from fedpers.store import ModelStore
from fedpers.stub import get_status

from tests.server_helpers import client_tls, client_tls_args, server_tls_args

MODEL = Path(__file__).parent / "data" / "digits_mlp_personal.ini"
DEVICES = 3
CAMPAIGN_ROUNDS = 100_000  # the federation cannot finish while the campaign runs, however fast rounds are
FINAL_ROUNDS = 3  # after the last kill: this many more rounds, then DONE
KILLS = 21
TOKEN, ADMIN = "kc-enroll", "kc-admin"
SERVER_ENV = {"FEDPERS_ENROLL_TOKEN": TOKEN, "FEDPERS_ADMIN_TOKEN": ADMIN}  # secrets never go in argv
ACCEPTED = b"accepted ("  # rounds.py: "round %d: update from device %d accepted (%d/%d)" (DEBUG)
pytestmark = pytest.mark.slow


def _start_server(tmp: Path, port: int, life: int, rounds: int = CAMPAIGN_ROUNDS) -> tuple[Child, str]:
    port_file = tmp / f"server-{life}.port"
    argv = [sys.executable, "-m", "fedpers.server", "serve", "--model", str(MODEL), "--store", str(tmp / "store"),
            "--listen", f"127.0.0.1:{port}", "--port-file", str(port_file), "--rounds", str(rounds),
            "--min-devices", str(DEVICES), "--round-timeout", "120", "--retry-after", "0.1", "--codec", "int8",
            "--local-epochs", "1", "--log-level", "DEBUG", *server_tls_args()]
    server = Child.start("server", argv, tmp / "logs" / f"server-{life:02d}.log", env=SERVER_ENV)
    return server, wait_for_server(port_file, server, timeout=90, tls=client_tls())


def _device(tmp: Path, address: str, i: int) -> Child:
    argv = [sys.executable, "-m", "fedpers.client", "run", "--server", address, "--data",
            str(tmp / "data" / f"device-{i}.npz"), "--state", str(tmp / "dev" / str(i)), "--name", f"kc-{i}",
            "--retry-seconds", "300", "--log-level", "WARNING", *client_tls_args()]
    return Child.start(f"device-{i}", argv, tmp / "logs" / f"device-{i}.log", env={"FEDPERS_ENROLL_TOKEN": TOKEN})


def _wait_for_ack(server: Child, since: int, timeout: float) -> bool:
    """Poll the server's log until a new acceptance line appears after byte `since`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        if ACCEPTED in server.log_path.read_bytes()[since:]:
            return True
        time.sleep(0.002)
    return False


def test_kill_9_campaign_loses_no_acknowledged_update(tmp_path: Path) -> None:
    rng = random.Random(11)
    splits = partition_digits(DEVICES, seed=4)
    write_partition(tmp_path / "data", [type(s)(s.x[:64], s.y[:64], s.x_test[:20], s.y_test[:20], s.distortion)
                                        for s in splits])
    port = free_port()
    kills, after_ack = 0, 0
    devices: list[Child] = []
    server, address = _start_server(tmp_path, port, 0)
    try:
        devices = [_device(tmp_path, address, i) for i in range(DEVICES)]
        life = 0
        closed = 0
        while kills < KILLS:
            if life % 3 == 0:
                since = len(server.log_path.read_bytes())
                hit = _wait_for_ack(server, since, timeout=30)
                after_ack += hit
            else:
                time.sleep(rng.uniform(0.2, 2.5))
            assert server.poll() is None, server.tail(30)
            closed = get_status(address, tls=client_tls(), admin_token=ADMIN, timeout=5).rounds_completed
            server.proc.kill()  # SIGKILL: no handler, no grace, no cleanup
            server.proc.wait()
            server.stop()
            kills += 1
            life += 1
            for d in devices:
                assert d.poll() in (None, 0), d.tail(30)
            # the last life gets a finite federation: a few rounds past what had closed before the kill
            final_rounds = closed + FINAL_ROUNDS
            server, address = _start_server(tmp_path, port, life, CAMPAIGN_ROUNDS if kills < KILLS else final_rounds)
        deadline = time.monotonic() + 240
        while any(d.poll() is None for d in devices):
            assert time.monotonic() < deadline, "the federation did not finish after the campaign"
            assert server.poll() is None, server.tail(30)
            time.sleep(0.2)
        codes = [d.stop() for d in devices]
        status = get_status(address, tls=client_tls(), admin_token=ADMIN)
    finally:
        for d in devices:
            d.stop()
        server.stop()

    assert kills >= 20 and after_ack >= 6, (kills, after_ack)
    assert codes == [0] * DEVICES, [d.tail(20) for d in devices]
    assert status.finished and status.rounds_completed >= final_rounds

    acked = set()
    for i in range(DEVICES):
        st = PersonalStore(tmp_path / "dev" / str(i)).load()
        acked |= {(st.device_id, h.round_id) for h in st.history}
    db = sqlite3.connect(f"file:{tmp_path / 'store' / 'state.sqlite'}?mode=ro", uri=True)
    closed = {rid: v for rid, v in db.execute("SELECT round_id, version FROM rounds WHERE state = 'closed'")}
    rows = set(db.execute("SELECT device_id, round_id FROM updates"))
    db.close()
    store = ModelStore(tmp_path / "store")
    per_round: dict[int, int] = {}
    for _, rid in rows:
        per_round[rid] = per_round.get(rid, 0) + 1
    for rid, v in closed.items():  # each version was made from exactly its round's recorded updates
        assert store.load_version(v).meta["devices"] == per_round.get(rid, 0), rid
    aggregated = {(d, r) for d, r in acked if r in closed and (d, r) in rows}
    lost = acked - aggregated
    assert not list((tmp_path / "store").rglob("*.tmp-*")), "temp files left behind"
    table = (f"{'kills':>6} {'after ack':>10} {'acked':>6} {'aggregated':>11} {'lost':>5} {'rounds':>7}\n"
             f"{kills:>6} {after_ack:>10} {len(acked):>6} {len(aggregated):>11} {len(lost):>5} "
             f"{status.rounds_completed:>7}")
    print("\nkill -9 campaign\n" + table)
    (tmp_path / "campaign.txt").write_text(table + "\n")
    assert not lost, f"acknowledged updates lost: {sorted(lost)}"
