"""The device selector's step on a CPU, fused into one numba call per layer.

On a CPU "device" memory is host memory, and the selector's ~40 small tensor ops per layer cost
more in dispatch than in arithmetic (measured: 7 ms a layer at 8 rows x 3 KV heads, 4k tokens, one
thread). This kernel does the same work per (row, KV head) in one pass: centroid shortlist →
exact scores over the shortlist's keys (read in place from the pool) → whole pages + single
tokens → slot plan (hits stay, misses take the free slots in order) → copies into the resident
buffer → the slot region of the attention mask. :mod:`icecache_ray.engine.device_select` and
:class:`~icecache_ray.engine.device_slots.DeviceSlots` are its reference (the path CUDA runs);
tests/test_device_select.py checks they choose the same pages, tokens and masks.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, fastmath=FAST, nogil=True)
def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values, largest first (ties: lowest position first)."""
    return np.argsort(-values, kind="mergesort")[:k]


@njit(cache=True, fastmath=FAST, nogil=True)
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    acc = 0.0
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


@njit(cache=True, fastmath=FAST, nogil=True)
def _best_dot(qs: np.ndarray, v: np.ndarray) -> float:
    """max over the rows of qs [g, d] of qs[g] . v."""
    best = -np.inf
    for g in range(qs.shape[0]):
        acc = _dot(qs[g], v)
        if acc > best:
            best = acc
    return best


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
        # 1. centroid shortlist: best logit over the group's heads
        qs = q[i, h]  # [g, d]
        logits = np.full(used, -np.inf)
        real = 0
        for c in range(used):
            if count[r, h, c] > 0:
                logits[c] = _best_dot(qs, mean[r, h, c]) * scale + log_count[r, h, c]
                real += 1
        short = _top(logits, min(shortlist, real))
        m = len(short)
        # 2. exact scores, per-head softmax over every shortlisted token, mass summed over heads
        scores = np.full((groups, m * p), -np.inf)
        for s in range(m):
            c = short[s]
            keys = pool[pool_ids[r, h, c], 0]
            for t in range(count[r, h, c]):
                for g in range(groups):
                    scores[g, s * p + t] = _dot(qs[g], keys[t]) * scale
        mass = np.zeros(m * p)
        for g in range(groups if m > 0 else 0):  # a row with nothing offloaded yet has no page
            e = np.exp(scores[g] - scores[g].max())  # empty rows: exp(-inf) = 0
            mass += e / e.sum()
        mass = mass.reshape(m, p)
        page_mass = np.empty(m)
        for s in range(m):
            page_mass[s] = mass[s].sum()
        chosen = _top(page_mass, min(n_pages, m))
        # 3. slot plan: wanted pages keep their slot, the others take the free slots in order
        want = np.empty(len(chosen), np.int64)
        want_count = np.empty(len(chosen), np.int64)
        for a in range(len(chosen)):
            want[a] = pool_ids[r, h, short[chosen[a]]]
            want_count[a] = count[r, h, short[chosen[a]]]
        keep = np.zeros(n_slots, np.bool_)
        present = np.zeros(len(chosen), np.bool_)
        for s in range(n_slots):
            for a in range(len(chosen)):
                if slot_page[r, h, s] == want[a]:
                    keep[s] = True
                    present[a] = True
                    slot_count[r, h, s] = want_count[a]
        free = 0
        missing = 0
        for s in range(n_slots):
            if not keep[s]:
                slot_page[r, h, s] = -1
                slot_count[r, h, s] = 0
        for a in range(len(chosen)):
            if present[a]:
                continue
            while keep[free]:
                free += 1
            slot_page[r, h, free] = want[a]
            slot_count[r, h, free] = want_count[a]
            base = slot_start + free * p
            for t in range(p):
                for j in range(d):
                    kv[0, r, h, base + t, j] = pool[want[a], 0, t, j]
                    kv[1, r, h, base + t, j] = pool[want[a], 1, t, j]
            keep[free] = True
            missing += 1
        for s in range(n_slots):
            for t in range(p):
                mask[i, h, slot_start + s * p + t] = t < slot_count[r, h, s]
        # 4. token slots: the largest masses outside the pages taken whole
        for a in range(len(chosen)):
            for t in range(p):
                mass[chosen[a], t] = -1.0
        for s in range(m):
            for t in range(count[r, h, short[s]], p):
                mass[s, t] = -1.0
        flat = mass.reshape(-1)
        tokens = _top(flat, min(n_tokens, m * p))
        taken = 0
        for a in range(n_tokens):
            ok = a < len(tokens) and flat[tokens[a]] >= 0.0
            mask[i, h, token_start + a] = ok
            if ok:
                page = pool_ids[r, h, short[tokens[a] // p]]
                row = tokens[a] % p
                for j in range(d):
                    kv[0, r, h, token_start + a, j] = pool[page, 0, row, j]
                    kv[1, r, h, token_start + a, j] = pool[page, 1, row, j]
                taken += 1
        token_pages = (taken + p - 1) // p
        item_selected[item] = len(chosen) + token_pages
        item_loaded[item] = missing + token_pages
    for item in range(n * heads):
        selected[item // heads] += item_selected[item]
        loaded[item // heads] += item_loaded[item]
