"""Replicas in one process: two ClusterCoordinators on one PostgreSQL database and one store directory.

Fast checks of the cluster's logic without gRPC (tests/test_replicas.py runs real processes): any
replica takes uploads, the coordinator combines the partial sums into exactly what one server would
have computed, the other replica learns the version from the database, a dead replica's updates come
from the journal, the lease moves on when its holder stops, and a stale coordinator cannot publish.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
from fedpers import wire
from fedpers.server import aggregate as ag
from fedpers.server.cluster import LEASE, ClusterCoordinator, ClusterPolicy
from fedpers.server.errors import AlreadyReported, LateUpdate
from fedpers.server.rounds import RoundPolicy
from fedpers.server.state_pg import LeaseLost, PostgresState
from fedpers.store import ModelStore

from tests.server_helpers import LAYOUT, header, initial_weights, random_delta, update_blob

_dbs = itertools.count()
FAST = ClusterPolicy(sync_interval=0.05, lease_ttl=1.5, heartbeat_ttl=0.4, partial_wait=1.0)


@pytest.fixture
def url(pg_cluster) -> str:
    return pg_cluster.create_database(f"cluster{next(_dbs)}")


def _replica(url: str, store: Path, name: str, cluster: ClusterPolicy = FAST, **policy) -> ClusterCoordinator:
    defaults = dict(rounds=3, min_devices=2, fraction=1.0, round_timeout=60.0, gather_seconds=0.0)
    defaults.update(policy)
    return ClusterCoordinator(
        replica=name, cluster=cluster, state=PostgresState(url, replica=name), store=ModelStore(store, shared=True),
        layout=LAYOUT, initial_weights=initial_weights(), aggregator=ag.WeightedMean(),
        optimizer=ag.make_optimizer("fedavg"), policy=RoundPolicy(**defaults),
        training=wire.TrainingConfig(local_epochs=1, batch_size=8, learning_rate=0.05, codec="fp32"),
        enroll_token="enroll-me")


def sync(*replicas: ClusterCoordinator) -> None:
    """One look at the database by each replica, now (not at its next tick)."""
    for c in replicas:
        c._last_sync = -math.inf
        c.tick()


def _enroll(c: ClusterCoordinator, name: str) -> int:
    reply = c.enroll(wire.EnrollRequest("enroll-me", name, request_id=f"req-{name}-0123456789abcdef"))
    return reply.device_id


def _upload(c: ClusterCoordinator, device: int, task: wire.Task, seed: int, examples: int = 10) -> wire.UploadReply:
    blob = update_blob(random_delta(seed))
    return c.accept_update(device, header(task, blob, num_examples=examples), wire.chunk_blob(blob))


def _open_round(replicas: list[ClusterCoordinator], devices: list[int]) -> dict[int, wire.Task]:
    """Each device asks its replica (alternating) for a task until every one trains."""
    tasks: dict[int, wire.Task] = {}
    for _ in range(40):
        for i, d in enumerate(devices):
            if d not in tasks:
                t = replicas[i % len(replicas)].get_task(d)
                if t.kind == wire.TaskKind.TRAIN:
                    tasks[d] = t
        if len(tasks) == len(devices):
            return tasks
        sync(*replicas)
    raise AssertionError(f"no round opened: {tasks}")


def _expected(base: dict, seeds: list[int], examples: list[int]) -> dict:
    agg = ag.WeightedMean()
    agg.start(1, {k: base[k] for k in LAYOUT.shared})
    for s, n in zip(seeds, examples, strict=True):
        agg.add(random_delta(s), float(n))
    return ag.FedAvg().step({k: base[k] for k in LAYOUT.shared}, agg.result())


def test_two_replicas_share_a_round_and_publish_one_version(url: str, tmp_path: Path) -> None:
    a = _replica(url, tmp_path / "store", "a", min_devices=4)
    b = _replica(url, tmp_path / "store", "b", min_devices=4)
    try:
        sync(a, b)
        assert (a._lease is None) != (b._lease is None), "exactly one replica coordinates"
        devices = [_enroll(a if i % 2 else b, f"dev{i}") for i in range(4)]
        tasks = _open_round([a, b], devices)
        rid = {t.round_id for t in tasks.values()}
        assert len(rid) == 1
        base = dict(a.weights)
        seeds, examples = [11, 12, 13, 14], [10, 20, 30, 40]
        leader, other = (a, b) if a._lease else (b, a)
        _upload(other, devices[0], tasks[devices[0]], seeds[0], examples[0])  # the non-coordinator takes two
        _upload(other, devices[1], tasks[devices[1]], seeds[1], examples[1])
        with pytest.raises(AlreadyReported):  # committed through the other replica
            _upload(leader, devices[1], tasks[devices[1]], seeds[1], examples[1])
        _upload(leader, devices[2], tasks[devices[2]], seeds[2], examples[2])
        reply = _upload(leader, devices[3], tasks[devices[3]], seeds[3], examples[3])
        assert reply.updates_in_round == 4
        for _ in range(40):  # the coordinator marks the round closing; the other hands its partial sum over
            sync(other, leader)
            if leader.version == 1 and other.version == 1:
                break
        assert leader.version == other.version == 1, "both replicas serve the published version"
        want = _expected(base, seeds, examples)
        for c in (a, b):
            for k in LAYOUT.shared:
                np.testing.assert_allclose(c.weights[k], want[k], rtol=1e-5, atol=1e-6)
        assert ModelStore(tmp_path / "store").load_version(1).meta["devices"] == 4
        assert a.model_blob(1) == b.model_blob(1)
        assert not (tmp_path / "store" / "journal" / f"r{next(iter(rid)):012d}").exists()
    finally:
        a.stop()
        b.stop()
        a.state.close()
        b.state.close()


def test_a_dead_replicas_updates_come_from_the_journal_and_the_lease_moves(url: str, tmp_path: Path) -> None:
    a = _replica(url, tmp_path / "store", "a", min_devices=4)
    sync(a)
    assert a._lease is not None  # the first replica coordinates
    b = _replica(url, tmp_path / "store", "b", min_devices=4)
    try:
        devices = [_enroll(a, f"dev{i}") for i in range(4)]
        tasks = _open_round([a, b], devices)
        base = dict(a.weights)
        seeds, examples = [21, 22, 23, 24], [5, 6, 7, 8]
        for i, d in enumerate(devices[:3]):  # b acknowledges three updates, then dies without a word
            _upload(b, d, tasks[d], seeds[i], examples[i])
        _upload(a, devices[3], tasks[devices[3]], seeds[3], examples[3])
        b.state.close()  # kill: no partial sum handed over, no goodbye; its heartbeat goes stale
        time.sleep(FAST.heartbeat_ttl + 0.1)
        for _ in range(60):
            sync(a)
            if a.version == 1:
                break
        assert a.version == 1
        want = _expected(base, seeds, examples)
        for k in LAYOUT.shared:
            np.testing.assert_allclose(a.weights[k], want[k], rtol=1e-5, atol=1e-6)

        c = _replica(url, tmp_path / "store", "c")  # a new replica learns the version from the database
        assert c.version == 1
        a.stop()  # a clean stop gives the lease up: c coordinates at once
        sync(c)
        assert c._lease is not None and c._lease.epoch > 1
        stale = a._lease or c._lease
        with pytest.raises(LeaseLost):  # a coordinator that lost the lease cannot change a round
            with c.state.tx():
                c.state.check_lease(LEASE, type(stale)("a", 1))
        c.stop()
        c.state.close()
    finally:
        a.state.close()


def test_an_update_into_a_closing_round_is_late(url: str, tmp_path: Path) -> None:
    slow = ClusterPolicy(sync_interval=0.05, lease_ttl=60, heartbeat_ttl=60, partial_wait=1.0)  # a keeps the lease
    a = _replica(url, tmp_path / "store", "a", cluster=slow, min_devices=3)
    sync(a)
    b = _replica(url, tmp_path / "store", "b", cluster=slow, min_devices=3)
    try:
        devices = [_enroll(a, f"dev{i}") for i in range(3)]
        tasks = _open_round([a], devices)
        r = a._round
        _upload(b, devices[0], tasks[devices[0]], 1)
        assert a.state.mark_closing(r.round_id, time.time())  # as the coordinator does before combining
        with pytest.raises(LateUpdate, match="closing"):  # b has not seen the mark yet: the database refuses
            _upload(b, devices[1], tasks[devices[1]], 2)
        assert a.state.count_late(r.round_id) == 1 and a.state.count_updates(r.round_id) == 1
    finally:
        for c in (a, b):
            c.stop()
            c.state.close()
