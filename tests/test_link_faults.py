"""Link faults between a device and the server, through a TCP proxy the test controls.

The real server (bench/mlp_1m.ini: a 4.3 MB model, five 1 MiB chunks) and the real device agent's
download and upload: the proxy cuts every link mid-download and mid-upload and refuses
connections for a moment; the agent backs off (capped, exponential, jittered), resumes the
download at the byte it reached and retries the upload, and the server counts the update once.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from fedpers import wire
from fedpers.backoff import Backoff
from fedpers.client.agent import Agent, AgentConfig
from fedpers.server import app
from fedpers.server.config import ServerConfig

from tests.netproxy import NetProxy
from tests.server_helpers import client_tls, server_tls

MODEL = Path(__file__).resolve().parent.parent / "bench" / "mlp_1m.ini"


def test_backoff_is_capped_exponential_with_jitter() -> None:
    b = Backoff(0.1, 1.0, rng=random.Random(3))
    delays = [b.next() for _ in range(10)]
    for i, d in enumerate(delays):
        nominal = min(0.1 * 2**i, 1.0)
        assert 0.5 * nominal <= d < 1.5 * nominal
    assert len({round(d, 6) for d in delays[5:]}) == 5  # jittered, not a fixed cap
    assert max(delays) < 1.5
    b.reset()
    assert b.next() < 0.15
    assert Backoff(0.1, 1.0).next(hint=2.0) == 2.0  # the server's hint wins when longer


@pytest.fixture
def served(tmp_path: Path):
    cfg = ServerConfig(model=MODEL, store=tmp_path / "store", listen="127.0.0.1:0", rounds=1, min_devices=1,
                       personal_layers=("output",), round_timeout=120, workers=4, enroll_token="lf-token",
                       **server_tls())
    running = app.start(cfg)
    proxy = NetProxy("127.0.0.1", running.port)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.random((8, 1, 1, 784), dtype=np.float32), y=np.arange(8) % 10)
    agent = Agent(AgentConfig(server=proxy.address, data=tmp_path / "data.npz", state=tmp_path / "dev",
                              tls=client_tls(), enroll_token="lf-token", backoff_initial=0.05, backoff_max=0.5,
                              retry_seconds=60))
    yield running, proxy, agent
    agent.close()
    proxy.close()
    running.stop(grace=1)


@pytest.mark.slow
def test_cut_links_mid_download_and_mid_upload(served) -> None:
    running, proxy, agent = served
    agent.join()
    task = agent.get_task()
    assert task.kind == wire.TaskKind.TRAIN
    blob = running.coordinator.model_blob(0)
    assert len(blob) > 4 * wire.MAX_CHUNK_SIZE

    proxy.cut_after("down", int(2.5 * wire.MAX_CHUNK_SIZE), down_for=0.3)  # mid-download
    got = agent.download(0)
    assert proxy.stats.cuts == 1 and proxy.stats.refused >= 0
    assert agent.state.bytes_down == len(blob), "the download resumed at its offset, nothing was fetched twice"
    want = wire.arrays_from_blob(blob)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])

    shapes = running.coordinator.layout.shared_shapes
    rng = np.random.default_rng(1)
    delta = {k: (1e-3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    up = wire.tensorset_to_blob([wire.array_to_wire(k, v) for k, v in delta.items()])
    hdr = wire.UpdateHeader(task.round_id, task.base_version, 8, len(up), wire.sha256(up), "fp32")
    connections = proxy.stats.connections
    proxy.cut_after("up", int(2.5 * wire.MAX_CHUNK_SIZE), down_for=0.3)  # mid-upload
    reply = agent.upload(hdr, up)
    assert reply.accepted and proxy.stats.cuts == 2 and proxy.stats.connections > connections
    coord = running.coordinator
    assert coord.version == 1 and coord.state.count_updates(task.round_id) == 1
    new = wire.arrays_from_blob(coord.model_blob(1))
    for k, d in delta.items():
        np.testing.assert_allclose(new[k], want[k] + d, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_long_outage_is_survived_with_backoff(served) -> None:
    running, proxy, agent = served
    agent.join()
    proxy.down()
    proxy.cut()
    import threading

    restore = threading.Timer(1.5, proxy.up)
    restore.start()
    try:
        task = agent.get_task()  # fails UNAVAILABLE while the link is down, then succeeds
    finally:
        restore.cancel()
    assert task.kind == wire.TaskKind.TRAIN and proxy.stats.refused >= 1
