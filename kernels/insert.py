"""Numba kernel for the M-DCI insert hot path: plain tokens that join a page with room.

Decode seals a page of the window every ``page_size`` tokens and each (sequence, layer, KV head)
index must take its rows before the next selection of that layer. Per token, the Python path
(``MDCIIndex._insert_one``) costs ~150 us, mostly interpreter overhead; this kernel runs the
common case for a whole run of rows in one call. It stops (without touching anything for that
row) at the first row that is a promoted token (a new cluster) or whose cluster has no page with
room (a split): the caller inserts that row with the Python path and calls again.

Its reference is the Python path itself: ``tests/test_insert_kernel.py`` checks that both give the
same pages, tokens, clusters and routing.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def augment_centres(cluster_keys: np.ndarray, n_clusters: int, max_sq_norm: float, out: np.ndarray) -> None:
    """out[:n, :d] = keys, out[:n, d] = sqrt(max(M - |key|^2, 0)): the augmented cluster keys."""
    dim = cluster_keys.shape[1]
    for c in range(n_clusters):
        sq = np.float32(0.0)
        for j in range(dim):
            out[c, j] = cluster_keys[c, j]
            sq += cluster_keys[c, j] * cluster_keys[c, j]
        out[c, dim] = np.float32(np.sqrt(max(max_sq_norm - sq, 0.0)))


@njit(cache=True, nogil=True)
def _nearest_cluster(centres: np.ndarray, n_clusters: int, key: np.ndarray, extra: np.float32) -> int:
    dim = key.shape[0]
    best, best_c = -np.inf, 0
    for c in range(n_clusters):
        s = np.float32(0.0)
        for j in range(dim):
            s += centres[c, j] * key[j]
        s += centres[c, dim] * extra
        if s > best:
            best, best_c = s, c
    return best_c


@njit(cache=True, nogil=True)
def _page_with_room(
    key: np.ndarray, max_sq_norm: float, first: int, page_next: np.ndarray, page_count: np.ndarray,
    page_pool: np.ndarray, pool_pages: np.ndarray, page_size: int,
) -> int:
    """The page of a cluster (list from ``first``) with room whose centroid is nearest to ``key``
    (augmented inner product, like ``_add_to_cluster``), or -1 when every page is full."""
    dim = key.shape[0]
    key_sq = 0.0
    for j in range(dim):
        key_sq += np.float64(key[j]) * key[j]
    key_extra = np.sqrt(max(max_sq_norm - key_sq, 0.0))
    centroid = np.empty(dim, np.float32)
    best, best_page = -np.inf, -1
    p = first
    while p >= 0:
        n = page_count[p]
        if n < page_size:
            rows = pool_pages[page_pool[p], 0]
            centroid[:] = 0.0
            for s in range(page_size):  # empty slots are zero rows
                for j in range(dim):
                    centroid[j] += rows[s, j]
            dot, sq = 0.0, 0.0
            for j in range(dim):
                c = np.float64(centroid[j]) / n
                dot += c * key[j]
                sq += c * c
            dot += np.sqrt(max(max_sq_norm - sq, 0.0)) * key_extra
            if dot > best:
                best, best_page = dot, p
        p = page_next[p]
    return best_page


@njit(cache=True, nogil=True)
def insert_run(
    keys: np.ndarray, values: np.ndarray, start: int, first_token: int, promote_every: int,
    max_sq_norm: float, centres: np.ndarray, centres_norm: float,
    cluster_keys: np.ndarray, cluster_size: np.ndarray, cluster_radius: np.ndarray, n_clusters: int,
    cluster_first_page: np.ndarray, page_next: np.ndarray, page_count: np.ndarray, page_tokens: np.ndarray,
    page_pool: np.ndarray, pool_pages: np.ndarray, dirty: np.ndarray,
) -> tuple:
    """Insert rows ``keys[start:]`` / ``values[start:]`` [n, d] as tokens ``first_token, ...`` while
    each is a plain token whose nearest cluster has a page with room; updates the tables in place.

    pool_pages: [rows, 2, P, d] float32 (a float32 pool: K and V written) or [rows, 1, P, d] (the
    table's key copy of a 16-bit pool: K written, the caller stores the pool rows); page_pool:
    the row of each index page in it.

    centres: [>= n_clusters, d + 1] augmented cluster keys computed with M = ``centres_norm`` (the
    insert batch's cache: recomputed here only when M grows, like ``_nearest_cluster_for_insert``).
    dirty: [n] int64 receives the page of each inserted row. Returns (rows inserted, new M,
    M of ``centres``).
    """
    dim = keys.shape[1]
    page_size = page_tokens.shape[1]
    i = start
    while i < keys.shape[0]:
        token = first_token + (i - start)
        if token % promote_every == 0:
            break  # a cluster centre: the Python path adds the cluster and its routing node
        key = keys[i]
        sq = np.float32(0.0)
        for j in range(dim):
            sq += key[j] * key[j]
        m = max(max_sq_norm, np.float64(sq))
        if m != centres_norm:
            augment_centres(cluster_keys, n_clusters, m, centres)
            centres_norm = m
        extra = np.float32(np.sqrt(max(m - sq, 0.0)))
        cluster = _nearest_cluster(centres, n_clusters, key, extra)
        page = _page_with_room(key, m, cluster_first_page[cluster], page_next, page_count, page_pool, pool_pages, page_size)
        if page < 0:
            break  # a split: the Python path bisects the page
        max_sq_norm = m
        slot = page_count[page]
        page_tokens[page, slot] = token
        page_count[page] = slot + 1
        for j in range(dim):
            pool_pages[page_pool[page], 0, slot, j] = key[j]
        if pool_pages.shape[1] > 1:  # a float32 pool; a key copy [.., 1, P, d] holds K only
            for j in range(dim):
                pool_pages[page_pool[page], 1, slot, j] = values[i, j]
        # running mean and radius of the cluster (``PageTable.add_member``)
        size = cluster_size[cluster] + 1
        cluster_size[cluster] = size
        dist = np.float32(0.0)
        for j in range(dim):
            cluster_keys[cluster, j] += (key[j] - cluster_keys[cluster, j]) / np.float32(size)
            diff = key[j] - cluster_keys[cluster, j]
            dist += diff * diff
        cluster_radius[cluster] = max(cluster_radius[cluster], np.float32(np.sqrt(dist)))
        dirty[i - start] = page
        i += 1
    return i - start, max_sq_norm, centres_norm
