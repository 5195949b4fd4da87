"""Looking at a process from outside: which modules a fresh interpreter loads, which files it holds open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def open_files_under(directory: str | os.PathLike, pid: int | str = "self") -> list[str]:
    """What the descriptors of process `pid` point at inside `directory` (Linux /proc). An unlinked
    file still held open reads as '<path> (deleted)': the only trace a swap file leaves."""
    prefix = os.path.realpath(directory) + os.sep
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked (e.g. the listing's own descriptor)
            continue
        if target.startswith(prefix):
            found.append(target)
    return found
