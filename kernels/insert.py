"""Numba kernel for the M-DCI insert hot path: tokens that join a page, or split a full one.

Decode seals a page of the window every ``page_size`` tokens and each (sequence, layer, KV head)
index must take its rows before the next selection of that layer. Per token, the Python path
(``MDCIIndex._insert_one``) costs ~150 us, mostly interpreter overhead; this kernel runs a whole
run of rows in one call: a token joins the nearest page with room of its nearest cluster or,
when every page of that cluster is full, bisects the nearest one into a page the caller reserved
(a float32 pool; about one split per 16-token insert at 8k, measured 2026-12-07). It stops (without touching anything
for that row) at a promoted token (a new cluster, whose routing node is Python state), or at a
split it cannot make: the caller inserts that row with the Python path and calls again.

Both paths choose pages with :func:`nearest_page` and cut them with :func:`split_order`; the
Python path is the reference: ``tests/test_insert_kernel.py`` checks that both give the same
pages, tokens, clusters and routing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from icecache_ray.kernels.mdci import pca_pack


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
def sq_norm(key: np.ndarray) -> np.float32:
    """|key|^2 in float32, summed in order (what both paths add to the index's M)."""
    sq = np.float32(0.0)
    for j in range(key.shape[0]):
        sq += key[j] * key[j]
    return sq


@njit(cache=True, nogil=True)
def add_member(cluster_keys: np.ndarray, cluster_size: np.ndarray, cluster_radius: np.ndarray, cluster: int,
               key: np.ndarray) -> None:
    """Running mean key and radius of ``cluster`` after ``key`` joins it (``PageTable.add_member``)."""
    size = cluster_size[cluster] + 1
    cluster_size[cluster] = size
    dist = np.float32(0.0)
    for j in range(key.shape[0]):
        cluster_keys[cluster, j] += (key[j] - cluster_keys[cluster, j]) / np.float32(size)
        diff = key[j] - cluster_keys[cluster, j]
        dist += diff * diff
    cluster_radius[cluster] = max(cluster_radius[cluster], np.float32(np.sqrt(dist)))


@njit(cache=True, nogil=True)
def nearest_cluster(centres: np.ndarray, n_clusters: int, key: np.ndarray, max_sq_norm: float) -> int:
    """The cluster whose augmented centre (``centres`` [>= n_clusters, d + 1], made with M =
    ``max_sq_norm``) is nearest to ``key`` by augmented inner product (first on ties)."""
    extra = np.float32(np.sqrt(max(max_sq_norm - sq_norm(key), 0.0)))
    return _nearest_cluster(centres, n_clusters, key, extra)


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
def nearest_page(
    key: np.ndarray, max_sq_norm: float, first: int, page_next: np.ndarray, page_count: np.ndarray,
    page_pool: np.ndarray, pool_pages: np.ndarray, page_size: int, need_room: bool,
) -> int:
    """The page of a cluster (list from ``first``) whose centroid is nearest to ``key`` (augmented
    inner product), among the pages with room when ``need_room`` (-1 when every page is full).
    Both insert paths choose with it: the page a token joins, else the page it splits."""
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
        if n < page_size or not need_room:
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
def split_order(keys: np.ndarray, max_sq_norm: float, direction: np.ndarray, n_iter: int) -> tuple:
    """How a full page plus one token (keys [n, d]) is bisected: principal-direction packing of
    the augmented keys into two pages of at most ceil(n / 2) rows. Returns ``pca_pack``'s
    (order, bounds). Both insert paths split with it."""
    n, dim = keys.shape
    aug = np.empty((n, dim + 1), np.float32)
    for i in range(n):
        sq = np.float32(0.0)
        for j in range(dim):
            aug[i, j] = keys[i, j]
            sq += keys[i, j] * keys[i, j]
        aug[i, dim] = np.float32(np.sqrt(max(max_sq_norm - sq, 0.0)))
    return pca_pack(aug, (n + 1) // 2, direction, n_iter)


@njit(cache=True, nogil=True)
def _write_page(page: int, rows: np.ndarray, tokens: np.ndarray, keys: np.ndarray, values: np.ndarray,
                page_tokens: np.ndarray, page_count: np.ndarray, page_pool: np.ndarray, pool_pages: np.ndarray) -> None:
    """Page ``page`` holds ``tokens[rows]`` (K/V rows ``keys`` / ``values[rows]``) from slot 0;
    the other slots are empty (token -1, zero rows), as ``PageTable.rewrite_page`` leaves them."""
    dst = pool_pages[page_pool[page]]
    for s in range(page_tokens.shape[1]):
        if s < rows.shape[0]:
            page_tokens[page, s] = tokens[rows[s]]
            dst[0, s] = keys[rows[s]]
            dst[1, s] = values[rows[s]]
        else:
            page_tokens[page, s] = -1
            dst[0, s] = 0.0
            dst[1, s] = 0.0
    page_count[page] = rows.shape[0]


@njit(cache=True, nogil=True)
def _split(page: int, new: int, token: int, key: np.ndarray, value: np.ndarray, max_sq_norm: float,
           direction: np.ndarray, n_iter: int, page_tokens: np.ndarray, page_count: np.ndarray, page_pool: np.ndarray,
           pool_pages: np.ndarray, page_next: np.ndarray, page_cluster: np.ndarray, cluster_last_page: np.ndarray,
           cluster_n_pages: np.ndarray) -> None:
    """``MDCIIndex._split`` for a float32 pool: bisect full ``page`` plus ``token`` into ``page``
    and the reserved index page ``new``, linked right after it in the cluster's list."""
    n = page_count[page]
    src = pool_pages[page_pool[page]]
    tokens = np.empty(n + 1, np.int64)
    keys = np.empty((n + 1, key.shape[0]), np.float32)
    values = np.empty((n + 1, key.shape[0]), np.float32)
    for s in range(n):
        tokens[s], keys[s], values[s] = page_tokens[page, s], src[0, s], src[1, s]
    tokens[n], keys[n], values[n] = token, key, value
    order, bounds = split_order(keys, max_sq_norm, direction, n_iter)
    cluster = page_cluster[page]
    page_cluster[new] = cluster
    cluster_n_pages[cluster] += 1
    page_next[new] = page_next[page]
    page_next[page] = new
    if cluster_last_page[cluster] == page:
        cluster_last_page[cluster] = new
    _write_page(new, order[bounds[1] : bounds[2]], tokens, keys, values, page_tokens, page_count, page_pool, pool_pages)
    _write_page(page, order[bounds[0] : bounds[1]], tokens, keys, values, page_tokens, page_count, page_pool, pool_pages)


@njit(cache=True, nogil=True)
def insert_run(
    keys: np.ndarray, values: np.ndarray, start: int, first_token: int, promote_every: int,
    max_sq_norm: float, centres: np.ndarray, centres_norm: float,
    cluster_keys: np.ndarray, cluster_size: np.ndarray, cluster_radius: np.ndarray, n_clusters: int,
    cluster_first_page: np.ndarray, page_next: np.ndarray, page_count: np.ndarray, page_tokens: np.ndarray,
    page_pool: np.ndarray, pool_pages: np.ndarray, dirty: np.ndarray,
    spare: np.ndarray, split_new: np.ndarray, direction: np.ndarray, n_iter: int,
    page_cluster: np.ndarray, cluster_last_page: np.ndarray, cluster_n_pages: np.ndarray,
) -> tuple:
    """Insert rows ``keys[start:]`` / ``values[start:]`` [n, d] as tokens ``first_token, ...`` while
    each is a plain token: it joins the nearest page with room of its nearest cluster or, with a
    float32 pool and a ``spare`` index page left (the caller reserves one when a run stops at a
    split, so no page is reserved in vain), splits that cluster's nearest page; updates the tables
    in place.

    pool_pages: [rows, 2, P, d] float32 (a float32 pool: K and V written) or [rows, 1, P, d] (the
    table's key copy of a 16-bit pool: K written, the caller stores the pool rows; no splits);
    page_pool: the row of each index page in it.

    centres: [>= n_clusters, d + 1] augmented cluster keys computed with M = ``centres_norm`` (the
    insert batch's cache: recomputed here only when M grows, like ``_nearest_cluster_for_insert``).
    dirty: [n] int64 receives the page of each inserted row; spare: index pages reserved for
    splits (used in order); split_new: [n] int64 receives the page a row's split made (else left
    as is). Returns (rows inserted, new M, M of ``centres``, spare pages used, whether it stopped
    at a split for want of a spare page).
    """
    dim = keys.shape[1]
    page_size = page_tokens.shape[1]
    used = 0
    i = start
    while i < keys.shape[0]:
        token = first_token + (i - start)
        if token % promote_every == 0:
            break  # a cluster centre: the Python path adds the cluster and its routing node
        key = keys[i]
        m = max(max_sq_norm, np.float64(sq_norm(key)))
        if m != centres_norm:
            augment_centres(cluster_keys, n_clusters, m, centres)
            centres_norm = m
        cluster = nearest_cluster(centres, n_clusters, key, m)
        first = cluster_first_page[cluster]
        page = nearest_page(key, m, first, page_next, page_count, page_pool, pool_pages, page_size, True)
        if page < 0:
            if used == spare.shape[0] or pool_pages.shape[1] == 1:
                return i - start, max_sq_norm, centres_norm, used, True  # a split needs a reserved page
            page = nearest_page(key, m, first, page_next, page_count, page_pool, pool_pages, page_size, False)
            _split(page, spare[used], token, key, values[i], m, direction, n_iter, page_tokens, page_count, page_pool,
                   pool_pages, page_next, page_cluster, cluster_last_page, cluster_n_pages)
            split_new[i - start] = spare[used]
            used += 1
        else:
            slot = page_count[page]
            page_tokens[page, slot] = token
            page_count[page] = slot + 1
            for j in range(dim):
                pool_pages[page_pool[page], 0, slot, j] = key[j]
            if pool_pages.shape[1] > 1:  # a float32 pool; a key copy [.., 1, P, d] holds K only
                for j in range(dim):
                    pool_pages[page_pool[page], 1, slot, j] = values[i, j]
        max_sq_norm = m
        add_member(cluster_keys, cluster_size, cluster_radius, cluster, key)
        dirty[i - start] = page
        i += 1
    return i - start, max_sq_norm, centres_norm, used, False
