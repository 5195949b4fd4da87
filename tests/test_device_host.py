"""Virtual devices on hosts, without Ray: the real server and real agents over gRPC with TLS, in this process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fedpers import models
from fedpers.client import sim
from fedpers.client.data_plan import plan_for, write_plan
from fedpers.client.device_host import DeviceHost, DeviceOrder, HostConfig, Outcome
from fedpers.client.personal import PersonalStore
from fedpers.client.processes import Child, wait_for_server
from fedpers.client.report import read_report

MODEL = models.path("digits_cnn_personal.ini")


@pytest.fixture
def federation(tmp_path, monkeypatch):
    """A real fedpers-server (TLS, the run's tokens) for 3 devices, 3 rounds of all 3, and the devices' data."""
    cfg = sim.SimConfig(devices=3, rounds=3, local_epochs=1, min_devices=3, model=MODEL, round_timeout=30,
                        report_dir=tmp_path)
    tls = sim.SimTls.make(cfg, tmp_path / "tls")
    tokens = sim.SimSecrets()
    server = Child.start("server", sim.server_argv(cfg, tmp_path / "port", tmp_path / "store", tls),
                         tmp_path / "server.log", env=tokens.server_env())
    try:
        address = wait_for_server(tmp_path / "port", server, timeout=60, tls=tls.client())
        monkeypatch.setenv("FEDPERS_ENROLL_TOKEN", tokens.enroll_token)
        data = write_plan(plan_for(3), tmp_path / "data", seed=0)
        orders = [DeviceOrder(i, f"sim-device-{i}", str(data[i]), str(tmp_path / "devices" / str(i)))
                  for i in range(3)]
        yield HostConfig(server=address, ca=str(tls.ca), local_epochs=1), orders
    finally:
        server.stop()


def _advance_until(hosts_orders, want, timeout=90.0):
    """Advance each (host, orders) pair again and again until every device reached one of `want` once."""
    seen: dict[int, list] = {}
    deadline = time.monotonic() + timeout
    while True:
        for host, orders in hosts_orders:
            for rep in host.advance([o for o in orders if not any(r.outcome in want for r in seen.get(o.index, []))]):
                assert rep.outcome is not Outcome.FAILED, rep.error
                seen.setdefault(rep.index, []).append(rep)
        if all(any(r.outcome in want for r in seen.get(o.index, [])) for _, orders in hosts_orders for o in orders):
            return seen
        assert time.monotonic() < deadline, f"devices did not reach {want}: " + str(
            {i: [r.outcome.value for r in reps][-5:] for i, reps in seen.items()})
        time.sleep(0.2)


@pytest.mark.slow
def test_a_device_moved_to_another_host_continues_from_its_state(federation):
    host_cfg, orders = federation
    a, b = DeviceHost(host_cfg, "A"), DeviceHost(host_cfg, "B")
    try:
        _advance_until([(a, orders)], {Outcome.TRAINED})  # round 1: every device on A
        state_dir = Path(orders[0].state)
        before = PersonalStore(state_dir).load()
        assert before is not None and len(before.history) == 1

        a.forget([0])  # device 0 moves to B: no session there, its state is its directory
        seen = _advance_until([(a, orders[1:]), (b, orders[:1])], {Outcome.TRAINED})  # round 2
        moved = seen[0]
        assert moved[0].host == "B" and moved[0].joined  # B joined it with the secret in its state directory
        after = PersonalStore(state_dir).load()
        assert after is not None and after.device_id == before.device_id and after.name == "sim-device-0"
        assert [r.round_id for r in after.history][:1] == [before.history[0].round_id]
        assert len(after.history) == 2 and after.history[1].round_id > before.history[0].round_id
        assert after.base_kept == after.history[1].base_version  # trained from the base it holds, not afresh

        _advance_until([(a, orders[1:]), (b, orders[:1])], {Outcome.DONE})  # round 3, then DONE for all
        for o in orders:
            rep = read_report(Path(o.state) / "report.json")
            assert rep is not None and rep.finished and rep.reason == "done" and rep.rounds_trained == 3
            assert rep.final_personalized_accuracy is not None and rep.memory_report is not None
        assert b.stats().steps.get("done") == 1 and a.stats().sessions == 2
    finally:
        a.close()
        b.close()
