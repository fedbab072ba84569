"""Decode-like replay of one (layer, KV head) through a selection policy, with exact metrics.

Queries arrive at increasing positions p. For each p the attended set is sink [0, S) + the
policy's selected middle pages + the window (the page being filled plus ``window_pages - 1`` full
pages before it). Tokens leave the window a page at a time and are inserted into the policy's
store before the next query, exactly as during decoding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from icecache_ray.config import IceCacheConfig
from icecache_ray.metrics import attention_mass_recall, softmax_rows, topk_hit_rate


@dataclass
class HeadResult:
    """Metrics of one policy on one (layer, KV head) over all query positions."""

    recall: list[float] = field(default_factory=list)
    hit: list[float] = field(default_factory=list)
    query_s: list[float] = field(default_factory=list)
    build_s: float = 0.0
    built_tokens: int = 0
    insert_s: float = 0.0
    inserted_tokens: int = 0
    metadata_bytes: int = 0
    indexed_tokens: int = 0
    attended_tokens: list[int] = field(default_factory=list)


def window_start(pos: int, cfg: IceCacheConfig) -> int:
    """First window token for a query at ``pos``: the start of the page holding ``pos`` minus
    ``window_pages - 1`` pages, never inside the sink."""
    p = cfg.page_size
    return max(cfg.sink_tokens, (pos // p - (cfg.window_pages - 1)) * p)


def replay_head(
    policy,
    keys: np.ndarray,
    queries: np.ndarray,
    positions: np.ndarray,
    cfg: IceCacheConfig,
    topk: int = 16,
) -> HeadResult:
    """Run ``policy`` over one KV head.

    keys: [T, d] post-RoPE keys of the whole prompt; queries: [H, n_q, d] the group's queries at
    ``positions`` [n_q] (increasing, all < T). Values are not needed for selection quality, so
    the stores receive zeros.
    """
    out = HeadResult()
    scale = 1.0 / math.sqrt(keys.shape[1])
    sink = cfg.sink_tokens
    end = window_start(int(positions[0]), cfg)
    zeros = np.zeros_like(keys)
    t0 = time.perf_counter()
    store = policy.build(keys[sink:end], zeros[sink:end])
    out.build_s, out.built_tokens = time.perf_counter() - t0, end - sink
    try:
        for i, pos in enumerate(positions):
            start = window_start(int(pos), cfg)
            if start > end:
                t0 = time.perf_counter()
                store.insert(keys[end:start], zeros[end:start])
                out.insert_s += time.perf_counter() - t0
                out.inserted_tokens += start - end
                end = start
            _score_one(out, policy, store, keys[: pos + 1], queries[:, i], cfg, end, scale, topk)
        out.metadata_bytes = store.metadata_bytes()
        out.indexed_tokens = store.n_tokens
    finally:
        store.release()
    return out


def _score_one(out: HeadResult, policy, store, keys, qs, cfg: IceCacheConfig, end: int, scale: float, topk: int) -> None:
    sink = cfg.sink_tokens
    logits = (qs @ keys.T) * scale  # [H, pos + 1]
    context = np.concatenate([np.arange(sink), np.arange(end, keys.shape[0])])
    t0 = time.perf_counter()
    selection = policy.select(store, qs, cfg.retrieved_pages, logits[:, context])
    out.query_s.append(time.perf_counter() - t0)
    chosen = sink + selection.tokens
    probs = softmax_rows(logits)
    out.recall.append(attention_mass_recall(probs, np.concatenate([context, chosen])))
    out.hit.append(topk_hit_rate(probs.mean(axis=0), np.arange(sink, end), chosen, topk))
    out.attended_tokens.append(len(context) + len(np.unique(chosen)))
