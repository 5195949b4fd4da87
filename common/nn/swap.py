"""Proactive swapping of saved activations, in three parts (as NNTrainer splits it):

- SwapFile: positional reads and writes of arena bytes to one file (os.pwrite / os.preadv);
- swap_schedule: a pure function from the swap items graph.compile built to per-step events;
- Swapper: one background thread that executes the events in order while the trainer computes.

The file is unlinked as soon as it is opened, so it disappears on normal exit, on an exception,
on Ctrl-C and even when the process is killed.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)


class SwapError(OSError):
    """The swap file could not be written or read back (disk full, I/O error)."""


class SwapFile:
    def __init__(self, size: int, directory: str | None = None) -> None:
        directory = directory or tempfile.gettempdir()
        os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="fedpers-swap-", suffix=".bin", dir=directory)
        os.unlink(path)
        self.fd, self.path, self.size = fd, path, size

    def write(self, data: np.ndarray, offset: int) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            n = os.pwrite(self.fd, mv[done:], offset + done)
            if n <= 0:
                raise SwapError(f"short write to swap file at {offset + done}")
            done += n

    def read(self, out: np.ndarray, offset: int) -> None:
        mv = memoryview(out).cast("B")
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise SwapError(f"swap file ended at {offset + done}, expected {len(mv) - done} more bytes")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SwapWindow(NamedTuple):
    """The steps around one buffer's time out of the arena (graph._lifespans decides them)."""

    last_forward: int  # write it out after this step
    free_at: int  # the forward segment's bytes are reused from this step on
    load_at: int  # read it back before this step
    first_backward: int  # it must be back before this step


@dataclass(frozen=True)
class SwapItem:
    """One swapped buffer: where it lives before and after, where in the file, and its window's
    steps (the same four fields as a SwapWindow). graph.compile builds them; tests may by hand."""

    nbytes: int
    out_offset: int  # arena offset of the forward segment
    in_offset: int  # arena offset of the backward segment
    file_offset: int
    last_forward: int  # write it out after this step
    free_at: int  # the forward segment's bytes are reused from this step on
    load_at: int  # read it back before this step
    first_backward: int  # it must be back before this step


@dataclass
class Schedule:
    """Events by step: before(t) waits/submits, after(t) submits write-outs."""

    items: list[SwapItem]
    write_after: dict[int, list[int]] = field(default_factory=dict)
    write_done_before: dict[int, list[int]] = field(default_factory=dict)
    load_before: dict[int, list[int]] = field(default_factory=dict)
    load_done_before: dict[int, list[int]] = field(default_factory=dict)
    file_size: int = 0


def swap_schedule(items: Sequence[SwapItem]) -> Schedule:
    """Index the items by the steps at which something must happen (pure; tested on its own)."""
    s = Schedule(list(items))
    for i, it in enumerate(items):
        if not it.last_forward < it.free_at <= it.load_at < it.first_backward:
            raise ValueError(f"swap item {i} has steps out of order: {it}")
        s.write_after.setdefault(it.last_forward, []).append(i)
        s.write_done_before.setdefault(it.free_at, []).append(i)
        s.load_before.setdefault(it.load_at, []).append(i)
        s.load_done_before.setdefault(it.first_backward, []).append(i)
        s.file_size = max(s.file_size, it.file_offset + it.nbytes)
    return s


class Swapper:
    """Runs a Schedule against an arena buffer with one I/O thread (FIFO, so a read never passes
    the write of the same bytes). The trainer calls before(t) and after(t) around every step t."""

    IDLE, WRITING, WRITTEN, LOADING, LOADED = range(5)

    def __init__(self, schedule: Schedule, buffer: np.ndarray, directory: str | None = None) -> None:
        self.schedule = schedule
        self.buffer = buffer
        self.file = SwapFile(schedule.file_size, directory)
        self.state = [self.IDLE] * len(schedule.items)
        self.done = [threading.Event() for _ in schedule.items]
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.bytes_out = self.bytes_in = 0
        self.wait_seconds = 0.0
        self.thread = threading.Thread(target=self._work, name="fedpers-swap", daemon=True)
        self.thread.start()
        self._before = -1
        self._after = -1

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            op, i = job
            it = self.schedule.items[i]
            try:
                if self.error is None:
                    if op == "out":
                        self.file.write(self.buffer[it.out_offset : it.out_offset + it.nbytes], it.file_offset)
                        self.bytes_out += it.nbytes
                    else:
                        self.file.read(self.buffer[it.in_offset : it.in_offset + it.nbytes], it.file_offset)
                        self.bytes_in += it.nbytes
            except BaseException as e:  # surfaced to the trainer at its next wait
                self.error = e
            finally:
                self.state[i] = self.WRITTEN if op == "out" else self.LOADED
                self.done[i].set()

    def _submit(self, op: str, ids: list[int]) -> None:
        for i in ids:
            self.done[i].clear()
            self.state[i] = self.WRITING if op == "out" else self.LOADING
            self.jobs.put((op, i))

    def _wait(self, ids: list[int]) -> None:
        for i in ids:
            if not self.done[i].is_set():
                t0 = time.perf_counter()
                self.done[i].wait()
                self.wait_seconds += time.perf_counter() - t0
        if self.error is not None:
            raise SwapError(f"swap I/O failed: {self.error}") from self.error

    def start_iteration(self) -> None:
        self._before = self._after = -1

    def before(self, step: int) -> None:
        """Make every buffer that step `step` touches present, and start loads that are due."""
        s = self.schedule
        for t in range(self._before + 1, step + 1):
            self.after(t - 1)
            self._wait(s.write_done_before.get(t, []))
            self._submit("in", s.load_before.get(t, []))
            self._wait(s.load_done_before.get(t, []))
        self._before = max(self._before, step)

    def after(self, step: int) -> None:
        """Start writing out buffers whose last forward use was `step`."""
        for t in range(self._after + 1, step + 1):
            self._submit("out", self.schedule.write_after.get(t, []))
        self._after = max(self._after, step)

    def finish_iteration(self) -> None:
        """Wait for all outstanding I/O (so the next iteration starts from a quiet arena)."""
        self._wait(list(range(len(self.schedule.items))))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)
        self.file.close()
