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

    def reset_row(self, row: int) -> None:
        """A new sequence takes ``row``: nothing of the previous one stays resident."""
        self.slot_page[row] = -1
        self.slot_count[row] = 0

    def plan_rows(self, rows: np.ndarray, picks) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Forget each item's dirty pages, then make exactly its pages resident (kept pages keep their
        slot, missing ones take the freed slots in order), for every (row, head) of a
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
        """[n, H, n_slots * page_size] bool: which rows of each slot region hold valid tokens."""
        count = self.slot_count[rows]
        return (np.arange(self.page_size) < count[..., None]).reshape(len(rows), count.shape[1], -1)
