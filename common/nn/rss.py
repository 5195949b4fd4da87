"""Process memory as the kernel counts it: current RSS and the high-water mark (Linux /proc)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_baseline: int | None = None


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return (kib or 0) * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (writes 5 to /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError as e:
        log.warning("cannot reset the RSS high-water mark (%s); peak includes start-up", e)
        return False


def mark_baseline() -> int:
    """Call after imports, data load and kernel warm-up: resets the peak and remembers RSS now."""
    global _baseline
    reset_peak()
    _baseline = rss_bytes()
    return _baseline


def baseline() -> int | None:
    return _baseline
