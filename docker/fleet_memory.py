"""Peak memory of containers while they run: the cgroup's own counters, else `docker stats` samples."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fleet_docker import run

log = logging.getLogger("fedpers.fleet")

CGROUP_PEAK_FILES = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes",  # v1, cgroupfs driver
    "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.max_usage_in_bytes",  # v1, systemd driver
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak",  # v2, systemd driver
    "/sys/fs/cgroup/docker/{id}/memory.peak",  # v2, cgroupfs driver
)


def parse_size(text: str) -> int:
    """'190.5MiB' / '1.2GiB' / '512kB' (docker stats) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)\s*", text)
    if not m:
        return 0
    unit = m.group(2)
    base = 1024 if "i" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0] if unit[0] != "B" else "B"]
    return int(float(m.group(1)) * base**power)


class PeakSampler(threading.Thread):
    """Keeps the highest memory use seen per container key (e.g. the compose service): the cgroup's
    own peak counter when this host exposes it (exact), else `docker stats` samples (a lower bound).
    `containers()` (container id -> key) is asked again every 2 s."""

    def __init__(self, containers: Callable[[], dict[str, str]], interval: float = 0.5) -> None:
        super().__init__(name="fleet-peaks", daemon=True)
        self.containers = containers
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self.source = ""
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def _record(self, service: str, value: int) -> None:
        with self._lock:
            self.peaks[service] = max(self.peaks.get(service, 0), value)

    def _record_anon(self, service: str, stat: Path) -> None:
        """Anonymous memory (v1 total_rss, v2 anon): what the limit must hold; page cache is reclaimable."""
        with contextlib.suppress(OSError, ValueError):
            fields = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
            value = int(fields.get("total_rss", fields.get("anon", 0)))
            with self._lock:
                self.anon_peaks[service] = max(self.anon_peaks.get(service, 0), value)

    def sample_once(self, containers: dict[str, str]) -> None:
        """One reading of every container: its cgroup where exposed, `docker stats` for the rest."""
        missing = {}
        for cid, service in containers.items():
            for pattern in CGROUP_PEAK_FILES:
                path = Path(pattern.format(id=cid))
                try:
                    value = int(path.read_text().strip())
                except (OSError, ValueError):
                    continue
                self.source = self.source or "cgroup peak counter"
                self._record(service, value)
                self._record_anon(service, path.parent / "memory.stat")
                break
            else:
                missing[cid] = service
        if missing:
            proc = run(["docker", "stats", "--no-stream", "--format", "{{.ID}} {{.MemUsage}}", *missing], check=False,
                       timeout=30)
            for line in (proc.stdout or "").splitlines():
                parts = line.split(" ", 1)
                if len(parts) == 2:
                    for cid, service in missing.items():
                        if cid.startswith(parts[0]):
                            self.source = self.source or "docker stats samples"
                            self._record(service, parse_size(parts[1].split("/")[0]))

    def run(self) -> None:
        containers: dict[str, str] = {}
        last_list = 0.0
        while not self._halt.is_set():
            try:
                if time.monotonic() - last_list > 2.0:
                    containers = self.containers()
                    last_list = time.monotonic()
                self.sample_once(containers)
            except Exception:  # noqa: BLE001 - sampling must never break the run
                log.debug("peak sampling failed", exc_info=True)
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        """Stop sampling; returns the peaks (key -> bytes)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=10)
        with self._lock:
            return dict(self.peaks)
