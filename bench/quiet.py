"""Was the machine quiet while a benchmark ran? The CPU other processes used, not the load average.

The 1-minute load average counts the benchmark's own threads: after a minute of a 2-thread run on 2
cores it reads ~1.5 on a machine nobody else uses. `OtherCpu` instead takes the whole machine's busy
CPU time from /proc/stat over the run and subtracts this process's and its waited-for children's own
(os.times), leaving what everything else used, in cores on average: above a quarter of a core the run
was not quiet. (The load average before the run decays slowly after earlier work, so it is only the
fallback where /proc/stat is missing.)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

QUIET_LOAD = 1.0  # 1-minute load average before the run above which it is not quiet
QUIET_OTHERS = 0.25  # cores other processes may use on average during the run


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent not idle since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class OtherCpu:
    """Start it before the timed work, `stop()` after it (children must have been waited for)."""

    load_before: float = 0.0
    others_cores: float | None = None  # other processes' CPU during the run, in cores on average
    _t0: float = 0.0
    _busy0: float | None = None
    _own0: float = 0.0

    @classmethod
    def start(cls) -> OtherCpu:
        return cls(load_before=os.getloadavg()[0], _t0=time.monotonic(), _busy0=_machine_busy_seconds(),
                   _own0=_own_seconds())

    def stop(self) -> OtherCpu:
        busy, wall = _machine_busy_seconds(), time.monotonic() - self._t0
        if busy is not None and self._busy0 is not None and wall > 0:
            self.others_cores = max(0.0, (busy - self._busy0) - (_own_seconds() - self._own0)) / wall
        return self

    @property
    def noisy(self) -> bool:
        if self.others_cores is None:  # no /proc/stat: the load average before is all there is
            return self.load_before > QUIET_LOAD
        return self.others_cores > QUIET_OTHERS

    def describe(self) -> str:
        """One line for the table's footer; a WARNING when the machine was not quiet."""
        others = ("" if self.others_cores is None
                  else f"; other processes used {self.others_cores:.2f} cores on average during the run")
        line = f"1-minute load average {self.load_before:.2f} before the run{others}"
        if self.noisy:
            limit = (f"load average > {QUIET_LOAD:g}" if self.others_cores is None
                     else f"others > {QUIET_OTHERS:g} cores of {os.cpu_count()}")
            line += f"\nWARNING: not a quiet machine ({limit}): timings are inflated and ratios are marked noisy"
        return line
