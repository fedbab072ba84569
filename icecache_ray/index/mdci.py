"""The M-DCI index of one (sequence, layer, KV head): semantic pages over post-RoPE keys.

Maximum inner product search is turned into nearest-neighbour search with the augmentation
``k~ = [k, sqrt(M - |k|^2)]`` (M = running max of |k|^2), so "nearest parent" is the parent with
the largest augmented inner product. Levels follow :mod:`.levels`; every token sits under its
nearest level-1 node (cluster), and each cluster's tokens are packed into pages of at most
``page_size`` tokens whose K and V rows are one contiguous host-pool page. Queries run a beam
search down the levels (:func:`kernels.mdci.route_clusters`), score every token of the pages of
the chosen clusters exactly, and rank pages with the GQA rule of :mod:`.select`.

Metadata (beyond K/V) per token: 4 B (page slot -> token id) + per page 16 B + per cluster
(4 d + 16) B + routing 8 B per routing node, and with a 16-bit pool the float32 key copy, 4 d B
per page slot (:mod:`.storage`); :meth:`MDCIIndex.metadata_bytes` counts it exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from icecache_ray.config import IndexConfig
from icecache_ray.index.levels import level_of, levels_of
from icecache_ray.index.routing import Routing
from icecache_ray.index.select import merge_group
from icecache_ray.index.storage import PageTable, check_keys, check_queries
from icecache_ray.kernels import EMPTY
from icecache_ray.kernels import mdci as K
from icecache_ray.kernels.insert import augment_centres, insert_run, nearest_cluster, nearest_page, split_order, sq_norm

log = logging.getLogger(__name__)

PCA_ITERS = 8
FANOUT_CAP = 4.0  # a routing node takes at most this many times the average number of children


@dataclass(frozen=True)
class QueryResult:
    """Pages chosen for one KV head, best first.

    pages: [k'] int32 index page ids; counts: [k'] valid tokens of each; pool_pages: [k'] pool
    page ids (what a loader copies); n_scored: tokens whose q.k was computed exactly;
    token_pages / token_rows: [t] index page and row of each single token picked from the other
    candidate pages (``n_tokens`` of :meth:`MDCIIndex.query`), in (candidate, row) order.
    """

    pages: np.ndarray
    counts: np.ndarray
    pool_pages: np.ndarray
    n_scored: int
    token_pages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    token_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class InsertResult:
    """dirty_pages: index pages whose contents changed (new pages included); new_pages: the new ones."""

    dirty_pages: np.ndarray
    new_pages: np.ndarray


class MDCIIndex:
    """Index over the keys of one (sequence, layer, KV head); pages live in ``pool``."""

    fast_insert = True  # False: every inserted token takes the Python path (the kernel's reference)

    def __init__(self, pool, config: IndexConfig, head_dim: int, scale: float | None = None) -> None:
        if pool.layout.head_dim != head_dim:
            raise ValueError(f"head_dim={head_dim} does not match the pool's head_dim={pool.layout.head_dim}")
        self.config = config
        self.head_dim = head_dim
        self.page_size = pool.layout.page_size
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        self.table = PageTable(pool, head_dim)
        self.routing = Routing()
        self.n_tokens = 0
        self.max_sq_norm = 0.0
        self._radius_cache: tuple | None = None
        self._token_loc: tuple | None = None  # (n_tokens, token -> flat page row), see token_locations
        self._insert_centres: tuple | None = None  # (n_clusters, M, augmented cluster keys) of an insert batch
        rng = np.random.default_rng(config.seed)
        direction = rng.standard_normal(head_dim + 1).astype(np.float32)
        self._direction = direction / np.linalg.norm(direction)

    # ------------------------------------------------------------------ sizes
    @property
    def n_pages(self) -> int:
        return self.table.n_pages

    @property
    def n_clusters(self) -> int:
        return self.table.n_clusters

    def metadata_bytes(self) -> int:
        """Bytes of index metadata beyond the K/V rows in the pool."""
        return self.table.metadata_bytes() + self.routing.nbytes

    # ------------------------------------------------------------------ build
    def build(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Bulk-build from the first tokens. keys, values: [n, head_dim] (post-RoPE keys)."""
        keys, values = check_keys(keys, values, self.head_dim)
        if self.n_tokens:
            raise ValueError(f"build() needs an empty index; it holds {self.n_tokens} tokens (use insert())")
        try:
            self._build(keys, values)
        except Exception:
            self.table.release()  # leave the index empty and its pool pages free, never half-built
            self.routing = Routing()
            raise

    def _build(self, keys: np.ndarray, values: np.ndarray) -> None:
        n = keys.shape[0]
        levels = levels_of(0, n, self.config.promote_every, self.config.promote_every_upper)
        centres = np.flatnonzero(levels > 0)
        self.max_sq_norm = float(np.max(np.einsum("nd,nd->n", keys, keys)))
        for token in centres:
            self.table.add_cluster(keys[token])
        assign = self._nearest_clusters(keys)
        assign[centres] = np.arange(len(centres))  # a centre is its own nearest (exact tie-safe)
        self.table.set_members(assign, keys)
        self._build_routing(levels[centres])
        assign = self._renumber_in_routing_order(assign)
        self._pack_clusters(keys, values, assign)
        self.n_tokens = n
        log.debug("built index: %d tokens, %d clusters, %d pages", n, self.n_clusters, self.n_pages)

    def _augment(self, keys: np.ndarray) -> np.ndarray:
        """[n, d] -> [n, d + 1] augmented keys with the current M."""
        sq = np.einsum("nd,nd->n", keys, keys)
        extra = np.sqrt(np.maximum(self.max_sq_norm - sq, 0.0)).astype(np.float32)
        return np.concatenate([keys, extra[:, None]], axis=1)

    def _nearest_clusters(self, keys: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Cluster with the largest augmented inner product for each key. Returns [n] int64."""
        centres = self._augment(self.table.cluster_keys[: self.n_clusters])
        out = np.empty(keys.shape[0], np.int64)
        for start in range(0, keys.shape[0], chunk):
            block = self._augment(keys[start : start + chunk])
            out[start : start + chunk] = np.argmax(block @ centres.T, axis=1)
        return out

    def _nearest_among(self, key: np.ndarray, clusters: list[int]) -> int:
        """The cluster among ``clusters`` nearest to ``key`` (augmented inner product)."""
        cand = self._augment(self.table.cluster_keys[np.asarray(clusters)])
        return int(clusters[int(np.argmax(cand @ self._augment(key[None])[0]))])

    def _build_routing(self, centre_levels: np.ndarray) -> None:
        """Bulk routing: each cluster hangs, at its top level, under a near node one level up.

        Parents are capacity-limited (at most ``FANOUT_CAP`` times the average number of children):
        nearest-parent assignment alone makes hubs with hundreds of children and huge radii, and a
        beam that picks a hub then scores all of them. A child whose nearest parents are all full
        takes the nearest one anyway, so nothing is ever left without a parent."""
        top = int(centre_levels.max()) if len(centre_levels) else 0
        routing = Routing()
        for level in range(1, top + 1):
            routing.nodes.append([int(c) for c in np.flatnonzero(centre_levels >= level)])
        for level in range(1, top + 1):
            nodes = np.asarray(routing.nodes[level - 1], np.int64)
            parents = np.where(centre_levels[nodes] > level, nodes, -1)  # present one level up: itself
            above = np.asarray(routing.nodes[level] if level < top else [], np.int64)
            orphans = np.flatnonzero(parents < 0)
            if len(above) and len(orphans):
                parents[orphans] = self._capped_parents(nodes[orphans], above, n_children=len(nodes))
            routing.parents.append([int(p) for p in parents])
        self.routing = routing

    def _capped_parents(self, children: np.ndarray, above: np.ndarray, n_children: int) -> np.ndarray:
        """Parent (a cluster id in ``above``) for each child cluster, nearest first, capacity-limited."""
        keys = self.table.cluster_keys
        sim = self._augment(keys[children]) @ self._augment(keys[above]).T  # [c, a]
        capacity = max(2, int(np.ceil(FANOUT_CAP * n_children / len(above))))
        load = np.ones(len(above), np.int64)  # every parent is also its own child at this level
        k = min(8, len(above))
        candidates = np.argsort(-sim, axis=1)[:, :k] if k == len(above) else np.argpartition(-sim, k - 1, axis=1)[:, :k]
        candidates = np.take_along_axis(candidates, np.argsort(-np.take_along_axis(sim, candidates, 1), axis=1), 1)
        out = np.empty(len(children), np.int64)
        for i in np.argsort(-sim[np.arange(len(children)), candidates[:, 0]], kind="stable"):
            free = [a for a in candidates[i] if load[a] < capacity]
            choice = free[0] if free else candidates[i, 0]
            load[choice] += 1
            out[i] = above[choice]
        return out

    def _renumber_in_routing_order(self, assign: np.ndarray) -> np.ndarray:
        """Renumber clusters so that siblings (children of one routing node) have consecutive ids:
        a query then reads the keys of the clusters it scores as contiguous runs of memory, which
        matters once the index no longer fits in cache (1M tokens). Returns the renumbered assign."""
        if self.routing.n_levels < 2:
            return assign
        snap = self.routing.snapshot()
        order = snap.cluster[snap.block_start[-2] : snap.block_start[-1]]  # level-1 block, sibling-grouped
        new_id = np.empty(len(order), np.int64)
        new_id[order] = np.arange(len(order))
        self.table.permute_clusters(order)
        self.routing.nodes = [[int(new_id[c]) for c in level] for level in self.routing.nodes]
        self.routing.parents = [[int(new_id[p]) if p >= 0 else -1 for p in level] for level in self.routing.parents]
        self.routing._snapshot = None
        return new_id[assign]

    def _pack_clusters(self, keys: np.ndarray, values: np.ndarray, assign: np.ndarray) -> None:
        """Cut every cluster's tokens into pages and write them to the pool."""
        aug = self._augment(keys)
        order = np.argsort(assign, kind="stable")
        bounds = np.searchsorted(assign[order], np.arange(self.n_clusters + 1))
        groups: list[tuple[int, list[np.ndarray]]] = []
        for c in range(self.n_clusters):
            members = order[bounds[c] : bounds[c + 1]]
            groups.append((c, self._cut(aug[members], members)))
        self.table.write_new_pages(groups, keys, values)

    def _cut(self, aug: np.ndarray, members: np.ndarray) -> list[np.ndarray]:
        """Split one cluster's members into near-equal pages (token-id arrays)."""
        if self.config.packing == "pca":
            perm, bounds = K.pca_pack(np.ascontiguousarray(aug), self.page_size, self._direction, PCA_ITERS)
        else:
            perm = np.argsort(aug @ self._direction, kind="stable")
            n_pages = -(-len(members) // self.page_size)
            bounds = (np.arange(n_pages + 1) * len(members)) // n_pages
        return [members[perm[bounds[p] : bounds[p + 1]]] for p in range(len(bounds) - 1)]

    # ------------------------------------------------------------------ insert
    def insert(self, keys: np.ndarray, values: np.ndarray) -> InsertResult:
        """Append tokens (e.g. a page leaving the decode window). keys, values: [n, head_dim].

        Continues the promotion schedule; a promoted token opens a new cluster, any other token
        joins the page of its nearest cluster whose centroid is nearest, splitting it when full.
        """
        keys, values = check_keys(keys, values, self.head_dim)
        if self.n_tokens == 0:
            self.build(keys, values)
            pages = np.arange(self.n_pages, dtype=np.int32)
            return InsertResult(dirty_pages=pages, new_pages=pages)
        dirty: set[int] = set()
        first_new = self.n_pages
        self._radius_cache = None
        self._insert_centres = None  # augmented cluster keys, shared by the rows of this batch
        row, spare = 0, EMPTY
        while row < keys.shape[0]:
            if self.fast_insert:
                done, wants_split = self._insert_plain_run(keys, values, row, dirty, spare)
                row, spare = row + done, EMPTY
                if wants_split and self._can_split_in_kernel():
                    spare = self.table._reserve(1).astype(np.int64)  # the next call's first row splits into it
                    continue
            if row < keys.shape[0]:  # a cluster centre, or a split the kernel cannot make: the Python path
                dirty.update(self._insert_one(keys[row], values[row]))
                row += 1
        self._insert_centres = None
        new = np.arange(first_new, self.n_pages, dtype=np.int32)
        return InsertResult(dirty_pages=np.asarray(sorted(dirty), np.int32), new_pages=new)

    def _insert_plain_run(self, keys: np.ndarray, values: np.ndarray, start: int, dirty: set[int],
                          spare: np.ndarray) -> tuple[int, bool]:
        """Rows ``start..`` that :meth:`_insert_one` would append to a page, or split a page into
        the reserved index page ``spare`` [0 or 1] for, in one numba call
        (``kernels.insert.insert_run``); stops before the first row that needs the Python path or
        another reserved page. Returns (rows inserted, whether it stopped at a split)."""
        t = self.table
        cached = self._insert_centres
        if cached is None or cached[0] != self.n_clusters:
            cached = (self.n_clusters, -1.0, np.empty((self.n_clusters, self.head_dim + 1), np.float32))
        n = keys.shape[0] - start
        pages, split_new = np.empty(n, np.int64), np.full(n, -1, np.int64)
        done, self.max_sq_norm, centres_norm, used, wants_split = insert_run(
            keys, values, start, self.n_tokens, self.config.promote_every, self.max_sq_norm, cached[2], cached[1],
            t.cluster_keys, t.cluster_size, t.cluster_radius, self.n_clusters, t.cluster_first_page, t.page_next,
            t.page_count, t.page_tokens, t.key_index, t.key_pages, pages,
            spare, split_new, self._direction, PCA_ITERS, t.page_cluster, t.cluster_last_page, t.cluster_n_pages,
        )
        t.unreserve(len(spare) - used)
        if t.own_keys and done:  # the kernel wrote the float32 key copy; the 16-bit pool rows here
            tokens = np.arange(self.n_tokens, self.n_tokens + done)
            t.store_inserted(pages[:done], tokens, keys[start : start + done], values[start : start + done])
        self._insert_centres = (self.n_clusters, centres_norm, cached[2])
        self.n_tokens += done
        dirty.update(pages[:done].tolist())
        dirty.update(split_new[split_new >= 0].tolist())
        return done, wants_split

    def _can_split_in_kernel(self) -> bool:
        """Splits run in the kernel with a float32 pool that has a free page; otherwise (a 16-bit
        pool: its rows are encoded in Python; an exhausted pool: the Python path raises
        PoolExhausted, keeping the earlier rows) in :meth:`_split`."""
        return not self.table.own_keys and self.table.pool.num_free > 0

    def _nearest_cluster_for_insert(self, key: np.ndarray) -> int:
        """Nearest cluster of one new key; the augmented centres are computed once per batch (and
        again only after a new cluster or a larger M), which keeps insertion cheap at 1M tokens."""
        cached = self._insert_centres
        if cached is None or cached[0] != self.n_clusters or cached[1] != self.max_sq_norm:
            centres = np.empty((self.n_clusters, self.head_dim + 1), np.float32)
            augment_centres(self.table.cluster_keys, self.n_clusters, self.max_sq_norm, centres)
            self._insert_centres = cached = (self.n_clusters, self.max_sq_norm, centres)
        return int(nearest_cluster(cached[2], self.n_clusters, key, self.max_sq_norm))

    def _insert_one(self, key: np.ndarray, value: np.ndarray) -> list[int]:
        """Insert one token; on PoolExhausted nothing of this token is kept (earlier ones are)."""
        token = self.n_tokens
        level = level_of(token, self.config.promote_every, self.config.promote_every_upper)
        self.max_sq_norm = max(self.max_sq_norm, float(sq_norm(key)))  # the kernel's sum, so both paths agree
        if level == 0:
            cluster = self._nearest_cluster_for_insert(key)
            dirty = self._add_to_cluster(cluster, token, key, value)
        else:
            cluster = self.table.add_cluster(key)
            try:
                dirty = [self.table.new_page(cluster, np.asarray([token]), key[None], value[None])]
            except Exception:
                self.table.n_clusters -= 1  # the cluster was the last one added: forget it
                raise
            above = self.routing.top_nodes(level + 1)
            self.routing.add(cluster, level, self._nearest_among(key, above) if above else -1)
        self.table.add_member(cluster, key)
        self.n_tokens = token + 1
        return dirty

    def _add_to_cluster(self, cluster: int, token: int, key: np.ndarray, value: np.ndarray) -> list[int]:
        """Put one token into the nearest (by centroid) page of its cluster that has room; when
        every page of the cluster is full, split the nearest one. Preferring pages with room keeps
        pages nearly full (a half-empty page wastes a device slot at decode time)."""
        t = self.table
        where = (key, self.max_sq_norm, int(t.cluster_first_page[cluster]), t.page_next, t.page_count, t.key_index,
                 t.key_pages, self.page_size)
        page = nearest_page(*where, True)
        if page >= 0:
            self.table.append_row(page, token, key, value)
            return [page]
        return self._split(nearest_page(*where, False), token, key, value)

    def _split(self, page: int, token: int, key: np.ndarray, value: np.ndarray) -> list[int]:
        """Bisect a full page plus the new token along its principal direction into two pages."""
        tokens, keys, values = self.table.page_rows(page)
        tokens = np.append(tokens, token)
        keys = np.vstack([keys, key[None]])
        values = np.vstack([values, value[None]])
        perm, bounds = split_order(keys, self.max_sq_norm, self._direction, PCA_ITERS)
        left, right = perm[bounds[0] : bounds[1]], perm[bounds[1] : bounds[2]]
        # allocate the new page first: if the pool is exhausted the old page is still intact
        new = self.table.new_page(int(self.table.page_cluster[page]), tokens[right], keys[right], values[right], after=page)
        self.table.rewrite_page(page, tokens[left], keys[left], values[left])
        return [page, new]

    # ------------------------------------------------------------------ query
    def query(self, queries: np.ndarray, k: int, n_tokens: int = 0) -> QueryResult:
        """Top-k pages for the query heads of this KV head, then (``n_tokens`` > 0) the
        ``n_tokens`` single tokens of largest group mass among the other candidate pages' tokens.

        queries: [H, head_dim] post-RoPE queries of the group (H >= 1); k: pages wanted (> 0).
        Returns min(k, n_pages) pages ranked by the configured page score and GQA rule. Single
        tokens recover the mass that page granularity leaves behind: a page is kept whole or not
        at all, so tokens attended strongly but alone in their page are lost to pages of diffuse
        mass (see README "Token slots"). Step-by-step reference of :meth:`select_fast`.
        """
        qs = check_queries(queries, self.head_dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k={k!r}: must be a positive integer")
        if self.n_pages == 0:
            empty = np.zeros(0, np.int32)
            return QueryResult(empty, empty, empty, 0)
        candidates = self._candidate_pages(qs, int(k), int(n_tokens))
        t = self.table
        scores = K.score_pages(qs, t.key_pages, t.key_index, t.page_count, candidates)
        use_mass = self.config.page_score == "mass"
        if n_tokens > 0:
            values, mass = K.page_values_and_token_mass(scores, self.scale, use_mass)
        else:
            values = K.page_log_values(scores, self.scale, use_mass)
        position = merge_group(values, int(k), self.config.gqa)
        chosen = candidates[position].astype(np.int32)
        token_pages, token_rows = np.zeros(0, np.int64), np.zeros(0, np.int64)
        if n_tokens > 0 and len(position) < len(candidates):
            counts = self.table.page_count[candidates].astype(np.int64)
            picks = K.top_tokens_outside(mass, counts, position.astype(np.int64), int(n_tokens))
            token_pages, token_rows = candidates[picks // self.page_size], picks % self.page_size
        return QueryResult(
            pages=chosen,
            counts=self.table.page_count[chosen].copy(),
            pool_pages=self.table.page_pool[chosen].copy(),
            n_scored=int(self.table.page_count[candidates].sum()),
            token_pages=token_pages,
            token_rows=token_rows,
        )

    def select_fast(self, qs: np.ndarray, k: int, n_tokens: int = 0) -> tuple:
        """The decode hot path: :meth:`query` in one numba call (``kernels.mdci.select_pages``).

        qs: [H, head_dim] C-contiguous float32, finite (not re-validated here); k > 0.
        Returns (index pages, pool pages, valid rows), each [min(k, n_pages)], ranked like
        :meth:`query` (which it falls back to for the ``interleave`` rule and rare widenings),
        then the single tokens' (index pages, rows), each [<= n_tokens].
        """
        if self.n_pages == 0:
            empty = np.zeros(0, np.int32)
            return empty, empty, empty, empty, empty
        chosen, ok = np.zeros(0, np.int64), self.config.gqa != "interleave"
        if ok:
            snap = self.routing.snapshot()
            width = self._beam_width(k, n_tokens)
            t = self.table
            chosen, token_pages, token_rows, ok = K.select_pages(
                qs, t.cluster_keys, self._node_slack(snap),
                snap.cluster, snap.block_start, snap.child_start, snap.child_end,
                int(math.ceil(width * self.config.beam.upper_factor)), width, self.n_clusters, self.n_pages,
                t.cluster_first_page, t.page_next, t.key_pages, t.key_index, t.page_count,
                self.scale, self.config.page_score == "mass", self.config.gqa == "max", int(k), int(n_tokens),
            )
        if not ok:
            r = self.query(qs, k, n_tokens)
            return r.pages, r.pool_pages, r.counts, r.token_pages, r.token_rows
        return chosen, self.table.page_pool[chosen], self.table.page_count[chosen], token_pages, token_rows

    def _beam_width(self, k: int, n_tokens: int) -> int:
        """Level-1 beam width for a query of ``k`` pages and ``n_tokens`` single tokens."""
        slots = int(k) + -(-int(n_tokens) // self.page_size)
        return self.config.beam.clusters(self.n_clusters, self.n_pages, slots)

    def _candidate_pages(self, qs: np.ndarray, k: int, n_tokens: int = 0) -> np.ndarray:
        """Pages of the clusters chosen by the beam (widened until they hold >= k pages)."""
        width = self._beam_width(k, n_tokens)
        if k >= self.n_pages or width >= self.n_clusters:  # the beam would take every cluster
            return np.arange(self.n_pages, dtype=np.int64)
        snap = self.routing.snapshot()
        upper = int(math.ceil(width * self.config.beam.upper_factor))
        nodes, scores = K.route_clusters(
            qs,
            self.table.cluster_keys,
            self._node_slack(snap),
            snap.cluster,
            snap.block_start,
            snap.child_start,
            snap.child_end,
            upper,
        )
        clusters = snap.cluster[nodes]
        union = K.head_union(clusters, scores, width, self.n_clusters)
        pages = K.cluster_pages(self.table.cluster_first_page, self.table.page_next, union)
        if len(pages) < k:  # rare: the beam's clusters hold fewer than k pages
            order = self._widened_order(union, clusters, scores)
            need = int(np.searchsorted(np.cumsum(self.table.cluster_n_pages[order]), k)) + 1
            pages = K.cluster_pages(self.table.cluster_first_page, self.table.page_next, order[:need])
        return pages

    def _widened_order(self, union: np.ndarray, clusters: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The union first, then the other scored clusters by best score, then all the rest."""
        scored = clusters[np.argsort(-scores.max(axis=0), kind="stable")]
        scored = scored[~np.isin(scored, union)]
        rest = np.setdiff1d(np.arange(self.n_clusters), np.concatenate([union, scored]))
        return np.concatenate([union, scored, rest]).astype(np.int64)

    def _node_slack(self, snap) -> np.ndarray:
        """radius_weight x subtree radius of every routing node ([R] float32), cached until the next insert."""
        if self._radius_cache is None or self._radius_cache[0] is not snap:
            radius = K.subtree_radius(
                self.table.cluster_keys, self.table.cluster_radius, snap.cluster,
                snap.block_start, snap.child_start, snap.child_end,
            )
            self._radius_cache = (snap, radius * np.float32(self.config.radius_weight))
        return self._radius_cache[1]

    # ------------------------------------------------------------------ introspection
    def token_locations(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index page, row in page) of each token id in ``tokens`` [n]; the inverse map is
        cached until the next insert."""
        if self._token_loc is None or self._token_loc[0] != self.n_tokens:
            table = self.table.page_tokens[: self.n_pages]
            flat = np.full(self.n_tokens, -1, np.int64)
            where = np.flatnonzero(table.reshape(-1) >= 0)
            flat[table.reshape(-1)[where]] = where
            self._token_loc = (self.n_tokens, flat)
        flat = self._token_loc[1][tokens]
        return flat // self.page_size, flat % self.page_size

    def token_pages(self) -> np.ndarray:
        """Index page holding each token. Returns [n_tokens] int32 (every token is in exactly one page)."""
        return self.table.token_pages(self.n_tokens)

    def release(self) -> None:
        """Return this index's pages to the pool."""
        self.table.release()

