"""Slot bookkeeping: the numba plan of a whole layer equals the NumPy reference item by item; window ring positions."""

import dataclasses

import numpy as np
import pytest

from icecache_ray.engine.slots import SlotTable
from icecache_ray.engine.window import RowWindows, window_start
from icecache_ray.ragged import PagePicks


def _invalidate(table: SlotTable, b: int, h: int, pool_pages: np.ndarray) -> None:
    """Reference: forget slots whose host page changed."""
    if len(pool_pages):
        stale = np.isin(table.slot_page[b, h], pool_pages)
        table.slot_page[b, h, stale] = -1
        table.slot_count[b, h, stale] = 0


def _plan_reference(table: SlotTable, b: int, h: int, pool_pages: np.ndarray, counts: np.ndarray):
    """Reference of one item's plan (NumPy): (pages to copy, their slots)."""
    held = table.slot_page[b, h]
    keep = np.isin(held, pool_pages)
    missing = ~np.isin(pool_pages, held[keep])
    free = np.flatnonzero(~keep)[: int(missing.sum())]
    held[~keep] = -1
    held[free] = pool_pages[missing]
    slot_of = {int(p): s for s, p in enumerate(held) if p >= 0}
    count = table.slot_count[b, h]
    count[:] = 0
    for page, n in zip(pool_pages.tolist(), counts.tolist()):
        count[slot_of[page]] = n
    return pool_pages[missing], free


def test_batched_plan_matches_per_item_reference():
    """plan_rows (one numba call per layer) = the NumPy reference item by item, over many steps."""
    rng = np.random.default_rng(1)
    batch, heads = 3, 2
    fast, ref = SlotTable(batch, heads, 6, 16), SlotTable(batch, heads, 6, 16)
    for step in range(100):
        pages, counts, dirty = [], [], []
        for _ in range(batch * heads):
            k = int(rng.integers(0, 7))
            pages.append(rng.choice(15, size=k, replace=False).astype(np.int64))
            counts.append(rng.integers(1, 17, size=k))
            dirty.append(rng.choice(15, size=int(rng.integers(0, 3)), replace=False).astype(np.int64))
        picks = PagePicks.from_items(pages, counts, dirty)
        if step == 50:
            picks = dataclasses.replace(picks, reload_all=True)
            ref.slot_page[:], ref.slot_count[:] = -1, 0
        got = fast.plan_rows(np.arange(batch), picks)
        want = [[], [], [], []]
        for i, (p, c, d) in enumerate(zip(pages, counts, dirty)):
            _invalidate(ref, i // heads, i % heads, d)
            missing, slots = _plan_reference(ref, i // heads, i % heads, p, c)
            for part, values in zip(want, (missing, np.full(len(missing), i // heads), np.full(len(missing), i % heads), slots)):
                part.extend(values.tolist())
        for g, w in zip(got, want):
            assert g.tolist() == w
        np.testing.assert_array_equal(fast.slot_page, ref.slot_page)
        np.testing.assert_array_equal(fast.slot_count, ref.slot_count)
        assert fast.valid_rows(np.arange(batch)).sum() == sum(int(c.sum()) for c in counts)


def test_planning_a_subset_of_rows_leaves_the_others_alone():
    table = SlotTable(4, 2, 3, 16)
    table.slot_page[0], table.slot_page[3] = 7, 9
    picks = PagePicks.from_items([np.array([1, 2]), np.array([3]), np.array([4]), np.array([5, 6])],
                                 [np.array([16, 5]), np.array([2]), np.array([3]), np.array([1, 1])])
    pages, rows, heads, slots = table.plan_rows(np.array([1, 2]), picks)
    assert pages.tolist() == [1, 2, 3, 4, 5, 6] and rows.tolist() == [1, 1, 1, 2, 2, 2] and heads.tolist() == [0, 0, 1, 0, 1, 1]
    assert (table.slot_page[0] == 7).all() and (table.slot_page[3] == 9).all()
    assert table.valid_rows(np.array([1]))[0, 0].sum() == 21
    table.reset_row(1)
    assert (table.slot_page[1] == -1).all() and table.slot_count[1].sum() == 0


@pytest.mark.parametrize("length", [1, 5, 31, 32, 33, 100])
def test_window_ring_never_overwrites_a_live_token(length):
    """Decode 200 tokens one by one: every live position keeps its ring row until retired."""
    windows = RowWindows(3, sink_tokens=32, window_pages=2, page_size=16)
    windows.begin_row(1, length)
    row = np.array([1])
    for _ in range(200):
        windows.retire(row)
        pos = int(windows.length[1])
        windows.place_next(row)
        live = windows.ring_pos[1][windows.ring_pos[1] >= windows.win_start[1]]
        assert sorted(live.tolist()) == list(range(int(windows.win_start[1]), pos + 1))
        assert windows.ring_valid(row)[0].sum() == pos + 1 - windows.win_start[1]
        windows.leaving(row)
        assert window_start(pos + 1, 32, 2, 16) == windows.offloaded_end[1] or windows.offloaded_end[1] == windows.win_start[1]
    assert windows.length[[0, 2]].tolist() == [0, 0] and (windows.ring_pos[[0, 2]] == -1).all()  # other rows untouched
