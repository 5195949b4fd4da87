"""Memory of a whole run: this process and every process under it (server, Ray's own processes, its workers).

Summed RSS counts a shared page (numpy, numba, the interpreter) once per process that maps it; summed
PSS splits each shared page among those processes, so it is what the run takes from the machine.
`TreeMemory` samples both every `interval` seconds in a daemon thread and keeps the peaks; Linux /proc only.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreePeak:
    """The largest sums seen over a run, and how many processes there were at most."""

    rss_bytes: int
    pss_bytes: int
    processes: int
    samples: int


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (children of children, ...), from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def process_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes from /proc/PID/smaps_rollup; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return rss, pss


def peak_rss_of(pid: int) -> int | None:
    """VmHWM (the kernel's high-water mark of RSS) of a live process, in bytes; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class TreeMemory:
    """Samples the memory of a process tree in a daemon thread until `stop()`, which returns the peaks."""

    def __init__(self, root: int | None = None, interval: float = 1.0) -> None:
        self.root = root if root is not None else os.getpid()
        self.interval = interval
        self._stop = threading.Event()
        self._peak = TreePeak(0, 0, 0, 0)
        self._thread = threading.Thread(target=self._loop, name="memwatch", daemon=True)

    def start(self) -> TreeMemory:
        self._thread.start()
        return self

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        pids = descendants(self.root)
        rss = pss = 0
        for pid in pids:
            r, p = process_memory(pid)
            rss, pss = rss + r, pss + p
        old = self._peak
        self._peak = TreePeak(max(old.rss_bytes, rss), max(old.pss_bytes, pss), max(old.processes, len(pids)),
                              old.samples + 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except OSError as exc:  # /proc unreadable here: no numbers rather than a broken run
                log.warning("memory sampling stopped: %s", exc)
                return

    def stop(self) -> TreePeak:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self._peak
