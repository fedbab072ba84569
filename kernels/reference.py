"""Slow NumPy reference implementations of the numba kernels in :mod:`.mdci` (parity tests only)."""

from __future__ import annotations

import numpy as np


def pca_pack_ref(x: np.ndarray, page_size: int, init: np.ndarray, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as :func:`kernels.mdci.pca_pack`, written recursively with NumPy."""
    n = x.shape[0]
    n_pages = -(-n // page_size)
    order = np.arange(n)
    bounds = np.zeros(n_pages + 1, np.int64)

    def direction(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
        centred = rows - mean
        v = init.astype(np.float32).copy()
        for _ in range(n_iter):
            acc = centred.T @ (centred @ v)
            norm = float(np.sqrt((acc.astype(np.float64) ** 2).sum()))
            if norm <= 1e-30:
                break
            v = (acc / norm).astype(np.float32)
        return mean, v

    def split(start: int, end: int, pages: int, first: int) -> None:
        if pages == 1:
            bounds[first], bounds[first + 1] = start, end
            return
        left_pages = pages // 2
        n_left = ((end - start) * left_pages) // pages
        mean, v = direction(x[order[start:end]])
        proj = (x[order[start:end]] - mean) @ v
        order[start:end] = order[start:end][np.argsort(proj, kind="mergesort")]
        split(start, start + n_left, left_pages, first)
        split(start + n_left, end, pages - left_pages, first + left_pages)

    split(0, n, n_pages, 0)
    return order, bounds


def route_clusters_ref(qs, cluster_keys, node_slack, r_cluster, r_block_start, r_child_start, r_child_end, beam_upper):
    """Same contract as :func:`kernels.mdci.route_clusters`."""
    current = np.arange(r_block_start[0], r_block_start[1])
    n_blocks = len(r_block_start) - 1
    qnorm = np.linalg.norm(qs, axis=1)
    for b in range(n_blocks):
        scores = (qs @ cluster_keys[r_cluster[current]].T + qnorm[:, None] * node_slack[current][None]).astype(np.float32)
        if b == n_blocks - 1:
            return current, scores
        width = min(beam_upper, len(current))
        keep = np.zeros(len(current), bool)
        for h in range(qs.shape[0]):
            keep[np.argsort(-scores[h], kind="quicksort")[:width]] = True
        current = np.concatenate(
            [np.arange(r_child_start[n], r_child_end[n]) for n in current[keep]] or [np.zeros(0, np.int64)]
        )
    return current, np.zeros((qs.shape[0], 0), np.float32)


def score_pages_ref(qs, pool_pages, page_pool, page_count, pages):
    """Same contract as :func:`kernels.mdci.score_pages`."""
    pool_k = pool_pages[:, 0]
    psize = pool_k.shape[1]
    out = np.full((qs.shape[0], len(pages), psize), -np.inf, np.float32)
    for i, p in enumerate(pages):
        n = page_count[p]
        out[:, i, :n] = qs @ pool_k[page_pool[p], :n].T
    return out


def cluster_pages_ref(cluster_first_page, page_next, clusters):
    """Same contract as :func:`kernels.mdci.cluster_pages`."""
    out = []
    for c in clusters:
        p = cluster_first_page[c]
        while p >= 0:
            out.append(p)
            p = page_next[p]
    return np.asarray(out, np.int64)


def subtree_radius_ref(cluster_keys, cluster_radius, r_cluster, r_block_start, r_child_start, r_child_end):
    """Same contract as :func:`kernels.mdci.subtree_radius`."""
    radius = cluster_radius[r_cluster].astype(np.float32).copy()
    for b in range(len(r_block_start) - 3, -1, -1):
        for node in range(r_block_start[b], r_block_start[b + 1]):
            lo, hi = r_child_start[node], r_child_end[node]
            if hi > lo:
                reach = np.linalg.norm(cluster_keys[r_cluster[lo:hi]] - cluster_keys[r_cluster[node]], axis=1) + radius[lo:hi]
                radius[node] = max(radius[node], reach.max())
    return radius


def page_log_values_ref(token_scores, scale, use_mass):
    """Same contract as :func:`kernels.mdci.page_log_values`."""
    logits = token_scores.astype(np.float64) * scale
    flat = logits.reshape(logits.shape[0], -1)
    peak = flat.max(axis=1, keepdims=True)
    lse = peak + np.log(np.exp(flat - peak).sum(axis=1, keepdims=True))
    logp = logits - lse[:, :, None]
    if not use_mass:
        return logp.max(axis=2)
    page_peak = logp.max(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(page_peak[..., 0]), page_peak[..., 0] + np.log(np.exp(logp - page_peak).sum(axis=2)), -np.inf)


def head_union_ref(clusters, scores, width, n_clusters):
    """Same contract as :func:`kernels.mdci.head_union`."""
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, : min(width, scores.shape[1])]
    out = []
    for item in clusters[ranked.T.ravel()]:
        if int(item) not in out:
            out.append(int(item))
    return np.asarray(out, np.int64)



def group_token_mass_ref(token_scores, scale):
    """Each candidate token's probability summed over the heads (per head, a softmax over every
    candidate token): the mass of :func:`kernels.mdci.page_values_and_token_mass`. [m, P]."""
    logits = token_scores.astype(np.float64) * scale
    flat = logits.reshape(logits.shape[0], -1)
    out = np.zeros(flat.shape[1])
    for row in flat:
        if np.isfinite(row).any():
            e = np.exp(row - row.max())
            out += e / e.sum()
    return out.reshape(logits.shape[1:])



def top_tokens_outside_ref(mass, counts, chosen, n):
    """Same contract as :func:`kernels.mdci.top_tokens_outside` (a stable sort of every token)."""
    m, psize = mass.shape
    taken = set(chosen.tolist())
    flat = np.asarray([i * psize + s for i in range(m) if i not in taken for s in range(counts[i])], np.int64)
    if not len(flat):
        return flat
    order = np.argsort(-mass.reshape(-1)[flat], kind="stable")[: min(n, len(flat))]
    return np.sort(flat[order])
