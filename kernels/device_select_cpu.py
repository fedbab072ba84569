"""The device selector's step on a CPU, fused into one numba call per layer.

On a CPU "device" memory is host memory, and the selector's ~40 small tensor ops per layer cost
more in dispatch than in arithmetic (measured: 7 ms a layer at 8 rows x 3 KV heads, 4k tokens, one
thread). This kernel does the same work per (row, KV head) in one pass: centroid shortlist →
exact scores over the shortlist's keys (read in place from the pool) → whole pages + single
tokens → slot plan (hits stay, misses take the free slots in order) → copies into the resident
buffer → the slot region of the attention mask. :mod:`icecache_ray.engine.device_select` and
:class:`~icecache_ray.engine.device_slots.DeviceSlots` are its reference (the path CUDA runs);
tests/test_device_select.py checks they choose the same pages, tokens and masks.

Why the loops look as they do (one layer, 8 rows x 3 KV heads, 8k tokens, shortlist 96 pages,
measured 2026-12-07 on the 2-core CI machine): float32 accumulators and a partition-based top-k
took the kernel from 3.3 to 2.1 ms; four heads per pass over a key and :func:`exp_vec` instead
of ``math.exp`` took a real B8 step's 28 calls from 62 to 54 ms (hits only, replayed on one step's
arguments; alternating the two kernels step by step, 68.4 to 62.5 ms of select). What is left is
mostly reading the shortlist's keys (96 pages x 4 KiB per item, scattered over the pool: ~5 GB/s
against 23 GB/s for one sequential read on this machine).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from icecache_ray.kernels.mdci import exp_vec

FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, fastmath=FAST, nogil=True)
def _top(values, k):
    """Positions of the k largest values, largest first (ties: lowest position first).
    Equals ``np.argsort(-values, kind="mergesort")[:k]``; a partition first, so O(n + k log k)."""
    n = values.shape[0]
    if k <= 0:
        return np.empty(0, np.int64)
    if 4 * k >= n:
        return np.argsort(-values, kind="mergesort")[:k]
    kth = -np.partition(-values, k - 1)[k - 1]  # the k-th largest value
    idx = np.empty(k, np.int64)
    a = 0
    for i in range(n):
        if values[i] > kth:
            idx[a] = i
            a += 1
    for i in range(n):
        if a == k:
            break
        if values[i] == kth:
            idx[a] = i
            a += 1
    return idx[np.argsort(-values[idx], kind="mergesort")]


@njit(cache=True, fastmath=FAST, nogil=True)
def _centroid_logits(qs, mean, log_count, count, used, scale, out):
    """out[c] = max over the group's heads of qs[g] . mean[c] * scale + log_count[c] (-inf: no page).
    Returns how many pages are real."""
    groups, d = qs.shape
    real = 0
    for c in range(used):
        if count[c] <= 0:
            out[c] = -np.inf
            continue
        best = -np.inf
        for g in range(groups):
            acc = np.float32(0.0)
            for j in range(d):
                acc += qs[g, j] * mean[c, j]
            best = max(best, acc)
        out[c] = best * scale + log_count[c]
        real += 1
    return real


@njit(cache=True, fastmath=FAST, nogil=True)
def _token_scores(qs, pool, page_ids, counts, scale, scores):
    """scores [g, m, P] = qs . key * scale for every shortlisted token (rows past a page's count
    are left as they are). The group's heads go four at a time (zero rows pad the last block):
    one pass over a key feeds four accumulators, which LLVM vectorises; a loop over the heads
    inside the token loop did not (0.74 vs 0.50 ms a layer, 24 items in cache, 2026-12-07)."""
    groups, d = qs.shape
    q4 = np.zeros((4, d), np.float32)
    for g0 in range(0, groups, 4):
        left = min(4, groups - g0)
        q4[:] = 0.0
        q4[:left] = qs[g0 : g0 + left]
        q0, q1, q2, q3 = q4[0], q4[1], q4[2], q4[3]
        for s in range(len(page_ids)):
            keys = pool[page_ids[s], 0]
            for t in range(counts[s]):
                k = keys[t]
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for j in range(d):
                    a0 += q0[j] * k[j]
                    a1 += q1[j] * k[j]
                    a2 += q2[j] * k[j]
                    a3 += q3[j] * k[j]
                scores[g0, s, t] = a0 * scale
                if left > 1:
                    scores[g0 + 1, s, t] = a1 * scale
                if left > 2:
                    scores[g0 + 2, s, t] = a2 * scale
                if left > 3:
                    scores[g0 + 3, s, t] = a3 * scale


@njit(cache=True, fastmath=FAST, nogil=True)
def _token_mass(qs, pool, page_ids, counts, scale, mass):
    """mass [m, P]: every shortlisted token's softmax mass, summed over the group's heads (the
    softmax of each head runs over all shortlisted tokens); rows past a page's count stay 0.
    The exponentials are :func:`exp_vec` (vectorises; ``math.exp`` is a libm call per token and
    took more than half of this function's time with the keys in cache)."""
    groups = qs.shape[0]
    m, p = mass.shape
    scores = np.full((groups, m, p), -np.inf, np.float32)
    _token_scores(qs, pool, page_ids, counts, scale, scores)
    mass[:] = 0.0
    for g in range(groups):
        top = -np.inf  # a max pass of its own: a max inside the exp loop would keep it from vectorising
        for s in range(m):
            for t in range(p):
                top = max(top, scores[g, s, t])
        total = 0.0
        for s in range(m):
            for t in range(p):  # rows past a count are -inf: exp_vec gives 0
                e = exp_vec(scores[g, s, t] - top)
                scores[g, s, t] = e
                total += e
        if total > 0.0:
            inv = 1.0 / total
            for s in range(m):
                for t in range(p):
                    mass[s, t] += scores[g, s, t] * inv


@njit(cache=True, fastmath=FAST, nogil=True)
def _copy_row(pool, page, row, kv, r, h, dst):
    """K and V of one pool row → resident row ``dst`` of (r, h)."""
    for j in range(pool.shape[3]):
        kv[0, r, h, dst, j] = pool[page, 0, row, j]
        kv[1, r, h, dst, j] = pool[page, 1, row, j]


@njit(cache=True, fastmath=FAST, nogil=True)
def _place_pages(want, want_count, slot_page, slot_count, pool, kv, r, h, slot_start):
    """Slot plan of one (row, KV head): wanted pages already in a slot stay (their count is
    refreshed), the others take the free slots in order and are copied. Returns the copies."""
    n_slots, p = slot_page.shape[0], pool.shape[2]
    keep = np.zeros(n_slots, np.bool_)
    present = np.zeros(len(want), np.bool_)
    for s in range(n_slots):
        for a in range(len(want)):
            if slot_page[s] == want[a]:
                keep[s] = True
                present[a] = True
                slot_count[s] = want_count[a]
    for s in range(n_slots):
        if not keep[s]:
            slot_page[s] = -1
            slot_count[s] = 0
    free, missing = 0, 0
    for a in range(len(want)):
        if present[a]:
            continue
        while keep[free]:
            free += 1
        slot_page[free], slot_count[free] = want[a], want_count[a]
        for t in range(p):
            _copy_row(pool, want[a], t, kv, r, h, slot_start + free * p + t)
        keep[free] = True
        missing += 1
    return missing


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def select_and_load(q, mean, log_count, count, pool_ids, used, pool, shortlist, n_pages, n_tokens, scale,
                    slot_page, slot_count, rows, kv, slot_start, mask, selected, loaded):
    """One layer's selection and loads for every decode row and KV head (see module docstring).

    q [n, H, g, d] float32; summary tables of all rows: mean [R, H, C, d], log_count [R, H, C]
    (-inf = none), count, pool_ids [R, H, C] int64; ``used``: pages in use (C' <= C) to score;
    pool [capacity, 2, P, d]; slot_page / slot_count [R, H, S] (updated); rows [n] buffer rows;
    kv [2, R, H, L, d] resident buffer (written); mask [n, H, L] bool (slot region written);
    selected / loaded [n] int64 page counters (added to)."""
    n, heads, groups, d = q.shape
    p = pool.shape[2]
    n_slots = slot_page.shape[2]
    token_start = slot_start + n_slots * p
    item_selected = np.zeros(n * heads, np.int64)  # per item: items of one row run on different threads
    item_loaded = np.zeros(n * heads, np.int64)
    for item in prange(n * heads):
        i, h = item // heads, item % heads
        r = rows[i]
        qs = q[i, h]  # [g, d]
        # 1. centroid shortlist
        logits = np.empty(used, np.float32)
        real = _centroid_logits(qs, mean[r, h], log_count[r, h], count[r, h], used, scale, logits)
        short = _top(logits, min(shortlist, real))
        m = len(short)
        short_ids = np.empty(m, np.int64)
        short_count = np.empty(m, np.int64)
        for s in range(m):
            short_ids[s], short_count[s] = pool_ids[r, h, short[s]], count[r, h, short[s]]
        # 2. exact mass of the shortlist's tokens; whole pages by their summed mass
        mass = np.zeros((m, p), np.float32)
        _token_mass(qs, pool, short_ids, short_count, scale, mass)
        page_mass = np.empty(m, np.float32)
        for s in range(m):
            page_mass[s] = mass[s].sum()
        chosen = _top(page_mass, min(n_pages, m))
        # 3. slot plan, copies of the misses, the slot region of the mask
        missing = _place_pages(short_ids[chosen], short_count[chosen], slot_page[r, h], slot_count[r, h],
                               pool, kv, r, h, slot_start)
        for s in range(n_slots):
            for t in range(p):
                mask[i, h, slot_start + s * p + t] = t < slot_count[r, h, s]
        # 4. token slots: the largest masses outside the pages taken whole
        for a in range(len(chosen)):
            mass[chosen[a], :] = -1.0
        for s in range(m):
            mass[s, short_count[s]:] = -1.0
        flat = mass.reshape(-1)
        tokens = _top(flat, min(n_tokens, m * p))
        taken = 0
        for a in range(n_tokens):
            ok = a < len(tokens) and flat[tokens[a]] >= 0.0
            mask[i, h, token_start + a] = ok
            if ok:
                _copy_row(pool, short_ids[tokens[a] // p], tokens[a] % p, kv, r, h, token_start + a)
                taken += 1
        token_pages = (taken + p - 1) // p
        item_selected[item] = len(chosen) + token_pages
        item_loaded[item] = missing + token_pages
    for item in range(n * heads):
        selected[item // heads] += item_selected[item]
        loaded[item // heads] += item_loaded[item]


@njit(cache=True, fastmath=FAST, nogil=True)
def apply_changes(rows, heads, pages, pool_pages, counts, pool, mean, pool_tab, count_tab, log_count, slot_page, slot_count):
    """Page changes into one layer's summary (one call instead of ~15 tensor ops: 0.35 ms a layer
    at one row, measured 2026-12-07), the reference being ``PageSummary.apply`` + ``DeviceSlots.drop``.

    Flat [m] arrays rows, heads, pages (index page), pool_pages, counts (valid rows); pool
    [capacity, 2, P, d]; the summary tables mean [R, H, C, d], pool_tab / count_tab / log_count
    [R, H, C] and the slots slot_page / slot_count [R, H, S] are updated in place: each changed
    page's mean key is recomputed from the pool, and any slot holding a changed pool page is freed."""
    d = pool.shape[3]
    for a in range(len(pages)):
        r, h, c, pp, n = rows[a], heads[a], pages[a], pool_pages[a], counts[a]
        for j in range(d):
            acc = np.float32(0.0)
            for t in range(n):
                acc += pool[pp, 0, t, j]
            mean[r, h, c, j] = acc / max(n, 1)
        pool_tab[r, h, c], count_tab[r, h, c] = pp, n
        log_count[r, h, c] = math.log(n) if n > 0 else -np.inf
    changed = np.sort(pool_pages)  # a binary search per slot: a new row's build changes every page
    for r in range(slot_page.shape[0]):
        for h in range(slot_page.shape[1]):
            for s in range(slot_page.shape[2]):
                held = slot_page[r, h, s]
                at = np.searchsorted(changed, held)
                if held >= 0 and at < len(changed) and changed[at] == held:
                    slot_page[r, h, s], slot_count[r, h, s] = -1, 0
