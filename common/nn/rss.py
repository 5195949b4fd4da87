"""Process memory as the kernel counts it: current RSS and the high-water mark (Linux /proc), and
keeping the C heap from holding on to freed memory (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
_baseline: int | None = None
_startup_peak = 0  # VmHWM when the baseline was taken (the reset forgets it)
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None
        except OSError:
            _libc = None
    return _libc


def steady_heap() -> bool:
    """Make every block of MMAP_THRESHOLD bytes or more a mapping of its own, returned to the system
    when freed. glibc's default threshold grows to 32 MiB after the first big block is freed, so
    later weight-sized temporaries come from the heap and stay resident after they are freed.
    Process-wide and idempotent; False where the C library is not glibc."""
    lib = _glibc()
    return bool(lib is not None and lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_heap() -> None:
    """Give the free memory at the top of the C heap back to the system (glibc's malloc_trim)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


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
    global _baseline, _startup_peak
    trim_heap()
    _startup_peak = max(_startup_peak, peak_rss_bytes())
    reset_peak()
    _baseline = rss_bytes()
    return _baseline


def baseline() -> int | None:
    return _baseline


def process_peak_bytes() -> int:
    """The whole process's peak RSS: before the baseline (imports, data, warm-up) or after it."""
    return max(_startup_peak, peak_rss_bytes())
