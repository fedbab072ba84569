"""Policies that keep middle tokens in token order: ``quest``, ``oracle``, ``streaming``, ``full``.

The dense store keeps the middle keys in a growable float32 array (host memory); it is what the
baselines need and what the oracles scan exhaustively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from icecache_ray.index.select import merge_group
from icecache_ray.index.storage import check_keys, check_queries
from icecache_ray.policies.base import Selection, log_softmax_rows, tokens_of_sequential_pages


class DenseStore:
    """Middle keys/values in token order, plus per-page element-wise key min/max (for Quest)."""

    def __init__(self, head_dim: int, page_size: int) -> None:
        self.head_dim = head_dim
        self.page_size = page_size
        self.keys = np.zeros((0, head_dim), np.float32)
        self.values = np.zeros((0, head_dim), np.float32)
        self.page_min = np.zeros((0, head_dim), np.float32)
        self.page_max = np.zeros((0, head_dim), np.float32)

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[0]

    @property
    def n_pages(self) -> int:
        return -(-self.n_tokens // self.page_size)

    def insert(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Append rows [n, d]; returns the token-order pages that changed."""
        keys, values = check_keys(keys, values, self.head_dim)
        first_dirty = self.n_tokens // self.page_size
        self.keys = np.vstack([self.keys, keys])
        self.values = np.vstack([self.values, values])
        self._refresh_bounds(first_dirty)
        return np.arange(first_dirty, self.n_pages, dtype=np.int32)

    def _refresh_bounds(self, first_page: int) -> None:
        n_pages = self.n_pages
        lo = np.empty((n_pages - first_page, self.head_dim), np.float32)
        hi = np.empty_like(lo)
        for i, p in enumerate(range(first_page, n_pages)):
            rows = self.keys[p * self.page_size : (p + 1) * self.page_size]
            lo[i], hi[i] = rows.min(axis=0), rows.max(axis=0)
        self.page_min = np.vstack([self.page_min[:first_page], lo])
        self.page_max = np.vstack([self.page_max[:first_page], hi])

    def metadata_bytes(self) -> int:
        return self.page_min.nbytes + self.page_max.nbytes

    def rows(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V rows [n, d] of middle tokens ``tokens`` [n]."""
        return self.keys[tokens], self.values[tokens]

    def release(self) -> None:
        self.__init__(self.head_dim, self.page_size)


def _sequential_selection(pages: np.ndarray, store: DenseStore) -> Selection:
    pages = np.asarray(pages, np.int64)
    counts = np.minimum(store.page_size, store.n_tokens - pages * store.page_size)
    return Selection(pages, counts, tokens_of_sequential_pages(pages, store.page_size, store.n_tokens))


def _build(head_dim: int, page_size: int, keys: np.ndarray, values: np.ndarray) -> DenseStore:
    store = DenseStore(head_dim, page_size)
    if len(keys):
        store.insert(keys, values)
    return store


@dataclass(frozen=True)
class QuestPolicy:
    """Quest: token-order pages ranked by the upper bound sum_j max(q_j min_j, q_j max_j) per head;
    heads of a group are merged with ``gqa`` over per-head log-softmax-normalised bounds."""

    head_dim: int
    page_size: int = 16
    gqa: str = "sum"
    name: str = "quest"

    def build(self, keys: np.ndarray, values: np.ndarray) -> DenseStore:
        return _build(self.head_dim, self.page_size, keys, values)

    def select(self, store: DenseStore, queries: np.ndarray, n_pages: int, context_logits=None) -> Selection:
        qs = check_queries(queries, self.head_dim)
        if store.n_pages == 0:
            return Selection.empty()
        bound = np.maximum(qs[:, None, :] * store.page_min[None], qs[:, None, :] * store.page_max[None]).sum(axis=2)
        values = log_softmax_rows(bound / math.sqrt(self.head_dim))
        return _sequential_selection(np.sort(merge_group(values, n_pages, self.gqa)), store)


@dataclass(frozen=True)
class OraclePolicy:
    """Exact oracles (they read every middle key; upper bounds, not deployable).

    mode ``token``: the n_pages * page_size middle tokens with the largest attention mass averaged
    over the group's query heads (token-granular upper bound); ``seqpage``: the n_pages token-order
    pages with the largest such mass (the best possible sequential paging).
    """

    head_dim: int
    page_size: int = 16
    mode: str = "token"
    name: str = "oracle"

    def __post_init__(self) -> None:
        if self.mode not in ("token", "seqpage"):
            raise ValueError(f"OraclePolicy.mode={self.mode!r}: must be 'token' or 'seqpage'")

    def build(self, keys: np.ndarray, values: np.ndarray) -> DenseStore:
        return _build(self.head_dim, self.page_size, keys, values)

    def token_mass(self, store: DenseStore, queries: np.ndarray, context_logits=None) -> np.ndarray:
        """Mean over the group of each middle token's softmax probability. Returns [n_tokens]."""
        qs = check_queries(queries, self.head_dim)
        logits = (qs @ store.keys.T) / math.sqrt(self.head_dim)
        return np.exp(log_softmax_rows(logits, context_logits)).mean(axis=0)

    def select(self, store: DenseStore, queries: np.ndarray, n_pages: int, context_logits=None) -> Selection:
        if store.n_tokens == 0:
            return Selection.empty()
        mass = self.token_mass(store, queries, context_logits)
        if self.mode == "token":
            n = min(n_pages * self.page_size, store.n_tokens)
            tokens = np.sort(np.argpartition(-mass, n - 1)[:n]) if n < store.n_tokens else np.arange(store.n_tokens)
            return Selection(np.zeros(0, np.int64), np.zeros(0, np.int64), tokens.astype(np.int64))
        padded = np.zeros(store.n_pages * self.page_size)
        padded[: store.n_tokens] = mass
        page_mass = padded.reshape(store.n_pages, self.page_size).sum(axis=1)
        best = np.argsort(-page_mass, kind="stable")[: min(n_pages, store.n_pages)]
        return _sequential_selection(np.sort(best), store)


@dataclass(frozen=True)
class StreamingPolicy:
    """StreamingLLM: sink + window only; middle tokens are never attended."""

    head_dim: int
    page_size: int = 16
    name: str = "streaming"

    def build(self, keys: np.ndarray, values: np.ndarray) -> DenseStore:
        return _build(self.head_dim, self.page_size, keys, values)

    def select(self, store: DenseStore, queries: np.ndarray, n_pages: int, context_logits=None) -> Selection:
        check_queries(queries, self.head_dim)
        return Selection.empty()


@dataclass(frozen=True)
class FullPolicy:
    """Every middle token (dense attention; the budget is ignored)."""

    head_dim: int
    page_size: int = 16
    name: str = "full"

    def build(self, keys: np.ndarray, values: np.ndarray) -> DenseStore:
        return _build(self.head_dim, self.page_size, keys, values)

    def select(self, store: DenseStore, queries: np.ndarray, n_pages: int, context_logits=None) -> Selection:
        check_queries(queries, self.head_dim)
        return _sequential_selection(np.arange(store.n_pages), store)
