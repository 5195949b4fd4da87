"""The round coordinator: enrollment, selection, quorum, deadlines and publishing new versions.

Pure policy over plain values, the state object, the model store and an aggregator/optimizer pair;
no gRPC here (server/service.py is the transport). One lock orders every transition; decoding
and validating an update happens outside it, so uploads are checked concurrently.

Round life: devices that ask for a task wait (and count as live for `waiting_ttl` seconds after
their last call); when >= min_devices live devices wait, a round opens over a sample of them
(with `target_devices`, ceil(target x (1 + over_select)) of them: over-selection); it closes at
its quorum (every selected device, or `target_devices` updates) or at the deadline with
>= min_devices updates (mean delta -> optimizer -> version v+1, checked finite, stored
atomically, then published), or else is abandoned (reason logged) and a new one opens. Updates
that arrive after their round closed are refused as late and counted. After `rounds` closed
rounds the federation is finished and tasks say DONE.

Durable before acknowledged: an accepted update is journaled (server/journal.py) and its row
committed before the reply; a restarted (or stopped and started) server rebuilds the open round
from the journal and continues it.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from fedpers import personalization as pers
from fedpers import wire
from fedpers.privacy import epsilon
from fedpers.server import guard
from fedpers.server import state as st
from fedpers.server.aggregate import Aggregator, ServerOptimizer
from fedpers.server.downlink import Downlink
from fedpers.server.errors import (
    AlreadyReported,
    BadUpdate,
    LateUpdate,
    NotFinished,
    NotSelected,
    ShuttingDown,
    StaleBase,
    StaleRound,
    UnknownVersion,
)
from fedpers.server.identity import Identity, IdentityPolicy
from fedpers.server.journal import Journal, JournalRecord
from fedpers.server.model import LayoutError, ModelLayout
from fedpers.server.status import build_status
from fedpers.server.validate import decode_update
from fedpers.store import ModelStore, ModelVersion, StoreError

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
    waiting_ttl: float | None = None  # a device counts as waiting (live) this long after its last GetTask;
    # None: max(2 s, 6 x retry_after)
    max_update_bytes: int | None = None
    norm_bound: float | None = None  # refuse updates whose global L2 norm is larger; None: from the model
    seed: int = 0
    target_devices: int | None = None  # close a round at this many updates (None: every selected device)
    over_select: float = 0.3  # with target_devices: select ceil(target x (1 + over_select)) devices
    gather_seconds: float = 2.0  # open with fewer than wanted (but >= min_devices) after this wait
    max_examples: int = 10_000  # ceiling on the num_examples an update may claim (its weight)
    choice_timeout: float = 120.0  # after the last round, the fleet default waits at most this long for scores

    @property
    def liveness(self) -> float:
        return self.waiting_ttl if self.waiting_ttl is not None else max(2.0, 6 * self.retry_after)

    def __post_init__(self) -> None:
        checks = (
            ("rounds", self.rounds >= 0, ">= 0"),
            ("min_devices", self.min_devices >= 1, ">= 1"),
            ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
            ("round_timeout", self.round_timeout > 0, "> 0"),
            ("retry_after", self.retry_after > 0, "> 0"),
            ("waiting_ttl", self.waiting_ttl is None or self.waiting_ttl > 0, "> 0"),
            ("target_devices", self.target_devices is None or self.target_devices >= self.min_devices,
             f">= min_devices ({self.min_devices})"),
            ("over_select", 0 <= self.over_select <= 10, "in [0, 10]"),
            ("gather_seconds", self.gather_seconds >= 0, ">= 0"),
            ("max_examples", self.max_examples >= 1, ">= 1"),
            ("choice_timeout", self.choice_timeout > 0, "> 0"),
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
        journal: Journal | None = None,
        dp_delta: float = 1e-5,
        downlink: Downlink | None = None,
    ) -> None:
        """`identity` says who may enroll and read the status; without it, enrollment needs
        `enroll_token` (and is closed when that is empty)."""
        self.state, self.store, self.layout = state, store, layout
        self.aggregator, self.optimizer, self.policy = aggregator, optimizer, policy
        self.clock = clock
        self.identity = Identity(state, identity or IdentityPolicy(enroll_token=enroll_token), clock)
        self.training = replace(training, shared_tensors=layout.shared, personal_layers=layout.personal_layers,
                                deadline_unix=0.0, dp_delta=dp_delta if training.dp_clip_norm > 0 else 0.0)
        shared_bytes = 4 * layout.shared_params
        self.max_update_bytes = policy.max_update_bytes or 2 * shared_bytes + (1 << 20)
        self.journal = journal if journal is not None else Journal(Path(store.directory).parent / "journal")
        self.dp_delta = dp_delta
        self.downlink = downlink or Downlink()
        self._steps: dict[tuple[int, int], bytes] = {}  # (have, version) -> ModelSteps blob, recent ones
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(policy.seed)
        self._waiting: dict[int, float] = {}
        self._gather_since: float | None = None  # when enough devices to open (but fewer than wanted) first waited
        self._seen: dict[int, float] = {}  # device -> its last GetTask or upload: the live devices
        self._round: st.Round | None = None
        self._reported: set[int] = set()
        self._stopping = False
        self._blob: tuple[int, bytes] | None = None
        self.close_error = ""  # why the last attempt to close a round failed (shown in GetStatus)
        self.last_call = time.monotonic()  # when a device last called (the servicer notes it): idle detection
        self._closed = 0
        # the choice exchange after the last round (in memory: every report carries the device's whole scores)
        self._choices: dict[int, dict[str, float]] = {}
        self._choice_since: float | None = None  # when this process first saw the federation finished
        self._choice_expected: frozenset[int] | None = None
        self.fleet_default: str | None = None  # decided once, then the same answer for every device
        self.version, self.weights = self._recover(initial_weights)
        self._closed = state.count_rounds(st.CLOSED)
        # Bounded influence: without --norm-bound, a bound derived from the served model itself.
        self.norm_bound = policy.norm_bound or guard.default_norm_bound(
            {k: self.weights[k] for k in layout.shared})
        if policy.norm_bound is None and self.training.dp_clip_norm > 0:  # noised updates are long by design
            self.norm_bound = max(self.norm_bound, guard.dp_norm_bound(
                self.training.dp_clip_norm, self.training.dp_noise_multiplier, layout.shared_params))
        log.info("update norm bound %.4g%s; num_examples ceiling %d", self.norm_bound,
                 "" if policy.norm_bound else " (derived from the model)", policy.max_examples)
        with self._lock:
            self._rebuild_open_round(self.clock())

    # ------------------------------------------------------------------ startup

    def _write_version_zero(self, initial_weights: dict[str, np.ndarray], now: float) -> None:
        meta = {"round_id": 0, "created": now, "strategy": self.optimizer.name}
        self.store.save_version(0, self.layout.served(initial_weights), meta, self.optimizer.state())
        log.info("version 0 written to %s (%d shared tensors, %d parameters)", self.store.directory,
                 len(self.layout.shared), self.layout.shared_params)

    def _load_version(self, version: int) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        """A stored version and its served weights; the server optimizer's state and the downlink's
        carried rest are loaded from it too (whoever closes next carries them on)."""
        mv = self.store.load_version(version)
        try:
            weights = self.layout.served(mv.weights)
        except LayoutError as exc:
            raise StoreError(f"{self.store.path(version)} holds a different model than --model: {exc}") from None
        self.optimizer.load_state(mv.optimizer_state)
        self.downlink.load(mv.extra)
        return mv, weights

    def _recover(self, initial_weights: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Continue from the latest stored version (or write version 0) and settle rounds left open."""
        now = self.clock()
        latest = self.store.latest_version()
        if latest is None:
            self._write_version_zero(initial_weights, now)
            latest = 0
        mv, weights = self._load_version(latest)
        made_by = int(mv.meta.get("round_id", 0))
        open_rounds = self.state.open_rounds()
        for r in open_rounds:
            if r.round_id == made_by and latest > 0:
                # The version file was committed but the round's close was not: finish the bookkeeping.
                self.state.close_round(r.round_id, latest, mv.meta.get("metrics", {}), now)
                log.warning("round %d: version %d was stored before a crash; marked closed", r.round_id, latest)
            elif r is open_rounds[-1] and r.base_version == latest:
                self._round = r  # rebuilt from the journal once the coordinator is set up
            else:
                self.state.abandon_round(r.round_id, f"server restarted; base version {r.base_version} "
                                                     f"is not the latest ({latest})", now)
                log.warning("round %d abandoned on restart: base version %d, latest %d", r.round_id,
                            r.base_version, latest)
        keep = {self._round.round_id} if self._round is not None else set()
        for rid in self.journal.rounds():
            if rid not in keep:
                self.journal.discard(rid)  # a finished round's records (the crash came before their deletion)
        log.info("serving version %d from %s", latest, self.store.directory)
        return latest, weights

    def _rebuild_open_round(self, now: float) -> None:
        """Fold the journaled updates of the round left open back into the aggregate: the round keeps
        its id, its selected devices and every acknowledged update. Records without a committed row
        were never acknowledged and are dropped. The deadline gets at least half a timeout more."""
        r = self._round
        if r is None:
            return
        committed = {u.device_id: u for u in self.state.updates(r.round_id)}
        self.aggregator.start(r.round_id, {k: self.weights[k] for k in self.layout.shared})
        self._reported = set()
        for path, rec in self.journal.records(r.round_id):
            u = committed.get(rec.device_id)
            if u is None or u.sha256 != rec.sha256 or rec.device_id in self._reported:
                self.journal.remove(path)  # never acknowledged (or a duplicate attempt)
                continue
            delta = decode_update(rec.blob, self.layout.shared_shapes, None)
            guard.check_update(self.weights, delta)  # the same clamping as when it was accepted
            self.aggregator.add(delta, rec.weight)
            self._reported.add(rec.device_id)
        missing = sorted(set(committed) - self._reported)
        if missing:  # impossible unless the journal directory was tampered with
            log.error("round %d: updates of devices %s are recorded but not journaled; they are not in the "
                      "aggregate", r.round_id, missing)
            self._reported |= set(missing)
        deadline = max(r.deadline, now + self.policy.round_timeout / 2)
        self._round = replace(r, deadline=deadline)
        log.warning("round %d continues after a restart: %d of %d selected devices already reported, "
                    "deadline in %.1fs", r.round_id, len(self._reported), len(r.selected), deadline - now)
        self._tick_locked(now)

    # ------------------------------------------------------------------ devices

    def enroll(self, request: wire.EnrollRequest) -> wire.EnrollReply:
        """A new device gets its id and long-term secret (server/identity.py)."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        reply = self.identity.enroll(request)
        self._seen[reply.device_id] = self.clock()  # live: it is about to join and ask for a task
        return reply

    def join(self, request: wire.JoinRequest) -> wire.JoinReply:
        """An enrolled device proves its secret and gets a session token."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        reply = self.identity.join(request)
        self._seen[reply.device_id] = self.clock()  # live: it is about to ask for a task
        return replace(reply, model_ini=self.layout.ini_text)

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
            self._seen[device_id] = now
            if not self.finished:
                self._waiting[device_id] = now
            self._tick_locked(now)
            task = self._train_task(device_id)
            if task is not None:
                return task
            if self.finished:  # the settings ride along: the device builds its end candidates with them
                return wire.Task(kind=wire.TaskKind.DONE, base_version=self.version, config=self.training,
                                 model_ini=self.layout.ini_text)
            return wire.Task(kind=wire.TaskKind.WAIT, base_version=self.version,
                             retry_after_seconds=self.policy.retry_after)

    def _has_reported(self, device_id: int) -> bool:
        """Has the device an accepted update in the open round? (Replicas also ask the database.)"""
        return device_id in self._reported

    def _train_task(self, device_id: int) -> wire.Task | None:
        r = self._round
        if r is None or device_id not in r.selected or self._has_reported(device_id):
            return None
        return wire.Task(kind=wire.TaskKind.TRAIN, round_id=r.round_id, base_version=r.base_version,
                         config=replace(self.training, deadline_unix=r.deadline), model_ini=self.layout.ini_text)

    def tick(self) -> None:
        """Close or abandon a round past its deadline, and open one if enough devices wait (called periodically)."""
        with self._lock:
            if not self._stopping:
                self._tick_locked(self.clock())

    def quorum(self, r: st.Round) -> int:
        """Updates that close round `r` before its deadline: every selected device, or target_devices
        (over-selection), and never more than the aggregator can hold (robust aggregators keep each delta)."""
        q = len(r.selected)
        if self.policy.target_devices is not None:
            q = min(q, self.policy.target_devices)
        cap = getattr(self.aggregator, "capacity", None)
        return max(1, min(q, cap)) if cap else q

    def _tick_locked(self, now: float) -> None:
        r = self._round
        if r is not None and self.aggregator.count >= self.quorum(r):
            self._try_close(now, "quorum")
        r = self._round
        if r is not None and now >= r.deadline:
            n = self.aggregator.count
            if n >= self.policy.min_devices:
                self._try_close(now, f"deadline with {n} of {len(r.selected)} updates")
            else:
                self._abandon_locked(
                    now, f"deadline passed with {n} of {len(r.selected)} updates (need {self.policy.min_devices})")
        if self._round is None and not self.finished:
            for d in [d for d, t in self._waiting.items() if now - t > self.policy.liveness]:
                del self._waiting[d]  # stopped calling: not live, never selected
            for d in [d for d, t in self._seen.items() if now - t > self.policy.liveness]:
                del self._seen[d]
            if len(self._waiting) >= self.policy.min_devices:
                self._open_locked(now)
            else:
                self._gather_since = None

    def _selection_size(self, live: int, now: float, everyone: int | None = None) -> int:
        """How many of `live` waiting devices to select now (0: not yet). `everyone`: the live devices,
        waiting or not (None: this process's own view)."""
        p = self.policy
        if p.target_devices is None:
            # Every live device (called recently) is waiting, or the gather window has passed: a
            # device still uploading the last round is not left out, a lost one is not awaited.
            want = len(self._seen.keys() | self._waiting.keys()) if everyone is None else everyone
            size = min(live, max(p.min_devices, math.ceil(p.fraction * live)))
        else:
            want = math.ceil(p.target_devices * (1 + p.over_select))
            size = min(live, want)
        if live >= want:
            return size
        self._gather_since = self._gather_since if self._gather_since is not None else now
        return size if now - self._gather_since >= p.gather_seconds else 0

    def _open_locked(self, now: float) -> None:
        self._open_from(sorted(self._waiting), now)

    def _open_from(self, candidates: list[int], now: float, everyone: int | None = None) -> st.Round | None:
        """Open a round over a sample of the waiting `candidates` if the policy says so now (else None)."""
        k = self._selection_size(len(candidates), now, everyone)
        if k == 0:
            return None
        self._gather_since = None
        picked = self._rng.choice(len(candidates), size=k, replace=False)
        selected = tuple(sorted(candidates[i] for i in picked))
        with self.state.tx():
            self._fence()
            r = self.state.open_round(self.version, selected, now, now + self.policy.round_timeout)
        self.aggregator.start(r.round_id, {k: self.weights[k] for k in self.layout.shared})
        self._round, self._reported = r, set()
        for d in selected:
            self._waiting.pop(d, None)
        log.info("round %d opened: base version %d, %d of %d waiting devices selected, deadline in %.1fs",
                 r.round_id, r.base_version, len(selected), len(candidates), self.policy.round_timeout)
        return r

    def _fence(self) -> None:
        """Inside the transaction that opens, closes or abandons a round: refuse (a StateError) when this
        process may no longer change rounds. One server always may; a replica must hold the lease."""

    def _abandon_locked(self, now: float, reason: str) -> None:
        r = self._round
        assert r is not None
        with self.state.tx():
            self._fence()
            self.state.abandon_round(r.round_id, reason, now)
        self._round, self._reported = None, set()
        self.journal.discard(r.round_id)
        log.warning("round %d abandoned: %s", r.round_id, reason)

    def _try_close(self, now: float, why: str) -> None:
        """Close the round; if the store or the database cannot take the new version (disk full, I/O),
        the round stays open with its accepted updates, the error shows in GetStatus, and the next
        tick retries. Anything else is a bug and propagates."""
        try:
            self._close_locked(now, why)
            self.close_error = ""
        except guard.UnsafeModel as exc:
            r = self._round
            assert r is not None
            self.close_error = (f"round {r.round_id}: refused to publish version {self.version + 1} ({exc}); "
                                f"version {self.version} is kept")
            log.error("%s", self.close_error)
            self._abandon_locked(now, f"refused to publish: {exc}")
        except (OSError, StoreError, st.StateError, sqlite3.Error) as exc:
            rid = self._round.round_id if self._round else 0
            self.close_error = f"round {rid}: closing failed ({type(exc).__name__}: {exc}); retrying"
            log.error("%s", self.close_error)

    def _combined(self, r: st.Round) -> Aggregator:
        """The aggregate the round closes with: this process's own (a replica combines every replica's
        partial sum into a fresh aggregator, server/cluster.py)."""
        return self.aggregator

    def _close_locked(self, now: float, why: str) -> None:
        """Mean delta -> optimizer -> version v+1 stored atomically -> round closed -> published."""
        r = self._round
        assert r is not None
        combined = self._combined(r)
        mean = combined.result()
        if mean is None:
            raise StaleRound(f"round {r.round_id} has no updates to aggregate")
        saved = self.optimizer.state()
        saved_rest = dict(self.downlink.residual)
        v = self.version + 1
        written = False
        try:
            with self.state.tx():
                self._fence()
                with np.errstate(over="ignore", invalid="ignore"):  # check_model refuses what overflowed
                    new_shared = self.optimizer.step({k: self.weights[k] for k in self.layout.shared}, mean)
                guard.clamp_rounding(new_shared)
                guard.check_model(new_shared)  # never publish NaN/Inf or a negative variance
                # what is published: the old weights plus the compressed step, as devices rebuild it
                new_shared, extra = self.downlink.publish(v, {k: self.weights[k] for k in self.layout.shared},
                                                          new_shared)
                guard.check_model(new_shared)
                weights = {**self.weights, **new_shared}
                metrics = weighted_metrics(self.state.updates(r.round_id))
                if self.training.dp_clip_norm > 0:  # what a device in every round so far has spent
                    metrics["dp_epsilon"] = epsilon(self.training.dp_noise_multiplier, self._closed + 1,
                                                    self.dp_delta)
                    metrics["dp_delta"] = self.dp_delta
                meta = {"round_id": r.round_id, "created": now, "strategy": self.optimizer.name,
                        "devices": combined.count, "examples": combined.total_weight, "metrics": metrics}
                self.store.save_version(v, weights, meta, self.optimizer.state(), extra)
                written = True
                self.state.close_round(r.round_id, v, metrics, now)
        except BaseException:
            self.optimizer.load_state(saved)
            self.downlink.residual = saved_rest
            if written:
                self.store.path(v).unlink(missing_ok=True)
            raise
        self.version, self.weights, self._blob = v, weights, None
        self._round, self._reported = None, set()
        self._closed += 1
        self.journal.discard(r.round_id)
        log.info("round %d closed (%s): %d updates, version %d written%s", r.round_id, why,
                 combined.count, v, "; federation finished" if self.finished else "")

    # ------------------------------------------------------------------ updates

    def example_cap(self, device_id: int) -> int:
        """The most examples an update from `device_id` may count for (its weight in the mean).

        Today the configured ceiling; the hook for a per-device cap (e.g. the data set size a device
        declared at enrollment)."""
        return self.policy.max_examples

    def _late_or_stale(self, device_id: int, header: wire.UpdateHeader, now: float) -> StaleRound:
        """The refusal for an update that names a round other than the open one."""
        r = self._round
        rid = header.round_id
        old = self.state.round(rid) if 1 <= rid <= wire.INT63_MAX else None
        if old is not None and old.state != st.OPEN and device_id in old.selected:
            if any(u.device_id == device_id for u in self.state.updates(rid)):
                return AlreadyReported(f"device {device_id} already reported for round {rid}")
            self.state.record_late(rid, device_id, now)
            return LateUpdate(f"round {rid} was {old.state} before this update arrived; late updates are counted "
                              f"but not aggregated")
        if self.finished:
            return StaleRound(f"round {rid} is not open: the federation has finished")
        now_open = f"round {r.round_id} is open" if r else "no round is open"
        return StaleRound(f"round {rid} is not open ({now_open})")

    def _check_upload(self, device_id: int, header: wire.UpdateHeader, now: float) -> st.Round:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        self._tick_locked(now)
        r = self._round
        if r is None or header.round_id != r.round_id or self.finished:
            raise self._late_or_stale(device_id, header, now)
        if device_id not in r.selected:
            raise NotSelected(f"device {device_id} is not selected for round {r.round_id}")
        if self._has_reported(device_id):
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
        """Check the header; receive, verify, decode and validate the delta and journal it durably (all
        outside the lock, so uploads overlap); then, under the lock and in one state transaction,
        record it (the commit point) and fold it into the aggregate. Only then is it acknowledged."""
        with self._lock:
            self._seen[device_id] = self.clock()
            self._check_upload(device_id, header, self.clock())
            base = {k: self.weights[k] for k in self.layout.shared}
        blob = wire.join_chunks(chunks, header.total_size, self.max_update_bytes, header.sha256)
        delta = decode_update(blob, self.layout.shared_shapes, self.norm_bound, self.layout.local, self.layout.method)
        guard.check_update(base, delta)
        examples = min(header.num_examples, self.example_cap(device_id))
        if examples < header.num_examples:
            log.info("device %d claimed %d examples; counted as %d (the cap)", device_id, header.num_examples,
                     examples)
        now = self.clock()
        path = self.journal.append(JournalRecord(header.round_id, device_id, examples, float(examples),
                                                 header.sha256.hex(), now, blob))
        committed = False
        try:
            with self._lock:
                now = self.clock()
                r = self._check_upload(device_id, header, now)
                rec = st.UpdateRecord(r.round_id, device_id, examples, len(blob), header.sha256.hex(), now,
                                      {k: v for k, v in header.metrics.items() if math.isfinite(v)})
                with self.state.tx():
                    self.state.add_update(rec)
                    self.aggregator.add(delta, float(examples))
                committed = True
                self._reported.add(device_id)
                n = self._accepted(r, device_id, now)
                return wire.UploadReply(accepted=True, message=f"accepted for round {r.round_id}",
                                        updates_in_round=n)
        except BaseException:
            if not committed:
                self.journal.remove(path)  # refused after all: never acknowledged
            raise

    def _accepted(self, r: st.Round, device_id: int, now: float) -> int:
        """After an update committed: close the round at its quorum. Returns the updates in the round."""
        n = len(self._reported)
        log.debug("round %d: update from device %d accepted (%d/%d)", r.round_id, device_id, n, len(r.selected))
        if n >= self.quorum(r):
            self._try_close(now, "quorum")
        return n

    # ------------------------------------------------------------------ models and status

    def download_blob(self, version: int, have: int | None = None) -> tuple[bytes, str]:
        """(blob, content) to send for `version`: the compressed steps since `have` when the device holds
        an earlier version and steps can serve it (content wire.STEPS), else the weights (content "")."""
        weights = self.model_blob(version)
        if have is None:
            return weights, ""
        key = (have, version)
        blob = self._steps.get(key)
        if blob is None:
            blob = self.downlink.steps_blob(self.store, have, version, weights)
            if blob is None:
                return weights, ""
            with self._lock:
                if len(self._steps) >= 16:
                    self._steps.pop(next(iter(self._steps)))
                self._steps[key] = blob
        return blob, wire.STEPS

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

    # ------------------------------------------------------------------ the choice exchange

    def _choice_window(self, now: float) -> tuple[frozenset[int], float]:
        """(devices whose scores the decision waits for: those of the last closed round, its deadline)."""
        if self._choice_since is None:
            self._choice_since = now
        if self._choice_expected is None:
            last = next((r for r in self.state.rounds(limit=16) if r.state == st.CLOSED), None)
            self._choice_expected = frozenset(u.device_id for u in self.state.updates(last.round_id)) if last \
                else frozenset()
        return self._choice_expected, self._choice_since + self.policy.choice_timeout

    def choice_settled(self) -> bool:
        """Nothing more to wait for after the last round: no method, the fleet default is decided, or its
        wait is over."""
        with self._lock:
            if self.training.personalization is None or not self.finished or self.fleet_default is not None:
                return True
            return self.clock() >= self._choice_window(self.clock())[1]

    def report_choice(self, device_id: int, request: wire.ChoiceRequest) -> wire.ChoiceReply:
        """Record a device's validation scores of its candidates after the last round; once every device of
        the last round has reported, or `choice_timeout` after the federation finished, decide the fleet
        default (`personalization.fleet_default`: the method's own model, or local_only when the fleet's
        validation prefers it) and answer it from then on."""
        hp = self.training.personalization
        with self._lock:
            now = self.clock()
            self._seen[device_id] = now
            if hp is None:
                raise NotFinished("this federation runs no personalization method: there is no choice to report")
            if not self.finished:
                raise NotFinished(f"the federation has not finished ({self._closed} of {self.policy.rounds} rounds)")
            if request.version != self.version:
                raise NotFinished(f"the final version is {self.version}; scores of version {request.version} "
                                  "are not taken")
            self._choices[device_id] = dict(request.val_accuracy)
            expected, deadline = self._choice_window(now)
            if self.fleet_default is None and (expected <= self._choices.keys() or now >= deadline):
                own = pers.get(hp.method).serves
                self.fleet_default = pers.fleet_default(own, self._choices.values())
                log.info("fleet default: %s (%s's own model is %s; %d devices reported, %d expected%s)",
                         self.fleet_default, hp.method, own, len(self._choices), len(expected),
                         "" if expected <= self._choices.keys() else ", the wait is over")
            return wire.ChoiceReply(decided=self.fleet_default is not None, fleet_default=self.fleet_default or "",
                                    retry_after_seconds=max(1.0, self.policy.retry_after), reported=len(self._choices),
                                    expected=len(expected))

    def status(self) -> wire.Status:
        with self._lock:
            return build_status(self.state, self.version, self.policy.rounds, self.finished, problem=self.close_error)

    def stop(self) -> None:
        """Take no more work. The open round stays open: its updates are journaled, and a server
        started on the same store continues it."""
        with self._lock:
            self._stopping = True
            if self._round is not None:
                log.info("round %d left open with %d updates; a restart continues it", self._round.round_id,
                         len(self._reported))
