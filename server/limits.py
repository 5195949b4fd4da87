"""Bounded resources per caller: call rates, concurrent streams, and streams that stall.

- `RateLimiter`: a token bucket per (caller, method); a call over its rate is refused with
  RESOURCE_EXHAUSTED and a retry hint in seconds, which the agent honours (fedpers.backoff).
- `StreamGate`: at most `streams_per_device` uploads/downloads of one device at a time.
- `Watchdog`: an upload or download that sends nothing for `idle_timeout` seconds, or averages
  less than `min_rate` bytes/s once `idle_timeout` has passed, is cut (its handler thread freed)
  and logged at INFO. One daemon thread, started on first use, ends when nothing is watched.

Everything here is in memory and O(1) per call: the interceptor consults it on gRPC's serving
thread. No gRPC types besides the call context that is cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fedpers.server.errors import RateLimited, StreamCut, TooManyStreams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rate:
    """`per_second` calls on average, `burst` at once."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class LimitsPolicy:
    """Per-caller limits; the defaults leave an honest device (and the simulator) far below them."""

    rates: dict[str, Rate] = field(default_factory=lambda: {
        "GetTask": Rate(5.0, 20),  # a device that honours retry_after asks at most 1/retry_after per second
        "GetStatus": Rate(1.0, 5),
        "DownloadModel": Rate(2.0, 10),
        "UploadUpdate": Rate(2.0, 10),
        "Join": Rate(1.0, 5),  # per device id: every Join writes the database
        "ReportChoice": Rate(2.0, 10),  # after the last round: a device polls until the fleet default is decided
        "admin:GetStatus": Rate(20.0, 40),  # the operator's (and the simulator's) status polls
    })
    streams_per_device: int = 2
    idle_timeout: float = 20.0  # seconds a stream may send nothing
    min_rate: float = 4096.0  # bytes/s a stream must average once idle_timeout has passed

    def __post_init__(self) -> None:
        if self.streams_per_device < 1 or self.idle_timeout <= 0 or self.min_rate < 0:
            raise ValueError(f"limits: streams_per_device >= 1, idle_timeout > 0, min_rate >= 0; got "
                             f"{self.streams_per_device}, {self.idle_timeout}, {self.min_rate}")

    @classmethod
    def for_server(cls, retry_after: float, rate_scale: float = 1.0, **overrides: Any) -> LimitsPolicy:
        """Defaults fitted to a server that tells waiting devices to come back after `retry_after` s,
        every rate and burst multiplied by `rate_scale` (0: no call-rate limits)."""
        rates = cls().rates | {"GetTask": Rate(max(5.0, 2.0 / retry_after), 20)}
        scaled = {k: Rate(r.per_second * rate_scale, max(1, round(r.burst * rate_scale)))
                  for k, r in rates.items()} if rate_scale > 0 else {}
        return cls(rates=scaled, **overrides)


class RateLimiter:
    """Token buckets keyed by (caller, method)."""

    def __init__(self, rates: dict[str, Rate], clock: Callable[[], float] = time.monotonic) -> None:
        self.rates, self.clock = rates, clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[Any, str], tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, caller: Any, method: str) -> None:
        """Spend one call of `caller` on `method`; RateLimited (with a retry hint) when none is left."""
        rate = self.rates.get(method)
        if rate is None:
            return
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get((caller, method), (float(rate.burst), now))
            tokens = min(float(rate.burst), tokens + (now - at) * rate.per_second)
            if tokens < 1.0:
                self._buckets[(caller, method)] = (tokens, now)
                wait = (1.0 - tokens) / rate.per_second
                raise RateLimited(f"{method}: more than {rate.per_second:g} calls/s (burst {rate.burst}); "
                                  f"retry in {wait:.2f}s", retry_after=wait)
            self._buckets[(caller, method)] = (tokens - 1.0, now)


class StreamGate:
    """At most `limit` concurrent streams per device."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}

    @contextlib.contextmanager
    def enter(self, device_id: int, what: str) -> Iterator[None]:
        with self._lock:
            n = self._open.get(device_id, 0)
            if n >= self.limit:
                raise TooManyStreams(f"device {device_id} already has {n} uploads/downloads open (at most "
                                     f"{self.limit}); {what} refused", retry_after=1.0)
            self._open[device_id] = n + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._open[device_id] - 1
                if left:
                    self._open[device_id] = left
                else:
                    del self._open[device_id]


def _active(context: Any) -> bool:
    is_active = getattr(context, "is_active", None)
    return bool(is_active()) if callable(is_active) else True


class Watched:
    """One watched stream: progress is reported as messages pass; `cut` says why it was ended."""

    def __init__(self, context: Any, what: str, now: float) -> None:
        self.context, self.what = context, what
        self.started = self.last = now
        self.nbytes = 0
        self.cut: str | None = None

    def progress(self, nbytes: int, now: float) -> None:
        self.nbytes += nbytes
        self.last = now


class Watchdog:
    """Cuts streams that stall (idle) or trickle (below min_rate); see the module docstring."""

    def __init__(self, idle_timeout: float, min_rate: float, clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.idle_timeout, self.min_rate, self.clock = idle_timeout, min_rate, clock
        self.interval = interval or min(0.5, idle_timeout / 4)
        self._lock = threading.Lock()
        self._watched: set[Watched] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, context: Any, what: str) -> Iterator[Watched]:
        w = Watched(context, what, self.clock())
        with self._lock:
            self._watched.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedpers-watchdog", daemon=True)
                self._thread.start()
        try:
            yield w
        finally:
            with self._lock:
                self._watched.discard(w)

    def iterate(self, w: Watched, messages: Iterator[Any], size: Callable[[Any], int]) -> Iterator[Any]:
        """The request stream, reporting progress; a stream that ends by cancellation (ours or the
        peer's) becomes StreamCut, which is logged at INFO."""
        it = iter(messages)
        while True:
            try:
                msg = next(it)
            except StopIteration:
                if w.cut or not _active(w.context):  # (a cancel can also end the stream this way)
                    raise StreamCut(f"{w.what} cut: {w.cut or 'cancelled by the caller or the connection was lost'}"
                                    ) from None
                return
            except Exception as exc:  # noqa: BLE001 - grpc.RpcError of a cancelled or broken stream
                if type(exc).__module__.startswith("grpc") or w.cut:
                    raise StreamCut(f"{w.what} cut: {w.cut or 'cancelled by the caller or the connection was lost'}"
                                    ) from None
                raise
            w.progress(size(msg), self.clock())
            yield msg

    def sweep(self) -> None:
        """Cut every watched stream that is idle too long or too slow (called by the thread; tests call it)."""
        now = self.clock()
        with self._lock:
            watched = list(self._watched)
        for w in watched:
            if w.cut:
                continue
            idle, elapsed = now - w.last, now - w.started
            if idle > self.idle_timeout:
                w.cut = f"nothing for {idle:.1f}s (limit {self.idle_timeout:g}s)"
            elif elapsed > self.idle_timeout and w.nbytes / elapsed < self.min_rate:
                w.cut = (f"{w.nbytes / elapsed:.0f} bytes/s over {elapsed:.1f}s, below the minimum "
                         f"{self.min_rate:.0f} bytes/s")
            else:
                continue
            log.info("%s cut: %s", w.what, w.cut)
            try:
                w.context.cancel()  # unblocks the handler thread waiting on the stream
            except Exception:  # noqa: BLE001 - the call may have ended meanwhile
                log.debug("cancelling %s failed", w.what, exc_info=True)

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            time.sleep(self.interval)
            self.sweep()
            with self._lock:
                if self._watched:
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 5.0:  # nothing to watch for a while: end the thread
                    self._thread = None
                    return


class Limits:
    """The server's limits in one object: the interceptor and the servicer hold it."""

    def __init__(self, policy: LimitsPolicy | None = None) -> None:
        self.policy = policy or LimitsPolicy()
        self.rates = RateLimiter(self.policy.rates)
        self.streams = StreamGate(self.policy.streams_per_device)
        self.watchdog = Watchdog(self.policy.idle_timeout, self.policy.min_rate)
