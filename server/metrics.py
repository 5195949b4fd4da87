"""Prometheus metrics of a running server (`--metrics-listen HOST:PORT`, the `prometheus-client` library).

Calls, refusals by kind and bytes are counted where they pass through the servicer; rounds,
versions and devices are read from the coordinator when Prometheus scrapes, so the round logic
carries no metrics code; process memory, CPU and open files come from the library's own collector.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpers.server import state as st
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fedpers.server.rounds import Coordinator

log = logging.getLogger(__name__)

# Upload and download latencies span milliseconds (a small model on loopback) to minutes (a slow link).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class CoordinatorCollector(Collector):
    """Gauges and counters read from the coordinator at scrape time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self.coordinator.status()
        state = self.coordinator.state
        yield GaugeMetricFamily("fedpers_model_version", "Latest published base model version", value=status.version)
        yield GaugeMetricFamily("fedpers_devices_enrolled", "Devices that have joined", value=status.devices_joined)
        rounds = CounterMetricFamily("fedpers_rounds", "Rounds by how they ended (open: still running)",
                                     labels=["state"])
        for kind in st.ROUND_STATES:
            rounds.add_metric([kind], state.count_rounds(kind))
        yield rounds
        yield GaugeMetricFamily("fedpers_rounds_target", "Rounds the federation runs", value=status.rounds_target)
        yield GaugeMetricFamily("fedpers_finished", "1 once the federation has finished", value=int(status.finished))
        yield GaugeMetricFamily("fedpers_problem", "1 while the server reports a problem (see GetStatus)",
                                value=int(bool(status.problem)))


@dataclass
class ServerMetrics:
    """The servicer's counters and histograms, in their own registry (nothing global)."""

    registry: CollectorRegistry
    calls: Histogram
    refusals: Counter
    errors: Counter
    updates_accepted: Counter
    upload_bytes: Counter
    download_bytes: Counter

    @classmethod
    def create(cls, coordinator: Coordinator | None = None) -> ServerMetrics:
        registry = CollectorRegistry()
        metrics = cls(
            registry=registry,
            calls=Histogram("fedpers_rpc_seconds", "Handling time of each RPC, refused ones included", ["method"],
                            buckets=LATENCY_BUCKETS, registry=registry),
            refusals=Counter("fedpers_refusals", "Calls refused, by method and refusal kind", ["method", "kind"],
                             registry=registry),
            errors=Counter("fedpers_internal_errors", "Calls that failed with INTERNAL (a server bug)", ["method"],
                           registry=registry),
            updates_accepted=Counter("fedpers_updates_accepted", "Device updates accepted into a round",
                                     registry=registry),
            upload_bytes=Counter("fedpers_upload_bytes", "Update blob bytes received", registry=registry),
            download_bytes=Counter("fedpers_download_bytes", "Model blob bytes sent", registry=registry),
        )
        ProcessCollector(registry=registry)
        if coordinator is not None:
            registry.register(CoordinatorCollector(coordinator))
        return metrics

    def serve(self, listen: str) -> MetricsEndpoint:
        """Expose /metrics over HTTP on HOST:PORT (port 0 picks a free port)."""
        host, _, port = listen.rpartition(":")
        httpd, thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        endpoint = MetricsEndpoint(httpd, thread)
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", endpoint.port)
        return endpoint


@dataclass
class MetricsEndpoint:
    """The HTTP server behind /metrics; `stop()` shuts it down."""

    httpd: object
    thread: object

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.httpd.shutdown()  # type: ignore[attr-defined]
        self.httpd.server_close()  # type: ignore[attr-defined]
