"""The host side of one sparse layer: one policy store per (sequence, KV head), and the only place
that talks to them.

:class:`LocalStores` keeps the stores in this process and does building and insertion on the
runtime's background thread (one FIFO thread, so a query never races an insert). A distributed
backend implements the same methods with one request per index owner per call (the Ray runtime's
index actors), which is why every method covers the whole batch and all heads of the layer.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from icecache_ray.engine.runtime import SparseRuntime
from icecache_ray.ragged import PagePicks


class LocalStores:
    """Stores of one layer for a batch, in this process (see module docstring)."""

    def __init__(self, runtime: SparseRuntime) -> None:
        self.rt = runtime
        self.stores: list[list] | None = None  # [B][H], set by the background build
        self.pending: Future | None = None

    @property
    def pool(self):
        """Host pool the selected pages are read from."""
        return self.rt.pool

    # ------------------------------------------------------------------ background work
    def build(self, middles: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Start building from each sequence's middle K/V [H, m_b, d] (in the background)."""
        self.pending = self.rt.submit(self._build, middles)

    def _build(self, middles) -> None:
        self.stores = [[self.rt.policy.build(k[j], v[j]) for j in range(k.shape[0])] for k, v in middles]

    def insert(self, leaving: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Start appending each sequence's rows [H, m_b, d] (in the background)."""
        self.pending = self.rt.submit(self._insert, leaving)

    def _insert(self, leaving) -> list[list[np.ndarray]]:
        return [[self._inserted(s, k[j], v[j]) for j, s in enumerate(row)] for (k, v), row in zip(leaving, self.stores)]

    def _inserted(self, store, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        if not len(k):
            return np.zeros(0, np.int64)
        pages = store.insert(k, v)
        return store.index.table.page_pool[pages] if self.rt.uses_slots else pages

    def wait(self) -> list[list[np.ndarray]] | None:
        """Finish the background job; returns the pool pages each (b, h) insert changed, if any."""
        if self.pending is None:
            return None
        try:
            return self.pending.result()
        finally:
            self.pending = None

    # ------------------------------------------------------------------ queries
    def select_pages(self, host_q: np.ndarray, k: int, with_tokens: bool) -> tuple[PagePicks, list | None]:
        """icecache: top-k pages of every (b, h) for queries [B, H, g * n, d].

        Returns (the picks of the B * H items, tokens [B][H] or None); here changed pages come
        from :meth:`wait` instead, so the picks carry none."""
        pages, counts, tokens = [], [], [] if with_tokens else None
        for b, row in enumerate(self.stores):
            chosen = []
            for h, store in enumerate(row):
                index_pages, pool_pages, valid = store.select_pages(host_q[b, h], k)
                pages.append(pool_pages)
                counts.append(valid)
                if with_tokens:
                    chosen.append(store.tokens_of(index_pages))
            if with_tokens:
                tokens.append(chosen)
        return PagePicks.from_items(pages, counts), tokens

    def select_tokens(self, host_q: np.ndarray, k: int) -> list[list[np.ndarray]]:
        """Policies without an index: middle-token ids [B][H] of the chosen pages."""
        return [[self.rt.policy.select(s, host_q[b, h], k).tokens for h, s in enumerate(row)] for b, row in enumerate(self.stores)]

    def rows(self, b: int, h: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V [n, d] of middle tokens of (b, h)."""
        return self.stores[b][h].rows(tokens)

    # ------------------------------------------------------------------ accounting
    def stored_token_heads(self) -> int:
        return sum(s.n_tokens for row in self.stores or [] for s in row)

    def index_bytes(self) -> int:
        return sum(s.metadata_bytes() for row in self.stores or [] for s in row)

    def close(self) -> None:
        """Wait for background work and give the stores' host pages back."""
        try:
            self.wait()
        finally:
            for row in self.stores or []:
                for store in row:
                    store.release()
            self.stores = None
