"""Several `fedpers-server` replicas on one PostgreSQL database share one federation.

Every replica serves every call: Enroll/Join, GetTask, downloads and uploads. Each keeps the
partial sum of the updates it accepted (its own aggregator, server/aggregate.py). One of them, the
holder of the coordinator lease, makes the round decisions; all of them learn those decisions from
the database. The parts, and where they live:

- **State** (PostgreSQL, server/state_pg.py): devices, rounds, selections, updates (each row names
  the replica that accepted it), plus the cluster's small tables: the lease, heartbeats, presence.
  An update's row is the commit point, as with one server.
- **Journal and model store** (one directory every replica mounts, `--store`): the journal record of
  each accepted update is written and fsynced there before its row commits (server/journal.py), the
  coordinator writes each version file there atomically, and partial sums are handed over there
  (`<store>/partials/r<round>/<replica>.fpp`). Large bytes stay out of the database.
- **Lease** (`leases` row, the database's clock, an epoch as fencing token): a replica takes it when
  it is free or expired and renews it every `sync_interval`; opening, closing and abandoning a round
  happen in a transaction that first checks the lease is still this replica's and unexpired, so a
  replica that lost it (paused, cut off) can never publish.
- **Sync** (every `sync_interval`, on the ticker and before a call that needs it): a replica sends
  its heartbeat and the devices it saw waiting, adopts a newer published version (the highest version
  of a closed round in the database; it loads that file from the shared store and serves it), adopts
  the open round (with an empty partial sum of its own) and learns which devices already reported.
- **Closing** (the coordinator): at quorum or deadline it marks the round closing in the database
  (from then on no update commits into it; updates being committed right then finish first), then
  combines: its own partial sum, each live replica's published partial sum (replicas publish theirs
  at their next sync once they see the mark), and, for the updates of replicas that are dead or did
  not answer in `partial_wait`, their journal records. Only partial sums that hold exactly the
  updates the database says their replica committed are used; anything else comes from the journal.
  Then the usual: optimizer step, version file, the round's row closed (fenced) -> published.
- **kill -9 of a replica**: its acknowledged updates have rows and journal records; the coordinator
  folds them in from the journal. If it held the lease, another replica takes it once it expires
  (`lease_ttl`) and finishes what it left: a version file written but not published is published
  with its round, a round marked closing is closed, stale rounds are abandoned.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedpers import wire
from fedpers.server import guard
from fedpers.server import state as st
from fedpers.server.aggregate import AggregationError, Aggregator, PartialSum
from fedpers.server.errors import AlreadyReported, LateUpdate
from fedpers.server.rounds import Coordinator, PolicyError
from fedpers.server.state_pg import DuplicateUpdate, Lease, LeaseLost, PostgresState, RoundNotOpen
from fedpers.server.validate import decode_update
from fedpers.store import CorruptFile, StoreError, atomic_write_bytes

log = logging.getLogger(__name__)

LEASE = "coordinator"
_PARTIAL_ROUND_RE = re.compile(r"^r(\d{12})$")


@dataclass(frozen=True)
class ClusterPolicy:
    """How replicas coordinate. Seconds throughout."""

    sync_interval: float = 0.2  # between a replica's looks at the database (and lease renewals)
    lease_ttl: float = 5.0  # the coordinator lease runs out this long after its last renewal
    heartbeat_ttl: float = 3.0  # a replica whose heartbeat is older is taken for dead
    partial_wait: float = 2.0  # at close: the longest the coordinator waits for a live replica's partial sum

    def __post_init__(self) -> None:
        for key in ("sync_interval", "lease_ttl", "heartbeat_ttl", "partial_wait"):
            if not getattr(self, key) > 0:
                raise PolicyError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.lease_ttl <= 3 * self.sync_interval:
            raise PolicyError(f"lease_ttl: must exceed 3 x sync_interval ({3 * self.sync_interval}), "
                              f"got {self.lease_ttl}")
        if self.partial_wait >= self.lease_ttl:
            raise PolicyError(f"partial_wait: must be below lease_ttl ({self.lease_ttl}), got {self.partial_wait}")


def replica_name() -> str:
    """A name for this server process, unique across restarts: host, pid and a random suffix."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class PartialStore:
    """Partial sums handed from replicas to the coordinator, in the shared store:
    `<directory>/r<round>/<replica>.fpp`, each written atomically (temp + fsync + rename)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, round_id: int, replica: str) -> Path:
        return self.directory / f"r{round_id:012d}" / f"{replica}.fpp"

    def write(self, replica: str, part: PartialSum) -> Path:
        path = self._path(part.round_id, replica)
        atomic_write_bytes(path, part.encode())
        return path

    def read(self, round_id: int, replica: str) -> PartialSum | None:
        """The replica's partial sum of the round, or None (not there yet, or unreadable: logged)."""
        path = self._path(round_id, replica)
        try:
            return PartialSum.decode(path.read_bytes(), str(path))
        except FileNotFoundError:
            return None
        except (OSError, CorruptFile) as exc:
            log.warning("partial sum %s cannot be used (%s); its updates come from the journal", path, exc)
            return None

    def discard(self, round_id: int) -> None:
        shutil.rmtree(self.directory / f"r{round_id:012d}", ignore_errors=True)

    def rounds(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _PARTIAL_ROUND_RE.match(p.name)))


class ClusterCoordinator(Coordinator):
    """A Coordinator that is one of several replicas on a shared PostgreSQL state and a shared store."""

    def __init__(self, *, replica: str, cluster: ClusterPolicy | None = None, **kwargs: Any) -> None:
        """`replica` names this process (rows it writes, its partial sums, the lease); the rest is
        Coordinator's. The state must be a PostgresState and `store` a directory every replica sees."""
        if not isinstance(kwargs.get("state"), PostgresState):
            raise TypeError("ClusterCoordinator needs a PostgresState (--state-url postgresql://...)")
        self.replica = replica
        self.cluster = cluster or ClusterPolicy()
        self.partials = PartialStore(Path(kwargs["store"].directory).parent / "partials")
        self._lease: Lease | None = None
        self._others: set[int] = set()  # devices with a committed update in the open round, whichever replica
        self._closing = False  # the open round is marked closing in the database
        self._published_for = 0  # the round whose partial sum this replica has handed over
        self._last_sync = -math.inf
        self._flushed_at = 0.0  # presence sent up to this time
        self.sync_problem = ""
        super().__init__(**kwargs)

    state: PostgresState  # narrowed

    # ------------------------------------------------------------------ startup

    def _recover(self, initial_weights: dict) -> tuple[int, dict]:
        """The published version (from the database, its file from the shared store); version 0 is
        written by the first replica ever to start. Rounds are the coordinator's business (_take_over)."""
        now = self.clock()
        with self.state.bootstrap_lock():
            if self.store.latest_version() is None:
                self._write_version_zero(initial_weights, now)
        published, _ = self.state.published_version()
        weights = self._load(published)
        log.info("replica %s serving version %d from %s", self.replica, published, self.store.directory)
        return published, weights

    def _load(self, version: int) -> dict:
        """A published version's served weights from the shared store (its optimizer state loaded too)."""
        if version not in self.store.versions():
            raise StoreError(f"version {version} is published in the database but not in {self.store.directory}: "
                             f"every replica must see the same --store directory")
        return self._load_version(version)[1]

    def _rebuild_open_round(self, now: float) -> None:
        """A replica starts with an empty partial sum: what it (or a dead replica) accepted before is in
        the journal, and the coordinator folds it in at close."""
        self._round = None
        self._tick_locked(now)

    # ------------------------------------------------------------------ the periodic look at the database

    def _tick_locked(self, now: float) -> None:
        t = time.monotonic()
        if t - self._last_sync < self.cluster.sync_interval:
            return
        self._last_sync = t
        try:
            self._sync_locked(now)
            if not self._stopping:
                self._lead_locked(now)
            if self.sync_problem:
                log.info("database reachable again")
            self.sync_problem = ""
        except LeaseLost as exc:  # taken over between renewal and a fenced write: no longer the coordinator
            log.warning("%s", exc)
            self._lease = None
        except (st.StateError, StoreError, OSError) as exc:  # unreachable, or a race another replica won
            if not self.sync_problem:
                log.warning("replica %s cannot sync (%s: %s); serving what it knows", self.replica,
                            type(exc).__name__, exc)
            self.sync_problem = f"replica {self.replica}: {type(exc).__name__}: {exc}"

    def _sync_locked(self, now: float) -> None:
        """Heartbeat and presence up; published version, open round and its reporters down."""
        seen = {d: t for d, t in self._seen.items() if t > self._flushed_at}
        waiting = {d: t for d, t in self._waiting.items() if t > self._flushed_at}
        self.state.heartbeat(self.replica, seen, waiting)
        self._flushed_at = now
        for table in (self._seen, self._waiting):  # sent: keep only what is still live
            for d in [d for d, t in table.items() if now - t > self.policy.liveness]:
                del table[d]
        version, closed = self.state.published_version()
        if version != self.version:
            self._adopt(version)
        self._closed = closed
        opened = self.state.open_rounds()
        r = opened[-1] if opened else None
        if self._round is not None and (r is None or r.round_id != self._round.round_id):
            log.debug("round %d finished (seen in the database)", self._round.round_id)
            self._forget_round()
        if r is not None and self._round is None:
            if r.base_version != self.version:
                log.warning("round %d is on base version %d, this replica has %d: waiting for it", r.round_id,
                            r.base_version, self.version)
                return
            self.aggregator.start(r.round_id, {k: self.weights[k] for k in self.layout.shared})
            self._round, self._reported = r, set()
            log.info("round %d: taking updates for it (opened by the coordinator, %d devices selected)", r.round_id,
                     len(r.selected))
        if self._round is not None:
            rid = self._round.round_id
            committed = self.state.committed_by(rid)
            self._others = set(committed)
            self._closing = self.state.closing_at(rid) > 0
            if self._closing and self._lease is None and self._published_for != rid:
                self._publish_partial(rid, committed)

    def _forget_round(self) -> None:
        self._round, self._reported, self._others, self._closing = None, set(), set(), False

    def _adopt(self, version: int) -> None:
        """Serve `version`, published by the coordinator (or, at a takeover, by this replica)."""
        old = self.version
        self.weights = self._load(version)
        self.version, self._blob = version, None
        log.info("serving version %d (was %d): published in the database", version, old)

    def _own_partial_matches(self, mine: set[int]) -> bool:
        """Does this replica's aggregator hold exactly the updates the database credits to it? (Not
        after a commit that failed once its delta was added: then the journal is the source.)"""
        return mine == self._reported and self.aggregator.count == len(mine)

    def _publish_partial(self, round_id: int, committed: dict[int, str]) -> None:
        """Hand this replica's partial sum of a closing round to the coordinator (shared store)."""
        mine = {d for d, x in committed.items() if x == self.replica}
        if not self._own_partial_matches(mine):
            log.warning("round %d: this replica's partial sum holds %s but the database has %s from it; the "
                        "coordinator takes them from the journal", round_id, sorted(self._reported), sorted(mine))
        else:
            self.partials.write(self.replica, self.aggregator.partial(tuple(sorted(mine))))
            log.debug("round %d: partial sum of %d updates handed over", round_id, len(mine))
        self._published_for = round_id

    # ------------------------------------------------------------------ the coordinator's part

    def _lead_locked(self, now: float) -> None:
        lease = self.state.acquire_lease(LEASE, self.replica, self.cluster.lease_ttl)
        if lease is None:
            if self._lease is not None:
                log.warning("replica %s lost the coordinator lease (epoch %d)", self.replica, self._lease.epoch)
                self.close_error = ""  # closing is the new coordinator's business now
            self._lease = None
            return
        if self._lease != lease:
            self._lease = lease
            log.info("replica %s coordinates the federation (lease epoch %d)", self.replica, lease.epoch)
            self._take_over(now)
        r = self._round
        if r is not None:
            n = len(self._others)
            if self._closing or n >= self.quorum(r):
                self._try_close(now, "quorum" if n >= self.quorum(r) else f"closing with {n} updates")
            elif now >= r.deadline:
                if n >= self.policy.min_devices:
                    self._try_close(now, f"deadline with {n} of {len(r.selected)} updates")
                else:
                    self._abandon_locked(now, f"deadline passed with {n} of {len(r.selected)} updates "
                                              f"(need {self.policy.min_devices})")
        if self._round is None and not self.finished:
            self._open_from_presence(now)

    def _renew_lease(self) -> None:
        """Renew the lease while the coordinator is busy (waiting for partial sums); LeaseLost if it went."""
        lease = self.state.acquire_lease(LEASE, self.replica, self.cluster.lease_ttl)
        if lease is None or lease != self._lease:
            self._lease = None
            raise LeaseLost(f"replica {self.replica} lost the coordinator lease while closing a round")

    def _fence(self) -> None:
        if self._lease is None:
            raise LeaseLost(f"replica {self.replica} does not hold the coordinator lease")
        self.state.check_lease(LEASE, self._lease)

    def _take_over(self, now: float) -> None:
        """Finish what a previous coordinator left: a version written but not published, stale rounds,
        journal records and partial sums of finished rounds, unfinished writes."""
        self.store.remove_unfinished()
        for v in [v for v in self.store.versions() if v > self.version]:
            made_by = int(self.store.load_version(v).meta.get("round_id", 0))
            r = self.state.round(made_by)
            if v == self.version + 1 and r is not None and r.state == st.OPEN:
                with self.state.tx():
                    self._fence()
                    self.state.close_round(r.round_id, v, self.store.load_version(v).meta.get("metrics", {}), now)
                log.warning("round %d: version %d was stored by a coordinator that stopped before publishing it; "
                            "published now", r.round_id, v)
                self._forget_round()
                self._adopt(v)
                self._closed = self.state.count_rounds(st.CLOSED)
            else:
                self.store.path(v).unlink(missing_ok=True)
                log.warning("version %d was written but never published; removed", v)
        opened = self.state.open_rounds()
        for r in opened:
            if r is not opened[-1] or r.base_version != self.version:
                with self.state.tx():
                    self._fence()
                    self.state.abandon_round(r.round_id, f"coordinator change; base version {r.base_version} is "
                                                         f"not the published {self.version}", now)
                log.warning("round %d abandoned at a coordinator change (base version %d, published %d)", r.round_id,
                            r.base_version, self.version)
                if self._round is not None and self._round.round_id == r.round_id:
                    self._forget_round()
        keep = {r.round_id for r in self.state.open_rounds()}
        for rid in self.journal.rounds():
            if rid not in keep:
                self.journal.discard(rid)
        for rid in self.partials.rounds():
            if rid not in keep:
                self.partials.discard(rid)
        self._sync_locked(now)

    def _open_from_presence(self, now: float) -> None:
        """Open a round over the devices waiting at any replica (presence in the database)."""
        seen, waiting = self.state.presence(now - self.policy.liveness)
        candidates = sorted(waiting)
        if len(candidates) < self.policy.min_devices:
            self._gather_since = None
            return
        r = self._open_from(candidates, now, everyone=len(seen.keys() | waiting.keys()))
        if r is not None:
            self.state.clear_waiting(r.selected)
            self._others, self._closing, self._published_for = set(), False, 0

    def _combined(self, r: st.Round) -> Aggregator:
        """Mark the round closing, then combine every replica's partial sum, and the journal records of
        the updates no usable partial sum holds, into a fresh aggregator."""
        if not self.state.mark_closing(r.round_id, self.clock()):
            raise st.Conflict(f"round {r.round_id} is no longer open")
        self._closing = True
        updates = {u.device_id: u for u in self.state.updates(r.round_id)}
        owners: dict[str, set[int]] = {}
        for d, x in self.state.committed_by(r.round_id).items():
            owners.setdefault(x, set()).add(d)
        combined = self.aggregator.fresh()
        combined.start(r.round_id, {k: self.weights[k] for k in self.layout.shared})
        from_journal: set[int] = set()
        merged: list[str] = []
        mine = owners.pop(self.replica, set())
        if self._own_partial_matches(mine):
            if mine:
                combined.merge(self.aggregator.partial(tuple(sorted(mine))))
                merged.append(self.replica)
        else:
            from_journal |= mine
        live = self.state.live_replicas(self.cluster.heartbeat_ttl)
        give_up = time.monotonic() + self.cluster.partial_wait
        while owners:
            for x, devices in sorted(owners.items()):
                part = self.partials.read(r.round_id, x)
                if part is not None and set(part.devices) == devices and part.count == len(devices):
                    try:
                        combined.merge(part)
                        merged.append(x)
                    except AggregationError as exc:
                        log.warning("round %d: partial sum of %s refused (%s); its updates come from the journal",
                                    r.round_id, x, exc)
                        from_journal |= devices
                    del owners[x]
                elif part is not None or x not in live or time.monotonic() >= give_up:
                    from_journal |= devices  # dead, silent, or a partial sum that does not match the rows
                    del owners[x]
            if owners:
                time.sleep(0.05)
                self._renew_lease()
        added = self._from_journal(r, from_journal, updates, combined)
        missing = sorted(from_journal - added)
        if missing:  # acknowledged, yet no journal record in the shared store: never publish without them
            raise StoreError(f"round {r.round_id}: acknowledged updates of devices {missing} have no journal record "
                             f"in {self.journal.directory}; is --store the same directory on every replica?")
        log.info("round %d: combined partial sums of %d replica(s) %s and %d update(s) from the journal",
                 r.round_id, len(merged), merged, len(added))
        return combined

    def _from_journal(self, r: st.Round, devices: set[int], updates: dict[int, st.UpdateRecord],
                      into: Aggregator) -> set[int]:
        """Fold the committed journal records of `devices` into `into`; returns the devices added."""
        added: set[int] = set()
        if not devices:
            return added
        for _, rec in self.journal.records(r.round_id):
            u = updates.get(rec.device_id)
            if rec.device_id not in devices or rec.device_id in added or u is None or u.sha256 != rec.sha256:
                continue  # another replica's, a refused attempt, or a duplicate
            delta = decode_update(rec.blob, self.layout.shared_shapes, None)
            guard.check_update(self.weights, delta)  # the same clamping as when it was accepted
            into.add(delta, rec.weight)
            added.add(rec.device_id)
        return added

    def _close_locked(self, now: float, why: str) -> None:
        r = self._round
        assert r is not None
        super()._close_locked(now, why)
        self.partials.discard(r.round_id)
        self._forget_round()

    def _abandon_locked(self, now: float, reason: str) -> None:
        r = self._round
        assert r is not None
        super()._abandon_locked(now, reason)
        self.partials.discard(r.round_id)
        self._forget_round()

    # ------------------------------------------------------------------ calls

    def _has_reported(self, device_id: int) -> bool:
        return device_id in self._reported or device_id in self._others

    def _accepted(self, r: st.Round, device_id: int, now: float) -> int:
        try:  # every replica's updates so far: the quorum counts them all
            self._others = set(self.state.committed_by(r.round_id))
        except st.StateError:
            pass  # the next sync catches up
        self._others.add(device_id)
        n = len(self._others)
        log.debug("round %d: update from device %d accepted (%d/%d)", r.round_id, device_id, n, len(r.selected))
        if self._lease is not None and n >= self.quorum(r):
            self._try_close(now, "quorum")
        return n

    def accept_update(self, device_id: int, header: wire.UpdateHeader, chunks: Iterable) -> wire.UploadReply:
        """As one server, plus the refusals only another replica's decision can cause: the round stopped
        taking updates (closing or closed by the coordinator) -> LateUpdate; the device's update was
        committed through another replica -> AlreadyReported."""
        try:
            return super().accept_update(device_id, header, chunks)
        except RoundNotOpen as exc:
            try:
                self.state.record_late(header.round_id, device_id, self.clock())
            except st.StateError:
                pass  # counting it is best effort; refusing it is what matters
            raise LateUpdate(f"{exc}; late updates are counted but not aggregated") from None
        except DuplicateUpdate as exc:
            raise AlreadyReported(str(exc)) from None

    def _check_upload(self, device_id: int, header: wire.UpdateHeader, now: float) -> st.Round:
        if self._round is None or header.round_id != self._round.round_id:
            self._last_sync = -math.inf  # a round opened a moment ago by the coordinator: look before refusing
        return super()._check_upload(device_id, header, now)

    def model_blob(self, version: int) -> bytes:
        if version > self.version:  # published a moment ago by the coordinator: look now, not at the next tick
            with self._lock:
                self._last_sync = -math.inf
                self._tick_locked(self.clock())
        return super().model_blob(version)

    def status(self) -> wire.Status:
        status = super().status()
        return replace(status, problem=status.problem or self.sync_problem[:1000])

    def stop(self) -> None:
        """Take no more work; hand the partial sum of the open round over (it can no longer change), give
        the lease up so another replica coordinates at once, and say this replica is gone."""
        super().stop()
        with self._lock:
            try:
                r = self._round
                if r is not None and self._published_for != r.round_id:
                    self._publish_partial(r.round_id, self.state.committed_by(r.round_id))
                if self._lease is not None:
                    self.state.release_lease(LEASE, self.replica)
                    self._lease = None
                self.state.forget_replica(self.replica)
            except (st.StateError, OSError) as exc:
                log.warning("replica %s could not say goodbye cleanly (%s); the others notice by the lease and "
                            "heartbeat running out", self.replica, exc)
