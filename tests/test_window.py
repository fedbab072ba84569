"""WindowBook: ring placement of new tokens."""

import numpy as np
import pytest

from icecache_ray.engine.window import WindowBook


def test_place_next_equals_placing_each_sequence():
    one, many = WindowBook([40, 7, 100], 4, 2, 8), WindowBook([40, 7, 100], 4, 2, 8)
    for n in (1, 3, 8):
        rows = many.place_next(n)
        want = np.stack([one.place(b, one.length[b] + np.arange(n)) for b in range(3)])
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_array_equal(many.ring_pos, one.ring_pos)
        for book in (one, many):
            book.length += n
            book.leaving()
            book.retire()


def test_place_next_refuses_to_overwrite_live_rows():
    book = WindowBook([40], 4, 2, 8)
    book.place_next(8)
    before = book.ring_pos.copy()
    with pytest.raises(RuntimeError, match="window ring overflow"):
        book.place_next(8)  # the same positions again: their rows are still in the window
    np.testing.assert_array_equal(book.ring_pos, before)
