"""RowWindows: ring placement of new tokens, row by row."""

import numpy as np
import pytest

from icecache_ray.engine.window import RowWindows


def test_place_next_of_several_rows_equals_placing_each_row_alone():
    many = RowWindows(3, 4, 2, 8)
    ones = [RowWindows(3, 4, 2, 8) for _ in range(3)]
    for r, n in enumerate((40, 7, 100)):
        many.begin_row(r, n)
        ones[r].begin_row(r, n)
    rows = np.arange(3)
    for _ in range(20):
        got = many.place_next(rows)
        want = [int(ones[r].place_next(np.array([r]))[0]) for r in range(3)]
        assert got.tolist() == want
        for r in range(3):
            np.testing.assert_array_equal(many.ring_pos[r], ones[r].ring_pos[r])
        many.leaving(rows)
        many.retire(rows)
        for r in range(3):
            ones[r].leaving(np.array([r]))
            ones[r].retire(np.array([r]))


def test_place_next_refuses_to_overwrite_live_rows():
    windows = RowWindows(1, 4, 2, 8)
    windows.begin_row(0, 40)
    row = np.array([0])
    for _ in range(8):
        windows.place_next(row)  # no leaving / retire: the window keeps every token
    before = windows.ring_pos.copy()
    with pytest.raises(RuntimeError, match="window ring overflow"):
        for _ in range(16):
            windows.place_next(row)
    assert (windows.ring_pos[0][windows.ring_pos[0] >= 0] >= windows.win_start[0]).all()
    assert before.shape == windows.ring_pos.shape
