"""The ``icecache`` policy: semantic pages from the M-DCI index, selected by beam search."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from icecache_ray.config import IndexConfig
from icecache_ray.index.mdci import MDCIIndex
from icecache_ray.policies.base import Selection


class IndexStore:
    """An :class:`MDCIIndex` behind the store interface (pages live in the given pool)."""

    def __init__(self, pool, config: IndexConfig, head_dim: int) -> None:
        self.index = MDCIIndex(pool, config, head_dim)

    @property
    def n_tokens(self) -> int:
        return self.index.n_tokens

    def insert(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        return self.index.insert(keys, values).dirty_pages

    def metadata_bytes(self) -> int:
        return self.index.metadata_bytes()

    def select_pages(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode hot path: (index pages, pool pages, valid rows) of the top-k pages for
        queries [H, d] (contiguous float32); see ``MDCIIndex.select_fast``."""
        return self.index.select_fast(queries, k)

    def tokens_of(self, pages: np.ndarray) -> np.ndarray:
        """Middle-token ids held by index pages [k] (for layer reuse)."""
        tokens = self.index.table.page_tokens[pages]
        return tokens[tokens >= 0].astype(np.int64)

    def rows(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V rows [n, d] of middle tokens ``tokens`` [n], read from the pool."""
        page, slot = self.index.token_locations(tokens)
        rows = self.index.table.pool.pages[self.index.table.page_pool[page], :, slot]  # [n, 2, d]
        return rows[:, 0], rows[:, 1]

    def release(self) -> None:
        self.index.release()


@dataclass(frozen=True)
class IceCachePolicy:
    """M-DCI pages; ``pool`` is the host page pool the pages live in (one per node)."""

    head_dim: int
    pool: object
    index: IndexConfig = field(default_factory=IndexConfig)
    name: str = "icecache"

    def build(self, keys: np.ndarray, values: np.ndarray) -> IndexStore:
        store = IndexStore(self.pool, self.index, self.head_dim)
        if len(keys):
            store.index.build(keys, values)
        return store

    def select(self, store: IndexStore, queries: np.ndarray, n_pages: int, context_logits=None) -> Selection:
        if store.n_tokens == 0:
            return Selection.empty()
        result = store.index.query(queries, n_pages)
        tokens = store.index.table.page_tokens[result.pages]
        return Selection(result.pages.astype(np.int64), result.counts.astype(np.int64), tokens[tokens >= 0].astype(np.int64))
