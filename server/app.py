"""Assemble a running server from a ServerConfig, and stop it cleanly.

Order of a stop: health says NOT_SERVING, the gRPC server refuses new calls and gives
in-flight ones a grace period (an upload that completes the round still closes it), then the
coordinator takes no more work (a round still open stays open: its updates are journaled and a
restart continues it), the ticker ends and the database closes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc
from fedpers import codec, wire
from fedpers.locks import DirLock
from fedpers.private import ensure_private_dir
from fedpers.server.aggregate import make_optimizer
from fedpers.server.cluster import ClusterCoordinator, replica_name
from fedpers.server.config import ConfigError, ServerConfig
from fedpers.server.downlink import Downlink
from fedpers.server.export_cmd import MODEL_COPY
from fedpers.server.metrics import MetricsEndpoint, ServerMetrics
from fedpers.server.model import load_model
from fedpers.server.robust import make_aggregator
from fedpers.server.rounds import Coordinator
from fedpers.server.service import build_server
from fedpers.server.state import SqliteState, State
from fedpers.store import ModelStore, atomic_write_bytes
from grpc_health.v1 import health

log = logging.getLogger(__name__)

STATE_DB = "state.sqlite"


def build_coordinator(cfg: ServerConfig) -> Coordinator:
    """Model + store + state + policy -> Coordinator (continuing from the store's latest version)."""
    from fedpers.nn import load_ini

    try:
        codec.parse_codec(cfg.codec)
    except codec.CodecError as exc:
        raise ConfigError(f"codec: {exc}") from None
    spec = load_ini(cfg.model)
    for note in spec.notes:  # NNTrainer keys the model gives that fedpers does not act on
        log.info("model: %s", note)
    hp = cfg.hyperparams()
    layout, weights = load_model(cfg.model, cfg.personal_layers, cfg.seed, local_stats=cfg.bn_stats == "local",
                                 personalization=hp)
    if hp is not None:
        from fedpers.personalization import get as get_method

        log.info("personalization %s (%s): %d shared tensors, %d stay on the devices%s", hp.method,
                 ", ".join(f"{k}={v}" for k, v in hp.to_dict().items() if k != "method"), len(layout.shared),
                 len(layout.local), " with a whole personal model" if get_method(hp.method).personal_model else "")
    dp = cfg.dp_config()
    stats = [k for k in layout.shared if k.endswith(codec.STATISTICS_SUFFIXES)]
    if dp.enabled and stats:
        raise ConfigError(f"dp_clip: differential privacy needs --bn-stats local for this model ({stats[0]} would "
                          f"be shared: noisy running variances are refused, noise-free ones leak the data)")
    training = wire.TrainingConfig(
        local_epochs=cfg.local_epochs or spec.epochs,
        batch_size=cfg.batch_size or spec.batch_size,
        learning_rate=cfg.learning_rate or spec.optimizer.learning_rate,
        codec=cfg.codec, dp_clip_norm=dp.clip_norm, dp_noise_multiplier=dp.noise_multiplier, personalization=hp,
    )
    policy = cfg.round_policy()
    ensure_private_dir(cfg.store)
    atomic_write_bytes(cfg.store / MODEL_COPY, layout.ini_text.encode())  # for `fedpers-server export`
    replicated = cfg.state_url is not None
    replica = cfg.replica_name or (replica_name() if replicated else "")
    state = open_state(cfg, replica)
    try:
        if replicated:  # the first replica makes STORE/admin.token; the others must read that one
            with state.bootstrap_lock():  # type: ignore[attr-defined]
                identity = cfg.identity_policy()
        else:
            identity = cfg.identity_policy()
        log.info("enrollment %s", identity.enrollment)
        common = dict(
            state=state, store=ModelStore(cfg.store, shared=replicated), layout=layout, initial_weights=weights,
            aggregator=make_aggregator(cfg.aggregation, clip_norm=cfg.clip_norm, trim=cfg.trim,
                                       memory_mb=cfg.robust_memory_mb),
            optimizer=make_optimizer(cfg.strategy, cfg.server_lr), policy=policy, training=training,
            identity=identity, dp_delta=dp.delta,
            downlink=Downlink(None if cfg.downlink_codec == "none" else codec.parse_codec(cfg.downlink_codec),
                              max_steps=cfg.downlink_steps),
        )
        if replicated:
            return ClusterCoordinator(replica=replica, **common)
        return Coordinator(**common)
    except BaseException:
        state.close()
        raise


def open_state(cfg: ServerConfig, replica: str = "") -> State:
    """SQLite in --store (one server), or PostgreSQL at --state-url (shared by replicas)."""
    if cfg.state_url is None:
        return SqliteState(cfg.store / STATE_DB)
    from fedpers.server.state_pg import PostgresState, redact

    state = PostgresState(cfg.state_url, replica=replica, password=cfg.state_password())
    log.info("state on PostgreSQL at %s; this replica is %s", redact(cfg.state_url), replica)
    return state


@dataclass
class RunningServer:
    """A started server: its bound port, and `stop()`."""

    server: grpc.Server
    port: int
    host: str
    coordinator: Coordinator
    health: health.HealthServicer
    metrics: MetricsEndpoint | None = None
    lock: DirLock | None = None  # the store's lock: one server per --store
    _stop: threading.Event = field(default_factory=threading.Event)
    _ticker: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def finished_and_idle(self, seconds: float) -> bool:
        """The federation has finished, the choice exchange is settled (devices train their end candidates
        between DONE and their report) and no device has called for `seconds`."""
        c = self.coordinator
        return c.finished and c.choice_settled() and time.monotonic() - c.last_call > seconds

    def _tick_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.coordinator.tick()
                self.coordinator.identity.refresh()  # revocations written by `fedpers-server devices revoke`
            except Exception:  # keep ticking; the next tick retries
                log.exception("round tick failed")

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop; leaves state and store consistent. Idempotent."""
        if self._stop.is_set():
            return
        log.info("stopping: finishing in-flight calls (grace %.1fs)", grace)
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.stop()
        self.coordinator.stop()
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.coordinator.state.close()
        if self.lock is not None:
            self.lock.release()
        log.info("stopped at version %d", self.coordinator.version)


class ListenError(OSError):
    """--listen names an address this server cannot take (unresolvable, or already in use)."""


def check_port_free(listen: str) -> None:
    """OSError naming the address when something already listens there, so a server on a busy port stops
    before it writes version 0. (gRPC binds a moment later; this only catches the plain case.)"""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"--listen {listen}: cannot resolve {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ListenError(f"--listen {listen}: {exc.strerror} (another server?)") from None


def start(cfg: ServerConfig, coordinator: Coordinator | None = None) -> RunningServer:
    """Build (unless given) the coordinator, bind, start serving and the deadline ticker. The store is
    locked and the port checked first: a second server on the same --store or port is refused before it
    writes anything."""
    check_port_free(cfg.listen)
    # One server per --store, or any number of replicas of one federation (state on PostgreSQL).
    lock = DirLock(cfg.store, "fedpers-server", shared=cfg.state_url is not None) if coordinator is None else None
    coord: Coordinator | None = coordinator
    tls = cfg.server_tls()
    try:
        coord = coordinator or build_coordinator(cfg)
        metrics = ServerMetrics.create(coord) if cfg.metrics_listen else None
        server, port, health_servicer = build_server(coord, cfg.listen, cfg.workers, metrics=metrics, tls=tls,
                                                     limits=cfg.limits_policy())
    except BaseException:
        if coord is not None and coordinator is None:
            coord.state.close()
        if lock is not None:
            lock.release()
        raise
    if tls is None:
        log.warning("serving PLAINTEXT on %s (--insecure): enrollment tokens, session tokens and updates travel "
                    "unencrypted; use this only on a trusted loopback", cfg.listen)
    elif tls.client_ca is not None:
        log.info("TLS with client certificates required (CA %s)", tls.client_ca)
    server.start()
    host = cfg.listen.rsplit(":", 1)[0]
    running = RunningServer(server=server, port=port, host=host, coordinator=coord, health=health_servicer, lock=lock)
    if metrics is not None and cfg.metrics_listen:
        running.metrics = metrics.serve(cfg.metrics_listen)
    interval = min(1.0, max(0.05, cfg.round_timeout / 20))
    if isinstance(coord, ClusterCoordinator):
        interval = min(interval, coord.cluster.sync_interval)
    running._ticker = threading.Thread(target=running._tick_loop, args=(interval,), name="fedpers-ticker",
                                       daemon=True)
    running._ticker.start()
    log.info("fedpers-server listening on %s (version %d, %d/%d rounds done, strategy %s)", running.address,
             coord.version, coord.status().rounds_completed, cfg.rounds, cfg.strategy)
    if cfg.port_file is not None:
        atomic_write_bytes(cfg.port_file, f"{port}\n".encode())
    return running
