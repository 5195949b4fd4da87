"""The server's Prometheus endpoint, scraped over HTTP while a federation runs on 127.0.0.1."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from fedpers import models, wire
from fedpers.server import app
from fedpers.server.config import ServerConfig
from prometheus_client.parser import text_string_to_metric_families

from tests.server_helpers import Device, server_tls
from tests.test_server_cli import _fp32_update


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_during_a_federation(tmp_path) -> None:
    cfg = ServerConfig(model=models.path("mlp.ini"), store=tmp_path, listen="127.0.0.1:0", rounds=2, min_devices=2,
                       personal_layers=("output",), metrics_listen="127.0.0.1:0", enroll_token="t", **server_tls())
    running = app.start(cfg)
    devices = []
    try:
        port = running.metrics.port
        devices = [Device(running.address, f"d{i}", enroll="t") for i in range(2)]
        tasks = [d.task() for d in devices]
        tasks = [d.task() for d in devices]  # the second device's GetTask opened the round
        assert all(t.kind == wire.TaskKind.TRAIN for t in tasks)
        shapes = {k: v.shape for k, v in devices[0].download(0).items()}
        assert devices[0].upload(_fp32_update(tasks[0], shapes, 1)).accepted

        mid = scrape(port)  # one update in, the round still open
        assert mid[("fedpers_updates_accepted_total", ())] == 1
        assert mid[("fedpers_rounds_total", (("state", "open"),))] == 1
        assert mid[("fedpers_rounds_total", (("state", "closed"),))] == 0
        assert mid[("fedpers_devices_enrolled", ())] == 2
        assert mid[("fedpers_model_version", ())] == 0
        assert mid[("fedpers_download_bytes_total", ())] > 0 and mid[("fedpers_upload_bytes_total", ())] > 0
        assert mid[("process_resident_memory_bytes", ())] > 0

        with pytest.raises(grpc.RpcError):  # the same device again: refused, and counted by kind
            devices[0].upload(_fp32_update(tasks[0], shapes, 2))
        assert devices[1].upload(_fp32_update(tasks[1], shapes, 3)).accepted

        end = scrape(port)
        assert end[("fedpers_updates_accepted_total", ())] == 2
        assert end[("fedpers_rounds_total", (("state", "closed"),))] == 1
        assert end[("fedpers_model_version", ())] == 1
        assert end[("fedpers_refusals_total", (("kind", "AlreadyReported"), ("method", "UploadUpdate")))] == 1
        assert end[("fedpers_rpc_seconds_count", (("method", "UploadUpdate"),))] == 3
        assert not any(name == "fedpers_internal_errors_total" for name, _ in end)  # no call hit a bug
    finally:
        for d in devices:
            d.close()
        running.stop(0)
    with pytest.raises(OSError):  # the endpoint stops with the server
        scrape(port)
