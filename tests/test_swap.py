"""The swap schedule on its own (no threads), and the swapper against a real file."""

import numpy as np
import pytest
from fedpers.nn.swap import SwapItem, Swapper, swap_schedule


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
    assert list(tmp_path.iterdir()) == []


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
