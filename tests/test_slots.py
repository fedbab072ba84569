"""Slot bookkeeping: the numba plans (one item, a whole layer) equal the NumPy reference; window ring positions."""

import dataclasses

import numpy as np
import pytest

from icecache_ray.engine.slots import SlotTable
from icecache_ray.engine.window import WindowBook, window_start
from icecache_ray.ragged import PagePicks


def test_plan_kernel_matches_reference_over_random_steps():
    rng = np.random.default_rng(0)
    fast, ref = SlotTable(2, 3, 8, 16), SlotTable(2, 3, 8, 16)
    for _ in range(300):
        b, h = int(rng.integers(2)), int(rng.integers(3))
        k = int(rng.integers(0, 9))
        pages = rng.choice(20, size=k, replace=False).astype(np.int64)
        counts = rng.integers(1, 17, size=k)
        if rng.random() < 0.2:
            dirty = rng.choice(20, size=3, replace=False)
            fast.invalidate(b, h, dirty)
            ref.invalidate(b, h, dirty)
        got = fast.plan(b, h, pages, counts)
        want = ref.plan_ref(b, h, pages, counts)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(fast.slot_page, ref.slot_page)
        np.testing.assert_array_equal(fast.slot_count, ref.slot_count)
        held = fast.slot_page[b, h]
        assert sorted(held[held >= 0].tolist()) == sorted(pages.tolist())  # exactly the selection
        assert fast.token_valid(b, h).sum() == counts.sum()


def test_batched_plan_matches_per_item_reference():
    """plan_batch (one numba call per layer) = invalidate + plan_ref item by item, over many steps."""
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
        got = fast.plan_batch(picks)
        want = [[], [], [], []]
        for i, (p, c, d) in enumerate(zip(pages, counts, dirty)):
            ref.invalidate(i // heads, i % heads, d)
            missing, slots = ref.plan_ref(i // heads, i % heads, p, c)
            for part, values in zip(want, (missing, np.full(len(missing), i // heads), np.full(len(missing), i % heads), slots)):
                part.extend(values.tolist())
        for g, w in zip(got, want):
            assert g.tolist() == w
        np.testing.assert_array_equal(fast.slot_page, ref.slot_page)
        np.testing.assert_array_equal(fast.slot_count, ref.slot_count)
        assert fast.valid_rows().sum() == sum(int(c.sum()) for c in counts)


@pytest.mark.parametrize("length", [1, 5, 31, 32, 33, 100])
def test_window_ring_never_overwrites_a_live_token(length):
    """Decode 200 tokens one by one: every live position keeps its ring row until retired."""
    book = WindowBook([length], sink_tokens=32, window_pages=2, page_size=16)
    book.place(0, np.arange(int(book.win_start[0]), length))
    for _ in range(200):
        book.retire()
        pos = int(book.length[0])
        book.place(0, np.array([pos]))
        book.length += 1
        live = book.ring_pos[0][book.ring_pos[0] >= book.win_start[0]]
        assert sorted(live.tolist()) == list(range(int(book.win_start[0]), pos + 1))
        assert book.ring_valid(1)[0, 0].sum() == pos + 1 - book.win_start[0]
        book.leaving()
        assert window_start(pos + 1, 32, 2, 16) == book.offloaded_end[0] or book.offloaded_end[0] == book.win_start[0]
