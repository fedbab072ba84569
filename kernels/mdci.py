"""Numba kernels for the M-DCI index: page packing, beam routing and candidate scoring.

Every kernel here has a slow NumPy twin in :mod:`icecache_ray.kernels.reference` and a parity
test. Kernels take plain arrays only (no objects), so they compile once and are cached on disk, and
all of them release the GIL (``nogil=True``): an index's background builds and inserts run beside
the step loop's Python instead of holding the interpreter lock it needs.
Keys handed to kernels are float32 (numba has no float16 on CPU).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import intrinsic

NEG_INF = np.float32(-np.inf)
# Reassociation lets the float32 dot products vectorise; no "no-NaN/no-inf" assumptions are made
# (empty slots hold -inf), so comparisons stay exact.
FAST = {"reassoc", "contract", "nsz", "arcp"}


# exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln(2) / 2; ln 2 split in two so k * LN2_HI is exact.
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_EXP_MIN_ARG = -708.0  # below: 0 (the smallest normal double is e^-708.4)


@intrinsic
def _bits_as_float64(typingctx, bits):
    """Reinterpret an int64's bits as a float64 (builds 2^k from its exponent bits)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@njit(cache=True, nogil=True, fastmath={"contract"})  # no reassociation: the two-part reduction must stay exact
def exp_vec(x: float) -> float:
    """exp(x) for x <= 709 within 1 ulp of libm, 0 below -708 (and for -inf / NaN).

    A branch-light polynomial so that loops calling it vectorise (numba's ``np.exp`` is one libm
    call per element, which made page masses the largest cost of a query); degree 13 Taylor on
    |r| <= 0.35 leaves a truncation error < 1e-17.
    """
    if not x >= _EXP_MIN_ARG:
        return 0.0
    k = np.floor(x * _LOG2E + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (1 / 5040 + r * (
        1 / 40320 + r * (1 / 362880 + r * (1 / 3628800 + r * (1 / 39916800 + r * (1 / 479001600 + r / 6227020800))))))))))))
    return p * _bits_as_float64((np.int64(k) + 1023) << 52)


# fastmath: the dot products vectorize (2.6x faster packing, the build's largest part; 1 cluster in
# 2,000 split differently at a float tie, measured 2026-12-07). The reference allows such ties.
@njit(cache=True, nogil=True, fastmath=FAST)
def _principal_direction(x: np.ndarray, idx: np.ndarray, start: int, end: int, init: np.ndarray, n_iter: int) -> tuple:
    """Mean and (power-iteration) principal direction of rows ``x[idx[start:end]]``.

    x: [n, D] float32; init: [D] float32 start vector. Returns (mean [D], direction [D]).
    """
    dim = x.shape[1]
    m = end - start
    mean = np.zeros(dim, np.float32)
    for i in range(start, end):
        row = x[idx[i]]
        for j in range(dim):
            mean[j] += row[j]
    for j in range(dim):
        mean[j] /= m
    v = init.copy()
    for _ in range(n_iter):
        acc = np.zeros(dim, np.float32)
        for i in range(start, end):
            row = x[idx[i]]
            t = np.float32(0.0)
            for j in range(dim):
                t += (row[j] - mean[j]) * v[j]
            for j in range(dim):
                acc[j] += t * (row[j] - mean[j])
        norm = np.float32(0.0)
        for j in range(dim):
            norm += acc[j] * acc[j]
        if norm <= 1e-30:
            break  # all rows identical: keep the previous direction
        norm = np.sqrt(norm)
        for j in range(dim):
            v[j] = acc[j] / norm
    return mean, v


@njit(cache=True, nogil=True, fastmath=FAST)
def pca_pack(x: np.ndarray, page_size: int, init: np.ndarray, n_iter: int) -> tuple:
    """Cut the rows of ``x`` into ceil(n / page_size) pages by recursive principal-direction bisection.

    x: [n, D] float32 (augmented keys of one cluster); init: [D] float32.
    Returns (order [n] int64 row permutation, bounds [n_pages + 1] int64): page p holds rows
    ``order[bounds[p]:bounds[p+1]]``. Page sizes are near-equal and never exceed ``page_size``.
    """
    n = x.shape[0]
    n_pages = (n + page_size - 1) // page_size
    order = np.arange(n)
    bounds = np.zeros(n_pages + 1, np.int64)
    # explicit stack of segments (start, end, pages, first_page) instead of recursion
    stack = np.zeros((2 * n_pages + 2, 4), np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = 0, n, n_pages, 0
    top = 1
    while top > 0:
        top -= 1
        start, end, pages, first = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        if pages == 1:
            bounds[first] = start
            bounds[first + 1] = end
            continue
        m = end - start
        left_pages = pages // 2
        n_left = (m * left_pages) // pages
        mean, v = _principal_direction(x, order, start, end, init, n_iter)
        proj = np.empty(m, np.float32)
        for i in range(m):
            row = x[order[start + i]]
            t = np.float32(0.0)
            for j in range(x.shape[1]):
                t += (row[j] - mean[j]) * v[j]
            proj[i] = t
        perm = np.argsort(proj, kind="mergesort")
        seg = order[start:end].copy()
        for i in range(m):
            order[start + i] = seg[perm[i]]
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = start, start + n_left, left_pages, first
        top += 1
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = start + n_left, end, pages - left_pages, first + left_pages
        top += 1
    return order, bounds


@njit(cache=True, nogil=True, fastmath=FAST)
def route_clusters(
    qs: np.ndarray,
    cluster_keys: np.ndarray,
    node_slack: np.ndarray,
    r_cluster: np.ndarray,
    r_block_start: np.ndarray,
    r_child_start: np.ndarray,
    r_child_end: np.ndarray,
    beam_upper: int,
) -> tuple:
    """Beam search from the top level down to level 1 (the clusters).

    qs: [H, d] float32 query heads of one KV head; cluster_keys: [C, d] float32 routing keys of
    the level-1 nodes (their members' mean); node_slack: [R] float32 added as ``|q| * slack`` to a
    node's score (radius_weight * subtree radius), so wide subtrees are not pruned early; r_cluster: [R] cluster id of each routing node, level blocks top-first;
    r_block_start: [L + 1] start of each level block in r_* (block L-1 = level 1);
    r_child_start/r_child_end: [R] range of a node's children (flat positions, next block down).
    At every level above 1, each head keeps its ``beam_upper`` best nodes and the union is expanded.
    Returns (level1_nodes [m] int64 flat positions, scores [H, m] float32 routing scores).
    """
    n_heads, dim = qs.shape
    qnorm = np.empty(n_heads, np.float32)
    for h in range(n_heads):
        acc = np.float32(0.0)
        for j in range(dim):
            acc += qs[h, j] * qs[h, j]
        qnorm[h] = np.sqrt(acc)
    n_blocks = r_block_start.shape[0] - 1
    current = np.arange(r_block_start[0], r_block_start[1])
    for b in range(n_blocks):
        m = current.shape[0]
        scores = np.empty((n_heads, m), np.float32)
        for i in range(m):
            key = cluster_keys[r_cluster[current[i]]]
            for h in range(n_heads):
                t = np.float32(0.0)
                for j in range(dim):
                    t += qs[h, j] * key[j]
                scores[h, i] = t + qnorm[h] * node_slack[current[i]]
        if b == n_blocks - 1:
            return current, scores
        keep = np.zeros(m, np.bool_)
        width = min(beam_upper, m)
        for h in range(n_heads):
            # O(m) selection of the best ``width`` (ties at the threshold may add a few more)
            threshold = -np.partition(-scores[h], width - 1)[width - 1]
            for i in range(m):
                if scores[h, i] >= threshold:
                    keep[i] = True
        total = 0
        for i in range(m):
            if keep[i]:
                total += r_child_end[current[i]] - r_child_start[current[i]]
        nxt = np.empty(total, np.int64)
        pos = 0
        for i in range(m):
            if keep[i]:
                node = current[i]
                for c in range(r_child_start[node], r_child_end[node]):
                    nxt[pos] = c
                    pos += 1
        current = nxt
    return current, np.empty((n_heads, 0), np.float32)


@njit(cache=True, nogil=True, fastmath=FAST)
def score_pages(
    qs: np.ndarray, pool_pages: np.ndarray, page_pool: np.ndarray, page_count: np.ndarray, pages: np.ndarray
) -> np.ndarray:
    """Exact q.k of every token in the given pages.

    qs: [H, d] float32; pool_pages: [capacity, 2 or 1, P, d] float32, the whole C-contiguous pool
    or the index's float32 key copy of a 16-bit pool (K rows at index 0 of axis 1; a contiguous
    array lets the inner loop vectorise); page_pool: [n_pages] row of each index page in it;
    page_count: [n_pages] valid rows; pages: [m] index pages.
    Returns [H, m, P] float32 with -inf in empty slots.
    """
    n_heads, dim = qs.shape
    psize = pool_pages.shape[2]
    out = np.full((n_heads, pages.shape[0], psize), NEG_INF, np.float32)
    for i in range(pages.shape[0]):
        pid = page_pool[pages[i]]
        for s in range(page_count[pages[i]]):
            for h in range(n_heads):
                t = np.float32(0.0)
                for j in range(dim):
                    t += qs[h, j] * pool_pages[pid, 0, s, j]
                out[h, i, s] = t
    return out


@njit(cache=True, nogil=True)
def cluster_pages(cluster_first_page: np.ndarray, page_next: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """All pages of the given clusters, following each cluster's page list. Returns [m] int64."""
    total = 0
    for c in clusters:
        p = cluster_first_page[c]
        while p >= 0:
            total += 1
            p = page_next[p]
    out = np.empty(total, np.int64)
    pos = 0
    for c in clusters:
        p = cluster_first_page[c]
        while p >= 0:
            out[pos] = p
            pos += 1
            p = page_next[p]
    return out


@njit(cache=True, nogil=True)
def subtree_radius(
    cluster_keys: np.ndarray,
    cluster_radius: np.ndarray,
    r_cluster: np.ndarray,
    r_block_start: np.ndarray,
    r_child_start: np.ndarray,
    r_child_end: np.ndarray,
) -> np.ndarray:
    """Radius of every routing node's subtree around its key, bottom-up.

    A level-1 node's radius is its cluster's; an upper node's is the max over its children of
    (|child key - node key| + child radius), and at least its own cluster's. Returns [R] float32.
    """
    n = r_cluster.shape[0]
    dim = cluster_keys.shape[1]
    radius = np.empty(n, np.float32)
    for i in range(n):
        radius[i] = cluster_radius[r_cluster[i]]
    n_blocks = r_block_start.shape[0] - 1
    for b in range(n_blocks - 2, -1, -1):
        for node in range(r_block_start[b], r_block_start[b + 1]):
            key = cluster_keys[r_cluster[node]]
            for c in range(r_child_start[node], r_child_end[node]):
                child = cluster_keys[r_cluster[c]]
                acc = np.float32(0.0)
                for j in range(dim):
                    diff = child[j] - key[j]
                    acc += diff * diff
                reach = np.sqrt(acc) + radius[c]
                if reach > radius[node]:
                    radius[node] = reach
    return radius


@njit(cache=True, nogil=True, fastmath=FAST)
def page_log_values(token_scores: np.ndarray, scale: float, use_mass: bool) -> np.ndarray:
    """Per-head page values from exact token scores (see ``icecache_ray.index.select``).

    token_scores: [H, m, P] q.k (-inf in empty slots). Logits ``scale * q.k`` are normalised per
    head over all candidate tokens; a page's value is its best token's log-probability, or with
    ``use_mass`` the log of its total probability. Returns [H, m] float64.
    One exp per token (:func:`exp_vec`, which vectorises): page masses are taken relative to the
    head's peak logit (a page whose mass underflows that way is recomputed relative to its own best
    token).
    """
    return _page_values(token_scores, scale, use_mass, np.zeros((0, 0)))


@njit(cache=True, nogil=True, fastmath=FAST)
def page_values_and_token_mass(token_scores: np.ndarray, scale: float, use_mass: bool) -> tuple:
    """:func:`page_log_values` and, from the same exponentials, each candidate token's
    probability summed over the heads ([m, P] float64, 0 in empty slots: the group mass the token
    slots rank by)."""
    mass = np.zeros((token_scores.shape[1], token_scores.shape[2]))
    return _page_values(token_scores, scale, use_mass, mass), mass


@njit(cache=True, nogil=True, fastmath=FAST)
def _page_values(token_scores: np.ndarray, scale: float, use_mass: bool, token_mass: np.ndarray) -> np.ndarray:
    """The body of :func:`page_log_values`; adds each token's per-head probability into
    ``token_mass`` [m, P] unless it is empty ([0, 0])."""
    n_heads, m, psize = token_scores.shape
    want_tokens = token_mass.shape[0] > 0
    out = np.empty((n_heads, m))
    mass = np.empty(m)
    best = np.empty(m)
    exps = np.empty((m, psize)) if want_tokens else np.empty((0, 0))
    for h in range(n_heads):
        # Two passes: a max reduction in the exp loop would keep it from vectorising.
        peak = -np.inf
        for i in range(m):
            top = -np.inf
            for s in range(psize):
                v = token_scores[h, i, s] * scale
                if v > top:
                    top = v
            best[i] = top
            if top > peak:
                peak = top
        total = 0.0
        if want_tokens:
            for i in range(m):
                acc = 0.0
                for s in range(psize):
                    e = exp_vec(token_scores[h, i, s] * scale - peak)
                    exps[i, s] = e
                    acc += e
                mass[i] = acc
                total += acc
            if total > 0.0:
                inv = 1.0 / total
                for i in range(m):
                    for s in range(psize):
                        token_mass[i, s] += exps[i, s] * inv
        else:
            for i in range(m):
                acc = 0.0
                for s in range(psize):  # empty slots (-inf) add exp(-inf) = 0
                    acc += exp_vec(token_scores[h, i, s] * scale - peak)
                mass[i] = acc
                total += acc
        log_total = peak + np.log(total)
        for i in range(m):
            if best[i] == -np.inf:
                out[h, i] = -np.inf
            elif not use_mass:
                out[h, i] = best[i] - log_total
            elif mass[i] > 0.0:
                out[h, i] = np.log(mass[i]) + peak - log_total
            else:
                acc = 0.0
                for s in range(psize):
                    acc += exp_vec(token_scores[h, i, s] * scale - best[i])
                out[h, i] = best[i] + np.log(acc) - log_total
    return out


@njit(cache=True, nogil=True)
def head_union(clusters: np.ndarray, scores: np.ndarray, width: int, n_clusters: int) -> np.ndarray:
    """Union of every head's top-``width`` clusters, rank by rank (rank 1 of every head first).

    clusters: [m] cluster id of each scored node; scores: [H, m]. Returns [u] int64.
    """
    n_heads, m = scores.shape
    width = min(width, m)
    ranked = np.empty((n_heads, width), np.int64)
    for h in range(n_heads):
        ranked[h] = np.argsort(-scores[h], kind="mergesort")[:width]
    seen = np.zeros(n_clusters, np.bool_)
    out = np.empty(n_heads * width, np.int64)
    n = 0
    for r in range(width):
        for h in range(n_heads):
            c = clusters[ranked[h, r]]
            if not seen[c]:
                seen[c] = True
                out[n] = c
                n += 1
    return out[:n]


@njit(cache=True, nogil=True)
def merge_top_pages(values: np.ndarray, k: int, use_max: bool) -> np.ndarray:
    """GQA merge of per-head page values [H, m] (log scale) for the ``sum`` / ``max`` rules:
    combined = sum_h exp(v) (total softmax mass) or max_h v; returns the best min(k, m) positions,
    best first, ties broken by position (a stable sort, like ``index.select.merge_group``)."""
    n_heads, m = values.shape
    combined = np.empty(m)
    for i in range(m):
        acc = -np.inf if use_max else 0.0
        for h in range(n_heads):
            if use_max:
                acc = max(acc, values[h, i])
            else:
                acc += np.exp(values[h, i])
        combined[i] = -acc
    return np.argsort(combined, kind="mergesort")[: min(k, m)]


@njit(cache=True, nogil=True)
def top_tokens_outside(mass: np.ndarray, counts: np.ndarray, chosen: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` valid candidate tokens of largest ``mass`` outside the ``chosen`` pages.

    mass: [m, P] (from :func:`page_values_and_token_mass`); counts: [m] valid rows of each
    candidate page; chosen: [c] candidate positions already taken whole. Returns flat positions
    ``i * P + s`` [min(n, available)] int64, ascending; among equal masses the lowest positions win
    (a stable sort's order). One pass in position order with a size-n heap whose root is the
    weakest entry held: most tokens lose one comparison against it.
    """
    m, psize = mass.shape
    taken = np.zeros(m, np.bool_)
    for c in chosen:
        taken[c] = True
    heap_v = np.empty(max(n, 0))
    heap_p = np.empty(max(n, 0), np.int64)
    size = 0
    for i in range(m):
        if taken[i] or n <= 0:
            continue
        for s in range(counts[i]):
            v, pos = mass[i, s], i * psize + s
            if size < n:  # sift up: an entry rises above parents weaker than itself
                j = size
                size += 1
                while j > 0:
                    parent = (j - 1) >> 1
                    if heap_v[parent] < v or (heap_v[parent] == v and heap_p[parent] > pos):
                        break
                    heap_v[j], heap_p[j] = heap_v[parent], heap_p[parent]
                    j = parent
                heap_v[j], heap_p[j] = v, pos
            elif v > heap_v[0]:  # positions only grow, so an equal mass never displaces an entry
                j = 0
                while True:  # replace the root, sift down below children weaker than itself
                    child = 2 * j + 1
                    if child >= size:
                        break
                    if child + 1 < size and (heap_v[child + 1] < heap_v[child]
                                             or (heap_v[child + 1] == heap_v[child] and heap_p[child + 1] > heap_p[child])):
                        child += 1
                    if v < heap_v[child] or (v == heap_v[child] and pos > heap_p[child]):
                        break
                    heap_v[j], heap_p[j] = heap_v[child], heap_p[child]
                    j = child
                heap_v[j], heap_p[j] = v, pos
    return np.sort(heap_p[:size])


@njit(cache=True, nogil=True)  # index actors run several selections at once (select_threads)
def select_pages(
    qs: np.ndarray,
    cluster_keys: np.ndarray,
    node_slack: np.ndarray,
    r_cluster: np.ndarray,
    r_block_start: np.ndarray,
    r_child_start: np.ndarray,
    r_child_end: np.ndarray,
    beam_upper: int,
    width: int,
    n_clusters: int,
    n_pages: int,
    cluster_first_page: np.ndarray,
    page_next: np.ndarray,
    pool_pages: np.ndarray,
    page_pool: np.ndarray,
    page_count: np.ndarray,
    scale: float,
    use_mass: bool,
    use_max: bool,
    k: int,
    n_tokens: int,
) -> tuple:
    """One whole index query in a single call (route -> union -> pages -> score -> merge -> tokens).

    The composition of ``route_clusters``, ``head_union``, ``cluster_pages``, ``score_pages``,
    ``page_log_values``, ``merge_top_pages`` and (``n_tokens`` > 0) ``page_values_and_token_mass`` +
    ``top_tokens_outside``; ``MDCIIndex.query`` is its step-by-step reference. Returns (chosen
    index pages [min(k, n)] int64, the index page [t] and row [t] of each single token picked from
    the other candidate pages, ok). ``ok`` is False (nothing chosen) in the rare case where the
    beam's clusters hold fewer than k pages: the caller then widens in Python.
    """
    if k >= n_pages or width >= n_clusters:  # every page is a candidate: no routing needed
        candidates = np.arange(n_pages)
    else:
        nodes, scores = route_clusters(
            qs, cluster_keys, node_slack, r_cluster, r_block_start, r_child_start, r_child_end, beam_upper
        )
        union = head_union(r_cluster[nodes], scores, width, n_clusters)
        candidates = cluster_pages(cluster_first_page, page_next, union)
        if candidates.shape[0] < k:
            none = np.empty(0, np.int64)
            return none, none, none, False
    token_scores = score_pages(qs, pool_pages, page_pool, page_count, candidates)
    if n_tokens <= 0 or k >= candidates.shape[0]:  # no token slots, or every candidate is taken whole
        none = np.empty(0, np.int64)
        return candidates[merge_top_pages(page_log_values(token_scores, scale, use_mass), k, use_max)], none, none, True
    values, mass = page_values_and_token_mass(token_scores, scale, use_mass)
    chosen = merge_top_pages(values, k, use_max)
    psize = token_scores.shape[2]
    counts = np.empty(candidates.shape[0], np.int64)
    for i in range(candidates.shape[0]):
        counts[i] = page_count[candidates[i]]
    picks = top_tokens_outside(mass, counts, chosen, n_tokens)
    return candidates[chosen], candidates[picks // psize], picks % psize, True


@njit(cache=True, nogil=True)
def plan_slots(held: np.ndarray, held_count: np.ndarray, pool_pages: np.ndarray, counts: np.ndarray) -> tuple:
    """Diff a selection against the pages resident in one (sequence, KV head)'s slots, in place.

    held: [S] int64 pool page per slot (-1 = none); held_count: [S] int64 valid rows per slot;
    pool_pages / counts: [k <= S] the selection. Slots of pages no longer wanted are freed, missing
    pages take the lowest free slots in selection order, and every slot's count is set (0 when
    unused). Returns (missing pages [m] int64, their slots [m] int64). Reference: ``SlotTable.plan_ref``.
    """
    n_slots, k = held.shape[0], pool_pages.shape[0]
    wanted_slot = np.full(k, -1, np.int64)
    for s in range(n_slots):
        found = -1
        for i in range(k):
            if held[s] >= 0 and pool_pages[i] == held[s]:
                found = i
                break
        if found < 0:
            held[s] = -1
            held_count[s] = 0
        else:
            wanted_slot[found] = s
            held_count[s] = counts[found]
    n_missing = 0
    for i in range(k):
        if wanted_slot[i] < 0:
            n_missing += 1
    missing = np.empty(n_missing, np.int64)
    slots = np.empty(n_missing, np.int64)
    m, s = 0, 0
    for i in range(k):
        if wanted_slot[i] < 0:
            while held[s] >= 0:
                s += 1
            held[s] = pool_pages[i]
            held_count[s] = counts[i]
            missing[m] = pool_pages[i]
            slots[m] = s
            m += 1
    return missing, slots


@njit(cache=True, nogil=True)
def plan_slots_batch(
    held: np.ndarray, held_count: np.ndarray, pages: np.ndarray, page_bounds: np.ndarray, counts: np.ndarray,
    dirty: np.ndarray, dirty_bounds: np.ndarray,
) -> tuple:
    """:func:`plan_slots` for n items at once, after forgetting each item's dirty pages.

    held / held_count: [n, S] int64, in place; item i's selection is pages / counts
    [page_bounds[i]:page_bounds[i+1]] and its changed pool pages dirty[dirty_bounds[i]:...] (a slot
    holding one is emptied first, so the page reloads if chosen). Returns (missing pages [m], their
    slots [m], their item [m]), item by item. Reference: a loop of ``SlotTable.invalidate`` + ``plan``.
    """
    n, n_slots = held.shape
    out_pages = np.empty(pages.shape[0], np.int64)
    out_slots = np.empty(pages.shape[0], np.int64)
    out_items = np.empty(pages.shape[0], np.int64)
    m = 0
    for i in range(n):
        for j in range(dirty_bounds[i], dirty_bounds[i + 1]):
            for s in range(n_slots):
                if held[i, s] == dirty[j]:
                    held[i, s] = -1
                    held_count[i, s] = 0
        a, b = page_bounds[i], page_bounds[i + 1]
        missing, slots = plan_slots(held[i], held_count[i], pages[a:b], counts[a:b])
        for j in range(missing.shape[0]):
            out_pages[m], out_slots[m], out_items[m] = missing[j], slots[j], i
            m += 1
    return out_pages[:m], out_slots[:m], out_items[:m]
