"""The round coordinator: enrollment, selection, quorum, deadlines and publishing new versions.

Pure policy over plain values, the state object, the model store and an aggregator/optimizer pair;
no gRPC here (server/service.py is the transport). One lock orders every transition; decoding
and validating an update happens outside it, so uploads are checked concurrently.

Round life: devices that ask for a task wait; when >= min_devices wait, a round opens over a
sample of them; it closes at quorum (all selected reported) or at the deadline with
>= min_devices updates (mean delta -> optimizer -> version v+1, stored atomically, then
published), or else is abandoned (reason logged) and a new one opens. After `rounds` closed
rounds the federation is finished and tasks say DONE.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
from fedpers import wire
from fedpers.server import state as st
from fedpers.server.aggregate import Aggregator, ServerOptimizer
from fedpers.server.errors import (
    AlreadyReported,
    BadUpdate,
    NotSelected,
    ShuttingDown,
    StaleBase,
    StaleRound,
    UnknownVersion,
)
from fedpers.server.identity import Identity, IdentityPolicy
from fedpers.server.model import LayoutError, ModelLayout
from fedpers.server.status import build_status
from fedpers.server.validate import decode_update
from fedpers.store import ModelStore, StoreError

log = logging.getLogger(__name__)


class PolicyError(ValueError):
    """A round policy value is out of range; the message starts with the setting's name."""


@dataclass(frozen=True)
class RoundPolicy:
    """How rounds run. `max_update_bytes` None means twice the fp32 size of the shared tensors + 1 MiB."""

    rounds: int = 10
    min_devices: int = 2
    fraction: float = 1.0
    round_timeout: float = 60.0
    retry_after: float = 0.5
    waiting_ttl: float = 30.0  # a device counts as waiting this long after its last GetTask
    max_update_bytes: int | None = None
    norm_bound: float | None = None  # refuse updates whose global L2 norm is larger
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("rounds", self.rounds >= 0, ">= 0"),
            ("min_devices", self.min_devices >= 1, ">= 1"),
            ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
            ("round_timeout", self.round_timeout > 0, "> 0"),
            ("retry_after", self.retry_after > 0, "> 0"),
            ("waiting_ttl", self.waiting_ttl > 0, "> 0"),
            ("max_update_bytes", self.max_update_bytes is None or self.max_update_bytes > 0, "> 0"),
            ("norm_bound", self.norm_bound is None or self.norm_bound > 0, "> 0"),
        )
        for key, ok, rule in checks:
            if not ok:
                raise PolicyError(f"{key}: must be {rule}, got {getattr(self, key)}")


def weighted_metrics(updates: Iterable[st.UpdateRecord]) -> dict[str, float]:
    """Example-weighted mean of each metric over the updates that report it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for u in updates:
        for k, v in u.metrics.items():
            if math.isfinite(v):
                sums[k] = sums.get(k, 0.0) + u.num_examples * v
                weights[k] = weights.get(k, 0.0) + u.num_examples
    return {k: sums[k] / weights[k] for k in sorted(sums)}


class Coordinator:
    """Owns the open round, the published version and the aggregate; the service calls its methods."""

    def __init__(
        self,
        *,
        state: st.State,
        store: ModelStore,
        layout: ModelLayout,
        initial_weights: dict[str, np.ndarray],
        aggregator: Aggregator,
        optimizer: ServerOptimizer,
        policy: RoundPolicy,
        training: wire.TrainingConfig,
        enroll_token: str = "",
        identity: IdentityPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`identity` says who may enroll and read the status; without it, enrollment needs
        `enroll_token` (and is closed when that is empty)."""
        self.state, self.store, self.layout = state, store, layout
        self.aggregator, self.optimizer, self.policy = aggregator, optimizer, policy
        self.clock = clock
        self.identity = Identity(state, identity or IdentityPolicy(enroll_token=enroll_token), clock)
        self.training = replace(training, shared_tensors=layout.shared, personal_layers=layout.personal_layers,
                                deadline_unix=0.0)
        shared_bytes = 4 * layout.shared_params
        self.max_update_bytes = policy.max_update_bytes or 2 * shared_bytes + (1 << 20)
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(policy.seed)
        self._waiting: dict[int, float] = {}
        self._round: st.Round | None = None
        self._reported: set[int] = set()
        self._stopping = False
        self._blob: tuple[int, bytes] | None = None
        self.close_error = ""  # why the last attempt to close a round failed (shown in GetStatus)
        self.version, self.weights = self._recover(initial_weights)
        self._closed = state.count_rounds(st.CLOSED)

    # ------------------------------------------------------------------ startup

    def _recover(self, initial_weights: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Continue from the latest stored version (or write version 0) and settle rounds left open."""
        now = self.clock()
        latest = self.store.latest_version()
        if latest is None:
            weights = self.layout.served(initial_weights)
            self.store.save_version(0, weights, {"round_id": 0, "created": now, "strategy": self.optimizer.name},
                                    self.optimizer.state())
            log.info("version 0 written to %s (%d shared tensors, %d parameters)", self.store.directory,
                     len(self.layout.shared), self.layout.shared_params)
            latest = 0
        mv = self.store.load_version(latest)
        try:
            weights = self.layout.served(mv.weights)
        except LayoutError as exc:
            raise StoreError(f"{self.store.path(latest)} holds a different model than --model: {exc}") from None
        self.optimizer.load_state(mv.optimizer_state)
        made_by = int(mv.meta.get("round_id", 0))
        for r in self.state.open_rounds():
            if r.round_id == made_by and latest > 0:
                # The version file was committed but the round's close was not: finish the bookkeeping.
                self.state.close_round(r.round_id, latest, mv.meta.get("metrics", {}), now)
                log.warning("round %d: version %d was stored before a crash; marked closed", r.round_id, latest)
            else:
                self.state.abandon_round(r.round_id, "server restarted", now)
                log.warning("round %d abandoned: server restarted", r.round_id)
        log.info("serving version %d from %s", latest, self.store.directory)
        return latest, weights

    # ------------------------------------------------------------------ devices

    def enroll(self, request: wire.EnrollRequest) -> wire.EnrollReply:
        """A new device gets its id and long-term secret (server/identity.py)."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        return self.identity.enroll(request)

    def join(self, request: wire.JoinRequest) -> wire.JoinReply:
        """An enrolled device proves its secret and gets a session token."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        return self.identity.join(request)

    def authenticate(self, device_id: str | int | None, token: str | None) -> int:
        """The device id if (id, session token) match an enrolled, unrevoked device, else BadToken / Revoked."""
        return self.identity.authenticate(device_id, token)

    # ------------------------------------------------------------------ rounds

    @property
    def finished(self) -> bool:
        return self._closed >= self.policy.rounds

    def get_task(self, device_id: int) -> wire.Task:
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            now = self.clock()
            task = self._train_task(device_id)
            if task is not None:
                return task
            if not self.finished:
                self._waiting[device_id] = now
            self._tick_locked(now)
            task = self._train_task(device_id)
            if task is not None:
                return task
            if self.finished:
                return wire.Task(kind=wire.TaskKind.DONE, base_version=self.version)
            return wire.Task(kind=wire.TaskKind.WAIT, base_version=self.version,
                             retry_after_seconds=self.policy.retry_after)

    def _train_task(self, device_id: int) -> wire.Task | None:
        r = self._round
        if r is None or device_id not in r.selected or device_id in self._reported:
            return None
        return wire.Task(kind=wire.TaskKind.TRAIN, round_id=r.round_id, base_version=r.base_version,
                         config=replace(self.training, deadline_unix=r.deadline), model_ini=self.layout.ini_text)

    def tick(self) -> None:
        """Close or abandon a round past its deadline, and open one if enough devices wait (called periodically)."""
        with self._lock:
            if not self._stopping:
                self._tick_locked(self.clock())

    def _tick_locked(self, now: float) -> None:
        r = self._round
        if r is not None and now >= r.deadline:
            n = self.aggregator.count
            if n >= self.policy.min_devices:
                self._try_close(now, f"deadline with {n} of {len(r.selected)} updates")
            else:
                self._abandon_locked(
                    now, f"deadline passed with {n} of {len(r.selected)} updates (need {self.policy.min_devices})")
        if self._round is None and not self.finished:
            for d in [d for d, t in self._waiting.items() if now - t > self.policy.waiting_ttl]:
                del self._waiting[d]
            if len(self._waiting) >= self.policy.min_devices:
                self._open_locked(now)

    def _open_locked(self, now: float) -> None:
        candidates = sorted(self._waiting)
        k = min(len(candidates), max(self.policy.min_devices, math.ceil(self.policy.fraction * len(candidates))))
        picked = self._rng.choice(len(candidates), size=k, replace=False)
        selected = tuple(sorted(candidates[i] for i in picked))
        r = self.state.open_round(self.version, selected, now, now + self.policy.round_timeout)
        self.aggregator.start(r.round_id, {k: self.weights[k] for k in self.layout.shared})
        self._round, self._reported = r, set()
        for d in selected:
            del self._waiting[d]
        log.info("round %d opened: base version %d, %d of %d waiting devices selected, deadline in %.1fs",
                 r.round_id, r.base_version, len(selected), len(candidates), self.policy.round_timeout)

    def _abandon_locked(self, now: float, reason: str) -> None:
        r = self._round
        assert r is not None
        self.state.abandon_round(r.round_id, reason, now)
        self._round, self._reported = None, set()
        log.warning("round %d abandoned: %s", r.round_id, reason)

    def _try_close(self, now: float, why: str) -> None:
        """Close the round; if the store or the database cannot take the new version (disk full, I/O),
        the round stays open with its accepted updates, the error shows in GetStatus, and the next
        tick retries. Anything else is a bug and propagates."""
        try:
            self._close_locked(now, why)
            self.close_error = ""
        except (OSError, StoreError, st.StateError, sqlite3.Error) as exc:
            rid = self._round.round_id if self._round else 0
            self.close_error = f"round {rid}: closing failed ({type(exc).__name__}: {exc}); retrying"
            log.error("%s", self.close_error)

    def _close_locked(self, now: float, why: str) -> None:
        """Mean delta -> optimizer -> version v+1 stored atomically -> round closed -> published."""
        r = self._round
        assert r is not None
        mean = self.aggregator.result()
        if mean is None:
            raise StaleRound(f"round {r.round_id} has no updates to aggregate")
        saved = self.optimizer.state()
        v = self.version + 1
        written = False
        try:
            with self.state.tx():
                new_shared = self.optimizer.step({k: self.weights[k] for k in self.layout.shared}, mean)
                weights = {**self.weights, **new_shared}
                metrics = weighted_metrics(self.state.updates(r.round_id))
                meta = {"round_id": r.round_id, "created": now, "strategy": self.optimizer.name,
                        "devices": self.aggregator.count, "examples": self.aggregator.total_weight, "metrics": metrics}
                self.store.save_version(v, weights, meta, self.optimizer.state())
                written = True
                self.state.close_round(r.round_id, v, metrics, now)
        except BaseException:
            self.optimizer.load_state(saved)
            if written:
                self.store.path(v).unlink(missing_ok=True)
            raise
        self.version, self.weights, self._blob = v, weights, None
        self._round, self._reported = None, set()
        self._closed += 1
        log.info("round %d closed (%s): %d updates, version %d written%s", r.round_id, why,
                 self.aggregator.count, v, "; federation finished" if self.finished else "")

    # ------------------------------------------------------------------ updates

    def _check_upload(self, device_id: int, header: wire.UpdateHeader, now: float) -> st.Round:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        self._tick_locked(now)
        r = self._round
        if self.finished:
            raise StaleRound(f"round {header.round_id} is not open: the federation has finished")
        if r is None or header.round_id != r.round_id:
            now_open = f"round {r.round_id} is open" if r else "no round is open"
            raise StaleRound(f"round {header.round_id} is not open ({now_open})")
        if device_id not in r.selected:
            raise NotSelected(f"device {device_id} is not selected for round {r.round_id}")
        if device_id in self._reported:
            raise AlreadyReported(f"device {device_id} already reported for round {r.round_id}")
        if header.base_version != r.base_version:
            raise StaleBase(f"update was trained from version {header.base_version}; "
                            f"round {r.round_id} uses base version {r.base_version}")
        if header.num_examples <= 0:
            raise BadUpdate(f"num_examples must be positive, got {header.num_examples}")
        if header.total_size > self.max_update_bytes:
            raise wire.Oversize(f"update of {header.total_size} bytes exceeds the limit of {self.max_update_bytes}")
        return r

    def check_upload(self, device_id: int, header: wire.UpdateHeader) -> None:
        """Refuse an upload from its header alone (round, selection, base, sizes), before the
        transport commits an upload slot to it; accept_update checks again."""
        with self._lock:
            self._check_upload(device_id, header, self.clock())

    def accept_update(self, device_id: int, header: wire.UpdateHeader, chunks: Iterable) -> wire.UploadReply:
        """Check the header, receive and verify the blob, decode and validate the delta, then (under
        the lock, inside one state transaction) record it and fold it into the aggregate."""
        with self._lock:
            self._check_upload(device_id, header, self.clock())
        blob = wire.join_chunks(chunks, header.total_size, self.max_update_bytes, header.sha256)
        delta = decode_update(blob, self.layout.shared_shapes, self.policy.norm_bound)
        with self._lock:
            now = self.clock()
            r = self._check_upload(device_id, header, now)
            rec = st.UpdateRecord(r.round_id, device_id, header.num_examples, len(blob), header.sha256.hex(), now,
                                  {k: v for k, v in header.metrics.items() if math.isfinite(v)})
            with self.state.tx():
                self.state.add_update(rec)
                self.aggregator.add(delta, float(header.num_examples))
            self._reported.add(device_id)
            n = len(self._reported)
            log.debug("round %d: update from device %d accepted (%d/%d)", r.round_id, device_id, n, len(r.selected))
            if n == len(r.selected):
                self._try_close(now, "quorum")
            return wire.UploadReply(accepted=True, message=f"accepted for round {r.round_id}", updates_in_round=n)

    # ------------------------------------------------------------------ models and status

    def model_blob(self, version: int) -> bytes:
        """The served tensors of `version` as a TensorSet blob (the current one is cached)."""
        with self._lock:
            if version == self.version:
                if self._blob is None or self._blob[0] != version:
                    self._blob = (version, wire.arrays_to_blob(self.weights))
                return self._blob[1]
            current = self.version
        if not 0 <= version < current or version not in self.store.versions():
            raise UnknownVersion(f"model version {version} does not exist (latest is {current})")
        return wire.arrays_to_blob(self.layout.served(self.store.load_version(version).weights))

    def status(self) -> wire.Status:
        with self._lock:
            return build_status(self.state, self.version, self.policy.rounds, self.finished, problem=self.close_error)

    def stop(self, reason: str = "server stopping") -> None:
        """Take no more work; abandon the open round (its in-memory aggregate cannot survive a restart)."""
        with self._lock:
            self._stopping = True
            if self._round is not None:
                self._abandon_locked(self.clock(), reason)
