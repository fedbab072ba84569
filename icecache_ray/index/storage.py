"""Page and cluster tables of one M-DCI index, and the pool pages behind them (NumPy only).

``PageTable`` is the single owner of "which token sits in which slot of which page" and of the
pool pages the index holds. Rows of a page are always packed from slot 0, so a page's valid-token
count is all a reader needs to mask it.

The index kernels score, route and cluster on float32 keys. With a float32 pool they read the K rows
of the pool pages in place. With a 16-bit pool (bfloat16 / float16: what is copied to the device,
half the bytes) the table keeps its own float32 copy of the K rows, page by page
(``key_pages`` [table capacity, 1, P, d]), holding the keys exactly as given (not rounded to the
pool's dtype, so selection is the float32 pool's); V is kept only in the pool. That copy costs
``4 * head_dim`` bytes per page slot, i.e. per token-head 256 B at head_dim 64 (SmolLM2) and
512 B at head_dim 128 (Llama-3-8B), plus the pages' fill slack (pages cut per cluster are not all
full); the 16-bit pool page itself holds ``2 * 2 * head_dim`` B per token-head (K and V). So with a
16-bit pool the host holds as many bytes per token-head as with a float32 pool, and the bytes
copied to the device halve.
"""

from __future__ import annotations

import numpy as np

from icecache_ray.kernels.insert import add_member


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


def _token_grid(members: list[np.ndarray], page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(grid [m, page_size] token ids padded with -1, sizes [m]) of m pages' token-id arrays."""
    sizes = np.fromiter((len(t) for t in members), np.int64, len(members))
    grid = np.full((len(members), page_size), -1, np.int64)
    if len(members):
        starts = np.cumsum(sizes) - sizes
        rows = np.repeat(np.arange(len(members)), sizes)
        cols = np.arange(int(sizes.sum())) - np.repeat(starts, sizes)
        grid[rows, cols] = np.concatenate(members)
    return grid, sizes


def _grown(arr: np.ndarray, rows: int, fill) -> np.ndarray:
    out = np.full((rows,) + arr.shape[1:], fill, arr.dtype)
    out[: arr.shape[0]] = arr
    return out


def _grown_zeros(arr: np.ndarray, rows: int) -> np.ndarray:
    """``arr`` with ``rows`` rows, the new ones zero (left untouched: lazily committed memory)."""
    out = np.zeros((rows,) + arr.shape[1:], arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class PageTable:
    """Pages (<= page_size tokens each, one pool page each) grouped into clusters.

    ``key_pages`` / ``key_index``: the float32 K rows the kernels read, page ``p``'s rows being
    ``key_pages[key_index[p], 0, :page_count[p]]``: the pool itself (``pool.pages``, ``page_pool``)
    for a float32 pool, else the table's own copy (see module docstring)."""

    def __init__(self, pool, head_dim: int, capacity: int = 64) -> None:
        self.pool = pool
        self.page_size = pool.layout.page_size
        self.head_dim = head_dim
        self.own_keys = pool.layout.dtype != "float32"
        if self.own_keys:
            self.key_pages = np.zeros((capacity, 1, self.page_size, head_dim), np.float32)
            self._key_rows = np.arange(capacity, dtype=np.int32)
        else:
            self.key_pages = pool.pages  # [capacity, 2, P, d] float32, read (and written) by the kernels
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
        """Running update of a cluster's mean key and radius for one new member (the insert
        kernel's arithmetic, so both insert paths keep the same clusters)."""
        add_member(self.cluster_keys, self.cluster_size, self.cluster_radius, cluster, key)

    def permute_clusters(self, order: np.ndarray) -> None:
        """Renumber clusters: new cluster i is old cluster ``order[i]`` (only before any page exists)."""
        if self.n_pages:
            raise RuntimeError("permute_clusters() must run before pages are created")
        n = self.n_clusters
        for name in ("cluster_keys", "cluster_size", "cluster_radius"):
            arr = getattr(self, name)
            arr[:n] = arr[:n][order]

    # ------------------------------------------------------------------ keys
    @property
    def key_index(self) -> np.ndarray:
        """[>= n_pages] int32: row of ``key_pages`` holding each index page's keys."""
        return self._key_rows if self.own_keys else self.page_pool

    def _store_rows(self, pages: np.ndarray, slots: np.ndarray | slice, keys: np.ndarray, values: np.ndarray) -> None:
        """Write K/V rows of index pages to the pool (encoded to its dtype) and the K rows to the
        table's float32 copy when it keeps one. ``pages`` and ``slots`` index the rows like a
        NumPy fancy index of ``[page, slot]``; keys / values broadcast to it with a trailing d."""
        pool_ids = self.page_pool[pages]
        if self.own_keys:
            self.key_pages[self._key_rows[pages], 0, slots] = keys
            layout = self.pool.layout
            self.pool.pages[pool_ids, 0, slots] = layout.encode(keys)
            self.pool.pages[pool_ids, 1, slots] = layout.encode(values)
        else:
            self.pool.pages[pool_ids, 0, slots] = keys
            self.pool.pages[pool_ids, 1, slots] = values

    def store_inserted(self, pages: np.ndarray, tokens: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Pool rows of tokens [n] that ``kernels.insert.insert_run`` placed in ``pages`` [n] (it
        wrote the float32 K copy; a 16-bit pool's K/V rows are encoded here). No-op for float32."""
        if not self.own_keys or len(pages) == 0:
            return
        slots = np.argmax(self.page_tokens[pages] == np.asarray(tokens)[:, None], axis=1)
        pool_ids = self.page_pool[pages]
        layout = self.pool.layout
        self.pool.pages[pool_ids, 0, slots] = layout.encode(keys)
        self.pool.pages[pool_ids, 1, slots] = layout.encode(values)

    def key_copy_bytes(self) -> int:
        """Bytes of the float32 key copy for the pages in use (0 with a float32 pool)."""
        return self.n_pages * self.page_size * self.head_dim * 4 if self.own_keys else 0

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
        if self.own_keys and need > self.key_pages.shape[0]:
            # the key copy is the table's big array: grown by a quarter, not doubled
            rows = max(need, self.key_pages.shape[0] + self.key_pages.shape[0] // 4)
            self.key_pages = _grown_zeros(self.key_pages, rows)
            self._key_rows = np.arange(rows, dtype=np.int32)
        pool_ids = self.pool.alloc(n)  # raises PoolExhausted before any table change
        ids = np.arange(self.n_pages, need)
        self.page_pool[ids] = pool_ids
        self.n_pages = need
        return ids

    def unreserve(self, n: int) -> None:
        """Give back the last ``n`` pages :meth:`_reserve` made (never linked nor written)."""
        if n <= 0:
            return
        ids = np.arange(self.n_pages - n, self.n_pages)
        self.pool.free(self.page_pool[ids].copy())
        self.page_next[ids] = -1
        self.n_pages -= n

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

    def _link_runs(self, runs: list[tuple[int, int]], ids: np.ndarray) -> None:
        """Append consecutive ``ids`` to clusters, ``runs`` = [(cluster, how many)] in order: what
        :meth:`_link` does page by page (a build links ~500 pages a store), as array writes."""
        first = 0
        for cluster, n in runs:
            if not n:
                continue
            run = ids[first : first + n]
            first += n
            self.page_cluster[run] = cluster
            self.page_next[run[:-1]] = run[1:]
            self.cluster_n_pages[cluster] += n
            last = self.cluster_last_page[cluster]
            if last < 0:
                self.cluster_first_page[cluster] = run[0]
            else:
                self.page_next[last] = run[0]
            self.cluster_last_page[cluster] = run[-1]

    def new_page(self, cluster: int, tokens: np.ndarray, keys: np.ndarray, values: np.ndarray, after: int | None = None) -> int:
        """One new page for ``cluster`` holding rows [n, d]; linked after ``after`` or at the end."""
        page = int(self._reserve(1)[0])
        self._link(cluster, page, after)
        self.rewrite_page(page, tokens, keys, values)
        return page

    def write_new_pages(self, groups: list[tuple[int, list[np.ndarray]]], keys: np.ndarray, values: np.ndarray) -> None:
        """Bulk: ``groups`` = [(cluster, [token ids of each page])]; rows come from keys/values [n, d].
        A cluster's new pages are linked after its last page, in the order given."""
        members = [tokens for _, pages in groups for tokens in pages]
        ids = self._reserve(len(members))
        grid, sizes = _token_grid(members, self.page_size)
        self._link_runs([(cluster, len(pages)) for cluster, pages in groups], ids)
        self.page_tokens[ids] = grid
        self.page_count[ids] = sizes
        padded_k = np.vstack([keys, np.zeros((1, self.head_dim), np.float32)])
        padded_v = np.vstack([values, np.zeros((1, self.head_dim), np.float32)])
        self._store_rows(ids, slice(None), padded_k[grid], padded_v[grid])  # slot -1 reads the zero row

    def rewrite_page(self, page: int, tokens: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Replace a page's rows with [n, d] rows (n <= page_size), packed from slot 0."""
        n = len(tokens)
        self.page_tokens[page] = -1
        self.page_tokens[page, :n] = tokens
        self.page_count[page] = n
        zeros = np.zeros((self.page_size - n, self.head_dim), np.float32)
        self._store_rows(page, slice(None), np.vstack([keys, zeros]), np.vstack([values, zeros]))

    def append_row(self, page: int, token: int, key: np.ndarray, value: np.ndarray) -> None:
        slot = int(self.page_count[page])
        self.page_tokens[page, slot] = token
        self.page_count[page] = slot + 1
        self._store_rows(page, slot, key, value)

    def page_keys(self, page: int) -> np.ndarray:
        """K rows of a page: [count, d] float32 view (into the pool or the table's key copy)."""
        return self.key_pages[self.key_index[page], 0, : self.page_count[page]]

    def page_rows(self, page: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (token ids [n], keys [n, d], values [n, d]) of a page."""
        n = int(self.page_count[page])
        values = self.pool.values(self.page_pool[page : page + 1])[0, :n]  # float32 copy (decoded)
        return self.page_tokens[page, :n].copy(), self.page_keys(page).copy(), values

    # ------------------------------------------------------------------ introspection
    def token_pages(self, n_tokens: int) -> np.ndarray:
        """Page of each token id in [0, n_tokens). Returns [n_tokens] int32 (-1 if missing)."""
        out = np.full(n_tokens, -1, np.int32)
        tokens = self.page_tokens[: self.n_pages]
        valid = tokens >= 0
        out[tokens[valid]] = np.broadcast_to(np.arange(self.n_pages)[:, None], tokens.shape)[valid]
        return out

    def metadata_bytes(self) -> int:
        """Bytes of the tables for the pages and clusters in use (capacity slack excluded), the
        float32 key copy of a 16-bit pool included (:meth:`key_copy_bytes`)."""
        per_page = self.page_size * 4 + 4 * 4  # token ids + count, cluster, next, pool id
        per_cluster = self.head_dim * 4 + 5 * 4  # mean key + first/last page, pages, size, radius
        return self.n_pages * per_page + self.n_clusters * per_cluster + self.key_copy_bytes()

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
