"""The swap schedule on its own (no threads), and the swapper against a real file."""

import numpy as np
import pytest
from fedpers.nn.graph import compile
from fedpers.nn.swap import Mark, Resident, SwapFile, SwapItem, Swapper, swap_schedule

from tests import nets
from tests.probes import open_files_under


def item(last_forward, free_at, load_at, first_backward, nbytes=64, out_off=0, in_off=64, file_off=0):
    return SwapItem(nbytes, out_off, in_off, file_off, last_forward, free_at, load_at, first_backward)


def test_schedule_indexes_events_by_step():
    s = swap_schedule([item(1, 3, 7, 9), item(2, 4, 6, 8, file_off=64)])
    assert s.write_after == {1: [0], 2: [1]}
    assert s.write_done_before == {3: [0], 4: [1]}
    assert s.load_before == {7: [0], 6: [1]}
    assert s.load_done_before == {9: [0], 8: [1]}
    assert s.file_size == 128


def test_schedule_refuses_out_of_order_steps():
    with pytest.raises(ValueError, match="out of order"):
        swap_schedule([item(3, 3, 7, 9)])
    with pytest.raises(ValueError, match="out of order"):
        swap_schedule([item(1, 3, 9, 9)])


def test_swapper_moves_bytes_to_the_backward_segment(tmp_path):
    buf = np.zeros(256, np.uint8)
    buf[:64] = np.arange(64, dtype=np.uint8)
    sw = Swapper(swap_schedule([item(0, 2, 3, 5, out_off=0, in_off=128)]), buf, str(tmp_path))
    held = open_files_under(tmp_path)
    assert len(held) == 1 and held[0].endswith("(deleted)") and list(tmp_path.iterdir()) == []
    try:
        sw.start_iteration()
        for t in range(6):
            sw.before(t)
            if t == 2:
                buf[:64] = 255  # the forward segment is reused after it was written out
            sw.after(t)
        sw.finish_iteration()
        assert np.array_equal(buf[128:192], np.arange(64, dtype=np.uint8))
        assert sw.bytes_out == sw.bytes_in == 64
    finally:
        sw.close()
    assert open_files_under(tmp_path) == []  # close() released the only handle: the file is gone


def test_skipped_step_numbers_still_fire_their_events(tmp_path):
    buf = np.zeros(256, np.uint8)
    buf[:64] = 7
    sw = Swapper(swap_schedule([item(0, 2, 3, 5, out_off=0, in_off=128)]), buf, str(tmp_path))
    try:
        sw.start_iteration()
        sw.before(0)
        sw.after(0)
        sw.before(5)  # steps 1..4 had nothing to run
        assert np.all(buf[128:192] == 7)
    finally:
        sw.close()


@pytest.mark.parametrize("lookahead", [1, 3])
def test_compiled_swap_items_are_the_groups_windows(lookahead):
    """graph.compile builds the items: written after the last forward use, bytes reused from the
    step after the write-out, read back `lookahead` steps before the first backward use; the
    arena segments are exactly the steps outside that window; file offsets are packed."""
    c = compile(nets.cnn(batch_norm=False), 16, mode="swap", lookahead=lookahead, allocate=False)
    swapped = [g for g in c.groups if g.swapped]
    assert len(c.swap_items) == len(swapped) > 0
    n_fwd, file_offset = len(c.nodes), 0
    for it, g in zip(c.swap_items, swapped, strict=True):
        out_seg, in_seg = g.segments
        assert (it.nbytes, it.out_offset, it.in_offset) == (g.nbytes, out_seg.offset, in_seg.offset)
        assert it.file_offset == file_offset
        file_offset += g.nbytes
        assert it.last_forward == max(t for t in g.touches if t < n_fwd)
        assert it.first_backward == min(t for t in g.touches if t >= n_fwd)
        assert it.free_at == it.last_forward + 2 and it.load_at == it.first_backward - lookahead
        assert (out_seg.last, in_seg.first) == (it.free_at - 1, it.load_at)
    assert swap_schedule(c.swap_items).file_size == file_offset
    assert compile(nets.cnn(batch_norm=False), 16, mode="planned", allocate=False).swap_items == []


def persistent(last, free_at, load_at, need, cycle=10, nbytes=64, out_off=0, in_off=64, slot=0, load_when="always"):
    return SwapItem(nbytes, out_off, in_off, 0, last, free_at, load_at, need, slot=slot, load_when=load_when,
                    cycle=cycle)


def test_persistent_windows_go_round_the_iteration():
    """A window may wrap into the next iteration (steps modulo `cycle`); its steps must still come in
    order going round, and at most one iteration apart."""
    s = swap_schedule([persistent(8, 0, 3, 5), persistent(2, 4, 7, 9)], [Mark(0, 8, "apply")])
    assert s.write_after == {8: [0], 2: [1]} and s.load_before == {3: [0], 7: [1]}
    assert [m.step for m in s.marks[8]] == [8] and s.slots == 1
    assert swap_schedule([persistent(4, 6, 2, 4)]).items  # one touch: the next is itself, a cycle on
    with pytest.raises(ValueError, match="out of order"):
        swap_schedule([persistent(8, 9, 3, 2)])  # needed before it is loaded
    with pytest.raises(ValueError, match="out of order"):
        swap_schedule([persistent(8, 0, 3, 10)])  # step outside the iteration


def test_persistent_tensor_is_written_only_when_dirty_and_restored_bit_exactly(tmp_path):
    """Weights: touched at step 1 (read) and 6 (apply, which dirties them); out between 1 and 6 and
    between 6 and the next iteration's 1. Clean windows drop the bytes without writing; the
    values come back bit for bit."""
    buf = np.zeros(256, np.uint8)
    items = [persistent(1, 2, 4, 6, out_off=0, in_off=64), persistent(6, 8, 9, 1, out_off=64, in_off=0)]
    segs = [Resident(0, 0, 0, 64, 9, 1), Resident(0, 64, 0, 64, 4, 7, boundary=False)]
    sched = swap_schedule(items, [Mark(0, 6, "apply")], segs)
    assert [r.offset for r in sched.resident] == [0]
    values = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8)
    file = SwapFile(64, str(tmp_path))
    file.write(values, 0)
    sw = Swapper(sched, buf, file=file)
    try:
        sw.prime()  # in the arena across the iteration boundary
        assert np.array_equal(buf[:64], values)
        for it in range(3):
            sw.start_iteration(first=True, apply=it != 1)
            for t in range(10):
                sw.before(t)
                if t == 3:
                    buf[:64] = 0  # bytes reused while it is out
                if t == 6 and it != 1:
                    buf[64:128] += 1  # the optimizer step
                    values = values + np.uint8(1)
                if t in (1, 6):
                    assert np.array_equal(buf[(t == 6) * 64 : (t == 6) * 64 + 64], values), (it, t)
                sw.after(t)
            sw.finish_iteration()
        sw.flush()
        back = np.empty(64, np.uint8)
        file.read(back, 0)
        assert np.array_equal(back, values)
        assert sw.bytes_out == 2 * 64  # written only after the two iterations that applied
    finally:
        sw.close()
        file.close()
    assert open_files_under(tmp_path) == []


def test_loads_skip_the_micro_iterations_that_do_not_use_them(tmp_path):
    buf = np.zeros(128, np.uint8)
    sched = swap_schedule([persistent(6, 8, 3, 6, load_when="apply", out_off=0, in_off=0)],
                          [Mark(0, 6, "apply")], [Resident(0, 0, 0, 64, 3, 7, boundary=False)])
    file = SwapFile(64, str(tmp_path))
    file.write(np.ones(64, np.uint8), 0)
    sw = Swapper(sched, buf, file=file)
    try:
        for apply, expect_in in ((False, 0), (True, 64)):
            sw.bytes_in = 0
            sw.start_iteration(first=True, apply=apply)
            sw.before(9)
            sw.after(9)
            sw.finish_iteration()
            assert sw.bytes_in == expect_in
    finally:
        sw.close()
        file.close()
