"""The swap schedule on its own (no threads), and the swapper against a real file."""

import numpy as np
import pytest
from fedpers.nn.graph import compile
from fedpers.nn.swap import SwapItem, Swapper, swap_schedule

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
