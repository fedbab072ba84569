"""The selection-policy interface: small dataclass plugins over the offloaded ("middle") tokens.

For one (sequence, layer, KV head), the tokens that are neither sink nor window live in a policy
*store*. Tokens are numbered 0..n-1 in insertion (= position) order. A policy builds a store,
appends pages leaving the window to it, and, for the group's post-RoPE queries, returns the
middle tokens to attend (as pages of that store's own layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Selection:
    """What a policy picked for one KV head.

    pages: [k'] page ids in the store's layout, best first; counts: [k'] valid tokens each;
    tokens: [sum(counts)] middle-token ids of those pages (the attended middle tokens).
    """

    pages: np.ndarray
    counts: np.ndarray
    tokens: np.ndarray

    @staticmethod
    def empty() -> "Selection":
        z = np.zeros(0, np.int64)
        return Selection(z, z, z)


class Store(Protocol):
    """State a policy keeps for one (sequence, layer, KV head)."""

    n_tokens: int

    def insert(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Append rows [n, d]; returns the ids of pages whose contents changed."""
        ...

    def metadata_bytes(self) -> int: ...

    def release(self) -> None: ...


class SelectionPolicy(Protocol):
    """A page-selection policy plugin."""

    name: str

    def build(self, keys: np.ndarray, values: np.ndarray) -> Any:
        """A store over the first middle tokens: keys, values [n, d] (n may be 0)."""
        ...

    def select(self, store: Any, queries: np.ndarray, n_pages: int, context_logits: np.ndarray | None = None) -> Selection:
        """Pages to attend. queries: [H, d] post-RoPE queries of the KV head's group; n_pages:
        page slots available; context_logits: optional [H, n_ctx] scaled logits of the sink and
        window tokens (only oracles use them, to normalise per-head softmax exactly)."""
        ...


def sequential_page_tokens(n_tokens: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-order pages: (starts [n_pages], counts [n_pages]) covering tokens 0..n_tokens-1."""
    starts = np.arange(0, n_tokens, page_size, dtype=np.int64)
    counts = np.minimum(page_size, n_tokens - starts)
    return starts, counts


def tokens_of_sequential_pages(pages: np.ndarray, page_size: int, n_tokens: int) -> np.ndarray:
    """Middle-token ids of token-order pages. Returns [sum of counts] int64."""
    if len(pages) == 0:
        return np.zeros(0, np.int64)
    ids = (np.asarray(pages, np.int64)[:, None] * page_size + np.arange(page_size)[None]).ravel()
    return ids[ids < n_tokens]


def log_softmax_rows(logits: np.ndarray, context_logits: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-softmax of [H, n] logits, normalised together with optional [H, m] context."""
    peak = logits.max(axis=1, keepdims=True) if logits.shape[1] else np.zeros((logits.shape[0], 1), logits.dtype)
    if context_logits is not None and context_logits.shape[1]:
        peak = np.maximum(peak, context_logits.max(axis=1, keepdims=True))
    total = np.exp(logits - peak).sum(axis=1, keepdims=True)
    if context_logits is not None and context_logits.shape[1]:
        total = total + np.exp(context_logits - peak).sum(axis=1, keepdims=True)
    return logits - peak - np.log(total)
