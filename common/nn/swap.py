"""Proactive swapping of saved activations -- and, in swap-all mode, of weights, gradient
accumulators and optimizer state outside the lookahead window -- in three parts (as NNTrainer
splits it):

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

    def __del__(self) -> None:  # an unlinked file's space is freed when its last descriptor closes
        if getattr(self, "fd", -1) >= 0:
            self.close()


class SwapWindow(NamedTuple):
    """The steps around one buffer's time out of the arena (graph._lifespans decides them)."""

    last_forward: int  # write it out after this step
    free_at: int  # the forward segment's bytes are reused from this step on
    load_at: int  # read it back before this step
    first_backward: int  # it must be back before this step


PHASES = ("always", "not_first", "apply")  # when a load runs / a mark applies, by micro-iteration


@dataclass(frozen=True)
class SwapItem:
    """One swap window: where the bytes live before and after, where in the file, and its steps
    (the four fields of a SwapWindow). graph.compile builds them; tests may by hand.

    Activations (slot -1) are written out after their last forward step and read back before their
    first backward step of the same iteration. A persistent tensor (weights, statistics, gradient
    accumulators, optimizer state, anchors) has a slot: its windows go round the iteration (`cycle`
    steps, so a window may wrap from one iteration into the next), it is written out only when a
    Mark made it dirty since its last write, and it is read back only when `load_when` holds for
    the micro-iteration of its next use (a gradient accumulator is overwritten by the first
    micro-batch; optimizer state is used only when the optimizer runs)."""

    nbytes: int
    out_offset: int  # arena offset of the segment before the window
    in_offset: int  # arena offset of the segment after it
    file_offset: int
    last_forward: int  # write it out after this step (its last touch before the window)
    free_at: int  # the segment's bytes are reused from this step on
    load_at: int  # read it back before this step
    first_backward: int  # it must be back before this step (its next touch)
    slot: int = -1  # persistent tensor: its dirty flag; -1: an activation (always written)
    load_when: str = "always"  # PHASES
    cycle: int = 0  # steps per iteration for a persistent window (steps taken modulo it); 0: linear


@dataclass(frozen=True)
class Mark:
    """A step that writes a persistent tensor (so its next write-out must happen) or spends it (so
    it need not), in the micro-iterations `when` says."""

    slot: int
    step: int
    when: str = "always"  # PHASES
    dirty: bool = True


@dataclass(frozen=True)
class Resident:
    """One arena segment of a persistent tensor: the steps [first, last] (first > last: it spans
    the end of an iteration, so it is in the arena between iterations, read in before a fit and
    written back after it)."""

    slot: int
    offset: int  # arena
    file_offset: int
    nbytes: int
    first: int = 0
    last: int = -1  # with the defaults: a segment that spans the iteration's end
    boundary: bool = True  # in the arena across the iteration boundary: read in before a fit

    @property
    def wraps(self) -> bool:
        return self.first > self.last

    def covers(self, step: int) -> bool:
        return (step >= self.first or step <= self.last) if self.wraps else self.first <= step <= self.last


@dataclass
class Schedule:
    """Events by step: before(t) applies marks, waits and submits loads, after(t) submits write-outs."""

    items: list[SwapItem]
    write_after: dict[int, list[int]] = field(default_factory=dict)
    write_done_before: dict[int, list[int]] = field(default_factory=dict)
    load_before: dict[int, list[int]] = field(default_factory=dict)
    load_done_before: dict[int, list[int]] = field(default_factory=dict)
    marks: dict[int, list[Mark]] = field(default_factory=dict)
    segments: list[Resident] = field(default_factory=list)  # every persistent segment

    @property
    def resident(self) -> list[Resident]:
        """The segments in the arena between iterations."""
        return [r for r in self.segments if r.boundary]
    slots: int = 0
    file_size: int = 0


def _in_order(it: SwapItem) -> bool:
    if not it.cycle:
        return it.last_forward < it.free_at <= it.load_at < it.first_backward
    c = it.cycle
    steps = (it.last_forward, it.free_at, it.load_at, it.first_backward)
    if any(not 0 <= t < c for t in steps):
        return False
    d = [(steps[k + 1] - steps[k]) % c for k in range(3)]  # going round the iteration, in order
    return d[0] >= 1 and d[2] >= 1 and sum(d) <= c  # == c: the next touch is the same step, an iteration on


def swap_schedule(items: Sequence[SwapItem], marks: Sequence[Mark] = (),
                  segments: Sequence[Resident] = ()) -> Schedule:
    """Index the items by the steps at which something must happen (pure; tested on its own)."""
    s = Schedule(list(items), segments=list(segments))
    for i, it in enumerate(items):
        if not _in_order(it) or it.load_when not in PHASES:
            raise ValueError(f"swap item {i} has steps out of order: {it}")
        s.write_after.setdefault(it.last_forward, []).append(i)
        s.write_done_before.setdefault(it.free_at, []).append(i)
        s.load_before.setdefault(it.load_at, []).append(i)
        s.load_done_before.setdefault(it.first_backward, []).append(i)
        s.file_size = max(s.file_size, it.file_offset + it.nbytes)
        s.slots = max(s.slots, it.slot + 1)
    for m in marks:
        if m.when not in PHASES:
            raise ValueError(f"mark {m} has an unknown phase")
        s.marks.setdefault(m.step, []).append(m)
        s.slots = max(s.slots, m.slot + 1)
    for r in segments:
        s.file_size = max(s.file_size, r.file_offset + r.nbytes)
        s.slots = max(s.slots, r.slot + 1)
    return s


class Swapper:
    """Runs a Schedule against an arena buffer with one I/O thread (FIFO, so a read never passes
    the write of the same bytes). The trainer calls before(t) and after(t) around every step t,
    start_iteration() before each (micro-)iteration and finish_iteration() after it.

    `file` is a SwapFile the caller keeps (a trainer whose persistent tensors live in it between
    fits); without one the swapper opens its own and closes it."""

    IDLE, WRITING, WRITTEN, LOADING, LOADED = range(5)

    def __init__(self, schedule: Schedule, buffer: np.ndarray, directory: str | None = None,
                 file: SwapFile | None = None) -> None:
        self.schedule = schedule
        self.buffer = buffer
        self._own_file = file is None
        self.file = file if file is not None else SwapFile(schedule.file_size, directory)
        self.state = [self.IDLE] * len(schedule.items)
        self.done = [threading.Event() for _ in schedule.items]
        for e in self.done:
            e.set()  # nothing in flight yet
        self.dirty = [False] * schedule.slots
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.bytes_out = self.bytes_in = 0
        self.wait_seconds = 0.0
        self.thread = threading.Thread(target=self._work, name="fedpers-swap", daemon=True)
        self.thread.start()
        self._before = -1
        self._after = -1
        self._first = self._apply = True

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

    def _holds(self, when: str) -> bool:
        return when == "always" or (when == "apply" and self._apply) or (when == "not_first" and not self._first)

    def _submit(self, op: str, ids: list[int]) -> None:
        items = self.schedule.items
        for i in ids:
            it = items[i]
            if op == "out" and it.slot >= 0:
                if not self.dirty[it.slot]:
                    continue  # the file holds its value: drop the bytes, nothing to write
                self.dirty[it.slot] = False
            if op == "in" and not self._holds(it.load_when):
                continue  # this micro-iteration does not use it
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

    def start_iteration(self, first: bool = True, apply: bool = True) -> None:
        """A new (micro-)iteration: `first` of its batch, `apply`: the optimizer runs at its end."""
        self._before = self._after = -1
        self._first, self._apply = first, apply

    def before(self, step: int) -> None:
        """Make every buffer that step `step` touches present, and start loads that are due."""
        s = self.schedule
        for t in range(self._before + 1, step + 1):
            self.after(t - 1)
            for m in s.marks.get(t, ()):
                if self._holds(m.when):
                    self.dirty[m.slot] = m.dirty
            self._wait(s.write_done_before.get(t, []))
            self._submit("in", s.load_before.get(t, []))
            self._wait(s.load_done_before.get(t, []))
        self._before = max(self._before, step)

    def after(self, step: int) -> None:
        """Start writing out buffers whose last touch before a window was `step`."""
        for t in range(self._after + 1, step + 1):
            self._submit("out", self.schedule.write_after.get(t, []))
        self._after = max(self._after, step)

    def finish_iteration(self) -> None:
        """Wait for all outstanding I/O (so the next iteration starts from a quiet arena)."""
        self._wait(list(range(len(self.schedule.items))))

    def prime(self) -> None:
        """Before a fit: read in the persistent tensors that are in the arena between iterations."""
        for r in self.schedule.resident:
            self.file.read(self.buffer[r.offset : r.offset + r.nbytes], r.file_offset)
            self.bytes_in += r.nbytes
            self.dirty[r.slot] = False

    def flush(self) -> None:
        """After a fit -- or a step that failed --: write back every persistent tensor changed since
        its last write-out, from the segment that holds it at the last step prepared; the file then
        holds every persistent tensor this schedule swaps."""
        self.finish_iteration()
        step = self._before
        for slot in (i for i, d in enumerate(self.dirty) if d):
            seg = next((r for r in self.schedule.segments if r.slot == slot and r.covers(step)), None)
            if seg is None:
                raise SwapError(f"persistent swap slot {slot} changed but has no segment at step {step}")
            self.file.write(self.buffer[seg.offset : seg.offset + seg.nbytes], seg.file_offset)
            self.bytes_out += seg.nbytes
            self.dirty[slot] = False

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)
        if self._own_file:
            self.file.close()
