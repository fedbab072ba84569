"""Page ranking inside one KV head: per-head page scores and the GQA merge rules (NumPy only).

Input is the exact q.k of every token of the candidate pages for each query head of the group.
Per head, token logits are turned into log-probabilities over the candidate set (so heads with
large logits do not dominate); a page's per-head value is its best token's log-probability
(``page_score="max"``, the paper's ranking) or the log of its total softmax mass (``"mass"``).
The group rule then merges the heads (see :class:`icecache_ray.config.IndexConfig`).
"""

from __future__ import annotations

import numpy as np

from icecache_ray.kernels import mdci as K


def per_head_page_values(token_scores: np.ndarray, page_score: str, scale: float) -> np.ndarray:
    """token_scores: [H, m, P] exact q.k (-inf in empty slots). Returns [H, m] log values
    (the numba kernel ``page_log_values``; its readable twin is ``page_log_values_ref``)."""
    return K.page_log_values(np.ascontiguousarray(token_scores, np.float32), float(scale), page_score == "mass")


def merge_group(values: np.ndarray, k: int, rule: str) -> np.ndarray:
    """Choose k candidate positions from per-head values [H, m]. Returns [min(k, m)] int64, best first."""
    n_heads, m = values.shape
    k = min(k, m)
    if rule == "interleave":
        return _round_robin(np.argsort(-values, axis=1, kind="stable"), k)
    if rule == "max":
        combined = values.max(axis=0)
    else:  # "sum": total probability mass over the group's heads
        combined = np.exp(values).sum(axis=0)
    return np.argsort(-combined, kind="stable")[:k]


def _round_robin(ranked: np.ndarray, k: int) -> np.ndarray:
    """Rank-1 of every head, then rank-2, ..., keeping the first k distinct entries."""
    seen: set[int] = set()
    out: list[int] = []
    for column in ranked.T:
        for item in column:
            if int(item) not in seen:
                seen.add(int(item))
                out.append(int(item))
                if len(out) == k:
                    return np.asarray(out, np.int64)
    return np.asarray(out, np.int64)
