"""Page and cluster tables of one M-DCI index, and the pool pages behind them (NumPy only).

``PageTable`` is the single owner of "which token sits in which slot of which page" and of the
pool pages the index holds. Rows of a page are always packed from slot 0, so a page's valid-token
count is all a reader needs to mask it.
"""

from __future__ import annotations

import numpy as np


def check_keys(keys: np.ndarray, values: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert keys/values [n, head_dim] to contiguous float32 (clear errors for bad input)."""
    keys = _as_matrix("keys", keys, head_dim)
    values = _as_matrix("values", values, head_dim)
    if keys.shape != values.shape:
        raise ValueError(f"keys shape {keys.shape} and values shape {values.shape} differ")
    if keys.shape[0] == 0:
        raise ValueError("keys: got 0 tokens; at least one is needed")
    return keys, values


def check_queries(queries: np.ndarray, head_dim: int) -> np.ndarray:
    """Validate queries [H, head_dim] (a single [head_dim] vector is accepted as H = 1)."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None]
    q = _as_matrix("queries", q, head_dim)
    if q.shape[0] == 0:
        raise ValueError("queries: got 0 query heads")
    return q


def _as_matrix(name: str, x: np.ndarray, head_dim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != head_dim:
        raise ValueError(f"{name}: expected shape [n, {head_dim}], got {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"{name}: row {bad} holds NaN or inf")
    return x


def _grown(arr: np.ndarray, rows: int, fill) -> np.ndarray:
    out = np.full((rows,) + arr.shape[1:], fill, arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class PageTable:
    """Pages (<= page_size tokens each, one pool page each) grouped into clusters."""

    def __init__(self, pool, head_dim: int, capacity: int = 64) -> None:
        self.pool = pool
        self.page_size = pool.layout.page_size
        self.head_dim = head_dim
        self.pool_k = pool.pages[:, 0]  # [capacity, P, d] view, read by the numba kernels
        self.page_tokens = np.full((capacity, self.page_size), -1, np.int32)
        self.page_count = np.zeros(capacity, np.int32)
        self.page_cluster = np.zeros(capacity, np.int32)
        self.page_next = np.full(capacity, -1, np.int32)
        self.page_pool = np.zeros(capacity, np.int32)
        self.n_pages = 0
        self.cluster_keys = np.zeros((8, head_dim), np.float32)
        self.cluster_first_page = np.full(8, -1, np.int32)
        self.cluster_last_page = np.full(8, -1, np.int32)
        self.cluster_n_pages = np.zeros(8, np.int32)
        self.cluster_size = np.zeros(8, np.int32)
        self.cluster_radius = np.zeros(8, np.float32)
        self.n_clusters = 0

    # ------------------------------------------------------------------ clusters
    def add_cluster(self, key: np.ndarray) -> int:
        """Register a new, empty cluster whose routing key starts at ``key`` [d]; returns its id.

        ``cluster_keys`` holds the running mean of the members' keys once members join
        (:meth:`set_members` / :meth:`add_member`), ``cluster_radius`` their max distance to it."""
        c = self.n_clusters
        if c == self.cluster_keys.shape[0]:
            size = 2 * c
            self.cluster_keys = _grown(self.cluster_keys, size, 0.0)
            self.cluster_first_page = _grown(self.cluster_first_page, size, -1)
            self.cluster_last_page = _grown(self.cluster_last_page, size, -1)
            self.cluster_n_pages = _grown(self.cluster_n_pages, size, 0)
            self.cluster_size = _grown(self.cluster_size, size, 0)
            self.cluster_radius = _grown(self.cluster_radius, size, 0.0)
        self.cluster_keys[c] = key
        self.n_clusters += 1
        return c

    def set_members(self, assign: np.ndarray, keys: np.ndarray) -> None:
        """Bulk: mean key and radius of every cluster from its members. assign: [n] cluster ids."""
        counts = np.bincount(assign, minlength=self.n_clusters)
        filled = counts > 0
        # segment sums over members sorted by cluster (stable: the same row-by-row float64 sums as
        # np.add.at, which took half of a build's time)
        order = np.argsort(assign, kind="stable")
        starts = (np.cumsum(counts) - counts)[filled]
        sums = np.add.reduceat(keys[order].astype(np.float64), starts, axis=0)
        self.cluster_keys[: self.n_clusters][filled] = (sums / counts[filled, None]).astype(np.float32)
        dist = np.linalg.norm(keys - self.cluster_keys[assign], axis=1).astype(np.float32)
        radius = np.zeros(self.n_clusters, np.float32)
        radius[filled] = np.maximum.reduceat(dist[order], starts)
        self.cluster_size[: self.n_clusters] = counts
        self.cluster_radius[: self.n_clusters] = radius

    def add_member(self, cluster: int, key: np.ndarray) -> None:
        """Running update of a cluster's mean key and radius for one new member."""
        n = int(self.cluster_size[cluster]) + 1
        self.cluster_size[cluster] = n
        self.cluster_keys[cluster] += (key - self.cluster_keys[cluster]) / n
        dist = float(np.linalg.norm(key - self.cluster_keys[cluster]))
        self.cluster_radius[cluster] = max(float(self.cluster_radius[cluster]), dist)

    def permute_clusters(self, order: np.ndarray) -> None:
        """Renumber clusters: new cluster i is old cluster ``order[i]`` (only before any page exists)."""
        if self.n_pages:
            raise RuntimeError("permute_clusters() must run before pages are created")
        n = self.n_clusters
        for name in ("cluster_keys", "cluster_size", "cluster_radius"):
            arr = getattr(self, name)
            arr[:n] = arr[:n][order]

    def cluster_page_list(self, cluster: int) -> np.ndarray:
        out = []
        p = int(self.cluster_first_page[cluster])
        while p >= 0:
            out.append(p)
            p = int(self.page_next[p])
        return np.asarray(out, np.int64)

    # ------------------------------------------------------------------ pages
    def _reserve(self, n: int) -> np.ndarray:
        """n new page ids backed by freshly allocated pool pages."""
        need = self.n_pages + n
        if need > self.page_count.shape[0]:
            size = max(need, 2 * self.page_count.shape[0])
            self.page_tokens = _grown(self.page_tokens, size, -1)
            self.page_count = _grown(self.page_count, size, 0)
            self.page_cluster = _grown(self.page_cluster, size, 0)
            self.page_next = _grown(self.page_next, size, -1)
            self.page_pool = _grown(self.page_pool, size, 0)
        pool_ids = self.pool.alloc(n)  # raises PoolExhausted before any table change
        ids = np.arange(self.n_pages, need)
        self.page_pool[ids] = pool_ids
        self.n_pages = need
        return ids

    def _link(self, cluster: int, page: int, after: int | None) -> None:
        self.page_cluster[page] = cluster
        self.cluster_n_pages[cluster] += 1
        if after is None:
            last = self.cluster_last_page[cluster]
            if last < 0:
                self.cluster_first_page[cluster] = page
            else:
                self.page_next[last] = page
            self.cluster_last_page[cluster] = page
            return
        self.page_next[page] = self.page_next[after]
        self.page_next[after] = page
        if self.cluster_last_page[cluster] == after:
            self.cluster_last_page[cluster] = page

    def new_page(self, cluster: int, tokens: np.ndarray, keys: np.ndarray, values: np.ndarray, after: int | None = None) -> int:
        """One new page for ``cluster`` holding rows [n, d]; linked after ``after`` or at the end."""
        page = int(self._reserve(1)[0])
        self._link(cluster, page, after)
        self.rewrite_page(page, tokens, keys, values)
        return page

    def write_new_pages(self, groups: list[tuple[int, list[np.ndarray]]], keys: np.ndarray, values: np.ndarray) -> None:
        """Bulk: ``groups`` = [(cluster, [token ids of each page])]; rows come from keys/values [n, d]."""
        members = [tokens for _, pages in groups for tokens in pages]
        ids = self._reserve(len(members))
        grid = np.full((len(members), self.page_size), -1, np.int64)
        for i, tokens in enumerate(members):
            grid[i, : len(tokens)] = tokens
        i = 0
        for cluster, pages in groups:
            for _ in pages:
                self._link(cluster, int(ids[i]), None)
                i += 1
        self.page_tokens[ids] = grid
        self.page_count[ids] = (grid >= 0).sum(axis=1)
        padded_k = np.vstack([keys, np.zeros((1, self.head_dim), np.float32)])
        padded_v = np.vstack([values, np.zeros((1, self.head_dim), np.float32)])
        self.pool.pages[self.page_pool[ids], 0] = padded_k[grid]  # slot -1 reads the zero row
        self.pool.pages[self.page_pool[ids], 1] = padded_v[grid]

    def rewrite_page(self, page: int, tokens: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Replace a page's rows with [n, d] rows (n <= page_size), packed from slot 0."""
        n = len(tokens)
        self.page_tokens[page] = -1
        self.page_tokens[page, :n] = tokens
        self.page_count[page] = n
        rows = self.pool.pages[self.page_pool[page]]
        rows[:, n:] = 0.0
        rows[0, :n] = keys
        rows[1, :n] = values

    def append_row(self, page: int, token: int, key: np.ndarray, value: np.ndarray) -> None:
        slot = int(self.page_count[page])
        self.page_tokens[page, slot] = token
        self.page_count[page] = slot + 1
        rows = self.pool.pages[self.page_pool[page]]
        rows[0, slot] = key
        rows[1, slot] = value

    def page_keys(self, page: int) -> np.ndarray:
        """K rows of a page: [count, d] view into the pool."""
        return self.pool_k[self.page_pool[page], : self.page_count[page]]

    def page_rows(self, page: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (token ids [n], keys [n, d], values [n, d]) of a page."""
        n = int(self.page_count[page])
        rows = self.pool.pages[self.page_pool[page]]
        return self.page_tokens[page, :n].copy(), rows[0, :n].copy(), rows[1, :n].copy()

    # ------------------------------------------------------------------ introspection
    def token_pages(self, n_tokens: int) -> np.ndarray:
        """Page of each token id in [0, n_tokens). Returns [n_tokens] int32 (-1 if missing)."""
        out = np.full(n_tokens, -1, np.int32)
        tokens = self.page_tokens[: self.n_pages]
        valid = tokens >= 0
        out[tokens[valid]] = np.broadcast_to(np.arange(self.n_pages)[:, None], tokens.shape)[valid]
        return out

    def metadata_bytes(self) -> int:
        """Bytes of the tables for the pages and clusters in use (capacity slack excluded)."""
        per_page = self.page_size * 4 + 4 * 4  # token ids + count, cluster, next, pool id
        per_cluster = self.head_dim * 4 + 5 * 4  # mean key + first/last page, pages, size, radius
        return self.n_pages * per_page + self.n_clusters * per_cluster

    def release(self) -> None:
        """Give every pool page back (the table becomes empty)."""
        if self.n_pages:
            self.pool.free(self.page_pool[: self.n_pages].copy())
        self.n_pages = 0
        self.n_clusters = 0
        self.page_next[:] = -1
        self.cluster_first_page[:] = -1
        self.cluster_last_page[:] = -1
        self.cluster_n_pages[:] = 0
        self.cluster_size[:] = 0
        self.cluster_radius[:] = 0.0
