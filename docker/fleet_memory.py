"""Peak memory of containers while they run: the cgroup's own counters, else `docker stats` samples.

`PeakSampler` keeps the highest memory use seen per container in a thread. Where the host exposes
the container's cgroup (v1 or v2, cgroupfs or systemd driver) it reads the kernel's peak counter,
which is exact even between samples, and the anonymous memory (an instantaneous value). Elsewhere it
falls back to `docker stats` samples, which only bound the peak from below; `sources` says which.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from fedpers.nn import budget
from fleet_docker import FleetError, run

log = logging.getLogger("fedpers.fleet")

CGROUP_PEAK_FILES = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes",  # v1, cgroupfs driver
    "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.max_usage_in_bytes",  # v1, systemd driver
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak",  # v2, systemd driver
    "/sys/fs/cgroup/docker/{id}/memory.peak",  # v2, cgroupfs driver
)
CGROUP = "cgroup peak counter"
DOCKER_STATS = "docker stats samples"


class SizeError(ValueError):
    """A memory reading (a `docker stats` size, a cgroup counter) that is not a number of bytes."""


def parse_size(text: str) -> int:
    """'190.5MiB' / '1.2GiB' / '512kB' / '0B' (docker stats) -> bytes, by the package's one size parser;
    SizeError for anything else."""
    try:
        return budget.parse_size(text)
    except ValueError:
        raise SizeError(f"not a size: {text!r}") from None


def parse_counter(text: str, where: str) -> int:
    """A cgroup file's byte count; SizeError naming the file when it is not one."""
    try:
        return int(text.strip())
    except ValueError:
        raise SizeError(f"{where}: not a byte count: {text.strip()[:40]!r}") from None


def read_cgroup_peak(cid: str) -> tuple[int, Path] | None:
    """(peak bytes, cgroup directory) of a running container, or None where this host exposes neither
    layout (or the container is gone). SizeError when the counter is there but unreadable as bytes."""
    for pattern in CGROUP_PEAK_FILES:
        path = Path(pattern.format(id=cid))
        try:
            text = path.read_text()
        except OSError:
            continue
        return parse_counter(text, str(path)), path.parent
    return None


def read_anon(stat: Path) -> int | None:
    """Anonymous memory (v1 `total_rss`, v2 `anon`) from memory.stat: what a limit must hold, unlike
    page cache, which the kernel reclaims. None when the file is gone or has neither key."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(" ", 1) for line in lines if line.count(" ") == 1)
    text = fields.get("total_rss", fields.get("anon"))
    return None if text is None else parse_counter(text, str(stat))


def docker_stats(ids: Iterable[str]) -> dict[str, int]:
    """Current memory use of containers by `docker stats` (id as docker prints it, short -> bytes).
    A line that does not parse is logged and left out, never counted as 0."""
    proc = run(["docker", "stats", "--no-stream", "--format", "{{.ID}} {{.MemUsage}}", *ids], check=False,
               timeout=30, merge_stderr=False)  # a container that just exited is an error on stderr only
    out: dict[str, int] = {}
    for line in (proc.stdout or "").splitlines():
        short, _, usage = line.partition(" ")
        try:
            out[short] = parse_size(usage.split("/")[0])
        except SizeError as exc:
            log.warning("docker stats: skipped the line %r: %s", line, exc)
    return out


class PeakSampler(threading.Thread):
    """Keeps the highest memory use seen per container key while it runs (see the module docstring).

    `containers()` says what to watch (container id -> key, e.g. the compose service); it is asked
    again every `relist` seconds. Sampling errors it can expect (a docker call failing, a file that
    vanished, a reading that does not parse) are logged once each and kept in `problems`; anything
    else is a bug: it ends the thread and `stop()` raises it."""

    def __init__(self, containers: Callable[[], dict[str, str]], interval: float = 0.5, relist: float = 2.0,
                 name: str = "fleet-peaks") -> None:
        super().__init__(name=name, daemon=True)
        self.containers = containers
        self.interval = interval
        self.relist = relist
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self.sources: dict[str, str] = {}  # key -> CGROUP (once its cgroup answered) or DOCKER_STATS
        self.problems: list[str] = []
        self._crash: Exception | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def source_of(self, keys: Iterable[str]) -> str:
        """How the peaks of `keys` were measured: one source, or both joined when they differ."""
        with self._lock:
            return " / ".join(sorted({self.sources[k] for k in keys if k in self.sources}))

    def peak(self, key: str) -> int | None:
        """The highest memory use seen for `key`, page cache included (None: never sampled)."""
        with self._lock:
            return self.peaks.get(key)

    def anon_peak(self, key: str) -> int | None:
        """The highest anonymous memory seen for `key` (cgroup only; None: never sampled)."""
        with self._lock:
            return self.anon_peaks.get(key)

    def _record(self, key: str, value: int, source: str, anon: int | None = None) -> None:
        with self._lock:
            self.peaks[key] = max(self.peaks.get(key, 0), value)
            if source == CGROUP or key not in self.sources:  # exact once the cgroup answered
                self.sources[key] = source
            if anon is not None:
                self.anon_peaks[key] = max(self.anon_peaks.get(key, 0), anon)

    def sample_once(self, containers: dict[str, str]) -> None:
        """One reading of every container: its cgroup where exposed, `docker stats` for the rest."""
        missing = {}
        for cid, key in containers.items():
            found = read_cgroup_peak(cid)
            if found is None:
                missing[cid] = key
                continue
            value, folder = found
            self._record(key, value, CGROUP, read_anon(folder / "memory.stat"))
        if missing:
            for short, value in docker_stats(missing).items():
                for cid, key in missing.items():
                    if cid.startswith(short):
                        self._record(key, value, DOCKER_STATS)

    def _problem(self, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text not in self.problems:
            self.problems.append(text)
            log.warning("memory sampling: %s", text)

    def run(self) -> None:
        containers: dict[str, str] = {}
        last_list = float("-inf")
        try:
            while not self._halt.is_set():
                try:
                    if time.monotonic() - last_list > self.relist:
                        containers = self.containers()
                        last_list = time.monotonic()
                    self.sample_once(containers)
                except (OSError, FleetError, SizeError) as exc:
                    self._problem(exc)
                self._halt.wait(self.interval)
        except Exception as exc:  # a bug: kept for stop() to raise in the caller's thread
            log.exception("memory sampler crashed")
            self._crash = exc

    def stop(self) -> dict[str, int]:
        """Stop sampling; returns the peaks (key -> bytes), or raises what crashed the thread."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=10)
        if self._crash is not None:
            raise self._crash
        with self._lock:
            return dict(self.peaks)
