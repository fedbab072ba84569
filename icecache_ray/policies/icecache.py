"""The ``icecache`` policy: semantic pages from the M-DCI index, selected by beam search."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from icecache_ray.config import IndexConfig
from icecache_ray.index.mdci import MDCIIndex
from icecache_ray.index.storage import check_queries
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

    def select_pages(self, queries: np.ndarray, k: int, n_tokens: int = 0) -> tuple:
        """Decode hot path for queries [H, d] (contiguous float32): (index pages, pool pages, valid
        rows) of the top-k pages, then (index pages, rows) of up to ``n_tokens`` single tokens
        from the other candidates; see ``MDCIIndex.select_fast``."""
        return self.index.select_fast(queries, k, n_tokens)

    def tokens_of(self, pages: np.ndarray, token_pages: np.ndarray | None = None, token_rows: np.ndarray | None = None) -> np.ndarray:
        """Middle-token ids held by index pages [k], then those of single tokens (index page, row) [t]."""
        tokens = self.index.table.page_tokens[pages]
        tokens = tokens[tokens >= 0].astype(np.int64)
        if token_pages is not None and len(token_pages):
            tokens = np.concatenate([tokens, self.index.table.page_tokens[token_pages, token_rows].astype(np.int64)])
        return tokens

    @property
    def n_pages(self) -> int:
        return self.index.n_pages

    def page_counts(self, pages: np.ndarray) -> np.ndarray:
        """Valid rows [n] of index pages [n]."""
        return self.index.table.page_count[pages]

    def pool_pages(self, pages: np.ndarray) -> np.ndarray:
        """Pool page ids [n] of index pages [n]."""
        return self.index.table.page_pool[pages]

    def locations(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where middle tokens [n] live: (pool pages [n], rows in page [n])."""
        page, slot = self.index.token_locations(tokens)
        return self.pool_pages(page), slot

    def rows(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V rows [n, d] of middle tokens ``tokens`` [n], read from the pool."""
        kv = self.index.table.pool.read_rows(*self.locations(tokens))  # [n, 2, d]
        return kv[:, 0], kv[:, 1]

    def release(self) -> None:
        self.index.release()


@dataclass(frozen=True)
class IceCachePolicy:
    """M-DCI pages; ``pool`` is the host page pool the pages live in (one per node)."""

    head_dim: int
    pool: object
    index: IndexConfig = field(default_factory=IndexConfig)
    token_pages: int = 0  # IceCacheConfig.token_pages: retrieved slots filled with single tokens
    name: str = "icecache"

    def split(self, n_slots: int) -> tuple[int, int]:
        """(whole pages, single tokens) that fill ``n_slots`` retrieved page slots."""
        pages = max(1, n_slots - self.token_pages)
        return pages, (n_slots - pages) * self.pool.layout.page_size

    def build(self, keys: np.ndarray, values: np.ndarray) -> IndexStore:
        store = IndexStore(self.pool, self.index, self.head_dim)
        if len(keys):
            store.index.build(keys, values)
        return store

    def select(self, store: IndexStore, queries: np.ndarray, n_pages: int, context_logits=None) -> Selection:
        if store.n_tokens == 0:
            return Selection.empty()
        qs = check_queries(queries, self.head_dim)  # the hot path below does not re-validate
        pages, _, counts, token_pages, token_rows = store.select_pages(qs, *self.split(n_pages))
        tokens = store.tokens_of(pages, token_pages, token_rows)
        return Selection(pages.astype(np.int64), counts.astype(np.int64), tokens)
