"""Which host page sits in which device slot, per (row, KV head) of one layer (NumPy only).

The selection of a step is diffed against what the slots already hold: pages still wanted keep
their slot, missing (or dirty) pages are assigned the freed slots, and only those are copied. Slot
order does not matter to attention (keys are post-RoPE and every slot carries its valid-row count).
"""

from __future__ import annotations

import numpy as np

from icecache_ray.kernels import mdci as K


class SlotTable:
    """``slot_page[row, h, s]``: pool page held by slot s (-1 = none); ``slot_count``: its valid rows."""

    def __init__(self, batch: int, heads: int, n_slots: int, page_size: int) -> None:
        self.slot_page = np.full((batch, heads, n_slots), -1, np.int64)
        self.slot_count = np.zeros((batch, heads, n_slots), np.int64)
        self.page_size = page_size

    @property
    def n_slots(self) -> int:
        return self.slot_page.shape[2]

    def invalidate(self, b: int, h: int, pool_pages: np.ndarray) -> None:
        """Forget slots whose host page changed (rows appended or split): they reload when chosen."""
        if len(pool_pages):
            stale = np.isin(self.slot_page[b, h], pool_pages)
            self.slot_page[b, h, stale] = -1
            self.slot_count[b, h, stale] = 0

    def plan(self, b: int, h: int, pool_pages: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Make exactly ``pool_pages`` [k <= n_slots] (distinct) resident with valid rows ``counts``.

        Returns (pages to copy [m], their target slots [m]); every other slot ends with count 0.
        (The numba kernel ``plan_slots``; :meth:`plan_ref` is its readable twin.)
        """
        return K.plan_slots(self.slot_page[b, h], self.slot_count[b, h], pool_pages.astype(np.int64), counts.astype(np.int64))

    def plan_ref(self, b: int, h: int, pool_pages: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference implementation of :meth:`plan` (NumPy)."""
        held = self.slot_page[b, h]
        keep = np.isin(held, pool_pages)
        missing = ~np.isin(pool_pages, held[keep])
        free = np.flatnonzero(~keep)[: int(missing.sum())]
        held[~keep] = -1
        held[free] = pool_pages[missing]
        slot_of = {int(p): s for s, p in enumerate(held) if p >= 0}
        count = self.slot_count[b, h]
        count[:] = 0
        for page, n in zip(pool_pages.tolist(), counts.tolist()):
            count[slot_of[page]] = n
        return pool_pages[missing], free

    def reset_row(self, row: int) -> None:
        """A new sequence takes ``row``: nothing of the previous one stays resident."""
        self.slot_page[row] = -1
        self.slot_count[row] = 0

    def plan_rows(self, rows: np.ndarray, picks) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`invalidate` + :meth:`plan` of every (row, head) of a
        :class:`~icecache_ray.ragged.PagePicks` over ``rows`` [n] (item i = (rows[i // H], i % H)) in
        one numba call. Returns (pages to copy [m], their rows [m], KV heads [m], slots [m])."""
        _, heads, n_slots = self.slot_page.shape
        if picks.reload_all:  # the pool was rebuilt: every row's slots are stale
            self.slot_page[:] = -1
            self.slot_count[:] = 0
        held, count = self.slot_page[rows].reshape(-1, n_slots), self.slot_count[rows].reshape(-1, n_slots)
        missing, slots, items = K.plan_slots_batch(held, count, picks.pages, picks.page_bounds, picks.counts, picks.dirty,
                                                   picks.dirty_bounds)
        self.slot_page[rows] = held.reshape(len(rows), heads, n_slots)
        self.slot_count[rows] = count.reshape(len(rows), heads, n_slots)
        return missing, rows[items // heads], items % heads, slots

    def valid_rows(self, rows: np.ndarray) -> np.ndarray:
        """[n, H, n_slots * page_size] bool: :meth:`token_valid` of every head of ``rows``."""
        count = self.slot_count[rows]
        return (np.arange(self.page_size) < count[..., None]).reshape(len(rows), count.shape[1], -1)

    def token_valid(self, b: int, h: int) -> np.ndarray:
        """[n_slots * page_size] bool: which rows of the slot region hold valid tokens."""
        offsets = np.arange(self.page_size)
        return (offsets[None, :] < self.slot_count[b, h][:, None]).reshape(-1)
